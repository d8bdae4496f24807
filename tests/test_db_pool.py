"""PostgreSQL pool: an idle pooled connection whose server backend died is replaced before use (the
checkout ping of pki/store/db.py), and a busy connection is handed out without a ping round trip."""

from __future__ import annotations

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
