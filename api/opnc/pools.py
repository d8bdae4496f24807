"""OPNC v1 (CharIN, ``../shared/specs/opnc/specification/apis/{ccp,pcp}``): the contract certificate pool
under /opnc/v1/ccp and the provisioning certificate pool under /opnc/v1/pcp — the same operations as
OPCP's (api/opcp/ccp.py, api/opcp/pcp.py, both on `pki.pools`) in OPNC's shapes, with the
``OPNC-from/to-party-*`` headers checked against the caller (api/opnc/__init__.py).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.deps import CtxDep
from api.opcp.ccp import EXI_MAX, failure_messages, install, iso
from api.opcp.pcp import CERT_MAX, b64, key_id, sub_cas
from api.opcp.pool_shapes import ErrorShapeRoute, empty, error
from api.opnc import opnc_party
from pki import pools
from pki.cps.exi import decode_message
from pki.cps.exi.messages import ResponseCode
from pki.errors import NotFound
from pki.orgs import Principal

ccp = APIRouter(prefix="/opnc/v1/ccp", tags=["opnc-ccp"], route_class=ErrorShapeRoute, include_in_schema=False)
pcp = APIRouter(prefix="/opnc/v1/pcp", tags=["opnc-pcp"], route_class=ErrorShapeRoute, include_in_schema=False)
CcpCaller = Annotated[Principal, Depends(opnc_party("ccp"))]
PcpCaller = Annotated[Principal, Depends(opnc_party("pcp"))]
NS = Annotated[str, Query(alias="xsdMsgDefNamespace", max_length=128)]
ROOT = Annotated[str | None, Query(alias="cpsV2GRootCertificateFingerprint", max_length=64)]


class GetSignedContractDataReq(BaseModel):
    certificateInstallationReq: str = Field(max_length=EXI_MAX)  # noqa: N815
    xsdMsgDefNamespace: str = Field(max_length=128)  # noqa: N815
    metadata: str | None = Field(default=None, max_length=2048)


class SignedContractDataV1(BaseModel):
    certificateInstallationRes: str = Field(max_length=EXI_MAX)  # noqa: N815
    emaid: str = Field(max_length=40)
    pcid: str = Field(max_length=18)
    xsdMsgDefNamespace: str = Field(default=pools.ISO2, max_length=128)  # noqa: N815
    metaData: str | None = Field(default=None, max_length=2048)  # noqa: N815
    cpsV2GRootCertificateFingerprint: str | None = Field(default=None, max_length=64)  # noqa: N815
    cpsRootDistinguishedName: str | None = Field(default=None, max_length=512)  # noqa: N815


opnc_dn = pools.opnc_dn  # a DN in OPNC's pattern (pki/pools.py; the webhook payloads use it too)


def signed_item(exi: bytes, emaid: str, pcid: str, root: Any | None) -> dict[str, Any]:
    out: dict[str, Any] = {"certificateInstallationRes": base64.b64encode(exi).decode(), "emaid": emaid,
                           "pcid": pcid, "xsdMsgDefNamespace": pools.ISO2}
    if root is not None:
        out["cpsV2GRootCertificateFingerprint"] = pools.root_fingerprint(root)
        out["cpsRootDistinguishedName"] = opnc_dn(root.subject)
    return out


def contract_data(e: pools.ContractEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"pcid": e.contract.pcid, "emaid": e.contract.emaid, "xsdMsgDefNamespace": pools.ISO2,
                           "defaultContract": bool(e.contract.is_default)}
    if e.certificate is not None:
        der = base64.b64encode(e.certificate.der).decode()
        if len(der) <= 800:
            out["contractCertificate"] = der
        out["certValidFrom"] = iso(e.certificate.not_before)
        out["certValidTo"] = iso(e.certificate.not_after)
    return out


# -- /opnc/v1/ccp ----------------------------------------------------------------------------------


@ccp.get("/contractData/emaid/{emaid}")
def contract_data_by_emaid(emaid: str, ctx: CtxDep, p: CcpCaller, namespace: NS = pools.ISO2, root: ROOT = None
                           ) -> dict[str, Any]:
    pools.check_namespace(namespace)
    return {"contractDataCollection": [contract_data(e) for e in pools.contracts(ctx, p, emaid=emaid)]}


@ccp.get("/contractData/pcid/{pcid}")
def contract_data_by_pcid(pcid: str, ctx: CtxDep, p: CcpCaller, namespace: NS = pools.ISO2) -> dict[str, Any]:
    pools.check_namespace(namespace)
    return {"contractDataCollection": [contract_data(e) for e in pools.contracts(ctx, p, pcid=pcid)]}


@ccp.post("/signedcontractdata", response_model=None)
def signed_contract_data(body: GetSignedContractDataReq, ctx: CtxDep, p: CcpCaller,
                         always_return_exi: Annotated[bool, Header(alias="alwaysReturnEXI")] = True,
                         broadcast: Annotated[bool, Header()] = False) -> JSONResponse:
    """As OPCP's POST /v1/ccp/signedContractData; a FAILED_* answer is 404 (``errorMessages``) with, when
    alwaysReturnEXI, the unsigned FAILED_* CertificateInstallationRes in ``signedContractDataCollection``."""
    d = install(ctx, p, body.certificateInstallationReq, body.xsdMsgDefNamespace)
    if d.response_code == ResponseCode.OK:
        item = signed_item(d.exi, d.emaid or "", _pcid_of(ctx, d.emaid or ""), pools.signer_root(ctx, d.message))
        return JSONResponse({"signedContractDataCollection": [item]})
    extra: dict[str, Any] = {}
    if always_return_exi:
        extra["signedContractDataCollection"] = [{"certificateInstallationRes": base64.b64encode(d.exi).decode(),
                                                  "xsdMsgDefNamespace": pools.ISO2}]
    return error(404, *failure_messages(d), code=str(d.response_code), **extra)


def _pcid_of(ctx: Any, emaid: str) -> str:
    from pki.store.contracts import Contracts

    return Contracts(ctx.db).pcid_of(emaid)


@ccp.put("/signedcontractdata", status_code=201, response_model=None)
def add_signed_contract_data(body: SignedContractDataV1, ctx: CtxDep, p: CcpCaller) -> Response:
    pools.check_namespace(body.xsdMsgDefNamespace)
    pools.accept_signed_data(ctx, p, body.emaid, body.pcid, body.certificateInstallationRes)
    return empty(201)


@ccp.delete("/signedcontractdata/{emaid}", response_model=None)
def delete_signed_contract_data(emaid: str, ctx: CtxDep, p: CcpCaller,
                                skip: Annotated[bool, Header(alias="X-Skip-Revocation")] = False) -> Response:
    pools.depublish(ctx, p, emaid, revoke=not skip)
    return empty()


@ccp.get("/signedcontractdata/{emaid}/{pcid}")
def get_signed_contract_data(emaid: str, pcid: str, ctx: CtxDep, p: CcpCaller,
                             session_id: Annotated[str | None, Query(alias="sessionID", max_length=32)] = None,
                             namespace: NS = pools.ISO2, root: ROOT = None) -> dict[str, Any]:
    pools.check_namespace(namespace)
    exi = pools.provide(ctx, p, emaid, pcid, pools.parse_session_id(session_id), root)
    signer = pools.signer_root(ctx, decode_message(exi))
    c = pools.contracts(ctx, p, emaid=emaid)[0].contract
    return {"signedContractDataCollection": [signed_item(exi, c.emaid, c.pcid, signer)]}


@ccp.post("/signedcontractdata/{emaid}/{pcid}/setdefault", response_model=None)
def set_default(emaid: str, pcid: str, ctx: CtxDep, p: CcpCaller) -> Response:
    """The document lists no 404: an unknown contract, or another tenant's, is 403."""
    try:
        pools.set_default(ctx, p, pcid, emaid)
    except NotFound as exc:
        return error(403, exc.message, code="forbidden")
    return empty()


# -- /opnc/v1/pcp -----------------------------------------------------------------------------------


class CertificateChainV1(BaseModel):
    certificate: str = Field(max_length=CERT_MAX)
    subCa1Certificate: str | None = Field(default=None, max_length=CERT_MAX)  # noqa: N815
    subCa2Certificate: str | None = Field(default=None, max_length=CERT_MAX)  # noqa: N815


class ProvisioningCertificateDataV1(BaseModel):
    provisioningCertificateChain: CertificateChainV1  # noqa: N815
    xsdMsgDefNamespace: str = Field(default=pools.ISO2, max_length=128)  # noqa: N815
    rootIssuerSerialNumber: str | None = Field(default=None, max_length=128)  # noqa: N815
    v2gRootAuthorityKeyIdentifiers: list[str] | None = Field(default=None, max_length=20)  # noqa: N815
    rootAuthorityKeyIdentifier: str | None = Field(default=None, max_length=128)  # noqa: N815
    fingerprint: str | None = Field(default=None, max_length=128)
    previousPcid: str | None = Field(default=None, max_length=18)  # noqa: N815


def provisioning_v1(e: pools.PoolEntry) -> dict[str, Any]:
    s1, s2 = sub_cas(e)
    chain: dict[str, Any] = {"certificate": b64(e.certificate)}
    if s1 is not None:
        chain["subCa1Certificate"] = b64(s1)
    if s2 is not None:
        chain["subCa2Certificate"] = b64(s2)
    out: dict[str, Any] = {"provisioningCertificateChain": chain, "xsdMsgDefNamespace": pools.ISO2,
                           "rootIssuerSerialNumber": str(e.root.serial_number), "fingerprint": e.row.fingerprint}
    rk = key_id(e.root)
    if rk:
        out["rootAuthorityKeyIdentifier"] = rk
    return out


@pcp.get("/provisioningcertificates/{pcid}")
def get_provisioning_certificate(pcid: str, ctx: CtxDep, p: PcpCaller,
                                 broadcast: Annotated[bool, Header()] = False) -> dict[str, Any]:
    return {"provisioningCertificate": provisioning_v1(pools.pool(ctx, p, pcid)[0])}


@pcp.delete("/provisioningcertificates/{pcid}", response_model=None)
def delete_provisioning_certificate(pcid: str, ctx: CtxDep, p: PcpCaller) -> Response:
    pools.unregister(ctx, p, pcid)
    return empty()


@pcp.put("/provisioningcertificates", response_model=None)
def add_provisioning_certificate(body: ProvisioningCertificateDataV1, ctx: CtxDep, p: PcpCaller) -> Response:
    pools.check_namespace(body.xsdMsgDefNamespace)
    ch = body.provisioningCertificateChain
    pools.register(ctx, p, ch.certificate, [ch.subCa1Certificate, ch.subCa2Certificate])
    return empty()


@pcp.get("/lookupvehicle/{pcid}", response_model=None)
def lookup_vehicle(pcid: str, ctx: CtxDep, p: PcpCaller) -> Response:
    pools.pool(ctx, p, pcid)
    return empty()


def setup(app: FastAPI) -> None:
    app.include_router(ccp)
    app.include_router(pcp)
