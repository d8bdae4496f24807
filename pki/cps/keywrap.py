"""Contract private key encryption for the vehicle, ISO 15118-2 [V2G2-818..823].

What the CPS does (``wrap_contract_key``):

1. a fresh ephemeral P-256 key pair e;
2. Z = x-coordinate of ECDH(e, vehicle public key) — the OEM provisioning certificate's key for
   CertificateInstallation, the current contract certificate's key for CertificateUpdate [V2G2-821];
3. K = NIST SP 800-56A concatenation KDF with SHA-256, 128-bit output and OtherInfo = AlgorithmID 0x01 ‖
   PartyUInfo 'U' (0x55) ‖ PartyVInfo 'V' (0x56), i.e. K = SHA-256(00000001 ‖ Z ‖ 01 55 56)[:16] [V2G2-818];
4. AES-128-CBC without padding, random IV, over the contract private scalar as 32 big-endian octets;
5. ContractSignatureEncryptedPrivateKey = IV ‖ ciphertext (48 octets), DHpublickey = 0x04 ‖ X ‖ Y of e
   (65 octets).

``unwrap_contract_key`` is the vehicle's side (for tests and self-checks); it also checks that the
decrypted scalar times G is the contract certificate's public key [V2G2-823].

Secrets: K, Z and the scalar are held in ``bytearray`` buffers and zeroed after use. That is as far as
Python allows — the ``cryptography`` library returns Z as immutable ``bytes`` and keeps its own copies, and
the integer scalar inside key objects cannot be wiped. Nothing here logs or formats key material.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import KeyWrapError

KDF_OTHER_INFO = bytes([0x01, 0x55, 0x56])  # AlgorithmID 0x01, PartyUInfo "U", PartyVInfo "V" [V2G2-818]
KDF_COUNTER = (1).to_bytes(4, "big")
SCALAR_OCTETS = 32
IV_OCTETS = 16
ENCRYPTED_KEY_OCTETS = IV_OCTETS + SCALAR_OCTETS  # 48
DH_PUBLIC_KEY_OCTETS = 65
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class WrappedContractKey:
    encrypted_private_key: bytes  # ContractSignatureEncryptedPrivateKey: IV ‖ ciphertext, 48 octets
    dh_public_key: bytes  # DHpublickey: 0x04 ‖ X ‖ Y, 65 octets

    def __repr__(self) -> str:  # no key material in logs, even encrypted
        return "WrappedContractKey(<48 octets>, <65 octets>)"


def _wipe(buffer: bytearray) -> None:
    for i in range(len(buffer)):
        buffer[i] = 0


def _p256_public(key: ec.EllipticCurvePublicKey | x509.Certificate, role: str) -> ec.EllipticCurvePublicKey:
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise KeyWrapError(f"{role} must be an EC secp256r1 key")
    return public


def derive_key_encryption_key(shared_secret: bytes | bytearray) -> bytearray:
    """K = SHA-256(counter 00000001 ‖ Z ‖ OtherInfo)[:16]: one round of the SP 800-56A concat KDF [V2G2-818]."""
    if len(shared_secret) != SCALAR_OCTETS:
        raise KeyWrapError("ECDH shared secret must be 32 octets")
    digest = hashlib.sha256()
    digest.update(KDF_COUNTER)
    digest.update(bytes(shared_secret))
    digest.update(KDF_OTHER_INFO)
    full = bytearray(digest.digest())
    key = full[:16]
    _wipe(full)
    return key


def _ecdh_kek(private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytearray:
    z = bytearray(private.exchange(ec.ECDH(), public))  # x-coordinate of the shared point [V2G2-818]
    try:
        return derive_key_encryption_key(z)
    finally:
        _wipe(z)


def wrap_contract_key(
    contract_key: ec.EllipticCurvePrivateKey,
    vehicle_key: ec.EllipticCurvePublicKey | x509.Certificate,
) -> WrappedContractKey:
    """Encrypt the contract private key for the vehicle [V2G2-818..820].

    ``vehicle_key``: the OEM provisioning certificate (installation) or the current contract certificate
    (update, [V2G2-821]), or its public key.
    """
    if not isinstance(contract_key, ec.EllipticCurvePrivateKey) or not isinstance(contract_key.curve, ec.SECP256R1):
        raise KeyWrapError("the contract key must be an EC secp256r1 private key")
    recipient = _p256_public(vehicle_key, "the vehicle's key")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    kek = _ecdh_kek(ephemeral, recipient)
    scalar = bytearray(contract_key.private_numbers().private_value.to_bytes(SCALAR_OCTETS, "big"))
    iv = secrets.token_bytes(IV_OCTETS)
    try:
        encryptor = Cipher(algorithms.AES(bytes(kek)), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(bytes(scalar)) + encryptor.finalize()
    finally:
        _wipe(kek)
        _wipe(scalar)
    dh = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return WrappedContractKey(iv + ciphertext, dh)


def unwrap_contract_key(
    encrypted_private_key: bytes,
    dh_public_key: bytes,
    vehicle_private_key: ec.EllipticCurvePrivateKey,
    contract_public_key: ec.EllipticCurvePublicKey | x509.Certificate | None = None,
) -> ec.EllipticCurvePrivateKey:
    """What the vehicle does: ECDH with DHpublickey, same KDF, AES-128-CBC decrypt.

    With ``contract_public_key`` (the contract certificate or its key), checks scalar·G against it
    [V2G2-823]. Raises :class:`KeyWrapError` on any malformed input or mismatch.
    """
    if len(encrypted_private_key) != ENCRYPTED_KEY_OCTETS:
        raise KeyWrapError("ContractSignatureEncryptedPrivateKey must be 48 octets (IV ‖ ciphertext)")
    if len(dh_public_key) != DH_PUBLIC_KEY_OCTETS or dh_public_key[0] != 0x04:
        raise KeyWrapError("DHpublickey must be an uncompressed secp256r1 point (65 octets, 0x04 ‖ X ‖ Y)")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), dh_public_key)
    except ValueError:
        raise KeyWrapError("DHpublickey is not a point on secp256r1") from None
    if not isinstance(vehicle_private_key.curve, ec.SECP256R1):
        raise KeyWrapError("the vehicle's private key must be secp256r1")
    kek = _ecdh_kek(vehicle_private_key, ephemeral)
    iv, ciphertext = encrypted_private_key[:IV_OCTETS], encrypted_private_key[IV_OCTETS:]
    scalar = bytearray()
    try:
        decryptor = Cipher(algorithms.AES(bytes(kek)), modes.CBC(iv)).decryptor()
        scalar = bytearray(decryptor.update(ciphertext) + decryptor.finalize())
        value = int.from_bytes(scalar, "big")
    finally:
        _wipe(kek)
        _wipe(scalar)
    if not 0 < value < _P256_ORDER:
        raise KeyWrapError("decrypted contract key is not a valid secp256r1 scalar")
    key = ec.derive_private_key(value, ec.SECP256R1())
    if contract_public_key is not None:
        check_contract_key(key, contract_public_key)
    return key


def check_contract_key(
    private_key: ec.EllipticCurvePrivateKey, contract_public_key: ec.EllipticCurvePublicKey | x509.Certificate
) -> None:
    """[V2G2-823]: the private scalar times G must equal the contract certificate's public key."""
    expected = _p256_public(contract_public_key, "the contract certificate's key")
    if private_key.public_key().public_numbers() != expected.public_numbers():
        raise KeyWrapError("contract private key does not match the contract certificate [V2G2-823]")


__all__ = [
    "KDF_OTHER_INFO",
    "WrappedContractKey",
    "check_contract_key",
    "derive_key_encryption_key",
    "unwrap_contract_key",
    "wrap_contract_key",
]
