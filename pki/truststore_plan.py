"""Trust-store reconciliation per charging station (issue #27 item 1).

A CSMS asks a station which certificates it holds (OCPP 2.0.1 Part 2 M03 "Retrieve list of available
certificates from a Charging Station": GetInstalledCertificateIdsRequest/Response), then installs the roots it
lacks (M05 "Install CA certificate in a Charging Station": InstallCertificateRequest) and deletes those it must
no longer trust (M04 "Delete a specific certificate from a Charging Station": DeleteCertificateRequest,
addressed by CertificateHashDataType). OCPP 2.1 keeps the same three use cases and adds the OEMRootCertificate
type. This module turns what a station reported into those requests:

* **wanted** — every root this CPO's policy wants, per type: the roots of this PKI (status ``active``, or
  ``staged`` — a new root during its transition is pushed before anything is issued under it, pki/root_campaign.py)
  and the roots of other PKIs an admin imported, globally or for this CPO (``trusted_root``);
* **withdrawn** — roots of this PKI that were withdrawn (``retired``), revoked or have expired, and withdrawn
  imports: reported as installed (under any type), each gets a DeleteCertificateRequest carrying the hash
  data exactly as the station reported it, so the station finds its own entry. A root nobody here knows is
  left alone: the station may need it for something this service does not govern.

The hash data are matched as OCPP specifies them (CertificateHashDataType: issuerNameHash and issuerKeyHash
over the root as the certificate being checked, so its own subject and key; RFC 6960 §4.1.1 CertID), whatever
encoding the station used (hex in any case, base64; pki.roots.cert_id_matches and pki.ocsp's decoders).

The CPO's policy is three settings of its organization (Organization.settings): ``truststore_types`` (the
InstallCertificateUseEnumType values it wants, default: every type of the OCPP version),
``truststore_iso15118_20`` (default true: also push this PKI's ISO 15118-20 roots, P-521 and Ed448) and
``truststore_manufacturer_roots`` (names of this PKI's Manufacturer roots to push, default none; imported
ManufacturerRootCertificates are pushed like any import).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pki import audit
from pki.enrollment import station_claim_of_other
from pki.errors import BadCSR, BadRootImport, Conflict, Forbidden, NotFound, PKIError, UnknownStation
from pki.orgs import Principal
from pki.roots import CertHashData, cert_id_matches
from pki.store import trust_reports as store
from pki.store.db import Session, utcnow
from pki.store.models import CertificateAuthority, Station
from pki.store.models_truststore import GLOBAL_SCOPE, TrustedRoot
from pki.store.orgs import org_named

if TYPE_CHECKING:
    from pki.context import Context

Version = str  # "2.0.1" | "2.1"

# InstallCertificateUseEnumType per version (OCPP 2.0.1 Part 2 M05; 2.1 adds OEMRootCertificate)
INSTALL_TYPES: dict[str, tuple[str, ...]] = {
    "2.0.1": ("V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate", "ManufacturerRootCertificate"),
    "2.1": ("V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate", "ManufacturerRootCertificate",
            "OEMRootCertificate"),
}
ALL_TYPES = INSTALL_TYPES["2.1"]
# InstallCertificateRequest.certificate maxLength (PEM)
CERT_LIMIT = {"2.0.1": 5500, "2.1": 10000}
# The CA hierarchy of a root of this PKI → the OCPP type it is installed as.
HIERARCHY_TYPE = {"v2g": "V2GRootCertificate", "mo": "MORootCertificate", "csms": "CSMSRootCertificate",
                  "oem": "OEMRootCertificate", "manufacturer": "ManufacturerRootCertificate"}
VENDOR_ID = "org.v2gpki"


def own_root_type(ca: CertificateAuthority) -> str | None:
    """The OCPP type a root of this PKI is installed as (a manufacturer root: its profile names it so)."""
    if ca.profile.startswith("manufacturer") or ca.profile.startswith("mfr"):
        return "ManufacturerRootCertificate"
    return HIERARCHY_TYPE.get(ca.hierarchy)


def sha256_of(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class KnownRoot:
    """A root this service has an opinion on: wanted on the station, or withdrawn from it."""

    name: str  # CA name, or "import:<id>"
    certificate_type: str
    cert: x509.Certificate
    sha256: str
    wanted: bool
    iso15118_20: bool = False
    reason: str = ""  # why withdrawn

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def known_roots(ctx: Context, org: str, now: datetime | None = None) -> list[KnownRoot]:
    """Every root of this PKI and every import visible to ``org`` (global or its own), wanted or withdrawn.
    A certificate that is both (imported again after being withdrawn elsewhere) counts as wanted."""
    now = now or utcnow()
    out: list[KnownRoot] = []
    cas, imports = store.roots_and_imports(ctx.db, org)
    for ca in cas:
        t = own_root_type(ca)
        if t is None:
            continue
        cert = x509.load_der_x509_certificate(ca.der)
        live = ca.status in ("active", "staged") and ca.not_after > now
        reason = "" if live else ("withdrawn" if ca.status == "retired" else
                                  "revoked" if ca.status == "revoked" else "expired")
        out.append(KnownRoot(ca.name, t, cert, sha256_of(cert), live, ca.profile.endswith("-20"), reason))
    for r in imports:
        cert = x509.load_der_x509_certificate(r.der)
        live = r.status == "active" and r.not_after > now
        out.append(KnownRoot(f"import:{r.id}", r.certificate_type, cert, r.sha256, live,
                             reason="" if live else ("withdrawn" if r.status == "withdrawn" else "expired")))
    wanted = {(k.sha256, k.certificate_type) for k in out if k.wanted}
    wanted_any = {k.sha256 for k in out if k.wanted}
    seen: set[tuple[str, str]] = set()
    uniq: list[KnownRoot] = []
    for k in out:
        key = (k.sha256, k.certificate_type)
        if key in seen or (not k.wanted and (key in wanted or k.sha256 in wanted_any)):
            continue
        seen.add(key)
        uniq.append(k)
    return uniq


# -- the station's report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reported:
    """One certificateHashDataChain entry of a GetInstalledCertificateIdsResponse."""

    certificate_type: str
    hash_data: dict[str, str]  # hashAlgorithm, issuerNameHash, issuerKeyHash, serialNumber as reported

    def cert_hash(self) -> CertHashData:
        h = self.hash_data
        return CertHashData(h["hashAlgorithm"], h["issuerNameHash"], h["issuerKeyHash"], h["serialNumber"])


def _names(root: KnownRoot, r: Reported) -> bool:
    try:
        return cert_id_matches(root.cert, root.cert, r.cert_hash())  # a root is its own issuer
    except (PKIError, ValueError):
        return False  # hashes or serial in no encoding we read: not one of ours


@dataclass
class Plan:
    station: str
    org: str
    version: Version
    install: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # sha256 of the known roots the station reports
    notes: list[str] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {"install": self.install, "delete": self.delete}


def policy_of(settings: dict[str, Any], version: Version) -> tuple[set[str], bool, set[str]]:
    """(the types this CPO wants pushed in ``version``, whether ISO 15118-20 roots are included, the
    Manufacturer roots of this PKI it wants — by CA name, none unless configured: a Manufacturer root lets a
    station accept that manufacturer's firmware, OCPP 2.0.1 L01, so it goes only to the CPO that names it)."""
    types = settings.get("truststore_types")
    wanted = set(INSTALL_TYPES[version])
    if isinstance(types, list) and types:
        wanted &= {str(t) for t in types}
    inc20 = settings.get("truststore_iso15118_20", True)
    mfr = settings.get("truststore_manufacturer_roots")
    return wanted, bool(inc20), {str(m) for m in mfr} if isinstance(mfr, list) else set()


def compute_plan(roots: Sequence[KnownRoot], reported: Iterable[Reported], version: Version, *,
                 types: set[str], iso15118_20: bool = True, manufacturer_roots: set[str] | None = None,
                 station: str = "", org: str = "") -> Plan:
    """The InstallCertificateRequests (OCPP M05) and DeleteCertificateRequests (M04) that bring a station
    from what it reported (M03) to the wanted trust store. Pure: no database."""
    plan = Plan(station, org, version)
    entries = [r for r in reported if r.certificate_type != "V2GCertificateChain"]  # a chain's hash data is a leaf
    for k in roots:
        hits = [r for r in entries if _names(k, r)]
        if hits:
            plan.roots.append(k.sha256)
        if k.wanted:
            if k.certificate_type not in types or (k.iso15118_20 and not iso15118_20):
                continue
            if (k.certificate_type == "ManufacturerRootCertificate" and not k.name.startswith("import:")
                    and k.name not in (manufacturer_roots or set())):
                continue  # this PKI's Manufacturer roots: only those the CPO's policy names
            if any(r.certificate_type == k.certificate_type for r in hits):
                continue  # installed, as its type
            pem = k.pem
            if len(pem) > CERT_LIMIT[version]:  # cannot happen for ≤ 1600-byte certificates; the schema's bound
                plan.notes.append(f"{k.name}: PEM of {len(pem)} characters exceeds OCPP {version}'s maxLength")
                continue
            plan.install.append({"certificateType": k.certificate_type, "certificate": pem,
                                 "customData": {"vendorId": VENDOR_ID, "root": k.name, "sha256": k.sha256}})
        else:
            for r in hits:
                hd = {x: r.hash_data[x] for x in ("hashAlgorithm", "issuerNameHash", "issuerKeyHash", "serialNumber")}
                if any(d["certificateHashData"] == hd for d in plan.delete):
                    continue
                plan.delete.append({"certificateHashData": hd,
                                    "customData": {"vendorId": VENDOR_ID, "root": k.name, "sha256": k.sha256,
                                                   "reason": k.reason}})
    order = {t: i for i, t in enumerate(ALL_TYPES)}
    plan.install.sort(key=lambda p: (order[p["certificateType"]], p["customData"]["root"]))
    plan.roots = sorted(set(plan.roots))
    return plan


# -- stations ---------------------------------------------------------------------------------------------


def resolve_station(s: Session, p: Principal, identity: str) -> Station:
    """The caller's station (cpo: registered for its organization; admin: registered by anyone).
    Another organization's station is Forbidden; a station nobody registered is UnknownStation."""
    p.require("cpo", "admin")
    st = store.station_named(s, identity, None if p.role == "admin" else p.org)
    if st is not None:
        return st
    if p.role != "admin" and station_claim_of_other(s, p, identity) is not None:
        raise Forbidden(f"station {identity!r} belongs to another organization")
    raise UnknownStation(f"station {identity!r} is not registered for {p.org!r} (POST /v1/stations)")


def plan_for_station(ctx: Context, p: Principal, station_id: str, reported: Sequence[Reported],
                     version: Version) -> Plan:
    """Resolve the station, compute its plan and record what it reported and what it is told to install."""
    with ctx.db.session() as s:
        st = resolve_station(s, p, station_id)
        org = org_named(s, st.org)
    settings = dict(org.settings) if org is not None else {}
    types, inc20, mfr = policy_of(settings, version)
    plan = compute_plan(known_roots(ctx, st.org), reported, version, types=types, iso15118_20=inc20,
                        manufacturer_roots=mfr, station=st.identity, org=st.org)
    record(ctx, plan, reported, actor=p.credential)
    return plan


def record(ctx: Context, plan: Plan, reported: Sequence[Reported], *, actor: str) -> None:
    """Replace the station's row (one per station): its report, the known roots it named, the plan."""
    values: dict[str, Any] = {
        "ocpp_version": plan.version,
        "reported": [{"certificateType": r.certificate_type, "certificateHashData": r.hash_data} for r in reported],
        "roots": plan.roots,
        "install": [{"certificateType": i["certificateType"], **i["customData"]} for i in plan.install],
        "delete": [{**d["certificateHashData"], **d["customData"]} for d in plan.delete],
        "reported_at": utcnow(), "actor": actor[:128],
    }
    for _ in range(2):  # a concurrent first report of the same station: update it instead
        if store.save_report(ctx.db, plan.org, plan.station, values):
            return
    raise Conflict(f"could not record the report of station {plan.station!r}")


# -- roots of other PKIs ----------------------------------------------------------------------------------


def import_root(ctx: Context, certificate_type: str, data: bytes | str, *, org: str | None = None,
                actor: str = "cli") -> TrustedRoot:
    """Import a root of another PKI that CPOs trust (admin only: the CLI, or POST /v1/trusted-roots with an
    admin key). ``org`` None: every CPO; else that CPO only. The certificate must be a self-signed CA."""
    if certificate_type not in ALL_TYPES:
        raise BadRootImport(f"certificateType {certificate_type!r} is not one of {', '.join(ALL_TYPES)}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        cert = (x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else x509.load_der_x509_certificate(raw))
    except ValueError:
        raise BadCSR("not a PEM or DER X.509 certificate") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise BadRootImport("the certificate is not a CA certificate (basicConstraints cA)")
    if cert.issuer != cert.subject:
        raise BadRootImport("the certificate is not a root (its issuer is not its subject)")
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # noqa: BLE001 - InvalidSignature, unsupported algorithm: not a self-signed root
        raise BadRootImport("the certificate's self-signature does not verify") from None
    if cert.not_valid_after_utc <= utcnow():
        raise BadRootImport("the certificate has expired")
    scope = GLOBAL_SCOPE
    with ctx.db.session() as s:
        if org is not None:
            o = org_named(s, org)
            if o is None:
                raise NotFound(f"no organization {org!r}")
            if o.role not in ("cpo", "admin"):
                raise BadRootImport(f"organization {org!r} is a {o.role}: trust stores are a CPO's")
            scope = org
        der = cert.public_bytes(serialization.Encoding.DER)
        sha = hashlib.sha256(der).hexdigest()
        row = store.imported_root(s, scope, sha, certificate_type)
        if row is not None and row.status == "active":
            raise Conflict(f"this {certificate_type} is already imported (id {row.id})")
        if row is None:
            row = TrustedRoot(scope=scope, certificate_type=certificate_type,
                              subject=cert.subject.rfc4514_string()[:512], serial=format(cert.serial_number, "x"),
                              sha256=sha, not_after=cert.not_valid_after_utc, der=der, created_by=actor[:128],
                              created_at=utcnow())
        else:  # imported again after a withdrawal
            row.status, row.withdrawn_at, row.created_by, row.created_at = "active", None, actor[:128], utcnow()
        s.add(row)
        s.flush()
        audit.append(s, audit.Entry(actor=actor, action="truststore.root.import", object=f"import:{row.id}",
                                    details={"type": certificate_type, "scope": scope, "sha256": sha,
                                             "subject": row.subject}))
        s.commit()
        s.refresh(row)
        return row


def withdraw_import(ctx: Context, import_id: int, *, actor: str = "cli") -> TrustedRoot:
    """Withdraw an imported root: plans then delete it from every station that reports it."""
    with ctx.db.session() as s:
        row = s.get(TrustedRoot, import_id)
        if row is None:
            raise NotFound(f"no imported root {import_id}")
        if row.status == "withdrawn":
            raise Conflict(f"imported root {import_id} is already withdrawn")
        row.status, row.withdrawn_at = "withdrawn", utcnow()
        s.add(row)
        audit.append(s, audit.Entry(actor=actor, action="truststore.root.withdraw", object=f"import:{row.id}",
                                    details={"type": row.certificate_type, "scope": row.scope, "sha256": row.sha256}))
        s.commit()
        s.refresh(row)
        return row


def list_imports(ctx: Context, org: str | None = None) -> list[TrustedRoot]:
    """Every import (org None), or those visible to ``org`` (global and its own)."""
    return store.imports(ctx.db, org)


def import_json(r: TrustedRoot) -> dict[str, Any]:
    return {"id": r.id, "scope": "global" if r.scope == GLOBAL_SCOPE else r.scope,
            "certificateType": r.certificate_type, "subject": r.subject, "serial": r.serial.upper(),
            "sha256": r.sha256, "not_after": r.not_after.isoformat(), "status": r.status,
            "created_at": r.created_at.isoformat(),
            "withdrawn_at": r.withdrawn_at.isoformat() if r.withdrawn_at else None}


# -- coverage ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrgCoverage:
    org: str
    stations: int  # registered (/v1/stations)
    reported: int  # with a recorded report
    with_root: int  # whose last report names the root

    @property
    def ratio(self) -> float | None:
        return self.with_root / self.stations if self.stations else None


def coverage_by_org(ctx: Context, sha256: str, org: str | None = None) -> list[OrgCoverage]:
    """How many of each organization's registered stations last reported the root with this SHA-256
    fingerprint (any type), from the recorded reports. Cheap: three grouped COUNTs."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    stations, reported, with_root = store.coverage_counts(ctx.db, sha256, org)
    names = sorted(set(stations) | set(reported))
    return [OrgCoverage(n, int(stations.get(n, 0)), int(reported.get(n, 0)), int(with_root.get(n, 0)))
            for n in names]


def fleet_ratio(per_org: Sequence[OrgCoverage]) -> float | None:
    """Stations reporting the root / registered stations, over every organization; None without stations."""
    total = sum(c.stations for c in per_org)
    return sum(min(c.with_root, c.stations) for c in per_org) / total if total else None


__all__ = ["ALL_TYPES", "INSTALL_TYPES", "KnownRoot", "OrgCoverage", "Plan", "Reported", "UnknownStation",
           "compute_plan", "coverage_by_org", "fleet_ratio", "import_root", "known_roots", "list_imports",
           "plan_for_station", "policy_of", "resolve_station", "withdraw_import"]
