"""pki/cps/exi/schema.py is hand-derived from the ISO 15118-2 and xmldsig XSDs: compare it with them.

The EXI grammars, and so every bit the codec writes, follow from these declarations (EXI 1.0 §8.5.4). The
EXIficient vectors and the Josev peer check the messages we exchange, but not a facet or an occurrence
bound they never reach (a FaultMsg of 65 characters, a sixth SubCertificate). Here every type schema.py
declares is read back from the XSDs (the copy in the Josev peer's PyPI package, or V2G_XSD_DIR; see
tests/test_exi_codec.py) and compared term by term: attributes (qualified name, type, use), the content
model (sequence/choice nesting, element qnames and type names, minOccurs/maxOccurs, wildcards,
substitution groups, mixed) and simple types' facets (length bounds, enumerations).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pki.cps.exi import derive_names, schema
from pki.cps.exi.datatypes import BinaryType, Datatype, EnumType, IntegerType, StringType

from .test_exi_codec import xsd_dir_or_skip

XS = derive_names.XS
XS_NS = XS[1:-1]


class Xsd:
    """The schema set's global elements and named types, each with the file (namespace context) it is in."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.types: dict[str, tuple[ET.Element, dict[str, Any]]] = {}
        self.elements: dict[tuple[str, str], tuple[ET.Element, dict[str, Any]]] = {}
        # head -> members, as derive_names finds them for _names.BODY_ELEMENTS
        self.substitution: dict[tuple[str, str], list[tuple[str, str]]] = \
            derive_names.collect(list(files.values()))["substitution"]  # type: ignore[assignment]
        for path in files.values():
            root = ET.parse(path).getroot()
            ctx = {"tns": root.get("targetNamespace", ""), "ns": derive_names.namespace_prefixes(path),
                   "attr_qualified": root.get("attributeFormDefault") == "qualified",
                   "el_qualified": root.get("elementFormDefault") == "qualified"}
            for node in root:
                name = node.get("name")
                if name and node.tag in (XS + "complexType", XS + "simpleType"):
                    self.types[name] = (node, ctx)
                elif name and node.tag == XS + "element":
                    self.elements[(name, ctx["tns"])] = (node, ctx)

    @staticmethod
    def qname(value: str, ctx: dict[str, Any]) -> tuple[str, str]:
        prefix, _, local = value.rpartition(":")
        return local, ctx["ns"].get(prefix, "")

    def type_name(self, value: str, ctx: dict[str, Any]) -> str:
        """schema.py's spelling of a type reference: ``xs:short`` for built-ins, the local name otherwise."""
        local, ns = self.qname(value, ctx)
        return f"xs:{local}" if ns == XS_NS else local

    def attributes(self, node: ET.Element, ctx: dict[str, Any]) -> list[tuple[Any, ...]]:
        out = []
        for a in node.iter(XS + "attribute"):
            ns = ctx["tns"] if ctx["attr_qualified"] else ""
            out.append(((a.get("name"), ns), self.type_name(a.get("type", "xs:anySimpleType"), ctx),
                        a.get("use") == "required"))
        return sorted(out)

    def particle(self, node: ET.Element, ctx: dict[str, Any]) -> tuple[Any, ...]:
        lo = int(node.get("minOccurs", "1"))
        hi_text = node.get("maxOccurs", "1")
        hi = None if hi_text == "unbounded" else int(hi_text)
        if node.tag in (XS + "sequence", XS + "choice"):
            kids = [self.particle(k, ctx) for k in node if k.tag != XS + "annotation"]
            return (node.tag[len(XS):], lo, hi, tuple(kids))
        if node.tag == XS + "any":
            return ("any", lo, hi)
        assert node.tag == XS + "element", node.tag
        if node.get("ref"):
            ref = self.qname(node.get("ref", ""), ctx)
            decl, dctx = self.elements[ref]
            members = self.substitution.get(ref, [])
            if members:  # the head of a substitution group: SE for the head and each member (EXI 1.0
                # §8.5.4.1.6), the abstract head BodyElement included, as EXIficient's vectors encode it
                return ("subst", lo, hi, tuple(sorted([ref, *members])))
            return ("el", ref, self.type_name(decl.get("type", ""), dctx), lo, hi)
        ns = ctx["tns"] if ctx["el_qualified"] else ""
        return ("el", (node.get("name"), ns), self.type_name(node.get("type", ""), ctx), lo, hi)

    def complex(self, node: ET.Element, ctx: dict[str, Any]) -> dict[str, Any]:
        simple = node.find(XS + "simpleContent")
        if simple is not None:
            ext = simple[0]
            return {"attributes": self.attributes(ext, ctx), "content": self.type_name(ext.get("base", ""), ctx),
                    "mixed": False}
        derived = node.find(XS + "complexContent")
        if derived is not None:  # the V2G body messages: extensions of the empty, abstract BodyBaseType
            ext = derived[0]
            base = self.complex(*self.types[self.qname(ext.get("base", ""), ctx)[0]])
            assert ext.tag == XS + "extension" and base == {"attributes": [], "content": None, "mixed": False}
            node = ext
        groups = [k for k in node if k.tag in (XS + "sequence", XS + "choice")]
        return {"attributes": self.attributes(node, ctx),
                "content": self.particle(groups[0], ctx) if groups else None,
                "mixed": node.get("mixed") == "true"}

    def facets(self, name: str) -> dict[str, Any]:
        node, ctx = self.types[name]
        restriction = node.find(XS + "restriction")
        assert restriction is not None, name
        f: dict[str, Any] = {"base": self.type_name(restriction.get("base", ""), ctx)}
        for k in restriction:
            tag = k.tag[len(XS):]
            if tag == "enumeration":
                f.setdefault("enumeration", []).append(k.get("value"))
            elif tag in ("length", "minLength", "maxLength", "minInclusive", "maxInclusive"):
                f[tag] = int(k.get("value", ""))
        return f


def _ours_particle(p: schema.Particle) -> tuple[Any, ...]:
    term = p.term
    if isinstance(term, schema.ModelGroup):
        return (term.compositor, p.min_occurs, p.max_occurs, tuple(_ours_particle(k) for k in term.particles))
    if isinstance(term, schema.Wildcard):
        return ("any", p.min_occurs, p.max_occurs)
    if isinstance(term, schema.SubstitutionGroup):
        return ("subst", p.min_occurs, p.max_occurs, tuple(sorted(m.qname for m in term.members)))
    assert isinstance(term, schema.ElementDecl)
    return ("el", term.qname, term.type_name, p.min_occurs, p.max_occurs)


def _ours_complex(t: schema.ComplexType) -> dict[str, Any]:
    attrs = sorted((a.qname, a.datatype.label, a.required) for a in t.attributes)
    content: Any
    if isinstance(t.content, schema.Particle):
        content = _ours_particle(t.content)
    elif isinstance(t.content, Datatype):
        content = t.content.label
    else:
        content = None
    return {"attributes": attrs, "content": content, "mixed": t.mixed}


@pytest.fixture(scope="module")
def xsd() -> Xsd:
    xsd_dir = xsd_dir_or_skip()
    return Xsd(derive_names.schema_files(xsd_dir))


def _strip_unsupported(ours: Any, theirs: Any) -> Any:
    """Where schema.py names an element without its type (outside the subset: KeyInfo, Object), compare
    everything but the type."""
    if isinstance(ours, tuple) and ours and ours[0] == "el" and ours[2] is None:
        return (theirs[0], theirs[1], None, *theirs[3:]) if isinstance(theirs, tuple) and theirs[:1] == ("el",) else theirs
    if isinstance(ours, tuple) and ours and ours[0] in ("sequence", "choice") and isinstance(theirs, tuple) \
            and theirs[:1] == ours[:1] and len(ours[3]) == len(theirs[3]):
        return (*theirs[:3], tuple(_strip_unsupported(o, t) for o, t in zip(ours[3], theirs[3], strict=True)))
    return theirs


def _flat(particle: Any) -> Any:
    """A sequence or choice occurring exactly once with one particle is that particle: the same grammar
    (EXI 1.0 §8.5.4.1.8/9 concatenate one grammar). schema.py writes BodyType's lone particle so."""
    if isinstance(particle, tuple) and particle[:1] in (("sequence",), ("choice",)):
        kids = tuple(_flat(k) for k in particle[3])
        if particle[1:3] == (1, 1) and len(kids) == 1:
            return kids[0]
        return (*particle[:3], kids)
    return particle


# The ISO 15118-2 declarations (schema.py also registers the -20 CommonMessages ones of schema20.py under
# "20:" names, which the -20 XSDs describe, not these).
ISO2_TYPES = {n: t for n, t in schema.TYPES.items() if not n.startswith("20:")}


@pytest.mark.parametrize("name", sorted(n for n, t in ISO2_TYPES.items() if isinstance(t, schema.ComplexType)))
def test_complex_type_matches_the_xsd(xsd: Xsd, name: str) -> None:
    ours = _ours_complex(schema.TYPES[name])  # type: ignore[arg-type]
    if name == "#V2G_Message":  # the anonymous type of the global element V2G_Message
        node, ctx = xsd.elements[("V2G_Message", "urn:iso:15118:2:2013:MsgDef")]
        theirs = xsd.complex(node.find(XS + "complexType"), ctx)  # type: ignore[arg-type]
    else:
        node, ctx = xsd.types[name]
        theirs = xsd.complex(node, ctx)
    ours["content"], theirs["content"] = _flat(ours["content"]), _flat(theirs["content"])
    theirs["content"] = _strip_unsupported(ours["content"], theirs["content"])
    assert ours == theirs


def test_body_element_members_are_the_xsds(xsd: Xsd) -> None:
    """BodyType's substitution group: every member the XSDs declare, the four supported ones typed."""
    body = schema.TYPES["BodyType"]
    assert isinstance(body, schema.ComplexType) and isinstance(body.content, schema.Particle)
    group = body.content.term
    assert isinstance(group, schema.SubstitutionGroup)
    for member in group.members:
        node, ctx = xsd.elements[member.qname]
        if member.type_name is not None:
            assert member.type_name == xsd.type_name(node.get("type", ""), ctx)
    assert sum(m.type_name is not None for m in group.members) == 4


@pytest.mark.parametrize("name", sorted(n for n, t in ISO2_TYPES.items()
                                        if isinstance(t, schema.SimpleType) and not n.startswith("xs:")))
def test_simple_type_facets_match_the_xsd(xsd: Xsd, name: str) -> None:
    t = schema.TYPES[name]
    assert isinstance(t, schema.SimpleType)
    f = xsd.facets(name)
    d = t.datatype
    if isinstance(d, EnumType):
        assert f["base"] == "xs:string" and tuple(f["enumeration"]) == d.values
    elif isinstance(d, BinaryType):
        assert f["base"] in ("xs:hexBinary", "xs:base64Binary")
        assert (d.min_length, d.max_length) == (f.get("minLength", f.get("length", 0)),
                                                f.get("maxLength", f.get("length")))
    elif isinstance(d, StringType):
        assert f["base"] == "xs:string"
        assert (d.min_length, d.max_length) == (f.get("minLength", f.get("length", 0)),
                                                f.get("maxLength", f.get("length")))
    elif isinstance(d, IntegerType):
        assert f["base"] == "xs:integer"
        assert (d.minimum, d.maximum) == (f.get("minInclusive"), f.get("maxInclusive"))
    else:
        raise AssertionError(f"{name}: {d!r}")


def test_every_type_schema_py_names_is_declared(xsd: Xsd) -> None:
    """Every type name schema.py refers to is one of its own definitions and exists in the XSDs (or is
    a built-in)."""
    for name in ISO2_TYPES:
        assert name.startswith(("xs:", "#")) or name in xsd.types, name
