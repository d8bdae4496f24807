"""The one place where typed errors become HTTP answers: RFC 9457 `application/problem+json` documents,
and the HTTP status every other error shape reuses (OCPP rejections, api/ocpp/core.py; OPCP's Error
documents, api/opcp/; RFC 6749 §5.2 bodies of /oauth/token, built here too).

pki/ and hsm/ raise typed errors without HTTP knowledge (a value the database refuses arrives as
pki.store.errors.InvalidValue, a PKIError: no database exception reaches api/); STATUS maps each error class
to its status; nothing else in api/ builds a problem body (tests/test_arch_api.py). Internal detail (stack
traces, paths, PINs) never reaches the client.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.ocpp.shapes import invalid_request
from hsm.errors import HSMConfigError, HSMError, HSMUnavailable, SignatureCheckFailed
from pki.cps.errors import (
    ActionMismatch,
    CPS20Failure,
    CPSError,
    CPSFailure,
    ExiDecodeError,
    ExiEncodeError,
    ExiError,
    ExiLimitExceeded,
    ExiUnsupported,
    KeyWrapError,
    ResponseTooLarge,
    SignatureVerificationFailed,
    XmlDsigError,
)
from pki.errors import (
    AlreadyRevoked,
    BackupError,
    BadCertificate,
    BadContractData,
    BadCSR,
    BadKey,
    BadOrganization,
    BadRevocation,
    BadRootImport,
    BadSignature,
    BadStatusRequest,
    BadSubject,
    CampaignState,
    CertificateTooLarge,
    ClockSkew,
    ConfigError,
    Conflict,
    CoverageTooLow,
    CRLUnavailable,
    FirmwareRefused,
    FirmwareVerificationFailed,
    Forbidden,
    LintError,
    MalformedOCSPRequest,
    NotFound,
    OAuthError,
    PKIError,
    PolicyError,
    RollbackRefused,
    RootInUse,
    TrustListError,
    Unauthenticated,
    UnknownCA,
    UnknownProfile,
    UnknownRoot,
    UnknownStation,
    UnsupportedNamespace,
)
from pki.store.errors import Duplicate, InvalidValue, StorageError

log = logging.getLogger("v2gpki.api")
PROBLEM = "application/problem+json"
TYPE_BASE = "https://v2gpki.dev/problems/"


# HTTP status of each typed error, most specific first: the first class an error is an instance of decides.
# pki/ and hsm/ know nothing of HTTP; this table is where their errors meet it. Every PKIError subclass is
# listed by name (tests/test_arch_api.py), so a new error class must be placed here, not fall through.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    # pki/errors.py
    (ClockSkew, 503),  # temporary: the answer says when to come back (Retry-After)
    (PolicyError, 500),
    (ConfigError, 500),
    (UnknownProfile, 400),
    (UnknownCA, 404),
    (BadSignature, 400),
    (BadCSR, 400),
    (BadKey, 400),
    (BadSubject, 400),
    (CertificateTooLarge, 400),
    # the certificate the request would produce fails the linter: nothing was issued, and the request (not
    # the server) is what to change, so 422 rather than 500
    (LintError, 422),
    (UnknownStation, 404),
    (NotFound, 404),
    (AlreadyRevoked, 409),
    (BadRevocation, 400),
    (Forbidden, 403),
    (CoverageTooLow, 409),
    (RootInUse, 409),
    (CampaignState, 409),
    (Conflict, 409),
    (MalformedOCSPRequest, 400),
    (BadStatusRequest, 400),
    (CRLUnavailable, 503),
    (BackupError, 400),
    (BadOrganization, 400),
    (Unauthenticated, 401),
    (BadCertificate, 400),
    (UnknownRoot, 400),
    (BadRootImport, 400),
    (TrustListError, 400),
    (RollbackRefused, 409),
    (FirmwareRefused, 409),
    (FirmwareVerificationFailed, 422),
    (OAuthError, 400),  # /oauth/token answers RFC 6749 bodies with oauth_status()
    (UnsupportedNamespace, 400),
    (BadContractData, 400),
    # pki/store/errors.py
    (InvalidValue, 400),  # the database refused a value the client sent
    (Duplicate, 409),  # a unique key refused the row
    (StorageError, 503),  # the database could not answer
    # pki/cps/errors.py
    (ExiLimitExceeded, 413),
    (ExiUnsupported, 400),
    (ExiDecodeError, 400),
    (ExiEncodeError, 400),
    (ExiError, 400),
    (KeyWrapError, 400),
    (SignatureVerificationFailed, 400),
    (XmlDsigError, 400),
    (ActionMismatch, 400),
    (ResponseTooLarge, 422),
    (CPSFailure, 400),
    (CPS20Failure, 400),
    (CPSError, 400),
    (PKIError, 400),
    # hsm/errors.py: the signing service is unavailable, whatever the cause (the body tells them apart)
    (HSMUnavailable, 503),
    (HSMConfigError, 503),
    (SignatureCheckFailed, 503),
    (HSMError, 503),
)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a typed error (STATUS), None for anything else (an unexpected error: a 500)."""
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return None


def problem_document(status: int, code: str, title: str, detail: str | None = None,
                     **extra: object) -> dict[str, object]:
    """An RFC 9457 problem document: ``type`` is TYPE_BASE + the error's stable code."""
    body: dict[str, object] = {"type": TYPE_BASE + code, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


def problem(status: int, code: str, title: str, detail: str | None = None, **extra: object) -> JSONResponse:
    body = problem_document(status, code, title, detail, **extra)
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def payload_too_large(max_body: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 413 problem as raw ASGI headers and body (api/limits.py answers before any framework runs)."""
    body = json.dumps(problem_document(413, "payload-too-large", "Payload too large",
                                       f"request body exceeds {max_body} bytes")).encode()
    return [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode())], body


def oauth_status(exc: OAuthError) -> int:
    """RFC 6749 §5.2: a failed client authentication is 401, every other error 400."""
    return 401 if exc.error == "invalid_client" else 400


def oauth_error(exc: OAuthError, *, status: int | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 6749 §5.2 error body (`error`, `error_description`): /oauth/token's one error shape, the one
    every OAuth client parses (not a problem document). Never cached (§5.1)."""
    code = status or oauth_status(exc)
    h = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if code == 401:
        h["WWW-Authenticate"] = 'Basic realm="v2gpki"'
    h.update(headers or {})
    return JSONResponse({"error": exc.error, "error_description": exc.message}, status_code=code, headers=h)


def _status(exc: BaseException) -> int:
    return status_of(exc) or 500


def _pki(exc: PKIError) -> JSONResponse:
    status = _status(exc)
    # A temporary refusal (clock skew, #27 item 4) says when to come back (RFC 9110 §10.2.3).
    extra: dict[str, object] = {"retry_after": exc.context["retry_after"]} if "retry_after" in exc.context else {}
    return problem(status, exc.code, exc.code.replace("-", " ").capitalize(), exc.message, **extra)


# Seconds a client is told to wait after an HSM outage answer: the key store's circuit breaker stays open
# this long (hsm/pkcs11.py), and every 503 says when to come back (RFC 9110 §10.2.3).
HSM_RETRY_AFTER = 5


def _hsm_down(exc: HSMUnavailable) -> JSONResponse:
    return problem(_status(exc), "hsm-unavailable", "HSM unavailable", "the signing service is temporarily unavailable",
                   retry_after=HSM_RETRY_AFTER)


def _hsm_cfg(exc: HSMConfigError) -> JSONResponse:
    log.error("HSM configuration error: %s", exc)
    return problem(_status(exc), "hsm-unavailable", "HSM unavailable", "the signing service is misconfigured",
                   retry_after=HSM_RETRY_AFTER)


def _hsm_bad_signature(exc: SignatureCheckFailed) -> JSONResponse:
    # Already logged with the key's label by the key store; the client learns only what happened and that
    # nothing was kept (no certificate, CRL, OCSP response or audit record): retrying is safe.
    return problem(_status(exc), "hsm-signature-invalid", "HSM signature check failed",
                   "the HSM returned a signature that does not verify; nothing was stored",
                   retry_after=HSM_RETRY_AFTER)


def _hsm(exc: HSMError) -> JSONResponse:
    log.error("HSM error: %s", type(exc).__name__)
    return problem(_status(exc), "hsm-error", "HSM error", retry_after=HSM_RETRY_AFTER)


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
    Used by the FastAPI exception handlers below and by the routes that answer in another shape."""
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
