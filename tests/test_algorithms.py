"""#23 item 5: one key-algorithm table (hsm/algorithms.py) drives every signature the PKI makes.

Each row (key type → hash, signatureAlgorithm, signature encoding, PKCS#11 mechanisms) is checked against
what cryptography itself produces, and the certificates, CRLs, OCSP responses and CPS signatures made by the
services carry their signer's row: the same AlgorithmIdentifier bytes, a signature that verifies with the
row's hash.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x448
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from hsm.algorithms import ALGORITHMS, Algorithm, KeyAlg, SigEncoding, algorithm_of, key_alg_of
from pki.context import Context
from pki.cps.crypto20 import ECDSA_SHA512, EDDSA_ED448, sign20
from pki.cps.errors import XmlDsigError
from pki.cps.exi.messages20 import Chain20, SignedInstallationData
from pki.crl import generate_crl
from pki.hierarchy import KEY_MECHANISMS
from pki.lint import MAX_SIG_LEN
from pki.store.models import CrlRecord, OcspResponseCache
from tests.conftest import csr_pem

_CRL = CrlRecord.__table__  # type: ignore[attr-defined]
_OCSP = OcspResponseCache.__table__  # type: ignore[attr-defined]


def _sig_alg_der(signed_der: bytes) -> bytes:
    """The second element of a SIGNED{...} SEQUENCE (Certificate, CertificateList): signatureAlgorithm."""
    from pki.der import elements

    (_, _, c0, c1), = elements(signed_der)
    alg = elements(signed_der, c0, c1)[1]
    return signed_der[alg[1]:alg[3]]


def _verify(row: Algorithm, pub: object, signature: bytes, data: bytes) -> None:
    if row.ecdsa is None:
        assert isinstance(pub, ed448.Ed448PublicKey)
        pub.verify(signature, data)
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(signature, data, row.ecdsa)


def test_one_row_per_key_type_and_every_profile_key_type_has_one(sqlite_ctx: Context) -> None:
    assert set(ALGORITHMS) == set(KeyAlg)
    profiles = sqlite_ctx.profiles
    for name in profiles.names():
        for alg in profiles.get(name).key_algs:
            assert ALGORITHMS[alg].key_alg is alg, name
    # the users read the table: lint's size bound and the token plan's mechanisms
    assert MAX_SIG_LEN == {a.value: r.max_sig_len for a, r in ALGORITHMS.items()}
    assert KEY_MECHANISMS == {a: (r.keygen_mechanism, r.sign_mechanism) for a, r in ALGORITHMS.items()}


@pytest.mark.parametrize("alg", list(KeyAlg))
def test_row_is_what_cryptography_produces(alg: KeyAlg) -> None:
    """The row's AlgorithmIdentifier is the one cryptography's builder writes for that key and hash; the
    row's sign() verifies; its encoding of a raw r || s is the DER X.509 carries; the bound holds."""
    row = ALGORITHMS[alg]
    key = row.generate()
    assert key_alg_of(key) is alg and key_alg_of(key.public_key()) is alg and algorithm_of(key) is row
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, row.hash))  # type: ignore[arg-type]
    from cryptography.hazmat.primitives import serialization

    der = cert.public_bytes(serialization.Encoding.DER)
    assert cert.signature_algorithm_oid.dotted_string == row.sig_oid
    assert _sig_alg_der(der) == row.sig_alg_der
    sig = row.sign(key, b"message")
    _verify(row, key.public_key(), sig, b"message")
    assert len(sig) <= row.max_sig_len
    with pytest.raises(InvalidSignature):
        _verify(row, key.public_key(), sig, b"other")
    if row.encoding is SigEncoding.DER_ECDSA:
        r, s = decode_dss_signature(sig)
        raw = r.to_bytes(row.field_octets, "big") + s.to_bytes(row.field_octets, "big")
        assert row.encode_signature(raw) == sig == encode_dss_signature(r, s)
        assert row.hashlib_new is not None
        _verify(row, key.public_key(), row.sign_digest(key, row.hashlib_new(b"message").digest()), b"message")
    else:
        assert row.encode_signature(sig) == sig and len(sig) == 2 * row.field_octets
        with pytest.raises(ValueError):
            row.sign_digest(key, b"\x00" * 64)


def test_unknown_key_types_are_refused() -> None:
    with pytest.raises(ValueError, match="secp384r1"):
        key_alg_of(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(ValueError):
        key_alg_of(x448.X448PrivateKey.generate().public_key())


def test_certificates_and_crls_carry_their_issuers_row(sqlite_ctx: Context) -> None:
    """Every CA certificate (signed by its parent's key, or its own) and a fresh CRL of each CA carry the
    signatureAlgorithm bytes of the signing key's row and verify with that row's hash."""
    ctx = sqlite_ctx
    cas = {h.name: h for h in ctx.engine.cas()}
    seen: set[KeyAlg] = set()
    from cryptography.hazmat.primitives import serialization

    for h in cas.values():
        issuer = cas[h.row.parent] if h.row.parent else h
        row = ALGORITHMS[issuer.alg]
        der = h.cert.public_bytes(serialization.Encoding.DER)
        assert _sig_alg_der(der) == row.sig_alg_der, h.name
        _verify(row, issuer.cert.public_key(), h.cert.signature, h.cert.tbs_certificate_bytes)
        if h.row.status != "active":
            continue
        info = generate_crl(ctx, h.name)
        with ctx.db.engine.connect() as conn:
            crl_der = bytes(conn.execute(select(_CRL.c.der).where(_CRL.c.issuer == h.name,
                                                                 _CRL.c.number == info.number)).scalar_one())
        own = ALGORITHMS[h.alg]
        assert _sig_alg_der(crl_der) == own.sig_alg_der, h.name
        crl = x509.load_der_x509_crl(crl_der)
        _verify(own, h.cert.public_key(), crl.signature, crl.tbs_certlist_bytes)
        seen.add(h.alg)
    assert seen == set(KeyAlg)  # the test hierarchy has CAs of every key type


def test_leaf_and_ocsp_responses_carry_their_signers_row(sqlite_ctx: Context) -> None:
    """An issued leaf (TBS template or builder) carries its CA's row; every stored OCSP response carries the
    row of the key of the signer certificate it includes."""
    ctx = sqlite_ctx
    issued = [ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ALG*E{i:07d}*1", dc="CPO"), actor="test")
              for i in range(3)]  # the first learns the template, the others use it
    for i in issued:
        h = ctx.engine.ca(i.issuer)
        assert _sig_alg_der(i.der) == ALGORITHMS[h.alg].sig_alg_der
        _verify(ALGORITHMS[h.alg], h.cert.public_key(), i.cert.signature, i.cert.tbs_certificate_bytes)
    from pki.ocsp import responder_for

    responder_for(ctx).presigner.flush()
    with ctx.db.engine.connect() as conn:
        ders = [bytes(d) for (d,) in conn.execute(select(_OCSP.c.der).limit(200))]
    assert ders
    for der in ders:
        resp = ocsp.load_der_ocsp_response(der)
        signer_pub = (resp.certificates[0] if resp.certificates else None)
        assert signer_pub is not None
        row = algorithm_of(signer_pub.public_key())  # type: ignore[arg-type]
        assert resp.signature_algorithm_oid.dotted_string == row.sig_oid
        assert row.sig_alg_der in der
        _verify(row, signer_pub.public_key(), resp.signature, resp.tbs_response_bytes)


@pytest.mark.parametrize("alg", [KeyAlg.P521, KeyAlg.ED448])
def test_cps20_signature_follows_the_row(alg: KeyAlg) -> None:
    """ISO 15118-20 CPS signatures: the SignatureMethod and the SignatureValue's encoding (raw r || s for
    ECDSA, RFC 4050; EdDSA as it is) come from the CPS key's row; a P-256 key is refused."""
    row = ALGORITHMS[alg]
    key = row.generate()
    data = SignedInstallationData("id1", Chain20(b"\x30\x03\x02\x01\x01", (b"\x30\x03\x02\x01\x02",)), "SECP521",
                                  b"\x04" * 133, b"\x00" * 94)
    sig = sign20(data.to_node(), key)
    assert sig.signed_info.signature_method == (ECDSA_SHA512 if alg is KeyAlg.P521 else EDDSA_ED448)
    assert len(sig.signature_value) == 2 * row.field_octets
    with pytest.raises(XmlDsigError):
        sign20(data.to_node(), ALGORITHMS[KeyAlg.P256].generate())
