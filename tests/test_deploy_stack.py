"""End-to-end smoke test of the deployed shape: scripts/stack.sh starts PostgreSQL and Redis on loopback
and the API, the standalone OCSP/CRL responder, a Celery worker and beat as separate processes, with the
ExecStart= commands of deploy/systemd/. Then, over real HTTP only:

init (by stack.sh, as v2gpki-init.service) → org + API key + webhook subscription (CLI) → enroll
(Bearer API key) → the expiry alert reaches the webhook (beat schedules the scan, the worker records and
delivers it) → revoke → `openssl ocsp` against the standalone responder says revoked (keyCompromise) →
`openssl crl` shows the serial on the CRL it serves → /metrics of the multi-worker API counts exactly what happened (multiprocess
mode) → JSON logs carry our X-Request-ID and no API key → stop leaves no process behind.

Runs in the normal suite (marked slow); bounded waits for asynchronous work, no timed assertions.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import V2GPKI_EXE, csr_pem, free_port, openssl_ocsp, pg_admin_url

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "scripts" / "stack.sh"

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    dir: Path
    api: str
    ocsp: str
    env: dict[str, str]  # the services' environment (from the stack's v2gpki.env), for the CLI
    exe: str = V2GPKI_EXE  # the `v2gpki` the services run (the checkout's .venv, or an installed wheel's)
    cwd: Path | None = None  # where the CLI runs (None: the caller's directory)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True, timeout=120,
                              cwd=self.cwd)


def _caller_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}


def _read_env_file(path: Path) -> dict[str, str]:
    # values are written with printf %q; none of ours needs unquoting beyond that
    out = subprocess.run(["bash", "-c", f'set -a; . "{path}"; env -0'], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0") if kv.startswith("V2GPKI_"))


@contextmanager
def running_stack(d: Path, venv: Path | None = None, cwd: Path | None = None) -> Iterator[Stack]:
    """scripts/stack.sh start in ``d`` (its own database, Celery queue and ports), stopped and cleaned on exit.
    ``venv``: the virtual environment whose `v2gpki` the services run (default: the checkout's .venv);
    ``cwd``: the directory stack.sh, and so `hsm init` and `init`, run from."""
    if not pg_admin_url() and not shutil.which("pg_ctlcluster"):
        pytest.skip("no PostgreSQL on this machine (scripts/setup.sh installs it)")
    for tool in ("openssl", "curl", "redis-server", "setsid"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (scripts/setup.sh installs it)")
    tag = secrets.token_hex(4)
    api_port, ocsp_port = free_port(), free_port()
    env = _caller_env() | {
        "STACK_DIR": str(d), "STACK_API_PORT": str(api_port), "STACK_OCSP_PORT": str(ocsp_port),
        "STACK_DB": f"v2gpki_stack_{tag}", "STACK_WAIT": "150",
        # passed through to the services: our own Celery queue (other stacks may share this Redis), a
        # short expiry-scan period and a window that makes every fresh certificate "expiring"
        "V2GPKI_QUEUE": f"v2gpki-stack-{tag}", "V2GPKI_EXPIRY_SCAN_SECONDS": "3",
        "V2GPKI_DELIVERY_SWEEP_SECONDS": "2", "V2GPKI_EXPIRY_WINDOWS": "14000", "V2GPKI_PKILINT": "shape",
    }
    exe = V2GPKI_EXE
    if venv is not None:
        env["STACK_VENV"] = str(venv)
        exe = str(venv / "bin" / "v2gpki")
    started = subprocess.run(["bash", str(STACK), "start"], env=env, capture_output=True, text=True, timeout=280,
                             cwd=cwd)
    try:
        assert started.returncode == 0, started.stderr[-4000:]
        svc_env = _caller_env() | _read_env_file(d / "v2gpki.env")
        yield Stack(d, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ocsp_port}", svc_env, exe, cwd)
    finally:
        subprocess.run(["bash", str(STACK), "clean"], env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


def until(what: str, fn: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Poll fn() until it returns something truthy (asynchronous work: workers, CRL regeneration)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what} (last: {last!r})")


class _Hooks(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).received.append({"headers": dict(self.headers), "body": json.loads(body or b"{}")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@dataclass
class RoundTrip:
    key: str  # the tenant's API key
    tag: str  # in the request ID: stack-e2e-<tag>
    serial: str
    issuer: str


def round_trip(stack: Stack, tmp_path: Path) -> RoundTrip:
    """Over real HTTP and the CLI: readiness → tenant, API key, webhook subscription → enroll → expiry alert
    at the webhook → revoke → `openssl ocsp` says revoked → `openssl crl` lists the serial (module docstring)."""
    # -- every process answers, readiness checked its dependencies ---------------------------------------
    for base in (stack.api, stack.ocsp):
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["hsm"] == "ok" and ready.json()["checks"]["database"] == "ok"
    assert httpx.get(f"{stack.api}/readyz", timeout=10).json()["checks"]["broker"] == "ok"
    assert "broker" not in httpx.get(f"{stack.ocsp}/readyz", timeout=10).json()["checks"]  # never uses it

    # -- tenant, API key, webhook subscription (CLI, as an operator) --------------------------------------
    tag = secrets.token_hex(2).upper()
    org, prefix = f"Stack CPO {tag}", "DE*" + "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
    done = stack.cli("org", "create", org, "--role", "cpo", "--prefix", prefix)
    assert done.returncode == 0, done.stderr
    done = stack.cli("apikey", "create", "--org", org)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    _Hooks.received = []
    hook_srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hook_srv.serve_forever, daemon=True).start()
    try:
        hook_url = f"http://127.0.0.1:{hook_srv.server_address[1]}/hook"
        done = stack.cli("subscription", "add", "--org", org, "--url", hook_url, "--events", "expiry")
        assert done.returncode == 0, done.stderr

        # -- enroll over HTTP with the API key ------------------------------------------------------------
        auth = {"Authorization": f"Bearer {key}", "X-Request-ID": f"stack-e2e-{tag}"}
        evse = f"{prefix}*E{tag}1"
        r = httpx.post(f"{stack.api}/v1/enrollments", headers=auth, timeout=60,
                       json={"csr": csr_pem(evse, o=org, dc="CPO").decode(), "profile": "secc"})
        assert r.status_code == 201, r.text
        assert r.headers["x-request-id"] == f"stack-e2e-{tag}"
        cert = r.json()
        serial, issuer = cert["serial"], cert["issuer"]
        (tmp_path / "leaf.pem").write_text(cert["certificate"])
        chain = cert["chain"].split("-----END CERTIFICATE-----\n")
        chain = [c + "-----END CERTIFICATE-----\n" for c in chain if c.strip()]
        (tmp_path / "issuer.pem").write_text(chain[1])  # chain = leaf, issuing CA, ... (root left out)
        (tmp_path / "untrusted.pem").write_text("".join(chain[1:]))
        root = httpx.get(f"{stack.api}/v1/truststores/v2g", timeout=10)
        assert root.status_code == 200
        (tmp_path / "root.pem").write_text(root.text)

        m = metrics(stack.api)  # two uvicorn workers: the scrape must sum both (multiprocess mode)
        assert m.get(("v2gpki_certificates_issued_total", (("issuer", issuer), ("profile", "secc")))) == 1

        # -- expiry alert (valid certificates only): beat schedules the scan, the worker delivers it ----------
        def alert() -> dict[str, Any] | None:
            for hit in list(_Hooks.received):
                if serial.upper() in json.dumps(hit["body"]).upper():
                    return hit
            return None

        hit = until("the expiry alert webhook", alert, timeout=120)
        assert any(k.lower() == "x-v2gpki-signature" for k in hit["headers"])
        assert "expiry" in json.dumps(hit["body"])

        # -- revoke over HTTP ------------------------------------------------------------------------------
        r = httpx.post(f"{stack.api}/v1/certificates/{issuer}/{serial}/revoke", headers=auth, timeout=60,
                       json={"reason": "keyCompromise"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "revoked"

        # -- OCSP: the standalone responder, asked by openssl ---------------------------------------------
        ocsp = openssl_ocsp(tmp_path, f"{stack.ocsp}/ocsp")
        assert f"{tmp_path / 'leaf.pem'}: revoked" in ocsp
        assert "keyCompromise" in ocsp

        # -- CRL: published by the CA process, served by the responder, read by openssl -------------------
        def crl_lists_serial() -> bool:
            resp = httpx.get(f"{stack.ocsp}/crl/{issuer}.crl", timeout=10)
            if resp.status_code != 200:
                return False
            (tmp_path / "ca.crl").write_bytes(resp.content)
            text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "ca.crl"), "-noout",
                                   "-text", "-CAfile", str(tmp_path / "issuer.pem")],
                                  capture_output=True, text=True, timeout=30)
            listed = {int(x, 16) for x in re.findall(r"Serial Number: ([0-9A-Fa-f]+)", text.stdout)}
            return text.returncode == 0 and int(serial, 16) in listed  # openssl pads to whole octets

        until("the CRL to list the revoked serial", crl_lists_serial)
    finally:
        hook_srv.shutdown()
    return RoundTrip(key, tag, serial, issuer)


def test_stack_end_to_end(stack: Stack, tmp_path: Path) -> None:
    rt = round_trip(stack, tmp_path)
    key, tag = rt.key, rt.tag

    # -- metrics count exactly what happened; the responder counted the revoked answer --------------------
    m = metrics(stack.api)
    assert m.get(("v2gpki_certificates_revoked_total", (("reason", "keyCompromise"),))) == 1
    assert m.get(("v2gpki_collector_up", (("source", "broker"),))) == 1
    assert ("v2gpki_queue_depth", (("queue", stack.env["V2GPKI_QUEUE"]),)) in m  # the workers' own queue
    mo = metrics(stack.ocsp)
    assert mo.get(("v2gpki_ocsp_requests_total", (("cert_status", "revoked"), ("method", "POST"),
                                                  ("response_status", "successful")))) == 1

    # -- JSON logs: our request ID on the access line, the API key nowhere -------------------------------
    api_log = (stack.dir / "log" / "api.log").read_text()
    lines = [json.loads(x) for x in api_log.splitlines() if x.startswith("{")]
    assert any(x.get("request_id") == f"stack-e2e-{tag}" and x.get("route") == "/v1/enrollments" for x in lines)
    secret = key.split("_", 2)[2]
    for f in (stack.dir / "log").glob("*.log"):
        assert secret not in f.read_text(), f.name

    # -- stop: nothing left running ----------------------------------------------------------------------
    pids = [int((stack.dir / "run" / f"{n}.pid").read_text()) for n in ("api", "ocsp", "worker", "beat")]
    env = _caller_env() | {"STACK_DIR": str(stack.dir)}
    assert subprocess.run(["bash", str(STACK), "stop"], env=env, capture_output=True, timeout=120).returncode == 0
    st = subprocess.run(["bash", str(STACK), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert st.returncode == 3 and st.stdout.count("stopped") == 4
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(p, 0)
