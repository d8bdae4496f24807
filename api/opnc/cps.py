"""OPNC v1 CPS (``../shared/specs/opnc/specification/apis/cps``) under /opnc/v1/cps, on `pki.pools` as
OPCP's CPS (api/opcp/cps.py):

PUT /contractData/sign — an eMSP with its own PKI: its contract certificate bundle signed by the CPS and
  stored in the pool for its contract (EMAID, PCID)
PUT /contractData/generateandsign — an eMSP without: contract registered, certificate issued, data signed
GET /cpsCertificates — the CPS certificate chains and their V2G roots
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.deps import CtxDep
from api.opcp.ccp import iso
from api.opcp.cps import GenerateIn, generate
from api.opcp.pool_shapes import ErrorShapeRoute
from api.opnc import opnc_party
from api.opnc.pools import CertificateChainV1, opnc_dn, signed_item
from pki import pools
from pki.errors import NotFound
from pki.names import normalise_pcid
from pki.orgs import Principal

router = APIRouter(prefix="/opnc/v1/cps", tags=["opnc-cps"], route_class=ErrorShapeRoute, include_in_schema=False)
CpsCaller = Annotated[Principal, Depends(opnc_party("cps"))]


class ContractCertificateBundleV1(BaseModel):
    pcid: str = Field(max_length=18)
    emaid: str = Field(max_length=40)
    contractCertificateChain: CertificateChainV1  # noqa: N815
    contractSignatureEncryptedPrivateKey: str = Field(max_length=200)  # noqa: N815
    dHpublickey: str = Field(max_length=200)  # noqa: N815


class SignContractDataRequestV1(BaseModel):
    contractCertificateBundle: ContractCertificateBundleV1  # noqa: N815
    xsdMsgDefNamespace: str = Field(max_length=128)  # noqa: N815
    cpsV2GRootCertificateFingerprint: str | None = Field(default=None, max_length=64)  # noqa: N815


@router.put("/contractData/sign", status_code=201, response_model=None)
def sign_contract_data(body: SignContractDataRequestV1, ctx: CtxDep, p: CpsCaller) -> JSONResponse:
    pools.check_namespace(body.xsdMsgDefNamespace)
    b = body.contractCertificateBundle
    ch = b.contractCertificateChain
    data = pools.ContractDataIn(b.emaid, ch.certificate, [x for x in (ch.subCa2Certificate, ch.subCa1Certificate) if x],
                                b.contractSignatureEncryptedPrivateKey, b.dHpublickey)
    exi, emaid, root = pools.sign(ctx, p, data, root_fingerprint=body.cpsV2GRootCertificateFingerprint,
                                  store_for_pcid=b.pcid)
    return JSONResponse({"signedContractData": signed_item(exi, emaid, normalise_pcid(b.pcid), root)},
                        status_code=201)


@router.put("/contractData/generateandsign", status_code=201, response_model=None)
def generate_and_sign(body: GenerateIn, ctx: CtxDep, p: CpsCaller) -> Response:
    return generate(ctx, p, body)


@router.get("/cpsCertificates")
def cps_certificates(ctx: CtxDep, p: CpsCaller) -> dict[str, Any]:
    p.require("emsp", "admin", "auditor")
    out = []
    for s in pools.cps_signers(ctx):
        org = s.certificate.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        chain: dict[str, Any] = {"certificate": base64.b64encode(pools.cert_der(s.certificate)).decode()}
        for i, c in enumerate(list(reversed(s.chain))[:2], 1):
            chain[f"subCa{i}Certificate"] = base64.b64encode(pools.cert_der(c)).decode()
        out.append({"cpsDistinguishedName": s.certificate.subject.rfc4514_string(), "cpsCertificateChain": chain,
                    "validFrom": iso(s.certificate.not_valid_before_utc),
                    "validTo": iso(s.certificate.not_valid_after_utc),
                    "organizationName": str(org[0].value) if org else "v2gpki",
                    "cpsV2GRootCertificateFingerprint": pools.root_fingerprint(s.root),
                    "cpsV2GRootDistinguishedName": opnc_dn(s.root.subject), "xsdMsgDefNamespace": pools.ISO2})
    if not out:
        raise NotFound("no valid CPS certificate")
    return {"cpsCertificateDataCollection": out}


def setup(app: FastAPI) -> None:
    app.include_router(router)
