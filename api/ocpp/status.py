"""OCPP 2.0.1 GetCertificateStatus, as one call for the CSMS.

The station sends GetCertificateStatusRequest {ocspRequestData} for each certificate of its SECC chain
(it staples the answers in ISO 15118 TLS, shared profiles doc §5); the CSMS forwards the
OCSPRequestData here and relays ``{status, ocspResult}`` in its GetCertificateStatusResponse.

* hashAlgorithm: SHA256 | SHA384 | SHA512 (HashAlgorithmEnumType); the answer's CertID uses it.
* issuerNameHash / issuerKeyHash: hex (any case) or base64 / URL-safe base64 — chargers differ.
* serialNumber: hex without leading zeros, or decimal; an all-digit serial is tried both ways.
* responderURL is never fetched (server-side request forgery): we answer for our own CAs from our data.

``Accepted`` carries ``ocspResult``: base64 of a DER OCSPResponse (≤ 5500 characters, the schema's
limit), good / revoked / unknown. ``Failed`` means no OCSP answer can be given (an issuer we do not
serve, or the signer temporarily unavailable); statusInfo says which.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.ocpp import core

router = APIRouter(prefix="/ocpp/v201", tags=["ocpp"])

GetCertificateStatusIn = core.GetCertificateStatus


@router.post("/get-certificate-status", response_model=None)
def get_certificate_status(body: GetCertificateStatusIn, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    # Exactly the OCPP fields (its schemas forbid additional properties), so the CSMS can relay it as is.
    return core.get_certificate_status(ctx, body.ocspRequestData, "2.0.1").response()


def setup(app: FastAPI) -> None:
    app.include_router(router)
