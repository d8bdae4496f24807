"""Trust-store distribution as the API and the console read it: published trust-store versions, their
deliveries to subscribers, and expiry alerts (tables of pki/store/models_lifecycle.py).
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, inspect
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select

from pki.store.audit_log import Entry, append
from pki.store.db import Database
from pki.store.errors import StorageError
from pki.store.models import Certificate, CertificateAuthority, Organization
from pki.store.models_lifecycle import Delivery, ExpiryAlert, Subscription, TrustStoreVersion

TABLES = ("truststore_version", "delivery", "expiry_alert", "subscription")


@dataclass
class DistributionOverview:
    """The console's trust-list page: small columns of the versions (never the signed bundle), the newest
    deliveries with their subscriptions, the newest expiry alerts."""

    latest: list[Any] = field(default_factory=list)  # newest version per store: (store, version, sha256, ...)
    versions: list[Any] = field(default_factory=list)  # the most recent versions, all stores
    deliveries: list[Delivery] = field(default_factory=list)
    subscriptions: dict[int, Subscription] = field(default_factory=dict)  # of those deliveries, by id
    alerts: list[ExpiryAlert] = field(default_factory=list)


class Subscriptions:
    def __init__(self, db: Database) -> None:
        self.db = db

    def tables_exist(self) -> bool:
        """Whether the lifecycle workers' tables are there (False too when the database cannot be read)."""
        try:
            names = set(inspect(self.db.engine).get_table_names())
        except SQLAlchemyError:
            return False
        return all(t in names for t in TABLES)

    def truststore_versions(self, store: str) -> list[TrustStoreVersion]:
        """Every published version of one trust store, newest first."""
        with self.db.session() as s:
            return list(s.exec(select(TrustStoreVersion).where(TrustStoreVersion.store == store)
                               .order_by(col(TrustStoreVersion.version).desc())))

    def deliveries_of(self, event_key: str, org: str | None) -> list[tuple[Delivery, Subscription]]:
        """The deliveries of one event with their subscriptions, oldest first; ``org``: that tenant's only."""
        stmt = select(Delivery, Subscription).where(Delivery.event_key == event_key,
                                                    Delivery.subscription_id == Subscription.id)
        if org is not None:
            stmt = stmt.where(Subscription.org == org)
        with self.db.session() as s:
            return [(d, sub) for d, sub in s.exec(stmt.order_by(col(Delivery.id)))]

    def overview(self, tenant: str | None, limit: int) -> DistributionOverview:
        """Raises StorageError when the tables cannot be read."""
        out = DistributionOverview()
        tv: Any = TrustStoreVersion  # class attributes as SQL columns (sqlmodel types them as values)
        try:
            with self.db.session() as s:
                cols = (tv.store, tv.version, tv.content_sha256, tv.reason, tv.issued_at, tv.next_update)
                out.versions = list(s.execute(sa_select(*cols).order_by(col(tv.issued_at).desc(), col(tv.id).desc())
                                              .limit(limit)))
                newest = sa_select(tv.store, func.max(tv.version).label("v")).group_by(tv.store).subquery()
                out.latest = list(s.execute(sa_select(*cols).join(newest, and_(tv.store == newest.c.store,
                                                                                 tv.version == newest.c.v))
                                            .order_by(col(tv.store))))
                dstmt = select(Delivery).order_by(col(Delivery.id).desc()).limit(limit)
                if tenant is not None:
                    dstmt = dstmt.where(Delivery.org == tenant)
                out.deliveries = list(s.exec(dstmt))
                ids = {x.subscription_id for x in out.deliveries if x.subscription_id}
                if ids:
                    out.subscriptions = {x.id: x for x in s.exec(select(Subscription)
                                                                   .where(col(Subscription.id).in_(ids)))
                                         if x.id is not None}
                astmt = select(ExpiryAlert).order_by(col(ExpiryAlert.id).desc()).limit(limit)
                if tenant is not None:
                    astmt = astmt.where(ExpiryAlert.tenant == tenant)
                out.alerts = list(s.exec(astmt))
        except SQLAlchemyError as exc:
            raise StorageError(f"the workers' tables could not be read ({type(exc).__name__})") from exc
        return out


__all__ = ["DistributionOverview", "Subscriptions", "TABLES"]


# -- the lifecycle's subscriber lookups (pki/lifecycle.py, pki/trustlist.py) ----------------------------------


def subscribers(s: Session, event: str) -> dict[str | None, list[Subscription]]:
    """Active subscriptions to ``event``, by org; tenant-less events go to the admin organizations. A
    disabled (OPCP ``status``) or one-shot subscription is not matched."""
    subs = [r for r in s.exec(select(Subscription).where(Subscription.deleted_at == None))  # noqa: E711
            if event in (r.events or []) and not is_inactive(r)]
    admins = {o.name for o in s.exec(select(Organization).where(Organization.role == "admin"))}
    out: dict[str | None, list[Subscription]] = defaultdict(list)
    for r in subs:
        out[r.org].append(r)
        if r.org in admins:
            out[None].append(r)
    return out


def is_inactive(r: Subscription) -> bool:
    attrs = r.attributes or {}
    return str(attrs.get("status", "enabled")).lower() == "disabled" or bool(attrs.get("oneShot"))


def new_delivery(sub_id: int, org: str | None, event: str, key: str, payload: dict[str, Any],
                 now: datetime) -> dict[str, Any]:
    """A pending delivery row (values for an INSERT) of one event to one subscription."""
    return {"delivery_id": "dlv_" + secrets.token_hex(12), "subscription_id": sub_id, "org": org,
            "event": event, "event_key": key, "payload": payload, "state": "pending", "attempts": 0,
            "next_attempt_at": now, "created_at": now}


# -- trust-list versions (pki/trustlist.py) ------------------------------------------------------------------


def truststore_sources(db: Database, store: str, cross_profile: str,
                       now: datetime) -> tuple[list[CertificateAuthority], set[tuple[str, str]], list[Certificate]]:
    """What one trust store lists, read in one session: the CAs of its hierarchy (by name), the (issuer,
    serial) of those CA certificates revoked or on hold, and the valid cross-certificates they issued."""
    with db.session() as s:
        cas = list(s.exec(select(CertificateAuthority).where(CertificateAuthority.hierarchy == store)
                          .order_by(col(CertificateAuthority.name))))
        revoked = {(r.issuer, r.serial) for r in s.exec(select(Certificate).where(
            col(Certificate.status).in_(["revoked", "hold"]),
            col(Certificate.serial).in_([c.serial for c in cas] or [""])))}
        names = [c.name for c in cas]
        crosses = list(s.exec(select(Certificate).where(
            Certificate.profile == cross_profile, Certificate.status == "valid",
            col(Certificate.issuer).in_(names or [""]), Certificate.not_after > now)))
    return cas, revoked, crosses


def latest_version(db: Database, store: str) -> TrustStoreVersion | None:
    with db.session() as s:
        return s.exec(select(TrustStoreVersion).where(TrustStoreVersion.store == store)
                      .order_by(col(TrustStoreVersion.version).desc())).first()


def version_of(db: Database, store: str, version: int) -> TrustStoreVersion | None:
    with db.session() as s:
        return s.exec(select(TrustStoreVersion).where(TrustStoreVersion.store == store,
                                                      TrustStoreVersion.version == version)).first()


def add_version(db: Database, row: TrustStoreVersion, deliveries: Callable[[Session], list[dict[str, Any]]],
                entry: Entry) -> bool:
    """Store a trust-store version, the delivery rows ``deliveries`` builds in the same transaction (one per
    subscriber) and its audit record, committed together. False (rolled back): a concurrent publisher
    stored this version number first."""
    d = Delivery.__table__  # type: ignore[attr-defined]
    with db.session() as s:
        s.add(row)
        rows = deliveries(s)
        try:
            s.flush()
            if rows:
                s.execute(insert(d), rows)
            append(s, entry)
            s.commit()
        except IntegrityError:
            s.rollback()
            return False
        s.refresh(row)
    return True
