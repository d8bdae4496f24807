"""/v1: enrollment, certificate inventory and revocation, CAs and trust stores, stations, audit.

Every read and write is tenant-scoped: another tenant's certificate is 404 on read and on revoke
(existence is not revealed); an enrollment outside the caller's prefixes is 403 and stores nothing.
Routes are sync `def` (FastAPI runs them in its thread pool, so PKCS#11 never blocks the event loop), except
the hot enrollment POST: `async def` that runs its blocking part in api/blocking.py's bounded pool.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from cryptography import x509
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api import blocking, hot
from api.auth import PrincipalDep
from api.deps import CtxDep
from pki.context import Context
from pki.enrollment import (
    enroll,
    idempotent_lookup,
    idempotent_store,
    list_stations,
    register_station,
    request_digest,
)
from pki.errors import BadRevocation, Forbidden, NotFound
from pki.issuance import REASONS, pem
from pki.orgs import Principal
from pki.serials import parse_serial
from pki.store.audit_log import AuditLog
from pki.store.inventory import CertificateFilter, Inventory
from pki.store.models import Certificate

router = APIRouter(prefix="/v1")

MAX_CSR_CHARS = 10000
MAX_DB_INT = 2**31 - 1  # ids and audit sequence numbers are 32-bit INTEGER columns (PostgreSQL rejects more)


class EnrollmentIn(BaseModel):
    csr: str = Field(max_length=MAX_CSR_CHARS, description="PEM, or base64 DER as OCPP carries it")
    profile: str = Field(max_length=64)
    ca: str | None = Field(default=None, max_length=64)
    supersede: bool = Field(default=False, description="revoke the identity's previous certificates (superseded)")
    tenant: str | None = Field(default=None, max_length=128, description="admins only: owning organization")


class EnrollmentOut(BaseModel):
    serial: str
    issuer: str
    profile: str
    identifier: str | None
    not_before: datetime
    not_after: datetime
    certificate: str
    chain: str
    superseded: list[str] = []


class CertificateOut(BaseModel):
    issuer: str
    serial: str
    profile: str
    subject: str
    identifier: str | None
    tenant: str | None
    status: str
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None
    revocation_reason: str | None
    sha256: str


class CertificateList(BaseModel):
    items: list[CertificateOut]
    next_cursor: int | None


class RevokeIn(BaseModel):
    reason: str = Field(default="unspecified", max_length=32, description="RFC 5280 reason name")


class BulkRevokeIn(BaseModel):
    reason: str = Field(max_length=32)
    identifier: str | None = Field(default=None, max_length=255)
    subject_pattern: str | None = Field(default=None, max_length=255, description="SQL LIKE pattern, e.g. %DE*ICE%")
    issuer: str | None = Field(default=None, max_length=64)
    dry_run: bool = True
    batch: int = Field(default=500, ge=1, le=5000, description="certificates per transaction")


class StationIn(BaseModel):
    identity: str = Field(max_length=64)


def _cert_out(r: Certificate) -> CertificateOut:
    return CertificateOut(
        issuer=r.issuer, serial=r.serial.upper(), profile=r.profile, subject=r.subject, identifier=r.identifier,
        tenant=r.tenant, status=r.status, not_before=r.not_before, not_after=r.not_after, revoked_at=r.revoked_at,
        revocation_reason=r.revocation_reason, sha256=r.fingerprint,
    )


@router.post("/enrollments", response_model=EnrollmentOut, status_code=201,
             openapi_extra=hot.openapi_extra(EnrollmentIn, hot.IDEMPOTENCY_KEY))
async def post_enrollment(request: Request) -> Response:
    """201 and the certificate; 200 with the first answer for a repeated Idempotency-Key. async: only the
    blocking part (HSM, database) leaves the event loop, into api/blocking.py's bounded pool; the caller,
    the body (EnrollmentIn) and the Idempotency-Key header are read by api/hot.py, in FastAPI's order and
    with its answers, without its per-request parameter solving (api/hot.py: its cost)."""
    p, body, (idempotency_key,) = await hot.read(request, EnrollmentIn, hot.IDEMPOTENCY_KEY)
    ctx = blocking.context(request)
    return await blocking.run(ctx, _enroll, body, ctx, p, idempotency_key)


def _enroll(body: EnrollmentIn, ctx: Context, p: Principal, idempotency_key: str | None) -> Response:
    digest = request_digest(body.model_dump()) if idempotency_key else ""
    if idempotency_key:
        prior = idempotent_lookup(ctx, p.org, idempotency_key, digest)
        if prior is not None:
            return JSONResponse(prior, status_code=200)
    res = enroll(ctx, p, body.profile, body.csr, ca=body.ca, supersede=body.supersede, tenant=body.tenant)
    i = res.issued
    out = EnrollmentOut(
        serial=i.serial.upper(), issuer=i.issuer, profile=i.profile,
        identifier=i.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value,  # type: ignore[arg-type]
        not_before=i.cert.not_valid_before_utc, not_after=i.cert.not_valid_after_utc,
        certificate=pem(i.cert), chain=i.pem_chain(include_root=False), superseded=res.superseded,
    )
    if idempotency_key:
        idempotent_store(ctx, p.org, idempotency_key, digest, out.model_dump(mode="json"))
    # Already validated by EnrollmentOut: serialized once, straight to JSON bytes (response_model
    # re-validation, or a dict through json.dumps, was a measurable share of an enrollment's CPU).
    return Response(out.model_dump_json().encode(), status_code=201, media_type="application/json")


@router.get("/certificates", response_model=CertificateList)
def list_certificates(
    ctx: CtxDep, p: PrincipalDep,
    status: Literal["valid", "revoked", "hold"] | None = None,
    profile: Annotated[str | None, Query(max_length=64)] = None,
    identifier: Annotated[str | None, Query(max_length=255)] = None,
    issuer: Annotated[str | None, Query(max_length=64)] = None,
    expiring_before: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=0, le=MAX_DB_INT)] = None,
) -> CertificateList:
    f = CertificateFilter(tenant=p.tenant_filter, status=status or "", profile=profile or "",
                          identifier=identifier.upper() if identifier else "", issuer=issuer or "",
                          expires_before=expiring_before)
    rows = Inventory(ctx.db).certificates(f, after_id=cursor, limit=limit + 1)
    nxt = rows[limit - 1].id if len(rows) > limit else None
    return CertificateList(items=[_cert_out(r) for r in rows[:limit]], next_cursor=nxt)


def _scoped(ctx: CtxDep, p: PrincipalDep, issuer: str, serial: str) -> Certificate:
    try:
        s_hex = parse_serial(serial)
    except NotFound:
        raise NotFound("no such certificate") from None
    try:
        return ctx.engine.get_certificate(s_hex, issuer, p.tenant_filter)
    except NotFound:
        raise NotFound("no such certificate") from None  # same answer whether it exists elsewhere or not


@router.get("/certificates/{issuer}/{serial}", response_model=None)
def get_certificate(issuer: str, serial: str, ctx: CtxDep, p: PrincipalDep, request: Request,
                    format: Literal["json", "pem", "der"] | None = None) -> Any:
    row = _scoped(ctx, p, issuer, serial)
    accept = request.headers.get("accept", "")
    fmt = format or ("pem" if "application/x-pem-file" in accept else
                     "der" if "application/pkix-cert" in accept else "json")
    if fmt == "der":
        return Response(row.der, media_type="application/pkix-cert")
    cert = x509.load_der_x509_certificate(row.der)
    if fmt == "pem":
        return Response(pem(cert), media_type="application/x-pem-file")
    out = _cert_out(row).model_dump(mode="json")
    out["pem"] = pem(cert)
    out["extensions"] = [{"oid": e.oid.dotted_string, "name": getattr(e.oid, "_name", ""), "critical": e.critical}
                         for e in cert.extensions]
    return out


@router.post("/certificates/{issuer}/{serial}/revoke", response_model=CertificateOut)
def revoke_certificate(issuer: str, serial: str, body: RevokeIn, ctx: CtxDep, p: PrincipalDep) -> CertificateOut:
    if p.role == "auditor":
        raise Forbidden("auditors cannot revoke")
    row = _scoped(ctx, p, issuer, serial)
    if body.reason not in REASONS:
        raise BadRevocation(f"unknown reason {body.reason!r}; one of {', '.join(REASONS)}")
    return _cert_out(ctx.engine.revoke(row.serial, body.reason, issuer=row.issuer, tenant=p.tenant_filter,
                                       actor=p.credential, org=p.org))


@router.post("/certificates/{issuer}/{serial}/release-hold", response_model=CertificateOut)
def release_hold(issuer: str, serial: str, ctx: CtxDep, p: PrincipalDep) -> CertificateOut:
    if p.role == "auditor":
        raise Forbidden("auditors cannot release holds")
    row = _scoped(ctx, p, issuer, serial)
    return _cert_out(ctx.engine.release_hold(row.serial, issuer=row.issuer, tenant=p.tenant_filter,
                                             actor=p.credential, org=p.org))


@router.post("/revocations/bulk")
def bulk_revoke(body: BulkRevokeIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    """Admin bulk revocation (the compromise drill, #28) by issuing CA, narrowed by identifier or subject
    pattern; dry-run count by default. A run revokes in bounded transactions (pki/revocation.py): if it is
    interrupted, the same request again continues where it stopped. Without an issuer, each issuing CA of
    the matching certificates in turn."""
    p.require("admin")
    from pki.revocation import BulkRevocation
    from pki.revocation import bulk_revoke as run_bulk

    if body.reason not in REASONS:
        raise BadRevocation(f"unknown reason {body.reason!r}")
    if not (body.identifier or body.subject_pattern or body.issuer):
        raise BadRevocation("name an identifier, a subject_pattern or an issuer")
    issuers = [body.issuer] if body.issuer else _issuers_matching(ctx, body)
    out: dict[str, Any] = {"dry_run": body.dry_run, "count": 0, "issuers": []}
    for issuer in issuers:
        spec = BulkRevocation(issuer=issuer, reason=body.reason, identifier=body.identifier,
                              subject_pattern=body.subject_pattern, batch=body.batch)
        res = run_bulk(ctx, spec, dry_run=body.dry_run, actor=p.credential, org=p.org)
        out["count"] += res.count
        out["issuers"].append({"issuer": issuer, "job": res.job, "count": res.count, "batches": res.batches,
                               "crl_number": res.crl_number, "remaining": res.remaining})
    return out


def _issuers_matching(ctx: Any, body: BulkRevokeIn) -> list[str]:
    return Inventory(ctx.db).issuers_of_live_leaves(identifier=body.identifier.upper() if body.identifier else "",
                                                    subject_like=body.subject_pattern or "")


@router.get("/cas")
def list_cas(ctx: CtxDep, p: PrincipalDep) -> list[dict[str, Any]]:
    rows = Inventory(ctx.db).cas()
    return [{"id": r.id, "name": r.name, "profile": r.profile, "parent": r.parent, "hierarchy": r.hierarchy,
             "key_alg": r.key_alg, "key_uri": r.key_uri, "subject": r.subject, "serial": r.serial.upper(),
             "not_before": r.not_before, "not_after": r.not_after, "status": r.status} for r in rows]


@router.get("/cas/{ca_id}/chain")
def ca_chain(ca_id: str, ctx: CtxDep, p: PrincipalDep) -> Response:
    name = ca_id
    if ca_id.isascii() and ca_id.isdigit():  # str.isdigit() is true for '²', which int() refuses
        if int(ca_id) > MAX_DB_INT:
            raise NotFound(f"no CA {ca_id}")
        row = Inventory(ctx.db).ca_by_id(int(ca_id))
        if row is None:
            raise NotFound(f"no CA {ca_id}")
        name = row.name
    return Response("".join(pem(c) for c in ctx.engine.chain(name)), media_type="application/x-pem-file")


TRUSTSTORE_HIERARCHY = {"v2g": "v2g", "mo": "mo", "oem": "oem", "csms": "csms"}


@router.get("/truststores/{kind}")
def truststore(kind: Literal["v2g", "mo", "oem", "csms"], ctx: CtxDep) -> Response:
    """PEM bundle of the active roots of one kind (public information, no authentication)."""
    # staged: a new root being distributed
    rows = Inventory(ctx.db).roots([TRUSTSTORE_HIERARCHY[kind]], ["active", "staged"])
    body = "".join(pem(x509.load_der_x509_certificate(r.der)) for r in rows)
    return Response(body, media_type="application/x-pem-file",
                    headers={"Cache-Control": "public, max-age=300"})


@router.post("/stations", status_code=201)
def post_station(body: StationIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    st = register_station(ctx, p, body.identity)
    return {"identity": st.identity, "org": st.org, "created_at": st.created_at}


@router.get("/stations")
def get_stations(ctx: CtxDep, p: PrincipalDep) -> list[dict[str, Any]]:
    return [{"identity": st.identity, "org": st.org, "created_at": st.created_at} for st in list_stations(ctx, p)]


@router.get("/audit")
def get_audit(ctx: CtxDep, p: PrincipalDep, after: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    p.require("auditor", "admin")
    rows, total = AuditLog(ctx.db).after(after, limit=limit)
    return {"total": total, "items": [r.model_dump(mode="json") for r in rows],
            "next_after": rows[-1].seq if rows else None}


@router.get("/audit/verify")
def verify_audit(ctx: CtxDep, p: PrincipalDep, full: bool = False) -> dict[str, Any]:
    """Incremental from the last verified checkpoint (``from_seq``; 0: the whole chain), or ``full``."""
    p.require("auditor", "admin")
    from pki.audit_sign import verify_all

    res = verify_all(ctx, full=full)
    return {"ok": res.ok, "events": res.events, "checkpoints": res.checkpoints, "problems": res.problems,
            "from_seq": res.from_seq, "checked": res.checked, "verified_through": res.verified_through}


@router.get("/me")
def me(p: PrincipalDep) -> dict[str, Any]:
    return {"org": p.org, "role": p.role, "prefixes": list(p.prefixes), "credential": p.credential.split(":")[0]}


def setup(app: FastAPI) -> None:
    app.include_router(router)


__all__ = ["router", "setup"]
