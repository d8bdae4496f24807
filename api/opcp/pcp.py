"""OPCP 1.0 Provisioning Certificate Pool (``../shared/specs/opcp/pcp.v1.json``) on the service's OEM pool.

PUT    /v1/oem/provCerts — an OEM publishes a vehicle's provisioning certificate (register_provisioning_certificate)
GET    /v1/oem/provCerts/{pcid} — the pool entry (`lookup_vehicle`: the OEM, an eMSP with a contract for the PCID)
DELETE /v1/oem/provCerts/{pcid} — the OEM takes it out of the pool
GET    /v1/oem/provCerts/lookupVehicle/{pcid} — 200 when the pool has the vehicle, else 404
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from cryptography import x509
from fastapi import APIRouter, FastAPI, Header
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.opcp.pool_shapes import ErrorShapeRoute, empty
from pki import pools

router = APIRouter(prefix="/v1/oem/provCerts", tags=["opcp-pcp"], route_class=ErrorShapeRoute,
                   include_in_schema=False)

CERT_MAX = 4000  # base64 characters of one certificate (ISO 15118-2 allows 800 octets)


class ProvisioningCertificateIn(BaseModel):
    subCA1Certificate: str = Field(max_length=CERT_MAX)  # noqa: N815
    subCA2Certificate: str | None = Field(default=None, max_length=CERT_MAX)  # noqa: N815
    vehicleCertificate: str = Field(max_length=CERT_MAX)  # noqa: N815
    xsdMsgDefNamespace: str = Field(default=pools.ISO2, max_length=128)  # noqa: N815
    v2gRootAuthorityKeyIdentifiers: list[str] | None = Field(default=None, max_length=20)  # noqa: N815
    previousPcid: str | None = Field(default=None, max_length=18)  # noqa: N815


def b64(c: x509.Certificate) -> str:
    return base64.b64encode(pools.cert_der(c)).decode()


def key_id(cert: x509.Certificate) -> str | None:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None
    return ":".join(f"{b:02X}" for b in ski)


def sub_cas(e: pools.PoolEntry) -> tuple[x509.Certificate | None, x509.Certificate | None]:
    """(Sub-CA 1, Sub-CA 2): Sub-CA 1 under the root, Sub-CA 2 the provisioning certificate's issuer."""
    subs = list(reversed(e.sub_cas))  # root side first
    return (subs[0] if subs else None), (subs[1] if len(subs) > 1 else None)


def provisioning_data(e: pools.PoolEntry) -> dict[str, Any]:
    """ProvisioningCertificateData."""
    s1, s2 = sub_cas(e)
    out: dict[str, Any] = {"vehicleCertificate": b64(e.certificate), "xsdMsgDefNamespace": pools.ISO2,
                           "rootIssuerDistinguishedName": pools.opcp_dn(e.root.subject),
                           "rootIssuerSerialNumber": str(e.root.serial_number),
                           "fingerprint": e.row.fingerprint}
    if s1 is not None:
        out["subCA1Certificate"] = b64(s1)
    if s2 is not None:
        out["subCA2Certificate"] = b64(s2)
    rk = key_id(e.root)
    if rk:
        out["rootAuthorityKeyIdentifier"] = rk
    return out


@router.put("")
def add_oem_prov_cert(body: ProvisioningCertificateIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    pools.check_namespace(body.xsdMsgDefNamespace)
    return provisioning_data(pools.register(ctx, p, body.vehicleCertificate,
                                            [body.subCA1Certificate, body.subCA2Certificate]))


@router.get("/lookupVehicle/{pcid}", response_model=None)
def lookup_vehicle(pcid: str, ctx: CtxDep, p: PrincipalDep) -> Response:
    pools.pool(ctx, p, pcid)
    return empty()


@router.get("/{pcid}")
def get_oem_prov_cert(pcid: str, ctx: CtxDep, p: PrincipalDep,
                      broadcast: Annotated[bool, Header()] = False) -> dict[str, Any]:
    return {"OEMMessage": provisioning_data(pools.pool(ctx, p, pcid)[0])}


@router.delete("/{pcid}", response_model=None)
def delete_oem_prov_cert(pcid: str, ctx: CtxDep, p: PrincipalDep) -> Response:
    pools.unregister(ctx, p, pcid)
    return empty()


def setup(app: FastAPI) -> None:
    app.include_router(router)
