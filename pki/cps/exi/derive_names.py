"""Developer tool: regenerate ``_names.py`` from a local copy of the ISO 15118-2 XSD files.

The ISO schema files are not part of this repository (their header names ISO as the source and grants no
licence), so the codec carries only the *names* the EXI grammars need, extracted by this script:

* every element qname declared in the schema set (global and local), sorted by local-name then uri —
  the F0..Fn-1 of the schema-informed fragment grammar (EXI 1.0 §8.5.2) and element fragment grammar
  (§8.5.3);
* every attribute qname declared (A0..An-1 of §8.5.3);
* every global element qname (G0..Gn-1 of the document grammar, §8.5.1);
* the members of the ``BodyElement`` substitution group (§8.5.4.1.6);
* the qnames declared more than once with different type names or {nillable} (these use the relaxed
  element fragment grammar inside fragments, §8.5.3 — in ISO 15118-2 that is ``eMAID``).

ISO 15118-20 (#26): ``python pki/cps/exi/derive_names.py --iso20 DIR20 > pki/cps/exi/_names20.py`` writes the
same lists for V2G_CI_CommonMessages.xsd and what it imports (Josev's ``iso15118/shared/schemas/iso15118_20``,
whose xmldsig-core-schema.xsd lies one directory up).

Usage: ``python pki/cps/exi/derive_names.py DIR > pki/cps/exi/_names.py`` (run as a script: it needs only
the standard library and must not import the package whose _names.py it rewrites), where DIR holds
V2G_CI_MsgDef.xsd, V2G_CI_MsgHeader.xsd, V2G_CI_MsgBody.xsd and V2G_CI_MsgDataTypes.xsd, and
xmldsig-core-schema.xsd is where their imports' schemaLocation says (``../`` in Josev's and RISE-V2G's
copies) or in DIR too. Josev's PyPI package (``iso15118``, installed by scripts/peers.sh) carries them in
``iso15118/shared/schemas/iso15118_2``. No network access; standard library only.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

XS = "{http://www.w3.org/2001/XMLSchema}"
MSGDEF_FILES = (
    "V2G_CI_MsgDef.xsd",
    "V2G_CI_MsgHeader.xsd",
    "V2G_CI_MsgBody.xsd",
    "V2G_CI_MsgDataTypes.xsd",
    "xmldsig-core-schema.xsd",
)
XMLDSIG_FILES = ("xmldsig-core-schema.xsd",)

ISO20_FILES = ("V2G_CI_CommonMessages.xsd", "V2G_CI_CommonTypes.xsd", "xmldsig-core-schema.xsd")

NS_ALIASES = {
    "urn:iso:std:iso:15118:-20:CommonMessages": "NS20_CM",
    "urn:iso:std:iso:15118:-20:CommonTypes": "NS20_CT",
    "urn:iso:15118:2:2013:MsgDef": "NS_DEF",
    "urn:iso:15118:2:2013:MsgHeader": "NS_HEADER",
    "urn:iso:15118:2:2013:MsgBody": "NS_BODY",
    "urn:iso:15118:2:2013:MsgDataTypes": "NS_TYPES",
    "http://www.w3.org/2000/09/xmldsig#": "NS_DSIG",
    "": "NS_NONE",
}

Name = tuple[str, str]


def namespace_prefixes(path: Path) -> dict[str, str]:
    return {prefix: uri for _event, (prefix, uri) in ET.iterparse(path, events=["start-ns"])}


def collect(paths: list[Path]) -> dict[str, object]:
    decls: dict[Name, set[tuple[object, str]]] = defaultdict(set)
    attributes: set[Name] = set()
    global_elements: list[Name] = []
    substitution: dict[Name, list[Name]] = defaultdict(list)
    for path in paths:
        prefixes = namespace_prefixes(path)
        root = ET.parse(path).getroot()
        tns = root.get("targetNamespace", "")
        element_form = root.get("elementFormDefault", "unqualified")
        attribute_form = root.get("attributeFormDefault", "unqualified")

        def resolve(value: str, prefixes: dict[str, str] = prefixes) -> Name:
            prefix, _, local = value.rpartition(":")
            return (local, prefixes.get(prefix, ""))

        for parent in root.iter():
            for child in parent:
                name = child.get("name")
                if not name:
                    continue
                is_global = parent is root
                if child.tag == XS + "element":
                    form = child.get("form") or element_form
                    qname = (name, tns if is_global or form == "qualified" else "")
                    type_name: object = resolve(child.get("type", "")) if child.get("type") else ("#anon", id(child))
                    decls[qname].add((type_name, child.get("nillable", "false")))
                    if is_global:
                        global_elements.append(qname)
                    if child.get("substitutionGroup"):
                        substitution[resolve(child.get("substitutionGroup", ""))].append(qname)
                elif child.tag == XS + "attribute":
                    form = child.get("form") or attribute_form
                    attributes.add((name, tns if is_global or form == "qualified" else ""))
    return {
        "elements": sorted(decls),
        "attributes": sorted(attributes),
        "globals": sorted(global_elements),
        "ambiguous": sorted(q for q, d in decls.items() if len(d) > 1),
        "substitution": {head: sorted(members) for head, members in substitution.items()},
    }


def _tuple(names: list[Name]) -> str:
    """A tuple literal laid out the way ``ruff format`` lays it out (so the output needs no reformatting)."""
    items = [f'("{local}", {NS_ALIASES[uri]})' for local, uri in names]
    if len(items) <= 1:
        return f"({items[0]},)" if items else "()"
    return "(\n" + "".join(f"    {item},\n" for item in items) + ")"


def schema_files(xsd_dir: Path, expected: tuple[str, ...] = MSGDEF_FILES) -> dict[str, Path]:
    """V2G_CI_MsgDef.xsd in ``xsd_dir`` and every schema it imports or includes, transitively, each found by
    its ``schemaLocation`` relative to the file that names it (XML Schema 1.0 §4.2.3). Josev's and
    RISE-V2G's copies keep xmldsig-core-schema.xsd one directory up (``../``); a flat directory works too.
    Raises SystemExit when the set is not the five files this script expects."""
    found: dict[str, Path] = {}
    todo = [xsd_dir / expected[0]]
    while todo:
        path = todo.pop()
        if not path.exists() and (xsd_dir / path.name).exists():
            path = xsd_dir / path.name  # a flat copy: every file beside V2G_CI_MsgDef.xsd
        elif not path.exists() and (xsd_dir.parent / path.name).exists():
            path = xsd_dir.parent / path.name  # Josev's -20 copy: xmldsig one directory up, named without ../
        if path.name in found:
            continue
        if not path.exists():
            raise SystemExit(f"{xsd_dir}: {path.name} is missing (looked for {path})")
        found[path.name] = path
        for el in ET.parse(path).getroot():
            location = el.get("schemaLocation")
            if el.tag in (XS + "import", XS + "include") and location:
                todo.append(path.parent / location)
    if set(found) != set(expected):
        raise SystemExit(f"{xsd_dir}: expected the schema set {sorted(expected)}, found {sorted(found)}")
    return found


def render(xsd_dir: Path) -> str:
    files = schema_files(xsd_dir)
    msgdef = collect([files[f] for f in MSGDEF_FILES])
    dsig = collect([files[f] for f in XMLDSIG_FILES])
    body_head = ("BodyElement", "urn:iso:15118:2:2013:MsgBody")
    body = sorted([body_head, *msgdef["substitution"][body_head]])  # type: ignore[index]
    out = [
        '"""GENERATED by pki/cps/exi/derive_names.py from the ISO 15118-2 (2013) and W3C xmldsig XSDs: do not edit.',
        "",
        "Qname lists the EXI grammars need (see derive_names.py for what each one is). Each tuple is",
        "(local-name, namespace uri), sorted by local-name then uri as EXI 1.0 §8.5 requires.",
        '"""',
        "",
        'NS_DEF = "urn:iso:15118:2:2013:MsgDef"',
        'NS_HEADER = "urn:iso:15118:2:2013:MsgHeader"',
        'NS_BODY = "urn:iso:15118:2:2013:MsgBody"',
        'NS_TYPES = "urn:iso:15118:2:2013:MsgDataTypes"',
        'NS_DSIG = "http://www.w3.org/2000/09/xmldsig#"',
        'NS_NONE = ""',
        "",
    ]
    for label, data in (("MSGDEF", msgdef), ("XMLDSIG", dsig)):
        for key, suffix in (
            ("elements", "ELEMENTS"),
            ("attributes", "ATTRIBUTES"),
            ("globals", "GLOBAL_ELEMENTS"),
            ("ambiguous", "AMBIGUOUS_ELEMENTS"),
        ):
            out.append(f"{label}_{suffix}: tuple[tuple[str, str], ...] = {_tuple(data[key])}")  # type: ignore[arg-type]
            out.append("")
    out.append(f"BODY_ELEMENTS: tuple[tuple[str, str], ...] = {_tuple(body)}")
    out.append("")
    return "\n".join(out)


def render20(xsd_dir: Path) -> str:
    """``_names20.py``: the same lists for the ISO 15118-20 CommonMessages schema set (V2G_CI_CommonMessages.xsd,
    the V2G_CI_CommonTypes.xsd it imports and the xmldsig-core-schema.xsd that one imports). No substitution
    groups there."""
    files = schema_files(xsd_dir, ISO20_FILES)
    cm = collect([files[f] for f in ISO20_FILES])
    out = [
        '"""GENERATED by pki/cps/exi/derive_names.py --iso20 from the ISO 15118-20 CommonMessages XSDs: do not edit.',
        "",
        "Qname lists the EXI grammars of V2G_CI_CommonMessages.xsd (with V2G_CI_CommonTypes.xsd and the W3C xmldsig",
        "schema it imports) need. Each tuple is (local-name, namespace uri), sorted by local-name then uri.",
        '"""',
        "",
        'NS20_CM = "urn:iso:std:iso:15118:-20:CommonMessages"',
        'NS20_CT = "urn:iso:std:iso:15118:-20:CommonTypes"',
        'NS_DSIG = "http://www.w3.org/2000/09/xmldsig#"',
        'NS_NONE = ""',
        "",
    ]
    for key, suffix in (("elements", "ELEMENTS"), ("attributes", "ATTRIBUTES"), ("globals", "GLOBAL_ELEMENTS"),
                        ("ambiguous", "AMBIGUOUS_ELEMENTS")):
        out.append(f"CM20_{suffix}: tuple[tuple[str, str], ...] = {_tuple(cm[key])}")  # type: ignore[arg-type]
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--iso20":
        sys.stdout.write(render20(Path(argv[2])))
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(render(Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
