"""Shared fixtures: a real SoftHSM2 token per test session, SQLite and PostgreSQL databases, and a
fully initialised hierarchy per backend (built once per session: `v2gpki init` takes seconds).

PostgreSQL comes from V2GPKI_TEST_PG_ADMIN_URL (scripts/services.sh starts it on loopback); each session
creates its own database and drops it afterwards. With V2GPKI_TEST_REQUIRE_PG=1 (the README's test
command) a missing PostgreSQL is a failure, not a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsm.token import init_softhsm_token
from pki.config import Settings
from pki.context import Context, build_context
from pki.hierarchy import init_hierarchy

TEST_PIN = "test-user-pin-1234"
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Pytest's tmp dirs are per-session; the SoftHSM token lives in one of them.
    os.environ.setdefault("V2GPKI_PKILINT", "every")


@pytest.fixture(scope="session")
def token_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("softhsm")
    return root


def make_token(token_root: Path, label: str) -> None:
    init_softhsm_token(token_root, label, pin=TEST_PIN)


def pg_admin_url() -> str | None:
    return os.environ.get("V2GPKI_TEST_PG_ADMIN_URL")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    admin = pg_admin_url()
    if not admin:
        if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
            pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
        pytest.skip("no PostgreSQL (set V2GPKI_TEST_PG_ADMIN_URL or run scripts/test.sh)")
    import psycopg

    name = f"v2gpki_test_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(home: Path, token_root: Path, label: str, db_url: str | None = None, **kw: object) -> Settings:
    os.environ["SOFTHSM2_CONF"] = str(token_root / "softhsm2.conf")
    return Settings(
        home=home,
        database_url=db_url,
        token_label=label,
        hsm_pin=TEST_PIN,  # type: ignore[arg-type]
        public_url="http://127.0.0.1:8000",
        pkilint="every",
        **kw,  # type: ignore[arg-type]
    )


def _initialised(tmp_path_factory: pytest.TempPathFactory, token_root: Path, label: str,
                 db_url: str | None) -> Context:
    make_token(token_root, label)
    home = tmp_path_factory.mktemp(label)
    ctx = build_context(make_settings(home, token_root, label, db_url))
    init_hierarchy(ctx.engine, ctx.hierarchy())
    return ctx


@pytest.fixture(scope="session")
def sqlite_ctx(tmp_path_factory: pytest.TempPathFactory, token_root: Path) -> Context:
    return _initialised(tmp_path_factory, token_root, "t-sqlite", None)


@pytest.fixture(scope="session")
def pg_ctx(tmp_path_factory: pytest.TempPathFactory, token_root: Path, pg_url: str) -> Context:
    return _initialised(tmp_path_factory, token_root, "t-pg", pg_url)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def ctx(request: pytest.FixtureRequest) -> Context:
    """An initialised context, once per database backend."""
    return request.getfixturevalue(f"{request.param}_ctx" if request.param == "sqlite" else "pg_ctx")


# -- helpers -----------------------------------------------------------------------------------------


def csr_pem(cn: str, *, o: str | None = "Test Org", c: str | None = "DE", dc: str | None = None,
            key: object | None = None) -> bytes:
    from cryptography import x509

    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if o:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o))
    if c:
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, c))
    if dc:
        attrs.append(x509.NameAttribute(NameOID.DOMAIN_COMPONENT, dc))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    from cryptography.hazmat.primitives.asymmetric import ed448

    algo = None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]
