"""OPCP 1.0 RCP, the root certificate pool (`rcp.v1.json`), read-only, from this service's own roots:

  GET /v1/root/rootCerts[?rootType=v2g|mo|oem]   GetAllRootCertsResponseV1: RootCertificateCollection.rootCertificates[]
  GET /v1/root/rootCerts/{rootCertificateId}     GetRootCertResponseV1: RootResponse
  GET /v1/root/ctl                               {signerCertificate, timeStamp, CTL}: the signed trust lists

Each root is a RootCertV2 (`caCertificate` = base64 DER, what MaEVe and CitrineOS read), with a stable
`rootCertificateId` (a UUID derived from the certificate's SHA-256 fingerprint). The pool is the active and
still valid V2G, MO and OEM roots this service holds (ISO 15118-2 and -20; the CSMS root is not a Plug &
Charge root). Adding and deleting roots (the document's admin operations) is `v2gpki init` / rollover, not
this API. The CTL — "not yet defined by the market" in the document — is this service's signed trust list
(pki/trustlist.py, docs/trustlist.md): `CTL` holds each store's latest signed version, exactly as
/v1/truststores/{store}/versions/{version} serves it (signed bytes, detached DER and JWS signatures, signer
chain), `signerCertificate` the signer's certificate (base64 DER), `timeStamp` the newest issue time.
Errors are the document's `Error` shape (api/opcp/pool_shapes.py).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.x509.oid import NameOID
from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.opcp.pool_shapes import opcp_error
from pki.context import Context
from pki.errors import NotFound, PKIError
from pki.pools import root_certificate_id
from pki.store.db import utcnow
from pki.store.inventory import Inventory
from pki.store.models import CertificateAuthority

router = APIRouter(prefix="/v1/root", tags=["opcp-rcp"])

ROOT_TYPES = {"v2g": "V2G", "mo": "MO", "oem": "OEM"}
NAMESPACE = {"-2": "urn:iso:15118:2:2013:MsgDef", "-20": "urn:iso:15118:20:2022:MsgDef"}  # rcp.v1.json's enum


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def root_id(der: bytes) -> str:
    """A stable UUID for a root (pki.pools.root_certificate_id: the first 16 bytes of its SHA-256)."""
    return root_certificate_id(der)


def _sha256(data: bytes) -> bytes:
    d = hashes.Hash(hashes.SHA256())
    d.update(data)
    return d.finalize()


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    vals = cert.subject.get_attributes_for_oid(oid)
    return str(vals[0].value) if vals else None


def _dn(cert: x509.Certificate) -> str:
    short = {NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.ORGANIZATION_NAME: "O",
             NameOID.COUNTRY_NAME: "C", NameOID.DOMAIN_COMPONENT: "DC", NameOID.STATE_OR_PROVINCE_NAME: "ST"}
    parts = [f"{short.get(a.oid, a.oid.dotted_string)}={a.value if isinstance(a.value, str) else a.value.hex()}"
             for a in reversed(list(cert.subject))]
    return ", ".join(parts)


def root_entry(ca: CertificateAuthority) -> dict[str, Any]:
    cert = x509.load_der_x509_certificate(ca.der)
    pub = cert.public_key()
    alg = ("ed448" if isinstance(pub, ed448.Ed448PublicKey) else
           "secp521r1" if isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp521r1" else
           "secp256r1")
    ski = x509.SubjectKeyIdentifier.from_public_key(pub).digest  # type: ignore[arg-type]
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        pass
    entry: dict[str, Any] = {
        "rootCertificateId": root_id(ca.der), "distinguishedName": _dn(cert), "rootType": ROOT_TYPES[ca.hierarchy],
        "caCertificate": base64.b64encode(ca.der).decode(), "commonName": _attr(cert, NameOID.COMMON_NAME) or "",
        "rootAuthorityKeyIdentifier": base64.b64encode(ski).decode(), "rootAuthorityKeyIdentifierHex": ski.hex(),
        "rootIssuerSerialNumber": format(cert.serial_number, "x"),
        "validFrom": _iso(cert.not_valid_before_utc), "validTo": _iso(cert.not_valid_after_utc),
        "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
        "fingerprintSha1": cert.fingerprint(hashes.SHA1()).hex(),
        "xsdMsgDefNamespace": NAMESPACE["-2" if alg == "secp256r1" else "-20"], "signatureAlgorithm": alg,
    }
    org = _attr(cert, NameOID.ORGANIZATION_NAME)
    if org:
        entry["organizationName"] = org
    return entry


def pool(ctx: Context, root_type: str | None = None) -> list[CertificateAuthority]:
    now = utcnow()
    stores = [root_type] if root_type else list(ROOT_TYPES)
    return Inventory(ctx.db).roots(stores, ["active"], valid_at=now, ordered=True)


@router.get("/rootCerts", summary="getAllRootCerts (OPCP RCP)")
def get_all_root_certs(ctx: CtxDep, p: PrincipalDep,
                       rootType: Literal["mo", "v2g", "oem"] | None = Query(None)) -> JSONResponse:  # noqa: N803
    roots = [root_entry(ca) for ca in pool(ctx, rootType)]
    return JSONResponse({"RootCertificateCollection": {"rootCertificates": roots}})


@router.get("/rootCerts/{rootCertificateId}", summary="getRootCert (OPCP RCP)")
def get_root_cert(rootCertificateId: str, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:  # noqa: N803
    for ca in pool(ctx):
        if root_id(ca.der) == rootCertificateId.lower():
            return JSONResponse({"RootResponse": root_entry(ca)})
    return opcp_error(NotFound("Root certificate with the given ID is not found"))


def ctl_document(ctx: Context) -> dict[str, Any]:
    from pki.trustlist import STORES, latest, version_document

    docs: dict[str, Any] = {}
    newest: datetime | None = None
    signer_pem: str | None = None
    for store in STORES:
        row = latest(ctx, store)
        if row is None:
            continue
        docs[store] = version_document(ctx, store, row.version)
        if newest is None or row.issued_at > newest:
            newest, signer_pem = row.issued_at, row.signer_chain_pem
    if not docs or signer_pem is None or newest is None:
        raise NotFound("no trust list has been published yet (the worker publishes them; "
                       "`v2gpki truststore publish` does it at once)")
    signer = x509.load_pem_x509_certificates(signer_pem.encode())[0]
    return {"signerCertificate": base64.b64encode(signer.public_bytes(serialization.Encoding.DER)).decode(),
            "timeStamp": _iso(newest), "CTL": {"format": "v2gpki-trustlist/1", "stores": docs}}


@router.get("/ctl", summary="GetCertificateTrustList (OPCP RCP): this service's signed trust lists")
def get_ctl(ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    try:
        return JSONResponse(ctl_document(ctx))
    except PKIError as exc:
        return opcp_error(exc)


def setup(app: FastAPI) -> None:
    app.include_router(router)
