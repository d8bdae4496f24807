"""Reading the audit trail: pages for the API and the console, and the console's sign-out check.

Appending stays with pki/audit.py's chain logic (inside the caller's transaction, so a change and its
record commit together); these queries only read committed events, each in a session of its own.
"""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import col, select

from pki.store.db import Database
from pki.store.models import AuditEvent


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def has_event(self, action: str, obj: str) -> bool:
        """Whether any event records this action on this object (e.g. a console session signed out)."""
        with self.db.session() as s:
            return s.exec(select(AuditEvent.id).where(AuditEvent.action == action,
                                                      AuditEvent.object == obj).limit(1)).first() is not None

    def newest_first(self, *, before: int | None = None, limit: int) -> list[AuditEvent]:
        """Up to ``limit`` events, newest first, with seq < ``before`` when given."""
        stmt = select(AuditEvent).order_by(col(AuditEvent.seq).desc())
        if before:
            stmt = stmt.where(AuditEvent.seq < before)
        with self.db.session() as s:
            return list(s.exec(stmt.limit(limit)))

    def after(self, seq: int, *, limit: int) -> tuple[list[AuditEvent], int]:
        """Up to ``limit`` events with seq > ``seq`` in chain order, and the number of events in all."""
        with self.db.session() as s:
            rows = list(s.exec(select(AuditEvent).where(AuditEvent.seq > seq).order_by(col(AuditEvent.seq))
                               .limit(limit)))
            total = int(s.exec(select(func.count()).select_from(AuditEvent)).one())
        return rows, total


__all__ = ["AuditLog"]
