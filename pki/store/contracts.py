"""Contract repository: what the OCPP and OPNC routes read and write about contracts and the contract data
signed ahead of time for them (ISO 15118-2 CertificateInstallationRes prepared before the vehicle asks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlmodel import col, select

from pki.store.db import Database
from pki.store.models import Certificate, Contract, SignedContractData


class Contracts:
    def __init__(self, db: Database) -> None:
        self.db = db

    def pcid_of(self, emaid: str) -> str:
        """The PCID of the contract with this EMAID, "" when there is none."""
        with self.db.session() as s:
            c = s.exec(select(Contract).where(Contract.emaid == emaid)).first()
        return c.pcid if c is not None else ""

    def by_emaid(self, emaid: str) -> Contract | None:
        with self.db.session() as s:
            return s.exec(select(Contract).where(Contract.emaid == emaid)).first()

    def choose_for_pcid(self, pcid: str, emsp: str | None, now: datetime, certificate_profile: str,
                        choose: Callable[[list[Contract]], Sequence[Contract]]) -> tuple[list[Contract], set[str]]:
        """In one session: the active, unexpired contracts of a PCID (``emsp``: that eMSP's only), the ones
        ``choose`` picks of them, and which of those picked already have a valid unexpired certificate of
        ``certificate_profile`` (by EMAID)."""
        with self.db.session() as s:
            q = select(Contract).where(Contract.pcid == pcid, Contract.status == "active",
                                       col(Contract.valid_until) > now)
            if emsp is not None:
                q = q.where(Contract.emsp == emsp)
            selected = list(choose(list(s.exec(q))))
            installed = {str(c.identifier) for c in s.exec(select(Certificate).where(
                Certificate.profile == certificate_profile, Certificate.status == "valid",
                col(Certificate.identifier).in_([c.emaid for c in selected]), col(Certificate.not_after) > now))}
        return selected, installed

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
