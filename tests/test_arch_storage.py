"""The storage seam (#23 item 2): SQL lives in pki/store only.

No module in pki/ (outside pki/store), api/, hsm/ or workers/ imports SQLAlchemy, SQLModel, Alembic,
sqlite3 or a PostgreSQL driver — at module level or inside a function. They call the repositories in
pki/store instead, as Boulder's CA and RA call its storage authority.

There are no exceptions: the allow-list of modules still to convert, which could only shrink, emptied when
pki/contracts.py (the last, the contract-installation hot path) moved its statements to
pki/store/contracts.py (#23 item 2), and was removed with it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pki", "api", "hsm", "workers")
FORBIDDEN = ("sqlalchemy", "sqlmodel", "alembic", "sqlite3", "psycopg", "psycopg2", "psycopg_pool", "asyncpg")

def _is_forbidden(name: str) -> bool:
    return name.split(".", 1)[0] in FORBIDDEN


def forbidden_imports(source: str) -> list[str]:
    """Every database library a module imports, wherever the import statement is (functions included)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_forbidden(node.module):
            found.append(node.module)
    return found


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("pki", "store"):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def offenders() -> dict[str, list[str]]:
    return {name: found for name, path in _modules().items()
            if (found := forbidden_imports(path.read_text(encoding="utf-8")))}


def test_no_sql_outside_pki_store() -> None:
    bad = offenders()
    assert not bad, f"database imports outside pki/store (use a repository in pki/store): {bad}"


def test_check_finds_a_planted_import() -> None:
    planted = (
        "import os\n"
        "def f():\n"
        "    from sqlalchemy import func\n"
        "    import sqlite3, json\n"
        "    import psycopg.rows\n"
        "from sqlmodel import select\n"
        "from .sqlalchemy import x  # a relative module of that name is ours, not the library\n"
        "import sqlalchemy_utils_not_ours as y\n"
    )
    assert sorted(forbidden_imports(planted)) == ["psycopg.rows", "sqlalchemy", "sqlite3", "sqlmodel"]
    assert forbidden_imports("import json\nfrom pki.store import Database\n") == []
