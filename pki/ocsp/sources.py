"""Where answers come from: the in-process caches and the hot-path lookup of a certificate's status and
its stored pre-signed response."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Engine as SAEngine

K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()



_STATUS_OF = {"valid": "good", "revoked": "revoked", "hold": "hold"}


class DatabaseUnavailable(Exception):
    """A driver error on the hot path (mapped to tryLater like SQLAlchemy's errors)."""


def _as_utc(v: Any) -> Any:
    if isinstance(v, str):  # SQLite stores DATETIME as text
        v = datetime.fromisoformat(v)
    if isinstance(v, datetime) and v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return v


class _FastLookup:
    """The hot-path query (status + pre-signed response) on raw DB-API connections: SQLAlchemy's own
    per-execute work (compile cache, result metadata, pool reset) costs several times the query itself.
    A few dedicated autocommit connections per process; at most ``size`` lookups run at once."""

    def __init__(self, reader: SAEngine, size: int = 8) -> None:
        self._engine = reader
        self._sqlite = reader.dialect.name == "sqlite"
        ph = "?" if self._sqlite else "%s"
        self._sql = (
            "SELECT c.status, c.revoked_at, c.revocation_reason, o.status, o.this_update, o.next_update, o.der "
            "FROM certificate c LEFT JOIN ocsp_response o ON o.issuer = c.issuer AND o.serial = c.serial "
            f"WHERE c.issuer = {ph} AND c.serial = {ph}"
        )
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(size)
        self._pid = os.getpid()

    def _connect(self) -> Any:
        fairy = self._engine.raw_connection()  # pool events (SQLite pragmas) apply
        if not self._sqlite:
            fairy.driver_connection.autocommit = True  # type: ignore[union-attr]  # no idle transactions
        fairy.detach()  # ours from now on: kept open, outside SQLAlchemy's pool accounting
        return fairy

    def lookup(self, issuer: str, serial: str) -> tuple[Any, ...] | None:
        if os.getpid() != self._pid:  # never share a socket with a parent process
            self._free, self._pid = [], os.getpid()
        with self._sem:
            with self._lock:
                conn = self._free.pop() if self._free else None
            try:
                if conn is None:
                    conn = self._connect()
                cur = conn.cursor()
                cur.execute(self._sql, (issuer, serial))
                row = cur.fetchone()
                cur.close()
            except Exception as exc:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001, S110 - already broken
                        pass
                raise DatabaseUnavailable(type(exc).__name__) from exc
            with self._lock:
                self._free.append(conn)
        if row is None:
            return None
        st, rev, reason, ost, oth, onx, oder = row
        return st, _as_utc(rev), reason, ost, _as_utc(oth), _as_utc(onx), oder

