"""Station trust-store storage (pki/truststore_plan.py, OCPP 2.0.1 M03/M05): roots of this PKI and of
other PKIs CPOs trust, each station's last report and plan, and the coverage counts a root switch needs.
Functions taking a Session run in the caller's transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, cast, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from pki.store.db import Database
from pki.store.models import CertificateAuthority, Station
from pki.store.models_truststore import GLOBAL_SCOPE, StationTrustReport, TrustedRoot


def roots_and_imports(db: Database, org: str) -> tuple[list[CertificateAuthority], list[TrustedRoot]]:
    """Every root CA of this PKI and every import visible to ``org`` (global or its own), oldest first."""
    with db.session() as s:
        cas = list(s.exec(select(CertificateAuthority).where(col(CertificateAuthority.parent).is_(None))
                          .order_by(col(CertificateAuthority.id))))
        imports = list(s.exec(select(TrustedRoot).where(col(TrustedRoot.scope).in_([GLOBAL_SCOPE, org]))
                              .order_by(col(TrustedRoot.id))))
    return cas, imports


def station_named(s: Session, identity: str, org: str | None) -> Station | None:
    """A registered station by identity (case-insensitive: OCPP CiString); ``org``: of that organization."""
    stmt = select(Station).where(func.upper(Station.identity) == identity.upper())
    if org is not None:
        stmt = stmt.where(Station.org == org)
    return s.exec(stmt).first()


def save_report(db: Database, org: str, station: str, values: dict[str, Any]) -> bool:
    """Replace the station's one report row with ``values``; False (rolled back) when a concurrent first
    report of the same station inserted it meanwhile (the caller tries again: then it updates)."""
    with db.session() as s:
        row = s.exec(select(StationTrustReport).where(StationTrustReport.org == org,
                                                      StationTrustReport.station == station)).first()
        if row is None:
            row = StationTrustReport(org=org, station=station, **values)
        else:
            for k, v in values.items():
                setattr(row, k, v)
        s.add(row)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            return False
    return True


def imported_root(s: Session, scope: str, sha256: str, certificate_type: str) -> TrustedRoot | None:
    return s.exec(select(TrustedRoot).where(TrustedRoot.scope == scope, TrustedRoot.sha256 == sha256,
                                            TrustedRoot.certificate_type == certificate_type)).first()


def imports(db: Database, org: str | None = None) -> list[TrustedRoot]:
    """Every import (org None), or those visible to ``org`` (global and its own), oldest first."""
    with db.session() as s:
        stmt = select(TrustedRoot).order_by(col(TrustedRoot.id))
        if org is not None:
            stmt = stmt.where(col(TrustedRoot.scope).in_([GLOBAL_SCOPE, org]))
        return list(s.exec(stmt))


def coverage_counts(db: Database, sha256: str,
                    org: str | None = None) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per organization: registered stations, stations with a recorded report, and those whose last report
    names the root with this SHA-256 (lower-case hex). Three grouped COUNTs."""
    with db.session() as s:
        st = select(Station.org, func.count()).group_by(Station.org)
        rep = select(StationTrustReport.org, func.count()).group_by(StationTrustReport.org)
        # The fingerprint is hex: no LIKE wildcard can occur in it. JSON as text on SQLite and PostgreSQL.
        hit = rep.where(cast(StationTrustReport.roots, String).like(f"%{sha256}%"))
        if org is not None:
            st, rep, hit = st.where(Station.org == org), rep.where(StationTrustReport.org == org), \
                hit.where(StationTrustReport.org == org)
        stations = dict(s.exec(st).all())  # type: ignore[arg-type]
        reported = dict(s.exec(rep).all())  # type: ignore[arg-type]
        with_root = dict(s.exec(hit).all())  # type: ignore[arg-type]
    return stations, reported, with_root


__all__ = ["coverage_counts", "imported_root", "imports", "roots_and_imports", "save_report", "station_named"]
