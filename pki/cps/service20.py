"""CPS for ISO 15118-20 CertificateInstallation (#26), beside the -2 path of service.py and sharing its pipeline.

1. decode the -20 CertificateInstallationReq (CommonMessages EXI document); a -2 V2G_Message is refused;
2. the OEM provisioning certificate (leaf of OEMProvisioningCertificateChain) must chain to one of our OEM
   CAs, be valid and not revoked (pki.contracts.installation_lookup, as for -2), carry DC=OEM, and hold a
   P-521 key (ECDHCurve SECP521, [V2G20-2674]) or an Ed448 key with an X448 "Alternate Subject Public Key"
   for ECDH (ECDHCurve X448, [V2G20-2319/2534]); its key verifies the header signature;
3. contract selection: the PCID's active contracts, those named in PrioritizedEMAIDs first in that order,
   at most MaximumContractCertificateChains of them; one is delivered per exchange (those without a valid
   -20 contract certificate first) and RemainingContractCertificateChains says how many are left;
4. issuance through the engine (intent, lint, HSM signature, audit, OCSP pre-signing) from an active MO Sub-CA
   2 (-20) of the vehicle's algorithm; the contract key (P-521 or Ed448, [V2G20-2493] NOTE 1) is generated
   here, used once to issue and once to encrypt;
5. the key encrypted for the vehicle (crypto20.wrap_p521 / wrap_x448), SignedInstallationData signed by a
   -20 CPS leaf (key in the HSM) whose V2G root the vehicle lists, of the vehicle's algorithm when the
   vehicle lists both -20 roots (ecdsa-sha512 or Ed448).

Refusals the standard reports in the message are CertificateInstallationRes with a WARNING_*/FAILED_*
ResponseCode and schema-valid placeholders, unsigned. TPM_EncryptedPrivateKey is never produced: nothing in
the request asks for it; a TPM vehicle shows only through a custom extension of its OEM provisioning
certificate [V2G20-2518/2521], and a provisioning certificate with an extension outside the -20 profile's is
refused (FAILED) rather than answered with a key a TPM vehicle could not import.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x448

from hsm.keystore import certified_signer
from pki.context import Context
from pki.contracts import installation_lookup, supersede_contract_certificates
from pki.cps.crypto20 import (
    ALT_PUBLIC_KEY_OID,
    DIGEST_SHA512,
    ECDSA_SHA512,
    Wrapped20,
    aad,
    alternate_x448_key,
    ed448_scalar,
    sign20,
    verify_request20,
    wrap_p521,
    wrap_x448,
)
from pki.cps.errors import (
    CPS20Failure,
    CPSError,
    ExiError,
    KeyWrapError,
    ResponseTooLarge,
    SignatureVerificationFailed,
    XmlDsigError,
)
from pki.cps.exi.messages import Reference, Signature, SignedInfo, X509IssuerSerial
from pki.cps.exi.messages20 import (
    CERTIFICATE_INSTALLATION_REQ,
    CertificateInstallationReq20,
    CertificateInstallationRes20,
    Chain20,
    Header20,
    SignedInstallationData,
    decode_message20_tree,
    encode_message20,
)
from pki.cps.service import MAX_ROOT_IDS, _cached, _matches_root, _org_display_name, _root_name
from pki.csr import SubjectFields
from pki.errors import NotFound, PKIError
from pki.issuance import CAHandle, IssueRequest, der
from pki.store.contracts import Contracts
from pki.store.db import utcnow
from pki.store.inventory import Inventory
from pki.store.models import Certificate, Contract

EXI_RESPONSE_MAX_B64_20 = 17000  # OCPP 2.1 Get15118EVCertificateResponse.exiResponse maxLength


@dataclass
class Delivery20:
    exi: bytes
    response_code: str
    remaining: int = 0
    emaid: str | None = None
    contract_serial: str | None = None
    notes: list[str] = field(default_factory=list)


_STATUS_CODES = {"CertificateRevoked": "WARNING_CertificateRevoked", "CertificateExpired": "WARNING_CertificateExpired"}


def _failed(session_id: bytes, code: str) -> CertificateInstallationRes20:
    placeholder = SignedInstallationData("id1", Chain20(b"", (b"",)), "SECP521", bytes(133), bytes(94))
    return CertificateInstallationRes20(Header20(session_id, int(time.time())), code, "Finished", Chain20(b""),
                                        placeholder, 0)


def deliver20(ctx: Context, exi_request: bytes, *, actor: str = "cps", emsp: str | None = None,
              maximum: int | None = None, prioritized: list[str] | None = None,
              max_b64: int = EXI_RESPONSE_MAX_B64_20) -> Delivery20:
    """Answer a -20 CertificateInstallationReq (EXI in, EXI out).

    ``maximum``/``prioritized``: OCPP 2.1's copies of MaximumContractCertificateChains / PrioritizedEMAIDs.
    The EXI request is the vehicle's own, signed with its provisioning key; the OCPP fields are the charger's,
    unsigned. So the EXI decides, and OCPP values that disagree with it refuse the request (CPSError, nothing
    issued) rather than silently override or be overridden. ``max_b64``: the transport's exiResponse limit
    (OCPP 2.1: 17000), checked from the chain lengths before anything is issued (ResponseTooLarge)."""
    try:
        tree = decode_message20_tree(exi_request)
    except ExiError as exc:
        raise CPSError(f"exiRequest is not a valid ISO 15118-20 CertificateInstallationReq: {exc.message}") from None
    if tree.qname != CERTIFICATE_INSTALLATION_REQ:
        raise CPSError("exiRequest is not a CertificateInstallationReq")
    request = CertificateInstallationReq20.from_node(tree)
    _agree(request, maximum, prioritized)
    sid = request.header.session_id
    try:
        return _deliver(ctx, tree, request, actor, emsp, max_b64)
    except CPS20Failure as f:
        return Delivery20(encode_message20(_failed(sid, f.response_code)), f.response_code, notes=[str(f.message)])


def _norm_emaid(e: str) -> str:
    return e.replace("-", "").upper()


def _agree(request: CertificateInstallationReq20, maximum: int | None, prioritized: list[str] | None) -> None:
    """OCPP 2.1 Get15118EVCertificateRequest's maximumContractCertificateChains / prioritizedEMAIDs, when
    given, must say what the vehicle's signed EXI request says (§8.3.4.3.9 of ISO 15118-20 defines them)."""
    if maximum is not None and maximum != request.maximum_contract_certificate_chains:
        raise CPSError(f"maximumContractCertificateChains {maximum} disagrees with the EXI request's "
                       f"MaximumContractCertificateChains {request.maximum_contract_certificate_chains}")
    if prioritized is not None and [_norm_emaid(e) for e in prioritized] != [
            _norm_emaid(e) for e in request.prioritized_emaids or ()]:
        raise CPSError("prioritizedEMAIDs disagree with the EXI request's PrioritizedEMAIDs")


def _deliver(ctx: Context, tree: object, request: CertificateInstallationReq20, actor: str, emsp: str | None,
             max_b64: int) -> Delivery20:
    ids = request.root_certificate_ids[:MAX_ROOT_IDS]
    try:
        vehicle_cert = x509.load_der_x509_certificate(request.oem_provisioning_chain.certificate)
    except ValueError:
        raise CPS20Failure("WARNING_CertificateValidationError", "OEM provisioning certificate is not DER") from None
    public = vehicle_cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP521R1):
        alg, ecdh_key = "p521", None
    elif isinstance(public, ed448.Ed448PublicKey):
        # [V2G20-2319]/[V2G20-2534]: an Ed448 vehicle does ECDH with the X448 key of its certificate's
        # Alternate Subject Public Key; without one its contract key cannot be encrypted for it.
        alg = "ed448"
        try:
            ecdh_key = alternate_x448_key(vehicle_cert)
        except KeyWrapError as exc:
            raise CPS20Failure("WARNING_CertificateValidationError", exc.message) from None
        if ecdh_key is None:
            raise CPS20Failure("WARNING_CertificateValidationError",
                               "the Ed448 OEM provisioning certificate has no X448 Alternate Subject Public Key "
                               "(subjectAltPublicKeyInfo) for ECDH [V2G20-2534]")
    else:
        # [V2G20-2674]/[V2G20-2319]: -20 provisioning keys are secp521r1 or Ed448; a P-256 (-2) certificate is
        # refused before anything is looked up.
        raise CPS20Failure("WARNING_CertificateValidationError",
                           "the OEM provisioning certificate's key is neither secp521r1 nor Ed448 (ISO 15118-20)")
    unknown = _foreign_extensions(vehicle_cert)
    if unknown:
        # [V2G20-2518/2521]: a TPM 2.0 vehicle carries its storage key in a custom extension and expects
        # TPM_EncryptedPrivateKey, which this CPS does not produce: refused before anything is issued.
        raise CPS20Failure("FAILED", "TPM_EncryptedPrivateKey (direct TPM import) is not supported; the OEM "
                           f"provisioning certificate carries extension(s) {', '.join(unknown)} outside the -20 "
                           "profile (a TPM storage key?)")
    cn = vehicle_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    pcid = str(cn[0].value).upper() if cn else ""
    status, _, default, _ = installation_lookup(ctx, vehicle_cert, pcid, emsp)
    if status != "Accepted":
        raise CPS20Failure(_STATUS_CODES.get(status, "WARNING_CertificateValidationError"),
                           f"OEM provisioning certificate: {status}")
    dcs = vehicle_cert.subject.get_attributes_for_oid(x509.NameOID.DOMAIN_COMPONENT)
    if not dcs or str(dcs[0].value).upper() != "OEM":
        raise CPS20Failure("WARNING_CertificateValidationError", "provisioning certificate lacks DC=OEM")
    try:
        verify_request20(tree, public)  # type: ignore[arg-type]
    except (SignatureVerificationFailed, XmlDsigError, ExiError) as exc:
        raise CPS20Failure("FAILED_SignatureError", f"request signature: {exc.message}") from None

    # contract selection (§8.3.4.3.9: PrioritizedEMAIDs, MaximumContractCertificateChains)
    order = [_norm_emaid(e) for e in request.prioritized_emaids or ()]

    def choose(contracts: list[Contract]) -> list[Contract]:
        contracts.sort(key=lambda c: (order.index(c.emaid) if c.emaid in order else len(order), not c.is_default,
                                      c.emaid))
        return contracts[:request.maximum_contract_certificate_chains or len(contracts)]

    selected, installed = Contracts(ctx.db).choose_for_pcid(pcid, emsp, utcnow(), "contract-20", choose)
    if not selected:
        if emsp is not None:
            raise NotFound(f"no active contract of yours for PCID {pcid}")
        raise CPS20Failure("WARNING_NoContractMatchingPCIDFound", f"no active contract for PCID {pcid}")
    pending = [c for c in selected if c.emaid not in installed] or selected[:1]
    contract = pending[0]
    remaining = max(0, len(pending) - 1)
    del default

    cps_row, cps_subs = _cps_signer20(ctx, ids, alg)
    mo_ca = _pick_mo20(ctx, alg)
    if mo_ca is None:
        raise CPS20Failure("WARNING_NoCertificateAvailable", f"no active {alg} MO Sub-CA 2 (-20)")
    bound = _cached(ctx, f"max-b64-20:{cps_row.issuer}/{cps_row.serial}:{mo_ca.name}",
                    lambda: _max_response_b64_20(ctx, cps_row, cps_subs, mo_ca))
    if bound > max_b64:
        raise ResponseTooLarge(f"exiResponse could be {bound} characters (> {max_b64}): the CPS and contract "
                               "chains are too long for this transport; nothing was issued")
    # The CPS key, checked to be the CPS certificate's key before anything is issued (as -2 does, #23 item 5).
    assert cps_row.key_uri is not None
    cps_pub = _cached(ctx, f"cps-pub:{cps_row.issuer}/{cps_row.serial}",
                      lambda: x509.load_der_x509_certificate(cps_row.der).public_key())
    signer = certified_signer(ctx.keystore, cps_row.key_uri, cps_pub,
                              f"CPS certificate {cps_row.issuer}/{cps_row.serial}")
    key: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey = (
        ec.generate_private_key(ec.SECP521R1()) if alg == "p521" else ed448.Ed448PrivateKey.generate())
    try:
        o_name = _org_display_name(ctx, contract.emsp)
        issued = ctx.engine.issue(IssueRequest(
            profile="contract-20", public_key=key.public_key(),
            subject=SubjectFields(cn=contract.emaid, o=o_name[:64], c=contract.emaid[:2], dc="MO"),
            identifier=contract.emaid, ca=mo_ca.name, tenant=contract.emsp, not_after=contract.valid_until,
            actor=actor))
        cert = x509.load_der_x509_certificate(issued.der)
        try:
            wrapped = _wrap(key, public, ecdh_key, aad(pcid, cert))
        except KeyWrapError as exc:
            raise CPS20Failure("FAILED", f"contract key could not be encrypted: {exc.message}") from None
    finally:
        del key
    data = SignedInstallationData("id1", Chain20(issued.der, tuple(der(c) for c in issued.chain[:-1])),
                                  wrapped.curve, wrapped.dh_public_key, wrapped.encrypted_private_key, wrapped.curve)
    try:
        signature = sign20(data.to_node(), signer)
    except XmlDsigError as exc:
        raise CPSError(f"CPS signature failed: {exc.message}") from None
    res = CertificateInstallationRes20(Header20(request.header.session_id, int(time.time()), signature), "OK",
                                       "Finished", Chain20(cps_row.der, tuple(cps_subs)), data, remaining)
    delivery = Delivery20(encode_message20(res), "OK", remaining, contract.emaid, issued.serial)
    try:
        gone = supersede_contract_certificates(ctx, contract.emaid, (issued.issuer, issued.serial), None, actor=actor)
        if gone:
            delivery.notes.append(f"superseded {', '.join(gone)}")
    except PKIError:
        pass
    return delivery


def _max_response_b64_20(ctx: Context, cps_row: Certificate, cps_subs: list[bytes], mo_ca: CAHandle) -> int:
    """The most base64 characters a response with these chains can take (before issuing, as -2 does): encoded
    once with a contract certificate of the profile's most octets (1600, the XSD's certificateType bound), the
    MO CA's real sub-CAs, the longest key fields (133-octet DHPublicKey, 94-octet SECP521 key) and signature
    (132 octets), the largest counters. Cached per CPS signer and MO CA."""
    sig = Signature(SignedInfo((Reference("#id1", bytes(64), DIGEST_SHA512),), signature_method=ECDSA_SHA512),
                    bytes(132))
    subs = tuple(der(c) for c in ctx.engine.chain(mo_ca.name)[:-1])
    data = SignedInstallationData("id1", Chain20(bytes(1600), subs), "SECP521", bytes(133), bytes(94), "SECP521")
    res = CertificateInstallationRes20(Header20(bytes(8), 2**64 - 1, sig), "OK", "Finished",
                                       Chain20(cps_row.der, tuple(cps_subs)), data, 255)
    return 4 * -(-len(encode_message20(res)) // 3)


def _wrap(key: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey, public: object, ecdh_key: object,
          aad_: bytes) -> Wrapped20:
    """SECP521 with the provisioning key itself, or X448 with its Alternate Subject Public Key (the Ed448
    contract key's 56-octet scalar, crypto20.ed448_scalar), [V2G20-2487/2488]."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return wrap_p521(key, public, aad_)
    assert isinstance(ecdh_key, x448.X448PublicKey)
    scalar = ed448_scalar(key)
    try:
        return wrap_x448(scalar, ecdh_key, aad_)
    finally:
        scalar[:] = bytes(len(scalar))


# What an ISO 15118-20 OEM provisioning certificate may carry (Annex B profiles, this PKI's oem-prov-20, and the
# Alternate Subject Public Key of [V2G20-2534]); anything else may be a TPM extension [V2G20-2518].
_KNOWN_EXTENSIONS = frozenset({
    x509.ExtensionOID.BASIC_CONSTRAINTS, x509.ExtensionOID.KEY_USAGE, x509.ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    x509.ExtensionOID.AUTHORITY_KEY_IDENTIFIER, x509.ExtensionOID.CRL_DISTRIBUTION_POINTS,
    x509.ExtensionOID.AUTHORITY_INFORMATION_ACCESS, x509.ExtensionOID.CERTIFICATE_POLICIES,
    x509.ExtensionOID.EXTENDED_KEY_USAGE, x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ALT_PUBLIC_KEY_OID,
    x509.ObjectIdentifier("2.5.29.73"), x509.ObjectIdentifier("2.5.29.74"),  # altSignatureAlgorithm / Value
})


def _foreign_extensions(cert: x509.Certificate) -> list[str]:
    return [e.oid.dotted_string for e in cert.extensions if e.oid not in _KNOWN_EXTENSIONS]


def _pick_mo20(ctx: Context, alg: str) -> CAHandle | None:
    cands = [h for h in ctx.engine.cas() if h.row.profile == "mo-sub2-20" and h.row.status == "active"
             and h.alg.value == alg]
    cands.sort(key=lambda h: -h.row.not_after.timestamp())
    return cands[0] if cands else None


def _cps_signer20(ctx: Context, ids: tuple[X509IssuerSerial, ...], alg: str) -> tuple[Certificate, list[bytes]]:
    """The newest valid -20 CPS leaf (key in the HSM) under a -20 V2G root the vehicle lists; of the vehicle's
    algorithm first (a vehicle listing only the other -20 root still gets an answer it can verify)."""
    def rows() -> list[Certificate]:
        return Inventory(ctx.db).service_leaves(["cps-leaf-20"], utcnow())

    now = utcnow()
    fits: list[Certificate] = []
    for row in _cached(ctx, "cps20-rows", rows):
        if row.not_after.replace(tzinfo=UTC) <= now:
            continue
        if _matches_root(ctx.engine.ca(_root_name(ctx, row.issuer)), ids):
            fits.append(row)
    fits.sort(key=lambda r: ctx.engine.ca(r.issuer).alg.value != alg)  # stable: newest first within each
    if not fits:
        raise CPS20Failure("WARNING_NoCertificateAvailable",
                           "no -20 CPS certificate chains to a V2G root the vehicle lists")
    row = fits[0]
    chain = [c.public_bytes(serialization.Encoding.DER) for c in ctx.engine.chain(row.issuer)[:-1]]
    return row, chain
