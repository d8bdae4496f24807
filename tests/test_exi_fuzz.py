"""Fuzzing the EXI decoder: arbitrary and mutated streams only ever raise the typed EXI errors, stay
within their bounds, and every stream the decoder accepts re-encodes to exactly the same octets."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pki.cps.errors import ExiError
from pki.cps.exi import (
    MSGDEF,
    XMLDSIG,
    decode_document,
    decode_fragment,
    encode_document,
    encode_fragment,
    encode_message,
)
from pki.cps.exi.messages import V2GMessage

from .test_exi_codec import messages
from .test_exi_vectors import EXIFICIENT_MESSAGES, RISE_CERT_CHAIN, RISE_EMAID, RISE_SIGNED_INFO

SEEDS: list[tuple[str, bytes]] = [("doc", bytes.fromhex(h)) for _, h in EXIFICIENT_MESSAGES.values()] + [
    ("frag", RISE_CERT_CHAIN),
    ("frag", RISE_EMAID),
    ("dsig", RISE_SIGNED_INFO),
]
BUDGET_SECONDS = 1.0  # per stream; real decodes take a few milliseconds


def _decode_then_reencode(kind: str, stream: bytes) -> None:
    started = time.perf_counter()
    try:
        if kind == "doc":
            root = decode_document(stream, MSGDEF)
            assert encode_document(root, MSGDEF) == stream
            V2GMessage.from_node(root)  # the data model accepts whatever the decoder accepts
        else:
            schema = XMLDSIG if kind == "dsig" else MSGDEF
            nodes = decode_fragment(stream, schema)
            assert encode_fragment(nodes, schema) == stream
    except ExiError:
        pass
    assert time.perf_counter() - started < BUDGET_SECONDS


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["doc", "frag", "dsig"]), st.binary(max_size=300))
def test_random_bytes(kind: str, data: bytes) -> None:
    _decode_then_reencode(kind, data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["doc", "frag", "dsig"]), st.binary(max_size=200))
def test_random_bodies_after_a_valid_header(kind: str, data: bytes) -> None:
    _decode_then_reencode(kind, b"\x80" + data)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    kind, seed = draw(st.sampled_from(SEEDS))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if op == "flip" and data:
            bit = draw(st.integers(0, 8 * len(data) - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete" and data:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 4))]
    return kind, bytes(data)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_valid_streams(case: tuple[str, bytes]) -> None:
    _decode_then_reencode(*case)


@settings(max_examples=150, deadline=None)
@given(messages, st.data())
def test_mutated_generated_messages(message: V2GMessage, data: st.DataObject) -> None:
    stream = bytearray(encode_message(message))
    bit = data.draw(st.integers(0, 8 * len(stream) - 1))
    stream[bit // 8] ^= 1 << (bit % 8)
    _decode_then_reencode("doc", bytes(stream))
