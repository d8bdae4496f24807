"""eMSP contracts, the OEM provisioning-certificate pool, and Plug & Charge authorization status.

A contract binds an EMAID (owned by the eMSP's provider prefix) to a vehicle's PCID; one PCID may have
several contracts, one of them the default (ISO 15118-2 CertificateInstallation installs the default).
Terminating a contract revokes its contract certificates (RFC 5280 reason cessationOfOperation).

The statements are pki/store/contracts.py's (the installation's prepared lookups among them); this module
holds the rules: who may do what, which contract an installation delivers, how a chain is judged.
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

from pki import audit
from pki.context import Context
from pki.der import tbs_field
from pki.errors import AlreadyRevoked, BadCertificate, BadSubject, Conflict, NotFound, PKIError
from pki.names import normalise_emaid, normalise_pcid
from pki.orgs import Principal, check_owns
from pki.store import certificates
from pki.store import contracts as store
from pki.store.contracts import CONTRACT_PROFILE, ContractRow
from pki.store.db import utcnow
from pki.store.errors import Duplicate
from pki.store.models import Certificate, CertificateAuthority, Contract, ProvisioningCertificate

if TYPE_CHECKING:
    from pki.issuance import CAHandle


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
        # One default per (PCID, eMSP) (#21 item 1): only the caller's own contracts lose the flag;
        # another eMSP's contracts for the same vehicle are never touched.
        replaced = store.clear_default(s, v, p.org) if is_default else []
        c = Contract(emaid=e, pcid=v, emsp=p.org, valid_until=valid_until, is_default=is_default,
                     status="active", created_at=utcnow())
        try:
            # written before the audit entry (as the audit append's flush did), so a duplicate EMAID is
            # refused here and nothing of this transaction (the defaults cleared) is kept
            store.add_contract(s, c)
        except Duplicate:
            raise Conflict(f"a contract for EMAID {e} already exists") from None
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.create", object=e,
                                    details={"pcid": v, "is_default": is_default,
                                             **({"replaced_default": replaced} if replaced else {})}))
        s.commit()
        s.refresh(c)
        return c


def _scoped_contract(ctx: Context, p: Principal, emaid: str) -> Contract:
    e = normalise_emaid(emaid)
    c = store.contract_by_emaid(ctx.db, e, None if p.sees_all else p.org)
    if c is None:
        raise NotFound(f"no contract {e}")
    return c


def get_contract(ctx: Context, p: Principal, emaid: str) -> Contract:
    return _scoped_contract(ctx, p, emaid)


def list_contracts(ctx: Context, p: Principal, pcid: str | None = None) -> list[Contract]:
    return store.list_contracts(ctx.db, None if p.sees_all else p.org, normalise_pcid(pcid) if pcid else None)


def terminate_contract(ctx: Context, p: Principal, emaid: str) -> tuple[Contract, list[str]]:
    p.require("emsp", "admin")
    c = _scoped_contract(ctx, p, emaid)
    if c.status == "terminated":
        raise Conflict(f"contract {c.emaid} is already terminated")
    with ctx.db.session() as s:
        store.terminate(s, c.id, utcnow())
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.terminate", object=c.emaid))
        s.commit()
        certs = store.live_contract_certificates(s, c.emaid)
    revoked = []
    for cert in certs:
        try:
            ctx.engine.revoke(cert.serial, "cessationOfOperation", issuer=cert.issuer, actor=p.credential, org=p.org)
            revoked.append(f"{cert.issuer}/{cert.serial}")
        except PKIError:
            pass
    c.status = "terminated"
    return c, revoked


def default_contract_for(ctx: Context, pcid: str, emsp: str | None = None) -> ContractRow | None:
    """The contract an installation for ``pcid`` delivers (the rule in
    :func:`pki.store.contracts._default_contract_query`); with ``emsp``, that eMSP's own default for the
    PCID (None when it has no active contract for it). One prepared query."""
    return store.default_contract(ctx.db, normalise_pcid(pcid), utcnow(), emsp)


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

_PURGE_EVERY = 256  # about one installation in this many deletes the expired kept answers


def replayed_answer(ctx: Context, digest: str, contract_id: int) -> tuple[bytes, str] | None:
    """The signed answer (EXI, contract certificate serial) already given to the installation request whose
    signed body has SHA-256 ``digest`` for contract ``contract_id`` — None unless its contract certificate
    and the CPS certificate that signed it are still valid, unexpired, and every CA above them too (so a
    revocation or a superseding invalidates it in every process at once). One query."""
    found = store.kept_answer(ctx.db, digest, contract_id, utcnow())
    if found is None:
        return None
    for issuer, row in ((found.cert_issuer, _StatusRow(*found.cert)), (found.cps_issuer, _StatusRow(*found.cps))):
        try:
            ca = ctx.engine.ca(issuer).row
        except PKIError:
            return None
        if _judge(ctx, ca, row) != "Accepted":
            return None
    return found.response, found.cert_serial


def store_answer(ctx: Context, digest: str, contract_id: int, emaid: str, cert: tuple[str, str],
                 cps: tuple[str, str], exi: bytes, expires_at: datetime) -> None:
    """Keep an installation's signed answer for the vehicle's retries (replacing an earlier one for the same
    request and contract, whose certificate was then revoked or superseded). Ciphertext only: the contract
    key in it is encrypted for the vehicle's provisioning key."""
    now = utcnow()
    store.keep_answer(ctx.db, digest, contract_id, emaid, cert, cps, exi, expires_at, now)
    if random.randrange(_PURGE_EVERY) == 0:
        store.purge_answers(ctx.db, now)


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
    found = store.certificate_status(ctx.db, ca.name, _serial(cert))
    row = _StatusRow(*found) if found is not None else None
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
    found = store.status_and_contract(ctx.db, ca.name, _serial(cert), v, utcnow(), emsp)
    if found is None:
        return "CertChainError", None, None, False
    status_row, contract, has_valid = found
    row = _StatusRow(*status_row)
    status = _judge(ctx, ca, row)
    if status != "Accepted" or contract is None:
        return status, row, None, False
    return status, row, contract, has_valid


def _our_issuer_in(ctx: Context, cert: x509.Certificate, hierarchy: str) -> CertificateAuthority | None:
    _fresh_cas(ctx)
    ca = find_our_issuer(ctx, cert)
    if ca is None or ca.hierarchy != hierarchy and not (hierarchy == "mo" and ca.hierarchy == "v2g"):
        return None
    return ca


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")  # as stored: hex


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
        existing = store.provisioning_by_fingerprint(s, fp)
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
    if p.role == "oem":
        return store.vehicle_provisioning(ctx.db, v, oem=p.org)
    if p.role == "emsp":  # an eMSP may look up vehicles it has a contract with
        return store.vehicle_provisioning(ctx.db, v, emsp=p.org)
    if not p.sees_all:
        return []
    return store.vehicle_provisioning(ctx.db, v)


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
        row = store.certificate_by_serials(ctx.db, h.name, _serial_candidates(serial))
        if row is not None:
            return row
    return None


def authorize(ctx: Context, emaid: str, hash_data: list[dict[str, str]] | None = None,
              certificate_pem: str | None = None) -> AuthorizeResult:
    try:
        e = normalise_emaid(emaid)
    except BadSubject:
        return AuthorizeResult("Invalid", None)
    contract = store.contract_by_emaid(ctx.db, e)
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
