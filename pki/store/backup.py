"""Whole-database storage for `v2gpki backup` / `v2gpki restore` (pki/backup.py keeps the archive, the
token and the key checks): copying a SQLite file with its online backup API, pg_dump and pg_restore with
libpq's variables, what the manifest records of a database (schema revision, counts, the key URIs it
refers to), and whether a target database is empty.

These work on a database URL rather than the service's Database: a backup reads the staged copy it just
made, and a restore's target has no schema until pg_restore or the copy writes one.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from pki.errors import BackupError
from pki.store.db import MIGRATIONS, Database, normalise_url

# -- SQLite ------------------------------------------------------------------------------------------------


def sqlite_copy(src: Path, dst: Path) -> None:
    """Copy a SQLite database with its online backup API: a consistent snapshot while the service writes
    (https://www.sqlite.org/backup.html), WAL content included."""
    s_conn = sqlite3.connect(str(src))
    d_conn = sqlite3.connect(str(dst))
    try:
        s_conn.backup(d_conn)
    finally:
        d_conn.close()
        s_conn.close()


# -- PostgreSQL --------------------------------------------------------------------------------------------


def libpq_env(db_url: str) -> dict[str, str]:
    """PG* variables for pg_dump/pg_restore, so the password never appears on a command line."""
    u = make_url(db_url)
    # env: the pg_dump/pg_restore child's environment (PATH, locale), without libpq variables of our own
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    pairs = {"PGHOST": u.host, "PGPORT": str(u.port) if u.port else None, "PGUSER": u.username,
             "PGPASSWORD": u.password, "PGDATABASE": u.database}
    for k, v in pairs.items():
        if v:
            env[k] = str(v)
    for qk, ev in (("host", "PGHOST"), ("port", "PGPORT"), ("sslmode", "PGSSLMODE"), ("sslrootcert", "PGSSLROOTCERT"),
                   ("sslcert", "PGSSLCERT"), ("sslkey", "PGSSLKEY")):
        q = u.query.get(qk)
        if q:
            env[ev] = q if isinstance(q, str) else q[0]
    return env


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise BackupError(f"{name} not found: install the PostgreSQL client (apt-get install postgresql-client)")
    return exe


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise BackupError(f"{what} failed: {res.stderr.strip()[-800:]}")


def pg_dump(db_url: str, out: Path) -> None:
    """pg_dump --format=custom of the whole database (one snapshot transaction), without owners and grants
    (the restoring role owns what it restores)."""
    _run([_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--file={out}"],
         libpq_env(db_url), "pg_dump")


def pg_restore(db_url: str, dump: Path, *, clean: bool) -> None:
    """pg_restore a custom-format dump in one transaction, stopping at the first error; ``clean``: drop the
    objects it restores first (``restore --force``)."""
    cmd = [_tool("pg_restore"), "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error"]
    if clean:
        cmd += ["--clean", "--if-exists"]
    env = libpq_env(db_url)
    # Only the database *name* on the command line; host, user and password come from PG* variables.
    _run([*cmd, f"--dbname={env.get('PGDATABASE', 'postgres')}", str(dump)], env, "pg_restore")


def pg_has_tables(db_url: str) -> bool:
    """Whether the database's public schema holds any table."""
    eng = create_engine(normalise_url(db_url))
    try:
        with eng.connect() as c:
            n = c.execute(text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"))
            return int(n.scalar_one()) > 0
    finally:
        eng.dispose()


# -- what a backup's manifest records ----------------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    alembic_revision: str | None
    counts: dict[str, int]  # ca, certificate, revoked (every status but valid)
    ca_key_uris: list[str]  # of the active CAs
    certificate_key_uris: list[str]  # of the valid certificates whose key this service holds


def inventory(db_url: str) -> Inventory:
    """Schema revision, row counts and the key URIs of the database at ``db_url``."""
    eng = create_engine(normalise_url(db_url))
    try:
        with eng.connect() as c:
            rev = c.execute(text("SELECT version_num FROM alembic_version")).scalar()
            counts = {
                "ca": int(c.execute(text("SELECT count(*) FROM ca")).scalar_one()),
                "certificate": int(c.execute(text("SELECT count(*) FROM certificate")).scalar_one()),
                "revoked": int(c.execute(text("SELECT count(*) FROM certificate WHERE status <> 'valid'"))
                               .scalar_one()),
            }
            ca_uris = [r[0] for r in c.execute(text("SELECT key_uri FROM ca WHERE status = 'active'"))]
            uris = [r[0] for r in c.execute(text(
                "SELECT key_uri FROM certificate WHERE key_uri IS NOT NULL AND status = 'valid'"))]
    finally:
        eng.dispose()
    return Inventory(rev, counts, ca_uris, uris)


def known_revisions() -> set[str]:
    """Every Alembic revision this code's migrations know (a backup made by a newer schema is not one)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}


def certificate_key_uris(db: Database) -> list[str]:
    """The key URI of every certificate that has one (any status)."""
    with db.engine.connect() as c:
        return [uri for (uri,) in c.execute(text("SELECT key_uri FROM certificate WHERE key_uri IS NOT NULL"))]


__all__ = ["Inventory", "certificate_key_uris", "inventory", "known_revisions", "libpq_env", "pg_dump",
           "pg_has_tables", "pg_restore", "sqlite_copy"]
