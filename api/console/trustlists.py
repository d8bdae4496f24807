"""Trust-list versions, notification deliveries and expiry alerts of the lifecycle workers — shown only
when their tables exist (pki/store/models_lifecycle.py, migration 0003); a lean installation without the
workers simply has no "Trust lists" page.

Subscription secrets (webhook HMAC keys) are never read here; webhook targets are shown as scheme://host
only (a URL may carry user info or tokens in its path or query).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import and_, func, inspect
from sqlalchemy import select as sa_select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from pki.context import Context
from pki.orgs import Principal

log = logging.getLogger("v2gpki.console")

TABLES = ("truststore_version", "delivery", "expiry_alert", "subscription")
_available: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _models() -> Any:
    try:
        from pki.store import models_lifecycle
    except ImportError:
        return None
    return models_lifecycle


def available(ctx: Context) -> bool:
    """True when the workers' models are installed and their tables exist (checked once per database)."""
    hit = _available.get(ctx.db)
    if hit is not None:
        return hit
    ok = False
    if _models() is not None:
        try:
            names = set(inspect(ctx.db.engine).get_table_names())
            ok = all(t in names for t in TABLES)
        except SQLAlchemyError:
            ok = False
    _available[ctx.db] = ok
    return ok


def target_label(kind: str, target: str) -> str:
    if kind == "webhook":
        u = urlsplit(target)
        return f"{u.scheme}://{u.hostname or '?'}" + (f":{u.port}" if u.port else "")
    if "@" in target:
        user, _, domain = target.partition("@")
        return f"{user[:1]}…@{domain}"
    return kind


@dataclass
class Overview:
    latest: list[Any] = field(default_factory=list)  # newest TrustStoreVersion per store
    versions: list[Any] = field(default_factory=list)  # the most recent versions, all stores
    deliveries: list[tuple[Any, str]] = field(default_factory=list)  # (Delivery, subscription label)
    alerts: list[Any] = field(default_factory=list)
    error: str = ""


def overview(ctx: Context, p: Principal, limit: int = 25) -> Overview:
    m = _models()
    out = Overview()
    if m is None:
        out.error = "the lifecycle workers are not installed"
        return out
    tenant = p.tenant_filter
    try:
        with ctx.db.session() as s:
            tv = m.TrustStoreVersion
            # Only the small columns: the signed bundle, JWS and signer chain stay in the database.
            cols = (tv.store, tv.version, tv.content_sha256, tv.reason, tv.issued_at, tv.next_update)
            out.versions = list(s.execute(sa_select(*cols).order_by(col(tv.issued_at).desc(), col(tv.id).desc())
                                          .limit(limit)))
            newest = sa_select(tv.store, func.max(tv.version).label("v")).group_by(tv.store).subquery()
            out.latest = list(s.execute(sa_select(*cols).join(newest, and_(tv.store == newest.c.store,
                                                                             tv.version == newest.c.v))
                                        .order_by(col(tv.store))))
            d, sub = m.Delivery, m.Subscription
            dstmt = select(d).order_by(col(d.id).desc()).limit(limit)
            if tenant is not None:
                dstmt = dstmt.where(d.org == tenant)
            deliveries = list(s.exec(dstmt))
            ids = {x.subscription_id for x in deliveries if x.subscription_id}
            subs = {x.id: x for x in s.exec(select(sub).where(col(sub.id).in_(ids)))} if ids else {}
            for x in deliveries:
                su = subs.get(x.subscription_id)
                label = "log" if not x.subscription_id else (
                    f"{su.sub_id} ({target_label(su.kind, su.target)})" if su is not None else f"#{x.subscription_id}")
                out.deliveries.append((x, label))
            a = m.ExpiryAlert
            astmt = select(a).order_by(col(a.id).desc()).limit(limit)
            if tenant is not None:
                astmt = astmt.where(a.tenant == tenant)
            out.alerts = list(s.exec(astmt))
    except (SQLAlchemyError, AttributeError) as exc:
        log.warning("trust-list overview failed: %s", exc)
        out.error = "the workers' tables could not be read"
    return out
