"""Schema-informed element and type grammars (EXI 1.0 §8.5.4), built from :mod:`.schema` at first use.

Steps, as the specification orders them:

1. proto-grammar (§8.5.4.1): attribute uses sorted by qname, then the content — a simple type's
   ``CH [schema-typed value]``, an empty content, or the particle tree (sequence, choice, min/max occurs,
   element terms with substitution groups, wildcards); mixed content adds ``CH [untyped value]`` loops;
2. normalisation (§8.5.4.2): eliminating productions without a terminal symbol and merging duplicate
   terminals — done here as the equivalent epsilon-closure / subset construction;
3. event codes (§8.5.4.3): AT(qname) by qname, AT(*), SE(qname) in schema order, SE(*), EE, CH;
4. undeclared productions (§8.5.4.4.1, strict = false as ISO 15118-2 uses it): every non-terminal gains
   second-level productions, so the first-level part of every code is one value wider (⌈log2(n+1)⌉ bits
   for n first-level productions) and that extra value escapes to the second level. With the V2G fidelity
   options (no prefixes, comments, PIs, DTDs, selfContained) the second level holds, in order:
   EE (where no first-level EE exists), AT(xsi:type) and AT(xsi:nil) (first non-terminal only), AT(*) and
   the untyped-AT group (non-terminals up to *content*), SE(*), CH [untyped value].
   The only one this codec uses is that EE: it is how an element with an empty value (``<a></a>``, no CH
   event) is encoded, as EXIficient does. The decoder rejects the others with
   :class:`~pki.cps.errors.ExiUnsupported`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache

from ..errors import ExiEncodeError
from .datatypes import UNTYPED, Datatype, bits_for
from .schema import (
    ELEMENT_FRAGMENT,
    TYPES,
    ComplexType,
    ElementDecl,
    ModelGroup,
    Particle,
    QName,
    SchemaSet,
    SimpleType,
    SubstitutionGroup,
    TypeDef,
    Wildcard,
)


class Kind(IntEnum):
    """Terminal kinds, numbered in the order §8.5.4.3 sorts productions."""

    AT = 0
    AT_ANY = 1
    SE = 2
    SE_ANY = 3
    EE = 4
    CH = 5


@dataclass(frozen=True)
class Production:
    kind: Kind
    next: int  # index of the right-hand non-terminal; -1 after EE
    qname: QName | None = None
    datatype: Datatype | None = None  # value of AT / CH
    element: ElementDecl | None = None  # declaration evaluated after SE


@dataclass(frozen=True)
class State:
    """One normalised non-terminal with its first-level event codes (the index in ``productions``)."""

    productions: tuple[Production, ...]
    second_level: int = 0  # number of second-level productions (0: no escape value at the first level)
    width: int = field(init=False)
    width2: int = field(init=False, repr=False)
    ee2: int | None = field(init=False, repr=False)  # second-level code of EE, when EE is only there
    attributes: Mapping[QName, int] = field(init=False, repr=False)
    elements: Mapping[QName, int] = field(init=False, repr=False)
    ee: int | None = field(init=False, repr=False)
    ch: int | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        count = len(self.productions) + (1 if self.second_level else 0)
        object.__setattr__(self, "width", bits_for(count))
        object.__setattr__(self, "width2", bits_for(self.second_level))
        kinds = [p.kind for p in self.productions]
        object.__setattr__(self, "ee2", 0 if self.second_level and Kind.EE not in kinds else None)
        object.__setattr__(
            self, "attributes", {p.qname: i for i, p in enumerate(self.productions) if p.kind is Kind.AT}
        )
        object.__setattr__(self, "elements", {p.qname: i for i, p in enumerate(self.productions) if p.kind is Kind.SE})
        object.__setattr__(self, "ee", kinds.index(Kind.EE) if Kind.EE in kinds else None)
        object.__setattr__(self, "ch", kinds.index(Kind.CH) if Kind.CH in kinds else None)

    @property
    def escape(self) -> bool:
        return self.second_level > 0


def _second_level_count(productions: list[Production], first: bool, start_tag: bool) -> int:
    """Second-level productions §8.5.4.4.1 adds with ISO 15118-2's fidelity options (see module doc)."""
    count = 0 if any(p.kind is Kind.EE for p in productions) else 1
    if first:
        count += 2  # AT(xsi:type), AT(xsi:nil)
    if start_tag:
        count += 2  # AT(*), AT(qname)[untyped]… / AT(*)[untyped] (one second-level value, third level below)
    return count + 2  # SE(*), CH [untyped value]


@dataclass(frozen=True)
class Grammar:
    name: str
    states: tuple[State, ...]


# --- proto-grammars as an NFA with epsilon moves -----------------------------------------------------------

_Term = tuple[Kind, QName | None, bool]  # (kind, qname, typed) identifies a terminal symbol
_Part = tuple[int, frozenset[int]]  # (start state, accepting states: those with an EE production)


class _Proto:
    def __init__(self) -> None:
        self.edges: list[list[tuple[_Term | None, int]]] = []
        self.payload: dict[_Term, Datatype | ElementDecl] = {}
        self.order: dict[_Term, tuple[int, ...]] = {}

    def state(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def edge(self, src: int, term: _Term | None, dst: int) -> None:
        self.edges[src].append((term, dst))

    def empty(self) -> _Part:
        s = self.state()
        return s, frozenset({s})

    def concat(self, parts: list[_Part]) -> _Part:
        """The ⊕ operator (§8.5.4.1.1): every EE of the left operand becomes a move to the right's start."""
        if not parts:
            return self.empty()
        for (_, accepts), (start, _) in zip(parts, parts[1:], strict=False):
            for a in accepts:
                self.edge(a, None, start)
        return parts[0][0], parts[-1][1]

    def particle(self, particle: Particle, path: tuple[int, ...]) -> _Part:
        """§8.5.4.1.5: {min occurs} copies, then optional copies or one repeating copy."""
        parts = [self.term(particle.term, path) for _ in range(particle.min_occurs)]
        if particle.max_occurs is None:
            start, accepts = self.term(particle.term, path)
            for a in accepts:
                self.edge(a, None, start)
            parts.append((start, frozenset({start})))
        else:
            for _ in range(particle.max_occurs - particle.min_occurs):
                start, accepts = self.term(particle.term, path)
                parts.append((start, accepts | {start}))
        return self.concat(parts)

    def term(self, term: object, path: tuple[int, ...]) -> _Part:
        if isinstance(term, ElementDecl):
            return self.elements([term], path)
        if isinstance(term, SubstitutionGroup):
            # §8.5.4.1.6: one SE per member of the group, members sorted by local-name then uri
            return self.elements(sorted(term.members, key=lambda d: d.qname), path)
        if isinstance(term, Wildcard):
            s0, s1 = self.state(), self.state()
            self.edge(s0, (Kind.SE_ANY, None, False), s1)
            return s0, frozenset({s1})
        if isinstance(term, ModelGroup):
            parts = [self.particle(p, (*path, i)) for i, p in enumerate(term.particles)]
            if term.compositor == "sequence":  # §8.5.4.1.8.1
                return self.concat(parts)
            start = self.state()  # choice, §8.5.4.1.8.2
            if not parts:
                return start, frozenset({start})
            accepts: frozenset[int] = frozenset()
            for p_start, p_accepts in parts:
                self.edge(start, None, p_start)
                accepts |= p_accepts
            return start, accepts
        raise TypeError(f"unknown particle term {term!r}")

    def elements(self, decls: list[ElementDecl], path: tuple[int, ...]) -> _Part:
        s0, s1 = self.state(), self.state()
        for i, decl in enumerate(decls):
            t: _Term = (Kind.SE, decl.qname, False)
            self.edge(s0, t, s1)
            self.payload.setdefault(t, decl)
            key = (*path, i) if len(decls) > 1 else path
            self.order[t] = min(self.order.get(t, key), key)
        return s0, frozenset({s1})

    def closure(self, states: frozenset[int] | set[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(states)
        while stack:
            for t, dst in self.edges[stack.pop()]:
                if t is None and dst not in seen:
                    seen.add(dst)
                    stack.append(dst)
        return frozenset(seen)

    def normalise(self, name: str, start: int, accepts: frozenset[int]) -> Grammar:
        """§8.5.4.2 + §8.5.4.3: subset construction over epsilon-closures, then event code order."""
        first = self.closure({start})
        index = {first: 0}
        queue = [first]
        rows: list[list[Production]] = []
        for current in queue:  # the queue grows while iterating: breadth-first
            moves: dict[_Term, set[int]] = {}
            for s in current:
                for t, dst in self.edges[s]:
                    if t is not None:
                        moves.setdefault(t, set()).add(dst)
            productions = []
            for t, targets in moves.items():
                nxt = self.closure(targets)
                if nxt not in index:
                    index[nxt] = len(queue)
                    queue.append(nxt)
                kind, qname, _typed = t
                payload = self.payload.get(t)
                datatype = None
                if kind in (Kind.AT, Kind.CH):
                    datatype = payload if isinstance(payload, Datatype) else UNTYPED
                element = payload if isinstance(payload, ElementDecl) else None
                productions.append(Production(kind, index[nxt], qname, datatype=datatype, element=element))
            if current & accepts:
                productions.append(Production(Kind.EE, -1))
            productions.sort(key=lambda p: self._sort_key(p))
            rows.append(productions)
        # *content* (§8.5.4.4.1): non-terminals with AT productions come first; the state all attribute
        # paths end in is Element_i,content; without attributes that is the first non-terminal.
        with_at = {i for i, row in enumerate(rows) if any(p.kind is Kind.AT for p in row)}
        after_at = {p.next for i in with_at for p in rows[i] if p.kind is Kind.AT and p.next not in with_at}
        content = min(after_at) if after_at else 0
        states = tuple(
            State(tuple(row), _second_level_count(row, i == 0, i in with_at or i == content))
            for i, row in enumerate(rows)
        )
        return Grammar(name, states)

    def _sort_key(self, p: Production) -> tuple[int, object]:
        if p.kind is Kind.AT:
            return (p.kind, p.qname)
        if p.kind is Kind.SE:
            return (p.kind, self.order[(Kind.SE, p.qname, False)])
        return (p.kind, ())


def _build_type_grammar(typedef: TypeDef) -> Grammar:
    """§8.5.4.1.3: Type_i = H_0 ⊕ … ⊕ H_n-1 ⊕ Content_i, normalised."""
    proto = _Proto()
    parts: list[_Part] = []
    attributes = typedef.attributes if isinstance(typedef, ComplexType) else ()
    for use in sorted(attributes, key=lambda a: a.qname):  # §8.5.4.1.4, sorted by qname
        a0, a1 = proto.state(), proto.state()
        t: _Term = (Kind.AT, use.qname, True)
        proto.edge(a0, t, a1)
        proto.payload[t] = use.datatype
        parts.append((a0, frozenset({a1}) if use.required else frozenset({a0, a1})))
    content = typedef.datatype if isinstance(typedef, SimpleType) else typedef.content
    if isinstance(content, Datatype):  # §8.5.4.1.3.1 simple content
        c0, c1 = proto.state(), proto.state()
        t = (Kind.CH, None, True)
        proto.edge(c0, t, c1)
        proto.payload[t] = content
        parts.append((c0, frozenset({c1})))
    elif content is None:
        parts.append(proto.empty())
    else:
        first_state = len(proto.edges)
        part = proto.particle(content, ())
        if isinstance(typedef, ComplexType) and typedef.mixed:
            for s in range(first_state, len(proto.edges)):
                proto.edge(s, (Kind.CH, None, False), s)
        parts.append(part)
    start, accepts = proto.concat(parts)
    return proto.normalise(typedef.name, start, accepts)


@cache
def type_grammar(type_name: str) -> Grammar:
    """The (cached) grammar of a named type of the subset."""
    typedef = TYPES.get(type_name)
    if typedef is None:
        raise ExiEncodeError(f"type {type_name} is outside the supported ISO 15118-2 subset")
    return _build_type_grammar(typedef)


@cache
def element_fragment_grammar(schema: SchemaSet) -> Grammar:
    """The relaxed Schema-informed Element Fragment Grammar of EXI 1.0 §8.5.3 for ``schema``.

    ElementFragment0 (state 0): AT(A_i) for every declared attribute qname, AT(*), SE(F_j) for every
    declared element qname, SE(*), EE, CH [untyped value]; ElementFragment2 (state 1): the same without the
    attributes. As §8.5.3 asks, undeclared productions are added as for a nillable element whose type has
    named sub-types — so both non-terminals carry the second-level escape. Every attribute of the ISO 15118-2
    and xmldsig schemas is xs:ID, xs:anyURI or xs:string, so each AT value is a String.
    """
    se = [Production(Kind.SE, 1, q, element=schema.fragment_decl(q)) for q in schema.elements]
    tail = [Production(Kind.SE_ANY, 1), Production(Kind.EE, -1), Production(Kind.CH, 1, datatype=UNTYPED)]
    state0 = (
        [Production(Kind.AT, 0, q, datatype=UNTYPED) for q in schema.attributes]
        + [Production(Kind.AT_ANY, 0)]
        + se
        + tail
    )
    return Grammar(
        f"ElementFragment({schema.name})",
        (
            State(tuple(state0), _second_level_count(state0, True, True)),
            State(tuple(se + tail), _second_level_count(se + tail, False, False)),
        ),
    )


def grammar_for(decl: ElementDecl, schema: SchemaSet) -> Grammar:
    if decl.type_name == ELEMENT_FRAGMENT:
        return element_fragment_grammar(schema)
    if decl.type_name is None:
        raise ExiEncodeError(f"element {decl.qname[0]} is outside the supported ISO 15118-2 subset")
    return type_grammar(decl.type_name)
