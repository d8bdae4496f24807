"""The OCSP responders' storage: a certificate's status joined with its stored pre-signed response, by unique
key, on raw DB-API connections (the hot path of the API's /ocsp and of ocsp-serve's misses)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine as SAEngine

from pki.store.db import Database
from pki.store.fast import Prepared
from pki.store.models import Certificate, OcspResponseCache

_CERT = Certificate.__table__  # type: ignore[attr-defined]
_RESP = OcspResponseCache.__table__  # type: ignore[attr-defined]


class DatabaseUnavailable(Exception):
    """A driver error on the hot path (mapped to tryLater like SQLAlchemy's errors)."""


def as_utc(v: Any) -> Any:
    if isinstance(v, str):  # SQLite stores DATETIME as text
        v = datetime.fromisoformat(v)
    if isinstance(v, datetime) and v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return v


@dataclass(frozen=True, slots=True)
class StatusRow:
    """A certificate's status and its stored response (``der`` None: none stored)."""

    cert_status: str  # valid | revoked | hold
    revoked_at: datetime | None
    reason: str | None
    stored_status: str | None  # good | revoked | hold
    this_update: datetime | None
    next_update: datetime | None
    der: bytes | None


class StatusLookup:
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

    def lookup(self, issuer: str, serial: str) -> StatusRow | None:
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
        return StatusRow(st, as_utc(rev), reason, ost, as_utc(oth), as_utc(onx),
                         None if oder is None else bytes(oder))



def issuer_certificates(reader: SAEngine) -> list[tuple[str, bytes]]:
    """(name, DER) of every CA: the issuers CertIDs are matched against."""
    from sqlalchemy import select

    from pki.store.models import CertificateAuthority

    ca = CertificateAuthority.__table__  # type: ignore[attr-defined]
    with reader.connect() as conn:
        return [(n, bytes(d)) for n, d in conn.execute(select(ca.c.name, ca.c.der))]


def current_ocsp_signers(reader: SAEngine, now: datetime) -> list[tuple[str, bytes, str, datetime]]:
    """(CA name, certificate DER, key URI, created_at) of every valid delegated OCSP signer, found by the
    column ``certificate.ocsp_signer_for_ca_id`` (migration 0011) — not by its key's label — and only
    where the CA it answers for is the CA that issued it (RFC 6960 §4.2.2.2): a row linked to another CA
    is never a signer of either. In issuance order (the newest last)."""
    from sqlalchemy import select

    from pki.store.models import Certificate, CertificateAuthority

    c = Certificate.__table__  # type: ignore[attr-defined]
    ca = CertificateAuthority.__table__  # type: ignore[attr-defined]
    q = (select(c.c.issuer, c.c.der, c.c.key_uri, c.c.created_at)
         .join(ca, ca.c.id == c.c.ocsp_signer_for_ca_id)
         .where(ca.c.name == c.c.issuer, c.c.key_uri.is_not(None), c.c.status == "valid",
                c.c.not_before <= now, c.c.not_after > now)
         # Issuance order, not notBefore: notBefore is backdated by the profile's margin and clamped to the
         # CA's own (#27 item 4), so two signers issued within an hour can share it.
         .order_by(c.c.created_at, c.c.id))
    with reader.connect() as conn:
        return [(i, bytes(d), u, as_utc(t)) for i, d, u, t in conn.execute(q)]


class OcspStore:
    """The OCSP responder's repository: certificates' statuses and the stored pre-signed responses (table
    ``ocsp_response``). Reads go through the read engine (pki/store/db.read_engine); a driver or
    SQLAlchemy error becomes :class:`DatabaseUnavailable` (answered tryLater)."""

    # Certificates issued within this window are checked for a missing stored response by
    # refresh_candidates() (index on certificate.created_at).
    MISSING_LOOKBACK = timedelta(days=2)

    def __init__(self, db: Database) -> None:
        from pki.store.db import read_engine

        self.db = db
        self.reader = read_engine(db)
        self.lookup = StatusLookup(self.reader)
        self._upsert = _upsert_stmt(db)
        self._insert_new = _insert_new_stmt(db)

    def issuers(self) -> list[tuple[str, bytes]]:
        with _unavailable():
            return issuer_certificates(self.reader)

    def signers(self, now: datetime) -> list[tuple[str, bytes, str, datetime]]:
        with _unavailable():
            return current_ocsp_signers(self.reader, now)

    def statuses(self, issuer: str, serials: Sequence[str]) -> list[tuple[str, str, datetime | None, str | None]]:
        """(serial, certificate status, revoked_at, reason) of those of ``serials`` that exist."""
        from sqlalchemy import select

        with _unavailable(), self.reader.connect() as conn:
            return [(s, st, as_utc(r), why) for s, st, r, why in conn.execute(
                select(_CERT.c.serial, _CERT.c.status, _CERT.c.revoked_at, _CERT.c.revocation_reason)
                .where(_CERT.c.issuer == issuer, _CERT.c.serial.in_(list(serials))))]

    def status(self, issuer: str, serial_hex: str) -> tuple[str, datetime | None, str | None] | None:
        rows = self.statuses(issuer, [serial_hex])
        return (rows[0][1], rows[0][2], rows[0][3]) if rows else None

    def existing_serials(self, issuer: str, serials: Sequence[str]) -> set[str]:
        return {r[0] for r in self.statuses(issuer, serials)}

    def store(self, values: Sequence[dict[str, Any]], *, insert_only: bool = False) -> None:
        """Write responses (issuer, serial, hash_alg, status, this_update, next_update, der). ``insert_only``:
        the first response of a certificate just issued — a row already there (written by a revocation or a
        live request after the issuance) is at least as current and is kept."""
        from pki.store.fast import run_together

        with _unavailable(), self.db.engine.begin() as conn:
            # One query with COMMIT on PostgreSQL (run_together): the pre-signer's batch after every
            # issuance cost ≈ 0.24 ms per response through SQLAlchemy's executemany.
            run_together(conn, [(self._insert_new if insert_only else self._upsert, list(values))], commit=True)

    def refresh_candidates(self, issuers: Sequence[str], *, horizon: datetime, oldest_signer: datetime,
                           now: datetime, full: bool) -> dict[str, dict[str, None]]:
        """Serials per issuer whose stored response may be due, each found by index (#28, migration 0008):
        responses due (next_update), made before the newest signer (this_update), certificates issued in
        the last MISSING_LOOKBACK without one (created_at), responses not 'good' (issuer, status), revoked /
        on-hold certificates whose response does not say so; ``full``: every certificate without one."""
        from sqlalchemy import and_, or_, select

        c, o = _CERT, _RESP
        joined = c.outerjoin(o, and_(o.c.issuer == c.c.issuer, o.c.serial == c.c.serial))
        candidates: dict[str, dict[str, None]] = {name: {} for name in issuers}
        # Across issuers, each query with the one predicate its index serves (a per-issuer filter would let
        # the planner prefer (issuer, …) indexes, which read every certificate of the CA).
        global_queries = [
            select(o.c.issuer, o.c.serial, o.c.this_update).where(o.c.next_update < horizon),
            select(o.c.issuer, o.c.serial, o.c.this_update).where(o.c.this_update < oldest_signer),
            select(c.c.issuer, c.c.serial, c.c.created_at).select_from(joined)
            .where(c.c.created_at >= now - self.MISSING_LOOKBACK, o.c.id.is_(None)),
        ]
        with _unavailable(), self.reader.connect() as conn:
            for q in global_queries:
                for issuer, serial, _t in conn.execute(q):
                    if issuer in candidates:
                        candidates[issuer][serial] = None
            for name in issuers:
                per_issuer = [
                    # responses not 'good' (a valid certificate whose response says otherwise: a release)
                    select(o.c.serial).where(o.c.issuer == name, o.c.status.in_(("revoked", "hold"))),
                    # revoked / on-hold certificates whose response does not say so
                    select(c.c.serial).select_from(joined)
                    .where(c.c.issuer == name, c.c.status.in_(("revoked", "hold")))
                    .where(or_(o.c.id.is_(None), o.c.status != c.c.status, o.c.this_update < c.c.revoked_at)),
                ]
                if full:
                    per_issuer.append(select(c.c.serial).select_from(joined)
                                      .where(c.c.issuer == name, c.c.not_after > now, o.c.id.is_(None)))
                for q in per_issuer:
                    candidates[name].update((r[0], None) for r in conn.execute(q))
        return candidates

    def refresh_rows(self, issuer: str, serials: Sequence[str], now: datetime) -> list[tuple[Any, ...]]:
        """(serial, status, revoked_at, reason, stored status, this_update, next_update) of the unexpired
        certificates among ``serials``."""
        from sqlalchemy import and_, select

        c, o = _CERT, _RESP
        joined = c.outerjoin(o, and_(o.c.issuer == c.c.issuer, o.c.serial == c.c.serial))
        with _unavailable(), self.reader.connect() as conn:
            rows = conn.execute(
                select(c.c.serial, c.c.status, c.c.revoked_at, c.c.revocation_reason, o.c.status,
                       o.c.this_update, o.c.next_update)
                .select_from(joined).where(c.c.issuer == issuer, c.c.not_after > now,
                                           c.c.serial.in_(list(serials)))).all()
        return [(s, st, as_utc(r), why, ost, as_utc(th), as_utc(nx)) for s, st, r, why, ost, th, nx in rows]

    def delete_expired(self, now: datetime) -> None:
        """Responses past their nextUpdate (of expired certificates, not renewed). By index on next_update."""
        from sqlalchemy import delete

        with _unavailable(), self.db.engine.begin() as conn:
            conn.execute(delete(_RESP).where(_RESP.c.next_update < now))


@contextmanager
def _unavailable() -> Iterator[None]:
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc


_RESP_WRITE_COLS = ("issuer", "serial", "hash_alg", "status", "this_update", "next_update", "der")


def _resp_insert(db: Database) -> Any:
    """INSERT of a stored response with named bindparams, so it can be compiled once (pki/store/fast.py):
    the pre-signer writes after every issuance batch, and Core's per-call compilation and parameter
    processing showed in the contract-installation profile."""
    from sqlalchemy import bindparam

    if db.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        ins: Any = sqlite_insert(_RESP)
    else:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        ins = pg_insert(_RESP)
    return ins.values({c: bindparam(c, type_=_RESP.c[c].type) for c in _RESP_WRITE_COLS})


def _upsert_stmt(db: Database) -> Prepared:
    ins = _resp_insert(db)
    key = ("issuer", "serial")
    return Prepared(ins.on_conflict_do_update(index_elements=list(key),
                                              set_={c: ins.excluded[c] for c in _RESP_WRITE_COLS if c not in key}))


def _insert_new_stmt(db: Database) -> Prepared:
    """INSERT … ON CONFLICT DO NOTHING: the first response of a certificate just issued. If a row already
    exists, a revocation (or a live request) wrote it after the issuance, so it is at least as current
    as 'good' — a late pre-sign must never overwrite it."""
    return Prepared(_resp_insert(db).on_conflict_do_nothing(index_elements=["issuer", "serial"]))


# -- ocsp-serve's change feed (api/ocsp_fast.py PresignedCache) -------------------------------------------------

_ROWS = ("SELECT o.id, o.issuer, o.serial, o.hash_alg, o.status, o.this_update, o.next_update, o.der, "
         "c.status, c.revoked_at FROM ocsp_response o JOIN certificate c "
         "ON c.issuer = o.issuer AND c.serial = o.serial")
# The change scans (#28): by the indexes of migration 0008, never a read that grows with the table.
_CHANGED_RESPONSES = ("SELECT issuer, serial, hash_alg, status, this_update FROM ocsp_response "
                      "WHERE this_update >= ?")  # ix_ocsp_response_this_update
_CHANGED_CERTS = ("SELECT issuer, serial, status, revoked_at FROM certificate "
                  "WHERE revoked_at >= ?")  # ix_certificate_revoked_at


class PresignedFeed:
    """What ocsp-serve's in-memory source reads, on one dedicated autocommit DB-API connection (each SELECT
    its own snapshot; SQLAlchemy's per-statement work would cost more than these indexed reads). Rows are
    (id, issuer, serial, hash_alg, stored status, this_update, next_update, der, certificate status,
    revoked_at), as the driver returns them. Not thread-safe: one poller thread per process uses it."""

    def __init__(self, db: Database) -> None:
        from pki.store.db import read_engine

        self._engine = read_engine(db)
        self._sqlite = db.is_sqlite
        self._pg_probe = True
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            fairy = self._engine.raw_connection()
            if not self._sqlite:
                fairy.driver_connection.autocommit = True  # type: ignore[union-attr]  # each SELECT its snapshot
            fairy.detach()
            self._conn = fairy
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001, S110 - already broken
                pass

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self._connection().cursor()
        try:
            cur.execute(sql if self._sqlite else sql.replace("?", "%s"), params)
            return list(cur.fetchall())
        finally:
            cur.close()

    def _param(self, dt: datetime) -> Any:
        naive = dt.astimezone(UTC).replace(tzinfo=None)
        # SQLAlchemy keeps SQLite DATETIME as 'YYYY-MM-DD HH:MM:SS.ffffff' text: compare like with like.
        return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else naive

    def probe(self) -> Any:
        """A value that changes whenever anything may have committed (cheap; no table is read)."""
        if self._sqlite:
            return self._query("PRAGMA data_version")[0][0]  # per connection: others' commits
        # Unchanged snapshot (xmin:xmax:xip) ⇒ no transaction started writing or ended in between.
        if self._pg_probe:
            try:
                return self._query("SELECT pg_current_snapshot()::text")[0][0]
            except Exception as exc:  # noqa: BLE001 - PostgreSQL < 13: scan on every poll instead
                if "does not exist" not in str(exc):
                    raise
                self._pg_probe = False
        return object()

    def newest_stamps(self) -> tuple[Any, Any]:
        """(newest ocsp_response.this_update, newest certificate.revoked_at): one index lookup each."""
        return (self._query("SELECT max(this_update) FROM ocsp_response")[0][0],
                self._query("SELECT max(revoked_at) FROM certificate")[0][0])

    def newest(self, limit: int) -> list[tuple[Any, ...]]:
        """The ``limit`` most recently signed stored responses, newest first (index on this_update)."""
        return self._query(_ROWS + " ORDER BY o.this_update DESC LIMIT ?", (limit,))

    def responses(self, issuer: str, serials: Sequence[str]) -> list[tuple[Any, ...]]:
        """The stored responses of ``serials`` (by unique key)."""
        marks = ", ".join("?" * len(serials))
        return self._query(_ROWS + f" WHERE o.issuer = ? AND o.serial IN ({marks})", (issuer, *serials))

    def changed_responses(self, since: datetime) -> list[tuple[Any, ...]]:
        """(issuer, serial, hash_alg, status, this_update) of responses signed since ``since``."""
        return self._query(_CHANGED_RESPONSES, (self._param(since),))

    def changed_certificates(self, since: datetime) -> list[tuple[Any, ...]]:
        """(issuer, serial, status, revoked_at) of certificates revoked or put on hold since ``since``."""
        return self._query(_CHANGED_CERTS, (self._param(since),))

    def certificate_statuses(self, issuer: str, serials: Sequence[str]) -> list[tuple[Any, ...]]:
        """(serial, status) of ``serials`` (by unique key)."""
        marks = ", ".join("?" * len(serials))
        return self._query(f"SELECT serial, status FROM certificate WHERE issuer = ? AND serial IN ({marks})",
                           (issuer, *serials))
