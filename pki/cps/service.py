"""Certificate provisioning service (CPS): ISO 15118-2 CertificateInstallation and CertificateUpdate.

Installation (shared profiles doc §4):
  1. decode the vehicle's EXI V2G_Message; take its OEM provisioning certificate (sent alone);
  2. check that certificate chains to one of our OEM CAs and is valid and not revoked, and verify the
     request's header signature with its key;
  3. find the default contract for its PCID (CN);
  4. generate the contract key (P-256, software: the one key the service ever holds, and only on its way
     to the vehicle), issue the contract certificate (CN = EMAID) from MO Sub-CA 2 in the HSM;
  5. encrypt the contract key for the vehicle [V2G2-818..820] (ECDH with the provisioning key; for an
     update with the current contract certificate's key [V2G2-821]);
  6. sign ContractSignatureCertChain, ContractSignatureEncryptedPrivateKey, DHpublickey and eMAID with the
     CPS leaf key (HSM) as the standard's EXI XML signature, SessionID copied from the request.

Failures are answered inside the protocol where the standard says so: a V2G_Message whose ResponseCode
is FAILED_* (with the mandatory elements present but empty, unsigned), so the charger always has an
exiResponse to forward.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC
from functools import partial
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.keystore import certified_signer
from pki.context import Context
from pki.contracts import (
    ContractRow,
    chain_status,
    find_our_issuer,
    installation_lookup,
    replayed_answer,
    store_answer,
    supersede_contract_certificates,
)
from pki.cps.errors import (
    ActionMismatch,
    CPSError,
    CPSFailure,
    ExiError,
    KeyWrapError,
    ResponseTooLarge,
    SignatureVerificationFailed,
    XmlDsigError,
)
from pki.cps.exi import (
    EMAID,
    CertificateChain,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    CertificateUpdateRes,
    DHPublicKey,
    EncryptedPrivateKey,
    MessageHeader,
    Node,
    V2GMessage,
    decode_message,
    decode_message_tree,
    encode_message,
)
from pki.cps.exi.messages import ResponseCode, X509IssuerSerial
from pki.cps.keywrap import wrap_contract_key
from pki.cps.xmldsig import sign_contract_response, signer_public_key, verify_request
from pki.csr import SubjectFields
from pki.errors import NotFound, PKIError
from pki.issuance import CAHandle, IssueRequest, der
from pki.names import normalise_emaid
from pki.observers import Deferred
from pki.store.contracts import Contracts
from pki.store.db import Session, utcnow
from pki.store.inventory import Inventory
from pki.store.models import Certificate, Contract

EXI_REQUEST_MAX_B64 = 5600  # OCPP 2.0.1 Get15118EVCertificateRequest.exiRequest maxLength
EXI_RESPONSE_MAX_B64 = 7500  # Get15118EVCertificateResponse.exiResponse maxLength
MAX_ROOT_IDS = 20  # ListOfRootCertificateIDs maxOccurs
MAX_CERTIFICATE_OCTETS = 800  # [V2G2-010]; the engine refuses a larger certificate (CertificateTooLarge)

log = logging.getLogger(__name__)
Kind = Literal["install", "update"]


@dataclass
class Delivery:
    message: V2GMessage
    exi: bytes
    response_code: ResponseCode
    emaid: str | None = None
    contract_serial: str | None = None
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=4096)
def _norm_name(s: str) -> frozenset[str]:
    """Issuer names arrive in different renderings (RFC 2253/4514, Python str(Name), OpenSSL one-line):
    compare as a set of normalised 'type=value' pairs. Python's str(Name) is repr-like,
    '<Name(CN=...,O=...)>' (what Josev's EVCC sends, from get_cert_issuer_serial): unwrap it first."""
    s = s.strip()
    if s.startswith("<Name(") and s.endswith(")>"):
        s = s[6:-2]
    parts = re.split(r"\s*(?<!\\)[,/]\s*", s.strip("/"))
    aliases = {"commonname": "cn", "organizationname": "o", "countryname": "c", "domaincomponent": "dc",
               "0.9.2342.19200300.100.1.25": "dc", "2.5.4.3": "cn", "2.5.4.10": "o", "2.5.4.6": "c"}
    out = set()
    for p in parts:
        if "=" not in p:
            continue
        k, v = p.split("=", 1)
        k = k.strip().lower()
        out.add(f"{aliases.get(k, k)}={v.strip().lower()}")
    return frozenset(out)


_SUBJECTS: dict[bytes, str] = {}


def _subject_text(h: CAHandle) -> str:
    """The CA's subject as RFC 4514 text, once per CA certificate (every installation compares it)."""
    text = _SUBJECTS.get(h.row.der)
    if text is None:
        if len(_SUBJECTS) > 1000:
            _SUBJECTS.clear()
        text = _SUBJECTS[h.row.der] = h.cert.subject.rfc4514_string()
    return text


def _matches_root(root: CAHandle, ids: tuple[X509IssuerSerial, ...]) -> bool:
    want = _norm_name(_subject_text(root))
    for rid in ids:
        if rid.serial_number == root.cert.serial_number and (
            _norm_name(rid.issuer_name) == want or not rid.issuer_name
        ):
            return True
    return False


def _root_name(ctx: Context, name: str) -> str:
    cur = ctx.engine.ca(name)
    while cur.row.parent is not None:
        cur = ctx.engine.ca(cur.row.parent)
    return cur.name


def _pick_ca(ctx: Context, profile_names: set[str], ids: tuple[X509IssuerSerial, ...]) -> CAHandle | None:
    """The contract's issuing CA: an active P-256 MO Sub-CA 2, preferring one whose root the vehicle lists
    in ListOfRootCertificateIDs, else the newest (#21 item 15).

    ISO 15118-2 §8.4.3.11.2 (ListOfRootCertificateIDs) lets the SECC/CPS pick a *CPS* chain the vehicle
    can verify; the contract chain is the eMSP's (MO root, or an MO Sub-CA under a V2G root), which the
    vehicle stores and presents to the SECC, it does not verify it against its own roots at installation
    (V2G2-823 checks only that the decrypted key matches the certificate). Real EVCCs (Josev) list only
    their V2G root(s), so requiring the MO root to be listed refused every such vehicle."""
    cands = [h for h in ctx.engine.cas() if h.row.profile in profile_names and h.row.status == "active"
             and h.alg.value == "p256"]
    if not cands:
        return None
    cands.sort(key=lambda h: -h.row.not_after.timestamp())
    for h in cands:
        if _matches_root(ctx.engine.ca(_root_name(ctx, h.name)), ids):
            return h
    return cands[0]


# Caches of what every installation looks up but rarely changes: the valid CPS leaves and the eMSPs'
# display names (ctx.cps_cache, one per Context). Kept CACHE_SECONDS at most, and dropped at once when this
# process revokes a certificate (CpsCacheOnRevocation, an engine observer connected in pki/wiring.py), so a
# revoked CPS certificate is never used again by this process and for at most CACHE_SECONDS by another one
# (the same bound as the engine's CA cache).
CACHE_SECONDS = 5.0


def _cache(ctx: Context) -> dict[str, tuple[float, Any]]:
    return ctx.cps_cache


class CpsCacheOnRevocation:
    """Drops the cached CPS leaves and chains when a certificate is revoked — unless an MO CA issued it (a
    contract certificate, e.g. one an installation supersedes): nothing cached here comes from those."""

    def __init__(self, ctx: Deferred[Context]) -> None:
        self.ctx = ctx

    def in_transaction(self, session: Session, cert: Certificate) -> None:
        pass

    def after_commit(self, cert: Certificate) -> None:
        ctx = self.ctx.get()
        try:
            if ctx.engine.ca(cert.issuer).row.hierarchy == "mo":
                return
        except PKIError:
            pass
        ctx.cps_cache.clear()


def _cached(ctx: Context, key: str, load: Callable[[], Any]) -> Any:
    c = _cache(ctx)
    hit = c.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < CACHE_SECONDS:
        return hit[1]
    value = load()
    c[key] = (now, value)
    return value


def _cps_rows(ctx: Context) -> list[Certificate]:
    return Inventory(ctx.db).service_leaves(["cps-leaf"], utcnow())


def _cps_signer(ctx: Context, ids: tuple[X509IssuerSerial, ...]) -> tuple[Certificate, list[bytes]]:
    """The newest valid CPS leaf (key held in the HSM) whose V2G root the vehicle trusts."""
    now = utcnow()
    for row in _cached(ctx, "cps-rows", lambda: _cps_rows(ctx)):
        if row.not_after.replace(tzinfo=UTC) <= now:
            continue
        root = ctx.engine.ca(_root_name(ctx, row.issuer))
        if _matches_root(root, ids):
            return row, list(_cached(ctx, f"cps-chain:{row.issuer}", partial(_chain_der, ctx, row.issuer)))
    raise CPSFailure(ResponseCode.FAILED_NoCertificateAvailable,
                     "no CPS certificate chains to a V2G root the vehicle trusts")


def _chain_der(ctx: Context, issuer: str) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in ctx.engine.chain(issuer)[:-1]]


def _org_display_name(ctx: Context, emsp: str) -> str:
    def load() -> str:
        from pki.store.orgs import org_by_name

        org = org_by_name(ctx.db, emsp)
        return str((org.settings or {}).get("organization_name") or emsp) if org else emsp

    return str(_cached(ctx, f"org:{emsp}", load))


def _failed(session_id: bytes, code: ResponseCode, update: bool) -> V2GMessage:
    empty_chain = CertificateChain(b"", (), "id1")
    args = dict(
        response_code=code,
        sa_provisioning_certificate_chain=CertificateChain(b""),
        contract_signature_cert_chain=empty_chain,
        # The schema requires these elements even in a FAILED_* response and constrains their lengths
        # (48-octet key, 65-octet point, 14–15 character eMAID): schema-valid placeholders, not signed.
        contract_signature_encrypted_private_key=EncryptedPrivateKey(bytes(48), "id2"),
        dh_public_key=DHPublicKey(b"\x04" + bytes(64), "id3"),
        emaid=EMAID("0" * 14, "id4"),
    )
    body: CertificateInstallationRes | CertificateUpdateRes = (
        CertificateUpdateRes(**args) if update else CertificateInstallationRes(**args)  # type: ignore[arg-type]
    )
    return V2GMessage(MessageHeader(session_id), body)


def _contract_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def deliver(ctx: Context, exi_request: bytes, *, actor: str = "cps", expect: Kind | None = None,
            emsp: str | None = None) -> Delivery:
    """Answer a CertificateInstallationReq or CertificateUpdateReq V2G_Message (EXI in, EXI out).

    ``expect``: the kind the caller asked for (OCPP ``action`` Install | Update, or the endpoint); a body
    of the other kind raises :class:`ActionMismatch` before anything is looked up or issued (#21 item 16).
    ``emsp``: an eMSP asking for itself — only its own contract is delivered (its default for the PCID,
    or the update's contract if it is the eMSP's), else :class:`NotFound`, like /v1/contract-data
    (#21 item 2)."""
    try:
        # decoded once: the signature check re-encodes the body from this tree (its bits kept, for_verify)
        tree = decode_message_tree(exi_request, for_verify=True)
        request = V2GMessage.from_node(tree)
    except ExiError as exc:
        raise CPSError(f"exiRequest is not a valid ISO 15118-2 EXI V2G_Message: {exc.message}") from None
    body = request.body
    session_id = request.header.session_id
    update = isinstance(body, CertificateUpdateReq)
    if not isinstance(body, CertificateInstallationReq | CertificateUpdateReq):
        raise CPSError("exiRequest is neither a CertificateInstallationReq nor a CertificateUpdateReq")
    if expect is not None and (expect == "update") != update:
        raise ActionMismatch(f"action {'Update' if expect == 'update' else 'Install'} does not match the EXI "
                             f"request ({type(body).__name__})")
    try:
        return _deliver(ctx, tree, request, body, session_id, actor, emsp)
    except CPSFailure as f:
        return _failure(session_id, ResponseCode(f.response_code), update, f.message)


def refusal(exi_request: bytes, code: ResponseCode, note: str) -> Delivery:
    """The unsigned FAILED_* answer to a request that `deliver` refused with a typed error after decoding it
    (an eMSP's :class:`NotFound`), for an API whose error answer carries the ISO 15118-2 response anyway:
    OPCP ccp.v1.json's 404 (api/opcp/ccp.py). Same shape as `deliver`'s FAILED_* answers: the request's
    SessionID, the mandatory elements as placeholders."""
    request = decode_message(exi_request)
    return _failure(request.header.session_id, code, isinstance(request.body, CertificateUpdateReq), note)


def _failure(session_id: bytes, code: ResponseCode, update: bool, note: str) -> Delivery:
    msg = _failed(session_id, code, update)
    return Delivery(msg, encode_message(msg), code, notes=[note])


def _deliver(ctx: Context, raw: Node, request: V2GMessage, body: CertificateInstallationReq | CertificateUpdateReq,
             session_id: bytes, actor: str, emsp: str | None) -> Delivery:
    ids = body.root_certificate_ids[:MAX_ROOT_IDS]
    contract: Contract | ContractRow | None
    keep: tuple[str, str] | None = None  # an update's current certificate: not superseded
    supersede = True
    remember: str | None = None  # an installation's request digest: its answer is kept for retries
    if isinstance(body, CertificateInstallationReq):
        try:
            vehicle_cert = x509.load_der_x509_certificate(body.oem_provisioning_cert)
        except ValueError:
            raise CPSFailure(ResponseCode.FAILED_CertChainError, "OEM provisioning certificate is not DER") from None
        cn = vehicle_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        pcid = str(cn[0].value).upper() if cn else ""
        # The certificate's status and the PCID's default contract in one query; judged in this order:
        # chain, DC=OEM, request signature, contract.
        status, _, contract, supersede = installation_lookup(ctx, vehicle_cert, pcid, emsp)
        _status_failure(status, "OEM provisioning certificate")
        dcs = vehicle_cert.subject.get_attributes_for_oid(x509.NameOID.DOMAIN_COMPONENT)
        if not dcs or str(dcs[0].value).upper() != "OEM":
            # The provisioning service checks DC=OEM (shared profiles doc §2).
            raise CPSFailure(ResponseCode.FAILED_CertChainError, "provisioning certificate lacks DC=OEM")
        vehicle_key = _verify(raw, vehicle_cert, request)
        if contract is None:
            if emsp is not None:  # the same answer whether the PCID has no contract or another eMSP's
                raise NotFound(f"no active contract of yours for PCID {pcid}")
            raise CPSFailure(ResponseCode.FAILED_NoCertificateAvailable, f"no active contract for PCID {pcid}")
        # The SHA-256 of the body the vehicle signed: _verify checked that it is the Reference's DigestValue.
        assert request.header.signature is not None and contract.id is not None
        remember = request.header.signature.signed_info.references[0].digest_value.hex()
        if supersede:  # the contract has a valid certificate already: perhaps this very request's answer
            again = _replay(ctx, remember, contract, session_id)
            if again is not None:
                return again
    else:
        try:
            vehicle_cert = x509.load_der_x509_certificate(body.contract_signature_cert_chain.certificate)
        except ValueError:
            raise CPSFailure(ResponseCode.FAILED_CertChainError, "contract certificate is not DER") from None
        status, _ = chain_status(ctx, vehicle_cert, "mo")
        if status != "CertificateExpired":  # an update may renew an expired contract certificate
            _status_failure(status, "current contract certificate")
        vehicle_key = _verify(raw, vehicle_cert, request)
        try:
            emaid = normalise_emaid(body.emaid)
        except PKIError:
            raise CPSFailure(ResponseCode.FAILED_NoCertificateAvailable, "eMAID is not a valid EMAID") from None
        cn = vehicle_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not cn or normalise_emaid(str(cn[0].value)) != emaid:
            raise CPSFailure(ResponseCode.FAILED_CertChainError, "eMAID does not match the contract certificate")
        contract = Contracts(ctx.db).by_emaid(emaid)
        if emsp is not None and (contract is None or contract.emsp != emsp):
            raise NotFound(f"no contract of yours {emaid}")
        if contract is None:
            raise CPSFailure(ResponseCode.FAILED_NoCertificateAvailable, f"no contract {emaid}")
        if contract.status != "active" or contract.valid_until <= utcnow():
            raise CPSFailure(ResponseCode.FAILED_ContractCanceled, f"contract {emaid} is terminated or expired")
        current = find_our_issuer(ctx, vehicle_cert)
        if current is not None:
            keep = (current.name, format(vehicle_cert.serial_number, "x"))
    return build_delivery(ctx, contract, vehicle_key, ids, session_id,
                          update=isinstance(body, CertificateUpdateReq), actor=actor,
                          supersede=supersede, keep=keep, remember=remember)


def _replay(ctx: Context, digest: str, contract: Contract | ContractRow, session_id: bytes) -> Delivery | None:
    """The answer already given to this signed request for this contract, under the new SessionID — when its
    contract certificate and CPS certificate (and every CA above them) are still valid (#21 item 2). The
    contract is the one the selection rule picks now, active and unexpired (the caller looked it up)."""
    assert contract.id is not None
    kept = replayed_answer(ctx, digest, contract.id)
    if kept is None:
        return None
    exi, serial = kept
    try:
        old = decode_message(exi)
    except ExiError:  # pragma: no cover - we encoded it
        log.warning("kept answer for %s does not decode; issuing anew", contract.emaid)
        return None
    # The header is outside the signature [V2G2-818..823]: the same signed body under the retry's SessionID.
    message = replace(old, header=replace(old.header, session_id=session_id))
    exi = encode_message(message)
    if 4 * -(-len(exi) // 3) > EXI_RESPONSE_MAX_B64:  # the same bound as a new answer's
        raise ResponseTooLarge(f"exiResponse would be over {EXI_RESPONSE_MAX_B64} characters")
    return Delivery(message, exi, ResponseCode.OK, emaid=contract.emaid,
                    contract_serial=serial, notes=[f"replayed request: the answer of {serial} again"])


def build_delivery(ctx: Context, contract: Contract | ContractRow,
                   vehicle_key: ec.EllipticCurvePublicKey | x509.Certificate,
                   ids: tuple[X509IssuerSerial, ...] | None, session_id: bytes, *, update: bool,
                   actor: str, supersede: bool = False, keep: tuple[str, str] | None = None,
                   remember: str | None = None) -> Delivery:
    """Issue the contract certificate, encrypt its key for ``vehicle_key`` (the OEM provisioning or current
    contract certificate, or its public key) and sign the response.

    ``ids`` None means "any of our roots" (contract data prepared ahead of time, before the vehicle says
    which roots it trusts). ``supersede``: the contract may already have valid contract certificates
    (a replayed or repeated request); once the new one is issued and signed for, they are revoked with
    reason superseded, except ``keep`` (#21 item 2). ``remember``: the installation request's body digest;
    the signed answer is kept under it (and the contract) so a retry of the same request gets the same
    answer (:func:`_replay`). Everything that can refuse is checked before the certificate is issued
    (#21 item 16)."""
    if ids is None:
        ids = tuple(X509IssuerSerial(h.cert.subject.rfc4514_string(), h.cert.serial_number)
                    for h in ctx.engine.cas() if h.row.parent is None)
    # The CPS chain must lead to a V2G root the vehicle lists (ISO 15118-2 §8.4.3.11.2, V2G2-818: the
    # vehicle verifies the CPS signature with it); the contract chain is the eMSP's (#21 item 15).
    cps_row, cps_subs = _cps_signer(ctx, ids)
    mo_ca = _pick_ca(ctx, {"mo-sub2"}, ids)
    if mo_ca is None:
        raise CPSFailure(ResponseCode.FAILED_NoCertificateAvailable, "no active MO Sub-CA 2 to issue the contract")
    # The CPS chain is the same for every response this signer makes: one instance, so its EXI encoding is
    # kept with it (messages._shared, codec.Node.memo) and written as one piece.
    sa_chain: CertificateChain = _cached(ctx, f"sa-chain:{cps_row.issuer}/{cps_row.serial}",
                                         lambda: CertificateChain(cps_row.der, tuple(cps_subs)))
    bound = _cached(ctx, f"max-b64:{cps_row.issuer}/{cps_row.serial}:{mo_ca.name}:{update}",
                    partial(_max_response_b64, ctx, sa_chain, mo_ca, update))
    if bound > EXI_RESPONSE_MAX_B64:
        raise ResponseTooLarge(f"exiResponse could be {bound} characters (> {EXI_RESPONSE_MAX_B64}): the CPS and "
                               "contract chains are too long for OCPP 2.0.1; nothing was issued")

    # The CPS key, checked to be the key of the CPS certificate before anything is issued (a token
    # re-initialised under the same label is refused here, not by the vehicle); its signer then verifies the
    # response signature itself (hsm/pkcs11.py) before the response leaves.
    assert cps_row.key_uri is not None
    cps_pub = _cached(ctx, f"cps-pub:{cps_row.issuer}/{cps_row.serial}",
                      lambda: x509.load_der_x509_certificate(cps_row.der).public_key())
    signer = certified_signer(ctx.keystore, cps_row.key_uri, cps_pub,
                              f"CPS certificate {cps_row.issuer}/{cps_row.serial}")
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise CPSFailure(ResponseCode.FAILED, "CPS key is not an EC key")
    # The contract key: generated here, used once to issue and once to wrap, never stored or logged.
    key = _contract_key()
    try:
        o_name = _org_display_name(ctx, contract.emsp)
        subject = SubjectFields(cn=contract.emaid, o=o_name[:64], c=contract.emaid[:2], dc="MO")
        issued = ctx.engine.issue(IssueRequest(
            profile="contract", public_key=key.public_key(), subject=subject, identifier=contract.emaid,
            ca=mo_ca.name, tenant=contract.emsp, not_after=contract.valid_until, actor=actor,
        ))
        try:
            wrapped = wrap_contract_key(key, vehicle_key)
        except KeyWrapError as exc:
            raise CPSFailure(ResponseCode.FAILED, f"contract key could not be encrypted: {exc.message}") from None
    finally:
        del key
    contract_chain = CertificateChain(issued.der, tuple(der(c) for c in issued.chain[:-1]), "id1")
    args = dict(
        response_code=ResponseCode.OK,
        sa_provisioning_certificate_chain=sa_chain,
        contract_signature_cert_chain=contract_chain,
        contract_signature_encrypted_private_key=EncryptedPrivateKey(wrapped.encrypted_private_key, "id2"),
        dh_public_key=DHPublicKey(wrapped.dh_public_key, "id3"),
        emaid=EMAID(contract.emaid, "id4"),
    )
    res: CertificateInstallationRes | CertificateUpdateRes = (
        CertificateUpdateRes(**args) if update  # type: ignore[arg-type]
        else CertificateInstallationRes(**args)  # type: ignore[arg-type]
    )
    try:
        message = sign_contract_response(session_id, res, signer)
    except XmlDsigError as exc:
        raise CPSError(f"CPS signature failed: {exc.message}") from None
    delivery = Delivery(message, encode_message(message), ResponseCode.OK, emaid=contract.emaid,
                        contract_serial=issued.serial)
    if remember is not None and contract.id is not None:
        try:
            store_answer(ctx, remember, contract.id, contract.emaid, (issued.issuer, issued.serial),
                         (cps_row.issuer, cps_row.serial), delivery.exi, issued.cert.not_valid_after_utc)
        except PKIError:  # the answer stands; a retry then gets a new certificate, superseding this one
            log.warning("keeping the answer for %s failed", contract.emaid, exc_info=True)
    if supersede:
        try:
            gone = supersede_contract_certificates(ctx, contract.emaid, (issued.issuer, issued.serial), keep,
                                                   actor=actor)
        except PKIError:  # the answer stands; the older certificate stays until it expires or is revoked
            log.warning("superseding earlier contract certificates of %s failed", contract.emaid, exc_info=True)
        else:
            if gone:
                delivery.notes.append(f"superseded {', '.join(gone)}")
    return delivery


def _max_response_b64(ctx: Context, sa_chain: CertificateChain, mo_ca: CAHandle, update: bool) -> int:
    """The most base64 characters an answer with these chains can take: the response encoded once with a
    contract certificate of the most octets allowed ([V2G2-010]: 800), the issuing CA's real sub-CA
    certificates, the longest eMAID (15) and SessionID (8 octets), signed with a throwaway software key (a
    SignatureValue is always 64 octets). Computed before issuing (#21 item 16); cached like the CPS chain."""
    subs = tuple(der(c) for c in ctx.engine.chain(mo_ca.name)[:-1])
    args = dict(
        response_code=ResponseCode.OK,
        sa_provisioning_certificate_chain=CertificateChain(sa_chain.certificate, sa_chain.sub_certificates),
        contract_signature_cert_chain=CertificateChain(bytes(MAX_CERTIFICATE_OCTETS), subs, "id1"),
        contract_signature_encrypted_private_key=EncryptedPrivateKey(bytes(48), "id2"),
        dh_public_key=DHPublicKey(b"\x04" + bytes(64), "id3"),
        emaid=EMAID("0" * 15, "id4"),
    )
    res: CertificateInstallationRes | CertificateUpdateRes = (
        CertificateUpdateRes(**args) if update  # type: ignore[arg-type]
        else CertificateInstallationRes(**args)  # type: ignore[arg-type]
    )
    message = sign_contract_response(bytes(8), res, _contract_key())
    return 4 * -(-len(encode_message(message)) // 3)


def _status_failure(status: str, what: str) -> None:
    codes = {"CertificateRevoked": ResponseCode.FAILED_CertificateRevoked,
             "CertificateExpired": ResponseCode.FAILED_CertificateExpired,
             "CertChainError": ResponseCode.FAILED_CertChainError}
    if status != "Accepted":
        raise CPSFailure(codes.get(status, ResponseCode.FAILED_CertChainError), f"{what}: {status}")


def _verify(raw: Node, cert: x509.Certificate, message: V2GMessage) -> ec.EllipticCurvePublicKey:
    """Check the request's signature with ``cert``'s key; that key, parsed once for the key wrap too."""
    try:
        key = signer_public_key(cert)  # EC secp256r1 only
        verify_request(raw, key, message=message)
    except SignatureVerificationFailed as exc:
        raise CPSFailure(ResponseCode.FAILED_SignatureError, f"request signature: {exc.message}") from None
    except (XmlDsigError, ExiError) as exc:
        raise CPSFailure(ResponseCode.FAILED_SignatureError, f"request signature: {exc.message}") from None
    return key
