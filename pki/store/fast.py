"""Prepared bulk statements for the issuance hot path.

SQLAlchemy Core re-derives a cache key, looks up the compiled form and runs every parameter through the
type processors on each execute; for the few fixed statements issuance runs per batch that bookkeeping
cost more than the database work (bench/issuance.py). Here each statement is compiled once per dialect,
its parameters are bound through the same type processors SQLAlchemy would use (so what is stored is
byte-identical to the Core path: DATETIME text on SQLite, JSON text, binary), and the rows go to the
driver's executemany through the caller's connection, inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Table, bindparam, insert
from sqlalchemy.engine import Connection, Dialect


class BulkInsert:
    """INSERT INTO table (columns...) VALUES (...) for many rows whose dicts carry exactly ``columns``."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        self._by_dialect: dict[str, tuple[str, bool, tuple[str, ...],
                                          tuple[Callable[[Any], Any] | None, ...]]] = {}

    def _prepared(self, dialect: Dialect) -> tuple[str, bool, tuple[str, ...], tuple[Callable[[Any], Any] | None, ...]]:
        p = self._by_dialect.get(dialect.name)
        if p is None:
            stmt = insert(self.table).values({c: bindparam(c) for c in self.columns})
            compiled = stmt.compile(dialect=dialect)
            positional = bool(compiled.positional)
            order = tuple(compiled.positiontup or ()) if positional else self.columns
            procs = tuple(self.table.c[c].type._cached_bind_processor(dialect) for c in order)
            p = (compiled.string, positional, order, procs)
            self._by_dialect[dialect.name] = p
        return p

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        sql, positional, order, procs = self._prepared(conn.dialect)
        if positional:
            params: list[Any] = [
                tuple(v if f is None else f(v) for f, v in zip(procs, (r[k] for k in order), strict=True))
                for r in rows
            ]
        else:
            params = [{k: (v if f is None else f(v)) for k, f, v in
                       zip(order, procs, (r[k] for k in order), strict=True)} for r in rows]
        conn.exec_driver_sql(sql, params if len(params) > 1 else params[0])


__all__ = ["BulkInsert"]
