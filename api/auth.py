"""Client authentication and rate limiting.

Client certificates are preferred over static secrets (background reading, SR2): the service issues
`api-client` certificates from its own CSMS root. They arrive either from uvicorn's own TLS (see
api/tls.py, which exposes the peer certificate as the ASGI TLS extension) or, behind a TLS proxy, in the
`X-SSL-Client-Cert` header (URL-encoded PEM, as nginx's $ssl_client_escaped_cert) — trusted only when
the request comes from an address in V2GPKI_TRUSTED_PROXIES. Bearer API keys are the fallback, and the
short-lived OAuth access tokens traded for them at /oauth/token (api/oauth.py, pki/oauth.py), as
`Authorization: Bearer` or `X-API-Key` (what clients of hosted Plug & Charge PKIs send).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Annotated
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from pki import audit
from pki.config import current
from pki.context import Context
from pki.oauth import authenticate_token, looks_like_token
from pki.orgs import Principal, Unauthenticated, authenticate_api_key, cached_api_key_principal, org_principal
from pki.store.db import utcnow
from pki.store.inventory import Inventory


class TokenBucket:
    """Per-key token buckets (per process; several workers multiply the budget, documented)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._b: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 if allowed, else seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._b.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._b[key] = (tokens - 1, now)
                return 0.0
            self._b[key] = (tokens, now)
            if len(self._b) > 100_000:  # bound memory under a spray of keys
                self._b.clear()
            return (1 - tokens) / self.rate


# Per process, sized from the settings this process started with (V2GPKI_RATE_LIMIT, V2GPKI_AUTH_FAIL_*).
CLIENT_LIMIT = TokenBucket(current().rate_limit, current().rate_limit * 2)
AUTH_FAIL_LIMIT = TokenBucket(current().auth_fail_rate, current().auth_fail_burst)


def trusted_proxies(request: Request) -> set[str]:
    """V2GPKI_TRUSTED_PROXIES of this app's Context."""
    ctx: Context = request.app.state.ctx
    return ctx.settings.trusted_proxy_set()


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def peer_certificate_der(request: Request) -> bytes | None:
    tls = request.scope.get("extensions", {}).get("tls")
    if tls and tls.get("client_cert_der"):
        der: bytes = tls["client_cert_der"]
        return der
    header = request.headers.get("x-ssl-client-cert")
    if header and _client_ip(request) in trusted_proxies(request):
        try:
            cert = x509.load_pem_x509_certificate(unquote(header).encode())
        except ValueError:
            raise HTTPException(401, "client certificate header is not a PEM certificate") from None
        return cert.public_bytes(serialization.Encoding.DER)
    return None


def _by_certificate(ctx: Context, der: bytes) -> Principal:
    fp = hashlib.sha256(der).hexdigest()
    row = Inventory(ctx.db).certificate_by_fingerprint(fp)
    if row is None or row.profile != "api-client":
        raise Unauthenticated("client certificate was not issued by this service for API access")
    if row.status != "valid":
        raise Unauthenticated(f"client certificate is {row.status}")
    now = utcnow()
    if not (row.not_before <= now < row.not_after):
        raise Unauthenticated("client certificate is expired or not yet valid")
    if not row.tenant:
        raise Unauthenticated("client certificate is bound to no organization")
    return org_principal(ctx.db, row.tenant, f"cert:{row.issuer}/{row.serial}")


def _fail(ctx: Context, request: Request, reason: str) -> HTTPException:
    ip = _client_ip(request)
    if AUTH_FAIL_LIMIT.take(ip) > 0:
        return HTTPException(429, "too many failed sign-ins", headers={"Retry-After": "10"})
    try:
        audit.record(ctx.db, audit.Entry(actor=f"ip:{ip}", action="auth.failure", outcome="failure",
                                         details={"reason": reason, "path": request.url.path}))
    except Exception:  # noqa: BLE001 - never turn an auth failure into a 500
        pass
    return HTTPException(401, reason, headers={"WWW-Authenticate": 'Bearer realm="v2gpki"'})


def _admit(request: Request, p: Principal) -> Principal:
    wait = CLIENT_LIMIT.take(p.org)
    if wait > 0:
        raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": str(max(1, int(wait + 0.999)))})
    request.state.principal = p
    return p


def presented_secret(request: Request) -> str:
    """The Bearer value (an API key or an OAuth access token, pki/oauth.py), else an ``X-API-Key`` header's:
    clients of hosted Plug & Charge PKIs send the token there too (MaEVe sends both), some only there."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip()


def _authenticate_sync(request: Request, ctx: Context) -> Principal:
    try:
        der = peer_certificate_der(request)
        if der is not None:
            p = _by_certificate(ctx, der)
        else:
            token = presented_secret(request)
            if not token:
                raise _fail(ctx, request, "authentication required (client certificate, Bearer API key or "
                                          "access token)")
            if looks_like_token(token):
                p = authenticate_token(ctx, token)
            else:
                p = authenticate_api_key(ctx.db, token)
    except Unauthenticated as exc:
        raise _fail(ctx, request, exc.message) from None
    return _admit(request, p)


async def authenticate(request: Request) -> Principal:
    """Client certificate, Bearer API key or OAuth access token (also as ``X-API-Key``). A key this
    process verified recently is answered from the in-memory cache on the event loop (pki.orgs: bounded
    TTL, dropped on any key/org change); anything that needs the database or a signature check (first use
    of a key, client certificates, access tokens, audit of a failure) runs in the thread pool, so the
    event loop never blocks. The Context is read from the app directly, not as a sub-dependency: FastAPI's
    dependency solving is a measurable share of a hot request's CPU (bench/enrollment.py)."""
    ctx: Context = request.app.state.ctx
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    if peer_certificate_der(request) is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            p = cached_api_key_principal(ctx.db, token.strip())
            if p is not None:
                return _admit(request, p)
    return await run_in_threadpool(_authenticate_sync, request, ctx)


PrincipalDep = Annotated[Principal, Depends(authenticate)]
