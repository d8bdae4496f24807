"""Contract repository: what the OCPP and OPNC routes read and write about contracts and the contract data
signed ahead of time for them (ISO 15118-2 CertificateInstallationRes prepared before the vehicle asks).
"""

from __future__ import annotations

from sqlmodel import col, select

from pki.store.db import Database
from pki.store.models import Contract, SignedContractData


class Contracts:
    def __init__(self, db: Database) -> None:
        self.db = db

    def pcid_of(self, emaid: str) -> str:
        """The PCID of the contract with this EMAID, "" when there is none."""
        with self.db.session() as s:
            c = s.exec(select(Contract).where(Contract.emaid == emaid)).first()
        return c.pcid if c is not None else ""

    def add_signed_data(self, row: SignedContractData) -> None:
        """Store one prepared contract data payload (committed on its own)."""
        with self.db.session() as s:
            s.add(row)
            s.commit()

    def signed_data(self, *, pcid: str = "", emaid: str = "", emsp: str | None = None) -> list[SignedContractData]:
        """Prepared contract data by PCID and/or EMAID (as stored), newest first; ``emsp``: only that
        eMSP's contracts (None: every eMSP's)."""
        stmt = select(SignedContractData, Contract).where(col(SignedContractData.contract_id) == col(Contract.id))
        if pcid:
            stmt = stmt.where(SignedContractData.pcid == pcid)
        if emaid:
            stmt = stmt.where(SignedContractData.emaid == emaid)
        if emsp is not None:
            stmt = stmt.where(Contract.emsp == emsp)
        with self.db.session() as s:
            return [r for r, _ in s.exec(stmt.order_by(col(SignedContractData.id).desc()))]


__all__ = ["Contracts"]
