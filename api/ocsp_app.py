"""The standalone OCSP/CRL responder: `v2gpki ocsp-serve [--host] [--port] [--workers]`.

`serve_ocsp()` runs the lean server of api/ocsp_fast.py by default (V2GPKI_OCSP_SERVER=uvicorn, or
``framework="uvicorn"``, runs the FastAPI/uvicorn app below instead: same routes and answers).

A separate process for the public, high-volume endpoints (Boulder splits its services the same way):
it mounts only the OCSP and CRL routes, signs with the delegated OCSP signer keys only (RFC 6960
§4.2.2.2) and refuses to load a CA key — it never generates CRLs, it serves the ones the CA process
publishes. The database is shared with the CA process: pre-signed responses and revocations made there
are served here at once (each request reads the certificate's status with its pre-signed response).

Each uvicorn worker builds its own Context in the lifespan (after fork: SoftHSM does not notice fork).
To keep even the OCSP keys' token separate, point this process at a token (V2GPKI_TOKEN_LABEL, PIN)
that holds only the ``ocsp-<ca>`` keys.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI

from api.app import create_app
from api.responders import OcspEndpoint
from pki.config import Settings, current
from pki.context import Context
from pki.wiring import build_context

ROUTERS = ["api.responders"]


def responder_context(settings: Settings | None = None, *, migrate: bool = False) -> Context:
    return build_context(settings or Settings(), migrate=migrate, responder_only=True)


class OcspFirst:
    """ASGI front: OCSP requests go straight to the OCSP endpoint, skipping FastAPI's routing and
    middleware stack (measured: about a quarter of the per-request CPU of the pre-signed path), still
    inside the observability middleware so metrics and access logs stay. Everything else — CRLs,
    /healthz, /metrics, the lifespan that builds the Context — goes to the FastAPI app."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state  # app.state.ctx, as on the FastAPI app
        endpoint = OcspEndpoint()
        try:
            from api.observability import ObservabilityMiddleware

            self._ocsp: Any = ObservabilityMiddleware(endpoint)
        except ImportError:
            self._ocsp = endpoint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path == "/ocsp" or path.startswith("/ocsp/"):
                scope["app"] = self.app
                scope["path_params"] = {"b64": path[6:]}
                await self._ocsp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_ocsp_app(ctx: Context | None = None) -> OcspFirst:
    """The lean app (uvicorn factory). ``ctx``: an existing responder Context (tests)."""
    return OcspFirst(create_app(ctx, routers=ROUTERS, ctx_factory=responder_context))


def serve_ocsp(host: str = "127.0.0.1", port: int = 8080, workers: int = 1, *, log_level: str = "warning",
               framework: str | None = None) -> None:
    """``framework``: "fast" (default; api/ocsp_fast.py, the raw asyncio server over an in-memory table of
    pre-signed responses) or "uvicorn" (this module's app). Default from V2GPKI_OCSP_SERVER."""
    framework = (framework or current().ocsp_server or "fast").lower()
    if framework == "fast":
        from api.ocsp_fast import serve

        serve(host, port, workers, log_level=log_level)
        return
    if framework != "uvicorn":
        raise SystemExit(f"v2gpki ocsp-serve: unknown server {framework!r} (fast or uvicorn)")
    import uvicorn

    # Migrate and open the token once in the parent, so that workers start on a ready schema and a bad
    # PIN fails here with one clear message; workers then skip migrations.
    ctx = responder_context(migrate=True)
    ctx.keystore.list()
    ctx.db.dispose()
    print(f"v2gpki OCSP/CRL responder on http://{host}:{port} ({workers} workers)", file=sys.stderr)
    uvicorn.run("api.ocsp_app:create_ocsp_app", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, access_log=False, proxy_headers=False)


__all__ = ["create_ocsp_app", "responder_context", "serve_ocsp"]
