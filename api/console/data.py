"""What the console pages show, computed from the store (tenant-scoped by the caller's Principal).

Kept apart from the routes so tests can check the numbers behind a page without HTML.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from api.console.ocsp_bridge import OcspView, responder_status
from pki.context import Context
from pki.store.inventory import COUNT_LIMIT as COUNT_LIMIT  # noqa: PLC0414 - the pages show it
from pki.store.inventory import CertificateFilter, Inventory, ListCursor
from pki.store.models import Certificate, CertificateAuthority

WEEKS = 26

# -- hierarchies ---------------------------------------------------------------------------------------


def safe_key_uri(uri: str | None) -> str:
    """A key location fit to show: a pkcs11: URI without any pin-value / pin-source query attribute
    (RFC 7512 §2.3 allows a PIN in the query; this service never writes one, but never show one)."""
    if not uri:
        return ""
    path, sep, query = uri.partition("?")
    if not sep:
        return path
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not k.lower().startswith("pin-")]
    return path + ("?" + urlencode(kept) if kept else "")


@dataclass
class CANode:
    row: CertificateAuthority
    kind: str  # "root" | "sub-CA" | "issuing CA"
    key_uri: str
    cn: str
    elapsed_pct: float
    bar_x: float  # position of the validity interval on the common time axis (0..100)
    bar_w: float
    issued_valid: int  # valid certificates it issued that the viewer may see
    children: list[CANode] = field(default_factory=list)

    @property
    def days_left(self) -> int:
        return max(0, (self.row.not_after - datetime.now(UTC)).days)


@dataclass
class Tree:
    roots: list[CANode]
    axis_start: datetime
    axis_end: datetime
    now_x: float


def _cn(subject: str) -> str:
    for part in subject.split(","):
        k, _, v = part.partition("=")
        if k.strip().upper() == "CN":
            return v.strip()
    return subject


def hierarchy_tree(ctx: Context, tenant: str | None, now: datetime | None = None) -> Tree:
    now = now or datetime.now(UTC)
    cas, counts = Inventory(ctx.db).cas_and_valid_counts(tenant, now)
    if not cas:
        return Tree([], now, now, 0.0)
    start = min(c.not_before for c in cas)
    end = max(c.not_after for c in cas)
    span = max((end - start).total_seconds(), 1.0)

    def pos(t: datetime) -> float:
        return round(100.0 * (t - start).total_seconds() / span, 2)

    names = {c.name for c in cas}
    kids: dict[str | None, list[CertificateAuthority]] = {}
    for c in cas:
        parent = c.parent if c.parent in names else None
        kids.setdefault(parent, []).append(c)

    def node(c: CertificateAuthority, depth: int) -> CANode:
        life = max((c.not_after - c.not_before).total_seconds(), 1.0)
        elapsed = min(100.0, max(0.0, 100.0 * (now - c.not_before).total_seconds() / life))
        children = [node(k, depth + 1) for k in kids.get(c.name, [])] if depth < 16 else []
        kind = "root" if c.parent is None else ("sub-CA" if children else "issuing CA")
        return CANode(c, kind, safe_key_uri(c.key_uri), _cn(c.subject), round(elapsed, 1), pos(c.not_before),
                      max(0.5, round(pos(c.not_after) - pos(c.not_before), 2)), counts.get(c.name, 0), children)

    order = {"v2g": 0, "mo": 1, "oem": 2, "csms": 3}  # Plug & Charge first, then OCPP / service roots
    roots = sorted(kids.get(None, []), key=lambda c: (order.get(c.hierarchy, 9), c.hierarchy, c.name))
    return Tree([node(r, 0) for r in roots], start, end, pos(now))


# -- certificates --------------------------------------------------------------------------------------

STATUSES = ("valid", "revoked", "hold", "expired")


@dataclass
class CertFilter:
    profile: str = ""
    identifier: str = ""
    status: str = ""
    issuer: str = ""
    expiring_before: date | None = None

    def query(self, **extra: object) -> str:
        q: dict[str, object] = {k: v for k, v in (("profile", self.profile), ("identifier", self.identifier),
                                                  ("status", self.status), ("issuer", self.issuer)) if v}
        if self.expiring_before:
            q["expiring_before"] = self.expiring_before.isoformat()
        q.update({k: v for k, v in extra.items() if v is not None})
        return urlencode(q)


@dataclass
class Listing:
    rows: list[Certificate]
    next_cursor: str | None  # the ``cursor`` parameter of the next page
    total: int  # matches counted, at most COUNT_LIMIT
    more: bool  # the count stopped at COUNT_LIMIT: "10,000+"

    @property
    def total_label(self) -> str:
        return f"{self.total:,}+" if self.more else f"{self.total:,}"


def list_certificates(ctx: Context, tenant: str | None, f: CertFilter, *, cursor: str | None = None,
                      limit: int = 50, now: datetime | None = None) -> Listing:
    """One page, the cursor of the next, and the matches counted up to COUNT_LIMIT (#28 item 3: what a
    page costs does not grow with the number of certificates). A cursor that does not belong to this
    listing (edited, or from another filter) raises ValueError."""
    now = now or datetime.now(UTC)
    # "expired" and "valid" as the console shows them: a stored "valid" past its notAfter is expired.
    q = CertificateFilter(
        tenant=tenant, profile=f.profile, identifier_prefix=f.identifier.strip().upper() if f.identifier else None,
        issuer=f.issuer,
        status="valid" if f.status in ("expired", "valid") else f.status,
        expired_by=now if f.status == "expired" else None, expires_after=now if f.status == "valid" else None,
        expires_before=datetime.combine(f.expiring_before, time(0), tzinfo=UTC) if f.expiring_before else None)
    after = ListCursor.decode(cursor) if cursor else None
    if after is not None and q.order() != "id":
        after.key_value(q.order())  # raises ValueError for a cursor of another order (the filter changed)
    page = Inventory(ctx.db).certificate_page(q, after=after, limit=limit, count_limit=COUNT_LIMIT)
    return Listing(page.rows, page.next.encode() if page.next else None, page.total, page.more)


def visible_profiles(ctx: Context, tenant: str | None) -> list[str]:
    return Inventory(ctx.db).profiles(tenant)


def status_of(row: Certificate, now: datetime | None = None) -> str:
    if row.status == "valid" and row.not_after <= (now or datetime.now(UTC)):
        return "expired"
    return row.status


def _hex(b: bytes) -> str:
    return ":".join(f"{x:02X}" for x in b)


def _names(gns: Any) -> str:
    return ", ".join(f"{type(g).__name__.replace('Name', '')}:{g.value}" for g in gns)


def _ext_value(ext: x509.Extension[Any]) -> str:
    v = ext.value
    if isinstance(v, x509.BasicConstraints):
        limit = f", path length ≤ {v.path_length}" if v.path_length is not None else ""
        return f"CA: {'yes' if v.ca else 'no'}{limit}"
    if isinstance(v, x509.KeyUsage):
        flags = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign"]
        out = [f for f in flags if getattr(v, f)]
        if v.key_agreement:
            out += [f for f in ("encipher_only", "decipher_only") if getattr(v, f)]
        return ", ".join(out) or "(none)"
    if isinstance(v, x509.ExtendedKeyUsage):
        return ", ".join(getattr(o, "_name", o.dotted_string) for o in v)
    if isinstance(v, x509.SubjectKeyIdentifier):
        return _hex(v.digest)
    if isinstance(v, x509.AuthorityKeyIdentifier):
        return _hex(v.key_identifier) if v.key_identifier else "(no key identifier)"
    if isinstance(v, x509.SubjectAlternativeName):
        return _names(v)
    if isinstance(v, x509.AuthorityInformationAccess):
        return ", ".join(f"{getattr(d.access_method, '_name', '') or d.access_method.dotted_string}: "
                         f"{d.access_location.value}" for d in v)
    if isinstance(v, x509.CRLDistributionPoints):
        return ", ".join(_names(dp.full_name or []) for dp in v)
    if isinstance(v, x509.OCSPNoCheck):
        return "present"
    if isinstance(v, x509.CertificatePolicies):
        return ", ".join(p.policy_identifier.dotted_string for p in v)
    if isinstance(v, x509.UnrecognizedExtension):
        return _hex(v.value[:64]) + ("…" if len(v.value) > 64 else "")
    return str(v)[:300]


def _key_desc(cert: x509.Certificate) -> str:
    k = cert.public_key()
    if isinstance(k, ec.EllipticCurvePublicKey):
        return f"EC {k.curve.name} ({k.key_size} bits)"
    if isinstance(k, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(k, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(k, rsa.RSAPublicKey):
        return f"RSA {k.key_size} bits"
    return type(k).__name__


@dataclass
class Decoded:
    subject: str
    issuer_dn: str
    serial_hex: str
    version: str
    not_before: datetime
    not_after: datetime
    public_key: str
    signature_algorithm: str
    sha256: str
    sha1: str
    der_size: int
    extensions: list[tuple[str, str, bool, str]]  # (name, oid, critical, value)
    pem: str


def decode(row: Certificate) -> Decoded:
    from pki.issuance import pem

    cert = x509.load_der_x509_certificate(row.der)
    exts = [(getattr(e.oid, "_name", "") or e.oid.dotted_string, e.oid.dotted_string, e.critical, _ext_value(e))
            for e in cert.extensions]
    sig = cert.signature_algorithm_oid
    return Decoded(
        subject=cert.subject.rfc4514_string(), issuer_dn=cert.issuer.rfc4514_string(),
        serial_hex=f"{cert.serial_number:X}", version=cert.version.name,
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, public_key=_key_desc(cert),
        signature_algorithm=getattr(sig, "_name", "") or sig.dotted_string,
        sha256=hashlib.sha256(row.der).hexdigest(), sha1=hashlib.sha1(row.der).hexdigest(),  # noqa: S324 - display
        der_size=len(row.der), extensions=exts, pem=pem(cert),
    )


# -- OCSP status, as the responder answers it -------------------------------------------------------------


def ocsp_status(ctx: Context, row: Certificate) -> OcspView:
    """The status the OCSP responder gives for this certificate (pki.ocsp when it is installed); else
    the responder's rule applied to the database row (valid → good, revoked / hold → revoked)."""
    view = responder_status(ctx, row)
    if view is not None:
        return view
    if row.status in ("revoked", "hold"):
        return OcspView("revoked", "database", row.revocation_reason, row.revoked_at)
    return OcspView("good", "database")


# -- expiry -------------------------------------------------------------------------------------------------


@dataclass
class Expiry:
    start: datetime
    weeks: list[tuple[date, date]]  # [start, end) per week
    profiles: list[str]
    counts: dict[str, list[int]]  # profile → count per week
    totals: list[int]

    @property
    def max_total(self) -> int:
        return max(self.totals) if self.totals else 0

    @property
    def grand_total(self) -> int:
        return sum(self.totals)

    def as_json(self) -> dict[str, Any]:
        return {"weeks": [w[0].isoformat() for w in self.weeks], "counts": self.counts, "totals": self.totals}


def expiry_start(now: datetime) -> datetime:
    return datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)


def expiry(ctx: Context, tenant: str | None, now: datetime | None = None, weeks: int = WEEKS) -> Expiry:
    """Certificates that are not revoked and have not expired yet, by the week they expire in and by
    profile. Week 0 starts today at 00:00 UTC; week i covers [start + 7i days, start + 7(i+1) days)."""
    now = now or datetime.now(UTC)
    start = expiry_start(now)
    bounds = [start + timedelta(weeks=i) for i in range(weeks + 1)]
    counts: dict[str, list[int]] = {}
    for profile, wk, n in Inventory(ctx.db).expiry_weeks(tenant, now, bounds):
        if 0 <= wk < weeks:
            counts.setdefault(profile, [0] * weeks)[wk] += n
    profiles = sorted(counts)
    totals = [sum(counts[p][i] for p in profiles) for i in range(weeks)]
    spans = [(bounds[i].date(), bounds[i + 1].date()) for i in range(weeks)]
    return Expiry(start, spans, profiles, {p: counts[p] for p in profiles}, totals)


def expiry_csv(e: Expiry) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["week_start", "week_end", "total", *e.profiles])
    for i, (a, b) in enumerate(e.weeks):
        w.writerow([a.isoformat(), b.isoformat(), e.totals[i], *[e.counts[p][i] for p in e.profiles]])
    return buf.getvalue()


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    series: int
    profile: str
    week: int
    count: int
    label: str


@dataclass
class Chart:
    width: int
    height: int
    plot_x: int
    plot_y: int
    plot_w: int
    plot_h: int
    bars: list[Bar]
    y_ticks: list[tuple[float, int]]
    x_labels: list[tuple[float, str]]


def expiry_chart(e: Expiry, width: int = 880, height: int = 300) -> Chart:
    """Stacked bars, one per week, one colour class per profile (geometry only; the template draws)."""
    left, top, right, bottom = 48, 12, 12, 44
    pw, ph = width - left - right, height - top - bottom
    n = len(e.weeks)
    slot = pw / n if n else pw
    bw = max(2.0, slot * 0.72)
    ymax = max(1, e.max_total)
    step = _nice_step(ymax)
    top_val = step * -(-ymax // step)
    scale = ph / top_val
    bars: list[Bar] = []
    for i, (a, _) in enumerate(e.weeks):
        y = float(top + ph)
        for si, p in enumerate(e.profiles):
            c = e.counts[p][i]
            if not c:
                continue
            h = c * scale
            y -= h
            bars.append(Bar(round(left + i * slot + (slot - bw) / 2, 2), round(y, 2), round(bw, 2), round(h, 2),
                            si, p, i, c, f"{p}: {c} expiring in the week of {a.isoformat()}"))
    ticks = [(round(top + ph - v * scale, 2), v) for v in range(0, top_val + 1, step)]
    labels = [(round(left + i * slot + slot / 2, 2), e.weeks[i][0].strftime("%d %b")) for i in range(0, n, 4)]
    return Chart(width, height, left, top, pw, ph, bars, ticks, labels)


def _nice_step(ymax: int) -> int:
    for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000):
        if ymax / s <= 6:
            return s
    return 10 ** len(str(ymax // 6))
