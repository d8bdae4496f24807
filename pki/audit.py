"""Append-only, hash-chained audit log (non-repudiation of data at rest).

Each event's hash = SHA-256(prev_hash || canonical JSON of the event); the chain head sits in one row
that every appender locks, so concurrent processes append in a single order. Checkpoints (the head hash
signed by an audit key in the HSM) make a truncated or rewritten chain detectable too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from pki.store.db import utcnow
from pki.store.fast import BulkInsert, Prepared, first_row
from pki.store.models import AuditEvent, AuditHead

GENESIS = "0" * 64
_EVENT_TABLE: Table = AuditEvent.__table__  # type: ignore[attr-defined]


_HASHED = ("seq", "ts", "actor", "org", "action", "object", "outcome", "details")


def canonical(event: AuditEvent | dict[str, Any]) -> bytes:
    """The hashed form of an event (a stored row, or the column values about to be inserted)."""
    row = event if isinstance(event, dict) else {k: getattr(event, k) for k in _HASHED}
    body = {k: row[k] for k in _HASHED}
    ts = body["ts"]
    body["ts"] = ts.isoformat() if isinstance(ts, datetime) else str(ts)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev: str, event: AuditEvent | dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + canonical(event)).hexdigest()


@dataclass
class Entry:
    actor: str
    action: str
    object: str | None = None
    org: str | None = None
    outcome: str = "success"
    details: dict[str, Any] | None = None


_HEAD_TABLE: Table = AuditHead.__table__  # type: ignore[attr-defined]
_INSERT_EVENTS = BulkInsert(_EVENT_TABLE, ("seq", "ts", "actor", "org", "action", "object", "outcome", "details",
                                           "prev_hash", "hash"))


_SET_HEAD = Prepared(update(_HEAD_TABLE).where(_HEAD_TABLE.c.id == 1)
                     .values(seq=bindparam("b_seq"), hash=bindparam("b_hash")))
_GET_HEAD = {False: Prepared(select(_HEAD_TABLE.c.seq, _HEAD_TABLE.c.hash).where(_HEAD_TABLE.c.id == 1)),
             True: Prepared(select(_HEAD_TABLE.c.seq, _HEAD_TABLE.c.hash).where(_HEAD_TABLE.c.id == 1)
                            .with_for_update())}


def _lock_head(conn: Connection) -> tuple[int, str]:
    """The chain head (seq, hash), locked for the rest of the transaction: SELECT … FOR UPDATE on
    PostgreSQL; on SQLite the writer already holds the database lock (BEGIN IMMEDIATE, pki/store/db.py)."""
    # first_row: on PostgreSQL the driver's BEGIN and this SELECT share one round trip.
    row: Any = first_row(conn, _GET_HEAD[conn.dialect.name == "postgresql"], {})
    if row is None:
        conn.execute(insert(_HEAD_TABLE).values(id=1, seq=0, hash=GENESIS))
        return 0, GENESIS
    return int(row[0]), str(row[1])


def append(session: Session, *entries: Entry) -> list[dict[str, Any]]:
    """Append events inside the caller's transaction (so the audit record commits with the change).

    Core statements on the session's connection (head read/update, one prepared multi-row INSERT): the
    ORM unit of work for these rows cost more than the rest of an issuance batch. Returns the inserted
    column values (seq, hash, ...)."""
    if not entries:
        return []
    if session.new or session.dirty or session.deleted:
        session.flush()  # as the ORM query this replaced would have: constraint errors surface here, in order
    return append_conn(session.connection(), *entries)


def append_conn(conn: Connection, *entries: Entry) -> list[dict[str, Any]]:
    """:func:`append` on a plain connection, inside its transaction."""
    if not entries:
        return []
    rows, statements = prepare_append(conn, *entries)
    for stmt, params in statements:
        stmt.execute(conn, params)
    return rows


def prepare_append(conn: Connection, *entries: Entry) -> tuple[list[dict[str, Any]],
                                                              list[tuple[Prepared, list[dict[str, Any]]]]]:
    """Lock the chain head now and return the events' rows and the statements that write them (event
    INSERT, head UPDATE), for a caller that sends them together with its own writes (one PostgreSQL
    pipeline, pki/issuance.py). They must run in this same transaction."""
    seq, prev = _lock_head(conn)
    rows: list[dict[str, Any]] = []
    ts = utcnow()
    for e in entries:
        seq += 1
        row: dict[str, Any] = {"seq": seq, "ts": ts, "actor": e.actor, "org": e.org, "action": e.action,
                               "object": e.object, "outcome": e.outcome, "details": e.details or {},
                               "prev_hash": prev}
        row["hash"] = prev = chain_hash(prev, row)
        rows.append(row)
    return rows, [(_INSERT_EVENTS, rows), (_SET_HEAD, [{"b_seq": seq, "b_hash": prev}])]


@dataclass
class VerifyResult:
    ok: bool
    events: int
    problems: list[str]


def verify_chain(session: Session) -> VerifyResult:
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    count = 0
    for ev in session.exec(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000):  # type: ignore[arg-type]
        count += 1
        if ev.seq != expected_seq:
            problems.append(f"event seq {expected_seq} missing (next is {ev.seq}): rows deleted")
        if ev.prev_hash != prev:
            problems.append(f"event {ev.seq}: prev_hash does not match the previous event")
        if chain_hash(ev.prev_hash, ev) != ev.hash:
            problems.append(f"event {ev.seq}: content does not match its hash (edited)")
        prev = ev.hash
        expected_seq = ev.seq + 1
    head = session.get(AuditHead, 1)
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev):
        problems.append(f"chain head says seq {head.seq}, log ends at {expected_seq - 1}: tail deleted or edited")
    return VerifyResult(ok=not problems, events=count, problems=problems)
