"""The contract certificate pool (CCP), the provisioning certificate pool (PCP) and the CPS operations of
the hosted Plug & Charge APIs (OPCP 1.0, OPNC v1), on top of the existing contracts, pool and CPS.

Nothing here is a second implementation: contracts are `pki.contracts` rows, installations are
`pki.cps.service.deliver`, contract data prepared ahead of time is `build_delivery` stored in
`signed_contract_data` (the rows `/v1/contract-data` lists), the OEM pool is `provisioning_certificate`.
What is new are the operations those APIs have and `/v1` had not: choosing a contract as a PCID's default,
de-publishing a contract, taking an OEM's certificate out of the pool, and the CPS signing contract data
an eMSP with its own PKI made (its contract certificate chain and the key it encrypted for the vehicle).

Tenancy is the service's: an eMSP sees its own contracts, an OEM the PCIDs under its WMIs (and the pool
entries it registered), an admin or auditor everything; another tenant's object is NotFound.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki import audit, lifecycle
from pki.context import Context
from pki.contracts import (
    BadCertificate,
    create_contract,
    find_our_issuer,
    lookup_vehicle,
    register_provisioning_certificate,
    terminate_contract,
    verify_issued_by,
)
from pki.cps.errors import CPSError, ExiError, XmlDsigError
from pki.cps.exi import (
    EMAID,
    CertificateChain,
    CertificateInstallationRes,
    DHPublicKey,
    EncryptedPrivateKey,
    V2GMessage,
    decode_message,
    encode_message,
)
from pki.cps.exi.messages import ResponseCode, X509IssuerSerial
from pki.cps.service import (
    MAX_CERTIFICATE_OCTETS,
    CPSFailure,
    Delivery,
    _cps_rows,
    _cps_signer,
    _root_name,
    build_delivery,
)
from pki.cps.xmldsig import sign_contract_response, verify_response
from pki.errors import BadContractData, Conflict, Forbidden, NotFound, PKIError, UnsupportedNamespace
from pki.issuance import CAHandle
from pki.names import normalise_emaid, normalise_pcid, owns_identifier
from pki.orgs import Principal
from pki.store import pools as store
from pki.store.db import utcnow
from pki.store.models import (
    Certificate,
    CertificateAuthority,
    Contract,
    ProvisioningCertificate,
    SignedContractData,
)
from pki.store.orgs import orgs_with_role

log = logging.getLogger("v2gpki.pools")

ISO2 = "urn:iso:15118:2:2013:MsgDef"
# ISO 15118-20 as OPCP/OPNC spell it (OCPP and Josev: urn:iso:std:iso:15118:-20:CommonMessages): recognised
# and refused, -20 contract installation is not implemented (docs/cps.md).
ISO20 = "urn:iso:15118:20:2020:MsgDef"


def check_namespace(ns: str | None) -> str:
    """Only ISO 15118-2 contract data is served; -20 is recognised and refused."""
    if ns in (None, "", ISO2):
        return ISO2
    if ns == ISO20 or "15118:-20" in ns or "15118:20" in ns:
        raise UnsupportedNamespace(f"{ns}: ISO 15118-20 contract data is not implemented (only {ISO2})")
    raise UnsupportedNamespace(f"unknown xsdMsgDefNamespace {ns!r} (only {ISO2} is served)")


def b64der(data: str | None, what: str) -> bytes:
    """A base64 DER field of the APIs (PEM armour and whitespace tolerated, as clients strip it or not)."""
    if not data:
        raise BadCertificate(f"{what} is missing")
    text = "".join(ln for ln in data.strip().splitlines() if not ln.startswith("-----"))
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadCertificate(f"{what} is not base64") from None


def load_cert(data: str | None, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(b64der(data, what))
    except ValueError:
        raise BadCertificate(f"{what} is not a DER certificate") from None


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- roots and fingerprints -----------------------------------------------------------------------------


def root_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the root certificate's DER, 64 hex digits (OPNC's cpsV2GRootCertificateFingerprint)."""
    return hashlib.sha256(cert_der(cert)).hexdigest()


def root_fingerprint_uuid(cert: x509.Certificate) -> str:
    """OPCP 1.0 writes cpsV2GRootCertificateFingerprint with a UUID pattern (8-4-4-4-12 hex digits): the first
    128 bits of the SHA-256 fingerprint in that layout (what this service answers and accepts)."""
    h = root_fingerprint(cert)[:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def opcp_dn(name: x509.Name) -> str:
    """A DN in OPCP's pattern ``^((CN|OU|O|C|DC|ST)=[^,]+,? ?)+$``: most significant last (as Hubject writes
    them: "CN=V2G Root CA QA G1, DC=V2G, O=Hubject GmbH, C=DE"); other attributes and commas dropped."""
    short = {x509.NameOID.COMMON_NAME: "CN", x509.NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
             x509.NameOID.ORGANIZATION_NAME: "O", x509.NameOID.COUNTRY_NAME: "C",
             x509.NameOID.DOMAIN_COMPONENT: "DC", x509.NameOID.STATE_OR_PROVINCE_NAME: "ST"}
    parts = [f"{short[a.oid]}={str(a.value).replace(',', ' ').strip()}" for a in reversed(list(name))
             if a.oid in short and str(a.value).replace(",", " ").strip()]
    return ", ".join(parts)


def root_certificate_id(der: bytes) -> str:
    """A stable UUID for a root (OPCP/OPNC ``rootCertificateId``): the first 16 bytes of its SHA-256
    fingerprint (RFC 9562 version 8)."""
    h = bytearray(hashlib.sha256(der).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x80
    h[8] = (h[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(h)))


def opnc_dn(name: x509.Name) -> str:
    """A DN in OPNC's (and the OPCP webhook payload's) pattern: ``CN=…, DC=…, O=…, OU=…, C=XX`` in that
    order, values of letters, digits, spaces, '-' and '.' only."""
    order = [("CN", x509.NameOID.COMMON_NAME), ("DC", x509.NameOID.DOMAIN_COMPONENT),
             ("O", x509.NameOID.ORGANIZATION_NAME), ("OU", x509.NameOID.ORGANIZATIONAL_UNIT_NAME)]
    parts = []
    for short, oid in order:
        attrs = name.get_attributes_for_oid(oid)
        value = re.sub(r"[^a-zA-Z0-9\s\-.]", "", str(attrs[0].value)).strip() if attrs else ""
        if value:
            parts.append(f"{short}={value}, ")
    c = name.get_attributes_for_oid(x509.NameOID.COUNTRY_NAME)
    country = str(c[0].value) if c else ""
    return "".join(parts) + (f"C={country}" if re.fullmatch(r"[A-Z]{2}", country) else "")


def v2g_roots(ctx: Context) -> list[CAHandle]:
    return [h for h in ctx.engine.cas() if h.row.parent is None and h.row.hierarchy == "v2g"]


def _root_ids(ctx: Context, fingerprint: str | None) -> tuple[X509IssuerSerial, ...] | None:
    """The vehicle-trusted roots a CPS signer is chosen under: the V2G root with this fingerprint (64 hex
    digits, or OPCP's UUID form of its first half), None (any of our roots) without one."""
    if not fingerprint:
        return None
    want = fingerprint.strip().lower()
    for h in ctx.engine.cas():
        if h.row.parent is None and want in (root_fingerprint(h.cert), root_fingerprint_uuid(h.cert)):
            return (X509IssuerSerial(h.cert.subject.rfc4514_string(), h.cert.serial_number),)
    raise NotFound(f"no V2G root with fingerprint {fingerprint}")


@dataclass
class CPSSigner:
    certificate: x509.Certificate
    chain: list[x509.Certificate]  # the CPS Sub-CAs, nearest first
    root: x509.Certificate


def cps_signers(ctx: Context) -> list[CPSSigner]:
    """Every valid CPS leaf whose key is in the HSM, newest first (what `deliver` signs with)."""
    out = []
    for row in _cps_rows(ctx):
        chain = ctx.engine.chain(row.issuer)
        out.append(CPSSigner(x509.load_der_x509_certificate(row.der), chain[:-1], chain[-1]))
    return out


def signer_root(ctx: Context, message: V2GMessage) -> x509.Certificate | None:
    """The V2G root above the CPS certificate that signed ``message`` (an OK CertificateInstallationRes)."""
    body = message.body
    if not isinstance(body, CertificateInstallationRes) or not body.sa_provisioning_certificate_chain.certificate:
        return None
    try:
        cps = x509.load_der_x509_certificate(body.sa_provisioning_certificate_chain.certificate)
    except ValueError:
        return None
    ca = find_our_issuer(ctx, cps)
    return ctx.engine.ca(_root_name(ctx, ca.name)).cert if ca is not None else None


# -- tenancy ---------------------------------------------------------------------------------------------


def _oem_owns(ctx: Context, p: Principal, pcid: str) -> bool:
    return owns_identifier(list(p.prefixes), "pcid", pcid) or store.registered_by(ctx.db, pcid, p.org)


def _visible(ctx: Context, p: Principal, c: Contract) -> bool:
    if p.sees_all:
        return True
    if p.role == "emsp":
        return c.emsp == p.org
    if p.role == "oem":
        return _oem_owns(ctx, p, c.pcid)
    return False


def _reader(p: Principal) -> None:
    """Who may read the pools' contracts: an eMSP (its own), an OEM (its vehicles'), admin and auditor.
    A CPO gets contract data only by forwarding a vehicle's own request (deliver): reading contracts by
    EMAID or PCID would be an oracle on every eMSP's customers (#21 item 3)."""
    p.require("emsp", "oem", "admin", "auditor")


# -- the contract certificate pool --------------------------------------------------------------------


@dataclass
class ContractEntry:
    contract: Contract
    certificate: Certificate | None  # the newest valid contract certificate, if one was issued


def contracts(ctx: Context, p: Principal, *, emaid: str | None = None, pcid: str | None = None) -> list[ContractEntry]:
    """The active contracts of an EMAID or a PCID the caller may see (lookupContract, getContracts);
    none visible is NotFound, the same whether they do not exist or are another tenant's."""
    _reader(p)
    rows = store.active_contracts(ctx.db, utcnow(), emaid=normalise_emaid(emaid) if emaid is not None else None,
                                  pcid=normalise_pcid(pcid) if pcid is not None else None)
    rows = [c for c in rows if _visible(ctx, p, c)]
    if not rows:
        raise NotFound(f"no contract for {'EMAID ' + emaid if emaid else 'PCID ' + str(pcid)}")
    return [ContractEntry(c, store.newest_contract_certificate(ctx.db, c.emaid, utcnow())) for c in rows]


def _contract(ctx: Context, p: Principal, emaid: str, pcid: str | None = None, *, active: bool = True) -> Contract:
    e = normalise_emaid(emaid)
    v = normalise_pcid(pcid) if pcid is not None else None
    c = store.contract_by_emaid(ctx.db, e)
    if c is None or not _visible(ctx, p, c) or (v is not None and c.pcid != v) or (
            active and (c.status != "active" or c.valid_until <= utcnow())):
        raise NotFound(f"no contract {e}" + (f" for PCID {v}" if v else ""))
    return c


def set_default(ctx: Context, p: Principal, pcid: str, emaid: str) -> Contract:
    """Make the contract its eMSP's default for the PCID (one default per PCID and eMSP, #21 item 1; which
    eMSP's default an installation delivers is the tenure rule of docs/cps.md). Callable by the contract's
    eMSP, the OEM of the vehicle (the OPCP/OPNC caller of setDefault) and admin."""
    p.require("emsp", "oem", "admin")
    c = _contract(ctx, p, emaid, pcid)
    with ctx.db.session() as s:
        store.make_default(s, c)
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.default", object=c.emaid,
                                    details={"pcid": c.pcid, "emsp": c.emsp}))
        s.commit()
    c.is_default = True
    return c


def depublish(ctx: Context, p: Principal, emaid: str, *, revoke: bool = True) -> list[str]:
    """OPCP/OPNC "delete signed contract data": the contract is terminated (no installation delivers it any
    more), its prepared contract data deleted and, unless ``revoke`` is False (X-Skip-Revocation), its
    contract certificates revoked (cessationOfOperation). Returns the revoked certificates."""
    p.require("emsp", "admin")
    c = _contract(ctx, p, emaid, active=False)
    if c.status == "terminated":
        raise NotFound(f"no published contract {c.emaid}")
    revoked: list[str] = []
    if revoke:
        _, revoked = terminate_contract(ctx, p, c.emaid)
    else:
        with ctx.db.session() as s:
            store.mark_terminated(s, c.id, utcnow())
            audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.terminate", object=c.emaid,
                                        details={"revoke": False}))
            s.commit()
    store.delete_signed_data(ctx.db, c.id)
    _emit(contract_events, ctx, c, "deleted")
    return revoked


def store_signed_data(ctx: Context, contract: Contract, exi: bytes, cert_serial: str, payload: dict[str, object],
                      ) -> None:
    """Contract data into the pool; its OPCP events follow (created the first time, then updated)."""
    earlier = store.add_signed_data(ctx.db, SignedContractData(
        contract_id=contract.id or 0, pcid=contract.pcid, emaid=contract.emaid, cert_serial=cert_serial,
        payload={**payload, "exiResponse": b64(exi)}, created_at=utcnow()))
    _emit(contract_events, ctx, contract, "updated" if earlier else "created", exi)


def _emit(fn: Any, *args: Any) -> None:
    """Queue webhook events after the change committed; a failure to queue is logged, the change stands."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the pool operation committed; its notification is best effort
        log.warning("webhook events of %s not queued", getattr(fn, "__name__", fn), exc_info=True)


def with_session_id(exi: bytes, session_id: bytes) -> bytes:
    """The same signed message under another SessionID: the header is outside the signature (docs/cps.md,
    "Contract data ahead of time")."""
    msg = decode_message(exi)
    return encode_message(replace(msg, header=replace(msg.header, session_id=session_id)))


def parse_session_id(value: str | None) -> bytes:
    """OPCP/OPNC ``sessionID``: hexBinary, at most 8 octets; absent or empty: 00."""
    if not value:
        return b"\x00"
    v = value.strip()
    try:
        raw = bytes.fromhex(v if len(v) % 2 == 0 else "0" + v)
    except ValueError:
        raise PKIError("sessionID must be hexadecimal (at most 8 octets)") from None
    if not 1 <= len(raw) <= 8:
        raise PKIError("sessionID must be hexadecimal (at most 8 octets)")
    return raw


def _pool_certificate(ctx: Context, p: Principal, pcid: str) -> x509.Certificate:
    rows = lookup_vehicle(ctx, Principal("", "admin", (), {}, p.credential), pcid)
    if not rows:
        raise NotFound(f"no provisioning certificate registered for PCID {normalise_pcid(pcid)}")
    return x509.load_der_x509_certificate(rows[0].der)


def prepare(ctx: Context, p: Principal, contract: Contract, *, root_fingerprint: str | None = None) -> Delivery:
    """Contract data signed ahead of time for the vehicle's pool certificate (as POST /v1/contract-data),
    stored in the pool; every call issues a new contract certificate."""
    vehicle = _pool_certificate(ctx, p, contract.pcid)
    d = build_delivery(ctx, contract, vehicle, _root_ids(ctx, root_fingerprint), b"\x00", update=False,
                       actor=p.credential, supersede=True)
    store_signed_data(ctx, contract, d.exi, d.contract_serial or "", {"emaid": contract.emaid, "pcid": contract.pcid,
                                                                     "responseCode": str(d.response_code)})
    return d


def provide(ctx: Context, p: Principal, emaid: str, pcid: str, session_id: bytes,
            root_fingerprint: str | None = None) -> bytes:
    """provideSignedContractData: the newest prepared contract data of this contract whose certificate is
    still valid (signed under the requested root, if one is named), else prepared now; under the caller's
    SessionID. For the vehicle's OEM, the contract's eMSP and admin."""
    p.require("oem", "emsp", "admin")
    c = _contract(ctx, p, emaid, pcid)
    want = _root_ids(ctx, root_fingerprint)
    for row in store.deliverable_signed_data(ctx.db, c, utcnow()):
        exi = base64.b64decode(str(row.payload.get("exiResponse", "")))
        if not exi:
            continue
        if want is not None:
            root = signer_root(ctx, decode_message(exi))
            if root is None or root.serial_number != want[0].serial_number:
                continue
        if p.role == "oem":
            _emit(contract_events, ctx, c, "delivered", exi)
        return with_session_id(exi, session_id)
    d = prepare(ctx, p, c, root_fingerprint=root_fingerprint)
    if d.response_code != ResponseCode.OK:
        raise CPSError(f"contract data could not be signed: {d.response_code} {'; '.join(d.notes)}")
    if p.role == "oem":
        _emit(contract_events, ctx, c, "delivered", d.exi)
    return with_session_id(d.exi, session_id)


# -- eMSP-side operations: generate, sign, upload ------------------------------------------------------


def _parse_time(value: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise PKIError(f"{what} is not an ISO 8601 date-time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def generate(ctx: Context, p: Principal, emaid: str, pcid: str, begins: str, ends: str,
             *, root_fingerprint: str | None = None) -> tuple[Contract, Delivery | None]:
    """OPCP generate/signedContractData, OPNC generateandsign: register the contract (or, for the same EMAID
    and PCID, extend it), then, when the vehicle's provisioning certificate is in the pool, sign contract
    data for it ahead of time. Without it the contract is still served: an installation the vehicle
    requests through its charger issues its contract certificate then."""
    p.require("emsp", "admin")
    start, end = _parse_time(begins, "contractBegins"), _parse_time(ends, "contractEnds")
    if end <= start:
        raise PKIError("contractEnds must be after contractBegins")
    e, v = normalise_emaid(emaid), normalise_pcid(pcid)
    if _root_ids(ctx, root_fingerprint) is None and root_fingerprint:
        raise NotFound(f"no V2G root with fingerprint {root_fingerprint}")
    existing = store.contract_by_emaid(ctx.db, e)
    if existing is None:
        c = create_contract(ctx, p, e, v, end)
    else:
        if not p.sees_all and existing.emsp != p.org:
            raise Forbidden(f"EMAID {e} is not organization {p.org!r}'s")
        if existing.pcid != v:
            raise Conflict(f"contract {e} is for another PCID ({existing.pcid})")
        if existing.status != "active":
            raise PKIError(f"contract {e} was terminated")
        if end <= utcnow():
            raise PKIError("contractEnds must be in the future")
        with ctx.db.session() as s:
            store.extend(s, existing.id, end)
            audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="contract.extend", object=e,
                                        details={"valid_until": end.isoformat()}))
            s.commit()
        existing.valid_until = end
        c = existing
    try:
        _pool_certificate(ctx, p, v)
    except NotFound:
        return c, None
    return c, prepare(ctx, p, c, root_fingerprint=root_fingerprint)


@dataclass
class ContractDataIn:
    """Contract data an eMSP with its own PKI made: its contract certificate chain and the contract key it
    encrypted for the vehicle (ISO 15118-2 ContractSignatureEncryptedPrivateKey, DHpublickey)."""

    emaid: str | None
    certificate: str
    sub_certificates: list[str]
    encrypted_private_key: str
    dh_public_key: str


def sign(ctx: Context, p: Principal, data: ContractDataIn, *, root_fingerprint: str | None = None,
         store_for_pcid: str | None = None) -> tuple[bytes, str, x509.Certificate]:
    """The CPS signs an eMSP's contract data into a CertificateInstallationRes (SessionID 00, the header is
    outside the signature): ContractSignatureCertChain, the encrypted key and DH public key and the eMAID,
    as in every installation. Checks before signing: the eMAID is the contract certificate's CN and under
    the caller's provider prefixes, the chain is a chain (each certificate signed by the next), the sizes
    are the schema's; with ``store_for_pcid``, the caller's active contract for that EMAID and PCID exists
    (then the signed data goes into the pool). Returns the EXI V2G_Message, the EMAID and the V2G root of
    the CPS chain."""
    p.require("emsp", "admin")
    leaf = load_cert(data.certificate, "contract certificate")
    subs = [load_cert(s, "contract sub-CA certificate") for s in data.sub_certificates if s]
    if not 1 <= len(subs) <= 2:
        raise BadContractData("the contract certificate chain needs one or two sub-CA certificates")
    cn = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cn:
        raise BadContractData("the contract certificate has no CN (the EMAID)")
    emaid = normalise_emaid(str(cn[0].value))
    if data.emaid and normalise_emaid(data.emaid) != emaid:
        raise BadContractData(f"emaid {data.emaid} is not the contract certificate's CN {emaid}")
    if p.role != "admin" and not owns_identifier(list(p.prefixes), "emaid", emaid):
        raise Forbidden(f"EMAID {emaid} is outside organization {p.org!r}'s provider IDs")
    for cert, issuer in zip([leaf, *subs], subs, strict=False):
        if not verify_issued_by(cert, issuer):
            raise BadContractData(f"{cert.subject.rfc4514_string()} is not signed by the next certificate of the chain")
    for cert in (leaf, *subs):
        if len(cert_der(cert)) > MAX_CERTIFICATE_OCTETS:
            raise BadContractData(f"certificate of {len(cert_der(cert))} octets "
                                  f"(ISO 15118-2 allows {MAX_CERTIFICATE_OCTETS})")
    contract = _contract(ctx, p, emaid, store_for_pcid) if store_for_pcid is not None else None
    key = b64der(data.encrypted_private_key, "contractSignatureEncryptedPrivateKey")
    dh = b64der(data.dh_public_key, "dHpublickey")
    if len(key) != 48:
        raise BadContractData("contractSignatureEncryptedPrivateKey must be 48 octets (IV and AES-128-CBC ciphertext)")
    if len(dh) != 65 or dh[0] != 4:
        raise BadContractData("dHpublickey must be an uncompressed P-256 point (65 octets, 0x04 first)")
    ids = _root_ids(ctx, root_fingerprint) or tuple(
        X509IssuerSerial(h.cert.subject.rfc4514_string(), h.cert.serial_number) for h in v2g_roots(ctx))
    try:
        cps_row, cps_subs = _cps_signer(ctx, ids)
    except CPSFailure as exc:
        raise NotFound(exc.message) from None
    res = CertificateInstallationRes(
        response_code=ResponseCode.OK,
        sa_provisioning_certificate_chain=CertificateChain(cps_row.der, tuple(cps_subs)),
        contract_signature_cert_chain=CertificateChain(cert_der(leaf), tuple(cert_der(c) for c in subs), "id1"),
        contract_signature_encrypted_private_key=EncryptedPrivateKey(key, "id2"),
        dh_public_key=DHPublicKey(dh, "id3"),
        emaid=EMAID(emaid, "id4"),
    )
    assert cps_row.key_uri is not None
    signer = ctx.keystore.signer(cps_row.key_uri)
    try:
        message = sign_contract_response(b"\x00", res, signer)  # type: ignore[arg-type]
    except XmlDsigError as exc:
        raise CPSError(f"CPS signature failed: {exc.message}") from None
    with ctx.db.session() as s:
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="cps.sign", object=emaid,
                                    details={"cps": f"{cps_row.issuer}/{cps_row.serial}"}))
        s.commit()
    exi = encode_message(message)
    if contract is not None:
        store_signed_data(ctx, contract, exi, format(leaf.serial_number, "x"),
                          {"emaid": emaid, "pcid": contract.pcid, "responseCode": "OK", "ownPki": True})
    return exi, emaid, ctx.engine.chain(cps_row.issuer)[-1]


def accept_signed_data(ctx: Context, p: Principal, emaid: str, pcid: str, exi_b64: str) -> Contract:
    """An eMSP puts signed contract data into the pool (OPCP PUT /v1/ccp/signedContractData, OPNC PUT
    signedcontractdata): a CertificateInstallationRes with ResponseCode OK signed by one of this service's
    CPS certificates (verified), for one of the caller's active contracts whose EMAID and PCID it names."""
    p.require("emsp", "admin")
    c = _contract(ctx, p, emaid, pcid)
    exi = b64der(exi_b64, "signed contract data")
    try:
        msg = decode_message(exi)
    except ExiError as exc:
        raise BadContractData(f"not an ISO 15118-2 EXI V2G_Message: {exc.message}") from None
    body = msg.body
    if not isinstance(body, CertificateInstallationRes) or body.response_code != ResponseCode.OK:
        raise BadContractData("not a CertificateInstallationRes with ResponseCode OK")
    if normalise_emaid(body.emaid.value) != c.emaid:
        raise BadContractData(f"the signed data's eMAID {body.emaid.value} is not {c.emaid}")
    try:
        cps = x509.load_der_x509_certificate(body.sa_provisioning_certificate_chain.certificate)
    except ValueError:
        raise BadContractData("the CPS certificate is not DER") from None
    ca = find_our_issuer(ctx, cps)
    if ca is None or ca.hierarchy != "v2g":
        raise BadContractData("the CPS certificate was not issued by this service's V2G PKI")
    try:
        verify_response(msg, cps)
    except (XmlDsigError, ExiError) as exc:
        raise BadContractData(f"the CPS signature does not verify: {exc.message}") from None
    try:
        contract_cert = x509.load_der_x509_certificate(body.contract_signature_cert_chain.certificate)
    except ValueError:
        raise BadContractData("the contract certificate is not DER") from None
    store_signed_data(ctx, c, with_session_id(exi, b"\x00"), format(contract_cert.serial_number, "x"),
                      {"emaid": c.emaid, "pcid": c.pcid, "responseCode": "OK", "uploaded": True})
    with ctx.db.session() as s:
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="ccp.upload", object=c.emaid,
                                    details={"pcid": c.pcid}))
        s.commit()
    return c


# -- the provisioning certificate pool ----------------------------------------------------------------


@dataclass
class PoolEntry:
    row: ProvisioningCertificate
    certificate: x509.Certificate
    sub_cas: list[x509.Certificate]  # nearest first, no root
    root: x509.Certificate


def _entry(ctx: Context, row: ProvisioningCertificate) -> PoolEntry:
    cert = x509.load_der_x509_certificate(row.der)
    ca = find_our_issuer(ctx, cert)
    chain = ctx.engine.chain(ca.name) if ca is not None else []
    return PoolEntry(row, cert, chain[:-1], chain[-1] if chain else cert)


def register(ctx: Context, p: Principal, leaf: str, subs: list[str | None]) -> PoolEntry:
    """An OEM publishes a provisioning certificate (OPCP PUT /v1/oem/provCerts, OPNC PUT
    provisioningcertificates): `register_provisioning_certificate`, after checking that the sub-CA
    certificates sent along are the ones above it here."""
    p.require("oem", "admin")
    der = b64der(leaf, "provisioning certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise BadCertificate("provisioning certificate is not a DER certificate") from None
    ca = find_our_issuer(ctx, cert)
    ours = {cert_der(c) for c in ctx.engine.chain(ca.name)} if ca is not None else set()
    for s in subs:
        if s and b64der(s, "sub-CA certificate") not in ours:
            raise BadCertificate("a sub-CA certificate sent is not in the provisioning certificate's chain here")
    row = register_provisioning_certificate(ctx, p, der)
    _emit(provisioning_events, ctx, row.pcid, "updated")
    return _entry(ctx, row)


def pool(ctx: Context, p: Principal, pcid: str) -> list[PoolEntry]:
    """The vehicle's provisioning certificates the caller may see (`lookup_vehicle`: the OEM that registered
    them, an eMSP with a contract for the PCID, admin); NotFound when none."""
    rows = lookup_vehicle(ctx, p, pcid)
    if not rows:
        raise NotFound(f"no provisioning certificate for PCID {normalise_pcid(pcid)}")
    return [_entry(ctx, r) for r in rows]


def unregister(ctx: Context, p: Principal, pcid: str) -> int:
    """An OEM takes its provisioning certificates for a PCID out of the pool (the certificates stay valid;
    contracts are not touched: an installation presents the vehicle's certificate itself)."""
    p.require("oem", "admin")
    v = normalise_pcid(pcid)
    with ctx.db.session() as s:
        n = store.remove_provisioning(s, v, None if p.role == "admin" else p.org)
        if not n:
            s.rollback()
            raise NotFound(f"no provisioning certificate for PCID {v}")
        audit.append(s, audit.Entry(actor=p.credential, org=p.org, action="provisioning.remove", object=v,
                                    details={"count": int(n)}))
        s.commit()
    _emit(provisioning_events, ctx, v, "deleted")
    return int(n)


# -- OPCP webhook events (webhook.payload.v1.json) -------------------------------------------------------
# Queued through pki.lifecycle (the subscriptions, deliveries, retries and signatures of every webhook);
# what is here is which event each pool operation is, who hears it and its payload.

ROOT_TYPES = {"v2g": "V2G", "mo": "MO", "oem": "OEM"}
ISO20_EVENT = "urn:iso:15118:20:2022:MsgDef"  # the payload document's -20 namespace


def _curve(cert: x509.Certificate) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name in ("secp256r1", "secp521r1"):
        return pub.curve.name
    return None


def root_payload(ca: CertificateAuthority) -> dict[str, Any]:
    """The ``payload`` of a root.cert.* event."""
    cert = x509.load_der_x509_certificate(ca.der)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    out: dict[str, Any] = {"rootCertificateId": root_certificate_id(ca.der), "distinguishedName": opnc_dn(cert.subject),
                           "commonName": str(cn[0].value) if cn else ca.name, "rootType": ROOT_TYPES[ca.hierarchy],
                           "rootSerialNumber": format(cert.serial_number, "x"),
                           "fingerprintSHA256": hashlib.sha256(ca.der).hexdigest()}
    curve = _curve(cert)
    if curve:
        out["signatureAlgorithm"] = curve
    return out


def root_events(ctx: Context, event: dict[str, Any]) -> list[int]:
    """root.cert.added / root.cert.revoked for the Plug & Charge roots (V2G, MO, OEM) in a ``ca.changed``
    outbox event (pki/outbox.py's observers: a root issued — init, rollover — or revoked), to every
    subscriber of that event type. Returns the pending delivery ids."""
    change = {"added": "root.cert.added", "revoked": "root.cert.revoked"}.get(str(event.get("change")))
    if change is None:
        return []
    ids: list[int] = []
    for item in event.get("cas") or []:
        ca = store.root_by_serial(ctx.db, str(item.get("serial", "")))
        if ca is None or ca.hierarchy not in ROOT_TYPES:
            continue
        ns = ISO2 if _curve(x509.load_der_x509_certificate(ca.der)) == "secp256r1" else ISO20_EVENT
        body = lifecycle.opcp_event(change, root_payload(ca), ns)
        ids += lifecycle.queue_event(ctx, change, f"opcp:{change}:{ca.name}/{ca.serial}", body, None, everyone=True)
    return ids


def _oem_orgs(ctx: Context, pcid: str) -> list[str]:
    """The OEM organizations of a PCID: whose WMI prefixes own it, and who registered its pool entry."""
    with ctx.db.session() as s:
        orgs = {o.name for o in orgs_with_role(s, "oem") if owns_identifier(list(o.prefixes or []), "pcid", pcid)}
        orgs |= store.provisioning_registrants(s, pcid)
    return sorted(orgs)


def contract_payload(ctx: Context, c: Contract, exi: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {"emaid": c.emaid, "pcid": c.pcid}
    if exi is None:
        return out
    try:
        msg = decode_message(exi)
    except ExiError:
        return out
    body = msg.body
    if isinstance(body, CertificateInstallationRes) and body.contract_signature_cert_chain.certificate:
        out["contractCert"] = b64(body.contract_signature_cert_chain.certificate)
    root = signer_root(ctx, msg)
    if root is not None:
        cn = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        out["cpsSignerRootFingerprint"] = root_fingerprint(root)
        if cn:
            out["cpsSignerRootCommonName"] = str(cn[0].value)
        curve = _curve(root)
        if curve:
            out["signatureAlgorithm"] = curve
    return out


def contract_events(ctx: Context, c: Contract, change: str, exi: bytes | None = None) -> list[int]:
    """A contract's data changed in the pool (``change``: created, updated, deleted — or delivered, the OEM
    fetched it): oem.contract.<change> to the vehicle's OEM organizations, mo.contract.<change>.sent.to.oem
    (mo.contract.delivered.to.oem) to the contract's eMSP, and the eMSP's one-shot subscriptionUrl for this
    contract. Nobody else hears it."""
    payload = contract_payload(ctx, c, exi)
    key = f"opcp:{change}:{c.emaid}:{secrets.token_hex(6)}"
    ids: list[int] = []
    if change != "delivered":
        oem_type = f"oem.contract.{change}"
        for org in _oem_orgs(ctx, c.pcid):
            ids += lifecycle.queue_event(ctx, oem_type, key, lifecycle.opcp_event(oem_type, payload), org)
    mo_type = "mo.contract.delivered.to.oem" if change == "delivered" else f"mo.contract.{change}.sent.to.oem"
    body = lifecycle.opcp_event(mo_type, payload)
    ids += lifecycle.queue_event(ctx, mo_type, key, body, c.emsp)
    ids += lifecycle.queue_one_shot(ctx, mo_type, key, body, c.emsp, c.emaid)
    return ids


def provisioning_events(ctx: Context, pcid: str, change: str) -> list[int]:
    """An OEM registered (``updated``) or removed (``deleted``) a vehicle's provisioning certificate:
    mo.prov.cert.<change> to the eMSP of each active contract for the PCID (one event per EMAID)."""
    event_type = f"mo.prov.cert.{change}"
    v = normalise_pcid(pcid)
    rows = store.active_contracts_of_pcid(ctx.db, v)
    ids: list[int] = []
    tag = secrets.token_hex(6)
    for c in rows:
        body = lifecycle.opcp_event(event_type, {"emaid": c.emaid, "pcid": c.pcid})
        ids += lifecycle.queue_event(ctx, event_type, f"opcp:{event_type}:{c.emaid}:{tag}", body, c.emsp)
    return ids
