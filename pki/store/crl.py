"""CRL storage: the revoked entries a CRL lists, streamed, and the published CRLs with their numbers.

pki/crl.py builds and signs the CRL (RFC 5280 §5); this module only reads and writes rows. Reads go
through the read engine (no write lock on SQLite); publishing is one transaction guarded by the CA's
CRL number, so two generators never publish the same number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from pki.store.db import Database, read_engine
from pki.store.models import Certificate, CertificateAuthority, CrlRecord

_CERT = Certificate.__table__  # type: ignore[attr-defined]
_CA = CertificateAuthority.__table__  # type: ignore[attr-defined]
_CRL = CrlRecord.__table__  # type: ignore[attr-defined]


def crl_number(db: Database, ca_name: str) -> int:
    """The number of the CA's last published CRL (0 before the first)."""
    with read_engine(db).connect() as conn:
        return int(conn.execute(select(_CA.c.crl_number).where(_CA.c.name == ca_name)).scalar_one())


def revoked_entries(db: Database, ca_name: str, expired_before: datetime,
                    rows_per_part: int = 20_000) -> Iterator[Sequence[Any]]:
    """The CA's revoked and on-hold certificates whose notAfter is after ``expired_before`` (RFC 5280 §3.3:
    an entry stays until one scheduled CRL after expiry carried it), streamed in parts. The database
    renders revocationDate as YYYYMMDDHHMMSS (UTC), so the caller's hot loop touches no datetime."""
    if db.is_sqlite:
        when = func.strftime("%Y%m%d%H%M%S", _CERT.c.revoked_at)  # stored as UTC text
    else:
        when = func.to_char(func.timezone("UTC", _CERT.c.revoked_at), "YYYYMMDDHH24MISS")
    stmt = (
        select(_CERT.c.serial, when, _CERT.c.status, _CERT.c.revocation_reason)
        .where(_CERT.c.issuer == ca_name, _CERT.c.status.in_(("revoked", "hold")),
               _CERT.c.not_after > expired_before)
    )
    with read_engine(db).connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=rows_per_part).execute(stmt)
        # Rows unpack as (serial, when, status, reason): no per-row copy on the hot path.
        yield from result.partitions()


def publish(db: Database, ca_name: str, *, previous: int, number: int, this_update: datetime,
            next_update: datetime, der: bytes | bytearray) -> bool:
    """Store CRL ``number`` if the CA's CRL number is still ``previous`` (False: another generator
    published meanwhile, nothing written). Keeps the previous CRL for clients that fetched its URL a
    moment ago; drops older ones."""
    with db.engine.begin() as conn:
        res = conn.execute(update(_CA).where(_CA.c.name == ca_name, _CA.c.crl_number == previous)
                           .values(crl_number=number))
        if res.rowcount != 1:
            return False
        conn.execute(insert(_CRL).values(issuer=ca_name, number=number, this_update=this_update,
                                         next_update=next_update, der=der))
        conn.execute(delete(_CRL).where(_CRL.c.issuer == ca_name, _CRL.c.number < number - 1))
    return True


def latest_meta(db: Database, ca_name: str) -> tuple[int, datetime, datetime] | None:
    """(number, thisUpdate, nextUpdate) of the CA's newest stored CRL."""
    with read_engine(db).connect() as conn:
        row = conn.execute(
            select(_CRL.c.number, _CRL.c.this_update, _CRL.c.next_update)
            .where(_CRL.c.issuer == ca_name).order_by(_CRL.c.number.desc()).limit(1)
        ).first()
    return None if row is None else (int(row[0]), row[1], row[2])


def load(db: Database, ca_name: str, number: int | None = None) -> tuple[int, datetime, datetime, bytes] | None:
    """(number, thisUpdate, nextUpdate, DER) of CRL ``number`` (None: the newest)."""
    stmt = select(_CRL.c.number, _CRL.c.this_update, _CRL.c.next_update, _CRL.c.der).where(_CRL.c.issuer == ca_name)
    stmt = stmt.where(_CRL.c.number == number) if number is not None else stmt.order_by(_CRL.c.number.desc())
    with read_engine(db).connect() as conn:
        row = conn.execute(stmt.limit(1)).first()
    return None if row is None else (int(row[0]), row[1], row[2], bytes(row[3]))


__all__ = ["crl_number", "latest_meta", "load", "publish", "revoked_entries"]
