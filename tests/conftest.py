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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import settings as hypothesis_settings

from hsm.token import init_softhsm_token
from pki.config import Settings
from pki.context import Context
from pki.hierarchy import init_hierarchy
from pki.wiring import build_context

TEST_PIN = "test-user-pin-1234"
REPO = Path(__file__).resolve().parent.parent


def need_peer(msg: str) -> NoReturn:
    """A test that needs an independent peer (scripts/peers.sh: Josev, the ISO XSDs in its package) it
    cannot find: skipped, or failed under CI or V2GPKI_TEST_REQUIRE_PEERS (.ci/run sets it)."""
    if os.environ.get("CI") or os.environ.get("V2GPKI_TEST_REQUIRE_PEERS"):
        pytest.fail(msg)
    pytest.skip(msg)

# Property-based tests explore new random examples on every developer run (that is how a padded OCSP
# serial was found); CI (.ci/run sets V2GPKI_TEST_HYPOTHESIS=ci) runs them derandomized — a fixed seed
# per test — so that its verdict on a commit is reproducible, and prints the blob to replay a failure.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("V2GPKI_TEST_HYPOTHESIS") == "ci":
    hypothesis_settings.load_profile("ci")


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
        # The production default: pkilint on each CA and the first leaf of each shape, later leaves of a
        # shape from the TBS template (pki/tbs.py) — so the suite exercises the path operators run.
        # test_profiles still pkilints every certificate it collects (test_pkilint_cli_reports_no_errors).
        pkilint="shape",
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
            key: object | None = None, extensions: Sequence[object] = ()) -> bytes:
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
    for ext in extensions:  # extensionRequest (PKCS#9), e.g. the -20 X448 Alternate Subject Public Key
        assert isinstance(ext, x509.ExtensionType)
        b = b.add_extension(ext, critical=False)
    from cryptography.hazmat.primitives.asymmetric import ed448

    algo = None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


# -- CLI helpers (test_cli, test_bad_input, test_init_resume) -----------------------------------------

V2GPKI_EXE = str(Path(sys.executable).parent / "v2gpki")


def cli_env(ctx: Context, **extra: str) -> dict[str, str]:
    """Environment that points the real `v2gpki` CLI at an initialised test context (its home, token,
    database), as an operator would: V2GPKI_HOME, SOFTHSM2_CONF, V2GPKI_TOKEN_LABEL, V2GPKI_HSM_PIN,
    V2GPKI_DATABASE_URL."""
    s = ctx.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(
        V2GPKI_HOME=str(s.home_dir),
        SOFTHSM2_CONF=os.environ["SOFTHSM2_CONF"],
        V2GPKI_TOKEN_LABEL=s.token_label,
        V2GPKI_HSM_PIN=TEST_PIN,
        V2GPKI_PUBLIC_URL=s.public_url,
        V2GPKI_PKILINT=s.pkilint,
    )
    if s.database_url:
        env["V2GPKI_DATABASE_URL"] = s.database_url
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `v2gpki ARGS` in a subprocess (real exit code, stdout and stderr)."""
    return subprocess.run([V2GPKI_EXE, *args], env=env, capture_output=True, text=True, input=stdin, timeout=300)


# -- responders (test_ocsp, test_crl, test_ocpp_status) ---------------------------------------------


def openssl_ocsp(work: Path, url: str) -> str:
    """`openssl ocsp` for ``work``/leaf.pem (issuer.pem, untrusted.pem, root.pem beside it) against the
    responder at ``url``: the response must verify with openssl itself; returns openssl's status text."""
    res = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(work / "issuer.pem"), "-cert", str(work / "leaf.pem"),
         "-url", url, "-CAfile", str(work / "root.pem"), "-verify_other", str(work / "untrusted.pem")],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Response verify OK" in res.stderr + res.stdout
    return res.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: object) -> tuple[str, Callable[[], None]]:
    """Run an ASGI app under a real uvicorn server on a free loopback port, in a daemon thread.
    Returns (base URL, stop)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",  # type: ignore[arg-type]
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def responder_url(ctx: Context) -> Iterator[str]:
    """A live HTTP server (uvicorn, loopback) with the OCSP/CRL routes and the OCPP status route, over
    the session's initialised context — what `openssl ocsp -url` and curl talk to."""
    from api.app import create_app

    url, stop = serve_in_thread(create_app(ctx, routers=["api.responders", "api.ocpp.status"]))
    yield url
    stop()


# -- lifecycle workers (tests/test_lifecycle.py, tests/test_workers.py) ----------------------------------

LC_HIERARCHY = """\
organization: Lifecycle Test
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: CPO Sub-CA 1}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: CPO Sub-CA 2}
  - {name: mo-root, profile: mo-root, cn: MO Root CA}
  - {name: mo-sub1, profile: mo-sub1, parent: mo-root, cn: MO Sub-CA 1}
  - {name: mo-sub2, profile: mo-sub2, parent: mo-sub1, cn: MO Sub-CA 2}
  - {name: csms-root, profile: csms-root, cn: CSMS Root CA}
  - {name: cps-sub1, profile: cps-sub1, parent: v2g-root, cn: CPS Sub-CA 1, ocsp_signer: false}
  - {name: cps-sub2, profile: cps-sub2, parent: cps-sub1, cn: CPS Sub-CA 2, ocsp_signer: false}
service_keys:
  - {name: cps-leaf, profile: cps-leaf, issuer: cps-sub2, cn: CPS Leaf}
"""


def own_pg_database(tag: str) -> tuple[str, str] | None:
    """A fresh PostgreSQL database (url, name) for a context of its own, or None without PostgreSQL."""
    admin = pg_admin_url()
    if not admin:
        return None
    import psycopg

    name = f"v2gpki_{tag}_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{admin.rsplit('/', 1)[0]}/{name}", name


def drop_pg_database(name: str) -> None:
    """DROP … WITH (FORCE) terminates the database's other sessions, but a non-superuser may not terminate an
    autovacuum worker (PostgreSQL 15: a backend without a role counts as a superuser's), so a drop right after
    a test wrote many rows fails while autovacuum visits them: wait for the worker and try again."""
    import psycopg

    for attempt in range(60):
        with psycopg.connect(pg_admin_url() or "", autocommit=True) as conn:
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except psycopg.errors.InsufficientPrivilege:
                if attempt == 59:
                    raise
        time.sleep(0.5)


def lifecycle_context(tmp_path_factory: pytest.TempPathFactory, token_root: Path, label: str,
                      db_url: str | None) -> Context:
    """A small initialised hierarchy (V2G, MO, CSMS, CPS) of its own: lifecycle tests roll roots over
    and renew service certificates, which must not disturb the shared `ctx`."""
    make_token(token_root, label)
    home = tmp_path_factory.mktemp(label)
    (home / "hierarchy.yaml").write_text(LC_HIERARCHY)
    c = build_context(make_settings(home, token_root, label, db_url, hierarchy_file=home / "hierarchy.yaml"))
    init_hierarchy(c.engine, c.hierarchy())
    return c


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def lc_ctx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           token_root: Path) -> Iterator[Context]:
    """An initialised lifecycle context of its own, once per database backend."""
    db_url, name = None, None
    if request.param == "postgresql":
        pg = own_pg_database("lc")
        if pg is None:
            if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
                pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
            pytest.skip("no PostgreSQL (set V2GPKI_TEST_PG_ADMIN_URL or run scripts/test.sh)")
        db_url, name = pg
    c = lifecycle_context(tmp_path_factory, token_root, f"t-lc-{request.param}", db_url)
    yield c
    c.db.dispose()
    if name:
        drop_pg_database(name)


# -- tenants with exclusive prefixes (issue #21 item 4) --------------------------------------------------

_PREFIX_SHAPE = {"cpo": "{cc}*{x}", "emsp": "{cc}-{x}", "oem": "{x}"}
_PREFIX_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def org_with_fresh_prefix(ctx: Context, name: str, role: str, *, country: str = "DE",
                          settings: dict[str, object] | None = None) -> str:
    """Create organization ``name`` with a random identifier prefix of its role that no organization of
    the session's database holds yet (prefixes are exclusive per role since issue #21 item 4: a random
    prefix that happens to collide with another module's tenant is refused); returns the prefix."""
    from pki.errors import Conflict
    from pki.orgs import create_org

    for _ in range(50):
        x = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(3))
        prefix = _PREFIX_SHAPE[role].format(cc=country, x=x)
        try:
            create_org(ctx.db, name, role, [prefix], settings=settings)
        except Conflict as exc:
            if "overlaps" in exc.message:
                continue
            raise
        return prefix
    raise RuntimeError("no free prefix after 50 tries")
