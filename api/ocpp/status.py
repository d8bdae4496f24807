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

import base64
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from pki.ocsp import ocpp_lookup

router = APIRouter(prefix="/ocpp/v201", tags=["ocpp"])

OCSP_RESULT_MAX = 5500  # GetCertificateStatusResponse.ocspResult maxLength (OCPP 2.0.1)


class OCSPRequestData(BaseModel):
    hashAlgorithm: str = Field(max_length=16)  # noqa: N815 - OCPP field names
    issuerNameHash: str = Field(min_length=1, max_length=128)  # noqa: N815
    issuerKeyHash: str = Field(min_length=1, max_length=128)  # noqa: N815
    serialNumber: str = Field(min_length=1, max_length=40)  # noqa: N815
    responderURL: str = Field(default="", max_length=512)  # noqa: N815 - never fetched


class GetCertificateStatusIn(BaseModel):
    ocspRequestData: OCSPRequestData  # noqa: N815


_REASONS = {"unauthorized": "UnknownIssuer", "tryLater": "TryLater", "internalError": "InternalError",
            "malformedRequest": "InvalidRequest"}


@router.post("/get-certificate-status", response_model=None)
def get_certificate_status(body: GetCertificateStatusIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    d = body.ocspRequestData
    ans = ocpp_lookup(ctx, d.hashAlgorithm, d.issuerNameHash, d.issuerKeyHash, d.serialNumber)
    if not ans.successful:
        return {"status": "Failed",
                "statusInfo": {"reasonCode": _REASONS.get(ans.status, "InternalError"),
                               "additionalInfo": f"OCSP responder answered {ans.status}"}}
    result = base64.b64encode(ans.der).decode()
    if len(result) > OCSP_RESULT_MAX:  # a single response with one ≤ 1600-byte signer cert: cannot happen
        return {"status": "Failed", "statusInfo": {"reasonCode": "ResponseTooLarge"}}
    # Exactly the OCPP fields (its schemas forbid additional properties), so the CSMS can relay it as is.
    return {"status": "Accepted", "ocspResult": result}


def setup(app: FastAPI) -> None:
    app.include_router(router)
