"""The lifecycle's storage (pki/lifecycle.py, #23 item 2): subscriptions, webhook and e-mail deliveries,
expiry alerts and their candidate queries, renewals of service-held certificates, and the few CA and
certificate lookups of a root rollover.

Functions that take a Session run in the caller's transaction (``with db.session() as s``) and leave the
commit to it, except where the statement's outcome *is* the commit: the inserts made exactly-once by a
unique constraint (alerts, deliveries, renewals) commit and report a conflict as ``False`` after a
rollback, so the caller never names a database exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, exists, func, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from sqlmodel import select as sm_select

from pki.store.audit_log import chain_head
from pki.store.db import Database
from pki.store.models import AuditEvent, Certificate, CertificateAuthority, Organization, OutboxEvent
from pki.store.models_lifecycle import Delivery, ExpiryAlert, ExpiryScanMark, Renewal, Subscription

_C = Certificate.__table__  # type: ignore[attr-defined]
_A = ExpiryAlert.__table__  # type: ignore[attr-defined]
_D = Delivery.__table__  # type: ignore[attr-defined]
_R = Renewal.__table__  # type: ignore[attr-defined]
_O = OutboxEvent.__table__  # type: ignore[attr-defined]
_M = ExpiryScanMark.__table__  # type: ignore[attr-defined]
_E = AuditEvent.__table__  # type: ignore[attr-defined]

# Candidate row columns, in order: what pki/lifecycle.py's Candidate is built from.
CANDIDATE_COLUMNS = ("id", "issuer", "serial", "profile", "identifier", "tenant", "subject", "not_after", "key_uri")


# -- subscriptions --------------------------------------------------------------------------------------------


def organization_exists(s: Session, name: str) -> bool:
    return s.exec(sm_select(Organization).where(Organization.name == name)).first() is not None


def subscriptions_with_secret(s: Session) -> list[Subscription]:
    """Every subscription (deleted ones too) that keeps an HMAC secret."""
    return list(s.exec(sm_select(Subscription).where(Subscription.secret != None)))  # noqa: E711


def active_subscriptions(s: Session, org: str | None) -> list[Subscription]:
    """Subscriptions not deleted, of ``org`` (every organization's when None), oldest first."""
    stmt = sm_select(Subscription).where(Subscription.deleted_at == None)  # noqa: E711
    if org is not None:
        stmt = stmt.where(Subscription.org == org)
    return list(s.exec(stmt.order_by(col(Subscription.id))))


def active_subscription(s: Session, sub_id: str, org: str | None) -> Subscription | None:
    """The active subscription ``sub_id`` (of ``org`` when given), else None."""
    stmt = sm_select(Subscription).where(Subscription.sub_id == sub_id,
                                         Subscription.deleted_at == None)  # noqa: E711
    if org is not None:
        stmt = stmt.where(Subscription.org == org)
    return s.exec(stmt).first()


def subscription(s: Session, pk: int) -> Subscription | None:
    return s.get(Subscription, pk)


# -- deliveries -----------------------------------------------------------------------------------------------


def subscriptions_delivered(s: Session, subscription_ids: Sequence[int]) -> set[int]:
    """Which of these subscriptions have any delivery at all (a one-shot subscription gets one)."""
    if not subscription_ids:
        return set()
    stmt = select(_D.c.subscription_id).where(_D.c.subscription_id.in_(list(subscription_ids)))
    return {r[0] for r in s.execute(stmt)}


def subscriptions_with_event(s: Session, event_key: str) -> set[int]:
    """Subscriptions that have a delivery of the event ``event_key`` already."""
    return {r[0] for r in s.execute(select(_D.c.subscription_id).where(_D.c.event_key == event_key))}


def insert_deliveries(s: Session, rows: Sequence[dict[str, Any]]) -> bool:
    """INSERT the delivery rows and COMMIT; False (rolled back) if one existed already — (subscription,
    event_key) is unique, so a concurrent run that inserted them first leaves them there once."""
    try:
        s.execute(insert(_D), list(rows))
        s.commit()
    except IntegrityError:
        s.rollback()
        return False
    return True


def pending_delivery_ids(s: Session, keys: Iterable[str]) -> list[int]:
    keys = list(keys)
    if not keys:
        return []
    return [r[0] for r in s.execute(select(_D.c.id).where(_D.c.event_key.in_(keys), _D.c.state == "pending"))]


def due_deliveries(db: Database, now: datetime, limit: int) -> list[int]:
    """Pending deliveries whose next attempt is due and that no worker holds (ix_delivery_state_next)."""
    with db.engine.connect() as conn:
        return [r[0] for r in conn.execute(
            select(_D.c.id).where(_D.c.state == "pending", _D.c.next_attempt_at <= now,
                                  or_(_D.c.lease_until.is_(None), _D.c.lease_until < now))
            .order_by(_D.c.next_attempt_at).limit(limit))]


def claim_delivery(s: Session, pk: int, now: datetime, lease_until: datetime) -> bool:
    """The guarded UPDATE that takes a due, unleased delivery for one attempt (lease, attempts + 1);
    False when another worker holds it, it is not due or not pending. The caller commits."""
    res = s.execute(
        update(_D).where(_D.c.id == pk, _D.c.state == "pending", _D.c.next_attempt_at <= now,
                         or_(_D.c.lease_until.is_(None), _D.c.lease_until < now))
        .values(lease_until=lease_until, attempts=_D.c.attempts + 1))
    return bool(res.rowcount)  # type: ignore[attr-defined]


def delivery(s: Session, pk: int) -> Delivery | None:
    return s.get(Delivery, pk)


def finish_delivery(s: Session, pk: int | None, values: dict[str, Any]) -> None:
    """Record an attempt's outcome on a delivery still pending (a finished one is left as it is)."""
    s.execute(update(_D).where(_D.c.id == pk, _D.c.state == "pending").values(**values))


# -- expiry alerts --------------------------------------------------------------------------------------------


def candidate_query(now: datetime, windows: Sequence[int], include: list[str] | None, exclude: list[str],
                    tenant: str | None = None, *, by_not_after: bool | None = None) -> Select[Any]:
    """Certificates of one window group inside a window with no alert for that window yet. The window is
    computed in SQL (CASE over notAfter), so the anti-join on (cert_id, window_days) uses the unique index.
    Columns: CANDIDATE_COLUMNS, then the window ``w``.

    ``by_not_after``: whether the planner may walk the notAfter index (default: for the default group
    only). A named-profile group (CAs, service keys) is a handful of rows found by the profile index; its
    windows span years, so a notAfter range would walk most of the table; the incremental scan's change
    queries start from another index (created_at, revoked_at, the identifier). The expression
    ``coalesce(not_after, not_after)`` keeps the planner off the notAfter index (on SQLite too, which has
    no index hints)."""
    c, n = _C, _C.alias("newer")
    asc = sorted(windows)
    w = case(*[(c.c.not_after <= now + timedelta(days=d), d) for d in asc], else_=None)
    if by_not_after is None:
        by_not_after = include is None
    na = c.c.not_after if by_not_after else _unindexed(c.c.not_after)
    stmt = (
        select(*[c.c[k] for k in CANDIDATE_COLUMNS], w.label("w"))
        .where(na > now, na <= now + timedelta(days=asc[-1]), c.c.status == "valid")
        .where(~exists().where(_A.c.cert_id == c.c.id, _A.c.window_days == w))
        # A certificate already replaced (same identifier and profile, later expiry, valid) needs no alert.
        # Found by the identifier index: the profile, compared through an expression, cannot lead SQLite
        # (without statistics) to walk every certificate of the profile instead.
        .where(~exists().where(n.c.identifier == c.c.identifier, _unindexed(n.c.profile) == c.c.profile,
                               n.c.status == "valid", n.c.not_after > c.c.not_after))
    )
    if include is not None:
        stmt = stmt.where(c.c.profile.in_(include))
    if exclude:
        stmt = stmt.where(c.c.profile.not_in(exclude))
    if tenant is not None:
        stmt = stmt.where(c.c.tenant == tenant)
    return stmt


def _unindexed(column: Any) -> Any:
    """The column's value through an expression no index matches (the planner then leads with another)."""
    return func.coalesce(column, column)


def candidate_rows(db: Database, now: datetime, windows: Sequence[int], include: list[str] | None,
                   exclude: list[str], tenant: str | None, chunk: int,
                   ranges: Sequence[tuple[datetime, datetime]] | None = None) -> Iterable[list[Any]]:
    """The candidates of one window group, in chunks: keyset pagination on (notAfter, id), so the
    (not_after, status) index drives the range scan and memory stays bounded by the chunk.

    ``ranges``: only certificates with notAfter in one of these (lo, hi] intervals (disjoint; the
    incremental scan's "entered a window since the last scan"), each walked on the notAfter index
    whatever the group."""
    if ranges is None:
        base = candidate_query(now, windows, include, exclude, tenant)
        if include is not None:  # a named-profile group: few rows, no ORDER BY (it would pull in the notAfter index)
            with db.engine.connect() as conn:
                rows = conn.execute(base).all()
            for i in range(0, len(rows), chunk):
                yield list(rows[i:i + chunk])
            return
        yield from _keyset(db, base, chunk)
        return
    for lo, hi in ranges:
        yield from _keyset(db, crossing_query(now, windows, include, exclude, tenant, lo, hi), chunk)


def crossing_query(now: datetime, windows: Sequence[int], include: list[str] | None, exclude: list[str],
                   tenant: str | None, lo: datetime, hi: datetime) -> Select[Any]:
    """Candidates with notAfter in (lo, hi]. The group's own bounds (now, now + largest window] stay, but
    through the expression no index matches: the planner (SQLite's takes one pair of bounds for the range)
    then walks only (lo, hi] of the notAfter index, not the whole window — years, for a root's group."""
    return (candidate_query(now, windows, include, exclude, tenant, by_not_after=False)
            .where(_C.c.not_after > lo, _C.c.not_after <= hi))


def _keyset(db: Database, base: Select[Any], chunk: int) -> Iterable[list[Any]]:
    last: tuple[datetime, int] | None = None
    while True:
        stmt = base
        if last is not None:  # the plain bound lets the index range start at the last row, not at `now`
            stmt = stmt.where(_C.c.not_after >= last[0], tuple_(_C.c.not_after, _C.c.id) > tuple_(last[0], last[1]))
        stmt = stmt.order_by(_C.c.not_after, _C.c.id).limit(chunk)
        with db.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        if not rows:
            return
        last = (rows[-1][7], rows[-1][0])
        yield list(rows)
        if len(rows) < chunk:
            return


# -- the incremental expiry scan (#28 item 3) ------------------------------------------------------------------
#
# Besides time (a notAfter entering a window: candidate_rows with ``ranges``), a certificate becomes a
# candidate when it is created inside a window (a short-lived certificate, a late import), when the
# later certificate that replaced it is revoked or put on hold (it is no longer replaced), or when its own
# hold is released (removeFromCRL clears revoked_at, so that trace is the audit trail's
# certificate.release_hold event, appended in the same transaction). The three change queries below find
# them from their own index, never from a range that grows with the fleet.

RELEASE_ACTION = "certificate.release_hold"  # pki/issuance.py Engine.release_hold


def created_query(now: datetime, windows: Sequence[int], include: list[str] | None, exclude: list[str],
                  tenant: str | None, since: datetime) -> Select[Any]:
    """Candidates created after ``since`` (ix_certificate_created_at)."""
    return candidate_query(now, windows, include, exclude, tenant, by_not_after=False).where(_C.c.created_at > since)


def unreplaced_query(now: datetime, windows: Sequence[int], include: list[str] | None, exclude: list[str],
                     tenant: str | None, since: datetime) -> Select[Any]:
    """Candidates whose later certificate (same identifier and profile) was revoked or put on hold after
    ``since``: from ix_certificate_revoked_at to the identifier index."""
    r = _C.alias("gone")
    return (candidate_query(now, windows, include, exclude, tenant, by_not_after=False)
            .join(r, and_(r.c.identifier == _C.c.identifier, r.c.profile == _unindexed(_C.c.profile)))
            .where(r.c.revoked_at > since, r.c.not_after > _C.c.not_after))


def released_query(after_seq: int) -> Select[Any]:
    """The objects ("issuer/serial") of the holds released after audit event ``after_seq``."""
    return select(_E.c.object).where(_E.c.action == RELEASE_ACTION, _E.c.seq > after_seq)


def _released(conn: Any, after_seq: int) -> list[tuple[str, str]]:
    out = []
    for (obj,) in conn.execute(released_query(after_seq)):
        issuer, _, serial = str(obj or "").rpartition("/")
        if issuer and serial:
            out.append((issuer, serial))
    return out


def changed_count(db: Database, since: datetime, after_seq: int, cap: int) -> int:
    """How many certificates were created, revoked or put on hold since ``since`` plus holds released
    after ``after_seq``, counted up to ``cap + 1`` on each index (the caller scans fully past ``cap``)."""
    with db.engine.connect() as conn:
        n = 0
        for cond in (_C.c.created_at > since, _C.c.revoked_at > since):
            sub = select(_C.c.id).where(cond).limit(cap + 1).subquery()
            n += int(conn.execute(select(func.count()).select_from(sub)).scalar_one())
        return n + len(_released(conn, after_seq))


def changed_rows(db: Database, now: datetime, windows: Sequence[int], include: list[str] | None,
                 exclude: list[str], tenant: str | None, since: datetime, after_seq: int) -> list[Any]:
    """Candidates of one window group that changed since the last scan without crossing a window boundary
    (created, no longer replaced, hold released); a certificate may come more than once."""
    with db.engine.connect() as conn:
        rows = list(conn.execute(created_query(now, windows, include, exclude, tenant, since)))
        rows += list(conn.execute(unreplaced_query(now, windows, include, exclude, tenant, since)))
        released = _released(conn, after_seq)
        for i in range(0, len(released), 400):  # bound one statement's parameters (SQLite's limit)
            part = released[i:i + 400]
            cond: ColumnElement[bool] = or_(*[and_(_C.c.issuer == iss, _C.c.serial == ser) for iss, ser in part])
            rows += list(conn.execute(candidate_query(now, windows, include, exclude, tenant, by_not_after=False)
                                      .where(cond)))
    return rows


def audit_seq(db: Database) -> int:
    """The audit chain's head (its events are appended under one lock, so every event up to it has
    committed and every later one will have a higher seq)."""
    head = chain_head(db)
    return 0 if head is None else head[0]


def scan_mark(db: Database, scope: str) -> ExpiryScanMark | None:
    with db.session() as s:
        return s.get(ExpiryScanMark, scope)


def save_scan_mark(db: Database, mark: ExpiryScanMark) -> None:
    """Insert or replace the mark of ``mark.scope`` (concurrent scanners: the last to finish writes; each
    writes only what its own complete scan covered, so any of them is a correct starting point)."""
    values = {k: getattr(mark, k) for k in ("scope", "policy_sha256", "scanned_now", "changes_at", "audit_seq",
                                            "was_full", "updated_at")}
    ins = (postgresql.insert(_M) if db.engine.dialect.name == "postgresql" else sqlite.insert(_M)).values(**values)
    stmt = ins.on_conflict_do_update(index_elements=[_M.c.scope],
                                     set_={k: v for k, v in values.items() if k != "scope"})
    with db.engine.begin() as conn:
        conn.execute(stmt)


def commit_alerts(s: Session, alerts: Sequence[dict[str, Any]], deliveries: Sequence[dict[str, Any]]) -> bool:
    """INSERT the alerts and their deliveries and COMMIT them together; False (rolled back) when a
    concurrent scanner recorded one of the same (cert, window) first (uq_expiry_alert_cert_window)."""
    try:
        if alerts:
            s.execute(insert(_A), list(alerts))
        if deliveries:
            s.execute(insert(_D), list(deliveries))
        s.commit()
    except IntegrityError:
        s.rollback()
        return False
    return True


def alerted(s: Session, cert_ids: Sequence[int]) -> set[tuple[int, int]]:
    """(cert_id, window_days) of the alerts recorded for these certificates."""
    ids = list(cert_ids)
    out: set[tuple[int, int]] = set()
    for i in range(0, len(ids), 900):  # bound one statement's parameters (SQLite's limit)
        out |= {(r[0], r[1]) for r in s.execute(
            select(_A.c.cert_id, _A.c.window_days).where(_A.c.cert_id.in_(ids[i:i + 900])))}
    return out


# -- renewal of service-held certificates ------------------------------------------------------------------


def renewable_certificates(db: Database, now: datetime) -> list[Certificate]:
    """Valid, unexpired certificates of service-held keys that no later valid certificate of the same
    identifier and profile replaces and no finished renewal names."""
    c, n = _C, _C.alias("newer")
    with db.session() as s:
        return list(s.exec(
            sm_select(Certificate).where(
                Certificate.key_uri != None, Certificate.status == "valid",  # noqa: E711
                Certificate.not_after > now,
                ~exists().where(n.c.identifier == c.c.identifier, n.c.profile == c.c.profile,
                                n.c.status == "valid", n.c.not_after > c.c.not_after),
                ~exists().where(_R.c.old_cert_id == c.c.id, _R.c.state == "done"))))


def start_renewal(db: Database, old: Certificate, new_key_uri: str, now: datetime) -> Renewal:
    """The renewal row of ``old``: inserted as pending unless one exists (uq_renewal_old_cert), then read."""
    with db.session() as s:
        try:
            s.execute(insert(_R).values(old_cert_id=old.id, identifier=old.identifier, new_key_uri=new_key_uri,
                                        state="pending", created_at=now))
            s.commit()
        except IntegrityError:  # a renewal of this certificate was started before: it is the one
            s.rollback()
        return s.exec(sm_select(Renewal).where(Renewal.old_cert_id == old.id)).one()


def certificate_of_key(db: Database, key_uri: str, identifier: str | None) -> Certificate | None:
    """A certificate already issued for this key and identifier (a renewal interrupted after issuance)."""
    with db.session() as s:
        return s.exec(sm_select(Certificate).where(Certificate.key_uri == key_uri,
                                                   Certificate.identifier == identifier)).first()


def finish_renewal(s: Session, old_cert_id: int | None, new_serial: str, at: datetime) -> None:
    s.execute(update(_R).where(_R.c.old_cert_id == old_cert_id).values(state="done", new_serial=new_serial,
                                                                         completed_at=at))


# -- root rollover --------------------------------------------------------------------------------------------


def ca_names(db: Database) -> set[str]:
    with db.session() as s:
        return {r.name for r in s.exec(sm_select(CertificateAuthority))}


def valid_certificate_of(db: Database, identifier: str) -> Certificate | None:
    """A valid certificate with this identifier (a cross-certificate issued by an interrupted rollover)."""
    with db.session() as s:
        return s.exec(sm_select(Certificate).where(Certificate.identifier == identifier,
                                                   Certificate.status == "valid")).first()


# -- small queries for the API / CLI --------------------------------------------------------------------------


def outbox_backlog(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(_O).where(_O.c.dispatched_at.is_(None))).scalar_one())


__all__ = [
    "CANDIDATE_COLUMNS", "RELEASE_ACTION", "active_subscription", "active_subscriptions", "alerted", "audit_seq",
    "ca_names", "candidate_query", "candidate_rows", "certificate_of_key", "changed_count", "changed_rows",
    "claim_delivery", "commit_alerts", "created_query", "crossing_query", "delivery", "due_deliveries",
    "finish_delivery", "finish_renewal", "insert_deliveries", "organization_exists", "outbox_backlog",
    "pending_delivery_ids", "released_query", "renewable_certificates", "save_scan_mark", "scan_mark",
    "start_renewal", "subscription", "subscriptions_delivered", "subscriptions_with_event",
    "subscriptions_with_secret", "unreplaced_query", "valid_certificate_of"
]
