"""Inventory queries: certificates and CAs as the API, the console and the metrics list and count them.

The read side of the storage seam (#23 item 2), as Boulder's storage authority answers its RA and
WFE: callers say what they want (a tenant, a filter, a page), never how to query it. Rows come back as
the SQLModel classes of pki/store/models.py, as plain data; nothing outside pki/store builds a query on
them. Every method opens and closes its own session (one per call), so each page is one consistent read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func
from sqlmodel import col, select

from pki.store.db import Database
from pki.store.models import Certificate, CertificateAuthority

LIVE = ("valid", "hold")  # not revoked: what a bulk revocation or an expiry forecast counts


@dataclass(frozen=True)
class CertificateFilter:
    """Which certificates a listing shows; None / "" leaves a criterion out.

    ``tenant`` scopes to one organization (None: every tenant, for admins and auditors). Times compare
    the stored notAfter: ``expires_after`` (notAfter > t), ``expired_by`` (notAfter ≤ t),
    ``expires_before`` (notAfter < t)."""

    tenant: str | None = None
    status: str = ""
    profile: str = ""
    identifier: str = ""  # exact, as stored (upper case)
    identifier_prefix: str | None = None  # as stored (upper case); LIKE wildcards in it match literally
    issuer: str = ""
    expires_after: datetime | None = None
    expired_by: datetime | None = None
    expires_before: datetime | None = None

    def where(self, stmt: Any) -> Any:
        if self.tenant is not None:
            stmt = stmt.where(Certificate.tenant == self.tenant)
        if self.status:
            stmt = stmt.where(Certificate.status == self.status)
        if self.profile:
            stmt = stmt.where(Certificate.profile == self.profile)
        if self.identifier:
            stmt = stmt.where(Certificate.identifier == self.identifier)
        if self.identifier_prefix is not None:
            stmt = stmt.where(col(Certificate.identifier).startswith(self.identifier_prefix, autoescape=True))
        if self.issuer:
            stmt = stmt.where(Certificate.issuer == self.issuer)
        if self.expires_after is not None:
            stmt = stmt.where(Certificate.not_after > self.expires_after)
        if self.expired_by is not None:
            stmt = stmt.where(Certificate.not_after <= self.expired_by)
        if self.expires_before is not None:
            stmt = stmt.where(Certificate.not_after < self.expires_before)
        return stmt


@dataclass(frozen=True)
class StatusCounts:
    """The console overview's numbers for one tenant (or all)."""

    by_status: dict[str, int]  # stored status → count (expired certificates still count as "valid")
    expiring_soon: int  # valid, notAfter in (now, soon)
    expired: int  # valid by status, notAfter ≤ now
    cas: int


class Inventory:
    """Read-only certificate and CA queries (tenant-scoped where a tenant is given)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- certificates --------------------------------------------------------------------------------------

    def certificate_by_fingerprint(self, sha256_hex: str) -> Certificate | None:
        with self.db.session() as s:
            return s.exec(select(Certificate).where(Certificate.fingerprint == sha256_hex)).first()

    def certificates(self, f: CertificateFilter, *, after_id: int | None = None, limit: int) -> list[Certificate]:
        """Up to ``limit`` certificates in id order, after ``after_id`` (the cursor of the previous page)."""
        stmt = f.where(select(Certificate).order_by(col(Certificate.id)))
        if after_id:
            stmt = stmt.where(col(Certificate.id) > after_id)
        with self.db.session() as s:
            return list(s.exec(stmt.limit(limit)))

    def certificates_and_total(self, f: CertificateFilter, *, after_id: int | None = None,
                               limit: int) -> tuple[list[Certificate], int]:
        """:meth:`certificates` and how many match the filter in all (cursor ignored), in one session."""
        stmt = f.where(select(Certificate))
        with self.db.session() as s:
            total = int(s.exec(select(func.count()).select_from(stmt.subquery())).one())
            if after_id:
                stmt = stmt.where(col(Certificate.id) > after_id)
            rows = list(s.exec(stmt.order_by(col(Certificate.id)).limit(limit)))
        return rows, total

    def profiles(self, tenant: str | None) -> list[str]:
        """The profiles of the certificates a tenant (None: anyone) holds, sorted."""
        stmt = select(Certificate.profile).distinct()
        if tenant is not None:
            stmt = stmt.where(Certificate.tenant == tenant)
        with self.db.session() as s:
            return sorted(str(p) for p in s.exec(stmt))

    def status_counts(self, tenant: str | None, now: datetime, soon: datetime) -> StatusCounts:
        base = select(Certificate.status, func.count()).group_by(Certificate.status)
        n_soon = (select(func.count()).select_from(Certificate).where(Certificate.status == "valid")
                  .where(Certificate.not_after > now).where(Certificate.not_after < soon))
        expired = (select(func.count()).select_from(Certificate).where(Certificate.status == "valid")
                   .where(Certificate.not_after <= now))
        if tenant is not None:
            base = base.where(Certificate.tenant == tenant)
            n_soon = n_soon.where(Certificate.tenant == tenant)
            expired = expired.where(Certificate.tenant == tenant)
        with self.db.session() as s:
            by_status = {str(k): int(n) for k, n in s.exec(base)}
            return StatusCounts(by_status, int(s.exec(n_soon).one()), int(s.exec(expired).one()),
                                int(s.exec(select(func.count()).select_from(CertificateAuthority)).one()))

    def expiry_weeks(self, tenant: str | None, now: datetime, bounds: Sequence[datetime]) -> list[tuple[str, int, int]]:
        """(profile, bucket, count) of the live certificates (valid or on hold) expiring after ``now`` and
        before ``bounds[-1]``; bucket i holds notAfter in [bounds[i], bounds[i+1]) — one GROUP BY."""
        n = len(bounds) - 1
        bucket = case(*[(col(Certificate.not_after) < bounds[i + 1], i) for i in range(n)], else_=n)
        stmt = (select(Certificate.profile, bucket, func.count())
                .where(col(Certificate.status).in_(LIVE))
                .where(Certificate.not_after > now).where(Certificate.not_after < bounds[-1])
                .group_by(Certificate.profile, bucket))
        if tenant is not None:
            stmt = stmt.where(Certificate.tenant == tenant)
        with self.db.session() as s:
            return [(str(p), int(b), int(c)) for p, b, c in s.exec(stmt)]

    def valid_expiring_within(self, now: datetime, days: Sequence[int]) -> list[int]:
        """For each window, the valid certificates with notAfter in [now, now + days): one range scan of
        ix_certificate_not_after_status (not_after, status) for all windows."""
        far = now + timedelta(days=max(days))
        sums = [func.coalesce(func.sum(case((col(Certificate.not_after) < now + timedelta(days=d), 1), else_=0)), 0)
                for d in days]
        with self.db.session() as s:
            row = s.exec(select(*sums).where(col(Certificate.not_after) >= now, col(Certificate.not_after) < far,
                                             Certificate.status == "valid")).one()
        return [int(v or 0) for v in row]

    def issuers_of_live_leaves(self, *, identifier: str = "", subject_like: str = "") -> list[str]:
        """The CAs that issued live (valid or on hold) end-entity certificates matching an identifier
        (exact, as stored) and/or a SQL LIKE pattern on the subject, sorted."""
        stmt = select(Certificate.issuer).where(col(Certificate.status).in_(LIVE))
        if identifier:
            stmt = stmt.where(Certificate.identifier == identifier)
        if subject_like:
            stmt = stmt.where(col(Certificate.subject).like(subject_like))
        with self.db.session() as s:
            return sorted(set(s.exec(stmt.where(col(Certificate.key_uri).is_(None)).distinct())))

    def service_leaves(self, profiles: Sequence[str], now: datetime) -> list[Certificate]:
        """Valid unexpired certificates of these profiles whose key this service holds (key_uri set: CPS,
        OCSP signers), the latest-expiring first."""
        with self.db.session() as s:
            return list(s.exec(select(Certificate).where(
                col(Certificate.profile).in_(list(profiles)), Certificate.status == "valid",
                col(Certificate.key_uri).is_not(None), col(Certificate.not_after) > now
            ).order_by(col(Certificate.not_after).desc())))

    def newest_held_certificate(self, identifier: str, now: datetime) -> Certificate | None:
        """The valid certificate of ``identifier`` whose key this service holds, in its validity now, with
        the latest notBefore (a service's current signing certificate, e.g. the trust-list signer)."""
        with self.db.session() as s:
            return s.exec(select(Certificate).where(
                Certificate.identifier == identifier, Certificate.status == "valid",
                col(Certificate.key_uri).is_not(None), Certificate.not_before <= now, Certificate.not_after > now,
            ).order_by(col(Certificate.not_before).desc(), col(Certificate.id).desc())).first()

    # -- CAs -----------------------------------------------------------------------------------------------

    def cas(self) -> list[CertificateAuthority]:
        """Every CA, oldest first."""
        with self.db.session() as s:
            return list(s.exec(select(CertificateAuthority).order_by(col(CertificateAuthority.id))))

    def ca_by_id(self, ca_id: int) -> CertificateAuthority | None:
        with self.db.session() as s:
            return s.get(CertificateAuthority, ca_id)

    def cas_and_valid_counts(self, tenant: str | None,
                             now: datetime) -> tuple[list[CertificateAuthority], dict[str, int]]:
        """Every CA (oldest first) and, per issuing CA, its valid unexpired certificates a tenant may see."""
        stmt = (select(Certificate.issuer, func.count()).where(Certificate.status == "valid")
                .where(Certificate.not_after > now).group_by(Certificate.issuer))
        if tenant is not None:
            stmt = stmt.where(Certificate.tenant == tenant)
        with self.db.session() as s:
            cas = list(s.exec(select(CertificateAuthority).order_by(col(CertificateAuthority.id))))
            return cas, {str(i): int(n) for i, n in s.exec(stmt)}

    def roots(self, hierarchies: Iterable[str], statuses: Iterable[str], *, valid_at: datetime | None = None,
              ordered: bool = False) -> list[CertificateAuthority]:
        """Root CAs (no parent) of the given hierarchies in the given statuses; ``valid_at``: only those
        whose notAfter is later; ``ordered``: by hierarchy, then name (else in the database's order)."""
        stmt = select(CertificateAuthority).where(
            col(CertificateAuthority.hierarchy).in_(list(hierarchies)), col(CertificateAuthority.parent).is_(None),
            col(CertificateAuthority.status).in_(list(statuses)))
        if valid_at is not None:
            stmt = stmt.where(CertificateAuthority.not_after > valid_at)
        if ordered:
            stmt = stmt.order_by(col(CertificateAuthority.hierarchy), col(CertificateAuthority.name))
        with self.db.session() as s:
            return list(s.exec(stmt))


__all__ = ["CertificateFilter", "Inventory", "LIVE", "StatusCounts"]
