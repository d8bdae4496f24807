"""Outbox rows (pki/store/outbox.py): one prepared INSERT in the caller's transaction, or, inside
``batched``, one statement for all of them when the block ends (a bulk revocation's batch)."""

from __future__ import annotations

import secrets

import pytest
from sqlmodel import func, select

from pki.context import Context
from pki.store import outbox
from pki.store.models import OutboxEvent


def _count(s: object, kind: str) -> int:
    return int(s.exec(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.kind == kind)).one())  # type: ignore[attr-defined]


def test_a_row_is_written_at_once_and_commits_with_its_transaction(ctx: Context) -> None:
    kind = f"test-{secrets.token_hex(4)}"
    with ctx.db.session() as s:
        outbox.add(s, kind, {"n": 1})
        assert _count(s, kind) == 1  # sent now, inside the transaction
        s.rollback()
    with ctx.db.session() as s:
        assert _count(s, kind) == 0  # rolled back with it


def test_batched_rows_are_held_until_the_block_ends_then_commit_together(ctx: Context) -> None:
    kind = f"test-{secrets.token_hex(4)}"
    with ctx.db.session() as s:
        with outbox.batched(s):
            for n in range(3):
                outbox.add(s, kind, {"n": n})
            assert _count(s, kind) == 0  # held: nothing sent yet
        assert _count(s, kind) == 3
        s.commit()
    with ctx.db.session() as s:
        rows = s.exec(select(OutboxEvent).where(OutboxEvent.kind == kind).order_by(OutboxEvent.id)).all()  # type: ignore[arg-type]
        assert [r.payload for r in rows] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_batch_that_fails_writes_nothing(ctx: Context) -> None:
    kind = f"test-{secrets.token_hex(4)}"
    with ctx.db.session() as s:
        with pytest.raises(RuntimeError), outbox.batched(s):
            outbox.add(s, kind, {"n": 0})
            raise RuntimeError("the revocation failed")
        assert _count(s, kind) == 0
        outbox.add(s, kind, {"n": 1})  # and the session is no longer batching
        assert _count(s, kind) == 1
