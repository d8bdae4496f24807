"""Contract private key encryption [V2G2-818..823]: KDF, AES-128-CBC wrapping, the vehicle's unwrapping."""

from __future__ import annotations

import datetime
import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from pki.cps.errors import KeyWrapError
from pki.cps.keywrap import (
    KDF_OTHER_INFO,
    WrappedContractKey,
    check_contract_key,
    derive_key_encryption_key,
    unwrap_contract_key,
    wrap_contract_key,
)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_kdf_is_sp800_56a_concat_kdf_with_iso_other_info() -> None:
    """K = SHA-256(00000001 ‖ Z ‖ 01 55 56)[:16], checked against cryptography's independent ConcatKDF."""
    assert KDF_OTHER_INFO == bytes.fromhex("015556")
    for _ in range(20):
        z = os.urandom(32)
        expected = ConcatKDFHash(hashes.SHA256(), 16, KDF_OTHER_INFO).derive(z)
        assert bytes(derive_key_encryption_key(z)) == expected
        assert expected == hashlib.sha256(b"\x00\x00\x00\x01" + z + b"\x01\x55\x56").digest()[:16]
    with pytest.raises(KeyWrapError):
        derive_key_encryption_key(bytes(31))


def test_wrap_then_unwrap_as_the_vehicle() -> None:
    oem = _p256()
    contract = _p256()
    wrapped = wrap_contract_key(contract, _certificate(oem, "PCID0123456789ABCDE"))
    assert len(wrapped.encrypted_private_key) == 48  # IV ‖ ciphertext
    assert len(wrapped.dh_public_key) == 65 and wrapped.dh_public_key[0] == 0x04
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), wrapped.dh_public_key)  # on the curve
    recovered = unwrap_contract_key(
        wrapped.encrypted_private_key, wrapped.dh_public_key, oem, _certificate(contract, "DEABCC123ABC56")
    )
    assert recovered.private_numbers().private_value == contract.private_numbers().private_value


def test_independent_decryption_of_the_wrapped_key() -> None:
    """Decrypt with nothing from pki.cps: ECDH, ConcatKDF and AES-CBC straight from cryptography."""
    oem = _p256()
    contract = _p256()
    wrapped = wrap_contract_key(contract, oem.public_key())
    ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), wrapped.dh_public_key)
    z = oem.exchange(ec.ECDH(), ephemeral)
    k = ConcatKDFHash(hashes.SHA256(), 16, bytes([0x01, 0x55, 0x56])).derive(z)
    iv, ciphertext = wrapped.encrypted_private_key[:16], wrapped.encrypted_private_key[16:]
    decryptor = Cipher(algorithms.AES(k), modes.CBC(iv)).decryptor()
    scalar = decryptor.update(ciphertext) + decryptor.finalize()
    assert scalar == contract.private_numbers().private_value.to_bytes(32, "big")


def test_small_scalar_is_left_padded() -> None:
    oem = _p256()
    for value in (1, 2**8 + 3, 2**200 + 5):
        contract = ec.derive_private_key(value, ec.SECP256R1())
        wrapped = wrap_contract_key(contract, oem.public_key())
        assert (
            unwrap_contract_key(wrapped.encrypted_private_key, wrapped.dh_public_key, oem)
            .private_numbers()
            .private_value
            == value
        )


def test_every_wrap_uses_a_fresh_ephemeral_key_and_iv() -> None:
    oem = _p256()
    contract = _p256()
    first = wrap_contract_key(contract, oem.public_key())
    second = wrap_contract_key(contract, oem.public_key())
    assert first.dh_public_key != second.dh_public_key
    assert first.encrypted_private_key[:16] != second.encrypted_private_key[:16]


def test_update_wraps_for_the_current_contract_key() -> None:
    """[V2G2-821]: for CertificateUpdate the ECDH partner is the current contract certificate's key."""
    current = _p256()
    new = _p256()
    wrapped = wrap_contract_key(new, _certificate(current, "DEABCC123ABC56"))
    assert unwrap_contract_key(wrapped.encrypted_private_key, wrapped.dh_public_key, current, new.public_key())


def test_wrong_vehicle_key_is_detected_by_the_public_key_check() -> None:
    """[V2G2-823]: scalar·G must be the contract certificate's public key."""
    contract = _p256()
    wrapped = wrap_contract_key(contract, _p256().public_key())
    with pytest.raises(KeyWrapError):
        unwrap_contract_key(wrapped.encrypted_private_key, wrapped.dh_public_key, _p256(), contract.public_key())
    check_contract_key(contract, _certificate(contract, "x"))
    with pytest.raises(KeyWrapError, match="V2G2-823"):
        check_contract_key(contract, _p256().public_key())


def test_rejects_other_curves_and_malformed_inputs() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    oem = _p256()
    with pytest.raises(KeyWrapError):
        wrap_contract_key(p384, oem.public_key())
    with pytest.raises(KeyWrapError):
        wrap_contract_key(_p256(), p384.public_key())
    good = wrap_contract_key(_p256(), oem.public_key())
    compressed = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), good.dh_public_key).public_bytes(
        Encoding.X962, PublicFormat.CompressedPoint
    )
    for encrypted, dh in [
        (good.encrypted_private_key[:47], good.dh_public_key),
        (good.encrypted_private_key + b"\x00", good.dh_public_key),
        (good.encrypted_private_key, compressed),
        (good.encrypted_private_key, b"\x04" + bytes(64)),  # not on the curve
        (good.encrypted_private_key, b"\x05" + good.dh_public_key[1:]),
    ]:
        with pytest.raises(KeyWrapError):
            unwrap_contract_key(encrypted, dh, oem)
    with pytest.raises(KeyWrapError):
        unwrap_contract_key(good.encrypted_private_key, good.dh_public_key, p384)


def test_out_of_range_scalar_is_refused() -> None:
    """A ciphertext that decrypts to 0 (or ≥ n) is not a key."""
    oem = _p256()
    ephemeral = _p256()
    z = ephemeral.exchange(ec.ECDH(), oem.public_key())
    k = ConcatKDFHash(hashes.SHA256(), 16, KDF_OTHER_INFO).derive(z)
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(k), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(bytes(32)) + encryptor.finalize()
    dh = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    with pytest.raises(KeyWrapError, match="scalar"):
        unwrap_contract_key(iv + ciphertext, dh, oem)


def test_repr_leaks_nothing() -> None:
    wrapped = WrappedContractKey(bytes(range(48)), b"\x04" + bytes(range(64)))
    assert "0102" not in repr(wrapped) and "\\x01" not in repr(wrapped)
