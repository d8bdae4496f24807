"""OCPP 2.1 (January 2025) certificate messages, for a CSMS to forward as they come back.

POST /ocpp/v21/sign-certificate            SignCertificateRequest → CertificateSignedRequest (or a Rejected
                                            SignCertificateResponse); V2G20Certificate, requestId echoed,
                                            hashRootCertificate selects the hierarchy of that root
POST /ocpp/v21/get-15118-ev-certificate    Get15118EVCertificateRequest → …Response (exi ≤ 11000 / 17000)
POST /ocpp/v21/get-certificate-status      GetCertificateStatusRequest → …Response (ocspResult ≤ 18000)
POST /ocpp/v21/authorize                   AuthorizeRequest → AuthorizeResponse
POST /ocpp/v21/get-certificate-chain-status GetCertificateChainStatusRequest → …Response (new in 2.1)

Shapes and limits: api/ocpp/core.py. A body that is not a valid 2.1 message (a field of another version, an
oversize field) is refused with the message's own rejection (api/problems.py, OCPP_REJECTIONS).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.ocpp import core

router = APIRouter(prefix="/ocpp/v21", tags=["ocpp 2.1"])


@router.post("/sign-certificate", response_model=None)
def sign_certificate(body: core.SignCertificate21, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    out = core.sign_certificate(ctx, p, body.csr, body.certificateType, "2.1", request_id=body.requestId,
                                hash_root=body.hashRootCertificate.data() if body.hashRootCertificate else None)
    if out.certificate_signed is None:
        return out.response.response()
    return JSONResponse(out.certificate_signed, headers=out.response.headers)


@router.post("/get-15118-ev-certificate", response_model=None)
def get_15118_ev_certificate(body: core.Get15118EVCertificate21, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    # maximumContractCertificateChains / prioritizedEMAIDs are for ISO 15118-20 sessions ("absent during
    # ISO 15118-2"): an ISO 15118-2 request gets its one contract whatever they say; with -20 they must agree
    # with the vehicle's signed EXI request (pki.cps.service20.deliver20, docs/cps.md).
    return core.get_15118_ev_certificate(ctx, p, body.iso15118SchemaVersion, body.action, body.exiRequest,
                                         "2.1", body.maximumContractCertificateChains,
                                         body.prioritizedEMAIDs).response()


@router.post("/get-certificate-status", response_model=None)
def get_certificate_status(body: core.GetCertificateStatus, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    return core.get_certificate_status(ctx, body.ocspRequestData, "2.1").response()


@router.post("/authorize", response_model=None)
def authorize(body: core.Authorize21, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    return core.authorize(ctx, p, body).response()


@router.post("/get-certificate-chain-status", response_model=None)
def get_certificate_chain_status(body: core.GetCertificateChainStatus21, ctx: CtxDep,
                                 p: PrincipalDep) -> JSONResponse:
    p.require("cpo", "admin")
    return core.get_certificate_chain_status(ctx, body).response()


@router.post("/trust-store-plan", response_model=None)
def trust_store_plan(body: core.TrustStorePlan21, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    """{"stationId", "installed": GetInstalledCertificateIdsResponse} → {"install": [InstallCertificateRequest…],
    "delete": [DeleteCertificateRequest…]} (OCPP 2.1 M03 → M05 / M04; pki/truststore_plan.py, #27 item 1)."""
    return core.trust_store_plan(ctx, p, body.stationId, body.installed, "2.1").response()


def setup(app: FastAPI) -> None:
    app.include_router(router)
