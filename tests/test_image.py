"""The container image, built and run as shipped (#22 item 3), and the set-up steps it relies on.

CI reaches no container registry, so the image is built on a Debian bookworm base made here:
`debootstrap --variant=minbase --include=python3,python3-venv,python3-dev bookworm` imported into Podman as
localhost/v2gpki-base:bookworm (made once, then reused by its tag), and
`podman build --build-arg BASE=localhost/v2gpki-base:bookworm -f deploy/image/Containerfile`. Podman runs
with a containers.conf of this test's own (CONTAINERS_CONF): runc (crun fails in this sandbox), cgroupfs,
and nofile/nproc limits within the hard limits (runc fails with "error setting rlimit" above them).

From that image, with the documented secrets (PIN and console key as files owned by uid 10001, mode 0400,
bind-mounted at /run/secrets/..., as Compose does), the SoftHSM2 token on a named volume, production mode
and PostgreSQL / Redis on the host's loopback (--network=host): `hsm init` refuses the PIN file a
`umask 077` as root leaves, then `hsm init`, `init`, an org and an API key (each a one-shot container), and
`serve`, `ocsp-serve`, `worker`, `beat` as four containers. From the host: /readyz of both HTTP roles, the
CRLs `init` published, an enrollment, `openssl ocsp` good → revoke → revoked, `openssl crl` listing the
serial; the worker's log has no traceback. Containers, the volume and the database are removed afterwards.

In CI (CI or V2GPKI_TEST_REQUIRE_PEERS set) missing podman, runc or debootstrap is a failure; elsewhere a skip.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography import x509

from pki.config import Settings
from pki.context import Context
from pki.crl import latest_meta, load_crl
from pki.errors import ConfigError
from tests.conftest import cli_env, csr_pem, drop_pg_database, free_port, openssl_ocsp, own_pg_database, run_cli

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "deploy" / "image" / "Containerfile"
BASE_TAG = "localhost/v2gpki-base:bookworm"
IMAGE_TAG = "localhost/v2gpki:test"
MIRROR = "http://deb.debian.org/debian"
UID = 10001  # the image's service user (deploy/image/Containerfile)
REQUIRED = bool(os.environ.get("CI") or os.environ.get("V2GPKI_TEST_REQUIRE_PEERS"))
T = TypeVar("T")


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (required in CI: scripts/setup.sh installs podman, buildah, runc, debootstrap)")
    pytest.skip(what)


def until(what: str, fn: Callable[[], T | None], timeout: float = 90.0, every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- set-up steps, without containers ----------------------------------------------------------------------


def test_hsm_init_refuses_a_pin_file_it_cannot_use(tmp_path: Path) -> None:
    """`hsm init` with V2GPKI_HSM_PIN_FILE set reads that file and stops with exit 6 and a message when it is
    missing, unreadable or empty — it never generates a PIN (which would lock the token to a value no other
    process knows). A good file's PIN becomes the token's; no copy is left beside the token."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}
    home = tmp_path / "home"
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "empty").write_text("\n")
    for pin_file, why in ((secret_dir / "absent", "cannot be read"), (secret_dir, "cannot be read"),
                          (secret_dir / "empty", "is empty")):
        env = base | {"V2GPKI_HOME": str(home), "V2GPKI_HSM_PIN_FILE": str(pin_file)}
        done = run_cli(["hsm", "init"], env)
        assert done.returncode == 6, (pin_file, done.stdout, done.stderr)
        assert f"V2GPKI_HSM_PIN_FILE={pin_file}" in done.stderr and why in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert not any((home / "softhsm").glob("tokens/*")), "no token may be created without the PIN"
        assert not (home / "softhsm" / "user.pin").exists()
        # the other entry points refuse it the same way (no fallback to a PIN file beside the token)
        with pytest.raises(ConfigError, match="V2GPKI_HSM_PIN_FILE"):
            Settings(home=home, hsm_pin_file=pin_file, _env_file=None).pin()  # type: ignore[call-arg]

    (secret_dir / "hsm_pin").write_text("a-pin-from-the-secret-1234\n")
    env = base | {"V2GPKI_HOME": str(home), "V2GPKI_HSM_PIN_FILE": str(secret_dir / "hsm_pin")}
    done = run_cli(["hsm", "init"], env)
    assert done.returncode == 0, done.stderr
    assert any((home / "softhsm").glob("tokens/*"))
    assert not (home / "softhsm" / "user.pin").exists(), "the PIN stays in the secret only"
    from hsm.pkcs11 import Pkcs11KeyStore

    os.environ["SOFTHSM2_CONF"], saved = str(home / "softhsm" / "softhsm2.conf"), os.environ.get("SOFTHSM2_CONF")
    try:
        s = Settings(home=home, hsm_pin_file=secret_dir / "hsm_pin", _env_file=None)  # type: ignore[call-arg]
        assert s.pin() == "a-pin-from-the-secret-1234"
        assert Pkcs11KeyStore(s.pkcs11_module, s.token_label, s.pin()).list() == []  # logs in with it  # the token opens with it
    finally:
        if saved is not None:
            os.environ["SOFTHSM2_CONF"] = saved


def test_init_publishes_every_cas_first_crl(ctx: Context, tmp_path: Path) -> None:
    """`v2gpki init` ends with a CRL for every CA (no 15-minute wait for beat's first refresh); a second run
    publishes none (each CA already has a current one)."""
    done = run_cli(["init"], cli_env(ctx))
    assert done.returncode == 0, done.stderr
    cas = list(ctx.engine.cas())
    assert len(cas) > 10
    for h in cas:
        assert latest_meta(ctx.db, h.name) is not None, h.name
        stored = load_crl(ctx.db, h.name)
        assert stored is not None
        crl = x509.load_der_x509_crl(stored.der)
        assert crl.is_signature_valid(h.cert.public_key()), h.name  # type: ignore[arg-type]
        assert crl.issuer == h.cert.subject
    again = run_cli(["init"], cli_env(ctx))
    assert again.returncode == 0, again.stderr
    assert "CRLs published" not in again.stdout, again.stdout


def test_production_refuses_the_repository_placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every secret value the repository publishes in its examples (the Kubernetes Secret example, compose's
    env.example) is refused by production mode wherever it appears: a URL, the PIN file, the console key."""
    import yaml

    from pki.config import KNOWN_PLACEHOLDERS, placeholder_problems

    published = [v for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / "examples" / "secret.yaml").read_text())
                 for v in doc["stringData"].values()]
    for line in (REPO / "deploy" / "compose" / "env.example").read_text().splitlines():
        if line.startswith("POSTGRES_PASSWORD="):
            published.append(line.split("=", 1)[1])
    assert len(published) == 5
    for value in published:
        assert any(p in value for p in KNOWN_PLACEHOLDERS), value
    monkeypatch.delenv("V2GPKI_CONSOLE_SESSION_KEY_FILE", raising=False)
    good = Settings(home=tmp_path, database_url="postgresql://v2gpki:a-real-one@db:5432/v2gpki",
                    broker_url="redis://redis:6379/0", _env_file=None)  # type: ignore[call-arg]
    assert placeholder_problems(good) == []
    db = next(v for v in published if v.startswith("postgresql"))
    bad = Settings(home=tmp_path, database_url=db, broker_url="redis://redis:6379/0",
                   _env_file=None)  # type: ignore[call-arg]
    [problem] = placeholder_problems(bad)
    assert "V2GPKI_DATABASE_URL" in problem and db not in problem  # never echoes the URL
    assert problem in bad.production_problems()
    pin = tmp_path / "pin"
    pin.write_text("REPLACE_ME\n")
    key = tmp_path / "key"
    key.write_text("REPLACE_ME_WITH_32_RANDOM_BYTES_0000")
    monkeypatch.setenv("V2GPKI_CONSOLE_SESSION_KEY_FILE", str(key))
    compose_db = f"postgresql://v2gpki:{published[-1]}@postgres:5432/v2gpki"
    s = Settings(home=tmp_path, database_url=compose_db, hsm_pin_file=pin, _env_file=None)  # type: ignore[call-arg]
    names = " ".join(placeholder_problems(s))
    for name in ("V2GPKI_DATABASE_URL", "V2GPKI_HSM_PIN_FILE", "V2GPKI_CONSOLE_SESSION_KEY_FILE"):
        assert name in names


# -- the image -------------------------------------------------------------------------------------------


@dataclass
class Podman:
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done


def containers_conf(path: Path) -> Path:
    """runc, cgroupfs, file events, and limits no higher than this process' hard limits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    return path


def make_base(podman: Podman, work: Path) -> None:
    """debootstrap a minimal bookworm with Python 3.11 and import it as BASE_TAG (once: cached by tag)."""
    if shutil.which("debootstrap") is None:
        _missing("debootstrap not installed: cannot make the image's base without a registry")
    rootfs = work / "rootfs"
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-dev", "bookworm", str(rootfs),
         MIRROR], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imp = subprocess.run(["podman", "import", "-", BASE_TAG], stdin=tar.stdout, env=podman.env,
                         capture_output=True, text=True, timeout=600)
    tar.wait()
    assert imp.returncode == 0 and tar.returncode == 0, imp.stderr
    shutil.rmtree(rootfs, ignore_errors=True)


def build_context(dest: Path) -> Path:
    """What the Containerfile copies, from the working tree (no .venv, caches or built extensions)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".mypy_cache", ".ruff_cache")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for pkg in ("pki", "hsm", "api", "workers"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=skip)
    (dest / "deploy" / "image").mkdir(parents=True)
    shutil.copy2(REPO / "deploy" / "constraints.txt", dest / "deploy" / "constraints.txt")
    shutil.copy2(CONTAINERFILE, dest / "deploy" / "image" / "Containerfile")
    return dest


def ca_bundle() -> str | None:
    """The host's CA bundle for pip inside the build (a TLS-intercepting proxy's CA is in it), if any."""
    for cand in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if cand and Path(cand).is_file():
            return cand
    return None


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            _missing(f"{tool} not installed")
    if os.geteuid() != 0:
        _missing("the image test runs rootful Podman (as root)")
    conf = containers_conf(tmp_path_factory.mktemp("podman") / "containers.conf")
    p = Podman(env=dict(os.environ, CONTAINERS_CONF=str(conf)))
    t0 = time.monotonic()
    if p("image", "exists", BASE_TAG, check=False).returncode != 0:
        make_base(p, Path(tempfile.mkdtemp(prefix="v2gpki-base-")))
    p.timings["base"] = time.monotonic() - t0
    return p


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    t0 = time.monotonic()
    ctx_dir = build_context(tmp_path_factory.mktemp("build-context"))
    args = ["build", "--network=host", "--build-arg", f"BASE={BASE_TAG}", "-f", "deploy/image/Containerfile",
            "-t", IMAGE_TAG]
    bundle = ca_bundle()
    if bundle:
        args += ["--secret", f"id=pip_cert,src={bundle}"]
    podman(*args, str(ctx_dir), timeout=1200)
    podman.timings["build"] = time.monotonic() - t0
    return IMAGE_TAG


@dataclass
class Deployment:
    """One deployment of the image: its secrets, token volume, database and environment."""
    podman: Podman
    image: str
    secrets_dir: Path
    volume: str
    env: dict[str, str]
    names: list[str] = field(default_factory=list)

    def run_args(self, pin_file: Path | None = None) -> list[str]:
        args = ["--network=host", "-v", f"{self.volume}:/var/lib/v2gpki/softhsm",
                "-v", f"{pin_file or self.secrets_dir / 'hsm_pin'}:/run/secrets/hsm_pin:ro",
                "-v", f"{self.secrets_dir / 'console_session_key'}:/run/secrets/console_session_key:ro",
                "--tmpfs", "/run/v2gpki/metrics:mode=1777"]
        for k, v in self.env.items():
            args += ["-e", f"{k}={v}"]
        return args

    def once(self, *argv: str, pin_file: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A one-shot container (`hsm init`, `init`, `org create`, ...)."""
        return self.podman("run", "--rm", *self.run_args(pin_file), self.image, *argv, check=check)

    def start(self, name: str, *argv: str) -> None:
        cname = f"v2gpki-test-{name}-{secrets.token_hex(3)}"
        self.names.append(cname)
        self.podman("run", "-d", "--name", cname, *self.run_args(), self.image, *argv)

    def logs(self, cname: str) -> str:
        done = self.podman("logs", cname, check=False)
        return done.stdout + done.stderr

    def running(self, cname: str) -> bool:
        done = self.podman("inspect", "-f", "{{.State.Running}}", cname, check=False)
        return done.stdout.strip() == "true"


def write_secret(path: Path, data: bytes, uid: int | None) -> None:
    path.write_bytes(data)
    if uid is not None:
        os.chown(path, uid, 0)
    path.chmod(0o400)


@pytest.fixture
def deployment(podman: Podman, image: str, tmp_path: Path) -> Iterator[Deployment]:
    pg = own_pg_database("image")
    if pg is None:
        pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
    db_url, db_name = pg
    broker = os.environ.get("V2GPKI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15").rsplit("/", 1)[0] + "/12"
    # the documented secrets (deploy/compose/compose.yaml): a 0700 directory, files owned by uid 10001, 0400
    sdir = tmp_path / "secrets"
    sdir.mkdir(mode=0o700)
    write_secret(sdir / "hsm_pin", secrets.token_hex(24).encode(), UID)
    write_secret(sdir / "console_session_key", os.urandom(32), UID)
    volume = f"v2gpki-test-softhsm-{secrets.token_hex(3)}"
    podman("volume", "create", volume)
    env = {
        "V2GPKI_ENV": "production",
        "V2GPKI_PUBLIC_URL": "http://pki.example.com",
        "V2GPKI_TLS_TERMINATION": "proxy",
        "V2GPKI_DATABASE_URL": db_url,
        "V2GPKI_BROKER_URL": broker,
        "V2GPKI_PKCS11_MODULE": "/usr/lib/softhsm/libsofthsm2.so",
        "V2GPKI_TOKEN_LABEL": "v2gpki",
        "V2GPKI_HSM_PIN_FILE": "/run/secrets/hsm_pin",
        "V2GPKI_CONSOLE_SESSION_KEY_FILE": "/run/secrets/console_session_key",
        "V2GPKI_LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": "/run/v2gpki/metrics",
    }
    d = Deployment(podman, image, sdir, volume, env)
    try:
        yield d
    finally:
        for cname in d.names:
            podman("rm", "-f", "-t", "5", cname, check=False)
        podman("volume", "rm", "-f", volume, check=False)
        drop_pg_database(db_name)


def _pem_chain(chain: str) -> list[str]:
    return [c + "-----END CERTIFICATE-----\n" for c in chain.split("-----END CERTIFICATE-----\n") if c.strip()]


def _crl_serials(path: Path, issuer_pem: Path) -> set[int] | None:
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(path), "-noout", "-text",
                           "-CAfile", str(issuer_pem)], capture_output=True, text=True, timeout=30)
    if text.returncode != 0 or "verify OK" not in text.stderr + text.stdout:
        return None
    return {int(x, 16) for x in re.findall(r"Serial Number: ([0-9A-Fa-f]+)", text.stdout)}


def test_image_runs_every_role_with_the_documented_secrets(deployment: Deployment, tmp_path: Path) -> None:
    d, podman = deployment, deployment.podman
    t0 = time.monotonic()

    # -- fail fast: the PIN file `umask 077` as root leaves is unreadable by uid 10001 -------------------
    bad = tmp_path / "root_only_pin"
    write_secret(bad, b"0123456789abcdef\n", None)  # root-owned, 0400: what the old instructions made
    done = d.once("hsm", "init", pin_file=bad, check=False)
    assert done.returncode == 6, done.stdout + done.stderr
    assert "V2GPKI_HSM_PIN_FILE=/run/secrets/hsm_pin cannot be read" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    listing = d.podman("run", "--rm", "-v", f"{d.volume}:/var/lib/v2gpki/softhsm", "--entrypoint", "ls", d.image,
                       "-A", "/var/lib/v2gpki/softhsm")
    assert listing.stdout.strip() == "", f"nothing may be created without the PIN: {listing.stdout}"

    # -- set-up, one-shot containers -----------------------------------------------------------------------
    done = d.once("hsm", "init")
    assert "ready under /var/lib/v2gpki/softhsm/tokens" in done.stdout
    t_init = time.monotonic()
    done = d.once("init")
    podman.timings["init"] = time.monotonic() - t_init
    assert "hierarchies ready" in done.stdout and "CRLs published" in done.stdout, done.stdout
    tag = secrets.token_hex(2).upper()
    org = f"Image CPO {tag}"
    prefix = "DE*" + "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
    d.once("org", "create", org, "--role", "cpo", "--prefix", prefix)
    key = d.once("apikey", "create", "--org", org).stdout.strip().splitlines()[-1]

    # -- the four long-running roles --------------------------------------------------------------------
    api_port, ocsp_port = free_port(), free_port()
    d.start("api", "serve", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "2")
    d.start("ocsp", "ocsp-serve", "--host", "127.0.0.1", "--port", str(ocsp_port), "--workers", "2")
    d.start("worker", "worker", "--concurrency", "2")
    d.start("beat", "beat")
    api, ocsp = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ocsp_port}"

    def ready(base: str) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{base}/readyz", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    for base, cname in ((api, d.names[0]), (ocsp, d.names[1])):
        try:
            checks = until(f"{base}/readyz", lambda b=base: ready(b), timeout=90)["checks"]  # type: ignore[misc]
        except AssertionError:
            raise AssertionError(d.logs(cname)[-4000:]) from None
        assert checks["hsm"] == "ok" and checks["database"] == "ok", checks
    podman.timings["start"] = time.monotonic() - t_init - podman.timings["init"]

    # -- every CA's CRL is there from the start (init published them) ------------------------------------
    r = httpx.get(f"{ocsp}/crl/cpo-sub2.crl", timeout=10)
    assert r.status_code == 200, r.text

    # -- enroll -------------------------------------------------------------------------------------------
    auth = {"Authorization": f"Bearer {key}"}
    evse = f"{prefix}*E{tag}1"
    r = httpx.post(f"{api}/v1/enrollments", headers=auth, timeout=60,
                   json={"csr": csr_pem(evse, o=org, dc="CPO").decode(), "profile": "secc"})
    assert r.status_code == 201, r.text
    cert = r.json()
    serial, issuer = cert["serial"], cert["issuer"]
    chain = _pem_chain(cert["chain"])
    (tmp_path / "leaf.pem").write_text(cert["certificate"])
    (tmp_path / "issuer.pem").write_text(chain[1])
    (tmp_path / "untrusted.pem").write_text("".join(chain[1:]))
    root = httpx.get(f"{api}/v1/truststores/v2g", timeout=10)
    assert root.status_code == 200
    (tmp_path / "root.pem").write_text(root.text)

    # -- OCSP good → revoke → revoked, asked by openssl of the standalone responder ------------------------
    assert f"{tmp_path / 'leaf.pem'}: good" in openssl_ocsp(tmp_path, f"{ocsp}/ocsp")
    r = httpx.post(f"{api}/v1/certificates/{issuer}/{serial}/revoke", headers=auth, timeout=60,
                   json={"reason": "keyCompromise"})
    assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
    out = until("OCSP to say revoked", lambda: (lambda o: o if ": revoked" in o else None)(
        openssl_ocsp(tmp_path, f"{ocsp}/ocsp")), timeout=30)
    assert f"{tmp_path / 'leaf.pem'}: revoked" in out and "keyCompromise" in out

    # -- CRL: parsed and verified by openssl, lists the serial -----------------------------------------------
    def crl_lists_serial() -> bool:
        resp = httpx.get(f"{ocsp}/crl/{issuer}.crl", timeout=10)
        if resp.status_code != 200:
            return False
        (tmp_path / "ca.crl").write_bytes(resp.content)
        listed = _crl_serials(tmp_path / "ca.crl", tmp_path / "issuer.pem")
        return listed is not None and int(serial, 16) in listed

    until("the CRL to list the revoked serial", crl_lists_serial, timeout=60)

    # -- worker and beat stayed up and clean ------------------------------------------------------------------
    for cname in d.names:
        assert d.running(cname), (cname, d.logs(cname)[-4000:])
    worker_log = d.logs(d.names[2])
    assert "ModuleNotFoundError" not in worker_log and "Traceback" not in worker_log, worker_log[-4000:]
    assert "ready" in worker_log.lower(), worker_log[-2000:]
    podman.timings["round trip"] = time.monotonic() - t0
    print("\nimage test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in podman.timings.items()))
