"""OPNC v1 PKI API (`specification/apis/pki/pki.api.v1.json`), server `…/opnc/v1/pki`:

  POST /opnc/v1/pki/est/simpleenroll?caDomain=…&iso15118Version=…   base64 PKCS#10 → base64 certs-only PKCS#7
  GET  /opnc/v1/pki/est/cacerts?caDomain=…&iso15118Version=…[&algorithm=…]
  POST /opnc/v1/pki/pki/revokeCertificate   {certificate, revocationReason}  (also /opnc/v1/pki/revokeCertificate)

caDomain is `(\\w+-)?(emsp|cpo|oem|cps|veh)`; the enrollment and the chains are api/est.py's (one EST
implementation, the same tenancy). The `OPNC-from/to-party-*` headers are checked against the caller
(api/opnc/__init__.py: 403 on a mismatch). A revocation names a leaf certificate this PKI issued to the
caller's organization ("a PKI certificate subscriber can only ask the revocation on one of his own
certificates"); anyone else's, a CA's or one issued elsewhere is the same 403, so existence is not revealed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import CtxDep
from api.est import _body, cacerts_p7, enroll_p7, resolve
from api.opnc import opnc_party
from pki.context import Context
from pki.errors import BadRevocation, Forbidden
from pki.orgs import Principal
from pki.store.inventory import Inventory

router = APIRouter(prefix="/opnc/v1/pki", tags=["opnc-pki"])

CaDomain = Annotated[str, Query(max_length=64, description="emsp, cpo, oem, cps or veh (optionally prefixed)")]
IsoVersion = Annotated[str, Query(max_length=32, description="ISO15118-2 or ISO15118-20")]
PkiCaller = Annotated[Principal, Depends(opnc_party("pki"))]
Reason = Literal["privilegeWithdrawn", "affiliationChanged", "superseded", "unspecified", "keyCompromise",
                 "aACompromise", "cessationOfOperation"]


class RevokeCertificateIn(BaseModel):
    """RevokeCertificateDataReqV1 (revokeCertificateReq.v1.json)."""

    certificate: str = Field(max_length=20000, description="the certificate: base64 DER, or PEM (base64 or not)")
    revocationReason: Reason  # noqa: N815


@router.post("/est/simpleenroll", summary="SimpleEnrollCert (OPNC PKI)")
async def simpleenroll(caDomain: CaDomain, iso15118Version: IsoVersion, request: Request,  # noqa: N803
                       ctx: CtxDep, p: PkiCaller) -> Response:
    csr = await _body(request)

    def run() -> Response:
        return enroll_p7(ctx, p, resolve(ctx, caDomain, iso15118Version), csr, False)

    return await run_in_threadpool(run)


@router.get("/est/cacerts", summary="GetCaCerts (OPNC PKI)")
def cacerts(caDomain: CaDomain, iso15118Version: IsoVersion, ctx: CtxDep, p: PkiCaller,  # noqa: N803
            algorithm: Literal["secp256r1", "secp521r1", "ed448"] | None = Query(None)) -> Response:
    return cacerts_p7(ctx, resolve(ctx, caDomain, iso15118Version, algorithm))


def _certificate_der(text: str) -> bytes:
    raw = text.strip().encode()
    if not raw.startswith(b"-----BEGIN"):
        try:
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadRevocation("certificate must be a base64 DER or PEM certificate") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(raw)
        else:
            cert = x509.load_der_x509_certificate(raw)
    except ValueError:
        raise BadRevocation("certificate is not an X.509 certificate") from None
    return cert.public_bytes(serialization.Encoding.DER)


def _revoke(ctx: Context, p: Principal, body: RevokeCertificateIn) -> None:
    if p.role == "auditor":
        raise Forbidden("auditors cannot revoke")
    fp = hashlib.sha256(_certificate_der(body.certificate)).hexdigest()
    row = Inventory(ctx.db).certificate_by_fingerprint(fp)
    if row is None or row.key_uri is not None or (p.tenant_filter is not None and row.tenant != p.tenant_filter):
        raise Forbidden("not a leaf certificate this PKI issued to your organization")
    ctx.engine.revoke(row.serial, body.revocationReason, issuer=row.issuer, tenant=p.tenant_filter,
                      actor=p.credential, org=p.org)


@router.post("/pki/revokeCertificate", summary="RevokeCert (OPNC PKI)")
def revoke_certificate(body: RevokeCertificateIn, ctx: CtxDep, p: PkiCaller) -> Response:
    _revoke(ctx, p, body)
    return Response(status_code=200)


@router.post("/revokeCertificate", include_in_schema=False)
def revoke_certificate_alias(body: RevokeCertificateIn, ctx: CtxDep, p: PkiCaller) -> Response:
    return revoke_certificate(body, ctx, p)


def setup(app: FastAPI) -> None:
    app.include_router(router)
