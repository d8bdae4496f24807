"""OPCP 1.0 (Hubject's Open Plug & Charge Protocol, `../shared/specs/opcp/*.json`) served on the existing
engine: each module is one of the published documents (est, rcp, ccp, pcp, cps, webhooks), mounted through
api/app.py's ROUTERS. docs/api.md ("Integrating a CSMS") lists every operation and what serves it."""

from __future__ import annotations

import uuid

from fastapi.responses import JSONResponse

from pki.errors import PKIError


def opcp_error(exc: PKIError) -> JSONResponse:
    """A typed error in the OPCP documents' own error shape (``Error``: ``errorMessages``, ``traceId``,
    rcp.v1.json / cps.v1.json), with the status the problem document would have had: what OPCP clients
    parse (CitrineOS reads ``errorMessages``). The traceId is also sent as ``X-Trace-Id``."""
    from api.problems import status_of

    status = status_of(exc) or 400
    trace = str(uuid.uuid4())
    return JSONResponse({"errorMessages": [exc.message], "traceId": trace}, status_code=status,
                        headers={"X-Trace-Id": trace, "X-V2GPKI-Problem": exc.code})
