"""The OCSP responders' storage: a certificate's status joined with its stored pre-signed response, by unique
key, on raw DB-API connections (the hot path of the API's /ocsp and of ocsp-serve's misses)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine as SAEngine


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
