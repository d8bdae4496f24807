"""The one place where typed errors become RFC 9457 `application/problem+json` responses.

pki/ and hsm/ raise typed errors (a value the database refuses arrives as pki.store.errors.InvalidValue, a
PKIError: no database exception reaches api/); nothing else in api/ builds error bodies by hand. Internal detail
(stack traces, paths, PINs) never reaches the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hsm.errors import HSMConfigError, HSMError, HSMUnavailable, SignatureCheckFailed
from pki.errors import PKIError

log = logging.getLogger("v2gpki.api")
PROBLEM = "application/problem+json"
TYPE_BASE = "https://v2gpki.dev/problems/"


def problem(status: int, code: str, title: str, detail: str | None = None, **extra: object) -> JSONResponse:
    body: dict[str, object] = {"type": TYPE_BASE + code, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _pki(exc: PKIError) -> JSONResponse:
    status = exc.status if exc.status < 500 else 422 if exc.code == "lint-failed" else exc.status
    # A temporary refusal (clock skew, #27 item 4) says when to come back (RFC 9110 §10.2.3).
    extra: dict[str, object] = {"retry_after": exc.context["retry_after"]} if "retry_after" in exc.context else {}
    return problem(status, exc.code, exc.code.replace("-", " ").capitalize(), exc.message, **extra)


# Seconds a client is told to wait after an HSM outage answer: the key store's circuit breaker stays open
# this long (hsm/pkcs11.py), and every 503 says when to come back (RFC 9110 §10.2.3).
HSM_RETRY_AFTER = 5


def _hsm_down(_exc: HSMUnavailable) -> JSONResponse:
    return problem(503, "hsm-unavailable", "HSM unavailable", "the signing service is temporarily unavailable",
                   retry_after=HSM_RETRY_AFTER)


def _hsm_cfg(exc: HSMConfigError) -> JSONResponse:
    log.error("HSM configuration error: %s", exc)
    return problem(503, "hsm-unavailable", "HSM unavailable", "the signing service is misconfigured",
                   retry_after=HSM_RETRY_AFTER)


def _hsm_bad_signature(_exc: SignatureCheckFailed) -> JSONResponse:
    # Already logged with the key's label by the key store; the client learns only what happened and that
    # nothing was kept (no certificate, CRL, OCSP response or audit record): retrying is safe.
    return problem(503, "hsm-signature-invalid", "HSM signature check failed",
                   "the HSM returned a signature that does not verify; nothing was stored",
                   retry_after=HSM_RETRY_AFTER)


def _hsm(exc: HSMError) -> JSONResponse:
    log.error("HSM error: %s", type(exc).__name__)
    return problem(503, "hsm-error", "HSM error", retry_after=HSM_RETRY_AFTER)


def _http(exc: StarletteHTTPException) -> JSONResponse:
    code = {401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed",
            413: "payload-too-large", 429: "rate-limited"}.get(exc.status_code, "http-error")
    resp = problem(exc.status_code, code, code.replace("-", " ").capitalize(),
                   exc.detail if isinstance(exc.detail, str) else None)
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


# Most specific first (HSMUnavailable, HSMConfigError and SignatureCheckFailed are HSMErrors).
_TYPED: list[tuple[type[Exception], Any]] = [
    (PKIError, _pki), (HSMUnavailable, _hsm_down), (HSMConfigError, _hsm_cfg),
    (SignatureCheckFailed, _hsm_bad_signature), (HSMError, _hsm),
    (StarletteHTTPException, _http),
]


def response_for(exc: BaseException) -> JSONResponse | None:
    """The problem response for a typed error, None for anything else (an unexpected error: a 500).
    Used by the FastAPI exception handlers below and by api/fastlane.py, so both answer alike."""
    for cls, fn in _TYPED:
        if isinstance(exc, cls):
            return fn(exc)  # type: ignore[no-any-return]
    return None


def install(app: FastAPI) -> None:
    for cls, fn in _TYPED:
        async def handler(_: Request, exc: Exception, fn: Any = fn) -> JSONResponse:
            return fn(exc)  # type: ignore[no-any-return]

        app.add_exception_handler(cls, handler)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/ocpp/"):
            # A CSMS forwards /ocpp/* answers to the station: a malformed request gets its message's own
            # OCPP rejection (api/ocpp/core.py), never a problem body the station's schema check refuses.
            from api.ocpp.core import invalid_request

            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(x) for x in first.get("loc", ())[1:])
            ocpp = invalid_request(request.url.path, f"{where}: {first.get('msg', 'invalid')}")
            if ocpp is not None:
                return ocpp
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return problem(422, "invalid-request", "Invalid request", "the request body or parameters are invalid",
                       errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, "internal-error", "Internal error")
