"""OPCP 1.0 CPS (``../shared/specs/opcp/cps.v1.json``): what an eMSP asks of the Certificate Provisioning
Service, on `pki.cps` (its CPS leaves in the HSM, its EXI XML signature) through `pki.pools`.

GET /cps/signer — the CPS signer certificates (and their V2G roots)
PUT /v1/cps/signedContractData — eMSP with its own PKI: sign its contract data, not stored
PUT /v1/cps/contractData/signed — the same; with ``pcid`` stored in the pool for one of its contracts
PUT /v1/cps/forward/signedContractData — (deprecated in OPCP) sign and store
PUT /v1/cps/generate/signedContractData — eMSP without its own PKI: contract registered (or extended),
  contract certificate issued and contract data signed for the vehicle's pool certificate
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.opcp.ccp import iso
from api.opcp.pool_shapes import ErrorShapeRoute, empty
from pki import lifecycle, pools
from pki.context import Context
from pki.cps.exi.messages import ResponseCode
from pki.errors import NotFound
from pki.names import normalise_emaid, normalise_pcid
from pki.orgs import Principal
from pki.pools import BadContractData

router = APIRouter(tags=["opcp-cps"], route_class=ErrorShapeRoute, include_in_schema=False)

CERT_MAX = 4000
FP = Field(default=None, max_length=64)


class ChainIn(BaseModel):
    contractSignatureCertChainCertificate: str = Field(max_length=CERT_MAX)  # noqa: N815
    contractSignatureCertChainSubCertificates: list[str] = Field(max_length=2)  # noqa: N815


class OwnContractDataIn(BaseModel):
    """CreateSignedContractDataRequest.contractData"""

    contractSignatureCertChain: ChainIn  # noqa: N815
    contractSignatureEncryptedPrivateKey: str = Field(max_length=200)  # noqa: N815
    dHpublickey: str = Field(max_length=200)  # noqa: N815
    emaid: str = Field(max_length=40)


class CreateSignedContractDataIn(BaseModel):
    xsdMsgDefNamespace: str = Field(default=pools.ISO2, max_length=128)  # noqa: N815
    contractData: OwnContractDataIn  # noqa: N815
    metaData: str | None = Field(default=None, max_length=2048)  # noqa: N815
    pcid: str = Field(max_length=18)
    emaid: str = Field(max_length=40)
    cpsV2GRootCertificateFingerprint: str | None = FP  # noqa: N815


class ContractDataIn(BaseModel):
    """SignedContractDataRequest.contractData (ContractData)"""

    contractCertificate: str = Field(max_length=CERT_MAX)  # noqa: N815
    contractSubCa2Certificate: str | None = Field(default=None, max_length=CERT_MAX)  # noqa: N815
    contractSubCa1Certificate: str = Field(max_length=CERT_MAX)  # noqa: N815
    contractSignatureEncryptedPrivateKey: str = Field(max_length=200)  # noqa: N815
    dHpublickey: str = Field(max_length=200)  # noqa: N815


class SignContractDataIn(BaseModel):
    contractData: ContractDataIn  # noqa: N815
    pcid: str | None = Field(default=None, max_length=18)
    xsdMsgDefNamespace: str = Field(max_length=128)  # noqa: N815
    cpsV2GRootCertificateFingerprint: str | None = FP  # noqa: N815


class GenerateIn(BaseModel):
    contractBegins: str = Field(max_length=64)  # noqa: N815
    contractEnds: str = Field(max_length=64)  # noqa: N815
    emaid: str = Field(max_length=40)
    pcid: str = Field(max_length=18)
    xsdMsgDefNamespace: str = Field(default=pools.ISO2, max_length=128)  # noqa: N815
    subscriptionUrl: str | None = Field(default=None, max_length=512)  # noqa: N815
    cpsV2GRootCertificateFingerprint: str | None = FP  # noqa: N815
    metaData: str | None = Field(default=None, max_length=2048)  # noqa: N815


def _own(body: CreateSignedContractDataIn) -> pools.ContractDataIn:
    c = body.contractData
    if normalise_emaid(c.emaid) != normalise_emaid(body.emaid):
        raise BadContractData("contractData.emaid and emaid differ")
    return pools.ContractDataIn(c.emaid, c.contractSignatureCertChain.contractSignatureCertChainCertificate,
                                list(c.contractSignatureCertChain.contractSignatureCertChainSubCertificates),
                                c.contractSignatureEncryptedPrivateKey, c.dHpublickey)


def signed(exi: bytes, emaid: str, pcid: str | None, root: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"emaid": emaid, "signedData": base64.b64encode(exi).decode(),
                           "xsdMsgDefNamespace": pools.ISO2,
                           "cpsV2GRootCertificateFingerprint": pools.root_fingerprint_uuid(root),
                           "cpsRootDistinguishedName": pools.opcp_dn(root.subject)}
    if pcid:
        out["pcid"] = normalise_pcid(pcid)
    return out


@router.get("/cps/signer")
def get_cps_signer(ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    p.require("emsp", "admin", "auditor")
    out = []
    for s in pools.cps_signers(ctx):
        org = s.certificate.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        item: dict[str, Any] = {
            "cpsDistinguishedName": pools.opcp_dn(s.certificate.subject) or s.certificate.subject.rfc4514_string(),
            "cpsCertificate": base64.b64encode(pools.cert_der(s.certificate)).decode(),
            "validFrom": iso(s.certificate.not_valid_before_utc), "validTo": iso(s.certificate.not_valid_after_utc),
            "organizationName": str(org[0].value) if org else "v2gpki",
            "cpsV2GRootCertificateFingerprint": pools.root_fingerprint_uuid(s.root),
            "cpsRootDistinguishedName": pools.opcp_dn(s.root.subject),
            "xsdMsgDefNamespace": pools.ISO2}
        subs = list(reversed(s.chain))  # Sub-CA 1 (under the root) first
        for i, c in enumerate(subs[:2], 1):
            item[f"cpsSubCa{i}Certificate"] = base64.b64encode(pools.cert_der(c)).decode()
        out.append(item)
    if not out:
        raise NotFound("no valid CPS certificate")
    return {"cpsCertificates": out}


@router.put("/v1/cps/signedContractData")
def create_signed_contract_data(body: CreateSignedContractDataIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    pools.check_namespace(body.xsdMsgDefNamespace)
    normalise_pcid(body.pcid)
    exi, emaid, root = pools.sign(ctx, p, _own(body), root_fingerprint=body.cpsV2GRootCertificateFingerprint)
    return signed(exi, emaid, body.pcid, root)


@router.put("/v1/cps/forward/signedContractData", status_code=201)
def create_and_forward(body: CreateSignedContractDataIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    pools.check_namespace(body.xsdMsgDefNamespace)
    pools.sign(ctx, p, _own(body), root_fingerprint=body.cpsV2GRootCertificateFingerprint, store_for_pcid=body.pcid)
    return {}


@router.put("/v1/cps/contractData/signed", status_code=201, response_model=None)
def sign_contract_data(body: SignContractDataIn, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    pools.check_namespace(body.xsdMsgDefNamespace)
    c = body.contractData
    data = pools.ContractDataIn(None, c.contractCertificate,
                                [x for x in (c.contractSubCa2Certificate, c.contractSubCa1Certificate) if x],
                                c.contractSignatureEncryptedPrivateKey, c.dHpublickey)
    exi, emaid, root = pools.sign(ctx, p, data, root_fingerprint=body.cpsV2GRootCertificateFingerprint,
                                  store_for_pcid=body.pcid)
    return JSONResponse(signed(exi, emaid, body.pcid, root), status_code=201)


def generate(ctx: Context, p: Principal, body: GenerateIn) -> Response:
    """OPCP generate/signedContractData and OPNC generateandsign: `pools.generate`, then, with a
    ``subscriptionUrl``, a one-shot webhook (api/opcp/webhooks.py `one_shot`) for this contract: called once,
    with mo.contract.created.sent.to.oem when the contract data was prepared now (the vehicle is in the pool),
    else with the first later event of the contract (prepared on the OEM's request: delivered.to.oem). Its
    id and HMAC secret are in the X-V2GPKI-Subscription / X-V2GPKI-Webhook-Secret headers of the 201 (the
    document's answer has no body). The URL is checked before anything is stored."""
    from api.opcp.webhooks import one_shot

    pools.check_namespace(body.xsdMsgDefNamespace)
    if body.subscriptionUrl:
        lifecycle.check_webhook_url(body.subscriptionUrl, lifecycle.lifecycle_of(ctx).settings)
    contract, prepared = pools.generate(ctx, p, body.emaid, body.pcid, body.contractBegins, body.contractEnds,
                                        root_fingerprint=body.cpsV2GRootCertificateFingerprint)
    resp = empty(201)
    if body.subscriptionUrl:
        new = one_shot(ctx, p, body.subscriptionUrl, contract.emaid)
        if prepared is not None and prepared.response_code == ResponseCode.OK:
            event = "mo.contract.created.sent.to.oem"
            lifecycle.queue_one_shot(ctx, event, f"opcp:one-shot:{new.row.sub_id}",
                                     lifecycle.opcp_event(event, pools.contract_payload(ctx, contract, prepared.exi)),
                                     contract.emsp, contract.emaid)
        resp.headers["X-V2GPKI-Subscription"] = new.row.sub_id
        resp.headers["X-V2GPKI-Webhook-Secret"] = new.secret or ""
    return resp


@router.put("/v1/cps/generate/signedContractData", status_code=201, response_model=None)
def generate_signed_contract_data(body: GenerateIn, ctx: CtxDep, p: PrincipalDep) -> Response:
    return generate(ctx, p, body)


def setup(app: FastAPI) -> None:
    app.include_router(router)
