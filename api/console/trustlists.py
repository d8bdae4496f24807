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

from pki.context import Context
from pki.orgs import Principal
from pki.store.errors import StorageError
from pki.store.subscriptions import Subscriptions

log = logging.getLogger("v2gpki.console")

_available: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def available(ctx: Context) -> bool:
    """True when the workers' tables exist (checked once per database)."""
    hit = _available.get(ctx.db)
    if hit is None:
        hit = _available[ctx.db] = Subscriptions(ctx.db).tables_exist()
    return hit


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
    out = Overview()
    try:
        got = Subscriptions(ctx.db).overview(p.tenant_filter, limit)
    except StorageError as exc:
        log.warning("trust-list overview failed: %s", exc)
        out.error = "the workers' tables could not be read"
        return out
    out.versions, out.latest, out.alerts = got.versions, got.latest, got.alerts
    for x in got.deliveries:
        su = got.subscriptions.get(x.subscription_id) if x.subscription_id else None
        label = "log" if not x.subscription_id else (
            f"{su.sub_id} ({target_label(su.kind, su.target)})" if su is not None else f"#{x.subscription_id}")
        out.deliveries.append((x, label))
    return out
