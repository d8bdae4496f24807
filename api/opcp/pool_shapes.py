"""What the OPCP 1.0 and OPNC v1 pool, CPS, RCP and webhook routes share: their error shape, built here
only (`error`; tests/test_arch_api.py checks that no other module of api/ builds it). (The OPNC party
headers are checked in one place, api/opnc/__init__.py.)

OPCP and OPNC answer errors as ``{"errorMessages": [...], "traceId": uuid}`` (their ``Error`` /
``ErrorV1`` schema) with ``application/json``; a client written for them (CitrineOS reads
``errorMessages``) gets that shape here. `ErrorShapeRoute` turns the service's typed errors, request
validation errors and HTTP errors of these routes into it, with the status the rest of the API gives
(api/problems.py decides the status and code; the code is also in ``X-V2GPKI-Problem``). Request
validation errors are 400, as the documents list (never 422). OPCP's RCP routes (api/opcp/rcp.py) answer
the errors they catch with `opcp_error` instead: the same body, a fresh traceId also sent as X-Trace-Id.

The routes are not in the service's own OpenAPI document (/openapi.json, whose errors are RFC 9457
problems): they are described by the published documents in ``../shared/specs/`` they implement.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import problems
from pki.errors import PKIError


def trace_id() -> str:
    from api.observability import REQUEST_ID

    rid = REQUEST_ID.get()
    try:
        return str(uuid.UUID(rid)) if rid else str(uuid.uuid4())
    except ValueError:
        return str(uuid.uuid4())


def error(status: int, *messages: str, code: str | None = None, headers: dict[str, str] | None = None,
          trace: str | None = None, **extra: Any) -> JSONResponse:
    """The documents' ``Error``: ``extra`` members first (a FAILED_* answer's CCPResponse), then the
    messages (duplicates and empty ones dropped) and the traceId (``trace``, else the request's ID);
    application/json. ``code`` (api/problems.py's) goes into X-V2GPKI-Problem after ``headers``."""
    body: dict[str, Any] = {**extra, "errorMessages": list(dict.fromkeys(m for m in messages if m)) or ["error"],
                            "traceId": trace or trace_id()}
    h = dict(headers or {})
    if code:
        h["X-V2GPKI-Problem"] = code
    return JSONResponse(body, status_code=status, headers=h)


def ccp_not_found(certificate_installation_res: str, *messages: str, code: str) -> JSONResponse:
    """OPCP ccp.v1.json's 404 of POST /v1/ccp/signedContractData (a FAILED_* answer): its schema *requires*
    ``CCPResponse.emaidContent[].messageDef.certificateInstallationRes`` (``minLength: 0``) whatever the
    ``alwaysReturnEXI`` header says, beside the ``Error`` members its "non ISO" example shows. So the member
    is always there: the base64 FAILED_* CertificateInstallationRes when the caller asked for it
    (alwaysReturnEXI true, the "ISO compliant" example), else ``""`` (no EXI, as the "non ISO" example)."""
    return error(404, *messages, code=code, CCPResponse={"emaidContent": [{"messageDef": {
        "certificateInstallationRes": certificate_installation_res}}]})


def opcp_error(exc: PKIError) -> JSONResponse:
    """A typed error a route catches itself (OPCP RCP, rcp.v1.json's ``Error``), with the status the problem
    document would have had (api/problems.py): what OPCP clients parse (CitrineOS reads ``errorMessages``).
    Its traceId is a fresh UUID, also sent as ``X-Trace-Id``."""
    trace = str(uuid.uuid4())
    return error(problems.status_of(exc) or 400, exc.message, code=exc.code, headers={"X-Trace-Id": trace},
                 trace=trace)


def _from_problem(resp: JSONResponse) -> JSONResponse:
    """A problem response (api/problems.py) in the documents' error shape, same status and headers."""
    import json

    body = json.loads(bytes(resp.body))
    code = str(body.get("type", "")).rsplit("/", 1)[-1] or "error"
    headers = {k: v for k, v in resp.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return error(resp.status_code, str(body.get("detail") or body.get("title") or code), code=code, headers=headers)


class ErrorShapeRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except RequestValidationError as exc:
                msgs = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                        for e in exc.errors()[:10]]
                return error(400, *msgs, code="invalid-request")
            except StarletteHTTPException as exc:
                return _from_problem(problems.response_for(exc))  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - typed errors only; anything else re-raised below
                resp = problems.response_for(exc)
                if resp is None:
                    raise
                return _from_problem(resp)

        return handler


def empty(status: int = 200) -> Response:
    return Response(status_code=status)
