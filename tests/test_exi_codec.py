"""EXI codec: grammar shape, round trips of every supported message, schema enforcement, typed rejections."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pki.cps.errors import ExiDecodeError, ExiEncodeError, ExiLimitExceeded, ExiUnsupported
from pki.cps.exi import (
    EMAID,
    MSGDEF,
    XMLDSIG,
    CertificateChain,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    CertificateUpdateRes,
    DecodeLimits,
    DHPublicKey,
    EncryptedPrivateKey,
    MessageHeader,
    Node,
    Notification,
    Reference,
    ResponseCode,
    Signature,
    SignedInfo,
    V2GMessage,
    X509IssuerSerial,
    decode_body_fragment,
    decode_fragment,
    decode_message,
    encode_body_fragment,
    encode_fragment,
    encode_message,
    encode_signed_info,
)
from pki.cps.exi._names import BODY_ELEMENTS, NS_BODY, NS_DEF
from pki.cps.exi.bitstream import BitReader, BitWriter
from pki.cps.exi.datatypes import DEFAULT_LIMITS, BinaryType, StringType
from pki.cps.exi.grammar import type_grammar
from pki.cps.exi.schema import RESPONSE_CODES
from tests.conftest import REPO, need_peer

# --- grammar shape: the numbers EXIficient and the generated C codecs (libcbv2g) use -------------------------


def test_document_and_fragment_code_widths() -> None:
    assert len(MSGDEF.global_elements) == 80
    assert MSGDEF.global_elements.index(("V2G_Message", NS_DEF)) == 76  # 7-bit code, as libcbv2g writes it
    assert len(MSGDEF.elements) == 243  # fragment codes: 8 bits, ED = 244
    for local, index in [
        ("CertificateInstallationReq", 15),
        ("CertificateUpdateReq", 17),
        ("ContractSignatureCertChain", 33),
        ("ContractSignatureEncryptedPrivateKey", 34),
        ("DHpublickey", 45),
        ("eMAID", 236),
    ]:
        assert MSGDEF.elements.index((local, NS_BODY)) == index
    assert len(XMLDSIG.elements) == 45  # SignedInfo fragment with the xmldsig schema: 6 bits, code 32
    assert XMLDSIG.elements.index(("SignedInfo", "http://www.w3.org/2000/09/xmldsig#")) == 32
    assert MSGDEF.ambiguous == {("eMAID", NS_BODY)}  # eMAIDType vs EMAIDType
    assert len(MSGDEF.attributes) == 10


def test_type_grammar_widths() -> None:
    body = type_grammar("BodyType").states[0]
    assert len(body.productions) == 36 and body.width == 6  # 35 SE (incl. abstract BodyElement) + EE + escape
    assert [s.width for s in type_grammar("ReferenceType").states] == [3, 3, 2, 2, 1, 1, 1]
    assert [s.width for s in type_grammar("MessageHeaderType").states] == [1, 2, 2, 1]
    assert [s.width for s in type_grammar("CertificateChainType").states] == [2, 1, 2, 1]
    assert [s.width for s in type_grammar("TransformType").states][:2] == [1, 3]  # mixed + choice*: 4 + escape
    assert all(s.width == 1 for s in type_grammar("CertificateInstallationResType").states)
    assert len(BODY_ELEMENTS) == 35


def test_response_codes_match_schema_order() -> None:
    assert tuple(ResponseCode) == RESPONSE_CODES


# --- round trips -----------------------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)
_blob = st.binary(max_size=40)
_emaid = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=14, max_size=15)
_roots = st.lists(
    st.builds(X509IssuerSerial, _text, st.integers(min_value=-(2**200), max_value=2**200)), min_size=1, max_size=20
).map(tuple)


def _chain(with_id: bool) -> st.SearchStrategy[CertificateChain]:
    return st.builds(
        CertificateChain,
        st.binary(max_size=800),
        st.lists(st.binary(max_size=60), max_size=4).map(tuple),
        st.just("id1") if with_id else st.none() | st.just("cc"),
    )


_delivery = {
    "response_code": st.sampled_from(list(ResponseCode)),
    "sa_provisioning_certificate_chain": _chain(False),
    "contract_signature_cert_chain": _chain(True),
    "contract_signature_encrypted_private_key": st.builds(EncryptedPrivateKey, st.binary(max_size=48), st.just("id2")),
    "dh_public_key": st.builds(DHPublicKey, st.binary(max_size=65), st.just("id3")),
    "emaid": st.builds(EMAID, _emaid, st.just("id4")),
}
_body = st.one_of(
    st.none(),
    st.builds(CertificateInstallationReq, st.just("id1"), st.binary(max_size=800), _roots),
    st.builds(CertificateUpdateReq, st.just("id1"), _chain(False), _emaid, _roots),
    st.builds(CertificateInstallationRes, **_delivery),
    st.builds(
        CertificateUpdateRes, **_delivery, retry_counter=st.none() | st.integers(min_value=-32768, max_value=32767)
    ),
)
_reference = st.builds(
    Reference,
    st.none() | st.sampled_from(["#id1", "#id2", ""]),
    _blob,
    st.sampled_from(["http://www.w3.org/2001/04/xmlenc#sha256", "urn:x"]),
    st.lists(st.sampled_from(["http://www.w3.org/TR/canonical-exi/", "urn:t"]), max_size=2).map(tuple),
    st.none() | st.just("r"),
    st.none() | st.just("t"),
)
_signature = st.builds(
    Signature,
    st.builds(SignedInfo, st.lists(_reference, min_size=1, max_size=4).map(tuple), id=st.none() | st.just("si")),
    st.binary(max_size=72),
    st.none() | st.just("s"),
    st.none() | st.just("v"),
)
_header = st.builds(
    MessageHeader,
    st.binary(max_size=8),
    st.none()
    | st.builds(
        Notification,
        st.sampled_from(["ParsingError", "NoTLSRootCertificatAvailable", "UnknownError"]),
        st.none() | _text,
    ),
    st.none() | _signature,
)
messages = st.builds(V2GMessage, _header, _body)


@settings(max_examples=150, deadline=None)
@given(messages)
def test_every_message_round_trips(message: V2GMessage) -> None:
    encoded = encode_message(message)
    assert encoded[0] == 0x80  # EXI header without options [EXI 1.0 §5]
    assert decode_message(encoded) == message
    if message.body is not None:
        fragment = encode_body_fragment(message.body.to_node())
        (node,) = decode_body_fragment(fragment)
        assert encode_fragment([node], MSGDEF) == fragment
    if message.header.signature is not None:
        signed_info = message.header.signature.signed_info
        for schema in (XMLDSIG, MSGDEF):
            (node,) = decode_fragment(encode_signed_info(signed_info, schema), schema)
            assert SignedInfo.from_node(node) == signed_info


def test_several_elements_in_one_fragment_and_empty_fragment() -> None:
    nodes = [EMAID("DEABCC123ABC56", "id4").to_node(), DHPublicKey(b"\x04", "id3").to_node()]
    assert decode_body_fragment(encode_fragment(nodes, MSGDEF)) == nodes
    assert decode_body_fragment(encode_fragment([], MSGDEF)) == []


def test_emaid_libcbv2g_compat_differs_only_in_grammar() -> None:
    emaid = EMAID("DEABCC123ABC56", "id4")
    spec = encode_body_fragment(emaid)
    compat = encode_body_fragment(emaid, emaid_libcbv2g_compat=True)
    assert spec != compat and spec[:2] == compat[:2] == bytes.fromhex("80EC")  # same SE(eMAID) code 236


# --- the encoder enforces the schema ---------------------------------------------------------------------------

_ROOT = X509IssuerSerial("CN=Root", 1)


def _install_res(**changes: object) -> V2GMessage:
    fields: dict[str, object] = {
        "response_code": ResponseCode.OK,
        "sa_provisioning_certificate_chain": CertificateChain(b"\x30"),
        "contract_signature_cert_chain": CertificateChain(b"\x30", (), "id1"),
        "contract_signature_encrypted_private_key": EncryptedPrivateKey(bytes(48), "id2"),
        "dh_public_key": DHPublicKey(b"\x04" + bytes(64), "id3"),
        "emaid": EMAID("DEABCC123ABC56", "id4"),
    }
    fields.update(changes)
    return V2GMessage(MessageHeader(bytes(8)), CertificateInstallationRes(**fields))  # type: ignore[arg-type]


def _delivery_fields() -> dict[str, Any]:
    body = _install_res().body
    return {f.name: getattr(body, f.name) for f in dataclasses.fields(body)}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        _install_res(sa_provisioning_certificate_chain=CertificateChain(bytes(801))),  # [V2G2-010] 800 octets
        _install_res(contract_signature_cert_chain=CertificateChain(b"\x30", (b"1",) * 5, "id1")),  # ≤ 4 sub-CAs
        _install_res(emaid=EMAID("DE-ABC-C123ABC56", "id4")),  # 16 > maxLength 15
        _install_res(emaid=EMAID("DEABC", "id4")),  # < minLength 14
        _install_res(emaid=EMAID("", "id4")),  # empty, still < minLength
        _install_res(contract_signature_encrypted_private_key=EncryptedPrivateKey(bytes(49), "id2")),
        _install_res(dh_public_key=DHPublicKey(bytes(66), "id3")),
        _install_res(response_code="NOT_A_CODE"),
        V2GMessage(MessageHeader(bytes(9)), None),  # SessionID ≤ 8 octets
        V2GMessage(MessageHeader(b"", Notification("Bogus")), None),
        V2GMessage(MessageHeader(b"", Notification("ParsingError", "x" * 65)), None),
        V2GMessage(MessageHeader(b""), CertificateInstallationReq("id1", b"", (_ROOT,) * 21)),  # ≤ 20 roots
        V2GMessage(MessageHeader(b""), CertificateInstallationReq("id1", b"", ())),  # ≥ 1 root
        V2GMessage(MessageHeader(b""), CertificateInstallationReq("id1", b"", (X509IssuerSerial("a\x00", 1),))),
        V2GMessage(
            MessageHeader(b""),
            CertificateUpdateRes(**_delivery_fields(), retry_counter=40000),
        ),
        V2GMessage(MessageHeader(b"", signature=Signature(SignedInfo(()), b"")), None),  # ≥ 1 Reference
    ],
)
def test_schema_violations_are_refused(message: V2GMessage) -> None:
    with pytest.raises(ExiEncodeError):
        encode_message(message)


def test_unknown_structure_is_refused() -> None:
    stray = Node(("V2G_Message", NS_DEF), content=[Node(("Body", NS_DEF))])  # Header missing
    with pytest.raises(ExiEncodeError):
        encode_fragment([stray], MSGDEF)
    with pytest.raises(ExiEncodeError):
        encode_fragment([Node(("NoSuchElement", NS_BODY))], MSGDEF)
    with pytest.raises(ExiEncodeError):  # known name, type outside the supported subset
        encode_fragment([Node(("SessionSetupReq", NS_BODY))], MSGDEF)


# --- the decoder refuses with typed errors -----------------------------------------------------------------------

VALID = encode_message(_install_res())


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"", ExiDecodeError),
        (b"\x00" + VALID[1:], ExiDecodeError),  # distinguishing bits 00
        (b"\xa0" + VALID[1:], ExiUnsupported),  # options present
        (b"\x84" + VALID[1:], ExiUnsupported),  # preview version
        (b"\x81" + VALID[1:], ExiUnsupported),  # version 2
        (VALID[:-3], ExiDecodeError),  # truncated
        (VALID + b"\x00", ExiDecodeError),  # trailing octet
        (b"$EXI" + VALID, ExiDecodeError),  # cookie: not used by ISO 15118-2
        (b"\x80\xff", ExiDecodeError),  # document code beyond SE(*)
        (b"\x80\xa0", ExiUnsupported),  # SE(*) at document level: code 80 of 7 bits
        (b"\x80\x9e", ExiUnsupported),  # a global element outside the subset (code 79)
    ],
)
def test_malformed_documents(stream: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_message(stream)


def test_nonzero_padding_is_refused() -> None:
    stream = encode_message(V2GMessage(MessageHeader(b""), None))
    assert stream[-1] & 0x01 == 0  # this stream ends with padding bits
    with pytest.raises(ExiDecodeError, match="padding"):
        decode_message(stream[:-1] + bytes([stream[-1] | 0x01]))


def _message_with_body_element(local: str) -> bytes:
    """V2G_Message with SessionID 0x00 and an empty body element ``local``, bit by bit."""
    w = BitWriter()
    w.write_bits(0x80, 8)
    w.write_bits(76, 7)  # SE(V2G_Message)
    w.write_bits(0, 1)  # SE(Header)
    w.write_bits(0, 1)  # SE(SessionID)
    w.write_bits(0, 1)  # CH
    w.write_uint(1)
    w.write_bits(0, 8)
    w.write_bits(0, 1)  # EE SessionID
    w.write_bits(2, 2)  # EE Header (no Notification, no Signature)
    w.write_bits(0, 1)  # SE(Body)
    w.write_bits(BODY_ELEMENTS.index((local, NS_BODY)), 6)
    return w.getvalue()


def test_other_v2g_messages_are_unsupported() -> None:
    with pytest.raises(ExiUnsupported, match="SessionSetupReq"):
        decode_message(_message_with_body_element("SessionSetupReq"))
    with pytest.raises(ExiUnsupported, match="BodyElement"):
        decode_message(_message_with_body_element("BodyElement"))


def test_schema_deviation_is_unsupported() -> None:
    w = BitWriter()
    w.write_bits(0x80, 8)
    w.write_bits(76, 7)
    w.write_bits(1, 1)  # escape in V2G_Message's first state: second-level (e.g. xsi:type)
    w.write_bits(1, 3)
    with pytest.raises(ExiUnsupported):
        decode_message(w.getvalue())


def test_string_table_hit_is_refused() -> None:
    """UInt 0 / 1 before a string value would be a local / global value hit (EXI 1.0 §7.3.3): impossible
    when valuePartitionCapacity is 0, so the stream is malformed."""
    for marker in (0x00, 0x01):
        with pytest.raises(ExiDecodeError, match="string table"):
            StringType().read(BitReader(bytes([marker, 0x00])), DEFAULT_LIMITS)


def test_non_minimal_unsigned_integer_is_refused() -> None:
    assert BitReader(bytes([0x81, 0x01])).read_uint(5) == 129
    with pytest.raises(ExiDecodeError, match="non-minimal"):
        BitReader(bytes([0x81, 0x00])).read_uint(5)
    with pytest.raises(ExiLimitExceeded):
        BitReader(bytes([0xFF] * 10)).read_uint(5)


def test_decode_limits() -> None:
    big = encode_message(_install_res(sa_provisioning_certificate_chain=CertificateChain(bytes(800), (bytes(800),))))
    with pytest.raises(ExiLimitExceeded):
        decode_message(big, DecodeLimits(max_stream_octets=1000))
    with pytest.raises(ExiLimitExceeded):
        decode_message(big, DecodeLimits(max_binary_octets=100))
    with pytest.raises(ExiLimitExceeded):
        decode_message(VALID, DecodeLimits(max_depth=3))
    with pytest.raises(ExiLimitExceeded):
        decode_message(VALID, DecodeLimits(max_events=10))
    long_name = encode_message(
        V2GMessage(MessageHeader(b""), CertificateInstallationReq("id1", b"", (X509IssuerSerial("x" * 100, 1),)))
    )
    with pytest.raises(ExiLimitExceeded):
        decode_message(long_name, DecodeLimits(max_string_chars=50))
    huge_serial = encode_message(
        V2GMessage(MessageHeader(b""), CertificateInstallationReq("id1", b"", (X509IssuerSerial("x", 2**300),)))
    )
    with pytest.raises(ExiLimitExceeded):
        decode_message(huge_serial)


def test_announced_length_beyond_stream_is_refused_without_allocation() -> None:
    w = BitWriter()
    w.write_uint(2**40)
    with pytest.raises((ExiDecodeError, ExiLimitExceeded)):
        BinaryType().read(BitReader(w.getvalue()), DEFAULT_LIMITS)
    with pytest.raises(ExiDecodeError):
        BinaryType().read(BitReader(bytes([100]) + bytes(10)), DEFAULT_LIMITS)


def test_bit_writer_reader_agree() -> None:
    w = BitWriter()
    items = [(5, 3), (0, 1), (1023, 10), (1, 1)]
    for value, n in items:
        w.write_bits(value, n)
    w.write_uint(300)
    data = os.urandom(7)
    w.write_octets(data)
    r = BitReader(w.getvalue())
    assert [r.read_bits(n) for _, n in items] == [v for v, _ in items]
    assert r.read_uint(5) == 300
    assert r.read_octets(7) == data
    with pytest.raises(ValueError):
        w.write_bits(8, 3)


def _xsd_dir() -> Path | None:
    """V2G_XSD_DIR, else the ISO 15118-2 schemas inside the Josev peer (scripts/peers.sh installs PyPI's
    ``iso15118`` into .peers/josev; its wheel carries them)."""
    if os.environ.get("V2G_XSD_DIR"):
        return Path(os.environ["V2G_XSD_DIR"])
    found = sorted(REPO.glob(".peers/josev/lib/python3*/site-packages/iso15118/shared/schemas/iso15118_2"))
    return found[-1] if found else None


def xsd_dir_or_skip() -> Path:
    """The XSDs (:func:`_xsd_dir`), or the calling test is skipped (failed in CI: :func:`need_peer`)."""
    xsd_dir = _xsd_dir()
    if xsd_dir is None:
        need_peer("no ISO 15118-2 XSDs: set V2G_XSD_DIR, or install the Josev peer (bash scripts/peers.sh)")
    return xsd_dir


def test_committed_names_match_the_xsds() -> None:
    """_names.py is generated from the ISO XSDs, which are not in the repository: with a copy (V2G_XSD_DIR,
    or the one in the Josev peer's package), check it is exactly what pki/cps/exi/derive_names.py derives
    from them. Without one the test is skipped, unless CI or V2GPKI_TEST_REQUIRE_PEERS is set."""
    xsd_dir = xsd_dir_or_skip()
    from pki.cps.exi import _names, derive_names

    assert derive_names.render(xsd_dir) == Path(_names.__file__).read_text()


def test_derive_names_reads_a_flat_copy_and_refuses_an_incomplete_one(tmp_path: Path) -> None:
    """The XSDs in one directory (xmldsig beside the ISO files) give the same names; a missing schema is a
    clear error naming what was expected, not a partial _names.py."""
    import shutil

    from pki.cps.exi import _names, derive_names

    xsd_dir = xsd_dir_or_skip()
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, path in derive_names.schema_files(xsd_dir).items():
        shutil.copy(path, flat / name)
    assert derive_names.render(flat) == Path(_names.__file__).read_text()
    (flat / "V2G_CI_MsgHeader.xsd").unlink()
    with pytest.raises(SystemExit, match="V2G_CI_MsgHeader.xsd is missing"):
        derive_names.render(flat)


_OPS = st.lists(st.one_of(
    st.integers(0, 70).flatmap(lambda n: st.tuples(st.just("bits"), st.integers(0, (1 << n) - 1), st.just(n))),
    st.tuples(st.just("uint"), st.integers(0, 1 << 40), st.just(0)),
    st.tuples(st.just("octets"), st.binary(max_size=40), st.just(0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_bitwriter_matches_a_bit_string_reference(ops: list[tuple[str, Any, int]]) -> None:
    """The writer batches pending bits (flushing every 64) — the stream must still be exactly the items
    bit-packed MSB first (EXI 1.0 §7.1.9, §7.1.6) and zero-padded, at every length and alignment."""
    w = BitWriter()
    ref = ""
    for kind, value, n in ops:
        if kind == "bits":
            w.write_bits(value, n)
            ref += format(value, f"0{n}b") if n else ""
        elif kind == "uint":
            w.write_uint(value)
            while True:
                group, value = value & 0x7F, value >> 7
                ref += format(group | (0x80 if value else 0), "08b")
                if not value:
                    break
        else:
            w.write_octets(value)
            ref += "".join(format(b, "08b") for b in value)
        assert w.bit_length == len(ref)
    ref += "0" * (-len(ref) % 8)
    assert w.getvalue() == bytes(int(ref[i:i + 8], 2) for i in range(0, len(ref), 8))


def _plain(node: Node) -> Node:
    """The same tree without memoised encodings (codec.Node.memo)."""
    return Node(node.qname, dict(node.attributes), [_plain(c) if isinstance(c, Node) else c for c in node.content])


@settings(max_examples=150, deadline=None)
@given(messages)
def test_memoised_encodings_equal_plain_encodings(message: V2GMessage) -> None:
    """A response's signed elements and SignedInfo keep their encodings (they are encoded as fragments for
    the digests, then again inside the document): the document and every fragment must be exactly what
    the same trees without memos encode to, whatever was encoded first and under whichever grammar."""
    from pki.cps.exi.codec import encode_document
    from pki.cps.xmldsig import signed_elements

    def plain_fragment(node: Node, schema: Any = MSGDEF, relaxed: bool = True) -> bytes:
        return encode_fragment([_plain(node)], schema, relaxed_ambiguous=relaxed)

    body = message.body
    for _ in range(2):  # the first pass fills the memos, the second reads them
        if isinstance(body, CertificateInstallationRes | CertificateUpdateRes):
            for el in signed_elements(body):
                node = el.to_node("ContractSignatureCertChain") if isinstance(el, CertificateChain) else el.to_node()
                assert encode_body_fragment(el) == plain_fragment(node)
                assert encode_body_fragment(el, emaid_libcbv2g_compat=True) == plain_fragment(node, relaxed=False)
        if message.header.signature is not None:
            si = message.header.signature.signed_info
            for schema in (XMLDSIG, MSGDEF):
                assert encode_signed_info(si, schema) == plain_fragment(si.to_node(), schema)
        assert encode_message(message) == encode_document(_plain(message.to_node()), MSGDEF)


def test_shared_sub_certificates_encode_like_fresh_trees() -> None:
    """A CA's SubCertificates node is shared by every chain that carries the same certificates
    (messages._sub_certificates), memo and all: under the contract chain's fragment grammar, inside a
    document as ContractSignatureCertChain and as SAProvisioningCertificateChain, each encoding must be what
    a fresh tree without memos encodes to, in any order."""
    from pki.cps.exi.codec import encode_document
    from pki.cps.exi.messages import _sub_certificates

    subs = (os.urandom(300), os.urandom(420))
    a = CertificateChain(os.urandom(500), subs, "id1")
    b = CertificateChain(os.urandom(510), subs)
    assert _sub_certificates(subs) is _sub_certificates(tuple(subs))
    node_a = a.to_node("ContractSignatureCertChain")
    assert node_a.child("SubCertificates") is b.to_node("SAProvisioningCertificateChain").child("SubCertificates")
    for _ in range(2):
        assert encode_body_fragment(a) == encode_fragment([_plain(node_a)], MSGDEF)
        for msg in (_install_res(contract_signature_cert_chain=a, sa_provisioning_certificate_chain=b),
                    _install_res(contract_signature_cert_chain=dataclasses.replace(b, id="id1"),
                                 sa_provisioning_certificate_chain=dataclasses.replace(a, id=None))):
            assert encode_message(msg) == encode_document(_plain(msg.to_node()), MSGDEF)
