"""The audit chain's append paths agree with its verifier.

Events are staged before the chain head is locked (their canonical JSON split around ``seq``), and on
PostgreSQL the server extends the chain (v2gpki_audit_append, migration 0004). Both must produce exactly
the hash that ``pki.audit.chain_hash`` — what `v2gpki audit verify` recomputes — gives for the stored row.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import select

from pki import audit
from pki.context import Context
from pki.store.models import AuditEvent, AuditHead

_text = st.text(max_size=40)  # any Unicode, quotes, backslashes, control characters
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(actor=_text, org=st.none() | _text, action=_text, obj=st.none() | _text,
       outcome=st.sampled_from(["success", "failure", "denied"]),
       details=st.none() | st.dictionaries(_text, _json, max_size=5),
       seq=st.integers(1, 2**31 - 1), prev=st.sampled_from([audit.GENESIS, "ab" * 32]))
def test_staged_canonical_form_is_the_verifiers(actor: str, org: str | None, action: str, obj: str | None,
                                                outcome: str, details: dict[str, Any] | None, seq: int,
                                                prev: str) -> None:
    ts = datetime(2026, 11, 23, 14, 40, 1, tzinfo=UTC)
    e = audit.Entry(actor=actor, org=org, action=action, object=obj, outcome=outcome, details=details)
    (x,) = audit._stage((e,), ts)
    row = {"seq": seq, "ts": ts, "actor": actor, "org": org, "action": action, "object": obj,
           "outcome": outcome, "details": details or {}}
    assert (x.prefix + str(seq) + x.suffix).encode() == audit.canonical(row)
    assert x.prefix.isascii() and x.suffix.isascii()  # the PostgreSQL function hashes the UTF-8 of these
    assert hashlib.sha256(f"{prev}{x.prefix}{seq}{x.suffix}".encode()).hexdigest() == audit.chain_hash(prev, row)


_AWKWARD = [
    audit.Entry(actor="tester", action="test.append", object="a/1",
                details={"name": "Zoë \"quoted\" \\ back", "emoji": "\U0001f50c", "n": 2**64, "nested": [None, True]}),
    audit.Entry(actor="tester", org=None, action="test.append", outcome="failure", details=None),
    audit.Entry(actor="t\u00e9ster", org="Org, Inc.", action="test.append", object=None, details={"": "", "z": {}}),
]


def _events_since(ctx: Context, seq: int) -> list[AuditEvent]:
    with ctx.db.session() as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)))  # type: ignore[arg-type]


def _head_seq(ctx: Context) -> int:
    with ctx.db.session() as s:
        row = s.get(AuditHead, 1)
        return 0 if row is None else row.seq


def test_append_stores_what_the_verifier_recomputes(ctx: Context) -> None:
    start = _head_seq(ctx)
    with ctx.db.session() as s:
        audit.append(s, *_AWKWARD)
        s.commit()
    with ctx.db.session() as s:
        audit.append(s, _AWKWARD[0])
        s.rollback()  # a rolled-back transaction leaves no event and does not move the head
    events = _events_since(ctx, start)
    assert [e.seq for e in events] == [start + 1, start + 2, start + 3]
    assert events[0].details["name"] == "Zoë \"quoted\" \\ back" and events[1].org is None
    for e in events:
        assert audit.chain_hash(e.prev_hash, e) == e.hash
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    with ctx.db.session() as s:
        result = audit.verify_chain(s)
    assert result.ok, result.problems


def test_concurrent_appenders_form_one_chain(ctx: Context) -> None:
    """Threads appending at once (the head is locked by the server function on PostgreSQL, by BEGIN
    IMMEDIATE on SQLite) still give contiguous sequence numbers, each event chained to the one before."""
    start = _head_seq(ctx)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                with ctx.db.session() as s:
                    audit.append(s, audit.Entry(actor=f"thread{k}", action="test.concurrent", object=str(i)),
                                 audit.Entry(actor=f"thread{k}", action="test.concurrent", object=f"{i}b"))
                    s.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    events = [e for e in _events_since(ctx, start) if e.action == "test.concurrent"]
    assert len(events) == 80
    with ctx.db.session() as s:
        result = audit.verify_chain(s)
    assert result.ok, result.problems


def test_postgresql_appends_in_the_server(pg_ctx: Context) -> None:
    """On PostgreSQL the chain is extended by the migration's function, not by client-side hashing."""
    with pg_ctx.db.session() as s:
        statements = audit.append_statements(s.connection(), _AWKWARD[0])
    assert [p for p, _ in statements] == [audit._PG_APPEND]
    with pg_ctx.db.engine.connect() as conn:
        n = conn.exec_driver_sql("SELECT count(*) FROM pg_proc WHERE proname = 'v2gpki_audit_append'").scalar()
    assert n == 1
