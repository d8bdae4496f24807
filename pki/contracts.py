"""eMSP contracts, the OEM provisioning-certificate pool, and Plug & Charge authorization status.

A contract binds an EMAID (owned by the eMSP's provider prefix) to a vehicle's PCID; one PCID may have
several contracts, one of them the default (ISO 15118-2 CertificateInstallation installs the default).
Terminating a contract revokes its contract certificates (RFC 5280 reason cessationOfOperation).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from sqlalchemy import Select, bindparam, delete, func, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from pki import audit
from pki.context import Context
from pki.der import tbs_field
from pki.errors import AlreadyRevoked, BadCertificate, BadSubject, Conflict, NotFound, PKIError
from pki.names import normalise_emaid, normalise_pcid
from pki.orgs import Principal, check_owns
from pki.store import certificates
from pki.store.db import utcnow
from pki.store.fast import Prepared
from pki.store.models import Certificate, CertificateAuthority, Contract, CpsReplay, ProvisioningCertificate

if TYPE_CHECKING:
    from pki.issuance import CAHandle

_CONTRACT = Contract.__table__  # type: ignore[attr-defined]
_CERT = Certificate.__table__  # type: ignore[attr-defined]
_CONTRACT_COLS = tuple(c.name for c in _CONTRACT.columns)


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
# The profile of the contract certificates the CPS issues (and supersedes, #21 item 2).
CONTRACT_PROFILE = "contract"
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


@dataclass
class _StatusRow:
    status: str
    not_before: datetime
    not_after: datetime


def create_contract(ctx: Context, p: Principal, emaid: str, pcid: str, valid_until: datetime,
                    *, is_default: bool = True) -> Contract:
    p.require("emsp", "admin")
    e = normalise_emaid(emaid)
    v = normalise_pcid(pcid)
    check_owns(p, "emaid", e)
    if valid_until <= utcnow():
        raise BadSubject("valid_until must be in the future")
    with ctx.db.session() as s:
        replaced: list[str] = []
        if is_default:
            # One default per (PCID, eMSP) (#21 item 1): only the caller's own contracts lose the flag;
            # another eMSP's contracts for the same vehicle are never touched.
            mine = (col(Contract.pcid) == v, col(Contract.status) == "active", col(Contract.emsp) == p.org,
                    col(Contract.is_default).is_(True))
            old = list(s.exec(select(Contract.id, Contract.emaid).where(*mine)))
            replaced = [emaid for _, emaid in old]
            if replaced:
                s.execute(update(Contract).where(*mine).values(is_default=False))
                # the kept installation answers of a contract that is no longer the default (#21 item 2)
                s.execute(delete(CpsReplay).where(col(CpsReplay.contract_id).in_([i for i, _ in old])))
        c = Contract(emaid=e, pcid=v, emsp=p.org, valid_until=valid_until, is_default=is_default,
                     status="active", created_at=utcnow())
        s.add(c)
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.create", object=e,
                                    details={"pcid": v, "is_default": is_default,
                                             **({"replaced_default": replaced} if replaced else {})}))
        try:
            s.commit()
        except IntegrityError:
            raise Conflict(f"a contract for EMAID {e} already exists") from None
        s.refresh(c)
        return c


def _scoped_contract(ctx: Context, p: Principal, emaid: str) -> Contract:
    e = normalise_emaid(emaid)
    with ctx.db.session() as s:
        stmt = select(Contract).where(Contract.emaid == e)
        if not p.sees_all:
            stmt = stmt.where(Contract.emsp == p.org)
        c = s.exec(stmt).first()
    if c is None:
        raise NotFound(f"no contract {e}")
    return c


def get_contract(ctx: Context, p: Principal, emaid: str) -> Contract:
    return _scoped_contract(ctx, p, emaid)


def list_contracts(ctx: Context, p: Principal, pcid: str | None = None) -> list[Contract]:
    with ctx.db.session() as s:
        stmt = select(Contract).order_by(col(Contract.id))
        if not p.sees_all:
            stmt = stmt.where(Contract.emsp == p.org)
        if pcid:
            stmt = stmt.where(Contract.pcid == normalise_pcid(pcid))
        return list(s.exec(stmt))


def terminate_contract(ctx: Context, p: Principal, emaid: str) -> tuple[Contract, list[str]]:
    p.require("emsp", "admin")
    c = _scoped_contract(ctx, p, emaid)
    if c.status == "terminated":
        raise Conflict(f"contract {c.emaid} is already terminated")
    with ctx.db.session() as s:
        s.execute(update(Contract).where(col(Contract.id) == c.id).values(status="terminated",
                                                                        terminated_at=utcnow(), is_default=False))
        s.execute(delete(CpsReplay).where(col(CpsReplay.contract_id) == c.id))  # #21 item 2
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.terminate", object=c.emaid))
        s.commit()
        certs = list(s.exec(select(Certificate).where(
            Certificate.identifier == c.emaid, col(Certificate.profile).in_(["contract", "contract-20"]),
            col(Certificate.status).in_(["valid", "hold"]))))
    revoked = []
    for cert in certs:
        try:
            ctx.engine.revoke(cert.serial, "cessationOfOperation", issuer=cert.issuer, actor=p.credential, org=p.org)
            revoked.append(f"{cert.issuer}/{cert.serial}")
        except PKIError:
            pass
    c.status = "terminated"
    return c, revoked


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


def default_contract_for(ctx: Context, pcid: str, emsp: str | None = None) -> ContractRow | None:
    """The contract an installation for ``pcid`` delivers (the rule in :func:`_default_contract_query`);
    with ``emsp``, that eMSP's own default for the PCID (None when it has no active contract for it)."""
    v = normalise_pcid(pcid)
    now = utcnow()
    params: dict[str, Any] = {"b_pcid": v, "b_now": now}
    if emsp is not None:
        params["b_emsp"] = emsp
    # Core on a plain connection (every installation runs this; the ORM session cost more than the query).
    rows = _DEFAULT_CONTRACT[emsp is not None].fetch_on(ctx.db.autocommit, params)
    return ContractRow(*rows[0]) if rows else None


def supersede_contract_certificates(ctx: Context, emaid: str, new: tuple[str, str],
                                    keep: tuple[str, str] | None = None, *, actor: str) -> list[str]:
    """Revoke, with RFC 5280 reason ``superseded``, the contract's other valid contract certificates
    issued before ``new`` (issuer, serial), except ``keep`` (an update's current certificate, which the
    vehicle still holds until it has the new one). #21 item 2: a replayed CertificateInstallationReq
    (same vehicle, same contract) must not leave two valid contract certificates for one EMAID and PCID.

    "Before ``new``" (a smaller row id): of two installations racing for one contract, the later one
    supersedes the earlier, never both each other. Returns the revoked certificates as issuer/serial."""
    seen: dict[tuple[str, str], int] = {}

    def spared(row_id: int, issuer: str, serial: str) -> bool:
        seen[(issuer, serial)] = row_id
        return (issuer, serial) in (new, keep)

    # Whole rows (revoke_row reads none again), but the new certificate and ``keep``.
    rows = certificates.valid_of_identifier(ctx.db, emaid, CONTRACT_PROFILE, spared)
    new_id = seen.get(new)
    revoked = []
    for row in rows:
        if new_id is not None and row.id is not None and row.id > new_id:
            continue
        try:
            ctx.engine.revoke_row(row, "superseded", actor=actor, org=row.tenant)
        except AlreadyRevoked:  # a concurrent installation of the same contract got there first
            continue
        revoked.append(f"{row.issuer}/{row.serial}")
    return revoked


# -- replayed installations (#21 item 2) ---------------------------------------------------------------

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
_PURGE_EVERY = 256  # about one installation in this many deletes the expired kept answers


def replayed_answer(ctx: Context, digest: str, contract_id: int) -> tuple[bytes, str] | None:
    """The signed answer (EXI, contract certificate serial) already given to the installation request whose
    signed body has SHA-256 ``digest`` for contract ``contract_id`` — None unless its contract certificate
    and the CPS certificate that signed it are still valid, unexpired, and every CA above them too (so a
    revocation or a superseding invalidates it in every process at once). One query."""
    found = _REPLAYED.fetch_on(ctx.db.autocommit, {"b_digest": digest, "b_contract": contract_id,
                                                   "b_now": utcnow()})
    if not found:
        return None
    response, cert_issuer, cert_serial, *cert, cps_issuer, cps_status, cps_nb, cps_na = found[0]
    for issuer, row in ((cert_issuer, _StatusRow(*cert)), (cps_issuer, _StatusRow(cps_status, cps_nb, cps_na))):
        try:
            ca = ctx.engine.ca(issuer).row
        except PKIError:
            return None
        if _judge(ctx, ca, row) != "Accepted":
            return None
    return bytes(response), cert_serial


def store_answer(ctx: Context, digest: str, contract_id: int, emaid: str, cert: tuple[str, str],
                 cps: tuple[str, str], exi: bytes, expires_at: datetime) -> None:
    """Keep an installation's signed answer for the vehicle's retries (replacing an earlier one for the same
    request and contract, whose certificate was then revoked or superseded). Ciphertext only: the contract
    key in it is encrypted for the vehicle's provisioning key."""
    now = utcnow()
    stmt = _STORE_ANSWER["sqlite" if ctx.db.is_sqlite else "postgresql"]
    stmt.execute_on(ctx.db.autocommit, {
        "b_request_digest": digest, "b_contract_id": contract_id, "b_emaid": emaid, "b_cert_issuer": cert[0],
        "b_cert_serial": cert[1], "b_cps_issuer": cps[0], "b_cps_serial": cps[1], "b_response": exi,
        "b_expires_at": expires_at, "b_created_at": now})
    if random.randrange(_PURGE_EVERY) == 0:
        with ctx.db.autocommit.begin() as conn:
            conn.execute(delete(CpsReplay).where(col(CpsReplay.expires_at) <= now))


# -- chain checks ------------------------------------------------------------------------------------


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    pub = issuer.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(pub, ed448.Ed448PublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, AssertionError):
        return False
    return True


# Certificates already matched to the CA whose key signed them, by their DER: a vehicle's provisioning
# certificate is presented at every installation, and its ECDSA verification (≈ 110 µs) was the largest
# single cost of the chain check. Whether a signature verifies under a key never changes, so the result
# may be kept; it is only used while that CA's handle is still the engine's (a re-keyed or removed CA
# gets a new handle, and the certificate is verified again). Bounded; cleared when full.
_ISSUER_OF: dict[bytes, CAHandle] = {}
_ISSUER_OF_MAX = 4096


def find_our_issuer(ctx: Context, cert: x509.Certificate) -> CertificateAuthority | None:
    der = cert.public_bytes(serialization.Encoding.DER)
    known = _ISSUER_OF.get(der)
    if known is not None:
        try:
            if ctx.engine.ca(known.name) is known:
                return known.row
        except PKIError:
            pass
    # Candidates by the issuer Name's DER (RFC 5280 §7.1 name matching is by value; our CAs' names are
    # ours, byte-stable), then the signature decides. Reading the DER avoids building Name objects per
    # CA per request; an unparsable TBS falls back to comparing Name objects.
    want = _issuer_der(cert)
    for h in ctx.engine.cas():
        same = (h.subject_der == want) if want is not None else (h.cert.subject == cert.issuer)
        if same and verify_issued_by(cert, h.cert):
            if len(_ISSUER_OF) >= _ISSUER_OF_MAX:
                _ISSUER_OF.clear()
            _ISSUER_OF[der] = h
            return h.row
    return None


def _issuer_der(cert: x509.Certificate) -> bytes | None:
    return tbs_field(cert.tbs_certificate_bytes, 2)  # serial, signature, issuer (RFC 5280 §4.1)


_CA_REFRESH_SECONDS = 5.0


def _fresh_cas(ctx: Context) -> None:
    """CA rows (status, validity) are cached by the engine; refresh them at most every few seconds so a
    CA revoked by another process is seen here within that bound without a query per chain level."""
    ctx.engine.reload_cas_if_older(_CA_REFRESH_SECONDS)


def chain_status(ctx: Context, cert: x509.Certificate, hierarchy: str) -> tuple[str, Any]:
    """Accepted | CertChainError | CertificateExpired | CertificateRevoked for one certificate issued by
    one of our CAs of the given hierarchy, walking its CA chain (every CA must be valid and not revoked).

    One query (the certificate's own status and validity, returned as the second element, or None); the
    CA chain comes from the engine's CA cache, whose status column follows revocations of CA certificates
    (pki/issuance.py)."""
    ca = _our_issuer_in(ctx, cert, hierarchy)
    if ca is None:
        return "CertChainError", None
    return _status_of(ctx, ca, cert)


def _status_of(ctx: Context, ca: CertificateAuthority, cert: x509.Certificate) -> tuple[str, _StatusRow | None]:
    """The certificate's own row (one query) judged with its issuer's CA chain."""
    found = _CERT_STATUS.fetch_on(ctx.db.autocommit, _status_params(ca, cert))
    row = _StatusRow(*found[0]) if found else None
    return _judge(ctx, ca, row), row


def provisioning_status_and_contract(ctx: Context, cert: x509.Certificate,
                                     pcid: str) -> tuple[str, _StatusRow | None, ContractRow | None]:
    """What a contract installation looks up before it issues: :func:`chain_status` of the vehicle's OEM
    provisioning certificate and :func:`default_contract_for` its PCID — in ONE query (a round trip, a pool
    checkout and a statement fewer per installation; on PostgreSQL the round trip is most of a lookup's
    cost). The contract is None when the status is not Accepted or the PCID has no active contract."""
    return installation_lookup(ctx, cert, pcid)[:3]


def installation_lookup(ctx: Context, cert: x509.Certificate, pcid: str, emsp: str | None = None
                        ) -> tuple[str, _StatusRow | None, ContractRow | None, bool]:
    """:func:`provisioning_status_and_contract`, scoped to ``emsp``'s own contracts when given, plus
    whether the contract already has a valid contract certificate (then the installation supersedes it)."""
    ca = _our_issuer_in(ctx, cert, "oem")
    if ca is None:
        return "CertChainError", None, None, False
    try:
        v = normalise_pcid(pcid)
    except PKIError:  # not a PCID: no contract can match; the status still decides first
        return (*_status_of(ctx, ca, cert), None, False)
    params = _status_params(ca, cert)
    params.update(b_pcid=v, b_now=utcnow())
    if emsp is not None:
        params["b_emsp"] = emsp
    found = _STATUS_AND_CONTRACT[emsp is not None].fetch_on(ctx.db.autocommit, params)
    if not found:
        return "CertChainError", None, None, False
    row = _StatusRow(*found[0][:3])
    status = _judge(ctx, ca, row)
    contract, has_valid = found[0][3:-1], found[0][-1] is not None
    if status != "Accepted" or contract[0] is None:
        return status, row, None, False
    return status, row, ContractRow(*contract), has_valid


def _our_issuer_in(ctx: Context, cert: x509.Certificate, hierarchy: str) -> CertificateAuthority | None:
    _fresh_cas(ctx)
    ca = find_our_issuer(ctx, cert)
    if ca is None or ca.hierarchy != hierarchy and not (hierarchy == "mo" and ca.hierarchy == "v2g"):
        return None
    return ca


def _status_params(ca: CertificateAuthority, cert: x509.Certificate) -> dict[str, Any]:
    return {"b_issuer": ca.name, "b_serial": format(cert.serial_number, "x")}


def _judge(ctx: Context, ca: CertificateAuthority, row: _StatusRow | None) -> str:
    """The certificate's own row (None: not ours), then every CA up to its root (RFC 5280 §6.1: each
    certificate of the path within its validity and not revoked)."""
    if row is None:
        return "CertChainError"
    if row.status != "valid":
        return "CertificateRevoked"
    now = utcnow()
    if not (row.not_before <= now < row.not_after):
        return "CertificateExpired"
    cur: str | None = ca.name
    seen: set[str] = set()
    while cur is not None and cur not in seen:
        seen.add(cur)
        try:
            h = ctx.engine.ca(cur)
        except PKIError:
            return "CertChainError"
        if h.row.status == "revoked":
            return "CertificateRevoked"
        if not (h.row.not_before <= now < h.row.not_after):
            return "CertificateExpired"
        cur = h.row.parent
    return "Accepted"


# -- provisioning certificate pool --------------------------------------------------------------------


def register_provisioning_certificate(ctx: Context, p: Principal, pem_or_der: bytes) -> ProvisioningCertificate:
    """OEMs register vehicles' provisioning certificates (chain to one of our OEM CAs, CN = PCID under
    the OEM's WMI, DC=OEM), so contract data can be prepared before the car plugs in."""
    p.require("oem", "admin")
    try:
        cert = (x509.load_pem_x509_certificate(pem_or_der) if pem_or_der.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(pem_or_der))
    except ValueError:
        raise BadCertificate("not a certificate (PEM or DER)") from None
    status, _ = chain_status(ctx, cert, "oem")
    if status != "Accepted":
        raise BadCertificate(f"provisioning certificate not accepted: {status}")
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cn:
        raise BadCertificate("provisioning certificate has no CN")
    pcid = normalise_pcid(str(cn[0].value))
    check_owns(p, "pcid", pcid)
    der = cert.public_bytes(serialization.Encoding.DER)
    fp = hashlib.sha256(der).hexdigest()
    with ctx.db.session() as s:
        existing = s.exec(select(ProvisioningCertificate).where(ProvisioningCertificate.fingerprint == fp)).first()
        if existing is not None:
            return existing
        row = ProvisioningCertificate(pcid=pcid, oem=p.org, fingerprint=fp, not_after=cert.not_valid_after_utc,
                                      der=der, created_at=utcnow())
        s.add(row)
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="provisioning.register", object=pcid))
        s.commit()
        s.refresh(row)
        return row


def lookup_vehicle(ctx: Context, p: Principal, pcid: str) -> list[ProvisioningCertificate]:
    v = normalise_pcid(pcid)
    with ctx.db.session() as s:
        stmt = select(ProvisioningCertificate).where(ProvisioningCertificate.pcid == v)
        if p.role == "oem":
            stmt = stmt.where(ProvisioningCertificate.oem == p.org)
        elif p.role == "emsp":
            # an eMSP may look up vehicles it has a contract with
            has = s.exec(select(Contract).where(Contract.pcid == v, Contract.emsp == p.org)).first()
            if has is None:
                return []
        elif not p.sees_all:
            return []
        return list(s.exec(stmt.order_by(col(ProvisioningCertificate.id).desc())))


# -- Plug & Charge authorization (OCPP 2.0.1 AuthorizeRequest) ----------------------------------------


@dataclass
class AuthorizeResult:
    id_token_status: str  # OCPP AuthorizationStatusEnumType
    certificate_status: str | None  # OCPP AuthorizeCertificateStatusEnumType


_HASHES = {"SHA256": hashlib.sha256, "SHA384": hashlib.sha384, "SHA512": hashlib.sha512}


def _decode_hash(value: str, size: int) -> bytes | None:
    import base64
    import binascii

    v = value.strip()
    try:
        if len(v) == 2 * size:
            return bytes.fromhex(v)
    except ValueError:
        pass
    for dec in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = dec(v + "=" * (-len(v) % 4))
            if len(raw) == size:
                return raw
        except (binascii.Error, ValueError):
            continue
    return None


def _serial_candidates(s: str) -> list[str]:
    t = s.strip().lower().replace(":", "")
    out = []
    try:
        out.append(format(int(t, 16), "x"))
    except ValueError:
        pass
    if t.isdigit():
        out.append(format(int(t, 10), "x"))
    return out


def find_by_hash_data(ctx: Context, alg: str, name_hash: str, key_hash: str, serial: str) -> Certificate | None:
    from pki.der import spki_key_bits

    fn = _HASHES.get(alg.upper())
    if fn is None:
        return None
    size = fn().digest_size
    nh, kh = _decode_hash(name_hash, size), _decode_hash(key_hash, size)
    if nh is None or kh is None:
        return None
    for h in ctx.engine.cas():
        if fn(h.cert.subject.public_bytes()).digest() != nh:
            continue
        if fn(spki_key_bits(h.cert)).digest() != kh:
            continue
        with ctx.db.session() as s:
            for cand in _serial_candidates(serial):
                row = s.exec(select(Certificate).where(Certificate.issuer == h.name,
                                                       Certificate.serial == cand)).first()
                if row is not None:
                    return row
    return None


def authorize(ctx: Context, emaid: str, hash_data: list[dict[str, str]] | None = None,
              certificate_pem: str | None = None) -> AuthorizeResult:
    try:
        e = normalise_emaid(emaid)
    except BadSubject:
        return AuthorizeResult("Invalid", None)
    with ctx.db.session() as s:
        contract = s.exec(select(Contract).where(Contract.emaid == e)).first()
    if contract is None:
        return AuthorizeResult("Unknown", None)
    if contract.status == "terminated":
        return AuthorizeResult("Invalid", "ContractCancelled")
    if contract.valid_until <= utcnow():
        return AuthorizeResult("Expired", "ContractCancelled")
    if certificate_pem:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode())
        except ValueError:
            return AuthorizeResult("Invalid", "SignatureError")
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not cn or normalise_emaid(str(cn[0].value)) != e:
            return AuthorizeResult("Invalid", "CertChainError")
        status, _ = chain_status(ctx, cert, "mo")
        return AuthorizeResult("Accepted" if status == "Accepted" else "Invalid", status)
    if hash_data:
        leaf_found = False
        for entry in hash_data[:4]:
            row = find_by_hash_data(ctx, entry.get("hashAlgorithm", ""), entry.get("issuerNameHash", ""),
                                    entry.get("issuerKeyHash", ""), entry.get("serialNumber", ""))
            if row is None:
                return AuthorizeResult("Invalid", "CertChainError")
            if row.status != "valid":
                return AuthorizeResult("Invalid", "CertificateRevoked")
            if row.not_after <= utcnow():
                return AuthorizeResult("Invalid", "CertificateExpired")
            if row.identifier == e:
                leaf_found = True
        if not leaf_found:
            return AuthorizeResult("Invalid", "CertChainError")
        return AuthorizeResult("Accepted", "Accepted")
    return AuthorizeResult("Accepted", None)


__all__ = ["AuthorizeResult", "authorize", "create_contract", "terminate_contract"]
