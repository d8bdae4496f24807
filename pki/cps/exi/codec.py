"""Grammar-driven EXI encoder and decoder over a small element tree (:class:`Node`).

Stream layout as ISO 15118-2 uses it: the one-byte EXI header ``0x80`` (distinguishing bits ``10``, no
options — they are agreed out of band —, final version 1; EXI 1.0 §5), then the body, bit-packed, padded
with zero bits to the next byte. A whole message is an EXI *document* (§8.5.1); the elements that get
signed are each encoded as an EXI *fragment* (fragment option true, §8.5.2), which is what digests and
signatures are computed over.

The decoder only accepts what the encoder could have produced from a valid tree: any second-level event
code (a schema deviation), wildcard content or an element outside the supported subset raises
:class:`~pki.cps.errors.ExiUnsupported`; anything impossible raises :class:`~pki.cps.errors.ExiDecodeError`.
Work and memory are bounded by :class:`~pki.cps.exi.datatypes.DecodeLimits`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ExiDecodeError, ExiEncodeError, ExiLimitExceeded, ExiUnsupported
from .bitstream import BitReader, BitWriter
from .datatypes import DEFAULT_LIMITS, BinaryType, DecodeLimits, StringType, bits_for
from .grammar import Grammar, Kind, State, grammar_for
from .native import available as native_available
from .native import decode as native_decode
from .native import encode_document as native_encode_document
from .native import encode_fragment as native_encode_fragment
from .schema import ElementDecl, QName, SchemaSet
from .tree import Node, empty_value_allowed

EXI_HEADER = 0x80  # 10 | 0 | 0 0000: distinguishing bits, no options, final version 1 (EXI 1.0 §5.2-5.3)

def _describe(qname: QName | None) -> str:
    return qname[0] if qname else "?"


# --- encoder -------------------------------------------------------------------------------------------------


def _encode_element(writer: BitWriter, node: Node, grammar: Grammar, schema: SchemaSet, depth: int) -> None:
    memo = node.memo
    if memo is None:
        _encode_content(writer, node, grammar, schema, depth)
        return
    # An element's content and EE depend only on the node and its grammar (no string tables: value
    # partitions are empty in ISO 15118-2's EXI options), so the bits are the same wherever it occurs.
    hit = memo.get(id(grammar))
    if hit is None or hit[0] is not grammar:
        sub = BitWriter()
        _encode_content(sub, node, grammar, schema, depth)
        hit = (grammar, *sub.bits())
        memo[id(grammar)] = hit
    writer.write_bits(hit[1], hit[2])


def _encode_content(writer: BitWriter, node: Node, grammar: Grammar, schema: SchemaSet, depth: int) -> None:
    # The hot loop of every installation (≈ 90 elements per response and its signed fragments): event
    # codes are written inline, and the bound method looked up once.
    if depth > DEFAULT_LIMITS.max_depth:
        raise ExiEncodeError("element tree too deep")
    states = grammar.states
    state = states[0]
    write_bits = writer.write_bits
    # SC, NS, xsi:type and xsi:nil never occur; the remaining AT events go in qname order (EXI 1.0 §6).
    if node.attributes:
        for qname in sorted(node.attributes):
            code = state.attributes.get(qname)
            if code is None:
                raise ExiEncodeError(f"{node.local}: attribute {_describe(qname)} not allowed here by the schema")
            prod = state.productions[code]
            assert prod.datatype is not None
            value = prod.datatype.check(node.attributes[qname])
            write_bits(code, state.width)
            prod.datatype.write(writer, value)
            state = states[prod.next]
    for item in node.content:
        if isinstance(item, Node):
            code = state.elements.get(item.qname)
            if code is None:
                raise ExiEncodeError(f"{node.local}: element {item.local} not allowed here by the schema")
            prod = state.productions[code]
            assert prod.element is not None
            write_bits(code, state.width)
            _encode_element(writer, item, grammar_for(prod.element, schema), schema, depth + 1)
        else:
            ch = state.ch
            if ch is None:
                raise ExiEncodeError(f"{node.local}: character content not allowed here by the schema")
            prod = state.productions[ch]
            datatype = prod.datatype
            assert datatype is not None
            value = datatype.check(item)
            write_bits(ch, state.width)
            datatype.write(writer, value)
        state = states[prod.next]
    if state.ee is not None:
        write_bits(state.ee, state.width)
    elif state.ee2 is not None and empty_value_allowed(state):
        # No CH where a value is due: an empty value, as in <a></a>. EXIficient encodes it like this, and
        # so does the data model (messages.py leaves empty values out of the tree); an explicit empty CH in
        # a tree is kept as such, so that decoding then encoding reproduces any accepted stream exactly.
        datatype = state.productions[state.ch].datatype if state.ch is not None else None
        assert datatype is not None
        datatype.check(b"" if isinstance(datatype, BinaryType) else "")  # minLength still applies
        write_bits(len(state.productions), state.width)  # escape to the second level, then its EE (§8.5.4.4.1)
        write_bits(state.ee2, state.width2)
    else:
        raise ExiEncodeError(f"{node.local}: content incomplete, the schema requires more here")


def _write_header(writer: BitWriter) -> None:
    writer.write_bits(EXI_HEADER, 8)


def encode_document(root: Node, schema: SchemaSet) -> bytes:
    """An EXI document (EXI 1.0 §8.5.1): SD, SE(G_i) from the sorted global elements, content, ED."""
    if native_available():
        out = native_encode_document(root, schema)
        if out is not None:
            return out
    return _encode_document(root, schema)


def _encode_document(root: Node, schema: SchemaSet) -> bytes:
    writer = BitWriter()
    _write_header(writer)
    try:
        index = schema.global_elements.index(root.qname)
    except ValueError:
        raise ExiEncodeError(f"{root.local} is not a global element of {schema.name}") from None
    writer.write_bits(index, bits_for(len(schema.global_elements) + 1))  # + SE(*); DT, CM, PI pruned
    _encode_element(writer, root, grammar_for(schema.decls[root.qname], schema), schema, 1)
    return writer.getvalue()  # DocEnd: ED is the only production, 0 bits


def encode_fragment(elements: Sequence[Node], schema: SchemaSet, *, relaxed_ambiguous: bool = True) -> bytes:
    """An EXI fragment (EXI 1.0 §8.5.2): SE(F_i) for each element, then ED.

    ``relaxed_ambiguous`` False evaluates an ambiguous qname (``eMAID``) with the grammar of the
    declaration's own type instead of the relaxed element fragment grammar §8.5.3 prescribes: the
    non-conformant behaviour of libcbv2g/cbexigen (EVerest), offered only to interoperate with it.
    """
    if native_available():
        out = native_encode_fragment(elements, schema, relaxed_ambiguous)
        if out is not None:
            return out
    return _encode_fragment(elements, schema, relaxed_ambiguous=relaxed_ambiguous)


def _encode_fragment(elements: Sequence[Node], schema: SchemaSet, *, relaxed_ambiguous: bool = True) -> bytes:
    writer = BitWriter()
    _write_header(writer)
    width = bits_for(len(schema.elements) + 2)  # F_0..F_n-1, SE(*), ED; CM and PI pruned
    for node in elements:
        try:
            index = schema.elements.index(node.qname)
        except ValueError:
            raise ExiEncodeError(f"{node.local} is not an element of {schema.name}") from None
        writer.write_bits(index, width)
        decl = schema.fragment_decl(node.qname)
        if not relaxed_ambiguous and node.qname in schema.ambiguous:
            decl = schema.decls[node.qname]
        _encode_element(writer, node, grammar_for(decl, schema), schema, 1)
    writer.write_bits(len(schema.elements) + 1, width)  # ED
    return writer.getvalue()


# --- decoder -------------------------------------------------------------------------------------------------


class _Decoder:
    def __init__(self, data: bytes, schema: SchemaSet, limits: DecodeLimits,
                 keep_bits: frozenset[QName] = frozenset()) -> None:
        if len(data) > limits.max_stream_octets:
            raise ExiLimitExceeded(f"EXI stream larger than {limits.max_stream_octets} octets")
        self.reader = BitReader(data)
        self.schema = schema
        self.limits = limits
        self.events = 0
        self.keep_bits = keep_bits

    def header(self) -> None:
        if self.reader.remaining_bits < 8:
            raise ExiDecodeError("EXI stream too short for a header")
        if self.reader.read_bits(2) != 0b10:
            raise ExiDecodeError("not an EXI stream (distinguishing bits are not 10)")
        if self.reader.read_bits(1):
            raise ExiUnsupported("EXI options in the header are not used by ISO 15118-2")
        preview, version = self.reader.read_bits(1), self.reader.read_bits(4)
        if preview or version != 0:
            raise ExiUnsupported("only the final EXI format version 1 is supported")

    def tick(self) -> None:
        self.events += 1
        if self.events > self.limits.max_events:
            raise ExiLimitExceeded(f"more than {self.limits.max_events} EXI events")

    def code(self, width: int, count: int, escape: bool, where: str) -> int:
        self.tick()
        value = self.reader.read_bits(width)
        if value < count:
            return value
        if escape and value == count:
            raise ExiUnsupported(f"{where}: schema deviation (second-level event code) not supported")
        raise ExiDecodeError(f"{where}: invalid event code {value}")

    def state_code(self, state: State, where: str) -> int:
        """First-level code; -1 for the second-level EE of an element whose value is empty."""
        count = len(state.productions)
        if state.ee2 is not None and empty_value_allowed(state):
            self.tick()
            value = self.reader.read_bits(state.width)
            if value < count:
                return value
            if value == count:
                second = self.reader.read_bits(state.width2)
                if second == state.ee2:
                    return -1
                if second < state.second_level:
                    raise ExiUnsupported(f"{where}: schema deviation (second-level event code) not supported")
            raise ExiDecodeError(f"{where}: invalid event code {value}")
        return self.code(state.width, count, state.escape, where)

    def element(self, decl: ElementDecl, depth: int) -> Node:
        if depth > self.limits.max_depth:
            raise ExiLimitExceeded(f"elements nested deeper than {self.limits.max_depth}")
        if decl.type_name is None:
            raise ExiUnsupported(f"element {decl.qname[0]} is outside the supported ISO 15118-2 subset")
        grammar = grammar_for(decl, self.schema)
        node = Node(decl.qname)
        if decl.qname in self.keep_bits:
            # The content bits as read (content and EE depend only on the node and its grammar, and the
            # decoder accepts only what the encoder writes), kept as the encoder's memo: re-encoding this
            # element (the request body's digest) then copies them instead of encoding it again.
            start = self.reader.position
            self._content(node, grammar, depth)
            node.memo = {id(grammar): (grammar, self.reader.bits_between(start, self.reader.position),
                                       self.reader.position - start)}
            return node
        self._content(node, grammar, depth)
        return node

    def _content(self, node: Node, grammar: Grammar, depth: int) -> None:
        state = grammar.states[0]
        while True:
            code = self.state_code(state, node.local)
            if code < 0:  # EE at the second level: the element's value is empty
                datatype = state.productions[state.ch].datatype if state.ch is not None else None
                if isinstance(datatype, StringType | BinaryType) and datatype.min_length > 0:
                    raise ExiDecodeError(f"{node.local}: empty value violates {datatype.label} minLength")
                return
            prod = state.productions[code]
            if prod.kind is Kind.EE:
                return
            if prod.kind is Kind.AT:
                assert prod.qname is not None and prod.datatype is not None
                if prod.qname in node.attributes:
                    raise ExiDecodeError(f"{node.local}: attribute {prod.qname[0]} repeated")
                node.attributes[prod.qname] = prod.datatype.read(self.reader, self.limits)  # type: ignore[assignment]
            elif prod.kind is Kind.CH:
                assert prod.datatype is not None
                node.content.append(prod.datatype.read(self.reader, self.limits))  # type: ignore[arg-type]
            elif prod.kind is Kind.SE:
                assert prod.element is not None
                node.content.append(self.element(prod.element, depth + 1))
            else:
                raise ExiUnsupported(f"{node.local}: wildcard content (SE(*) or AT(*)) not supported")
            state = grammar.states[prod.next]

    def finish(self) -> None:
        rest = self.reader.remaining_bits
        if rest >= 8:
            raise ExiDecodeError("trailing octets after the end of the EXI body")
        if rest and self.reader.read_bits(rest):
            raise ExiDecodeError("non-zero padding after the end of the EXI body")


def decode_document(data: bytes, schema: SchemaSet, limits: DecodeLimits = DEFAULT_LIMITS, *,
                    keep_bits: frozenset[QName] = frozenset()) -> Node:
    """``keep_bits``: elements whose encoded content is kept with their Node (``Node.memo``), for a caller
    that re-encodes them unchanged (a signature check); such a Node must not be modified afterwards."""
    if native_available():
        root = native_decode(data, schema, limits, fragment=False, keep_bits=keep_bits)
        if root is not None:
            return root  # type: ignore[no-any-return]
    return _decode_document(data, schema, limits, keep_bits=keep_bits)


def _decode_document(data: bytes, schema: SchemaSet, limits: DecodeLimits = DEFAULT_LIMITS, *,
                     keep_bits: frozenset[QName] = frozenset()) -> Node:
    decoder = _Decoder(data, schema, limits, keep_bits)
    decoder.header()
    count = len(schema.global_elements)
    code = decoder.code(bits_for(count + 1), count + 1, False, "document")
    if code == count:
        raise ExiUnsupported("document element outside the schema (SE(*)) not supported")
    qname = schema.global_elements[code]
    decl = schema.decls.get(qname, ElementDecl(qname, None))
    root = decoder.element(decl, 1)
    decoder.finish()
    return root


def decode_fragment(data: bytes, schema: SchemaSet, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Node]:
    if native_available():
        nodes = native_decode(data, schema, limits, fragment=True)
        if nodes is not None:
            return nodes  # type: ignore[no-any-return]
    return _decode_fragment(data, schema, limits)


def _decode_fragment(data: bytes, schema: SchemaSet, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Node]:
    decoder = _Decoder(data, schema, limits)
    decoder.header()
    count = len(schema.elements)
    width = bits_for(count + 2)
    nodes: list[Node] = []
    while True:
        code = decoder.code(width, count + 2, False, "fragment")
        if code == count + 1:
            break
        if code == count:
            raise ExiUnsupported("fragment element outside the schema (SE(*)) not supported")
        nodes.append(decoder.element(schema.fragment_decl(schema.elements[code]), 1))
    decoder.finish()
    return nodes
