"""OPCP 1.0 Contract Certificate Pool (``../shared/specs/opcp/ccp.v1.json``) on the service's contracts and CPS.

POST /v1/ccp/signedContractData — the CSMS's call (MaEVe, CitrineOS) with the vehicle's
  CertificateInstallationReq: `pki.cps.service.deliver`, the answer as
  ``{"CCPResponse": {"emaidContent": [{"messageDef": {"certificateInstallationRes", "emaid"}}]}}``.
PUT  /v1/ccp/signedContractData — an eMSP uploads contract data signed by this service's CPS.
DELETE /v1/ccp/signedContractData/{emaid} — de-publish (terminate; revoke unless X-Skip-Revocation).
GET  /v1/ccp/provideSignedContractData/{emaid}/{pcid} — prepared contract data for the OEM backend.
POST /v1/ccp/signedContractData/{pcid}/{emaid}/default — the contract becomes its eMSP's default.
GET  /v1/ccp/lookupContract/{emaid}, GET /v1/ccp/signedContractData/{pcid} — what the pool holds.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.opcp.pool_shapes import ErrorShapeRoute, ccp_not_found, empty, error
from api.problems import status_of
from pki import pools
from pki.context import Context
from pki.cps.exi.messages import ResponseCode
from pki.cps.service import Delivery, deliver, refusal
from pki.errors import NotFound, PKIError
from pki.orgs import Principal

router = APIRouter(prefix="/v1/ccp", tags=["opcp-ccp"], route_class=ErrorShapeRoute, include_in_schema=False)

EXI_MAX = 16000  # base64 characters of a CertificateInstallationReq/Res (the EXI decoder has its own limits)


class GetSignedContractDataIn(BaseModel):
    certificateInstallationReq: str = Field(max_length=EXI_MAX)  # noqa: N815
    xsdMsgDefNamespace: str = Field(max_length=128)  # noqa: N815
    metadata: str | None = Field(default=None, max_length=2048)


class SignedContractDataIn(BaseModel):
    xsdMsgDefNamespace: str = Field(max_length=128)  # noqa: N815
    emaid: str = Field(max_length=40)
    pcid: str = Field(max_length=18)
    signedContractDataXML: str = Field(max_length=EXI_MAX)  # noqa: N815
    metadata: str | None = Field(default=None, max_length=2048)
    cpsV2GRootCertificateFingerprint: str | None = Field(default=None, max_length=64)  # noqa: N815


def exi_request(b64: str) -> bytes:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise PKIError("certificateInstallationReq is not base64") from None
    if not raw:
        raise PKIError("certificateInstallationReq is empty")
    return raw


def own_scope(p: Principal) -> str | None:
    """An eMSP gets only its own contracts (as from /v1/contract-installations); a CPO forwards for any
    vehicle (the Get15118EVCertificate role), an admin too."""
    return p.org if p.role == "emsp" else None


def install(ctx: Context, p: Principal, exi_b64: str, namespace: str) -> Delivery:
    """The CSMS's contract installation: the vehicle's CertificateInstallationReq through `deliver`."""
    p.require("cpo", "emsp", "admin")
    pools.check_namespace(namespace)
    return deliver(ctx, exi_request(exi_b64), actor=p.credential, expect="install", emsp=own_scope(p))


def failure_messages(d: Delivery) -> list[str]:
    return [str(d.response_code), *d.notes]


@router.post("/signedContractData", response_model=None)
def get_signed_contract_data(body: GetSignedContractDataIn, ctx: CtxDep, p: PrincipalDep,
                             always_return_exi: Annotated[bool, Header(alias="alwaysReturnEXI")] = True,
                             broadcast: Annotated[bool, Header()] = False) -> JSONResponse:
    """200 with the signed CertificateInstallationRes and its eMAID; a FAILED_* answer (no contract, chain,
    signature, …) is 404 in the document's 404 schema (`ccp_not_found`): ``CCPResponse`` always, carrying
    the unsigned FAILED_* CertificateInstallationRes when alwaysReturnEXI (the default; the document's "ISO
    compliant" 404), an empty one when not, beside ``errorMessages``. ``broadcast`` is accepted: there is no
    other ecosystem to forward to."""
    try:
        d = install(ctx, p, body.certificateInstallationReq, body.xsdMsgDefNamespace)
    except PKIError as exc:
        if status_of(exc) != 404:
            raise
        # An eMSP asking for a vehicle it has no contract for (deliver's NotFound, raised after the request
        # was decoded): the document's 404 must carry a CertificateInstallationRes, so the answer a CPO gets
        # for a PCID without a contract (FAILED_NoCertificateAvailable, docs/cps.md), with the message.
        d = refusal(exi_request(body.certificateInstallationReq), ResponseCode.FAILED_NoCertificateAvailable,
                    exc.message)
    exi = base64.b64encode(d.exi).decode()
    if d.response_code == ResponseCode.OK:
        return JSONResponse({"CCPResponse": {"emaidContent": [{"messageDef": {
            "certificateInstallationRes": exi, "emaid": d.emaid}}]}, "xsdMsgDefNamespace": pools.ISO2})
    return ccp_not_found(exi if always_return_exi else "", *failure_messages(d), code=str(d.response_code))


@router.put("/signedContractData", status_code=201, response_model=None)
def add_signed_contract_data(body: SignedContractDataIn, ctx: CtxDep, p: PrincipalDep) -> Response:
    """An eMSP puts contract data signed by this service's CPS into the pool, for one of its contracts."""
    pools.check_namespace(body.xsdMsgDefNamespace)
    pools.accept_signed_data(ctx, p, body.emaid, body.pcid, body.signedContractDataXML)
    return empty(201)


@router.delete("/signedContractData/{emaid}", response_model=None)
def delete_signed_contract_data(emaid: str, ctx: CtxDep, p: PrincipalDep,
                                skip: Annotated[bool, Header(alias="X-Skip-Revocation")] = False) -> Response:
    pools.depublish(ctx, p, emaid, revoke=not skip)
    return empty()


@router.get("/provideSignedContractData/{emaid}/{pcid}")
def provide_signed_contract_data(
        emaid: str, pcid: str, ctx: CtxDep, p: PrincipalDep,
        session_id: Annotated[str | None, Query(alias="sessionID", max_length=32)] = None,
        namespace: Annotated[str, Query(alias="xsdMsgDefNamespace", max_length=128)] = pools.ISO2,
        root: Annotated[str | None, Query(alias="cpsV2GRootCertificateFingerprint", max_length=64)] = None,
) -> dict[str, Any]:
    pools.check_namespace(namespace)
    exi = pools.provide(ctx, p, emaid, pcid, pools.parse_session_id(session_id), root)
    return {"certificateInstallationRes": base64.b64encode(exi).decode(), "xsdMsgDefNamespace": pools.ISO2}


@router.post("/signedContractData/{pcid}/{emaid}/default", response_model=None)
def set_default_contract(pcid: str, emaid: str, ctx: CtxDep, p: PrincipalDep) -> Response:
    """The document lists no 404 here: an unknown contract, or another tenant's, is 403."""
    try:
        pools.set_default(ctx, p, pcid, emaid)
    except NotFound as exc:
        return error(403, exc.message, code="forbidden")
    return empty()


def xml_contract(e: pools.ContractEntry) -> dict[str, Any]:
    """One ``XMLContracts`` item (LookupContractResponse)."""
    out: dict[str, Any] = {"pcid": e.contract.pcid, "emaid": e.contract.emaid, "xsdMsgDefNamespace": pools.ISO2,
                           "defaultContract": bool(e.contract.is_default)}
    if e.certificate is not None:
        der = base64.b64encode(e.certificate.der).decode() if e.certificate.der else ""
        if der and len(der) <= 800:  # the document's maxLength
            out["contractCertificate"] = der
        out["certValidFrom"] = iso(e.certificate.not_before)
        out["certValidTo"] = iso(e.certificate.not_after)
    return out


def iso(t: Any) -> str:
    return str(t.strftime("%Y-%m-%dT%H:%M:%SZ"))


@router.get("/lookupContract/{emaid}")
def lookup_contract(emaid: str, ctx: CtxDep, p: PrincipalDep,
                    namespace: Annotated[str, Query(alias="xsdMsgDefNamespace", max_length=128)] = pools.ISO2,
                    root: Annotated[str | None, Query(alias="cpsV2GRootCertificateFingerprint", max_length=64)] = None,
                    ) -> dict[str, Any]:
    pools.check_namespace(namespace)
    return {"XMLContracts": [xml_contract(e) for e in pools.contracts(ctx, p, emaid=emaid)]}


@router.get("/signedContractData/{pcid}")
def get_contracts(pcid: str, ctx: CtxDep, p: PrincipalDep,
                  namespace: Annotated[str, Query(alias="xsdMsgDefNamespace", max_length=128)] = pools.ISO2,
                  ) -> dict[str, Any]:
    """The document lists only 200: no visible contract is an empty list."""
    pools.check_namespace(namespace)
    try:
        entries = pools.contracts(ctx, p, pcid=pcid)
    except NotFound:
        entries = []
    return {"XMLContracts": [xml_contract(e) for e in entries]}


def setup(app: FastAPI) -> None:
    app.include_router(router)
