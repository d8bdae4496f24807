"""Prepared statements for the issuance hot path.

SQLAlchemy Core re-derives a cache key, looks up the compiled form and runs every parameter through the
type processors on each execute; for the few fixed statements issuance runs per batch that bookkeeping
cost more than the database work (bench/issuance.py). Here each statement is compiled once per dialect,
its parameters are bound through the same type processors SQLAlchemy would use (so what is stored is
byte-identical to the Core path: DATETIME text on SQLite, JSON text, binary), and the rows go to the
driver (executemany for several) through the caller's connection, inside the caller's transaction.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import abc as pg_abc
from psycopg import pq
from psycopg.adapt import Transformer
from sqlalchemy import Table, bindparam, insert
from sqlalchemy.engine import Connection, CursorResult, Dialect, Engine
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql.expression import Executable

from pki.config import current
from pki.store.errors import invalid_value

_Compiled = tuple[str, bool, tuple[str, ...], tuple[Callable[[Any], Any] | None, ...], tuple[Any, ...]]


class Prepared:
    """A statement whose parameters are named bindparams; executed with dicts keyed by those names."""

    def __init__(self, stmt: Executable) -> None:
        self.stmt = stmt
        self._by_dialect: dict[str, _Compiled] = {}
        self._result_procs: dict[str, tuple[Callable[[Any], Any] | None, ...]] = {}

    def _compiled(self, dialect: Dialect) -> _Compiled:
        p = self._by_dialect.get(dialect.name)
        if p is None:
            compiled = self.stmt.compile(dialect=dialect)  # type: ignore[attr-defined]
            positional = bool(compiled.positional)
            names = tuple(compiled.positiontup or ()) if positional else tuple(compiled.binds)
            procs = tuple(compiled.binds[n].type._cached_bind_processor(dialect) for n in names)
            defaults = tuple(compiled.binds[n].value for n in names)  # literals in the statement (id = 1)
            p = (compiled.string, positional, names, procs, defaults)
            self._by_dialect[dialect.name] = p
        return p

    def bind(self, dialect: Dialect, rows: Sequence[dict[str, Any]] | dict[str, Any]) -> tuple[str, list[Any]]:
        """(SQL in the driver's paramstyle, driver parameters per row) — what :meth:`execute` sends."""
        sql, positional, names, procs, defaults = self._compiled(dialect)
        batch: Sequence[dict[str, Any]] = [rows] if isinstance(rows, dict) else rows
        if not names:
            return sql, [() if positional else {} for _ in batch]
        values = [[r[k] if k in r else d for k, d in zip(names, defaults, strict=True)] for r in batch]
        # Column by column: a batch's rows share their timestamps (issued/created/validity), and the
        # datetime processors (UTC normalisation, then SQLite's text rendering) were the costliest
        # per-value work, so a datetime column converts each distinct value once.
        cols: list[Sequence[Any]] = []
        for f, col in zip(procs, zip(*values, strict=True) if values else [() for _ in names], strict=True):
            if f is None:
                cols.append(col)
            elif col and type(col[0]) is datetime:
                memo: dict[Any, Any] = {}
                cols.append([memo[v] if v in memo else memo.setdefault(v, f(v)) for v in col])
            else:
                cols.append([f(v) for v in col])
        if positional:
            return sql, list(zip(*cols, strict=True))
        return sql, [dict(zip(names, r, strict=True)) for r in zip(*cols, strict=True)]

    def fetch(self, conn: Connection, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Rows of a SELECT, each value through its column type's result processor (as Core would: UTC
        datetimes, JSON, ...). Building and caching the statement once saves what Core spends per call
        constructing the expression and its cache key (≈ 1 ms of a contract installation's lookups)."""
        return self._processed(conn.dialect, self.execute(conn, params).fetchall())

    def _processed(self, dialect: Dialect, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """Each value through its column type's result processor, compiled once per dialect."""
        rprocs = self._result_procs.get(dialect.name)
        if rprocs is None:
            rprocs = tuple(c.type._cached_result_processor(dialect, None)
                           for c in self.stmt.selected_columns)  # type: ignore[attr-defined]
            self._result_procs[dialect.name] = rprocs
        return [tuple(v if f is None else f(v) for f, v in zip(rprocs, r, strict=True)) for r in rows]

    def fetch_on(self, engine: Engine, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """:meth:`fetch` on a pooled connection of ``engine`` (an autocommit one: no transaction is opened),
        with the driver's cursor directly: a single read then skips SQLAlchemy's Connection and execution
        context, which cost more than the query itself for the lookups every installation makes. Driver
        errors are raised as SQLAlchemy's DBAPIError, as through a Connection."""
        sql, bound = self.bind(engine.dialect, params)
        rows = _on_driver_cursor(engine, sql, bound, fetch=True)
        return self._processed(engine.dialect, rows)

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]] | dict[str, Any]) -> CursorResult[Any]:
        sql, params = self.bind(conn.dialect, rows)
        return conn.exec_driver_sql(sql, params[0] if len(params) == 1 else params)

    def execute_on(self, engine: Engine, rows: Sequence[dict[str, Any]] | dict[str, Any]) -> None:
        """A write that is atomic by itself, on a pooled connection of an autocommit ``engine``
        (Database.autocommit) with the driver's cursor, as :meth:`fetch_on` reads: it commits on its own,
        without SQLAlchemy's Connection and execution context around it (the issuance intent, written
        before every HSM signature). Driver errors are raised as SQLAlchemy's DBAPIError."""
        sql, params = self.bind(engine.dialect, rows)
        _on_driver_cursor(engine, sql, params, fetch=False)


def _on_driver_cursor(engine: Engine, sql: str, params: list[Any], *, fetch: bool) -> list[Any]:
    """One statement (executemany for several parameter rows) on a pooled connection of ``engine``, with
    the driver's cursor; the rows when ``fetch``. Driver errors are raised as SQLAlchemy's DBAPIError."""
    dialect = engine.dialect
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        if dialect.name == "postgresql" and len(params) == 1 and driver.autocommit:
            return _pg_single(driver, sql, params[0], fetch, dialect)
        cur = raw.cursor()
        try:
            if len(params) == 1:
                cur.execute(sql, params[0])
            else:
                cur.executemany(sql, params)
            return list(cur.fetchall()) if fetch else []
        finally:
            cur.close()
    except dialect.loaded_dbapi.Error as exc:
        raise _as_sqlalchemy(dialect, sql, params[0] if len(params) == 1 else params, exc) from exc
    finally:
        raw.close()  # back to the pool


class BulkInsert(Prepared):
    """INSERT INTO table (columns...) VALUES (...) for rows whose dicts carry exactly ``columns``."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        super().__init__(insert(table).values({c: bindparam(c, type_=table.c[c].type) for c in self.columns}))

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]] | dict[str, Any]) -> CursorResult[Any]:
        if not rows:
            raise ValueError("BulkInsert.execute needs at least one row")
        return super().execute(conn, rows)


class MultiRowInsert:
    """ONE ``INSERT … VALUES (…), (…), …`` statement for n rows (atomic by itself, one round trip), compiled
    once per row count and dialect: Core's ``insert().values([...])`` re-compiles its n × columns bind
    parameters on every call (≈ 24 ms for 64 rows here)."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        self._by_n: dict[int, Prepared] = {}

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self._for(len(rows)).execute(conn, self._flat(rows))

    def _for(self, n: int) -> Prepared:
        p = self._by_n.get(n)
        if p is None:
            t = self.table
            p = Prepared(insert(t).values([{c: bindparam(f"{c}_{i}", type_=t.c[c].type) for c in self.columns}
                                           for i in range(n)]))
            if len(self._by_n) < 600:
                self._by_n[n] = p
        return p

    def execute_on(self, engine: Engine, rows: Sequence[dict[str, Any]]) -> None:
        """:meth:`execute` as :meth:`Prepared.execute_on`: committed on its own, on an autocommit engine."""
        if rows:
            self._for(len(rows)).execute_on(engine, self._flat(rows))

    def _flat(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {f"{c}_{i}": r[c] for i, r in enumerate(rows) for c in self.columns}


def _as_sqlalchemy(dialect: Dialect, sql: str, params: Any, exc: Exception) -> Exception:
    """A driver error raised on the driver's cursor, as SQLAlchemy raises it through a Connection
    (IntegrityError, OperationalError, ...; a DataError as pki.store.errors.InvalidValue, as the engines'
    handle_error listener turns it), so callers catch one family of errors on every path."""
    err: StatementError = DBAPIError.instance(sql, params, exc, dialect.loaded_dbapi.Error)
    return invalid_value(err) or err


SIMPLE_QUERY_MAX_ROWS = 16  # rows up to which run_together sends one simple query on PostgreSQL


def run_together(conn: Connection, statements: Sequence[tuple[Prepared, Sequence[dict[str, Any]]]], *,
                 commit: bool = False) -> None:
    """Run write statements (no results needed) in the connection's transaction. On PostgreSQL they go as
    one query: one network round trip for all of them instead of one each (an error aborts the
    transaction and is raised here, as it would be statement by statement).

    ``commit``: on PostgreSQL, for a small batch, COMMIT is sent in the same query, so the transaction
    ends with the writes (the caller's commit then finds nothing to do: psycopg skips COMMIT on an idle
    connection). Only for a caller with nothing else to write in this transaction. Ignored otherwise."""
    statements = [(p, rows) for p, rows in statements if rows]
    if conn.dialect.name != "postgresql":
        # SQLite: the statements on the transaction's own driver cursor — SQLAlchemy's execution context
        # around each cost two thirds of this function (py-spy of a contract installation); driver
        # errors still come out as SQLAlchemy's DBAPIError (IntegrityError, OperationalError, ...).
        dialect = conn.dialect
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            for p, rows in statements:
                sql, params = p.bind(dialect, rows)
                try:
                    if len(params) == 1:
                        cur.execute(sql, params[0])
                    else:
                        cur.executemany(sql, params)
                except dialect.loaded_dbapi.Error as exc:
                    raise _as_sqlalchemy(dialect, sql, params, exc) from exc
        finally:
            cur.close()
        return
    raw: Any = conn.connection.driver_connection
    dialect = conn.dialect
    sql, params = "", []
    if sum(len(rows) for _, rows in statements) > SIMPLE_QUERY_MAX_ROWS:
        # Big batches (bench/issuance.py, batch 64): a pipeline of executemany calls on prepared
        # statements, where the server parses each statement once instead of once per row.
        try:
            with raw.pipeline():
                pcur = raw.cursor()
                for p, rows in statements:
                    sql, params = p.bind(dialect, rows)
                    pcur.executemany(sql, params)
        except dialect.loaded_dbapi.Error as exc:
            raise _as_sqlalchemy(dialect, sql, params, exc) from exc
        return  # the caller's commit ends the transaction
    # PostgreSQL, a small batch (an HTTP request's issuance): each row's statement, as an EXECUTE of the
    # statement prepared on this connection or with its literals (values quoted by psycopg; no SQL is built
    # from values here), sent as ONE simple-protocol query (_send): one send and one read instead of a
    # pipeline's per-statement bookkeeping. In a transaction the statements run in it; the first error
    # aborts it and is raised here, as it would be statement by statement.
    if statements or commit:
        _send(raw, Transformer(raw), [p.bind(dialect, rows) for p, rows in statements], dialect, commit=commit)


def _send(raw: Any, tx: pg_abc.Transformer, bound: Sequence[tuple[str, Sequence[dict[str, Any]]]],
          dialect: Dialect, *, commit: bool = False) -> Any:
    """The bound statements as ONE simple-protocol query, each row's statement an EXECUTE of the statement
    prepared on this connection or the statement with its literals; COMMIT last when ``commit``.

    Statements are prepared only when this query opens the transaction (or runs in autocommit): a failed
    PREPARE then aborts nothing of the caller's, and if the server has lost what we prepared — psycopg
    sends DEALLOCATE ALL after a rollback once it has prepared statements of its own, a proxy may DISCARD
    ALL — the failed transaction held nothing but this query: it is rolled back, the statements prepared
    again, and the query sent once more."""
    sqls = [sql for sql, _ in bound]
    ready = _prepared_on(raw, sqls) if raw.pgconn.transaction_status == pq.TransactionStatus.IDLE else set()

    def query(ready: set[bytes]) -> bytes:
        parts = [_statement(tx, sql, row, ready) for sql, rows in bound for row in rows]
        if commit:
            parts.append(b"COMMIT")
        return b";\n".join(parts)

    try:
        return _pg_exec(raw, query(ready), dialect)
    except StatementError as exc:
        _PREPARED.pop(raw, None)  # whatever failed, prepare again on the next use
        if not isinstance(exc.orig, psycopg.errors.InvalidSqlStatementName):  # only our EXECUTEs raise it
            raise
        if raw.pgconn.transaction_status == pq.TransactionStatus.INERROR:
            raw.pgconn.exec_(b"ROLLBACK")
        return _pg_exec(raw, query(_prepared_on(raw, sqls)), dialect)


# Server-side prepared statements for run_together (PREPARE once per connection, then EXECUTE name(literals)
# inside the one simple-protocol query): the server then neither parses nor plans the INSERTs and UPDATEs
# again. pg_stat_statements on a contract installation: ≈ 150 µs of planning per installation (certificate
# INSERT 43, intent UPDATE 70, audit call 17, OCSP response INSERT 22), which EXECUTE skips once the plan is
# generic. V2GPKI_PG_PREPARE=0 turns server-side preparation off, here and in psycopg (prepare_threshold),
# for a transaction-pooling proxy (PgBouncer in transaction mode) that moves sessions between clients.
def pg_prepare_enabled() -> bool:
    return current().pg_prepare


_SERVER_FORMS: dict[str, tuple[bytes, bytes, tuple[str, ...]]] = {}
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()
_UNPREPARABLE: set[bytes] = set()


def _server_form(sql: str) -> tuple[bytes, bytes, tuple[str, ...]]:
    """(statement name, PREPARE text, the names of its $1..$n in order) for a compiled statement."""
    form = _SERVER_FORMS.get(sql)
    if form is None:
        texts, names = _split_placeholders(sql)
        order = tuple(dict.fromkeys(names))
        body = texts[0] + b"".join(b"$%d" % (order.index(n) + 1) + t for n, t in zip(names, texts[1:], strict=True))
        name = b"v2gpki_" + hashlib.sha256(sql.encode()).hexdigest()[:20].encode()
        form = (name, b"PREPARE " + name + b" AS " + body, order)
        if len(_SERVER_FORMS) < 512:
            _SERVER_FORMS[sql] = form
    return form


def _prepared_on(raw: Any, sqls: Sequence[str]) -> set[bytes]:
    """The names of ``sqls``' server forms prepared on connection ``raw``, preparing the missing ones now
    when that is safe: only on an idle connection (a failed PREPARE inside the caller's transaction would
    abort it), one statement per round trip, once per connection. A statement the server cannot prepare
    (a parameter whose type it cannot infer) is remembered and keeps the literal path."""
    if not pg_prepare_enabled():
        return set()
    ready = _PREPARED.setdefault(raw, set())
    missing = [f for f in (_server_form(q) for q in sqls) if f[0] not in ready and f[0] not in _UNPREPARABLE]
    if missing and raw.pgconn.transaction_status == pq.TransactionStatus.IDLE:
        for name, text, _ in missing:
            res = raw.pgconn.exec_(text)
            state = res.error_field(pq.DiagnosticField.SQLSTATE) or b""
            if res.status == pq.ExecStatus.COMMAND_OK or state == b"42P05":  # prepared (42P05: already, by us)
                ready.add(name)
            elif state.startswith(b"42"):
                _UNPREPARABLE.add(name)  # the statement itself (class 42: e.g. an untyped parameter)
            # anything else (a broken connection, a lock timeout): the literal path now, PREPARE next time
    return ready


def _pg_single(raw: Any, sql: str, params: dict[str, Any], fetch: bool, dialect: Dialect) -> list[Any]:
    """One statement on an autocommit PostgreSQL connection as one simple query: EXECUTE of the statement
    prepared on this connection (or the statement with its literals), rows loaded by psycopg's own loaders
    (what its cursor returns). psycopg's cursor spent ≈ 110 µs of client CPU around each of the two such
    statements of a contract installation (the lookup and the intent), against ≈ 80 µs for libpq's round
    trip itself. A statement the server has forgot (DEALLOCATE ALL) failed without effect (autocommit):
    prepared again and sent once more."""
    tx: pg_abc.Transformer = Transformer(raw)
    res = _send(raw, tx, [(sql, [params])], dialect)
    if not fetch:
        return []
    tx.set_pgresult(res)
    return tx.load_rows(0, res.ntuples, tuple)


def _statement(tx: pg_abc.Transformer, sql: str, params: dict[str, Any], ready: set[bytes]) -> bytes:
    """EXECUTE name(v1, …, vn) when ``sql`` is prepared on the connection (``ready``), else ``sql`` with its
    literals (:func:`_merge_literals`); every value quoted by psycopg."""
    form = _SERVER_FORMS.get(sql)
    if form is not None and form[0] in ready:
        return b"EXECUTE " + form[0] + b"(" + b",".join([_literal(tx, params[n]) for n in form[2]]) + b")"
    return _merge_literals(tx, sql, params)


# %(name)s placeholders as SQLAlchemy's psycopg dialect compiles them (pyformat), and %% for a literal %.
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
_SPLIT: dict[str, tuple[tuple[bytes, ...], tuple[str, ...]]] = {}


def _split_placeholders(sql: str) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """The statement's text around its placeholders (once per statement) and the placeholders' names."""
    found = _SPLIT.get(sql)
    if found is None:
        texts, names, pos = [], [], 0
        for m in _PLACEHOLDER.finditer(sql):
            if m.group(1) is None:  # %% → %, part of the surrounding text
                continue
            texts.append(sql[pos:m.start()].replace("%%", "%").encode())
            names.append(m.group(1))
            pos = m.end()
        texts.append(sql[pos:].replace("%%", "%").encode())
        found = (tuple(texts), tuple(names))
        if len(_SPLIT) < 512:
            _SPLIT[sql] = found
    return found


def _merge_literals(tx: pg_abc.Transformer, sql: str, params: dict[str, Any]) -> bytes:
    """``sql`` with each placeholder replaced by its value as a literal — what ``ClientCursor.mogrify``
    returns, for this module's statements, in a fraction of its time. Every value is quoted by psycopg's
    own adaptation (``Transformer.as_literal``: escaping, bytea, timestamps, NULL); no SQL is built from
    values here. Only a list of strings is assembled differently: ``ARRAY[lit, …]`` of psycopg's string
    literals instead of psycopg's ``'{…}'`` array literal, whose element escaping is Python code and cost
    ≈ 150 µs for the audit chain's eight one-element arrays (the statements cast them: CAST(… AS text[])).
    """
    texts, names = _split_placeholders(sql)
    out = [texts[0]]
    for name, text in zip(names, texts[1:], strict=True):
        out.append(_literal(tx, params[name]))
        out.append(text)
    return b"".join(out)


def _literal(tx: pg_abc.Transformer, v: Any) -> bytes:
    if type(v) is list and v and all(type(x) is str or x is None for x in v):
        return b"ARRAY[" + b",".join([tx.as_literal(x) for x in v]) + b"]"
    return tx.as_literal(v)


def _pg_exec(raw: Any, query: bytes, dialect: Dialect) -> Any:
    """One simple-protocol query (one or more statements, values already merged) in ONE round trip, on
    libpq directly (PQexec; psycopg releases the GIL while it waits). Measured on this VM when BEGIN +
    the audit head's SELECT … FOR UPDATE went this way (pki/audit.py now has the server lock it):
    ≈ 210 µs of client CPU, against ≈ 320 µs for psycopg's BEGIN then execute and ≈ 470 µs in a psycopg
    pipeline. Opens the transaction as psycopg would (BEGIN first when the connection is idle and not in
    autocommit); psycopg reads the transaction status from libpq, so its own commit and rollback then see
    what this did. Errors come out as SQLAlchemy's, as through a Connection (the statement text is cut:
    it carries the values)."""
    if not raw.autocommit and raw.pgconn.transaction_status == pq.TransactionStatus.IDLE:
        query = b"BEGIN;\n" + query
    try:
        res = raw.pgconn.exec_(query)
        if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            raise psycopg.errors.error_from_result(res, encoding=raw.info.encoding)
    except psycopg.Error as exc:
        raise _as_sqlalchemy(dialect, query[:2000].decode(errors="replace"), None, exc) from exc
    return res


__all__ = ["BulkInsert", "MultiRowInsert", "Prepared", "run_together"]
