"""The audit trail's storage: the append-only, hash-chained log (non-repudiation of data at rest) and the
queries that read it.

Each event's hash = SHA-256(prev_hash || canonical JSON of the event); the chain head sits in one row
that every appender locks, so concurrent processes append in a single order. Events are appended inside
the caller's transaction (so a change and its record commit together); pki/audit.py is the service face
(and pki/audit_sign.py the checkpoints signed by an audit key in the HSM).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from pki.store.db import Database, utcnow
from pki.store.fast import BulkInsert, Prepared
from pki.store.models import AuditCheckpoint, AuditEvent, AuditHead, AuditVerification

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
_GET_HEAD = Prepared(select(_HEAD_TABLE.c.seq, _HEAD_TABLE.c.hash).where(_HEAD_TABLE.c.id == 1))


def _lock_head(conn: Connection) -> tuple[int, str]:
    """The chain head (seq, hash) on SQLite, where the writer already holds the database lock for the rest
    of the transaction (BEGIN IMMEDIATE, pki/store/db.py). PostgreSQL locks it in v2gpki_audit_append."""
    rows: Any = _GET_HEAD.fetch(conn, {})
    if not rows:
        conn.execute(insert(_HEAD_TABLE).values(id=1, seq=0, hash=GENESIS))
        return 0, GENESIS
    return int(rows[0][0]), str(rows[0][1])


def append(session: Session, *entries: Entry) -> None:
    """Append events inside the caller's transaction (so the audit record commits with the change).

    Core statements on the session's connection (see :func:`append_statements`): the ORM unit of work
    for these rows cost more than the rest of an issuance batch."""
    if not entries:
        return
    if session.new or session.dirty or session.deleted:
        session.flush()  # as the ORM query this replaced would have: constraint errors surface here, in order
    append_conn(session.connection(), *entries)


def append_conn(conn: Connection, *entries: Entry) -> None:
    """:func:`append` on a plain connection, inside its transaction."""
    for stmt, params in append_statements(conn, *entries):
        stmt.execute(conn, params)


@dataclass(frozen=True, slots=True)
class _Staged:
    """An event's columns and its canonical JSON split around ``seq`` — the one value that needs the
    chain head: canonical = prefix + str(seq) + suffix."""

    entry: Entry
    details: dict[str, Any]
    prefix: str
    suffix: str


def _stage(entries: tuple[Entry, ...], ts: datetime) -> list[_Staged]:
    """Everything about the events that does not depend on the chain head, computed before the head is
    locked so the lock is held for as little as possible. The canonical form sorts its keys, and "seq"
    and "ts" sort after every other hashed field, so the JSON of the other fields, opened up, is the
    prefix, and "ts" the suffix — byte for byte what :func:`canonical` gives (tests/test_audit_chain.py
    checks the two agree)."""
    suffix = ',"ts":' + json.dumps(ts.isoformat()) + "}"
    staged: list[_Staged] = []
    for e in entries:
        details = e.details or {}
        head = json.dumps({"action": e.action, "actor": e.actor, "details": details, "object": e.object,
                           "org": e.org, "outcome": e.outcome}, sort_keys=True, separators=(",", ":"), default=str)
        staged.append(_Staged(e, details, head[:-1] + ',"seq":', suffix))
    return staged


# PostgreSQL: the chain is extended by the server (v2gpki_audit_append, migration 0004) in the same query
# as the caller's other writes, so the head's row lock is held only while the server runs the function —
# never across a network round trip and the client's Python, where concurrent appenders queued behind it
# (pg_stat_activity during bench/contract.py: ≈ 0.55 backends "idle in transaction" on average).
_PG_APPEND = Prepared(text(
    "SELECT v2gpki_audit_append(CAST(:ts AS timestamptz), CAST(:actor AS text[]), CAST(:org AS text[]), "
    "CAST(:action AS text[]), CAST(:object AS text[]), CAST(:outcome AS text[]), CAST(:details AS text[]), "
    "CAST(:prefix AS text[]), CAST(:suffix AS text[]))"))


def append_statements(conn: Connection, *entries: Entry) -> list[tuple[Prepared, list[dict[str, Any]]]]:
    """The statements that append ``entries`` to the chain, for a caller that sends them together with its
    own writes in this same transaction (one PostgreSQL query, pki/store/fast.run_together).

    On PostgreSQL nothing is locked yet: the server function locks the head when the statement runs. On
    SQLite the head is read now; the writer already holds the database lock (BEGIN IMMEDIATE)."""
    if not entries:
        return []
    ts = utcnow()
    staged = _stage(entries, ts)
    if conn.dialect.name == "postgresql":
        return [(_PG_APPEND, [{
            "ts": ts, "actor": [x.entry.actor for x in staged], "org": [x.entry.org for x in staged],
            "action": [x.entry.action for x in staged], "object": [x.entry.object for x in staged],
            "outcome": [x.entry.outcome for x in staged],
            "details": [json.dumps(x.details, default=str) for x in staged],
            "prefix": [x.prefix for x in staged], "suffix": [x.suffix for x in staged]}])]
    seq, prev = _lock_head(conn)
    rows: list[dict[str, Any]] = []
    for x in staged:
        seq += 1
        e = x.entry
        h = hashlib.sha256(f"{prev}{x.prefix}{seq}{x.suffix}".encode()).hexdigest()
        rows.append({"seq": seq, "ts": ts, "actor": e.actor, "org": e.org, "action": e.action, "object": e.object,
                     "outcome": e.outcome, "details": x.details, "prev_hash": prev, "hash": h})
        prev = h
    return [(_INSERT_EVENTS, rows), (_SET_HEAD, [{"b_seq": seq, "b_hash": prev}])]


@dataclass
class VerifyResult:
    ok: bool
    events: int
    problems: list[str]


def _check_events(events: Iterable[AuditEvent], prev: str, expected_seq: int,
                  problems: list[str]) -> tuple[int, str, int]:
    """Each event's place in the chain and its own hash; (events read, last hash, next expected seq)."""
    count = 0
    for ev in events:
        count += 1
        if ev.seq != expected_seq:
            problems.append(f"event seq {expected_seq} missing (next is {ev.seq}): rows deleted")
        if ev.prev_hash != prev:
            problems.append(f"event {ev.seq}: prev_hash does not match the previous event")
        if chain_hash(ev.prev_hash, ev) != ev.hash:
            problems.append(f"event {ev.seq}: content does not match its hash (edited)")
        prev = ev.hash
        expected_seq = ev.seq + 1
    return count, prev, expected_seq


def _with_head(session: Session, count: int, prev: str, expected_seq: int, problems: list[str]) -> VerifyResult:
    head = session.get(AuditHead, 1)
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev):
        problems.append(f"chain head says seq {head.seq}, log ends at {expected_seq - 1}: tail deleted or edited")
    return VerifyResult(ok=not problems, events=count, problems=problems)


def verify_chain(session: Session) -> VerifyResult:
    problems: list[str] = []
    events = session.exec(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000)  # type: ignore[arg-type]
    count, prev, expected_seq = _check_events(events, GENESIS, 1, problems)
    return _with_head(session, count, prev, expected_seq, problems)


def verify_chain_from(session: Session, seq: int, h: str) -> VerifyResult | None:
    """:func:`verify_chain` from event ``seq`` on, which must still have the hash ``h`` (the last verified
    checkpoint's): one range read of ix_audit_event_seq, however long the log before it. None when event
    ``seq`` is gone or has another hash (the caller then verifies the whole chain)."""
    problems: list[str] = []
    stmt = select(AuditEvent).where(col(AuditEvent.seq) >= seq).order_by(col(AuditEvent.seq))
    events = iter(session.exec(stmt).yield_per(1000))
    first = next(events, None)
    if first is None or first.seq != seq or first.hash != h:
        return None
    if chain_hash(first.prev_hash, first) != first.hash:
        problems.append(f"event {first.seq}: content does not match its hash (edited)")
    count, prev, expected_seq = _check_events(events, h, seq + 1, problems)
    return _with_head(session, count + 1, prev, expected_seq, problems)


def record(db: Database, *entries: Entry) -> None:
    """Append events in a transaction of their own (for events that stand alone: a sign-in, a refused
    form, a failed authentication)."""
    with db.session() as s:
        append(s, *entries)
        s.commit()


# -- checkpoints (pki/audit_sign.py: the head signed by the HSM audit key) --------------------------------

_PG_CHECKPOINT_LOCK = 0x76326770  # pg_advisory_xact_lock key: one checkpointer at a time


def chain_head(db: Database) -> tuple[int, str] | None:
    """(seq, hash) of the chain head, read without a transaction; None before the first event."""
    with db.autocommit.connect() as conn:
        row = conn.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).first()  # type: ignore[call-overload]
    return None if row is None else (int(row[0]), str(row[1]))


def last_checkpoint(db: Database) -> AuditCheckpoint | None:
    """Read without a transaction (on SQLite a session would take the write lock at BEGIN IMMEDIATE)."""
    t = AuditCheckpoint.__table__  # type: ignore[attr-defined]
    with db.autocommit.connect() as conn:
        row = conn.execute(t.select().order_by(t.c.seq.desc()).limit(1)).mappings().first()
    return None if row is None else AuditCheckpoint(**dict(row))


def add_checkpoint(db: Database, cp: AuditCheckpoint, before_commit: Callable[[], None]) -> AuditCheckpoint:
    """Insert a checkpoint under a lock that serialises checkpointers (PostgreSQL: an advisory lock;
    SQLite: BEGIN IMMEDIATE); ``before_commit`` (the external record) runs after the row is flushed and
    before it commits, so a failure leaves no row the external record lacks. When another checkpointer
    stored one at or past this seq first, that one is returned and nothing is written."""
    with db.session() as s:
        if not db.is_sqlite:
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CHECKPOINT_LOCK})
        newer = s.exec(select(AuditCheckpoint).where(col(AuditCheckpoint.seq) >= cp.seq)
                       .order_by(col(AuditCheckpoint.seq).desc())).first()
        if newer is not None:
            s.expunge(newer)
            s.rollback()
            return newer
        s.add(cp)
        s.flush()
        before_commit()
        s.commit()
        s.refresh(cp)
    return cp


@dataclass
class ChainSnapshot:
    """What a verification reads in one session: the chain's own check, the checkpoints, the head,
    and the stored hash at each sequence number asked for. ``from_seq``: the event the chain was
    re-hashed from (0: all of it; else the last verified checkpoint's)."""

    chain: VerifyResult
    checkpoints: list[AuditCheckpoint]
    head: AuditHead | None
    hashes_at: dict[int, str]
    from_seq: int = 0


def snapshot_for_verification(db: Database, extra_seqs: Iterable[int],
                              start: tuple[int, str] | None = None) -> ChainSnapshot:
    """Verify the chain — from ``start`` (seq, hash of the last verified checkpoint) when given and that
    event still has that hash, else all of it — and read the checkpoints, the head and the event hashes
    at every checkpoint's seq and at ``extra_seqs`` (the external record's), in one session."""
    with db.session() as s:
        res = verify_chain_from(s, *start) if start is not None else None
        from_seq = start[0] if res is not None and start is not None else 0
        if res is None:
            res = verify_chain(s)
            if start is not None:
                res.problems.insert(0, f"event {start[0]} no longer has the hash verified at the last verification "
                                       "(deleted or rewritten): the whole chain was verified")
                res.ok = False
        cps = list(s.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq))))
        head = s.get(AuditHead, 1)
        seqs = sorted({c.seq for c in cps} | set(extra_seqs))
        hashes_at: dict[int, str] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            for seq_, h in s.exec(select(AuditEvent.seq, AuditEvent.hash).where(col(AuditEvent.seq).in_(chunk))):
                hashes_at[seq_] = h
    return ChainSnapshot(res, cps, head, hashes_at, from_seq)


def verification_marker(db: Database) -> AuditVerification | None:
    """The last verified checkpoint (pki/audit_sign.py), read without a transaction."""
    t = AuditVerification.__table__  # type: ignore[attr-defined]
    with db.autocommit.connect() as conn:
        row = conn.execute(t.select().where(t.c.id == 1)).mappings().first()
    return None if row is None else AuditVerification(**dict(row))


def advance_verification_marker(db: Database, marker: AuditVerification) -> None:
    """Store ``marker`` unless the stored one is at the same or a later checkpoint (two verifiers may
    finish in either order; the marker only moves forward — a forged one is found by its signature)."""
    with db.session() as s:
        row = s.get(AuditVerification, 1)
        if row is None:
            s.add(AuditVerification(id=1, seq=marker.seq, hash=marker.hash, verified_at=marker.verified_at,
                                    signature=marker.signature))
        elif row.seq < marker.seq:
            row.seq, row.hash, row.verified_at, row.signature = (marker.seq, marker.hash, marker.verified_at,
                                                                 marker.signature)
        else:
            return
        try:
            s.commit()
        except IntegrityError:  # another verifier inserted the row first: its marker stands
            s.rollback()


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


__all__ = ["GENESIS", "AuditLog", "Entry", "VerifyResult", "append", "append_conn", "append_statements", "canonical",
           "chain_hash", "record", "verify_chain", "verify_chain_from"]
