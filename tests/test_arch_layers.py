"""The layers import downwards only (#23): hsm/ (key stores) knows nothing of pki/, and pki/ (the CA) nothing of
api/ or workers/ — except the CLI entry point, which mounts `serve` and `worker` as sub-commands.

Imports inside functions count: a function-level import is a dependency all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# package -> the top-level packages it must not import
FORBIDDEN = {"hsm": {"pki", "api", "workers"}, "pki": {"api", "workers"}}
ENTRY_POINTS = {"pki/cli.py"}  # `v2gpki serve` / `v2gpki worker` live in api/ and workers/


def upward_imports(source: str, package: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in FORBIDDEN[package]]
    return found


def test_layers_import_downwards_only() -> None:
    bad = {}
    for package in FORBIDDEN:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ENTRY_POINTS:
                continue
            hits = upward_imports(path.read_text(), package)
            if hits:
                bad[rel] = hits
    assert not bad, bad


def test_the_check_finds_an_upward_import() -> None:
    planted = "def f():\n    from pki.config import current\n    return current()\n"
    assert upward_imports(planted, "hsm") == ["line 2: pki.config"]
    assert upward_imports("import api.app\n", "pki") == ["line 1: api.app"]
    assert upward_imports("from hsm.keystore import KeyStore\n", "pki") == []
