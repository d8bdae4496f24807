"""The C half of the EXI codec (pki/cps/exi/_native.c) against the Python codec it stands in for.

The rule native.py states: C answers only what Python answers, byte for byte and node for node, and
returns None ("Python decides") for everything else. Checked here on the published test vectors, on
generated messages, on trees with values the schema refuses, and on random and mutated streams. The
Python codec itself is checked against the vectors and EXIficient elsewhere (test_exi_vectors.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pki.cps.errors import ExiError
from pki.cps.exi import MSGDEF, XMLDSIG, Node, V2GMessage, codec, native
from pki.cps.exi.datatypes import DEFAULT_LIMITS, DecodeLimits
from pki.cps.exi.schema import SchemaSet

from .test_exi_codec import messages
from .test_exi_fuzz import SEEDS, mutated
from .test_exi_vectors import EXIFICIENT_FRAGMENTS, EXIFICIENT_MESSAGES, RISE_CERT_CHAIN, RISE_EMAID, RISE_SIGNED_INFO

pytestmark = pytest.mark.skipif(not native.available() and not os.environ.get("V2GPKI_TEST_REQUIRE_NATIVE"),
                                reason="the C codec is not built (no C compiler at install time)")

BODY_KEEP = frozenset({("CertificateInstallationReq", "urn:iso:15118:2:2013:MsgBody")})


def test_native_codec_is_built_and_used() -> None:
    """CI builds it (scripts/setup.sh installs a C compiler): a silent fallback would go unnoticed."""
    assert native.available(), "pki/cps/exi/_native.c is not built: pip install -e . with a C compiler"
    assert native._program(MSGDEF) is not None and native._program(XMLDSIG) is not None


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    for value, expected in (("0", "False"), ("off", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", "from pki.cps.exi import native; print(native.available())"],
                             env={**os.environ, "V2GPKI_EXI_NATIVE": value}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == expected, value
    monkeypatch.setattr(native, "ENABLED", False)
    assert not native.available()

    def not_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("the C codec was called while turned off")

    for name in ("decode", "encode_document", "encode_fragment"):
        monkeypatch.setattr(native, name, not_called)
    stream = bytes.fromhex(next(iter(EXIFICIENT_MESSAGES.values()))[1])
    assert codec.encode_document(codec.decode_document(stream, MSGDEF), MSGDEF) == stream


def _strict(node: object) -> object:
    """A comparable form that also tells True from 1 and str from bytes (Node == does not)."""
    if isinstance(node, Node):
        return ("node", node.qname, sorted((k, type(v).__name__, v) for k, v in node.attributes.items()),
                [_strict(c) for c in node.content])
    return (type(node).__name__, node)


def _py_decode(stream: bytes, schema: SchemaSet, fragment: bool, limits: DecodeLimits = DEFAULT_LIMITS,
               keep: frozenset[Any] = frozenset()) -> Any:
    try:
        if fragment:
            return codec._decode_fragment(stream, schema, limits)
        return codec._decode_document(stream, schema, limits, keep_bits=keep)
    except ExiError:
        return None


def _memos(node: Node) -> list[Any]:
    out = []
    if node.memo is not None:
        out.append([(g.name, bits, n) for g, bits, n in node.memo.values()])
    for c in node.children():
        out.extend(_memos(c))
    return out


def _same_decode(stream: bytes, schema: SchemaSet, fragment: bool, *, must_handle: bool = False,
                 limits: DecodeLimits = DEFAULT_LIMITS, keep: frozenset[Any] = frozenset()) -> None:
    expected = _py_decode(stream, schema, fragment, limits, keep)
    got = native.decode(stream, schema, limits, fragment=fragment, keep_bits=keep)
    if must_handle:
        assert got is not None, "the C codec fell back on a stream it is meant to handle"
    if got is None:
        return
    assert expected is not None, "the C codec accepted a stream the Python codec refuses"
    if fragment:
        assert [_strict(n) for n in got] == [_strict(n) for n in expected]
    else:
        assert _strict(got) == _strict(expected)
        assert _memos(got) == _memos(expected)


def _py_encode(nodes: list[Node], schema: SchemaSet, fragment: bool, relaxed: bool = True) -> bytes | None:
    try:
        if fragment:
            return codec._encode_fragment(nodes, schema, relaxed_ambiguous=relaxed)
        return codec._encode_document(nodes[0], schema)
    except ExiError:
        return None


def _same_encode(nodes: list[Node], schema: SchemaSet, fragment: bool, *, relaxed: bool = True,
                 must_handle: bool = False) -> None:
    expected = _py_encode(nodes, schema, fragment, relaxed)
    got = native.encode_fragment(nodes, schema, relaxed) if fragment else native.encode_document(nodes[0], schema)
    if must_handle:
        assert got is not None, "the C codec fell back on a tree it is meant to handle"
    if got is not None:
        assert expected is not None, "the C codec encoded a tree the Python codec refuses"
        assert got == expected


# --- the published vectors: handled in C, identical ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXIFICIENT_MESSAGES))
def test_exificient_messages(name: str) -> None:
    stream = bytes.fromhex(EXIFICIENT_MESSAGES[name][1])
    _same_decode(stream, MSGDEF, False, must_handle=True)
    _same_decode(stream, MSGDEF, False, must_handle=True, keep=BODY_KEEP)
    _same_encode([codec._decode_document(stream, MSGDEF)], MSGDEF, False, must_handle=True)


@pytest.mark.parametrize("name", sorted(EXIFICIENT_FRAGMENTS))
def test_exificient_fragments(name: str) -> None:
    stream = bytes.fromhex(EXIFICIENT_FRAGMENTS[name][1])
    _same_decode(stream, MSGDEF, True, must_handle=True)
    nodes = codec._decode_fragment(stream, MSGDEF)
    for relaxed in (True, False):
        _same_encode(nodes, MSGDEF, True, relaxed=relaxed, must_handle=True)


@pytest.mark.parametrize(("stream", "schema"), [(RISE_CERT_CHAIN, MSGDEF), (RISE_EMAID, MSGDEF),
                                                (RISE_SIGNED_INFO, XMLDSIG)])
def test_rise_fragments(stream: bytes, schema: SchemaSet) -> None:
    _same_decode(stream, schema, True, must_handle=True)
    nodes = codec._decode_fragment(stream, schema)
    _same_encode(nodes, schema, True, must_handle=True)
    assert native.encode_fragment(nodes, schema, True) == stream


# --- generated messages and trees ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(messages)
def test_generated_messages(message: V2GMessage) -> None:
    root = message.to_node()
    _same_encode([root], MSGDEF, False)
    stream = codec._encode_document(root, MSGDEF)
    _same_decode(stream, MSGDEF, False)
    _same_decode(stream, MSGDEF, False, keep=BODY_KEEP)
    if message.body is not None:
        _same_encode([message.body.to_node()], MSGDEF, True)
    if message.header.signature is not None:
        for schema in (XMLDSIG, MSGDEF):
            _same_encode([message.header.signature.signed_info.to_node()], schema, True)


def _nodes(root: Node) -> list[Node]:
    out = [root]
    for c in root.children():
        out.extend(_nodes(c))
    return out


_odd_values = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.integers(), st.integers(min_value=2**62, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-(2**62)), st.booleans(), st.none(), st.just(bytearray(b"ab")),
    st.sampled_from(["OK", "FAILED", "ParsingError", "\x00", "é", "\U0001F600", "a" * 70]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_altered_trees(message: V2GMessage, data: st.DataObject) -> None:
    """Values the schema refuses, children dropped or repeated, attributes added: C encodes exactly what
    Python encodes, and nothing that Python refuses."""
    root = codec._decode_document(codec._encode_document(message.to_node(), MSGDEF), MSGDEF)
    nodes = _nodes(root)
    for _ in range(data.draw(st.integers(1, 3))):
        node = data.draw(st.sampled_from(nodes))
        op = data.draw(st.sampled_from(["value", "drop", "repeat", "attribute", "foreign"]))
        if op == "value":
            node.content = [data.draw(_odd_values)]
        elif op == "drop" and node.content:
            del node.content[data.draw(st.integers(0, len(node.content) - 1))]
        elif op == "repeat" and node.content:
            node.content.append(node.content[data.draw(st.integers(0, len(node.content) - 1))])
        elif op == "attribute":
            node.attributes[data.draw(st.sampled_from([("Id", ""), ("Algorithm", ""), ("x", "urn:y")]))] = \
                data.draw(_odd_values)
        elif op == "foreign":
            node.content.append(Node(("Nowhere", "urn:none")))
    _same_encode([root], MSGDEF, False)
    for node in nodes[1:4]:
        _same_encode([node], MSGDEF, True)


def test_memo_written_by_c_is_read_by_python_and_back() -> None:
    """Both encoders fill and read the same memo (codec.Node.memo): whichever wrote it, the other's
    output is unchanged."""
    stream = bytes.fromhex(EXIFICIENT_MESSAGES[sorted(EXIFICIENT_MESSAGES)[0]][1])
    plain = codec._encode_document(codec._decode_document(stream, MSGDEF), MSGDEF)
    for first, second in ((native.encode_document, codec._encode_document),
                          (codec._encode_document, native.encode_document)):
        root = codec._decode_document(stream, MSGDEF)
        for node in _nodes(root):
            node.memo = {}
        assert first(root, MSGDEF) == plain
        assert second(root, MSGDEF) == plain
        assert first(root, MSGDEF) == plain


def test_subclassed_nodes_and_values_fall_back() -> None:
    """What C does not handle it leaves to Python, which gives the same answer."""

    class MyNode(Node):
        pass

    stream = bytes.fromhex(EXIFICIENT_MESSAGES[sorted(EXIFICIENT_MESSAGES)[0]][1])
    root = codec._decode_document(stream, MSGDEF)
    header = root.child("Header")
    assert header is not None
    root.content[0] = MyNode(header.qname, header.attributes, header.content)
    assert native.encode_document(root, MSGDEF) is None
    assert codec.encode_document(root, MSGDEF) == stream


# --- streams: random, mutated, limits ------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_streams(case: tuple[str, bytes]) -> None:
    kind, stream = case
    if kind == "doc":
        _same_decode(stream, MSGDEF, False)
        _same_decode(stream, MSGDEF, False, keep=BODY_KEEP)
    else:
        _same_decode(stream, XMLDSIG if kind == "dsig" else MSGDEF, True)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["doc", "frag", "dsig"]), st.binary(max_size=200))
def test_random_streams(kind: str, data: bytes) -> None:
    stream = b"\x80" + data
    if kind == "doc":
        _same_decode(stream, MSGDEF, False)
    else:
        _same_decode(stream, XMLDSIG if kind == "dsig" else MSGDEF, True)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([s for s in SEEDS if s[0] == "doc"]), st.data())
def test_limits(seed: tuple[str, bytes], data: st.DataObject) -> None:
    """Below each limit C falls back (or agrees), so Python raises the limit's own error."""
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(DecodeLimits)]))
    value = data.draw(st.integers(0, getattr(DEFAULT_LIMITS, field)))
    limits = dataclasses.replace(DEFAULT_LIMITS, **{field: value})
    _same_decode(seed[1], MSGDEF, False, limits=limits)


# --- targeted: each check the C code must make before it answers ---------------------------------------------


def _leaf_node(root: Node, local: str) -> Node:
    found = [n for n in _nodes(root) if n.local == local]
    assert found, local
    return found[0]


@pytest.mark.parametrize(("local", "value", "valid"), [
    ("eMAID", "DEABCC123456789", True), ("eMAID", "DEABCC12345678", True), ("eMAID", "DEABCC1234567", False),
    ("eMAID", "DEABCC1234567890", False), ("eMAID", "DEABCC12345678\x01", False), ("eMAID", "DEABCC1234567é", True),
    ("eMAID", b"DEABCC123456789", False), ("Certificate", bytes(800), True), ("Certificate", bytes(801), False),
    ("Certificate", bytearray(10), True), ("Certificate", "text", False), ("DHpublickey", bytes(66), False),
    ("ResponseCode", "OK", True), ("ResponseCode", "NOPE", False), ("ResponseCode", 0, False),
    ("RetryCounter", 32767, True), ("RetryCounter", 32768, False), ("RetryCounter", -32768, True),
    ("RetryCounter", -32769, False), ("RetryCounter", True, False), ("RetryCounter", "1", False),
])
def test_values_checked_before_encoding(local: str, value: object, valid: bool) -> None:
    from .test_exi_codec import _install_res

    message = _install_res()
    body = message.body
    if local == "RetryCounter":
        from pki.cps.exi import CertificateUpdateRes

        message = dataclasses.replace(message, body=CertificateUpdateRes(**{
            f.name: getattr(body, f.name) for f in dataclasses.fields(body)}, retry_counter=1))  # type: ignore[arg-type]
    root = message.to_node()
    _leaf_node(root, local).content = [value]
    assert (_py_encode([root], MSGDEF, False) is not None) == valid
    _same_encode([root], MSGDEF, False, must_handle=valid and not isinstance(value, bytearray) and "é" not in str(value))


def _fragment(local: str, content: Any) -> bytes:
    """A one-element MSGDEF fragment whose content bits ``content(writer, grammar)`` writes by hand."""
    from pki.cps.exi.bitstream import BitWriter
    from pki.cps.exi.datatypes import bits_for
    from pki.cps.exi.grammar import grammar_for

    qname = next(q for q in MSGDEF.elements if q[0] == local)
    width = bits_for(len(MSGDEF.elements) + 2)
    w = BitWriter()
    w.write_bits(0x80, 8)
    w.write_bits(MSGDEF.elements.index(qname), width)
    content(w, grammar_for(MSGDEF.fragment_decl(qname), MSGDEF))
    w.write_bits(len(MSGDEF.elements) + 1, width)
    return w.getvalue()


def test_non_minimal_unsigned_integer_is_left_to_python() -> None:
    def certificate(w: Any, g: Any) -> None:
        s0 = g.states[0]
        w.write_bits(s0.ch, s0.width)
        w.write_octets(bytes([0x81, 0x00]))  # length 1 with a trailing zero group (EXI 1.0 §7.1.6)
        w.write_octets(b"\x30")
        s1 = g.states[s0.productions[s0.ch].next]
        w.write_bits(s1.ee, s1.width)

    stream = _fragment("Certificate", certificate)
    assert _py_decode(stream, MSGDEF, True) is None
    assert native.decode(stream, MSGDEF, DEFAULT_LIMITS, fragment=True) is None


def test_repeated_attribute_is_left_to_python() -> None:
    """The relaxed element fragment grammar (EXI 1.0 §8.5.3) loops on AT: a repeated attribute is
    possible in the stream and refused by the Python decoder; C must not accept it."""

    def emaid(w: Any, g: Any) -> None:
        s0 = g.states[0]
        at = next(code for q, code in s0.attributes.items() if q[0] == "Id")
        for value in (b"a", b"b"):
            w.write_bits(at, s0.width)
            w.write_uint(len(value) + 2)
            w.write_octets(value)
        w.write_bits(s0.ee, s0.width)

    stream = _fragment("eMAID", emaid)
    assert _py_decode(stream, MSGDEF, True) is None
    assert native.decode(stream, MSGDEF, DEFAULT_LIMITS, fragment=True) is None

    def once(w: Any, g: Any) -> None:
        s0 = g.states[0]
        w.write_bits(next(code for q, code in s0.attributes.items() if q[0] == "Id"), s0.width)
        w.write_uint(3)
        w.write_octets(b"a")
        w.write_bits(s0.ee, s0.width)

    _same_decode(_fragment("eMAID", once), MSGDEF, True, must_handle=True)


def test_negative_limits_are_left_to_python() -> None:
    """A limit below zero refuses everything in codec.py; C does not compare it, it falls back."""
    stream = bytes.fromhex(EXIFICIENT_MESSAGES[sorted(EXIFICIENT_MESSAGES)[0]][1])
    for field in ("max_binary_octets", "max_string_chars", "max_events", "max_depth", "max_integer_octets"):
        limits = dataclasses.replace(DEFAULT_LIMITS, **{field: -1})
        assert native.decode(stream, MSGDEF, limits, fragment=False) is None, field
        _same_decode(stream, MSGDEF, False, limits=limits)


def test_fuzz_script_runs_and_agrees() -> None:
    """scripts/fuzz_exi.py, the long-run version of these comparisons, keeps working (a short run)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_exi.py"
    out = subprocess.run([sys.executable, str(script), "--streams", "3000", "--seed", "5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all agreed with Python" in out.stdout


def test_coverage_guided_fuzz_script_runs(tmp_path: Path) -> None:
    """scripts/fuzz_exi_cov.py (atheris: libFuzzer keeps inputs that reach new code, then the same C-versus-
    Python comparison) keeps working: a short run from the published seeds finds new inputs and no
    disagreement. Long runs, with the C half instrumented and under AddressSanitizer: its docstring."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_exi_cov.py"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    out = subprocess.run([sys.executable, str(script), "-runs=3000", "-seed=5", "-print_final_stats=1",
                          str(corpus)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Done 3000 runs" in out.stderr, out.stderr[-3000:]
    assert any(corpus.iterdir()), "libFuzzer kept no new input: coverage is not reaching it"
    assert not list(tmp_path.glob("crash-*"))
