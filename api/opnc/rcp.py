"""OPNC v1 RCP, the root certificate pool (`specification/apis/rcp/rcp.api.v1.json`), server `…/opnc/v1/rcp`:

  GET /opnc/v1/rcp/rootcertificates[?pkiType=v2g|emsp|oem|pe]   {rootCertificateCollection: [RootCertificateV1]}
  GET /opnc/v1/rcp/rootcertificates/{rootCertificateId}        {roootCertificate: RootCertificateV1}

The pool and each entry are OPCP RCP's (api/opcp/rcp.py `pool`, `root_entry`, `root_id`: the same roots, the
same ids), in OPNC's shape: `rootType` V2G / eMSP / OEM, `distinguishedName` in OPNC's pattern. The single
root is under the document's key `roootCertificate` (sic, three o's: what a client generated from the
document reads) and also under `rootCertificate`. `pkiType=pe` (private environment) is an empty list: this
PKI has no such roots. Adding and deleting roots (PUT, DELETE: the pool operator's) is `v2gpki init` /
rollover, not this API (405). The `OPNC-from/to-party-*` headers are checked (api/opnc/__init__.py; the
party-type enum has no "rcp": the addressee is "pki", whose id is a root fingerprint). Errors are the
document's ErrorV1 shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI, Query

from api.deps import CtxDep
from api.opcp.pool_shapes import ErrorShapeRoute
from api.opcp.rcp import pool, root_entry, root_id
from api.opnc import opnc_party
from pki import pools
from pki.errors import NotFound
from pki.orgs import Principal
from pki.store.models import CertificateAuthority

router = APIRouter(prefix="/opnc/v1/rcp", tags=["opnc-rcp"], route_class=ErrorShapeRoute, include_in_schema=False)
RcpCaller = Annotated[Principal, Depends(opnc_party("rcp"))]

PKI_TYPE = {"v2g": "v2g", "emsp": "mo", "oem": "oem", "pe": None}  # OPNC pkiType → this service's hierarchy
ROOT_TYPE = {"V2G": "V2G", "MO": "eMSP", "OEM": "OEM"}  # OPCP rootType → OPNC's


def root_certificate_v1(ca: CertificateAuthority) -> dict[str, Any]:
    """RootCertificateV1 from OPCP's RootCertV2 of the same root."""
    e = root_entry(ca)
    out: dict[str, Any] = {
        "rootCertificateId": e["rootCertificateId"], "rootType": ROOT_TYPE[e["rootType"]],
        "distinguishedName": pools.opcp_dn(x509.load_der_x509_certificate(ca.der).subject),
        "caCertificate": e["caCertificate"], "commonName": e["commonName"],
        "rootAuthorityKeyIdentifier": e["rootAuthorityKeyIdentifier"],
        "rootIssuerSerialNumber": e["rootIssuerSerialNumber"], "validFrom": e["validFrom"], "validTo": e["validTo"],
        "fingerprint": e["fingerprint"],
    }
    if "organizationName" in e:
        out["organizationName"] = e["organizationName"]
    return out


@router.get("/rootcertificates", summary="getRootCertificatesV1 (OPNC RCP)")
def get_root_certificates(ctx: CtxDep, p: RcpCaller,
                          pkiType: Literal["emsp", "v2g", "oem", "pe"] | None = Query(None),  # noqa: N803
                          ) -> dict[str, Any]:
    if pkiType is not None and PKI_TYPE[pkiType] is None:
        return {"rootCertificateCollection": []}
    hierarchy = PKI_TYPE[pkiType] if pkiType is not None else None
    return {"rootCertificateCollection": [root_certificate_v1(ca) for ca in pool(ctx, hierarchy)]}


@router.get("/rootcertificates/{rootCertificateId}", summary="getRootCertificateV1 (OPNC RCP)")
def get_root_certificate(rootCertificateId: str, ctx: CtxDep, p: RcpCaller) -> dict[str, Any]:  # noqa: N803
    for ca in pool(ctx):
        if root_id(ca.der) == rootCertificateId.strip().lower():
            entry = root_certificate_v1(ca)
            return {"roootCertificate": entry, "rootCertificate": entry}
    raise NotFound("Root certificate with the given ID is not found")


def setup(app: FastAPI) -> None:
    app.include_router(router)
