"""Registration-authority rules for tenants: who may enroll which identifier under which profile.

The CA engine checks the CSR against the profile; this layer adds the tenant's view: the role may use
the profile, the identifier lies under one of the organization's prefixes, a ChargingStationCertificate
names a station the CPO registered (OCPP 2.0.1 security profile 3: CN = the station's identity, O = the
CPO's organization), and renewal may supersede the previous certificate (RFC 5280 reason superseded).
For OCPP SignCertificate the RA also chooses the certificate type and the profile from the CSR
(enroll_station), which it parses once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509

from pki import audit
from pki.context import Context
from pki.csr import CheckedRequest, check_csr, key_alg_of, parse_csr, subject_fields
from pki.errors import BadKey, BadSubject, Conflict, Forbidden
from pki.issuance import Issued, IssueRequest
from pki.names import EVSEID_RE, SECCID_RE
from pki.orgs import ROLE_PROFILES, Principal, check_owns
from pki.roots import CertHashData, ca_under_root
from pki.store import enrollment as store
from pki.store.db import Session, utcnow
from pki.store.models import IdempotencyRecord, Station


@dataclass
class EnrollResult:
    issued: Issued
    superseded: list[str]


def allowed_profiles(p: Principal) -> set[str] | None:
    return None if p.role == "admin" else ROLE_PROFILES.get(p.role, set())


def organization_name(p: Principal) -> str:
    v = p.settings.get("organization_name")
    return v if isinstance(v, str) and v else p.org


def check_organization_name(p: Principal, profile_name: str, checked: CheckedRequest) -> None:
    """A CPO's certificates name the CPO: O must be the organization's registered name (its
    ``organization_name`` setting, else its name). OCPP 2.0.1 Part 2 A00 (Certificate Properties): the
    ChargingStationCertificate's O is the CSO's organization name; ISO 15118-2 Annex F (SECC leaf): O is
    the CPO operating the SECC. Without it CPO Beta gets a certificate reading O=CPO Alpha (issue #21
    item 6). Admins enroll on anyone's behalf and are not bound."""
    if p.role == "admin" or checked.subject.o is None:
        return  # a profile without O (rule o: forbidden/optional and none sent) names nobody
    if checked.subject.o != organization_name(p):
        raise Forbidden(f"O={checked.subject.o!r} must be the CPO's organization {organization_name(p)!r} "
                        f"(profile {profile_name!r})")


def station_claim_of_other(s: Session, p: Principal, identity: str) -> str | None:
    """Why a charging-station identity belongs to an organization other than the caller's, or None.

    A station identity is exclusive to one organization (issue #21 item 5): OCPP 2.0.1 identifies the
    station to the CSMS by it (Part 2 A00: the ChargingStationCertificate's CN is the station's serial
    number / identity, and the CSMS maps the TLS client to that identity under one CSMS root). Claimed
    elsewhere when
      * another organization registered it (compared case-insensitively: OCPP identities are CiString);
      * it is an EVSEID / SECCID under another CPO's operator ID (ISO 15118-2 Annex H);
      * another organization holds a valid ChargingStationCertificate for it (orgs allowed to enroll
        unregistered stations leave no registration behind)."""
    from pki.names import normalise_evseid, normalise_seccid, owns_identifier

    if store.station_registered_elsewhere(s, identity, p.org):
        return "registered by another organization"
    for kind, norm in (("evseid", normalise_evseid), ("seccid", normalise_seccid)):
        try:
            ident = norm(identity)
        except BadSubject:
            continue
        for org in store.other_cpos(s, p.org):
            if owns_identifier(list(org.prefixes or []), kind, ident):
                return "an identifier under another organization's operator ID"
    variants = {identity, identity.upper(), identity.lower()}  # indexed lookups; the registry is the full check
    if store.station_certified_elsewhere(s, variants, p.org):
        return "certified for another organization"
    return None


def authorize_request(ctx: Context, p: Principal, profile_name: str, checked: CheckedRequest) -> None:
    allowed = allowed_profiles(p)
    if allowed is not None and profile_name not in allowed:
        raise Forbidden(f"organization {p.org!r} ({p.role}) may not enroll profile {profile_name!r}")
    kind = checked.identifier_kind
    if kind in ("evseid", "seccid", "emaid", "pcid"):
        check_owns(p, kind, checked.identifier)
        if kind in ("evseid", "seccid"):
            check_organization_name(p, profile_name, checked)  # the SECC certificate names its CPO
    elif kind == "station" and p.role != "admin":
        check_organization_name(p, profile_name, checked)
        if checked.subject.o is None:
            raise Forbidden(f"O must be the CPO's organization {organization_name(p)!r}")
        with ctx.db.session() as s:
            other = station_claim_of_other(s, p, checked.identifier)
            if other is not None:
                raise Forbidden(f"station {checked.identifier!r} belongs to another organization ({other})")
            if not p.settings.get("allow_any_station"):
                if store.station_of(s, p.org, checked.identifier) is None:
                    raise Forbidden(f"station {checked.identifier!r} is not registered for {p.org!r} (/v1/stations)")
    elif p.role != "admin":
        raise Forbidden(f"profile {profile_name!r} is not enrollable by {p.role}")


def enroll(ctx: Context, p: Principal, profile_name: str, csr: bytes | str | x509.CertificateSigningRequest, *,
           ca: str | None = None, supersede: bool = False, tenant: str | None = None) -> EnrollResult:
    """Check the CSR against the profile and the tenant's rights, issue, and supersede on request. ``csr``
    as the client sent it (PEM, DER, base64 DER), or already parsed (enroll_station): parsed once."""
    profile = ctx.profiles.get(profile_name)
    if profile.ca:
        raise Forbidden(f"profile {profile_name!r} is a CA profile")
    parsed = csr if isinstance(csr, x509.CertificateSigningRequest) else parse_csr(csr)
    checked = check_csr(profile, parsed)
    authorize_request(ctx, p, profile_name, checked)
    owner = tenant if (tenant and p.role == "admin") else p.org
    issued = ctx.engine.issue(IssueRequest(
        profile=profile_name, public_key=checked.public_key, subject=checked.subject,
        identifier=checked.identifier, ca=ca, tenant=owner, actor=p.credential, alt_spki=checked.alt_spki,
    ))
    superseded: list[str] = []
    if supersede:
        olds = store.valid_certificates(ctx.db, identifier=checked.identifier, profile=profile_name, tenant=owner,
                                        except_serial=issued.serial)
        for old in olds:
            try:
                ctx.engine.revoke(old.serial, "superseded", issuer=old.issuer, actor=p.credential, org=p.org)
                superseded.append(f"{old.issuer}/{old.serial}")
            except Exception:  # noqa: BLE001 - a concurrent revocation already did it
                pass
    return EnrollResult(issued, superseded)


# -- charging stations (OCPP SignCertificate) ---------------------------------------------------------------

# OCPP CertificateSigningUseEnumType values a station may ask for (2.1 adds V2G20Certificate)
StationCertType = Literal["V2GCertificate", "ChargingStationCertificate", "V2G20Certificate"]


def infer_cert_type(csr: x509.CertificateSigningRequest, rule: str) -> StationCertType:
    """certificateType absent (the OCPP schemas: "used for both"; after TriggerMessage
    SignCombinedCertificate a station sends none): ``rule`` (V2GPKI_OCPP_DEFAULT_CERT_TYPE) decides;
    `infer` reads the CSR — an EVSEID/SECCID CN or DC=CPO makes it a V2G certificate."""
    if rule in ("V2GCertificate", "ChargingStationCertificate"):
        return rule  # type: ignore[return-value]
    fields = subject_fields(csr.subject)
    cn = fields.cn.upper()
    if (fields.dc or "").upper() == "CPO" or EVSEID_RE.match(cn) or SECCID_RE.match(cn):
        return "V2GCertificate"
    return "ChargingStationCertificate"


def station_profile(csr: x509.CertificateSigningRequest, cert_type: StationCertType) -> str:
    """The profile a station's certificate of ``cert_type`` is issued under: cs-client for the OCPP
    ChargingStationCertificate; for a V2G (SECC) certificate, by the key the CSR carries — secc for P-256
    (ISO 15118-2), secc-20 otherwise (ISO 15118-20 §7.9.1: secp521r1 or Ed448)."""
    if cert_type == "ChargingStationCertificate":
        return "cs-client"
    alg = key_alg_of(csr.public_key())
    if cert_type == "V2G20Certificate" and alg.value == "p256":
        # OCPP 2.1 CertificateSigningUseEnumType V2G20Certificate: an ISO 15118-20 SECC certificate, whose keys
        # are secp521r1 or Ed448 (ISO 15118-20 §7.9.1 / Table 3 of the shared profiles doc)
        raise BadKey("a V2G20Certificate CSR must carry a P-521 or Ed448 key (ISO 15118-20)")
    return "secc" if alg.value == "p256" else "secc-20"


@dataclass(frozen=True)
class StationEnrollment:
    result: EnrollResult
    cert_type: StationCertType


def enroll_station(ctx: Context, p: Principal, csr: bytes | str, cert_type: StationCertType | None, *,
                   hash_root: CertHashData | None = None) -> StationEnrollment:
    """OCPP SignCertificate's enrollment: the RA decides the certificate type (when the station sent none)
    and the profile from the CSR, and under which root (OCPP 2.1 hashRootCertificate), then enrolls. The
    CSR is parsed once, here, and the parsed request passed on."""
    parsed = parse_csr(csr)
    ctype = cert_type or infer_cert_type(parsed, ctx.settings.ocpp_default_cert_type)
    profile = station_profile(parsed, ctype)
    ca = None
    if hash_root is not None:
        ca = ca_under_root(ctx.engine, profile, key_alg_of(parsed.public_key()), hash_root)
    return StationEnrollment(enroll(ctx, p, profile, parsed, ca=ca), ctype)


def register_station(ctx: Context, p: Principal, identity: str) -> Station:
    from pki.names import check_station_id

    p.require("cpo", "admin")
    check_station_id(identity)
    with ctx.db.session() as s:
        # exclusive to one organization (issue #21 item 5); the caller learns that, not whose it is
        other = station_claim_of_other(s, p, identity)
        if other is not None:
            raise Conflict(f"station {identity!r} belongs to another organization ({other})")
        st = Station(org=p.org, identity=identity, created_at=utcnow())
        # A duplicate is a 409, not a 500 (the INSERT is flushed before the audit append).
        if not store.add_station(s, st, audit.Entry(actor=p.credential, org=p.org, action="station.register",
                                                    object=identity)):
            raise Conflict(f"station {identity!r} already registered")
        return st


def list_stations(ctx: Context, p: Principal) -> list[Station]:
    return store.stations(ctx.db, None if p.sees_all else p.org)


# -- Idempotency-Key (draft-ietf-httpapi-idempotency-key-header) ----------------------------------------


def request_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotent_lookup(ctx: Context, org: str, key: str, digest: str) -> dict[str, Any] | None:
    rec = store.idempotency_record(ctx.db, org, key)
    if rec is None:
        return None
    if rec.request_sha256 != digest:
        raise Conflict("Idempotency-Key was already used with a different request")
    return dict(rec.response)


def idempotent_store(ctx: Context, org: str, key: str, digest: str, response: dict[str, Any]) -> None:
    store.add_idempotency_record(ctx.db, IdempotencyRecord(org=org, key=key, request_sha256=digest, response=response,
                                                           created_at=utcnow()))


__all__ = ["BadSubject", "EnrollResult", "StationEnrollment", "enroll", "enroll_station", "register_station",
           "list_stations"]
