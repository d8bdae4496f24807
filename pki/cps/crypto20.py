"""ISO 15118-20 contract key encryption and EXI XML signatures (#26), beside the -2 ones (keywrap.py, xmldsig.py).

Key encryption, ISO 15118-20 §7.9.2.5.2 and §7.9.2.5.4, for an EVCC without TPM 2.0:

* ECDHE, ephemeral-static, "One-Pass Diffie-Hellman C(1, 1, ECC CDH)" of NIST SP 800-56A; the CPS/SA is
  party U, the vehicle party V; the vehicle's static key is its OEM provisioning key [V2G20-2535];
  secp521r1 (Z = x-coordinate, 66 octets) or X448 (RFC 7748 shared secret, 56 octets) [V2G20-2710];
* KDF: the SP 800-56A concatenation KDF with SHA-512, AlgorithmID 0x01, PartyUInfo 'U' (0x55), PartyVInfo
  'V' (0x56), 256-bit output [V2G20-2535] — K = SHA-512(00000001 ‖ Z ‖ 01 55 56)[:32];
* AES-256-GCM (SP 800-38D), random 96-bit IV, 128-bit tag [V2G20-2494/2497/2500]; AAD = PCID (18 upper-case
  characters) ‖ the contract certificate's SKI as upper-case hex [V2G20-2492];
* plaintext: the P-521 scalar as 66 big-endian octets (7 leading zero bits, [V2G20-2497/2498]); the 448-bit
  key as 56 octets [V2G20-2500/2501];
* SECP521_EncryptedPrivateKey = IV ‖ ciphertext ‖ tag = 12 + 66 + 16 = 94 octets [V2G20-2499];
  X448_EncryptedPrivateKey = 12 + 56 + 16 = 84 octets [V2G20-2502];
* DHPublicKey: the ephemeral public key uncompressed, 0x04 ‖ X ‖ Y, 133 octets for secp521r1 [V2G20-2489].

Signatures: the response's header Signature references SignedInstallationData (its Id); DigestValue =
SHA-512 of its EXI fragment (CommonMessages grammar); SignedInfo is EXI-encoded with the xmldsig grammar (as
Josev's -20 EVCC encodes it) and signed with ECDSA-SHA512 (r ‖ s, 66 octets each, [V2G20-1000]) by a P-521
CPS key, or Ed448 (RFC 8032, 114 octets) by an Ed448 CPS key. Request signatures are accepted with SHA-512 or
SHA-256 digests and ECDSA-SHA512 or ECDSA-SHA256 (Josev's -20 EVCC still signs like -2).

X448 (the Ed448 hierarchy, decisions documented in docs/cps.md "ISO 15118-20: Ed448 and X448"):

* the vehicle's static ECDH key is the X448 key of the OEM provisioning certificate's "Alternate Subject Public
  Key" [V2G20-2534] — read as the ITU-T X.509 (10/2019) §9.8.2 subjectAltPublicKeyInfo extension (2.5.29.72)
  holding an RFC 8410 id-X448 SubjectPublicKeyInfo; the certificate's own key (Ed448) signs the request;
* DHPublicKey = 0x04 ‖ the 56-octet ephemeral X448 key = 57 octets ([V2G20-2489] NOTE 6/7, no padding to
  133, [V2G20-2495]; the XSD's length facet of 133 is the one place this service departs from the XSD);
* the 448-bit contract private key [V2G20-2500/2509/2510] is the Ed448 secret scalar (RFC 8032 §5.2.5: the
  clamped lower half of SHAKE256(seed, 114)) reduced modulo the group order L, 56 octets big-endian
  [V2G20-2501]: smaller than L, and scalar·B is the certificate's public key, as [V2G20-2510] checks. The
  57-octet RFC 8032 seed does not fit the 56-octet ciphertext.

Doubts (the standard's text was read only in public excerpts): the algorithm URIs (RFC 6931 ecdsa-sha512 /
xmlenc sha512, RFC 9231 eddsa-ed448) and the SignedInfo grammar are not quoted from ISO 15118-20.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x448
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)

from hsm.algorithms import KeyAlg, SigEncoding, algorithm_of
from pki.csr import ALT_PUBLIC_KEY_OID

from .errors import ExiError, KeyWrapError, SignatureVerificationFailed, XmlDsigError
from .exi._names20 import NS20_CM
from .exi.codec import Node, encode_fragment
from .exi.messages import CANONICAL_EXI, DIGEST_SHA256, ECDSA_SHA256, Reference, Signature, SignedInfo
from .exi.schema import XMLDSIG
from .exi.schema20 import CM20

_NO_ENCRYPTION = NoEncryption()

DIGEST_SHA512 = "http://www.w3.org/2001/04/xmlenc#sha512"
ECDSA_SHA512 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512"
EDDSA_ED448 = "http://www.w3.org/2021/04/xmldsig-more#eddsa-ed448"
# The XMLDSig SignatureMethod of each key type a -20 CPS key may have.
_SIGNATURE_METHODS20: dict[KeyAlg, str] = {KeyAlg.P521: ECDSA_SHA512, KeyAlg.ED448: EDDSA_ED448}
IV_OCTETS = 12
TAG_OCTETS = 16
P521_OCTETS = 66
X448_OCTETS = 56
_ID = ("Id", NS20_CM)
KDF_OTHER_INFO = b"\x01UV"  # AlgorithmID 0x01, PartyUInfo 'U', PartyVInfo 'V' [V2G20-2535]
ED448_ORDER = 2**446 - 13818066809895115352007386748515426880336692474882178609894547503885  # RFC 8032 §5.2 L


@dataclass(frozen=True)
class Wrapped20:
    curve: str  # SECP521 | X448
    dh_public_key: bytes
    encrypted_private_key: bytes

    def __repr__(self) -> str:
        return f"Wrapped20({self.curve}, <{len(self.encrypted_private_key)} octets>)"


def kdf(z: bytes) -> bytes:
    """SP 800-56A §5.8.1 concatenation KDF, SHA-512, 256-bit key, OtherInfo 01 'U' 'V' [V2G20-2535]."""
    return hashlib.sha512((1).to_bytes(4, "big") + z + KDF_OTHER_INFO).digest()[:32]


def aad(pcid: str, contract_cert: x509.Certificate) -> bytes:
    """[V2G20-2492]: PCID in capitals and digits without separators (18), then the contract certificate's SKI
    as upper-case hex."""
    try:
        ski = contract_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        raise KeyWrapError("the contract certificate has no SubjectKeyIdentifier (needed for the AAD)") from None
    return pcid.replace("-", "").upper().encode("ascii") + ski.hex().upper().encode("ascii")


def wrap_p521(contract_key: ec.EllipticCurvePrivateKey, vehicle: ec.EllipticCurvePublicKey, aad_: bytes) -> Wrapped20:
    """SECP521: ephemeral P-521 ECDH with the OEM provisioning key, AES-256-GCM over the 66-octet scalar."""
    if not isinstance(vehicle.curve, ec.SECP521R1) or not isinstance(contract_key.curve, ec.SECP521R1):
        raise KeyWrapError("SECP521 key encryption needs P-521 keys on both sides")
    eph = ec.generate_private_key(ec.SECP521R1())
    key = bytearray(kdf(eph.exchange(ec.ECDH(), vehicle)))
    scalar = bytearray(contract_key.private_numbers().private_value.to_bytes(P521_OCTETS, "big"))
    try:
        iv = secrets.token_bytes(IV_OCTETS)
        sealed = AESGCM(bytes(key)).encrypt(iv, bytes(scalar), aad_)
    finally:
        for buf in (key, scalar):
            buf[:] = bytes(len(buf))
    point = eph.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return Wrapped20("SECP521", point, iv + sealed)


def ed448_scalar(key: ed448.Ed448PrivateKey) -> bytearray:
    """The 448-bit private key of an Ed448 contract key [V2G20-2500/2509]: RFC 8032 §5.2.5's secret scalar (the
    clamped first 57 octets of SHAKE256(seed, 114), little-endian) mod L, 56 octets big-endian [V2G20-2501].
    Its multiple of the base point is the key's public key [V2G20-2510]. The caller wipes the result."""
    seed = bytearray(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, _NO_ENCRYPTION))
    h = bytearray(hashlib.shake_256(bytes(seed)).digest(114))
    try:
        h[0] &= 0xFC
        h[55] |= 0x80
        h[56] = 0
        return bytearray((int.from_bytes(bytes(h[:57]), "little") % ED448_ORDER).to_bytes(X448_OCTETS, "big"))
    finally:
        seed[:] = bytes(len(seed))
        h[:] = bytes(len(h))


def alternate_x448_key(cert: x509.Certificate) -> x448.X448PublicKey | None:
    """The vehicle's X448 ECDH key [V2G20-2534]: the OEM provisioning certificate's Alternate Subject Public Key
    (subjectAltPublicKeyInfo, 2.5.29.72, an id-X448 SubjectPublicKeyInfo), or None."""
    try:
        ext = cert.extensions.get_extension_for_oid(ALT_PUBLIC_KEY_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    try:
        key = load_der_public_key(value)
    except (ValueError, TypeError):
        raise KeyWrapError("the Alternate Subject Public Key is not a SubjectPublicKeyInfo") from None
    if not isinstance(key, x448.X448PublicKey):
        raise KeyWrapError("the Alternate Subject Public Key is not an X448 key")
    return key


def wrap_x448(contract_key: bytes | bytearray, vehicle: x448.X448PublicKey, aad_: bytes) -> Wrapped20:
    """X448 [V2G20-2500..2502, 2534/2535]: ephemeral X448 with the vehicle's X448 key (RFC 7748 shared secret as
    Z), AES-256-GCM over the 56-octet key. DHPublicKey: 0x04 ‖ the 56-octet ephemeral key, 57 octets
    ([V2G20-2489] NOTE 7, no padding [V2G20-2495])."""
    if len(contract_key) != X448_OCTETS:
        raise KeyWrapError("an X448 contract key is 56 octets")
    eph = x448.X448PrivateKey.generate()
    key = bytearray(kdf(eph.exchange(vehicle)))
    try:
        iv = secrets.token_bytes(IV_OCTETS)
        sealed = AESGCM(bytes(key)).encrypt(iv, bytes(contract_key), aad_)
    finally:
        key[:] = bytes(len(key))
    return Wrapped20("X448", b"\x04" + eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), iv + sealed)


# --- signatures -------------------------------------------------------------------------------------------


def _raw(der: bytes, octets: int) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(octets, "big") + s.to_bytes(octets, "big")


def sign20(element: Node, signer: Any) -> Signature:
    """The header Signature over one signed element (SignedInstallationData): SHA-512 digest of its CM20
    fragment, SignedInfo (xmldsig grammar) signed with ECDSA-SHA512 (P-521) or Ed448 (HSM key objects)."""
    ident = element.attributes.get(_ID)
    if not isinstance(ident, str) or not ident:
        raise XmlDsigError("the signed element needs an Id")
    digest = hashlib.sha512(encode_fragment([element], CM20)).digest()
    # The signer's row of the algorithm table (hsm/algorithms.py): P-521 signs ECDSA with SHA-512, Ed448 pure
    # EdDSA [V2G20-2474]; XMLDSig carries ECDSA as raw r || s (RFC 4050 §3.3), EdDSA as it is (RFC 8032).
    try:
        row = algorithm_of(signer)
    except ValueError:
        row = None
    if row is None or row.key_alg not in _SIGNATURE_METHODS20:
        raise XmlDsigError("a -20 ECDSA CPS key must be P-521")
    si = SignedInfo((Reference(f"#{ident}", digest, DIGEST_SHA512),),
                    signature_method=_SIGNATURE_METHODS20[row.key_alg])
    data = encode_fragment([si.to_node()], XMLDSIG)
    value = row.sign(signer, data)
    if row.encoding is SigEncoding.DER_ECDSA:
        value = _raw(value, row.field_octets)
    return Signature(si, value)


def verify_request20(tree: Node, public_key: Any) -> None:
    """Verify a -20 CertificateInstallationReq's header signature over OEMProvisioningCertificateChain with
    the OEM provisioning certificate's key (P-521 ECDSA, or Ed448). Raises SignatureVerificationFailed."""
    header = tree.child("Header")
    sig_node = header.child("Signature") if header is not None else None
    chain = tree.child("OEMProvisioningCertificateChain")
    if sig_node is None or chain is None:
        raise SignatureVerificationFailed("the request carries no signature")
    try:
        signature = Signature.from_node(sig_node)
    except ExiError as exc:
        raise SignatureVerificationFailed(f"malformed signature: {exc.message}") from None
    si = signature.signed_info
    if si.canonicalization_method != CANONICAL_EXI or len(si.references) != 1:
        raise SignatureVerificationFailed("the signature must reference exactly OEMProvisioningCertificateChain")
    ref = si.references[0]
    ident = chain.attributes.get(_ID)
    if not isinstance(ident, str) or ref.uri != f"#{ident}" or ref.transforms not in ((CANONICAL_EXI,), ()):
        raise SignatureVerificationFailed("the signature does not reference OEMProvisioningCertificateChain")
    fragment = encode_fragment([chain], CM20)
    if ref.digest_method == DIGEST_SHA512:
        digest = hashlib.sha512(fragment).digest()
    elif ref.digest_method == DIGEST_SHA256:
        digest = hashlib.sha256(fragment).digest()
    else:
        raise SignatureVerificationFailed("unexpected DigestMethod")
    if not hmac.compare_digest(digest, ref.digest_value):
        raise SignatureVerificationFailed("DigestValue does not match OEMProvisioningCertificateChain")
    si_node = sig_node.child("SignedInfo")
    assert si_node is not None
    value = signature.signature_value
    for schema in (XMLDSIG, CM20):
        data = encode_fragment([si_node], schema)
        try:
            if isinstance(public_key, ed448.Ed448PublicKey) and si.signature_method == EDDSA_ED448:
                public_key.verify(value, data)
                return
            ecdsa = si.signature_method in (ECDSA_SHA512, ECDSA_SHA256)
            if isinstance(public_key, ec.EllipticCurvePublicKey) and ecdsa:
                n = (public_key.curve.key_size + 7) // 8
                if len(value) != 2 * n:
                    raise SignatureVerificationFailed(f"SignatureValue must be {2 * n} octets (r ‖ s)")
                h = hashes.SHA512() if si.signature_method == ECDSA_SHA512 else hashes.SHA256()
                der = encode_dss_signature(int.from_bytes(value[:n], "big"), int.from_bytes(value[n:], "big"))
                public_key.verify(der, data, ec.ECDSA(h))
                return
            raise SignatureVerificationFailed("SignatureMethod does not fit the provisioning key")
        except InvalidSignature:
            continue
    raise SignatureVerificationFailed("the signature over SignedInfo does not verify")


__all__ = ["ALT_PUBLIC_KEY_OID", "DIGEST_SHA512", "ECDSA_SHA256", "ECDSA_SHA512", "EDDSA_ED448", "Wrapped20", "aad",
           "alternate_x448_key", "ed448_scalar", "kdf", "sign20", "verify_request20", "wrap_p521", "wrap_x448"]
