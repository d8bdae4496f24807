"""EXI XML signatures: the CPS signing its responses, and verifying the vehicle's signed requests."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from pki.cps.errors import SignatureVerificationFailed, XmlDsigError
from pki.cps.exi import (
    EMAID,
    MSGDEF,
    CertificateChain,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    CertificateUpdateRes,
    DHPublicKey,
    EncryptedPrivateKey,
    MessageHeader,
    Reference,
    ResponseCode,
    Signature,
    SignedInfo,
    V2GMessage,
    X509IssuerSerial,
    decode_message,
    encode_body_fragment,
    encode_message,
    encode_signed_info,
)
from pki.cps.exi.messages import ECDSA_SHA256
from pki.cps.keywrap import unwrap_contract_key, wrap_contract_key
from pki.cps.xmldsig import (
    der_to_raw,
    raw_to_der,
    sign_contract_response,
    sign_elements,
    verify_request,
    verify_response,
)

from .test_exi_vectors import (
    EXIFICIENT_MESSAGES,
    RISE_CPS_PRIVATE_SCALAR,
    RISE_DIGESTS,
    RISE_SIGNED_INFO,
    rise_cps_public_key,
    rise_elements,
    rise_response,
)
from .test_keywrap import _certificate

ROOTS = (X509IssuerSerial("CN=V2G Root CA,O=Example,C=DE,DC=V2G", 0x0102030405060708),)


def test_der_raw_conversions() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for _ in range(20):
        der = key.sign(b"data", ec.ECDSA(hashes.SHA256()))
        raw = der_to_raw(der)
        assert len(raw) == 64
        assert decode_dss_signature(raw_to_der(raw)) == decode_dss_signature(der)
    small = encode_dss_signature(1, 2**255)
    assert der_to_raw(small) == (1).to_bytes(32, "big") + (2**255).to_bytes(32, "big")  # left-padded r
    with pytest.raises(XmlDsigError):
        der_to_raw(b"\x01" * 64)  # raw r ‖ s is not what a signer returns
    with pytest.raises(XmlDsigError):
        der_to_raw(encode_dss_signature(2**256, 1))
    with pytest.raises(SignatureVerificationFailed):
        raw_to_der(bytes(63))


# --- the published RISE-V2G signature ---------------------------------------------------------------------------


def test_rise_response_signature_verifies() -> None:
    """RISE's CertificateInstallationRes: four digests (eMAID via the element fragment grammar), the
    SignedInfo EXI and the published r ‖ s all check out with the CPS Sub-CA 2 public key."""
    message = rise_response()
    verify_response(message, rise_cps_public_key())
    verify_response(decode_message(encode_message(message)), rise_cps_public_key())


def test_rise_response_tampering_is_detected() -> None:
    message = rise_response()
    body = message.body
    assert isinstance(body, CertificateInstallationRes)
    for changed in (
        dataclasses.replace(body, emaid=EMAID("DEABCC123ABC57", "id4")),
        dataclasses.replace(body, dh_public_key=DHPublicKey(b"\x04" + bytes(64), "id3")),
    ):
        with pytest.raises(SignatureVerificationFailed):
            verify_response(dataclasses.replace(message, body=changed), rise_cps_public_key())
    # the SA provisioning chain is not signed
    verify_response(rise_response(CertificateChain(b"\x30\x03\x02\x01\x00")), rise_cps_public_key())


def test_libcbv2g_style_emaid_digest_differs_from_the_published_one() -> None:
    """EVerest/cbexigen issue #60: encoding eMAID with EMAIDType's own grammar gives another #id4 digest."""
    *_, emaid = rise_elements()
    compat = hashlib.sha256(encode_body_fragment(emaid, emaid_libcbv2g_compat=True)).hexdigest().upper()
    assert compat != RISE_DIGESTS["id4"][0]
    assert hashlib.sha256(encode_body_fragment(emaid)).hexdigest().upper() == RISE_DIGESTS["id4"][0]


def test_signing_with_the_rise_key_reproduces_the_signed_info() -> None:
    key = ec.derive_private_key(RISE_CPS_PRIVATE_SCALAR, ec.SECP256R1())
    chain, enc, dh, emaid = rise_elements()
    signature = sign_elements([enc, chain, emaid, dh], key)  # RISE's reference order
    assert encode_signed_info(signature.signed_info) == RISE_SIGNED_INFO
    assert len(signature.signature_value) == 64
    rise_cps_public_key().verify(raw_to_der(signature.signature_value), RISE_SIGNED_INFO, ec.ECDSA(hashes.SHA256()))


# --- signing a response -----------------------------------------------------------------------------------------


def _response(oem: ec.EllipticCurvePrivateKey, contract: ec.EllipticCurvePrivateKey) -> CertificateInstallationRes:
    wrapped = wrap_contract_key(contract, oem.public_key())
    return CertificateInstallationRes(
        ResponseCode.OK,
        CertificateChain(b"\x30\x01", (b"\x30\x02", b"\x30\x03")),
        CertificateChain(b"\x30\x04", (b"\x30\x05", b"\x30\x06")),  # no Id: sign_contract_response sets id1
        EncryptedPrivateKey(wrapped.encrypted_private_key, "id2"),
        DHPublicKey(wrapped.dh_public_key, "id3"),
        EMAID("DEABCC123ABC56", "id4"),
    )


class HsmLikeSigner:
    """Only ``sign`` returning DER, like a PKCS#11-backed key object without ``public_key``."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.public = self._key.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        return self._key.sign(data, signature_algorithm)


def test_sign_contract_response_end_to_end() -> None:
    cps = ec.generate_private_key(ec.SECP256R1())
    oem, contract = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    session = bytes.fromhex("0A0B0C0D0E0F1011")
    message = sign_contract_response(session, _response(oem, contract), cps)
    exi = encode_message(message)
    received = decode_message(exi)  # what the vehicle does
    assert received.header.session_id == session
    verify_response(received, cps.public_key())
    body = received.body
    assert isinstance(body, CertificateInstallationRes)
    assert body.contract_signature_cert_chain.id == "id1"
    assert [r.uri for r in received.header.signature.signed_info.references] == ["#id1", "#id2", "#id3", "#id4"]  # type: ignore[union-attr]
    recovered = unwrap_contract_key(
        body.contract_signature_encrypted_private_key.value, body.dh_public_key.value, oem, contract.public_key()
    )
    assert recovered.private_numbers() == contract.private_numbers()


def test_sign_update_response_and_hsm_like_signer() -> None:
    signer = HsmLikeSigner()
    oem, contract = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    base = _response(oem, contract)
    update = CertificateUpdateRes(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, retry_counter=3)
    message = sign_contract_response(b"\x01", update, signer)
    verify_response(decode_message(encode_message(message)), signer.public)
    with pytest.raises(SignatureVerificationFailed):
        verify_response(message, ec.generate_private_key(ec.SECP256R1()).public_key())


def test_misbehaving_signers_are_caught() -> None:
    class RawSigner:
        def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
            return bytes(64)

    class WrongKey:
        def __init__(self) -> None:
            self._key = ec.generate_private_key(ec.SECP256R1())

        def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
            return self._key.sign(data, signature_algorithm)

        def public_key(self) -> ec.EllipticCurvePublicKey:
            return ec.generate_private_key(ec.SECP256R1()).public_key()

    oem, contract = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    for signer in (RawSigner(), WrongKey()):
        with pytest.raises(XmlDsigError):
            sign_contract_response(b"\x01", _response(oem, contract), signer)
    with pytest.raises(XmlDsigError):
        sign_elements([], ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(XmlDsigError):  # duplicate Ids
        sign_elements(
            [EMAID("DEABCC123ABC56", "x"), DHPublicKey(b"\x04", "x")], ec.generate_private_key(ec.SECP256R1())
        )


# --- verifying the vehicle's request ------------------------------------------------------------------------------


def _signed_request(
    key: ec.EllipticCurvePrivateKey,
    body: CertificateInstallationReq | CertificateUpdateReq,
    *,
    signed_info_schema: object = None,
    tamper: str = "",
) -> bytes:
    """The vehicle side: digest of the body fragment, SignedInfo, ECDSA, whole V2G_Message."""
    digest = hashlib.sha256(encode_body_fragment(body)).digest()
    uri = "#wrong" if tamper == "uri" else f"#{body.id}"
    references = [Reference(uri, digest)]
    if tamper == "two-references":
        references.append(Reference("#other", digest))
    signed_info = SignedInfo(
        tuple(references),
        signature_method="urn:other" if tamper == "algorithm" else ECDSA_SHA256,
    )
    data = (
        encode_signed_info(signed_info, MSGDEF) if signed_info_schema == "msgdef" else encode_signed_info(signed_info)
    )
    signature = der_to_raw(key.sign(data, ec.ECDSA(hashes.SHA256())))
    if tamper == "signature":
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    if tamper == "body" and isinstance(body, CertificateInstallationReq):
        body = dataclasses.replace(body, oem_provisioning_cert=body.oem_provisioning_cert + b"\x00")
    header = MessageHeader(bytes.fromhex("0102030405060708"), signature=Signature(signed_info, signature))
    return encode_message(V2GMessage(header, body))


def test_verify_installation_request() -> None:
    oem = ec.generate_private_key(ec.SECP256R1())
    body = CertificateInstallationReq("id1", b"\x30\x82\x01\x00" + bytes(60), ROOTS)
    verified = verify_request(_signed_request(oem, body), oem.public_key())
    assert verified.body == body
    assert verified.signed_info_schema == "xmldsig-core-schema"
    assert verified.message.header.session_id == bytes.fromhex("0102030405060708")
    # some stacks encode SignedInfo with the whole V2G schema set: accepted as well
    assert (
        verify_request(
            _signed_request(oem, body, signed_info_schema="msgdef"), _certificate(oem, "PCID")
        ).signed_info_schema
        == "V2G_CI_MsgDef"
    )


def test_verify_update_request() -> None:
    contract = ec.generate_private_key(ec.SECP256R1())
    body = CertificateUpdateReq("id1", CertificateChain(b"\x30", (b"\x30",), "id9"), "DEABCC123ABC56", ROOTS)
    assert verify_request(_signed_request(contract, body), contract.public_key()).body == body


@pytest.mark.parametrize("tamper", ["signature", "body", "uri", "two-references", "algorithm"])
def test_verify_request_refuses_tampering(tamper: str) -> None:
    oem = ec.generate_private_key(ec.SECP256R1())
    body = CertificateInstallationReq("id1", b"\x30\x82\x01\x00", ROOTS)
    with pytest.raises(SignatureVerificationFailed):
        verify_request(_signed_request(oem, body, tamper=tamper), oem.public_key())


def test_verify_request_wrong_key_unsigned_and_wrong_message() -> None:
    oem = ec.generate_private_key(ec.SECP256R1())
    body = CertificateInstallationReq("id1", b"\x30", ROOTS)
    with pytest.raises(SignatureVerificationFailed):
        verify_request(_signed_request(oem, body), ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(SignatureVerificationFailed):
        verify_request(_signed_request(oem, body), ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(SignatureVerificationFailed, match="no signature"):
        verify_request(encode_message(V2GMessage(MessageHeader(b"\x01"), body)), oem.public_key())
    with pytest.raises(XmlDsigError):
        verify_request(encode_message(V2GMessage(MessageHeader(b"\x01"), None)), oem.public_key())
    # EXIficient's install_req vector carries a dummy signature: decodes fine, does not verify
    _, vector = EXIFICIENT_MESSAGES["install_req"]
    with pytest.raises(SignatureVerificationFailed):
        verify_request(bytes.fromhex(vector), oem.public_key())


def test_self_check_runs_once_per_loaded_key_pair_and_still_catches_a_swapped_key() -> None:
    """The CPS signature is verified with the signer's public key on the first signature of each loaded
    key pair (pki/cps/xmldsig._self_check). A later pair whose private key is not its public key's — what
    a token re-initialised under the same label would give — is still refused, even though the label's
    previous pair had passed."""
    from pki.cps import xmldsig

    class Swappable:
        def __init__(self) -> None:
            self.key = ec.generate_private_key(ec.SECP256R1())
            self.pub = self.key.public_key()
            self.verifies = 0

        def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
            return self.key.sign(data, signature_algorithm)

        def public_key(self) -> ec.EllipticCurvePublicKey:
            return self.pub

    oem, contract = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    signer = Swappable()
    calls: list[object] = []
    real = xmldsig._self_check

    def counting(pub: object, der: bytes, data: bytes) -> None:
        calls.append(xmldsig._CHECKED.get(id(pub)) is pub)  # True: skipped as already checked
        real(pub, der, data)

    xmldsig._self_check = counting  # type: ignore[assignment]
    try:
        for _ in range(3):
            message = sign_contract_response(b"\x01", _response(oem, contract), signer)
            verify_response(decode_message(encode_message(message)), signer.pub)
        assert calls == [False, True, True]
        # The token's key under the label replaced, the store reloads a new pair: a mismatched one fails.
        signer.key = ec.generate_private_key(ec.SECP256R1())
        signer.pub = ec.generate_private_key(ec.SECP256R1()).public_key()
        with pytest.raises(XmlDsigError):
            sign_contract_response(b"\x01", _response(oem, contract), signer)
    finally:
        xmldsig._self_check = real  # type: ignore[assignment]


@pytest.mark.parametrize("shape", ["cps", "one", "ids", "sha512"])
def test_signed_info_template_encodes_what_the_codec_encodes(shape: str) -> None:
    """encode_signed_info fills a per-shape template with the digests; for many random digests the bytes
    equal the codec's own encoding of the same SignedInfo, for the CPS's four references and other shapes."""
    import os

    from pki.cps.exi import codec, messages
    from pki.cps.exi.messages import Reference, SignedInfo
    from pki.cps.exi.schema import MSGDEF, XMLDSIG

    n = 64 if shape == "sha512" else 32
    refs = {"cps": [Reference(f"#id{i}", b"") for i in range(1, 5)],
            "one": [Reference("#id1", b"")],
            "ids": [Reference(f"#r{i}", b"", id=f"ref{i}") for i in range(3)],
            "sha512": [Reference("#a", b"", digest_method="http://www.w3.org/2001/04/xmlenc#sha512")] * 2}[shape]
    for schema in (XMLDSIG, MSGDEF):
        for _ in range(25):
            si = SignedInfo(tuple(dataclasses.replace(r, digest_value=os.urandom(n)) for r in refs),
                            id="sig" if shape == "ids" else None)
            expect = codec.encode_fragment([si.to_node()], schema)
            assert messages.encode_signed_info(si, schema) == expect
    assert any(t is not None for t in messages._TEMPLATES.values())
    # a digest of another length than the shape's: a shape of its own, still the codec's bytes
    si = SignedInfo((Reference("#id1", os.urandom(20)),))
    assert messages.encode_signed_info(si) == codec.encode_fragment([si.to_node()], XMLDSIG)


def test_request_body_bits_kept_by_the_decoder_are_what_the_signature_covers() -> None:
    """decode_message_tree(for_verify=True) keeps the request body's encoded bits with its Node; the body
    fragment re-encoded from them equals the codec's encoding of the same tree without them, the request
    verifies, and a stream whose body differs from what was signed is refused."""
    import os

    from pki.cps.exi import codec
    from pki.cps.exi.messages import decode_message_tree
    from pki.cps.exi.schema import MSGDEF as MSGDEF_SCHEMA
    from pki.cps.xmldsig import verify_request

    key = ec.generate_private_key(ec.SECP256R1())
    for n_ids in (1, 2, 5):
        ids = tuple(X509IssuerSerial(f"CN=Root {i},O=Test é,C=DE", int.from_bytes(os.urandom(9), "big"))
                    for i in range(n_ids))
        body = CertificateInstallationReq("id1", os.urandom(500), ids)
        exi = encode_message(V2GMessage(MessageHeader(b"\x01" * 8, signature=sign_elements([body], key)), body))
        tree = decode_message_tree(exi, for_verify=True)
        node = tree.child("Body").child("CertificateInstallationReq")  # type: ignore[union-attr]
        assert node is not None and node.memo
        grammar = codec.grammar_for(MSGDEF_SCHEMA.fragment_decl(node.qname), MSGDEF_SCHEMA)
        assert id(grammar) in node.memo  # the fragment encoder will use the kept bits
        fresh = decode_message_tree(exi)
        plain = fresh.child("Body").child("CertificateInstallationReq")  # type: ignore[union-attr]
        assert plain is not None and plain.memo is None
        assert codec.encode_fragment([node], MSGDEF_SCHEMA) == codec.encode_fragment([plain], MSGDEF_SCHEMA)
        verify_request(tree, key.public_key())
        # the same signature over another body: the digest of the bits received does not match
        other = CertificateInstallationReq("id1", os.urandom(500), ids)
        forged = encode_message(V2GMessage(MessageHeader(b"\x01" * 8, signature=sign_elements([body], key)), other))
        with pytest.raises(SignatureVerificationFailed):
            verify_request(decode_message_tree(forged, for_verify=True), key.public_key())
