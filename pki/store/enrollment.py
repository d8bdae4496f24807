"""Enrollment storage: charging-station registrations, the station-ownership checks' lookups, superseded
certificates, and Idempotency-Key records (draft-ietf-httpapi-idempotency-key-header) for pki/enrollment.py.

Functions taking a Session run in the caller's transaction (the ownership checks and the registration
read and write in one); the others open their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from pki.store.audit_log import Entry, append
from pki.store.db import Database
from pki.store.models import Certificate, IdempotencyRecord, Organization, Station


def station_registered_elsewhere(s: Session, identity: str, org: str) -> bool:
    """Another organization registered this station identity (compared case-insensitively: OCPP
    identities are CiString)."""
    return s.exec(select(Station).where(func.upper(Station.identity) == identity.upper(),
                                        Station.org != org)).first() is not None


def other_cpos(s: Session, org: str) -> list[Organization]:
    return list(s.exec(select(Organization).where(Organization.role == "cpo", Organization.name != org)))


def station_certified_elsewhere(s: Session, identities: Iterable[str], org: str) -> bool:
    """Another organization holds a valid ChargingStationCertificate (cs-client) for one of these
    identities (indexed lookups by identifier)."""
    return s.exec(select(Certificate.serial).where(
        Certificate.identifier.in_(list(identities)),  # type: ignore[union-attr]
        Certificate.profile == "cs-client", Certificate.status == "valid",
        Certificate.tenant != org)).first() is not None


def station_of(s: Session, org: str, identity: str) -> Station | None:
    return s.exec(select(Station).where(Station.org == org, Station.identity == identity)).first()


def add_station(s: Session, station: Station, entry: Entry) -> bool:
    """Register a station with its audit record and commit; False (rolled back) when the identity is
    registered already (a unique violation)."""
    s.add(station)
    try:
        # Flush the INSERT before the audit append queries the chain head: otherwise autoflush raises the
        # duplicate inside the append, outside this handler.
        s.flush()
        append(s, entry)
        s.commit()
    except IntegrityError:
        s.rollback()
        return False
    s.refresh(station)
    return True


def stations(db: Database, org: str | None) -> list[Station]:
    """Registered stations by identity; ``org``: that organization's only."""
    with db.session() as s:
        stmt = select(Station).order_by(Station.identity)  # type: ignore[arg-type]
        if org is not None:
            stmt = stmt.where(Station.org == org)
        return list(s.exec(stmt))


def valid_certificates(db: Database, *, identifier: str, profile: str, tenant: str,
                       except_serial: str) -> list[Certificate]:
    """Valid certificates of one identifier, profile and tenant other than ``except_serial`` (those an
    enrollment with supersede replaces)."""
    with db.session() as s:
        return list(s.exec(select(Certificate).where(
            Certificate.identifier == identifier, Certificate.profile == profile,
            Certificate.tenant == tenant, Certificate.status == "valid",
            Certificate.serial != except_serial)))


def idempotency_record(db: Database, org: str, key: str) -> IdempotencyRecord | None:
    with db.session() as s:
        return s.exec(select(IdempotencyRecord).where(IdempotencyRecord.org == org,
                                                      IdempotencyRecord.key == key)).first()


def add_idempotency_record(db: Database, record: IdempotencyRecord) -> None:
    """Store a record; a concurrent retry that stored the same key first wins (both responses describe
    real issuances)."""
    with db.session() as s:
        s.add(record)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()


__all__ = ["add_idempotency_record", "add_station", "idempotency_record", "other_cpos", "station_certified_elsewhere",
           "station_of", "station_registered_elsewhere", "stations", "valid_certificates"]
