"""Trust-store distribution as the API and the console read it: published trust-store versions, their
deliveries to subscribers, and expiry alerts (tables of pki/store/models_lifecycle.py).
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, inspect
from sqlalchemy import select as sa_select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from pki.store.db import Database
from pki.store.errors import StorageError
from pki.store.models import Organization
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
