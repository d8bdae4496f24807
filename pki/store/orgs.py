"""Organizations and API keys: the rows pki/orgs.py (tenancy, API-key authentication) and pki/oauth.py
(client credentials) read and write. Functions taking a Session run in the caller's transaction, so a
change and its audit record commit together.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import event, text
from sqlmodel import Session, select

from pki.store.db import Database
from pki.store.models import ApiKey, Organization

ORG_CREATION_LOCK = 152117  # an arbitrary constant key for PostgreSQL's advisory lock


def lock_org_creation(s: Session) -> None:
    """On PostgreSQL, one organization creation at a time (a transaction-scoped advisory lock), so two
    concurrent creations cannot both pass the overlap check. SQLite has one writer at a time anyway."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text(f"SELECT pg_advisory_xact_lock({ORG_CREATION_LOCK})"))


def org_named(s: Session, name: str) -> Organization | None:
    return s.exec(select(Organization).where(Organization.name == name)).first()


def orgs_with_role(s: Session, role: str) -> list[Organization]:
    return list(s.exec(select(Organization).where(Organization.role == role)))


def org_by_name(db: Database, name: str) -> Organization | None:
    with db.session() as s:
        return org_named(s, name)


def org_names_with_role(db: Database, role: str) -> list[str]:
    with db.session() as s:
        return [str(n) for n in s.exec(select(Organization.name).where(Organization.role == role))]


def all_orgs(db: Database) -> list[Organization]:
    """Every organization, by name."""
    with db.session() as s:
        return list(s.exec(select(Organization).order_by(Organization.name)))  # type: ignore[arg-type]


def api_key(s: Session, key_id: str) -> ApiKey | None:
    return s.exec(select(ApiKey).where(ApiKey.key_id == key_id)).first()


def on_change(callback: Callable[..., None]) -> None:
    """Call ``callback`` whenever an API key or organization row is inserted, updated or deleted through
    this process (cache invalidation: SQLAlchemy mapper events)."""
    for model in (ApiKey, Organization):
        for ev in ("after_insert", "after_update", "after_delete"):
            event.listen(model, ev, callback)


__all__ = ["all_orgs", "api_key", "org_by_name", "lock_org_creation", "on_change", "org_named", "org_names_with_role",
           "orgs_with_role"]
