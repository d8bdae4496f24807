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

from sqlalchemy import case, func, literal, or_, text
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select

from pki.store.db import Database
from pki.store.models import Certificate, CertificateAuthority

LIVE = ("valid", "hold")  # not revoked: what a bulk revocation or an expiry forecast counts
_PARTIAL = ("revoked", "hold")  # the statuses with a partial index of their own (a small share of the rows)
COUNT_LIMIT = 10_000  # a listing counts its matches up to this many, never the whole table (#28 item 3)
_MAX_CHAR = 0x10FFFF


def _bytewise(column: Any, sqlite: bool) -> Any:
    """The column compared code point by code point: SQLite's BINARY collation already is; on PostgreSQL
    the database's collation may order "DE*A" and "DE-A" by linguistic rules, so a prefix is only a
    contiguous range under COLLATE "C" — the collation migration 0013's pattern indexes are built with."""
    return column if sqlite else column.collate("C")


def _prefix_range(column: Any, prefix: str) -> ColumnElement[bool]:
    """``column`` starts with ``prefix``, as a range [prefix, prefix') in code point order, where prefix' is
    prefix with its last character incremented: a range an index walks (SQLite's LIKE is case-insensitive
    and uses no BINARY index; PostgreSQL plans LIKE with a bound pattern only in a custom plan)."""
    head = prefix.rstrip(chr(_MAX_CHAR))
    if not head:
        return column >= prefix  # type: ignore[no-any-return]  # only U+10FFFF…: every greater string starts so
    upper = head[:-1] + chr(ord(head[-1]) + 1)
    return (column >= prefix) & (column < upper)  # type: ignore[no-any-return]


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

    def where(self, stmt: Any, *, sqlite: bool = True) -> Any:
        """``stmt`` narrowed to the matching certificates (``sqlite``: the dialect, for the prefix's collation)."""
        if self.tenant is not None:
            stmt = stmt.where(Certificate.tenant == self.tenant)
        if self.status in _PARTIAL:
            # inlined: the partial indexes ix_certificate_revoked_id / ix_certificate_hold_id (migration 0013)
            # serve only a query whose WHERE has their very predicate (SQLite matches terms, not parameters)
            stmt = stmt.where(Certificate.status == literal(self.status, literal_execute=True))
        elif self.status:
            stmt = stmt.where(Certificate.status == self.status)
        if self.profile:
            stmt = stmt.where(Certificate.profile == self.profile)
        if self.identifier:
            stmt = stmt.where(Certificate.identifier == self.identifier)
        if self.identifier_prefix is not None:
            stmt = stmt.where(_prefix_range(_bytewise(col(Certificate.identifier), sqlite), self.identifier_prefix))
        if self.issuer:
            stmt = stmt.where(Certificate.issuer == self.issuer)
        if self.expires_after is not None:
            stmt = stmt.where(Certificate.not_after > self.expires_after)
        if self.expired_by is not None:
            stmt = stmt.where(Certificate.not_after <= self.expired_by)
        if self.expires_before is not None:
            stmt = stmt.where(Certificate.not_after < self.expires_before)
        return stmt

    def order(self) -> str:
        """The key a listing of this filter is ordered by, so that an index both narrows and orders it:
        "identifier" (a prefix), "not_after" (an upper bound on notAfter: expiring before, expired) or "id"."""
        if self.identifier_prefix is not None:
            return "identifier"
        if self.expires_before is not None or self.expired_by is not None:
            return "not_after"
        return "id"


@dataclass(frozen=True)
class ListCursor:
    """Where the next page of a listing starts: after the row with this id (and, when the listing is
    ordered by identifier or notAfter, this sort key). ``encode`` / ``decode``: its form in a URL."""

    id: int
    key: str | None = None  # the identifier, or notAfter in ISO 8601

    @staticmethod
    def after_row(row: Certificate, order: str) -> ListCursor:
        assert row.id is not None
        if order == "identifier":
            return ListCursor(row.id, row.identifier or "")
        if order == "not_after":
            return ListCursor(row.id, row.not_after.isoformat())
        return ListCursor(row.id)

    def key_value(self, order: str) -> Any:
        if self.key is None:
            raise ValueError("this cursor belongs to a listing in id order")
        if order != "not_after":
            return self.key
        at = datetime.fromisoformat(self.key)  # ValueError for anything but ISO 8601
        if at.tzinfo is None:
            raise ValueError("a notAfter cursor names its offset (encode() writes it)")
        return at

    def encode(self) -> str:
        return str(self.id) if self.key is None else f"{self.id}:{self.key}"

    @staticmethod
    def decode(raw: str) -> ListCursor:
        """Raises ValueError for anything :meth:`encode` did not write."""
        head, sep, key = raw.partition(":")
        if not head.isdigit() or len(head) > 19:
            raise ValueError("not a listing cursor")
        return ListCursor(int(head), key if sep else None)


@dataclass(frozen=True)
class CertificatePage:
    rows: list[Certificate]
    next: ListCursor | None
    total: int  # matches counted, at most the count limit
    more: bool  # more than ``total`` match (the count stopped at its limit)


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
        stmt = f.where(select(Certificate).order_by(col(Certificate.id)), sqlite=self.db.is_sqlite)
        if after_id:
            stmt = stmt.where(col(Certificate.id) > after_id)
        with self.db.session() as s:
            return list(s.exec(stmt.limit(limit)))

    def certificate_page(self, f: CertificateFilter, *, after: ListCursor | None = None, limit: int,
                         count_limit: int = COUNT_LIMIT) -> CertificatePage:
        """One page of a listing (the console's), in the order an index of the filter gives, and the
        matches counted up to ``count_limit``: the cost of a page does not grow with the table (#28 item 3).

        The order: with an identifier prefix, by (identifier, id) — the prefix is a range of
        ix_certificate_identifier_c / ix_certificate_tenant_identifier_c; with an upper bound on notAfter
        (expiring before, expired), by (notAfter, id) — ix_certificate_not_after_id /
        ix_certificate_tenant_not_after_id; otherwise by id: the primary key, (tenant, id), (tenant,
        issuer / profile, id), the partial (id) and (tenant, id) indexes of revoked and held certificates.
        The admin's valid, issuing-CA and profile filters walk the primary key and filter, a tenant's valid
        filter (tenant, id) (a page reads ~51 / the filter's share of rows; migrations 0013 and 0015 say
        why those filters have no index of their own: what each index costs a write). The next page
        starts after the last row's key (keyset pagination: no OFFSET, so a deep page costs what the first
        does)."""
        sqlite = self.db.is_sqlite
        base = f.where(select(Certificate), sqlite=sqlite)
        order = f.order()
        key_col: Any = None
        if order == "identifier":
            key_col = _bytewise(col(Certificate.identifier), sqlite)
        elif order == "not_after":
            key_col = col(Certificate.not_after)
        stmt = base
        if after is not None:
            if key_col is None:
                stmt = stmt.where(col(Certificate.id) > after.id)
            else:
                key = after.key_value(order)
                # (key, id) > (k, i) as a range on the key (where the index walk starts) and a filter for
                # the rows of key k already shown: both databases plan it as an index range
                stmt = stmt.where(key_col >= key, or_(key_col > key, col(Certificate.id) > after.id))
        stmt = stmt.order_by(col(Certificate.id)) if key_col is None else stmt.order_by(key_col, col(Certificate.id))
        counted = select(func.count()).select_from(base.with_only_columns(col(Certificate.id))
                                                   .limit(count_limit + 1).subquery())
        # The bounded count rides on the page's own statement (an uncorrelated subquery, evaluated once):
        # one round trip for a page; a separate count only when the page is empty past a cursor.
        with self.db.session() as s:
            got = list(s.execute(stmt.add_columns(counted.scalar_subquery().label("n_matching")).limit(limit + 1)))
            rows: list[Certificate] = [r[0] for r in got]
            if got:
                total = int(got[0][1])
            else:
                total = int(s.exec(counted).one()) if after is not None else 0
        nxt = ListCursor.after_row(rows[limit - 1], order) if len(rows) > limit else None
        return CertificatePage(rows[:limit], nxt, min(total, count_limit), total > count_limit)

    def profiles(self, tenant: str | None) -> list[str]:
        """The profiles of the certificates a tenant (None: anyone) holds, sorted: a loose index scan in
        one statement — a recursive query that seeks ix_certificate_profile /
        ix_certificate_tenant_profile_id once per distinct profile, instead of a DISTINCT that reads every
        row (profiles are a handful; the statement is one round trip, as a page's others are)."""
        scope = "tenant = :tenant AND " if tenant is not None else ""
        sql = text(f"""
            WITH RECURSIVE p(profile) AS (
                SELECT (SELECT profile FROM certificate WHERE {scope}profile IS NOT NULL
                        ORDER BY profile LIMIT 1)
                UNION ALL
                SELECT (SELECT profile FROM certificate WHERE {scope}profile > p.profile
                        ORDER BY profile LIMIT 1)
                FROM p WHERE p.profile IS NOT NULL
            )
            SELECT profile FROM p WHERE profile IS NOT NULL LIMIT 1000""")  # noqa: S608 - no value in the text
        with self.db.session() as s:
            rows = s.execute(sql, {"tenant": tenant} if tenant is not None else {})
            return sorted(str(r[0]) for r in rows)

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


__all__ = ["COUNT_LIMIT", "CertificateFilter", "CertificatePage", "Inventory", "LIVE", "ListCursor", "StatusCounts"]
