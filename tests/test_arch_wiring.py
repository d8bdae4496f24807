"""The composition root (#23 item 1): one place connects the parts, through explicit observers.

(a) No import cycle among pki/, hsm/, api/, workers/, counting imports inside functions (and under
    TYPE_CHECKING), and no ``importlib.import_module`` of one of our packages by a string literal.
(b) No module patches a collaborator: no ``setattr(...)`` on an engine or key store, no assignment of a
    function onto another object's attribute (``ks.sign_raw = ...``).
(c) The engine's observers are exactly pki/wiring.py's documented list, in order; in-transaction
    observers run inside the transaction (one that raises rolls the change back), after-commit ones after.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from pki.context import Context
from pki.cps.service import CpsCacheOnRevocation
from pki.metrics import IssuanceCounter, RevocationCounter
from pki.observers import Issued
from pki.outbox import OutboxOnIssuance, OutboxOnRevocation
from pki.store.models import Certificate
from pki.wiring import CrlOnRevocation, OcspOnIssuance, OcspOnRevocation
from tests.conftest import csr_pem

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pki", "hsm", "api", "workers")

# -- (a) import graph ---------------------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(module: str, is_package: bool, tree: ast.AST) -> list[str]:
    """Every module name an import statement anywhere in ``tree`` names (functions and TYPE_CHECKING
    blocks included): ``from X import Y`` names X and X.Y (Y may be a submodule)."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append(target)
            out += [f"{target}.{a.name}" for a in node.names]
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module → the modules of ``sources`` it imports."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for m, (text, is_package) in sources.items():
        for target in imported_names(m, is_package, ast.parse(text)):
            if target in sources and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def string_imports(text: str) -> list[str]:
    """``importlib.import_module(...)`` / ``__import__(...)`` calls naming one of our packages by a string
    literal, or by any expression (a variable can hold one of our names: ``import_module(modname)``)."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
                and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
                in ("import_module", "__import__") and node.args):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            if arg.value.split(".")[0] in PACKAGES:
                out.append(arg.value)
        else:
            out.append(ast.unparse(arg))
    return out


def our_sources() -> dict[str, tuple[str, bool]]:
    out: dict[str, tuple[str, bool]] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            out[module_name(path, REPO)] = (path.read_text(), path.name == "__init__.py")
    return out


# Cycles not broken yet (sorted module lists → why). The list only shrinks: a listed cycle that is gone
# fails the test too, so whoever breaks it also removes it here.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}  # none left
KNOWN_PATCHES: dict[str, str] = {}  # module → why (none left; the list only shrinks)


def test_no_import_cycles() -> None:
    found = {tuple(c) for c in cycles(import_graph(our_sources()))}
    new = found - set(KNOWN_CYCLES)
    assert not new, f"import cycles (imports inside functions count): {sorted(new)}"
    gone = set(KNOWN_CYCLES) - found
    assert not gone, f"broken cycles still listed in KNOWN_CYCLES: remove them: {sorted(gone)}"


# Empty since api/fastlane.py went (#23 item 3 dropped the positional fast lane); an entry needs a reason.
KNOWN_STRING_IMPORTS: dict[str, str] = {}


def test_no_string_imports_of_our_modules() -> None:
    bad = {m: s for m, (text, _) in our_sources().items()
           if (s := string_imports(text)) and m not in KNOWN_STRING_IMPORTS}
    assert not bad, f"importlib.import_module naming our modules by string: import them instead: {bad}"


def test_the_cycle_detector_finds_cycles() -> None:
    """Self-test on a synthetic package: a function-level import closing a cycle, a TYPE_CHECKING one, a
    submodule importing its package, and a string import."""
    sources = {
        "p.a": ("from p.b import f\n", False),
        "p.b": ("def f():\n    from p.c import g\n", False),
        "p.c": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import x\n", False),
        "p.d": ("import os\n", False),
        "q": ("from .r import h\n", True),
        "q.r": ("from . import s\n", False),
        "q.s": ("", False),
    }
    assert cycles(import_graph(sources)) == [["p.a", "p.b", "p.c"], ["q", "q.r"]]
    assert cycles(import_graph({k: v for k, v in sources.items() if k != "p.c"})) == [["q", "q.r"]]
    assert string_imports("import importlib\nimportlib.import_module('api.fastlane')\n") == ["api.fastlane"]
    assert string_imports("import importlib\nimportlib.import_module('json')\n") == []
    assert string_imports("from importlib import import_module\nfor n in NAMES:\n    import_module(n)\n") == ["n"]


# -- (b) no patching of collaborators ----------------------------------------------------------------------

_COLLABORATOR = ("engine", "keystore", "ks", "store", "signer", "responder", "ctx")


def patches(text: str) -> list[str]:
    """``setattr(x, ...)`` where x names an engine/key store/context, and ``obj.attr = <function>`` where
    the function is a lambda or a function defined in the module (a method assigned onto a collaborator)."""
    tree = ast.parse(text)
    funcs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            target = ast.unparse(node.args[0])
            if any(c in target.lower() for c in _COLLABORATOR):
                out.append(f"line {node.lineno}: setattr({target}, ...)")
        if isinstance(node, ast.Assign):
            value = node.value
            is_func = isinstance(value, ast.Lambda) or (isinstance(value, ast.Name) and value.id in funcs)
            for t in node.targets:
                if is_func and isinstance(t, ast.Attribute) and not (isinstance(t.value, ast.Name)
                                                                     and t.value.id in ("self", "cls")):
                    out.append(f"line {node.lineno}: {ast.unparse(t)} = {ast.unparse(value)[:40]}")
    return out


def test_no_module_patches_a_collaborator() -> None:
    found = {m: p for m, (text, _) in our_sources().items() if (p := patches(text))}
    bad = {m: p for m, p in found.items() if m not in KNOWN_PATCHES}
    assert not bad, f"collaborators patched (connect them in pki/wiring.py instead): {bad}"
    gone = set(KNOWN_PATCHES) - set(found)
    assert not gone, f"no longer patching: remove from KNOWN_PATCHES: {sorted(gone)}"


def test_the_patch_detector_finds_patches() -> None:
    src = ("def refuse(h):\n    raise RuntimeError\n"
           "def f(ctx, ks, inner):\n"
           "    setattr(ctx.engine, 'ca_signer', refuse)\n"
           "    ks.sign_raw = lambda *a: inner(*a)\n"
           "    ctx.engine.ca_signer = refuse\n"
           "    self_like = 1\n")
    found = patches(src)
    assert len(found) == 3, found
    assert patches("class A:\n    def __init__(self, f):\n        self.f = lambda: 1\n"
                   "def g(row, k, v):\n    setattr(row, k, v)\n") == []


# -- (c) observer wiring -------------------------------------------------------------------------------------

ISSUANCE_ORDER = [OcspOnIssuance, OutboxOnIssuance, IssuanceCounter]
REVOCATION_ORDER = [OcspOnRevocation, CrlOnRevocation, OutboxOnRevocation, CpsCacheOnRevocation, RevocationCounter]


def test_the_wired_engines_observers_are_the_documented_list(ctx: Context) -> None:
    assert [type(o) for o in ctx.engine.issuance_observers] == ISSUANCE_ORDER
    assert [type(o) for o in ctx.engine.revocation_observers] == REVOCATION_ORDER
    assert isinstance(ctx.engine.issuance_observers, tuple)  # fixed at construction, not a list to append to
    # The lifecycle's engine is observed by the very same tuples (not lists aliased after the fact).
    assert ctx.lifecycle.engine.issuance_observers is ctx.engine.issuance_observers
    assert ctx.lifecycle.engine.revocation_observers is ctx.engine.revocation_observers
    # pki/wiring.py documents each, in this order, with a comment.
    text = (REPO / "pki" / "wiring.py").read_text()
    for order in (ISSUANCE_ORDER, REVOCATION_ORDER):
        positions = [text.index(f"        {cls.__name__}(") for cls in order]
        assert positions == sorted(positions)


class Recorder:
    def __init__(self, log: list[tuple[str, Any]], db_check: Any, fail: bool = False) -> None:
        self.log, self.db_check, self.fail = log, db_check, fail

    def in_transaction(self, session: Session, item: Any) -> None:
        # Inside the transaction: the change is visible to this session, not yet committed.
        self.log.append(("in_transaction", self.db_check(session, item)))
        if self.fail:
            raise RuntimeError("observer refuses")

    def after_commit(self, item: Any) -> None:
        self.log.append(("after_commit", item))


def _csr(cn: str) -> str:
    return csr_pem(cn, o="Wiring", dc="CPO")


def _count(ctx: Context, serial: str) -> int:
    # Through the autocommit engine: a plain read, which SQLite allows beside the open write transaction.
    with Session(ctx.db.autocommit) as s:
        return len(list(s.exec(select(Certificate).where(Certificate.serial == serial))))


def test_issuance_observers_run_inside_then_after_the_transaction(ctx: Context) -> None:
    import secrets

    log: list[tuple[str, Any]] = []

    def rows_seen(session: Session, issued: list[Issued]) -> int:
        # Inside the issuing transaction: nothing committed yet, as another connection sees it.
        assert session.in_transaction()
        return _count(ctx, issued[0].serial)

    engine = ctx.engine
    saved = engine.issuance_observers
    engine.issuance_observers = (*saved, Recorder(log, rows_seen))
    try:
        issued = engine.issue_from_csr("secc", _csr(f"DE*WIR*E{secrets.token_hex(3).upper()}"), actor="test")
    finally:
        engine.issuance_observers = saved
    assert log == [("in_transaction", 0), ("after_commit", [issued])]  # not committed inside, then committed
    assert _count(ctx, issued.serial) == 1

    # An in-transaction observer that raises rolls the issuance back: no certificate row, no after-commit.
    log.clear()
    serials: list[str] = []

    def remember(session: Session, issued: list[Issued]) -> int:
        serials.append(issued[0].serial)
        return rows_seen(session, issued)

    engine.issuance_observers = (*saved, Recorder(log, remember, fail=True))
    try:
        with pytest.raises(RuntimeError, match="observer refuses"):
            engine.issue_from_csr("secc", _csr(f"DE*WIR*E{secrets.token_hex(3).upper()}"), actor="test")
    finally:
        engine.issuance_observers = saved
    assert log == [("in_transaction", 0)]
    assert serials and _count(ctx, serials[0]) == 0


def test_revocation_observers_run_inside_then_after_the_transaction(ctx: Context) -> None:
    import secrets

    engine = ctx.engine
    log: list[tuple[str, Any]] = []

    def status_seen(session: Session, cert: Certificate) -> str:
        row = session.exec(select(Certificate).where(Certificate.id == cert.id)).one()
        return row.status

    def committed_status(serial: str) -> str:
        with ctx.db.session() as s:
            return s.exec(select(Certificate).where(Certificate.serial == serial)).one().status

    saved = engine.revocation_observers
    a = engine.issue_from_csr("secc", _csr(f"DE*WIR*E{secrets.token_hex(3).upper()}"), actor="test")
    engine.revocation_observers = (*saved, Recorder(log, status_seen, fail=True))
    try:
        with pytest.raises(RuntimeError, match="observer refuses"):
            engine.revoke(a.serial, "keyCompromise", issuer=a.issuer, actor="test")
    finally:
        engine.revocation_observers = saved
    assert log == [("in_transaction", "revoked")]  # seen inside the transaction...
    assert committed_status(a.serial) == "valid"  # ...and rolled back with it

    log.clear()
    engine.revocation_observers = (*saved, Recorder(log, status_seen))
    try:
        cert = engine.revoke(a.serial, "keyCompromise", issuer=a.issuer, actor="test")
    finally:
        engine.revocation_observers = saved
    assert log == [("in_transaction", "revoked"), ("after_commit", cert)]
    assert committed_status(a.serial) == "revoked"
