"""Pool storage: what pki/pools.py (the OPCP 1.0 / OPNC v1 contract certificate pool, provisioning
certificate pool and CPS operations) reads and writes.

The contracts of an EMAID or a PCID, the contract data prepared ahead of time (``signed_contract_data``),
the OEMs' provisioning certificates, and who hears a pool's webhook events. Functions taking a Session
run in the caller's transaction, so a change and its audit record commit together; functions taking a
Database open their own session. Statements are the ones pki/pools.py ran before the move, unchanged.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from pki.store.db import Database
from pki.store.models import (
    Certificate,
    CertificateAuthority,
    Contract,
    ProvisioningCertificate,
    SignedContractData,
)

CONTRACT_PROFILES = ("contract", "contract-20")  # ISO 15118-2 and -20 contract certificates

# -- contracts ---------------------------------------------------------------------------------------------


def active_contracts(db: Database, now: datetime, *, emaid: str | None = None,
                     pcid: str | None = None) -> list[Contract]:
    """The active, unexpired contracts (of this EMAID and/or PCID, as stored), oldest first."""
    with db.session() as s:
        stmt = select(Contract).where(Contract.status == "active", col(Contract.valid_until) > now)
        if emaid is not None:
            stmt = stmt.where(Contract.emaid == emaid)
        if pcid is not None:
            stmt = stmt.where(Contract.pcid == pcid)
        return list(s.exec(stmt.order_by(col(Contract.id))))


def active_contracts_of_pcid(db: Database, pcid: str) -> list[Contract]:
    """Every contract of a PCID whose status is active (expired or not: whom a pool event goes to)."""
    with db.session() as s:
        return list(s.exec(select(Contract).where(Contract.pcid == pcid, Contract.status == "active")))


def contract_by_emaid(db: Database, emaid: str) -> Contract | None:
    with db.session() as s:
        return s.exec(select(Contract).where(Contract.emaid == emaid)).first()


def make_default(s: Session, contract: Contract) -> None:
    """The contract becomes its eMSP's one default for its PCID: the eMSP's other contracts for that PCID
    lose theirs in the same transaction."""
    s.execute(update(Contract).where(col(Contract.pcid) == contract.pcid, col(Contract.emsp) == contract.emsp,
                                     col(Contract.id) != contract.id).values(is_default=False))
    s.execute(update(Contract).where(col(Contract.id) == contract.id).values(is_default=True))


def mark_terminated(s: Session, contract_id: int | None, at: datetime) -> None:
    """Terminate a contract without touching its certificates (no default any more)."""
    s.execute(update(Contract).where(col(Contract.id) == contract_id).values(
        status="terminated", terminated_at=at, is_default=False))


def extend(s: Session, contract_id: int | None, valid_until: datetime) -> None:
    s.execute(update(Contract).where(col(Contract.id) == contract_id).values(valid_until=valid_until))


def newest_contract_certificate(db: Database, emaid: str, now: datetime) -> Certificate | None:
    """The newest valid, unexpired contract certificate (-2 or -20) of an EMAID."""
    with db.session() as s:
        return s.exec(select(Certificate).where(
            Certificate.identifier == emaid, col(Certificate.profile).in_(CONTRACT_PROFILES),
            Certificate.status == "valid", col(Certificate.not_after) > now)
            .order_by(col(Certificate.id).desc())).first()


# -- contract data prepared ahead of time ----------------------------------------------------------------


def add_signed_data(db: Database, row: SignedContractData) -> bool:
    """Store one prepared contract data payload (committed on its own); whether the contract had prepared
    data before (its OPCP event is then ``updated``, else ``created``)."""
    with db.session() as s:
        earlier = s.exec(select(SignedContractData.id).where(
            col(SignedContractData.contract_id) == row.contract_id)).first()
        s.add(row)
        s.commit()
    return earlier is not None


def delete_signed_data(db: Database, contract_id: int | None) -> None:
    """Every prepared contract data payload of a contract (committed on its own)."""
    with db.session() as s:
        s.execute(delete(SignedContractData).where(col(SignedContractData.contract_id) == contract_id))
        s.commit()


def deliverable_signed_data(db: Database, contract: Contract, now: datetime, *,
                            limit: int = 5) -> list[SignedContractData]:
    """The contract's newest prepared payloads whose contract certificate (by serial, for its EMAID) is
    still valid and unexpired, newest first, at most ``limit``."""
    with db.session() as s:
        rows = s.exec(select(SignedContractData, Certificate).where(
            col(SignedContractData.contract_id) == contract.id,
            col(Certificate.serial) == col(SignedContractData.cert_serial),
            Certificate.identifier == contract.emaid, Certificate.status == "valid",
            col(Certificate.not_after) > now).order_by(col(SignedContractData.id).desc()).limit(limit))
        return [row for row, _cert in rows]


# -- the provisioning certificate pool -------------------------------------------------------------------


def registered_by(db: Database, pcid: str, oem: str) -> bool:
    """Whether the OEM registered a provisioning certificate for this PCID."""
    with db.session() as s:
        found = s.exec(select(ProvisioningCertificate.id).where(ProvisioningCertificate.pcid == pcid,
                                                                 ProvisioningCertificate.oem == oem)).first()
    return found is not None


def remove_provisioning(s: Session, pcid: str, oem: str | None) -> int:
    """Delete a PCID's provisioning certificates (``oem``: only those that OEM registered; None: anyone's);
    how many. The caller commits or rolls back."""
    stmt = delete(ProvisioningCertificate).where(col(ProvisioningCertificate.pcid) == pcid)
    if oem is not None:
        stmt = stmt.where(col(ProvisioningCertificate.oem) == oem)
    return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def provisioning_registrants(s: Session, pcid: str) -> set[str]:
    """The organizations that registered a provisioning certificate for this PCID."""
    return {r for r in s.exec(select(ProvisioningCertificate.oem).where(ProvisioningCertificate.pcid == pcid)) if r}


# -- roots -----------------------------------------------------------------------------------------------


def root_by_serial(db: Database, serial: str) -> CertificateAuthority | None:
    """The root CA (no parent) with this serial number, as stored."""
    with db.session() as s:
        return s.exec(select(CertificateAuthority).where(
            CertificateAuthority.serial == serial, col(CertificateAuthority.parent).is_(None))).first()


__all__ = ["active_contracts", "active_contracts_of_pcid", "add_signed_data", "contract_by_emaid",
           "delete_signed_data", "deliverable_signed_data", "extend", "make_default", "mark_terminated",
           "newest_contract_certificate", "provisioning_registrants", "registered_by",
           "remove_provisioning", "root_by_serial"]
