"""Storage of the transactional outbox (pki/outbox.py): pending rows out, dispatched marks in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlmodel import Session

from pki.store.db import Database, utcnow
from pki.store.fast import Prepared
from pki.store.models import OutboxEvent

_O = OutboxEvent.__table__  # type: ignore[attr-defined]
_ADD = Prepared(insert(_O).values(kind=bindparam("b_kind"), payload=bindparam("b_payload", type_=_O.c.payload.type),
                                  created_at=bindparam("b_created_at", type_=_O.c.created_at.type)))


_BATCH = "v2gpki.outbox.batch"  # Session.info key: rows held by batched()


def add(s: Session, kind: str, payload: dict[str, Any]) -> None:
    """An event row in the caller's transaction ``s`` (committed with it, or not at all): one prepared
    INSERT, sent now — or, inside :func:`batched`, held and sent with the others in one statement. As an
    ORM object it was flushed at commit, which cost about as much as the rest of a single revocation's
    statements (bench/results/2026-12-08-contract-supersede.md)."""
    row = {"b_kind": kind, "b_payload": payload, "b_created_at": utcnow()}
    held = s.info.get(_BATCH)
    if held is not None:
        held.append(row)
        return
    if s.new or s.dirty or s.deleted:
        s.flush()  # rows the caller added before this one are written before it, as the ORM would
    _ADD.execute(s.connection(), row)


@contextmanager
def batched(s: Session) -> Iterator[None]:
    """The rows :func:`add` gets inside the block go to the database as ONE executemany when it ends (a
    bulk revocation's thousand events per batch: one round trip per row cost the drill twice its time)."""
    held: list[dict[str, Any]] = []
    s.info[_BATCH] = held
    try:
        yield
    finally:
        s.info.pop(_BATCH, None)
    if held:
        if s.new or s.dirty or s.deleted:
            s.flush()
        _ADD.execute(s.connection(), held)


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


def backlog(db: Database) -> tuple[int, datetime | None]:
    """How many rows wait for dispatch, and when the oldest was written (aware UTC; None if none)."""
    with db.session() as s:
        count, oldest = s.execute(select(func.count(), func.min(_O.c.created_at))
                                  .where(_O.c.dispatched_at.is_(None))).one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return int(count or 0), oldest


__all__ = ["add", "backlog", "batched", "mark_dispatched", "pending"]
