"""Availability (#21 items 8, 9, 10, 13): the HSM going away and coming back, slowloris on the standalone
OCSP responder, live OCSP signing an unauthenticated client can cause, bounded request heads of the API.

Everything runs on a context of its own (its own SoftHSM2 token in the session's token directory, its own
SQLite database), so moving its token away disturbs no other test; servers listen on loopback only. Load
loops are bounded in count and time; the only time bounds are timeouts with generous margins.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from api.ocsp_fast import Server as FastServer
from api.ocsp_fast import start_in_thread
from hsm.errors import HSMConfigError, HSMUnavailable, KeyNotFoundError
from hsm.keystore import KeyAlg
from hsm.pkcs11 import DEFAULT_MODULE, Pkcs11KeyStore
from pki.context import Context
from pki.hierarchy import init_hierarchy
from pki.issuance import Issued, pem
from pki.ocsp import responder_for
from pki.orgs import create_api_key, create_org
from pki.wiring import build_context
from tests.conftest import (
    LC_HIERARCHY,
    TEST_PIN,
    V2GPKI_EXE,
    cli_env,
    csr_pem,
    free_port,
    make_settings,
    make_token,
    serve_in_thread,
)

ORG = "Avail CPO"
PREFIX = "DE*AVL"
RATE, BURST = 5.0, 10  # live OCSP signatures per second / burst per client address (this context)
PER_CLIENT = 20  # ocsp-serve connections per client address and worker
MAX_HEAD, HEAD_TIMEOUT = 8192, 2.0  # v2gpki serve's head bounds in this module


# -- the context, its token directory -------------------------------------------------------------------


def token_dir(root: Path, label: str) -> Path:
    """The SoftHSM2 directory of the token ``label`` (tokens/<uuid>/, its token.object names it)."""
    want = label.encode().ljust(32, b" ")
    for d in (root / "tokens").iterdir():
        obj = d / "token.object"
        if obj.is_file() and want in obj.read_bytes():
            return d
    raise AssertionError(f"no token directory for {label!r}")


@dataclass
class Avail:
    ctx: Context
    token_root: Path
    label: str
    leaf: Issued
    dir: Path

    @property
    def tokdir(self) -> Path:
        return token_dir(self.token_root, self.label)


@pytest.fixture(scope="module")
def av(tmp_path_factory: pytest.TempPathFactory, token_root: Path) -> Avail:
    label = "avail-hsm"
    make_token(token_root, label)
    home = tmp_path_factory.mktemp(label)
    (home / "hierarchy.yaml").write_text(LC_HIERARCHY)
    ctx = build_context(make_settings(home, token_root, label, None, hierarchy_file=home / "hierarchy.yaml",
                                      ocsp_live_sign_rate=RATE, ocsp_live_sign_burst=BURST,
                                      ocsp_max_connections_per_client=PER_CLIENT))
    init_hierarchy(ctx.engine, ctx.hierarchy())
    create_org(ctx.db, ORG, "cpo", [PREFIX])
    leaf = ctx.engine.issue_from_csr("secc", csr_pem(f"{PREFIX}*E{secrets.token_hex(3).upper()}", o=ORG, dc="CPO"))
    assert responder_for(ctx).presigner.flush()
    d = tmp_path_factory.mktemp("avail-pki")
    chain = ctx.engine.chain("cpo-sub2")
    (d / "root.pem").write_text(pem(chain[-1]))
    (d / "issuer.pem").write_text(pem(chain[0]))
    (d / "chain.pem").write_text("".join(pem(c) for c in chain[:-1]))
    (d / "leaf.pem").write_text(pem(leaf.cert))
    return Avail(ctx, token_root, label, leaf, d)


def ocsp_request(av: Avail, *, nonce: bytes | None = None, serial: int | None = None) -> bytes:
    issuer = x509.load_pem_x509_certificate((av.dir / "issuer.pem").read_bytes())
    b = ocsp.OCSPRequestBuilder()
    if serial is None:
        b = b.add_certificate(av.leaf.cert, issuer, hashes.SHA1())
    else:
        name_hash = hashes.Hash(hashes.SHA1())
        name_hash.update(issuer.subject.public_bytes())
        key_der = issuer.public_key().public_bytes(serialization.Encoding.X962,
                                                   serialization.PublicFormat.UncompressedPoint)
        key_hash = hashes.Hash(hashes.SHA1())
        key_hash.update(key_der)
        b = b.add_certificate_by_hash(name_hash.finalize(), key_hash.finalize(), serial, hashes.SHA1())
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def verify_response(content: bytes) -> ocsp.OCSPResponse:
    """A successful response whose signature verifies with the signer certificate it carries."""
    resp = ocsp.load_der_ocsp_response(content)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    signer = resp.certificates[0].public_key()
    assert isinstance(signer, ec.EllipticCurvePublicKey)
    assert resp.signature_hash_algorithm is not None
    signer.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    return resp


def nonce_of(resp: ocsp.OCSPResponse) -> bytes | None:
    try:
        return resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


# -- a token directory that goes away and comes back ----------------------------------------------------


@contextlib.contextmanager
def token_away(av: Avail) -> Iterator[Callable[[], None]]:
    """Move the context's token directory out of SoftHSM2's token directory; yields ``half()``, which puts
    back its token files but not yet its key objects (a restore in progress). Restores fully on exit."""
    src = av.tokdir
    parked = av.token_root / f"parked-{av.label}"
    shutil.move(str(src), str(parked))

    def half() -> None:
        src.mkdir()
        for name in os.listdir(parked):
            if not name.endswith(".object") or name == "token.object":
                shutil.copy2(parked / name, src / name)

    try:
        yield half
    finally:
        if src.exists():
            shutil.rmtree(src)
        shutil.move(str(parked), str(src))


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.3)


# -- item 8: the key store itself -----------------------------------------------------------------------


def test_key_store_recovers_when_its_token_comes_back(token_root: Path) -> None:
    label = "avail-ks"
    make_token(token_root, label)
    ks = Pkcs11KeyStore(DEFAULT_MODULE, label, TEST_PIN, breaker_cooldown=0.5)
    ks.create_key("k", KeyAlg.P256)
    key = ks.signer(ks.uri("k"))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key.sign(b"m", ec.ECDSA(hashes.SHA256()))
    src = token_dir(token_root, label)
    parked = token_root / f"parked-{label}"
    shutil.move(str(src), str(parked))
    try:
        # Gone: an outage (HSMUnavailable, which the API answers 503 + Retry-After), not "not found".
        with pytest.raises(HSMUnavailable):
            key.sign(b"m", ec.ECDSA(hashes.SHA256()))
        # Half restored (token file back, key objects not yet): still an outage, never KeyNotFoundError —
        # and the session opened on this view must not keep the keys invisible once they are back.
        src.mkdir()
        for name in os.listdir(parked):
            if not name.endswith(".object") or name == "token.object":
                shutil.copy2(parked / name, src / name)
        time.sleep(0.6)  # past the breaker's cool-down: the next call reaches the token
        with pytest.raises(HSMUnavailable):
            key.sign(b"m", ec.ECDSA(hashes.SHA256()))
        time.sleep(0.6)
        with pytest.raises(HSMUnavailable):
            ks.probe()
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.move(str(parked), str(src))

    def works() -> bool:
        try:
            key.sign(b"m", ec.ECDSA(hashes.SHA256()))
            return ks.probe()
        except (HSMUnavailable, HSMConfigError, KeyNotFoundError):
            return False

    wait_for(works, 20, "the store did not find its token and keys again")
    assert ks.has_key("k") and not ks.has_key("never-made")


# -- item 8: `v2gpki serve` and `v2gpki ocsp-serve` ----------------------------------------------------


@dataclass
class Proc:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def process(av: Avail, args: list[str], tmp: Path, **env: str) -> Iterator[Proc]:
    port = free_port()
    log = tmp / f"{args[0]}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([V2GPKI_EXE, *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=cli_env(av.ctx, **env), stdout=out, stderr=out, start_new_session=True)
    p = Proc(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{p.url}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield p
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def api(av: Avail, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with process(av, ["serve"], tmp_path_factory.mktemp("avail-api"),
                 V2GPKI_HTTP_MAX_HEAD_BYTES=str(MAX_HEAD), V2GPKI_HTTP_HEAD_TIMEOUT=str(HEAD_TIMEOUT)) as p:
        yield p


def _enroll(api: Proc, key: str) -> httpx.Response:
    csr = csr_pem(f"{PREFIX}*E{secrets.token_hex(3).upper()}", o=ORG, dc="CPO").decode()
    return httpx.post(f"{api.url}/v1/enrollments", json={"csr": csr, "profile": "secc"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _ocsp(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/ocsp", content=body, headers={"Content-Type": "application/ocsp-request"}, timeout=60)


def _status(r: httpx.Response) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(r.content).response_status


def test_api_answers_503_with_retry_after_and_recovers_when_the_token_is_back(av: Avail, api: Proc) -> None:
    key = create_api_key(av.ctx.db, ORG)[0]
    assert _enroll(api, key).status_code == 201
    with token_away(av) as half:
        r = _enroll(api, key)
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert int(r.headers["retry-after"]) > 0
        assert httpx.get(f"{api.url}/readyz", timeout=60).status_code == 503
        r = _ocsp(api.url, ocsp_request(av, nonce=secrets.token_bytes(16)))
        assert _status(r) == ocsp.OCSPResponseStatus.TRY_LATER and int(r.headers["retry-after"]) > 0
        half()  # a restore in progress: the service opens a session on it
        time.sleep(5.5)  # the breaker's cool-down: the next request reaches the half-restored token
        r = _enroll(api, key)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        assert httpx.get(f"{api.url}/readyz", timeout=60).status_code == 503

    def recovered() -> bool:
        ready = httpx.get(f"{api.url}/readyz", timeout=60).status_code == 200
        enrolled = _enroll(api, key).status_code == 201
        nonce = secrets.token_bytes(16)
        r = _ocsp(api.url, ocsp_request(av, nonce=nonce))
        return ready and enrolled and _status(r) == ocsp.OCSPResponseStatus.SUCCESSFUL and (
            nonce_of(verify_response(r.content)) == nonce)

    wait_for(recovered, 30, "the API did not recover on its own")
    for _ in range(3):  # and stays so (no flapping)
        assert recovered()
    assert "Traceback" not in api.log.read_text()


def test_ocsp_serve_answers_try_later_with_retry_after_and_recovers(av: Avail,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    with process(av, ["ocsp-serve"], tmp_path_factory.mktemp("avail-ocsp")) as srv:
        plain = ocsp_request(av)
        assert verify_response(_ocsp(srv.url, ocsp_request(av, nonce=b"n" * 16)).content)
        with token_away(av) as half:
            r = _ocsp(srv.url, ocsp_request(av, nonce=b"a" * 16))
            assert _status(r) == ocsp.OCSPResponseStatus.TRY_LATER and int(r.headers["retry-after"]) > 0
            # pre-signed answers need no HSM: served throughout
            assert verify_response(_ocsp(srv.url, plain).content).certificate_status == ocsp.OCSPCertStatus.GOOD
            half()
            time.sleep(5.5)
            r = _ocsp(srv.url, ocsp_request(av, nonce=b"b" * 16))
            assert _status(r) == ocsp.OCSPResponseStatus.TRY_LATER

        def recovered() -> bool:
            nonce = secrets.token_bytes(16)
            r = _ocsp(srv.url, ocsp_request(av, nonce=nonce))
            ready = httpx.get(f"{srv.url}/readyz", timeout=60).status_code == 200
            return ready and _status(r) == ocsp.OCSPResponseStatus.SUCCESSFUL and (
                nonce_of(verify_response(r.content)) == nonce)

        wait_for(recovered, 30, "ocsp-serve did not recover on its own")
        for _ in range(3):
            assert recovered()
        assert "Traceback" not in srv.log.read_text()


# -- item 10: live signing per client -------------------------------------------------------------------


@contextlib.contextmanager
def counted_signatures(av: Avail) -> Iterator[list[int]]:
    """Count the key store's signatures (every HSM signature goes through sign_raw)."""
    ks: Any = av.ctx.keystore
    real = ks.sign_raw
    n = [0]
    lock = threading.Lock()

    def counting(*a: Any, **kw: Any) -> Any:
        with lock:
            n[0] += 1
        return real(*a, **kw)

    ks.sign_raw = counting
    try:
        yield n
    finally:
        del ks.sign_raw


def _flood(av: Avail, url: str) -> None:
    from pki.ocsp import SignBudget

    r = responder_for(av.ctx)
    r.budget = SignBudget(RATE, BURST, av.ctx.settings.ocsp_live_sign_total_rate)  # a fresh budget
    stored = _ocsp(url, ocsp_request(av)).content  # the pre-signed answer (no nonce)
    n_requests = 200
    with counted_signatures(av) as signed, httpx.Client(timeout=60) as client:
        t0 = time.monotonic()
        echoed = 0
        for _ in range(n_requests):
            nonce = secrets.token_bytes(16)
            resp = client.post(f"{url}/ocsp", content=ocsp_request(av, nonce=nonce))
            v = verify_response(resp.content)  # every answer valid, signed by the delegated signer
            assert v.certificate_status == ocsp.OCSPCertStatus.GOOD and v.serial_number == av.leaf.cert.serial_number
            if nonce_of(v) == nonce:
                echoed += 1
            else:  # over the budget: the pre-signed answer, without the nonce (RFC 8954 §2.1 / RFC 5019 §2.1)
                assert nonce_of(v) is None and resp.content == stored
        elapsed = time.monotonic() - t0
        bound = BURST + RATE * elapsed + 2
        assert signed[0] <= bound, (signed[0], bound, elapsed)
        assert echoed == signed[0] and echoed >= 1
        # unknown serials: each new one would be a signature; over the budget tryLater
        signed0 = signed[0]
        t1 = time.monotonic()
        statuses = []
        base = secrets.randbits(48) << 8
        for i in range(60):
            resp = client.post(f"{url}/ocsp", content=ocsp_request(av, serial=base + i))
            st = ocsp.load_der_ocsp_response(resp.content).response_status
            statuses.append(st)
            if st == ocsp.OCSPResponseStatus.SUCCESSFUL:
                assert verify_response(resp.content).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
            else:
                assert st == ocsp.OCSPResponseStatus.TRY_LATER and int(resp.headers["retry-after"]) > 0
        assert signed[0] - signed0 <= RATE * (time.monotonic() - t1) + RATE * elapsed + BURST + 2
        assert ocsp.OCSPResponseStatus.TRY_LATER in statuses


def test_nonce_flood_from_one_client_keeps_hsm_signatures_bounded_api(av: Avail) -> None:
    from api.app import create_app

    url, stop = serve_in_thread(create_app(av.ctx, routers=["api.responders"]))
    try:
        _flood(av, url)
    finally:
        stop()


def test_nonce_flood_from_one_client_keeps_hsm_signatures_bounded_ocsp_serve(av: Avail) -> None:
    url, _responder, stop = start_in_thread(av.ctx)
    try:
        _flood(av, url)
    finally:
        stop()


def test_sign_budget_is_per_client() -> None:
    from pki.ocsp import SignBudget

    b = SignBudget(1.0, 3, 0)
    assert [b.take("a") for _ in range(4)] == [True, True, True, False]
    assert b.take("b") and b.take(None)  # another address; an authenticated caller is never limited
    total = SignBudget(100.0, 100, 2.0)  # the process-wide bound: 2 per second, burst 2
    assert [total.take(f"c{i}") for i in range(3)] == [True, True, False]


# -- item 9: slowloris on ocsp-serve --------------------------------------------------------------------


def test_slowloris_with_empty_lines_is_bounded_and_openssl_is_still_answered(
        av: Avail, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FastServer, "REQUEST_SECONDS", 2.0)
    monkeypatch.setattr(FastServer, "KEEPALIVE_SECONDS", 1.0)
    url, _responder, stop = start_in_thread(av.ctx)
    port = int(url.rsplit(":", 1)[1])
    socks: list[socket.socket] = []
    try:
        for _ in range(300):  # a few hundred connections from one address (127.0.0.2: openssl uses 127.0.0.1)
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)

        def open_ones() -> list[socket.socket]:
            alive = []
            for s in socks:
                try:
                    s.sendall(b"\r\n")  # an empty line: must not reset the request timeout
                    s.setblocking(False)
                    try:
                        if s.recv(4096) == b"":
                            continue
                    except BlockingIOError:
                        pass
                    finally:
                        s.setblocking(True)
                    alive.append(s)
                except OSError:
                    continue
            return alive

        time.sleep(0.5)
        first = open_ones()
        assert len(first) <= PER_CLIENT, len(first)  # the per-address cap
        res = subprocess.run(["openssl", "ocsp", "-issuer", str(av.dir / "issuer.pem"), "-cert",
                              str(av.dir / "leaf.pem"), "-url", f"{url}/ocsp", "-CAfile", str(av.dir / "root.pem"),
                              "-verify_other", str(av.dir / "chain.pem"), "-no_nonce", "-timeout", "10"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and ": good" in res.stdout, res.stderr
        # empty lines every 0.5 s: the connections are closed after the request timeout all the same
        deadline = time.monotonic() + 2.0 + 1.0 + 6.0  # timeout + sweep period + margin
        alive = first
        while alive:
            assert time.monotonic() < deadline, f"{len(alive)} connections kept open with empty lines"
            time.sleep(0.5)
            alive = open_ones()
    finally:
        for s in socks:
            s.close()
        stop()


# -- item 13: request heads of `v2gpki serve` ---------------------------------------------------------


def test_api_refuses_a_head_over_the_limit(api: Proc) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD * 4) + b"\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
        assert data == b"" or data.split(b" ", 2)[1] in (b"431", b"400"), data[:200]
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:  # a 10 MB header: refused early
        sent = 0
        with contextlib.suppress(OSError):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent < 10 * 1024 * 1024:
                s.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 10 * 1024 * 1024
    assert httpx.get(f"{api.url}/healthz", headers={"X-Fine": "a" * 2000}, timeout=10).status_code == 200


def test_api_closes_a_half_open_head_after_the_timeout(api: Proc) -> None:
    socks = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        idle = socket.create_connection(("127.0.0.1", api.port), timeout=10)  # sends nothing at all
        socks.append(idle)
        t0 = time.monotonic()
        deadline = t0 + HEAD_TIMEOUT + 8
        open_ = list(socks[:-1])
        while open_:  # one more header byte every 0.5 s: does not restart the head timeout
            assert time.monotonic() < deadline, f"{len(open_)} half-open heads still open"
            time.sleep(0.5)
            still = []
            for s in open_:
                try:
                    s.sendall(b"a")
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            continue
                    except BlockingIOError:
                        still.append(s)
                    finally:
                        s.setblocking(True)
                except OSError:
                    continue
            open_ = still
        idle.settimeout(HEAD_TIMEOUT + 8)
        assert idle.recv(1) == b""
    finally:
        for s in socks:
            s.close()
    assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200


# -- #22: one access-log line per request, none for successful probes and OCSP -----------------------------


def test_serve_logs_each_request_once_and_quiet_successes_not_at_all(av: Avail, tmp_path: Path) -> None:
    """With JSON logs (the image's default), `v2gpki serve` logged every request twice — uvicorn's access
    log, switched back on by routing uvicorn's loggers to the root, beside v2gpki.access — and so also the
    successful /readyz and /ocsp requests docs/operations.md says are not logged."""
    key = create_api_key(av.ctx.db, ORG)[0]
    with process(av, ["serve"], tmp_path, V2GPKI_LOG_FORMAT="json") as p:
        for _ in range(3):
            assert httpx.get(f"{p.url}/readyz", timeout=60).status_code == 200
        assert _status(_ocsp(p.url, ocsp_request(av))) == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert _enroll(p, key).status_code == 201
        assert httpx.get(f"{p.url}/v1/nowhere", timeout=60).status_code == 404
        time.sleep(0.5)
    lines = [json.loads(x) for x in p.log.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("logger") in ("v2gpki.access", "uvicorn.access")]
    assert not [x for x in access if x["logger"] == "uvicorn.access"], access
    routes = [(x["method"], x["route"], x["status"]) for x in access]
    assert routes.count(("POST", "/v1/enrollments", 201)) == 1, routes
    assert ("GET", "/v1/nowhere", 404) in routes or any(r[2] == 404 for r in routes), routes
    assert not [r for r in routes if r[1] in ("/readyz", "/ocsp")], routes
