"""The hand-written OCSP response DER (pki/ocsp/response.py: single_response, basic_response) compared with
cryptography's OCSPResponseBuilder for the same content: the signed ResponseData (tbsResponseData) must be
byte for byte the same, and each signature verifies with the signer's key (ECDSA signatures differ run to
run, so the bytes compared are the signed ones)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hsm.algorithms import KeyAlg
from pki.der import spki_key_bits
from pki.ocsp.request import certid_der
from pki.ocsp.response import basic_response, single_response

NH, KH = b"\x11" * 20, b"\x22" * 20
SERIAL = 0x1F2E3D4C5B6A79


def _signer(key: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OCSP test signer")])
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30)))
    return b.sign(key, None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256())


CASES = [
    ("good", None, None),
    ("revoked", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), "keyCompromise"),
    ("hold", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), None),
    ("unknown", None, None),
]
_STATUS = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
           "hold": ocsp.OCSPCertStatus.REVOKED, "unknown": ocsp.OCSPCertStatus.UNKNOWN}
_REASON = {"keyCompromise": x509.ReasonFlags.key_compromise, None: None}


@pytest.mark.parametrize("alg", [KeyAlg.P256, KeyAlg.P521, KeyAlg.ED448])
@pytest.mark.parametrize("status, revoked_at, reason", CASES)
@pytest.mark.parametrize("nonce", [None, b"\x04\x10" + b"n" * 16])
def test_response_matches_cryptography(alg: KeyAlg, status: str, revoked_at: datetime | None,
                                       reason: str | None, nonce: bytes | None) -> None:
    key: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey = (
        ed448.Ed448PrivateKey.generate() if alg is KeyAlg.ED448
        else ec.generate_private_key(ec.SECP521R1() if alg is KeyAlg.P521 else ec.SECP256R1()))
    cert = _signer(key)
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    key_hash = hashlib.sha1(spki_key_bits(cert)).digest()  # noqa: S324 - RFC 6960 KeyHash
    # cryptography stamps producedAt with the current second: build both within one second.
    for _ in range(5):
        b = ocsp.OCSPResponseBuilder().add_response_by_hash(
            NH, KH, SERIAL, hashes.SHA1(), _STATUS[status],
            this_update := datetime.now(UTC).replace(microsecond=0),
            this_update + timedelta(hours=216),
            revoked_at, x509.ReasonFlags.certificate_hold if status == "hold" else _REASON[reason],
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, cert).certificates([cert])
        if nonce is not None:
            b = b.add_extension(x509.OCSPNonce(nonce[2:]), critical=False)
        theirs = b.sign(key, None if alg is KeyAlg.ED448 else
                        (hashes.SHA512() if alg is KeyAlg.P521 else hashes.SHA256()))
        single = single_response(certid_der("sha1", NH, KH, SERIAL), status, revoked_at, reason, this_update,
                                 this_update + timedelta(hours=216))
        mine = ocsp.load_der_ocsp_response(basic_response(key, alg, key_hash, cert_der, [single],
                                                          theirs.produced_at_utc, nonce))
        if mine.produced_at_utc == theirs.produced_at_utc and theirs.this_update_utc == this_update:
            break
    assert mine.tbs_response_bytes == theirs.tbs_response_bytes
    assert mine.signature_algorithm_oid == theirs.signature_algorithm_oid
    assert mine.certificates == theirs.certificates
    pub = cert.public_key()
    if isinstance(pub, ed448.Ed448PublicKey):
        pub.verify(mine.signature, mine.tbs_response_bytes)
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey) and mine.signature_hash_algorithm is not None
        pub.verify(mine.signature, mine.tbs_response_bytes, ec.ECDSA(mine.signature_hash_algorithm))
