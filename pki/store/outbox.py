"""Storage of the transactional outbox (pki/outbox.py): pending rows out, dispatched marks in."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from pki.store.db import Database, utcnow
from pki.store.models import OutboxEvent

_O = OutboxEvent.__table__  # type: ignore[attr-defined]


def pending(db: Database, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
    """Up to ``limit`` undispatched rows (id, kind, payload), oldest first."""
    with db.engine.connect() as conn:
        rows = conn.execute(select(_O.c.id, _O.c.kind, _O.c.payload).where(_O.c.dispatched_at.is_(None))
                            .order_by(_O.c.id).limit(limit)).all()
    return [(int(r[0]), str(r[1]), r[2]) for r in rows]


def mark_dispatched(db: Database, ids: list[int]) -> None:
    with db.session() as s:
        s.execute(update(_O).where(_O.c.id.in_(ids), _O.c.dispatched_at.is_(None)).values(dispatched_at=utcnow()))
        s.commit()


__all__ = ["mark_dispatched", "pending"]
