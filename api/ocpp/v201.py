"""OCPP 2.0.1 SignCertificate → CertificateSigned, as one call for the CSMS.

The CSMS forwards the station's SignCertificateRequest {csr, certificateType}; we answer with what its
CertificateSignedRequest is, exactly (OCPP 2.0.1 JSON schema, additionalProperties false): certificateChain
(leaf, Sub-CA 2, Sub-CA 1 — no root, as chargers expect), certificateType and customData. A rejection is the
SignCertificateResponse {status: Rejected, statusInfo {reasonCode, additionalInfo}} (api/ocpp/shapes.py).

certificateType may be absent: the OCPP schema says it means both, and after TriggerMessage
SignCombinedCertificate a charger sends none. The RA decides (pki/enrollment.py enroll_station), by
V2GPKI_OCPP_DEFAULT_CERT_TYPE:
  infer (default) — V2GCertificate when the CSR's CN is an EVSEID/SECCID or it asks for DC=CPO,
                    otherwise ChargingStationCertificate;
  V2GCertificate | ChargingStationCertificate — always that type.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from api import blocking, hot
from api.auth import PrincipalDep
from api.deps import CtxDep
from api.ocpp import core

router = APIRouter(prefix="/ocpp/v201", tags=["ocpp"])

# The request model: exactly OCPP 2.0.1's SignCertificateRequest.
SignCertificateIn = core.SignCertificate201


@router.post("/sign-certificate", response_model=None, openapi_extra=hot.openapi_extra(SignCertificateIn))
async def sign_certificate(request: Request) -> JSONResponse:
    """Accepted: the CertificateSignedRequest to send to the station (certificateChain, certificateType,
    customData {vendorId, serialNumber, issuer}; also in X-V2GPKI-Serial / X-V2GPKI-Issuer). Refused: the
    SignCertificateResponse {status: Rejected, statusInfo} to answer the station with, HTTP 4xx. async: the
    issuance runs in api/blocking.py's bounded pool; the caller and the body are read by api/hot.py."""
    p, body, _ = await hot.read(request, SignCertificateIn)
    ctx = blocking.context(request)
    out = await blocking.run(ctx, core.sign_certificate, ctx, p, body.csr, body.certificateType, "2.0.1")
    if out.certificate_signed is None:
        return out.response.response()
    return JSONResponse(out.certificate_signed, headers=out.response.headers)


@router.post("/trust-store-plan", response_model=None)
def trust_store_plan(body: core.TrustStorePlan201, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    """{"stationId", "installed": GetInstalledCertificateIdsResponse} → {"install": [InstallCertificateRequest…],
    "delete": [DeleteCertificateRequest…]} (OCPP 2.0.1 M03 → M05 / M04; pki/truststore_plan.py, #27 item 1)."""
    return core.trust_store_plan(ctx, p, body.stationId, body.installed, "2.0.1").response()


def setup(app: FastAPI) -> None:
    app.include_router(router)
