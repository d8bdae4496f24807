"""A lean ASGI lane for the three hot POST endpoints: enrollment, OCPP SignCertificate, Get15118EVCertificate.

Under load, FastAPI's per-request machinery (routing, dependency solving, thread-pool hop through anyio,
response re-encoding) cost more CPU than issuing the certificate (bench/enrollment.py). This middleware
sits just inside BodyLimit and observability, and answers the common case of those endpoints itself:

  * a JSON body that the route's own pydantic model accepts,
  * a Bearer API key this process verified recently (the in-memory cache of pki.orgs),
  * no client certificate, no Idempotency-Key header;

by calling **the route function itself** (same code, same checks, same answer) in a thread pool, and
turning typed errors into the same problem+json as the FastAPI handlers (api/problems.response_for).
Everything else — first use of a key, client certificates, idempotent retries, invalid bodies (FastAPI's
422 with details), other methods and paths — is passed to FastAPI untouched (the body is replayed), so
behaviour stays defined in one place. Nothing with side effects happens before that decision.
V2GPKI_FASTLANE=0 turns the lane off.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import os
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# path → (module, route function, request model, thread pool); resolved on first use, only where the app
# mounts it.
ROUTES: dict[str, tuple[str, str, str, str]] = {
    "/v1/enrollments": ("api.v1.routes", "post_enrollment", "EnrollmentIn", "api"),
    "/ocpp/v201/sign-certificate": ("api.ocpp.v201", "sign_certificate", "SignCertificateIn", "api"),
    "/ocpp/v201/get-15118-ev-certificate": ("api.ocpp.ev_certificate", "get_15118_ev_certificate",
                                            "EvCertificateIn", "cps"),
}

# The route functions block on the HSM and the database: a pool of their own, sized like anyio's default.
_POOL = ThreadPoolExecutor(max_workers=int(os.environ.get("V2GPKI_FASTLANE_THREADS", "40")),
                           thread_name_prefix="v2gpki-api")
# Contract installations on SQLite run on the event loop itself, one at a time per worker process. An
# installation is ≈ 6 ms of Python (EXI, XML signature, key wrap, chain checks) and SQLite never makes it
# wait (an in-process library): several installations interleaving on one GIL only added switching, and
# even one pool thread cost a hand-off per request (future, self-pipe wake-up, GIL transfer). bench/contract.py
# at c=8, 2 workers (2026-11-23): 4 threads ≈ 170/s at 9.6 ms CPU each; one thread ≈ 215–250/s at 6.9–8.2 ms;
# on the loop 266–332/s at 5.3–6.6 ms. The price: while one runs, that worker's other requests wait for it
# (≈ 6 ms each), and a write lock held by another process (SQLite's busy timeout) stalls the worker, not
# just its installations — the embedded default's trade; PostgreSQL deployments keep the pool. On
# PostgreSQL an installation waits for its round trips and the shared pool overlaps them (one thread
# measured ≈ 127 against ≈ 150/s; on the loop no better), so it keeps the shared pool. Enrollments keep
# the shared pool everywhere: their batches of concurrent issuances (pki.issuance.IssueBatcher) need
# concurrent callers. V2GPKI_CPS_THREADS=N forces a pool of N threads for installations, 0 the loop.
_CPS_POOL: ThreadPoolExecutor | None = None


def _cps_pool(sqlite: bool) -> ThreadPoolExecutor | None:
    """The pool installations run in; None: on the event loop."""
    global _CPS_POOL
    forced = os.environ.get("V2GPKI_CPS_THREADS", "").strip()
    if forced == "0" or (not forced and sqlite):
        return None
    if not forced:
        return _POOL
    if _CPS_POOL is None:
        _CPS_POOL = ThreadPoolExecutor(max_workers=int(forced), thread_name_prefix="v2gpki-cps")
    return _CPS_POOL


@dataclass(frozen=True)
class _Route:
    path: str  # observability labels the request with the route template (scope["route"].path)
    fn: Callable[..., Any]
    model: type[BaseModel]
    wants_response: bool  # post_enrollment takes the FastAPI Response (used only for idempotent replays)
    pool: ThreadPoolExecutor | None  # None: called on the event loop (installations on SQLite)


ANSWERED = [0]  # requests this process answered in the lane (tests, diagnostics)


def enabled() -> bool:
    return os.environ.get("V2GPKI_FASTLANE", "1").lower() not in ("0", "false", "no", "off")


class FastLane:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: dict[str, _Route | None] = {}

    def _route(self, scope: Scope) -> _Route | None:
        path = scope["path"]
        if path in self._routes:
            return self._routes[path]
        spec = ROUTES[path]
        found: _Route | None = None
        app = scope.get("app")
        mounted: set[str] = getattr(getattr(app, "state", None), "mounted_routers", set())
        if spec[0] in mounted:
            mod = importlib.import_module(spec[0])
            fn = getattr(mod, spec[1])
            pool = _cps_pool(app.state.ctx.db.is_sqlite) if spec[3] == "cps" else _POOL  # type: ignore[union-attr]
            found = _Route(path, fn, getattr(mod, spec[2]), spec[1] == "post_enrollment", pool)
        self._routes[path] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away before sending its body: nobody to answer
        answer = await self._try(scope, route, body)
        if answer is None:  # not ours to answer: FastAPI gets the request as it came
            await self.app(scope, _replay(body, receive), send)
            return
        await answer(scope, receive, send)

    async def _try(self, scope: Scope, route: _Route, body: bytes) -> Response | None:
        from api.auth import _admit, peer_certificate_der
        from api.problems import response_for
        from pki.orgs import cached_api_key_principal

        request = Request(scope)
        headers = request.headers
        if "idempotency-key" in headers or peer_certificate_der(request) is not None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        ctx = scope["app"].state.ctx
        principal = cached_api_key_principal(ctx.db, token.strip())
        if principal is None:
            return None
        try:
            model = route.model.model_validate_json(body)
        except ValidationError:
            return None
        scope["route"] = route  # the path template for metrics and the access log
        try:
            _admit(request, principal)  # the per-organization rate limit, as the dependency applies it
            args: tuple[Any, ...] = (model, ctx, principal) + ((Response(),) if route.wants_response else ())
            # copy_context: the request ID and log context follow the call into the pool thread, as they
            # do through Starlette's run_in_threadpool.
            if route.pool is None:
                result = contextvars.copy_context().run(route.fn, *args)
            else:
                result = await asyncio.get_running_loop().run_in_executor(
                    route.pool, contextvars.copy_context().run, route.fn, *args)
        except Exception as exc:  # noqa: BLE001 - typed errors become problems; anything else is a 500
            resp = response_for(exc)
            if resp is None:
                raise
            return resp
        if not isinstance(result, Response):  # every lane route answers a Response; guard the contract
            raise TypeError(f"{route.path}: route returned {type(result).__name__}, not a Response")
        ANSWERED[0] += 1
        return result


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


__all__ = ["FastLane", "enabled"]
