"""Engine creation and migrations. Alembic owns the schema from the first table on."""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session

from pki.store.errors import translate

MIGRATIONS = Path(__file__).parent / "migrations"
_READER_LOCK = threading.Lock()
_AUTOCOMMIT_DBS: weakref.WeakSet[Database] = weakref.WeakSet()


def _autocommit_after_fork_in_child() -> None:
    # Never share the parent's pooled autocommit connections (forked OCSP workers, Celery prefork): the
    # child's pool starts empty.
    for db in list(_AUTOCOMMIT_DBS):
        if db._reader is not None:
            db._reader.dispose(close=False)


os.register_at_fork(after_in_child=_autocommit_after_fork_in_child)


def utcnow() -> datetime:
    """Aware UTC with second precision: X.509 times carry whole seconds (RFC 5280 §4.1.2.5)."""
    return datetime.now(UTC).replace(microsecond=0)


def url_without_password(url: str) -> str:
    """A database URL fit to print: its password masked."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def normalise_url(url: str) -> str:
    # psycopg 3 is the PostgreSQL driver we ship; accept plain postgresql:// URLs.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _pg_connect_args() -> dict[str, Any]:
    """psycopg prepares a statement on the server after its 5th execution on a connection; with
    V2GPKI_PG_PREPARE=0 (behind a transaction-pooling proxy such as PgBouncer in transaction mode, where a
    session's prepared statements do not follow the client) it never does (prepare_threshold None), and
    pki/store/fast.py sends no PREPARE either."""
    from pki.store.fast import pg_prepare_enabled

    return {} if pg_prepare_enabled() else {"prepare_threshold": None}


class Database:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = normalise_url(url)
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            _create_private_sqlite_file(self.url)
        else:
            kwargs.update(pool_size=10, max_overflow=20, connect_args=_pg_connect_args())
        self.engine: Engine = create_engine(self.url, **kwargs)
        self._reader: Engine | None = None
        event.listen(self.engine, "handle_error", translate)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin_immediate)
        else:
            event.listen(self.engine, "checkout", _ping_if_idle)
            event.listen(self.engine, "checkin", _mark_checkin)

    @property
    def autocommit(self) -> Engine:
        """An engine whose statements each commit on their own: for single SELECTs (no BEGIN/ROLLBACK round
        trips around them on PostgreSQL — measured 0.6 vs 1.6–2.1 ms per query here — and no write lock on
        SQLite, whose service engine opens every transaction with BEGIN IMMEDIATE; WAL readers need none)
        and for single statements that are atomic by themselves (one multi-row INSERT). Anything that must
        read and write consistently uses :meth:`session` / ``engine.begin()``."""
        eng = self._reader
        if eng is None:
            with _READER_LOCK:
                eng = self._reader
                if eng is None:
                    if self.is_sqlite:
                        eng = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30})
                        event.listen(eng, "connect", _sqlite_pragmas)
                    else:
                        eng = create_engine(self.url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=15,
                                            connect_args=_pg_connect_args())
                        event.listen(eng, "checkout", _ping_if_idle)
                        event.listen(eng, "checkin", _mark_checkin)
                    event.listen(eng, "handle_error", translate)
                    self._reader = eng
                    _AUTOCOMMIT_DBS.add(self)
        return eng

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    def ping(self) -> None:
        """One round trip (SELECT 1) on a fresh checkout; raises when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def server_now(self) -> datetime:
        """The database server's clock (PostgreSQL ``now()``), on a fresh checkout (pki/clock.py)."""
        with self.engine.connect() as conn:
            value = conn.execute(text("SELECT now()")).scalar_one()
        assert isinstance(value, datetime)
        return value

    def migrate(self) -> None:
        """Upgrade the schema to head (idempotent)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["engine"] = self.engine
        command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()
        if self._reader is not None:
            self._reader.dispose()

    def after_fork(self) -> None:
        """Drop pooled connections inherited from a parent process (never share a socket)."""
        self.engine.dispose(close=False)
        if self._reader is not None:
            self._reader.dispose(close=False)


# Pessimistic disconnect handling (SQLAlchemy "pool_pre_ping") costs a round trip on every checkout, and a
# contract installation checks a connection out four or five times. A connection that was used within
# PING_IDLE_SECONDS is handed out as is; an idle one is pinged first, and a failed ping makes the pool
# replace it (DisconnectionError: SQLAlchemy's documented custom pre-ping) — so a database restart still
# costs no request an error once connections have sat idle, while a busy pool skips the ping.
PING_IDLE_SECONDS = 5.0


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    last = record.info.get("v2gpki_checkin")
    if last is None or time.monotonic() - last < PING_IDLE_SECONDS:
        return  # a new connection, or one in use a moment ago
    try:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SELECT 1")
        finally:
            cur.close()
        dbapi_conn.rollback()
    except Exception as exc:  # noqa: BLE001 - any failure means: give me another connection
        raise DisconnectionError(f"stale pooled connection: {type(exc).__name__}") from exc


def _mark_checkin(_dbapi_conn: Any, record: Any) -> None:
    record.info["v2gpki_checkin"] = time.monotonic()


def _create_private_sqlite_file(url: str) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would apply the umask, typically giving
    0644); SQLite gives its -wal and -shm files the database file's mode (#21 item 11)."""
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    if path.exists() or not path.parent.is_dir():
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (OCSP, lists) run beside the single writer; NORMAL sync is durable at checkpoint
    # granularity, the usual trade-off for WAL (a power cut may lose the last transactions, never corrupt).
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's implicit BEGIN is deferred)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN so two writers never deadlock upgrading a read lock.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


__all__ = ["Database", "utcnow"]


def read_engine(db: Database) -> Engine:
    """An engine for read-only statements. On SQLite the service's engine opens every transaction with
    BEGIN IMMEDIATE (one writer at a time); reads need no write lock under WAL, so they go through the
    database's autocommit twin (each SELECT its own snapshot)."""
    return db.autocommit if db.is_sqlite else db.engine


# Callbacks to run once a session's transaction has committed, kept in Session.info. Two listeners on the
# Session class, installed once, run or drop them. (A listener registered per session and commit,
# `event.listen(session, ..., once=True)`, cost ≈ 2 % of a contract installation: SQLAlchemy builds an
# event registry and weak references for each.) Used by observers that are called inside a transaction
# no after-commit call follows (bulk revocation: pki/revocation.py), e.g. pki/metrics.py's counters.
_PENDING = "v2gpki.after_commit"


def on_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once ``session``'s current transaction commits; never if it rolls back."""
    _install_session_hooks()
    session.info.setdefault(_PENDING, []).append(fn)


@functools.cache  # once per process (a racing second call only re-registers the same listeners; each
def _install_session_hooks() -> None:  # pops the list it runs, so callbacks still run once)

    event.listen(OrmSession, "after_commit", _run_pending)
    event.listen(OrmSession, "after_transaction_end", _drop_pending)


def _run_pending(session: Any) -> None:
    for fn in session.info.pop(_PENDING, ()):
        fn()


def _drop_pending(session: Any, transaction: Any) -> None:
    # The root transaction ended without committing (rolled back, or the session closed): its callbacks
    # never happen. After a commit the list is already gone.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
