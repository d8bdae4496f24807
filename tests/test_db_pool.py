"""PostgreSQL pool: an idle pooled connection whose server backend died is replaced before use (the
checkout ping of pki/store/db.py), and a busy connection is handed out without a ping round trip."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import pki.store.db as dbmod
from pki.store.db import Database
from tests.conftest import pg_admin_url


def _backend_pid(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_idle_connection_killed_by_the_server_is_replaced(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(pg_url)
    try:
        pid = _backend_pid(db)  # one pooled connection, now checked in
        admin = pg_admin_url()
        assert admin
        with psycopg.connect(admin, autocommit=True) as conn:  # the database restarts under us
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        monkeypatch.setattr(dbmod, "PING_IDLE_SECONDS", 0.0)  # it has been idle "long enough"
        assert _backend_pid(db) != pid  # pinged, found dead, replaced: no error reaches the caller
    finally:
        db.dispose()


def test_recently_used_connection_is_handed_out_without_a_ping(pg_url: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The trade-off, shown: within the idle window no ping is spent, so a backend killed in that
    window fails the one statement that meets it; the pool then drops the connection and the next
    call gets a new one."""
    from sqlalchemy.exc import OperationalError

    db = Database(pg_url)
    try:
        pid = _backend_pid(db)
        admin = pg_admin_url()
        assert admin
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        monkeypatch.setattr(dbmod, "PING_IDLE_SECONDS", 3600.0)
        with pytest.raises(OperationalError):
            _backend_pid(db)  # no ping: the dead connection was used
        assert _backend_pid(db) != pid  # invalidated by SQLAlchemy, replaced
    finally:
        db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_prepared_statements_store_what_core_stores(backend: str, pg_url: str, tmp_path: Path) -> None:
    """pki/store/fast.py binds parameters itself (column by column, each distinct datetime converted once
    per call): the rows it stores must read back exactly as the rows Core's own INSERT stores."""
    import secrets
    from datetime import UTC, datetime, timedelta, timezone

    from sqlalchemy import (
        JSON,
        Column,
        DateTime,
        Integer,
        LargeBinary,
        MetaData,
        String,
        Table,
        bindparam,
        insert,
        literal,
        select,
    )
    from sqlalchemy.exc import DBAPIError, IntegrityError
    from sqlmodel.sql.sqltypes import UTCDateTime

    from pki.store.fast import SIMPLE_QUERY_MAX_ROWS, BulkInsert, MultiRowInsert, Prepared, run_together

    url = f"sqlite:///{tmp_path}/p.db" if backend == "sqlite" else pg_url
    db = Database(url)
    md = MetaData()
    t = Table(f"t_prepared_{secrets.token_hex(4)}", md, Column("id", Integer, primary_key=True),
              Column("s", String), Column("b", LargeBinary), Column("j", JSON),
              Column("at", UTCDateTime), Column("naive", DateTime), Column("maybe", UTCDateTime, nullable=True))
    md.create_all(db.engine)
    t0 = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    cet = timezone(timedelta(hours=1))
    rows = [{"id": i, "s": f"r{i}", "b": bytes([i]) * 3, "j": {"k": i, "l": [1, None]},
             "at": t0 if i % 3 else t0.astimezone(cet), "naive": datetime(2030, 1, 1, i),
             "maybe": None if i % 2 else t0 + timedelta(seconds=i)} for i in range(1, 13)]
    try:
        with db.engine.begin() as conn:
            conn.execute(insert(t), rows[:6])
            BulkInsert(t, list(rows[0])).execute(conn, rows[6:9])
            MultiRowInsert(t, list(rows[0])).execute(conn, rows[9:])
        with db.engine.connect() as conn:
            got = [r._asdict() for r in conn.execute(select(t).order_by(t.c.id))]
        assert [{k: v for k, v in g.items()} for g in got[6:]] == \
            [{**r, "at": r["at"].astimezone(UTC)} for r in rows[6:]]
        core = got[:6]
        assert [(g["at"], g["maybe"], g["naive"], g["j"]) for g in core] == \
            [(r["at"].astimezone(UTC), r["maybe"], r["naive"], r["j"]) for r in rows[:6]]
        # reads: fetch_on (driver cursor on a pooled autocommit connection) == fetch (through a Connection)
        q = Prepared(select(t).where(t.c.at >= bindparam("b_at", type_=t.c.at.type)).order_by(t.c.id))
        with db.autocommit.connect() as conn:
            via_conn = q.fetch(conn, {"b_at": t0})
        assert q.fetch_on(db.autocommit, {"b_at": t0}) == via_conn and len(via_conn) == 12
        assert [tuple(g.values()) for g in got] == via_conn
        # run_together (driver cursor on SQLite, one pipeline on PostgreSQL): rows land, and a constraint
        # violation is SQLAlchemy's IntegrityError that rolls the whole transaction back
        bulk = BulkInsert(t, list(rows[0]))
        more = [{**rows[0], "id": 100 + i} for i in range(3)]
        with db.engine.begin() as conn:
            run_together(conn, [(bulk, more[:1]), (bulk, more[1:])])
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            run_together(conn, [(bulk, [{**rows[0], "id": 200}]), (bulk, more[:1])])
        with db.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(t.c.id).where(t.c.id >= 100).order_by(t.c.id))]
        assert ids == [100, 101, 102]
        # on PostgreSQL the values are merged into the SQL by psycopg: quotes, backslashes, placeholders
        # and binary of every octet value, JSON, time zones and NULLs come back exactly
        odd = [{**rows[i], "id": 300 + i, "s": ["O'Brien \\ %s %(s)s ;--", "\u00e9\u20ac\U0001f697", ""][i % 3],
                "b": bytes(range(256)) if i % 2 else b"'\\\x00", "j": {"q": "it's", "n": [None, 1.5, "%s"]}}
               for i in range(3)]
        with db.engine.begin() as conn:
            run_together(conn, [(bulk, odd[:2]), (bulk, odd[2:])])
        with db.engine.connect() as conn:
            back = [r._asdict() for r in conn.execute(select(t).where(t.c.id >= 300).order_by(t.c.id))]
        assert back == [{**r, "at": r["at"].astimezone(UTC)} for r in odd]
        # a batch over SIMPLE_QUERY_MAX_ROWS goes as a pipeline of executemany calls on PostgreSQL: the same
        # rows land (commit=True is then left to the caller's commit), and a duplicate fails the whole batch
        big = [{**rows[i % 12], "id": 700 + i} for i in range(SIMPLE_QUERY_MAX_ROWS + 4)]
        with db.engine.begin() as conn:
            run_together(conn, [(bulk, big[:10]), (bulk, big[10:])], commit=True)
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            run_together(conn, [(bulk, [{**r, "id": r["id"] + 100} for r in big]), (bulk, big[:1])])
        with db.engine.connect() as conn:
            back = [r._asdict() for r in conn.execute(select(t).where(t.c.id >= 700).order_by(t.c.id))]
        assert back == [{**r, "at": r["at"].astimezone(UTC)} for r in big]
        # execute_on: a multi-row INSERT committed on its own through the autocommit engine's driver
        # cursor; a duplicate in it raises IntegrityError and writes none of its rows
        multi = MultiRowInsert(t, list(rows[0]))
        multi.execute_on(db.autocommit, [{**rows[0], "id": 600}, {**rows[1], "id": 601}])
        with pytest.raises(IntegrityError):
            multi.execute_on(db.autocommit, [{**rows[0], "id": 602}, {**rows[1], "id": 601}])
        with db.engine.connect() as conn:
            assert [r[0] for r in conn.execute(select(t.c.id).where(t.c.id >= 600, t.c.id < 700)
                                               .order_by(t.c.id))] == [600, 601]
        # commit=True: on PostgreSQL the COMMIT goes with the writes, so another connection sees them before
        # the caller's own commit (which then has nothing to do); a failing batch commits nothing. The
        # transaction's first statement is the batch itself, so BEGIN travels with it (fast._pg_exec), as in
        # an issuance, whose audit append is one of these statements (pki/audit.py)
        with db.engine.begin() as conn:
            run_together(conn, [(bulk, [{**rows[0], "id": 500}])], commit=True)
            if backend == "postgresql":
                with db.engine.connect() as other:
                    assert other.execute(select(t.c.id).where(t.c.id == 500)).scalar() == 500
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            run_together(conn, [(bulk, [{**rows[0], "id": 501}]), (bulk, [{**rows[0], "id": 500}])], commit=True)
        with db.engine.connect() as conn:
            assert [r[0] for r in conn.execute(select(t.c.id).where(t.c.id >= 500, t.c.id < 600))] == [500]
    finally:
        md.drop_all(db.engine)
    with pytest.raises(DBAPIError):  # driver errors come out as SQLAlchemy's, as through a Connection
        q.fetch_on(db.autocommit, {"b_at": t0})
    with pytest.raises(DBAPIError), db.engine.begin() as conn:  # also from BEGIN + writes in one query
        run_together(conn, [(bulk, [{**rows[0], "id": 900}])], commit=True)
    with db.engine.connect() as conn:  # and the pooled connection is usable after the rollback
        assert conn.execute(select(literal(1))).scalar() == 1
    db.dispose()


def test_merged_literals_are_what_postgresql_reads_back(pg_url: str) -> None:
    """run_together merges values into its one simple-protocol query itself (pki/store/fast._merge_literals):
    whatever the strings hold — quotes, backslashes, braces, commas, NULL elements, any Unicode — and
    whatever the bytes and timestamps, PostgreSQL must read back exactly the values given, and the text
    must equal psycopg's own ClientCursor.mogrify wherever no array of strings is involved."""
    from datetime import UTC, datetime

    from hypothesis import given, settings
    from hypothesis import strategies as st
    from psycopg.adapt import Transformer

    from pki.store.fast import _merge_literals

    no_nul = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
    sql = ("SELECT CAST(%(arr)s AS text[]), CAST(%(s)s AS text), CAST(%(b)s AS bytea), "
           "CAST(%(t)s AS timestamptz), CAST(%(n)s AS bigint), '100%%' AS pct")
    conn = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    try:
        tx = Transformer(conn)

        @settings(max_examples=200, deadline=None)
        @given(arr=st.lists(st.one_of(no_nul, st.none()), min_size=1, max_size=4), s=no_nul,
               b=st.binary(max_size=40), n=st.integers(-(2**63), 2**63 - 1),
               t=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1),
                              timezones=st.just(UTC)))
        def check(arr: list[str | None], s: str, b: bytes, n: int, t: datetime) -> None:
            params = {"arr": arr, "s": s, "b": b, "t": t, "n": n}
            query = _merge_literals(tx, sql, params)
            row = conn.execute(query).fetchone()
            assert row is not None
            assert (list(row[0]), row[1], bytes(row[2]), row[3], row[4], row[5]) == (arr, s, b, t, n, "100%")
            no_array = sql.replace("%(arr)s", "NULL")
            assert _merge_literals(tx, no_array, params) == psycopg.ClientCursor(conn).mogrify(
                no_array, params).encode()

        check()
    finally:
        conn.close()


@pytest.mark.parametrize("prepare", ["1", "0"])
def test_run_together_prepares_once_per_connection(prepare: str, pg_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL run_together PREPAREs each statement once per connection and then sends EXECUTE with
    literals (no parse or plan per call). The rows are the same either way; a server that lost them (a
    restart, a proxy's DISCARD) fails that one transaction and the next one prepares again; a statement the
    server cannot prepare keeps the literal path; V2GPKI_PG_PREPARE=0 sends no PREPARE and turns psycopg's
    own preparation off."""
    import secrets

    from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, literal_column, select
    from sqlalchemy.exc import DBAPIError

    from pki.config import Settings, current
    from pki.store.fast import BulkInsert, Prepared, run_together

    monkeypatch.setenv("V2GPKI_PG_PREPARE", prepare)
    monkeypatch.setattr(current(), "pg_prepare", Settings().pg_prepare)  # as a process started with it
    db = Database(pg_url)
    md = MetaData()
    t = Table(f"t_prep_{secrets.token_hex(4)}", md, Column("id", Integer, primary_key=True), Column("s", String))
    md.create_all(db.engine)
    bulk = BulkInsert(t, ["id", "s"])
    # an untyped parameter: PostgreSQL cannot infer $1's type, so PREPARE fails and the literal path is used
    untyped = Prepared(select(literal_column("1")).where(bindparam("x").is_(None)))

    def ours(conn: object) -> list[str]:
        rows = conn.exec_driver_sql(  # type: ignore[attr-defined]
            "SELECT name FROM pg_prepared_statements WHERE starts_with(name, 'v2gpki_')").all()
        return sorted(r[0] for r in rows)

    try:
        with db.engine.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold == (5 if prepare == "1" else None)
            for i in range(3):
                with conn.begin():
                    run_together(conn, [(bulk, [{"id": i, "s": f"it's {i}"}]), (untyped, [{"x": "a"}])],
                                 commit=i == 2)
            names = ours(conn)
            conn.commit()
            assert len(names) == (1 if prepare == "1" else 0)  # the INSERT; never the untyped SELECT
            # psycopg prepares a query run often enough and, at the next rollback, sends DEALLOCATE ALL: the
            # server forgets ours too. The next run_together finds out, rolls back and prepares again.
            raw = conn.connection.driver_connection
            for _ in range(7):
                raw.execute("SELECT %s::int", (1,))
            raw.commit()
            with pytest.raises(DBAPIError), conn.begin():
                run_together(conn, [(bulk, [{"id": 1, "s": "duplicate"}])])
            assert ours(conn) == []
            conn.commit()
            with conn.begin():
                run_together(conn, [(bulk, [{"id": 10, "s": "after a rollback"}])])
            conn.exec_driver_sql("DEALLOCATE ALL")  # or anyone else (a proxy's DISCARD ALL)
            conn.commit()
            with conn.begin():
                run_together(conn, [(bulk, [{"id": 11, "s": "again"}])])
            assert ours(conn) == names
            got = conn.execute(select(t.c.id, t.c.s).order_by(t.c.id)).all()
        assert [tuple(r) for r in got] == [(0, "it's 0"), (1, "it's 1"), (2, "it's 2"), (10, "after a rollback"),
                                           (11, "again")]
        # single statements on the autocommit engine (fetch_on, execute_on: the lookups and the intent) take
        # the same path, and recover the same way from a server that forgot them
        one = Prepared(select(t.c.s).where(t.c.id == bindparam("b_id", type_=Integer)))
        add = BulkInsert(t, ["id", "s"])
        assert one.fetch_on(db.autocommit, {"b_id": 11}) == [("again",)]
        add.execute_on(db.autocommit, {"id": 12, "s": "d'autocommit"})
        raw = db.autocommit.raw_connection()  # the pool's one connection, which both just used
        try:
            assert len([n for n in raw.driver_connection.execute(
                "SELECT name FROM pg_prepared_statements").fetchall() if n[0].startswith("v2gpki_")]) == \
                (2 if prepare == "1" else 0)
            raw.driver_connection.execute("DEALLOCATE ALL")
        finally:
            raw.close()
        assert one.fetch_on(db.autocommit, {"b_id": 12}) == [("d'autocommit",)]
        add.execute_on(db.autocommit, {"id": 13, "s": "again"})
        assert one.fetch_on(db.autocommit, {"b_id": 13}) == [("again",)]
    finally:
        md.drop_all(db.engine)
        db.dispose()
