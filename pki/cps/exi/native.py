"""The C half of the EXI codec (``_native.c``): its grammar tables, and when it is used.

codec.py calls :func:`encode_document`, :func:`encode_fragment` and :func:`decode` first. They return
None whenever the C code does not handle a case — a value or stream the Python codec would reject, a
non-ASCII string, a limit reached, an element outside the subset — and codec.py then runs its Python code,
which is the reference: it gives the same result or the exact error. So C answers only what Python would
answer, byte for byte (tests/test_exi_native.py compares both on the test vectors and on fuzzed trees and
streams).

The extension is built by ``pip install`` when a C compiler is there (setup.py, optional); without it, or
with ``V2GPKI_EXI_NATIVE=0``, the Python codec alone runs. A contract installation's EXI work took ≈ 0.9 ms
in Python and takes ≈ 0.25 ms this way, the calls from Python included (docs/exi.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from pki.config import current

from ..errors import ExiEncodeError
from .datatypes import BinaryType, BooleanType, Datatype, DecodeLimits, EnumType, IntegerType, StringType, bits_for
from .grammar import Grammar, Kind, grammar_for
from .schema import ElementDecl, QName, SchemaSet
from .tree import Node, empty_value_allowed

ABI = 2  # what _native.c's tables and calls look like; a stale build with another ABI is not used

try:
    import pki.cps.exi._native as _native  # type: ignore[import-not-found]
except ImportError:  # not built (no C compiler at install time): the Python codec alone
    _native = None

if _native is not None and getattr(_native, "ABI", None) != ABI:
    _native = None


# read once, at import: this is asked several times per installation
ENABLED = current().exi_native


def available() -> bool:
    """The C codec is built, current, and not turned off with ``V2GPKI_EXI_NATIVE=0`` (at start-up)."""
    return ENABLED and _native is not None


_INT64 = (-(2**63), 2**63 - 1)


def _datatype_spec(dt: Datatype) -> tuple[Any, ...]:
    none = (False, 0, False, 0, -1, None, None)
    if isinstance(dt, StringType | BinaryType):
        kind = 0 if isinstance(dt, StringType) else 1
        return (kind, dt.min_length, -1 if dt.max_length is None else dt.max_length, *none)
    if isinstance(dt, IntegerType):
        maximum = dt.maximum
        if maximum is not None and maximum > _INT64[1] and dt.minimum is not None and dt.minimum >= 0:
            # xs:unsignedLong (ISO 15118-20 TimeStamp): C takes values up to 2^63 - 1 and, having a lower
            # bound, leaves every larger one to Python (it punts on 64-bit overflow), which checks the maximum.
            maximum = None
        for bound in (dt.minimum, maximum):
            if bound is not None and not _INT64[0] <= bound <= _INT64[1]:
                raise ValueError(f"{dt.label}: bound outside 64 bits")
        nbit = dt._nbit  # EXI 1.0 §7.1.5: the n-bit form of a bounded range, as the Python codec decides
        return (2, 0, -1, dt.minimum is not None, dt.minimum or 0, maximum is not None, maximum or 0,
                -1 if nbit is None else nbit, None, None)
    if isinstance(dt, BooleanType):
        return (3, 0, -1, *none)
    if isinstance(dt, EnumType):
        index: dict[object, int] = {}
        for i, v in enumerate(dt.values):
            index.setdefault(v, i)  # tuple.index: the first one
        return (4, 0, -1, False, 0, False, 0, bits_for(len(dt.values)), dt.values, index)
    raise ValueError(f"no C representation for {type(dt).__name__}")


@dataclass(frozen=True)
class _Program:
    c: Any
    doc_index: dict[QName, int]  # G_i
    doc_grammar: tuple[int, ...]  # G_i's grammar in the tables (-1: outside the subset)
    doc_width: int
    frag_index: dict[QName, int]  # F_i
    frag_grammar: tuple[int, ...]
    frag_width: int
    frag_ed: int
    strict_grammar: dict[QName, int]  # ambiguous qnames with their declaration's own grammar


@cache
def _program(schema: SchemaSet) -> _Program | None:
    """Every grammar reachable from ``schema``'s global and fragment elements, as _native.c's tables."""

    grammars: list[Grammar] = []
    index: dict[int, int] = {}
    datatypes: list[Datatype] = []
    dt_index: dict[int, int] = {}

    def g_of(decl: ElementDecl) -> int:
        try:
            grammar = grammar_for(decl, schema)
        except ExiEncodeError:  # outside the subset: codec.py raises its error when it gets there
            return -1
        if id(grammar) not in index:
            index[id(grammar)] = len(grammars)
            grammars.append(grammar)
        return index[id(grammar)]

    def d_of(dt: Datatype | None) -> int:
        if dt is None:
            return -1
        if id(dt) not in dt_index:
            dt_index[id(dt)] = len(datatypes)
            datatypes.append(dt)
        return dt_index[id(dt)]

    doc_roots = tuple((q, g_of(schema.decls.get(q, ElementDecl(q, None)))) for q in schema.global_elements)
    frag_roots = tuple((q, g_of(schema.fragment_decl(q))) for q in schema.elements)
    strict = {q: g_of(schema.decls[q]) for q in schema.ambiguous if q in schema.decls}
    specs: list[tuple[Any, ...]] = []
    done = 0
    while done < len(grammars):  # grammars grows as SE productions reach new ones
        grammar = grammars[done]
        done += 1
        states = []
        for st in grammar.states:
            prods = tuple(
                (int(p.kind), p.next, p.qname, d_of(p.datatype),
                 g_of(p.element) if p.kind is Kind.SE and p.element is not None else -1)
                for p in st.productions
            )
            states.append((st.width, st.width2, -1 if st.ee is None else st.ee, -1 if st.ch is None else st.ch,
                           -1 if st.ee2 is None else st.ee2, int(empty_value_allowed(st)),
                           dict(st.elements), dict(st.attributes), prods))
        specs.append((grammar, id(grammar), tuple(states)))
    assert _native is not None
    try:  # a datatype without a C form, or tables _native.c refuses: the Python codec alone for this schema
        c = _native.Program((Node, tuple(specs), tuple(_datatype_spec(dt) for dt in datatypes), doc_roots,
                             frag_roots))
    except (ValueError, TypeError):
        return None
    return _Program(
        c=c,
        doc_index={q: i for i, q in enumerate(schema.global_elements)},
        doc_grammar=tuple(g for _, g in doc_roots),
        doc_width=bits_for(len(schema.global_elements) + 1),
        frag_index={q: i for i, q in enumerate(schema.elements)},
        frag_grammar=tuple(g for _, g in frag_roots),
        frag_width=bits_for(len(schema.elements) + 2),
        frag_ed=len(schema.elements) + 1,
        strict_grammar=strict,
    )


def encode_document(root: Node, schema: SchemaSet) -> bytes | None:
    prog = _program(schema)
    if prog is None:
        return None
    i = prog.doc_index.get(root.qname)
    if i is None:
        return None
    out: bytes | None = _native.encode(prog.c, [(i, prog.doc_width, root, prog.doc_grammar[i])], 0, 0)
    return out


def encode_fragment(elements: Sequence[Node], schema: SchemaSet, relaxed_ambiguous: bool) -> bytes | None:
    prog = _program(schema)
    if prog is None:
        return None
    items = []
    for node in elements:
        i = prog.frag_index.get(node.qname)
        if i is None:
            return None
        g = prog.frag_grammar[i]
        if not relaxed_ambiguous and node.qname in prog.strict_grammar:
            g = prog.strict_grammar[node.qname]
        items.append((i, prog.frag_width, node, g))
    out: bytes | None = _native.encode(prog.c, items, prog.frag_ed, prog.frag_width)
    return out


def decode(data: bytes, schema: SchemaSet, limits: DecodeLimits, *, fragment: bool,
           keep_bits: frozenset[QName] = frozenset()) -> Any:
    """A Node (document) or a list of Nodes (fragment), or None: codec.py's Python code decides."""
    prog = _program(schema)
    if prog is None:
        return None
    lim = (limits.max_stream_octets, limits.max_depth, limits.max_events, limits.max_string_chars,
           limits.max_binary_octets, limits.max_integer_octets)
    return _native.decode(prog.c, data, fragment, lim, keep_bits or None)
