"""Firmware-signing storage (OCPP 2.0.1 L01 SignedUpdateFirmware): the manufacturer's signing
certificates, the signatures given, and the row lock that serialises two signatures of one product.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlmodel import Session, col, select

from pki.store.db import Database
from pki.store.models import Certificate, CertificateAuthority
from pki.store.models_firmware import FirmwareSignature


def newest_signing_certificate(db: Database, *, org: str, profile: str, issuer: str,
                               now: datetime) -> Certificate | None:
    """The organization's newest valid unexpired certificate of ``profile`` from ``issuer`` whose key this
    service holds."""
    with db.session() as s:
        return s.exec(select(Certificate).where(
            Certificate.tenant == org, Certificate.profile == profile,
            Certificate.issuer == issuer, Certificate.status == "valid",
            col(Certificate.key_uri).is_not(None), Certificate.not_after > now,
        ).order_by(col(Certificate.created_at).desc(), col(Certificate.id).desc())).first()


def ca_exists(db: Database, name: str) -> bool:
    with db.session() as s:
        return s.exec(select(CertificateAuthority).where(CertificateAuthority.name == name)).first() is not None


def certificates_issued(db: Database, *, issuer: str, profile: str) -> int:
    """How many certificates of ``profile`` ``issuer`` ever issued (any status): the next key generation."""
    with db.session() as s:
        return len(list(s.exec(select(Certificate.id).where(Certificate.issuer == issuer,
                                                            Certificate.profile == profile))))


def other_owner(s: Session, product: str, org: str) -> str | None:
    """The organization other than ``org`` that has signed firmware of this product, if any."""
    return s.exec(select(FirmwareSignature.tenant).where(
        FirmwareSignature.product == product, FirmwareSignature.tenant != org)).first()


def signed_versions(s: Session, org: str, product: str) -> list[tuple[str, str]]:
    """(version, sha256) of every signature the organization holds for the product."""
    return [(str(v), str(d)) for v, d in s.exec(select(FirmwareSignature.version, FirmwareSignature.sha256).where(
        FirmwareSignature.tenant == org, FirmwareSignature.product == product))]


def lock_organization(s: Session, org: str) -> None:
    """Hold the organization's row until the caller's transaction ends (PostgreSQL; on SQLite the writer
    already holds the database: BEGIN IMMEDIATE)."""
    if s.connection().dialect.name == "postgresql":
        s.execute(text("SELECT id FROM organization WHERE name = :n FOR UPDATE"), {"n": org})


def signatures(db: Database, org: str | None, product: str | None = None) -> list[FirmwareSignature]:
    with db.session() as s:
        stmt = select(FirmwareSignature).order_by(col(FirmwareSignature.id))
        if org is not None:
            stmt = stmt.where(FirmwareSignature.tenant == org)
        if product is not None:
            stmt = stmt.where(FirmwareSignature.product == product)
        return list(s.exec(stmt))


def certificate(db: Database, issuer: str, serial: str) -> Certificate | None:
    with db.session() as s:
        return s.exec(select(Certificate).where(Certificate.issuer == issuer, Certificate.serial == serial)).first()


__all__ = ["ca_exists", "certificate", "certificates_issued", "lock_organization", "newest_signing_certificate",
           "other_owner", "signatures", "signed_versions"]
