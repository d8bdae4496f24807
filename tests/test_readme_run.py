"""The README's run command and its walk-through, as an operator types them.

README.md is a contract: `bash scripts/run.sh` sets up and runs the service on embedded defaults (SQLite,
a SoftHSM2 token under the data directory, the API with its OCSP and CRL responders, a Celery worker and
beat on the embedded broker), and the shell block after it ("After the run command, create a tenant and
enroll a charger") works word for word. This test runs both exactly as written — the block is read from
README.md, and the only edit is the port, so the test does not depend on 8000 being free — then checks the
answer with independent tools: `openssl verify -x509_strict` on the chain OCPP's CertificateSigned
carries, `openssl ocsp` against the responder the run command serves (good, then revoked after a
revocation over HTTP), and that Ctrl-C (SIGINT to the foreground process group, as a terminal sends it)
stops every process the command started.

The data directory is a fresh temporary one: the block's own `export V2GPKI_HOME=$PWD/var` runs in a
directory whose `.venv` links to the repository's, so nothing is written under the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import ocpp_schemas
from tests.conftest import free_port, openssl_ocsp

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

pytestmark = pytest.mark.slow


def _caller_env() -> dict[str, str]:
    """The test process's environment without the suite's own settings (PostgreSQL URL, token, broker):
    the run command must work on its embedded defaults alone."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("V2GPKI_", "CELERY_")) and k not in ("SOFTHSM2_CONF", "PROMETHEUS_MULTIPROC_DIR")}


def readme_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_names_the_two_commands() -> None:
    """The two commands the README promises, and .ci/run calling the second."""
    blocks = [b.strip() for b in readme_blocks()]
    assert "bash scripts/run.sh" in blocks
    assert "bash scripts/test.sh" in blocks
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def walkthrough() -> str:
    """The shell block that follows the run command in README.md (tenant, API key, CSR, SignCertificate)."""
    text = README.read_text()
    at = text.index("After the run command")
    block = re.search(r"```sh\n(.*?)```", text[at:], flags=re.S)
    assert block is not None, "README: no shell block after 'After the run command'"
    return block.group(1)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    home: Path
    cwd: Path
    base: str
    log: Path


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_pids(pgid: int) -> list[int]:
    """Live members of a process group (zombies — exited, not yet reaped — are not running anything)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
    return out


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    for tool in ("openssl", "curl", "softhsm2-util"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (scripts/setup.sh installs it)")
    if not (REPO / ".venv" / "bin" / "v2gpki").exists():
        pytest.skip("no .venv in the repository (scripts/setup.sh creates it)")
    cwd = tmp_path_factory.mktemp("operator")
    (cwd / ".venv").symlink_to(REPO / ".venv")
    home = cwd / "var"  # what the walk-through's `export V2GPKI_HOME=$PWD/var` names
    port = free_port()
    log = cwd / "run.log"
    env = _caller_env() | {"V2GPKI_HOME": str(home), "V2GPKI_PORT": str(port),
                           "V2GPKI_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    with log.open("wb") as out:
        # a session of its own: the run command and everything it starts form one process group, which a
        # terminal's Ctrl-C would signal as a whole
        proc = subprocess.Popen(["bash", "scripts/run.sh"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bash scripts/run.sh exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the service did not answer /healthz in time:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Running(proc, home, cwd, base, log)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_run_command_serves_embedded_defaults(running: Running) -> None:
    ready = httpx.get(f"{running.base}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["hsm"] == "ok" and checks["database"] == "ok"
    # embedded defaults: the SQLite file and the SoftHSM2 token live under the data directory
    assert (running.home / "v2gpki.db").is_file(), sorted(running.home.iterdir())
    assert list(running.home.rglob("softhsm2.conf")), sorted(running.home.iterdir())
    # the worker and beat were started beside the API (same process group as the run command)
    cmdlines = []
    for pid in _group_pids(running.proc.pid):
        try:
            cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    assert any("v2gpki worker" in c for c in cmdlines), cmdlines
    assert any("v2gpki beat" in c for c in cmdlines), cmdlines
    assert any("v2gpki serve" in c for c in cmdlines), cmdlines


def test_readme_walkthrough_word_for_word(running: Running) -> None:
    port = running.base.rsplit(":", 1)[1]
    script = walkthrough().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=running.cwd, env=_caller_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the last command is curl's SignCertificate: the OCPP 2.0.1 CertificateSignedRequest to forward (#24)
    answer = ocpp_schemas.check("2.0.1", "CertificateSignedRequest", json.loads(done.stdout.strip().splitlines()[-1]))
    chain_pem = answer["certificateChain"]
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", chain_pem, flags=re.S)
    assert len(certs) >= 2, chain_pem
    work = running.cwd
    (work / "leaf.pem").write_text(certs[0])
    (work / "issuer.pem").write_text(certs[1])
    (work / "untrusted.pem").write_text("".join(certs[1:]))
    root = httpx.get(f"{running.base}/v1/truststores/v2g", timeout=10)
    assert root.status_code == 200, root.text
    (work / "root.pem").write_text(root.text)

    verify = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(work / "root.pem"),
                             "-untrusted", str(work / "untrusted.pem"), str(work / "leaf.pem")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr + verify.stdout
    subject = subprocess.run(["openssl", "x509", "-in", str(work / "leaf.pem"), "-noout", "-subject", "-serial"],
                             capture_output=True, text=True, timeout=30).stdout
    assert "DE*ICE*E45B*78C" in subject, subject
    serial = re.search(r"serial=([0-9A-Fa-f]+)", subject)
    assert serial is not None, subject

    def ocsp() -> str:
        return openssl_ocsp(work, f"{running.base}/ocsp")

    assert f"{work / 'leaf.pem'}: good" in ocsp()

    # the operator revokes it (CLI, the README's $V2GPKI_HOME), and the responder says so at once
    revoke = subprocess.run([str(running.cwd / ".venv" / "bin" / "v2gpki"), "revoke", serial.group(1),
                             "--reason", "keyCompromise", "--yes"],
                            cwd=running.cwd, env=_caller_env() | {"V2GPKI_HOME": str(running.home)},
                            capture_output=True, text=True, timeout=120)
    assert revoke.returncode == 0, revoke.stderr
    deadline = time.monotonic() + 30
    out = ocsp()
    while f"{work / 'leaf.pem'}: revoked" not in out and time.monotonic() < deadline:
        time.sleep(0.5)
        out = ocsp()
    assert f"{work / 'leaf.pem'}: revoked" in out, out
    assert "keyCompromise" in out


def test_ctrl_c_stops_everything(running: Running) -> None:
    """Last in this module: Ctrl-C in the run command's terminal leaves no process behind."""
    pgid = running.proc.pid
    assert len(_group_pids(pgid)) >= 3  # the run command, the API (and its workers), the Celery worker/beat
    os.killpg(pgid, signal.SIGINT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        running.proc.poll()  # reap the run command itself once it exits
        if not _group_pids(pgid):
            break
        time.sleep(0.5)
    left = _group_pids(pgid)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left if Path(f"/proc/{p}/cmdline").exists()]
    assert running.proc.wait(timeout=10) is not None
