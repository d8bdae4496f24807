"""pki/cps/exi/schema20.py is hand-derived from the ISO 15118-20 CommonMessages XSDs: compare it with them (#26).

As tests/test_exi_schema_xsd.py does for ISO 15118-2: every "20:" type schema20.py declares is read back from
V2G_CI_CommonMessages.xsd / V2G_CI_CommonTypes.xsd (the copy in the Josev peer's PyPI package, or
V2G20_XSD_DIR) and compared term by term — attributes (qualified name, type, use), the content model
(sequence/choice nesting, element qnames and type names, minOccurs/maxOccurs; the complexContent extensions of
V2GRequestType / V2GResponseType as the base's sequence followed by the extension's, EXI 1.0 §8.5.4.1.6) and
simple types' facets (length bounds, enumerations). One deviation is deliberate and named: DHPublicKey.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import pki.cps.exi.schema20  # noqa: F401 - registers the "20:" types in schema.TYPES
from pki.cps.exi import schema
from pki.cps.exi.datatypes import BinaryType, EnumType, IntegerType, StringType
from tests.conftest import REPO, need_peer

from .test_exi_schema_xsd import XS, Xsd, _flat, _ours_complex

TYPES20 = {n: t for n, t in schema.TYPES.items() if n.startswith("20:")}

# [V2G20-2489] NOTE 6/7 ("maximum 133 bytes", 57 for X448) and [V2G20-2495] (no padding) against the XSD's
# <xs:length value="133"/>: schema20.DH_PUBLIC_KEY_20 takes 57..133 octets (docs/cps.md).
DEVIATIONS = {"20:dhPublicKeyType": {"xsd": (133, 133), "ours": (57, 133)}}


def _xsd20_dir() -> Path:
    if os.environ.get("V2G20_XSD_DIR"):
        return Path(os.environ["V2G20_XSD_DIR"])
    found = sorted((REPO / ".peers" / "josev").glob("lib/python3*/site-packages/iso15118/shared/schemas"))
    if not found:
        need_peer("no ISO 15118-20 XSDs: set V2G20_XSD_DIR, or install the Josev peer (bash scripts/peers.sh)")
    return found[0] / "iso15118_20"


class Xsd20(Xsd):
    """Xsd, with complexContent extensions of a non-empty base (the -20 messages extend V2GRequestType /
    V2GResponseType, whose Header and ResponseCode come first)."""

    def complex(self, node: ET.Element, ctx: dict[str, Any]) -> dict[str, Any]:
        derived = node.find(XS + "complexContent")
        if derived is None:
            return super().complex(node, ctx)
        ext = derived[0]
        assert ext.tag == XS + "extension"
        base = self.complex(*self.types[self.qname(ext.get("base", ""), ctx)[0]])
        groups = [k for k in ext if k.tag in (XS + "sequence", XS + "choice")]
        own = self.particle(groups[0], ctx) if groups else None
        content = ("sequence", 1, 1, tuple(p for p in (base["content"], own) if p is not None))
        return {"attributes": base["attributes"] + self.attributes(ext, ctx), "content": content, "mixed": False}


@pytest.fixture(scope="module")
def xsd20() -> Xsd20:
    d = _xsd20_dir()
    files = {n: d / n for n in ("V2G_CI_CommonTypes.xsd", "V2G_CI_CommonMessages.xsd")}
    dsig = d.parent / "xmldsig-core-schema.xsd"
    if dsig.exists():
        files["xmldsig-core-schema.xsd"] = dsig
    for p in files.values():
        assert p.exists(), p
    return Xsd20(files)


def _unprefix(value: Any) -> Any:
    """Our "20:" type names are the XSDs' local names."""
    if isinstance(value, str):
        return value.removeprefix("20:")
    if isinstance(value, tuple):
        return tuple(_unprefix(v) for v in value)
    if isinstance(value, list):
        return [_unprefix(v) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(n for n, t in TYPES20.items() if isinstance(t, schema.ComplexType)))
def test_complex_type_matches_the_20_xsd(xsd20: Xsd20, name: str) -> None:
    ours = _ours_complex(schema.TYPES[name])  # type: ignore[arg-type]
    node, ctx = xsd20.types[name.removeprefix("20:")]
    theirs = xsd20.complex(node, ctx)
    ours = {k: _unprefix(v) for k, v in ours.items()}
    ours["content"], theirs["content"] = _flat(ours["content"]), _flat(theirs["content"])
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(n for n, t in TYPES20.items() if isinstance(t, schema.SimpleType)))
def test_simple_type_facets_match_the_20_xsd(xsd20: Xsd20, name: str) -> None:
    t = schema.TYPES[name]
    assert isinstance(t, schema.SimpleType)
    f = xsd20.facets(name.removeprefix("20:"))
    d = t.datatype
    if isinstance(d, EnumType):
        assert f["base"] == "xs:string" and tuple(f["enumeration"]) == d.values
    elif isinstance(d, BinaryType | StringType):
        assert f["base"] in (("xs:string",) if isinstance(d, StringType) else ("xs:hexBinary", "xs:base64Binary"))
        theirs = (f.get("minLength", f.get("length", 0)), f.get("maxLength", f.get("length")))
        if name in DEVIATIONS:
            assert theirs == DEVIATIONS[name]["xsd"] and (d.min_length, d.max_length) == DEVIATIONS[name]["ours"]
        else:
            assert (d.min_length, d.max_length) == theirs
    else:
        raise AssertionError(f"{name}: {d!r}")


def test_builtin_integer_bounds() -> None:
    for name, bits in (("xs:unsignedLong", 64), ("xs:unsignedByte", 8)):
        d = schema.TYPES[name].datatype  # type: ignore[union-attr]
        assert isinstance(d, IntegerType) and (d.minimum, d.maximum) == (0, 2**bits - 1)


def test_every_20_type_is_declared_in_the_xsds(xsd20: Xsd20) -> None:
    for name in TYPES20:
        assert name.removeprefix("20:") in xsd20.types, name
    # and the global elements schema20 decodes are the XSDs' with the same types
    for qname, type_name in pki.cps.exi.schema20.GLOBAL_DECLS.items():
        node, ctx = xsd20.elements[qname]
        assert xsd20.type_name(node.get("type", ""), ctx) == type_name.removeprefix("20:")
