"""Contract storage: what pki/contracts.py (eMSP contracts, contract installations, the provisioning pool,
Plug & Charge authorization) and the OCPP and OPNC routes read and write about contracts, the answers kept
for replayed installations (``cps_replay``, #21 item 2) and the contract data signed ahead of time for them
(ISO 15118-2 CertificateInstallationRes prepared before the vehicle asks).

Statements are the ones pki/contracts.py ran before the move, unchanged (bench/contract.py measures them):
the lookups every installation makes and the kept answer's upsert are compiled once (pki/store/fast.py)
and run on ``Database.autocommit`` with the driver's cursor, one round trip each; functions taking a
Session run in the caller's transaction, so a change and its audit record commit together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from pki.store.db import Database
from pki.store.errors import Duplicate
from pki.store.fast import Prepared
from pki.store.models import Certificate, Contract, CpsReplay, ProvisioningCertificate, SignedContractData

_CONTRACT = Contract.__table__  # type: ignore[attr-defined]
_CERT = Certificate.__table__  # type: ignore[attr-defined]
_CONTRACT_COLS = tuple(c.name for c in _CONTRACT.columns)

# The profile of the contract certificates the CPS issues (and supersedes, #21 item 2).
CONTRACT_PROFILE = "contract"


@dataclass(frozen=True, slots=True)
class ContractRow:
    """A contract row as read, detached from any session: what an installation needs of the contract.
    (Constructing the instrumented SQLModel `Contract` cost ≈ 90 µs, more than the query itself.)"""

    id: int | None
    emaid: str
    pcid: str
    emsp: str
    valid_until: datetime
    is_default: bool
    status: str
    created_at: datetime
    terminated_at: datetime | None


assert ContractRow.__slots__ == _CONTRACT_COLS, "ContractRow must mirror the contract table"

# A certificate's (status, not_before, not_after): what pki/contracts.py judges a chain by.
StatusRow = tuple[str, datetime, datetime]


# -- the lookups of a contract installation ---------------------------------------------------------------


def _default_contract_query(*, scoped: bool) -> Select[Any]:
    """The PCID's contract an ISO 15118-2 installation delivers (docs/cps.md, "Which contract").

    A CertificateInstallationReq names no eMSP (ISO 15118-2 §8.4.3.11.2 has no PrioritizedEMAIDs; -20
    added them), and each eMSP keeps its own default per PCID (#21 item 1), so among eMSPs the one that
    has served the vehicle longest wins: the eMSP whose oldest still active, unexpired contract for this
    PCID is the oldest, then that eMSP's default, then its newest contract. A later eMSP's registration
    never changes what an earlier eMSP's vehicle receives. ``scoped``: only the eMSP ``b_emsp``'s own
    contracts (an eMSP asking for itself: /v1/contract-data, /v1/contract-installations)."""
    dc = _CONTRACT.alias("dc")
    tenure = _CONTRACT.alias("tenure")
    now = bindparam("b_now", type_=_CONTRACT.c.valid_until.type)
    first_of_emsp = (sa_select(func.min(tenure.c.id))
                     .where(tenure.c.pcid == dc.c.pcid, tenure.c.emsp == dc.c.emsp, tenure.c.status == "active",
                            tenure.c.valid_until > now)
                     .correlate(dc).scalar_subquery())
    q = (sa_select(*dc.columns)
         .where(dc.c.pcid == bindparam("b_pcid"), dc.c.status == "active", dc.c.valid_until > now))
    if scoped:
        q = q.where(dc.c.emsp == bindparam("b_emsp"))
    return q.order_by(first_of_emsp.asc(), dc.c.is_default.desc(), dc.c.id.desc()).limit(1)


# The two lookups every contract installation makes, prepared once (pki/store/fast.py).
_DEFAULT_CONTRACT_Q = {scoped: _default_contract_query(scoped=scoped) for scoped in (False, True)}
_DEFAULT_CONTRACT = {scoped: Prepared(q) for scoped, q in _DEFAULT_CONTRACT_Q.items()}
_CERT_STATUS = Prepared(
    sa_select(_CERT.c.status, _CERT.c.not_before, _CERT.c.not_after)
    .where(_CERT.c.issuer == bindparam("b_issuer"), _CERT.c.serial == bindparam("b_serial")))
_PREV = _CERT.alias("prev")


def _status_and_contract(*, scoped: bool) -> Prepared:
    """Both in one statement: the certificate's row, outer-joined to the PCID's default contract (an
    uncorrelated scalar subquery, evaluated once): no certificate row, no result; no contract, NULLs. The
    last column says whether that contract already has a valid contract certificate (one index lookup,
    NULL almost always): only then does an installation look for certificates to supersede."""
    default_id = _DEFAULT_CONTRACT_Q[scoped].with_only_columns(
        _DEFAULT_CONTRACT_Q[scoped].selected_columns.id).scalar_subquery()
    has_valid = (sa_select(_PREV.c.id)
                 .where(_PREV.c.identifier == _CONTRACT.c.emaid, _PREV.c.profile == CONTRACT_PROFILE,
                        _PREV.c.status == "valid")
                 .correlate(_CONTRACT).limit(1).scalar_subquery())
    return Prepared(
        sa_select(_CERT.c.status, _CERT.c.not_before, _CERT.c.not_after, *_CONTRACT.columns, has_valid)
        .select_from(_CERT.outerjoin(_CONTRACT, _CONTRACT.c.id == default_id))
        .where(_CERT.c.issuer == bindparam("b_issuer"), _CERT.c.serial == bindparam("b_serial")))


_STATUS_AND_CONTRACT = {scoped: _status_and_contract(scoped=scoped) for scoped in (False, True)}


def default_contract(db: Database, pcid: str, now: datetime, emsp: str | None = None) -> ContractRow | None:
    """The contract an installation for ``pcid`` (as stored) delivers at ``now`` (the rule in
    :func:`_default_contract_query`); with ``emsp``, that eMSP's own default. One prepared query."""
    params: dict[str, Any] = {"b_pcid": pcid, "b_now": now}
    if emsp is not None:
        params["b_emsp"] = emsp
    # Core on a plain connection (every installation runs this; the ORM session cost more than the query).
    rows = _DEFAULT_CONTRACT[emsp is not None].fetch_on(db.autocommit, params)
    return ContractRow(*rows[0]) if rows else None


def certificate_status(db: Database, issuer: str, serial: str) -> StatusRow | None:
    """The certificate's (status, not_before, not_after), None when ``issuer`` issued no ``serial`` (hex, as
    stored). One prepared query."""
    found = _CERT_STATUS.fetch_on(db.autocommit, {"b_issuer": issuer, "b_serial": serial})
    return found[0] if found else None  # type: ignore[return-value]


def status_and_contract(db: Database, issuer: str, serial: str, pcid: str, now: datetime, emsp: str | None = None,
                        ) -> tuple[StatusRow, ContractRow | None, bool] | None:
    """:func:`certificate_status` and :func:`default_contract` in ONE query (a round trip, a pool checkout
    and a statement fewer per installation), plus whether that contract already has a valid contract
    certificate. None when the certificate is not ours; the contract is None when the PCID has none."""
    params: dict[str, Any] = {"b_issuer": issuer, "b_serial": serial, "b_pcid": pcid, "b_now": now}
    if emsp is not None:
        params["b_emsp"] = emsp
    found = _STATUS_AND_CONTRACT[emsp is not None].fetch_on(db.autocommit, params)
    if not found:
        return None
    row = found[0]
    contract = row[3:-1]
    return row[:3], (ContractRow(*contract) if contract[0] is not None else None), row[-1] is not None  # type: ignore[return-value]


# -- answers kept for replayed installations (#21 item 2) -------------------------------------------------

_REPLAY = CpsReplay.__table__  # type: ignore[attr-defined]
_C1 = _CERT.alias("c1")
_C2 = _CERT.alias("c2")
_REPLAYED = Prepared(
    sa_select(_REPLAY.c.response, _REPLAY.c.cert_issuer, _REPLAY.c.cert_serial, _C1.c.status, _C1.c.not_before,
              _C1.c.not_after, _REPLAY.c.cps_issuer, _C2.c.status, _C2.c.not_before, _C2.c.not_after)
    .select_from(_REPLAY
                 .join(_C1, (_C1.c.issuer == _REPLAY.c.cert_issuer) & (_C1.c.serial == _REPLAY.c.cert_serial))
                 .join(_C2, (_C2.c.issuer == _REPLAY.c.cps_issuer) & (_C2.c.serial == _REPLAY.c.cps_serial)))
    .where(_REPLAY.c.request_digest == bindparam("b_digest"), _REPLAY.c.contract_id == bindparam("b_contract"),
           _REPLAY.c.expires_at > bindparam("b_now", type_=_REPLAY.c.expires_at.type)))
_REPLAY_COLS = ("request_digest", "contract_id", "emaid", "cert_issuer", "cert_serial", "cps_issuer", "cps_serial",
                "response", "expires_at", "created_at")


def _upsert(dialect: Any) -> Prepared:
    ins = dialect.insert(_REPLAY).values(
        {name: bindparam(f"b_{name}", type_=_REPLAY.c[name].type) for name in _REPLAY_COLS})
    keys = ("request_digest", "contract_id")
    return Prepared(ins.on_conflict_do_update(
        index_elements=[_REPLAY.c[k] for k in keys],
        set_={name: ins.excluded[name] for name in _REPLAY_COLS if name not in keys}))


_STORE_ANSWER = {"sqlite": _upsert(sqlite), "postgresql": _upsert(postgresql)}


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    """An installation's kept answer, with the rows its validity depends on."""

    response: bytes
    cert_issuer: str
    cert_serial: str
    cert: StatusRow  # the contract certificate's (status, not_before, not_after)
    cps_issuer: str
    cps: StatusRow  # the CPS certificate's that signed the answer


def kept_answer(db: Database, digest: str, contract_id: int, now: datetime) -> KeptAnswer | None:
    """The unexpired answer kept for the request whose signed body has SHA-256 ``digest`` for contract
    ``contract_id``, with its contract and CPS certificates' rows. One prepared query."""
    found = _REPLAYED.fetch_on(db.autocommit, {"b_digest": digest, "b_contract": contract_id, "b_now": now})
    if not found:
        return None
    response, cert_issuer, cert_serial, c1s, c1nb, c1na, cps_issuer, c2s, c2nb, c2na = found[0]
    return KeptAnswer(bytes(response), cert_issuer, cert_serial, (c1s, c1nb, c1na), cps_issuer, (c2s, c2nb, c2na))


def keep_answer(db: Database, digest: str, contract_id: int, emaid: str, cert: tuple[str, str],
                cps: tuple[str, str], exi: bytes, expires_at: datetime, now: datetime) -> None:
    """Upsert an installation's answer (by request digest and contract), atomic by itself on
    ``Database.autocommit``: one prepared statement."""
    stmt = _STORE_ANSWER["sqlite" if db.is_sqlite else "postgresql"]
    stmt.execute_on(db.autocommit, {
        "b_request_digest": digest, "b_contract_id": contract_id, "b_emaid": emaid, "b_cert_issuer": cert[0],
        "b_cert_serial": cert[1], "b_cps_issuer": cps[0], "b_cps_serial": cps[1], "b_response": exi,
        "b_expires_at": expires_at, "b_created_at": now})


def purge_answers(db: Database, now: datetime) -> None:
    """Delete the kept answers expired at ``now`` (committed on its own)."""
    with db.autocommit.begin() as conn:
        conn.execute(delete(CpsReplay).where(col(CpsReplay.expires_at) <= now))


# -- contracts --------------------------------------------------------------------------------------------


def clear_default(s: Session, pcid: str, emsp: str) -> list[str]:
    """In the caller's transaction: the eMSP's active default contracts for ``pcid`` lose the flag (one
    default per PCID and eMSP, #21 item 1; another eMSP's contracts are never touched), and the answers
    kept for them are deleted (#21 item 2). Returns their EMAIDs."""
    mine = (col(Contract.pcid) == pcid, col(Contract.status) == "active", col(Contract.emsp) == emsp,
            col(Contract.is_default).is_(True))
    old = list(s.exec(select(Contract.id, Contract.emaid).where(*mine)))
    if old:
        s.execute(update(Contract).where(*mine).values(is_default=False))
        # the kept installation answers of a contract that is no longer the default (#21 item 2)
        s.execute(delete(CpsReplay).where(col(CpsReplay.contract_id).in_([i for i, _ in old])))
    return [emaid for _, emaid in old]


def add_contract(s: Session, contract: Contract) -> None:
    """Insert a contract in the caller's transaction (written now). Raises :class:`Duplicate` (the
    transaction rolled back) when a contract with its EMAID exists."""
    s.add(contract)
    try:
        s.flush()
    except IntegrityError:
        s.rollback()
        raise Duplicate(f"a contract for EMAID {contract.emaid} already exists") from None


def contract_by_emaid(db: Database, emaid: str, emsp: str | None = None) -> Contract | None:
    """The contract with this EMAID (as stored); ``emsp``: only if that eMSP's."""
    with db.session() as s:
        stmt = select(Contract).where(Contract.emaid == emaid)
        if emsp is not None:
            stmt = stmt.where(Contract.emsp == emsp)
        return s.exec(stmt).first()


def list_contracts(db: Database, emsp: str | None = None, pcid: str | None = None) -> list[Contract]:
    """Contracts in creation order; ``emsp``: that eMSP's only; ``pcid`` (as stored): that vehicle's."""
    with db.session() as s:
        stmt = select(Contract).order_by(col(Contract.id))
        if emsp is not None:
            stmt = stmt.where(Contract.emsp == emsp)
        if pcid:
            stmt = stmt.where(Contract.pcid == pcid)
        return list(s.exec(stmt))


def terminate(s: Session, contract_id: int | None, at: datetime) -> None:
    """In the caller's transaction: the contract is terminated (no default any more) and the answers kept
    for it deleted (#21 item 2)."""
    s.execute(update(Contract).where(col(Contract.id) == contract_id).values(status="terminated",
                                                                            terminated_at=at, is_default=False))
    s.execute(delete(CpsReplay).where(col(CpsReplay.contract_id) == contract_id))  # #21 item 2


def live_contract_certificates(s: Session, emaid: str) -> list[Certificate]:
    """The valid or on-hold contract certificates (-2 and -20) of an EMAID, in the caller's session."""
    return list(s.exec(select(Certificate).where(
        Certificate.identifier == emaid, col(Certificate.profile).in_(["contract", "contract-20"]),
        col(Certificate.status).in_(["valid", "hold"]))))


def certificate_by_serials(db: Database, issuer: str, serials: Iterable[str]) -> Certificate | None:
    """The first of ``serials`` (hex, as stored) that ``issuer`` issued, tried in order in one session."""
    with db.session() as s:
        for serial in serials:
            row = s.exec(select(Certificate).where(Certificate.issuer == issuer,
                                                   Certificate.serial == serial)).first()
            if row is not None:
                return row
    return None


# -- the provisioning certificate pool ----------------------------------------------------------------------


def provisioning_by_fingerprint(s: Session, fingerprint: str) -> ProvisioningCertificate | None:
    """The registered provisioning certificate with this SHA-256 fingerprint, in the caller's session."""
    return s.exec(select(ProvisioningCertificate).where(ProvisioningCertificate.fingerprint == fingerprint)).first()


def vehicle_provisioning(db: Database, pcid: str, *, oem: str | None = None,
                         emsp: str | None = None) -> list[ProvisioningCertificate]:
    """A PCID's (as stored) provisioning certificates, newest first, in one session: ``oem``: those that
    OEM registered only; ``emsp``: none unless that eMSP has a contract with the vehicle."""
    with db.session() as s:
        stmt = select(ProvisioningCertificate).where(ProvisioningCertificate.pcid == pcid)
        if oem is not None:
            stmt = stmt.where(ProvisioningCertificate.oem == oem)
        if emsp is not None:
            has = s.exec(select(Contract).where(Contract.pcid == pcid, Contract.emsp == emsp)).first()
            if has is None:
                return []
        return list(s.exec(stmt.order_by(col(ProvisioningCertificate.id).desc())))


# -- the repository the OCPP and OPNC routes hold -------------------------------------------------------------


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


__all__ = ["CONTRACT_PROFILE", "ContractRow", "Contracts", "KeptAnswer", "StatusRow", "add_contract",
           "certificate_by_serials", "certificate_status", "clear_default", "contract_by_emaid", "default_contract",
           "keep_answer", "kept_answer", "list_contracts", "live_contract_certificates",
           "provisioning_by_fingerprint", "purge_answers", "status_and_contract", "terminate",
           "vehicle_provisioning"]
