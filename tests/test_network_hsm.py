"""A network HSM through the same PKCS#11 seam (#22 item 4), with p11-kit's PKCS#11 remoting standing in for
one: `p11-kit server` exports a SoftHSM2 token of this module's own over a unix socket, and the service runs
with V2GPKI_PKCS11_MODULE = p11-kit-client.so and P11_KIT_SERVER_ADDRESS pointing at it.

* `v2gpki init` checks the token's mechanisms first: the remote token lacks Ed448 (and AES-GCM), so init of
  the default hierarchy refuses (exit 6) naming the mechanisms and CAs, and `--skip-unsupported` builds the
  rest; a full token (SoftHSM2 directly) builds an Ed448 CA.
* issuance, OCSP signing and CRL signing through the socket;
* the server killed under load: `v2gpki serve` answers 503 + Retry-After, after bounded retries in
  milliseconds (the breaker), and recovers on its own when the server is back on the same socket.

Without p11-kit this is a skip, or a failure in CI (CI / V2GPKI_TEST_REQUIRE_PEERS). Loops are bounded in
count and time; everything is on loopback and unix sockets.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from hsm import p11kit
from hsm.pkcs11 import DEFAULT_MODULE, Pkcs11KeyStore
from pki.config import Settings
from pki.context import Context
from pki.hierarchy import token_plan
from pki.orgs import create_api_key, create_org
from pki.wiring import build_context
from tests.conftest import TEST_PIN, V2GPKI_EXE, csr_pem, free_port, make_settings, make_token, need_peer, run_cli

LABEL = "net-hsm"
ORG = "NetHSM CPO"
PREFIX = "DE*NHS"
ED448_HIERARCHY = """\
organization: Mech Check
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA}
  - {name: v2g-root-20-ed448, profile: v2g-root-20, key_alg: ed448, cn: V2G Root CA 20 Ed448}
  - {name: cpo-sub1-20-ed448, profile: cpo-sub1-20, parent: v2g-root-20-ed448, key_alg: ed448, cn: CPO Sub-CA 1 20 Ed448}
"""
ED448_CAS = ["v2g-root-20-ed448", "cpo-sub1-20-ed448", "cpo-sub2-20-ed448", "mo-root-20-ed448",
             "mo-sub1-20-ed448", "mo-sub2-20-ed448", "cps-sub1-20-ed448", "cps-sub2-20-ed448",  # #26
             "oem-root-20-ed448", "oem-sub1-20-ed448", "oem-sub2-20-ed448", "cps-leaf-20-ed448"]


@dataclass
class Net:
    server: p11kit.P11KitServer
    client: str
    token_root: Path
    home: Path
    env: dict[str, str]  # the CLI's environment: the p11-kit client as the PKCS#11 module


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, token_root: Path) -> Iterator[Net]:
    configured = Settings().p11kit_client  # V2GPKI_P11KIT_CLIENT
    why = p11kit.available(configured)
    if why:
        need_peer(why)
    client = p11kit.client_module(configured)
    assert client is not None
    make_token(token_root, LABEL)
    sockdir = Path(tempfile.mkdtemp(prefix="v2p11-"))  # short: a unix socket path has ~100 bytes
    server = p11kit.P11KitServer(sockdir / "hsm.sock", LABEL, token_root / "softhsm2.conf")
    server.start()
    home = tmp_path_factory.mktemp("net-hsm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(home), V2GPKI_PKCS11_MODULE=client, P11_KIT_SERVER_ADDRESS=server.address,
               V2GPKI_TOKEN_LABEL=LABEL, V2GPKI_HSM_PIN=TEST_PIN, V2GPKI_PUBLIC_URL="http://127.0.0.1:8000",
               V2GPKI_PKILINT="shape", SOFTHSM2_CONF=str(token_root / "softhsm2.conf"))
    old = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = server.address  # for this process' own stores
    try:
        yield Net(server, client, token_root, home, env)
    finally:
        server.kill()
        shutil.rmtree(sockdir, ignore_errors=True)
        if old is None:
            os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
        else:
            os.environ["P11_KIT_SERVER_ADDRESS"] = old


def remote_store(net: Net, **kw: float) -> Pkcs11KeyStore:
    return Pkcs11KeyStore(net.client, LABEL, TEST_PIN, **kw)  # type: ignore[arg-type]


# -- init: the token's mechanisms first -----------------------------------------------------------------


def test_remote_token_offers_fewer_mechanisms(net: Net) -> None:
    remote = remote_store(net).mechanisms()
    direct = Pkcs11KeyStore(DEFAULT_MODULE, LABEL, TEST_PIN).mechanisms()
    # Which digests SoftHSM2 offers depends on the OpenSSL providers its process loaded (RIPEMD160 is a
    # legacy one: present in the fresh p11-kit server, absent here once this process loaded others), so the
    # comparison is of what the service uses and of what the remote side lacks, not strict inclusion.
    assert {"CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA", "CKM_AES_KEY_GEN"} <= remote and len(remote) < len(direct)
    lacking = direct - remote
    assert {"CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA", "CKM_AES_GCM", "CKM_ECDH1_DERIVE",
            "CKM_AES_KEY_WRAP"} <= lacking, sorted(lacking)


def test_token_plan_of_the_default_hierarchy(net: Net) -> None:
    from pki.profiles import load_hierarchy, load_profiles

    policies = make_settings(net.home, net.token_root, LABEL).policies_dir
    profiles = load_profiles(policies)
    h = load_hierarchy(policies / "hierarchy.yaml", profiles)
    full = token_plan(h, profiles, Pkcs11KeyStore(DEFAULT_MODULE, LABEL, TEST_PIN).mechanisms())
    assert full.skipped == {} and full.missing == () and full.warnings == []
    assert full.reduced.cas == h.cas
    reduced = token_plan(h, profiles, remote_store(net).mechanisms())
    assert sorted(reduced.skipped) == sorted(ED448_CAS)
    assert reduced.missing == ("CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA")
    assert [c.name for c in reduced.reduced.cas] == [c.name for c in h.cas if c.name not in ED448_CAS]
    assert any("CKM_AES_GCM" in w for w in reduced.warnings)


def test_init_on_a_full_token_builds_ed448(tmp_path: Path, token_root: Path) -> None:
    label = "net-full"
    make_token(token_root, label)
    (tmp_path / "h.yaml").write_text(ED448_HIERARCHY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(tmp_path / "home"), V2GPKI_TOKEN_LABEL=label, V2GPKI_HSM_PIN=TEST_PIN,
               SOFTHSM2_CONF=str(token_root / "softhsm2.conf"), V2GPKI_PKILINT="shape")
    res = run_cli(["init", "--config", str(tmp_path / "h.yaml")], env)
    assert res.returncode == 0, res.stderr
    assert "cpo-sub1-20-ed448: created" in res.stderr and "lacks" not in res.stderr


@pytest.fixture(scope="module")
def inited(net: Net) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """`v2gpki init` of the default hierarchy through the socket: refused, then with --skip-unsupported."""
    refused = run_cli(["init"], net.env)
    built = run_cli(["init", "--skip-unsupported"], net.env)
    return refused, built


def test_init_refuses_a_reduced_token_before_creating_anything(
        net: Net, inited: tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]],
        tmp_path: Path) -> None:
    refused, _ = inited
    assert refused.returncode == 6, refused.stderr
    err = refused.stderr
    assert "Traceback" not in err and "MechanismInvalid" not in err and TEST_PIN not in err
    assert "lacks CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA" in err and "Nothing was created" in err
    for name in ED448_CAS:
        assert name in err
    assert "--skip-unsupported" in err
    # a small hierarchy with an Ed448 root and its child: both named, the child because of its parent
    (tmp_path / "h.yaml").write_text(ED448_HIERARCHY)
    res = run_cli(["init", "--config", str(tmp_path / "h.yaml")], dict(net.env, V2GPKI_HOME=str(tmp_path / "h")))
    assert res.returncode == 6, res.stderr
    assert "cpo-sub1-20-ed448 (its parent v2g-root-20-ed448 is skipped)" in res.stderr


def test_init_skip_unsupported_builds_the_rest_through_the_socket(
        net: Net, inited: tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]) -> None:
    _, built = inited
    assert built.returncode == 0, built.stderr
    assert f"skipping {len(ED448_CAS)} entries the token cannot hold" in built.stderr
    assert "warning: the token lacks CKM_AES_GCM" in built.stderr
    assert "Traceback" not in built.stderr
    labels = remote_store(net).list()
    assert "ca-v2g-root" in labels and "ca-mo-sub2-20" in labels and "svc-cps-leaf-20" in labels
    assert not [x for x in labels if "ed448" in x]
    again = run_cli(["init", "--skip-unsupported"], net.env)  # idempotent
    assert again.returncode == 0 and "0 created" in again.stdout, again.stderr


# -- issuance, OCSP and CRL signing through the socket ----------------------------------------------------


@pytest.fixture(scope="module")
def ctx(net: Net, inited: tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]) -> Context:
    assert inited[1].returncode == 0, inited[1].stderr
    c = build_context(make_settings(net.home, net.token_root, LABEL, None, pkcs11_module=net.client))
    create_org(c.db, ORG, "cpo", [PREFIX])
    return c


def _verify_ec(pub: object, sig: bytes, data: bytes, algo: hashes.HashAlgorithm) -> None:
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, data, ec.ECDSA(algo))


def test_issuance_ocsp_and_crl_signing_through_the_socket(ctx: Context) -> None:
    from pki.crl import generate_crl, load_crl
    from pki.ocsp import responder_for

    assert isinstance(ctx.keystore, Pkcs11KeyStore) and "p11-kit-client" in ctx.keystore.module
    leaf = ctx.engine.issue_from_csr("secc", csr_pem(f"{PREFIX}*E{secrets.token_hex(3).upper()}", o=ORG, dc="CPO"))
    issuer = ctx.engine.ca("cpo-sub2").cert
    assert leaf.cert.signature_hash_algorithm is not None
    _verify_ec(issuer.public_key(), leaf.cert.signature, leaf.cert.tbs_certificate_bytes,
               leaf.cert.signature_hash_algorithm)
    # a P-521 (ISO 15118-20) leaf too
    leaf20 = ctx.engine.issue_from_csr(
        "secc-20", csr_pem(f"{PREFIX}*E{secrets.token_hex(3).upper()}", o=ORG, dc="CPO",
                           key=ec.generate_private_key(ec.SECP521R1())))
    assert leaf20.cert.signature_hash_algorithm is not None
    _verify_ec(ctx.engine.ca(leaf20.issuer).cert.public_key(), leaf20.cert.signature,
               leaf20.cert.tbs_certificate_bytes, leaf20.cert.signature_hash_algorithm)
    # OCSP: a live signature (a nonce) by the delegated signer, whose key is in the remote token
    nonce = secrets.token_bytes(16)
    req = (ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, issuer, hashes.SHA1())
           .add_extension(x509.OCSPNonce(nonce), critical=False).build())
    answer = responder_for(ctx).respond(req.public_bytes(serialization.Encoding.DER))
    resp = ocsp.load_der_ocsp_response(answer.der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert resp.signature_hash_algorithm is not None
    _verify_ec(resp.certificates[0].public_key(), resp.signature, resp.tbs_response_bytes,
               resp.signature_hash_algorithm)
    # CRL: signed by the CA key in the remote token
    ctx.engine.revoke(leaf.serial, "keyCompromise")
    info = generate_crl(ctx, "cpo-sub2")
    stored = load_crl(ctx.db, "cpo-sub2", info.number)
    assert stored is not None
    crl = x509.load_der_x509_crl(stored.der)
    assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(leaf.cert.serial_number) is not None


# -- the server killed under load, then back ---------------------------------------------------------------


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def serve(net: Net, ctx: Context, tmp: Path) -> Iterator[Served]:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    env = dict(net.env, V2GPKI_DATABASE_URL=ctx.settings.db_url)
    with log.open("wb") as out:
        proc = subprocess.Popen([V2GPKI_EXE, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=out, start_new_session=True)
    s = Served(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_for(lambda: _ready(s), 90, "v2gpki serve ready", proc=proc, log=log)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _ready(s: Served) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200
    return False


def wait_for(check: Callable[[], bool], timeout: float, what: str, *, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited\n" + (log.read_text()[-3000:] if log else ""))
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


def _enroll(client: httpx.Client, url: str, key: str) -> tuple[httpx.Response, float]:
    csr = csr_pem(f"{PREFIX}*E{secrets.token_hex(4).upper()}", o=ORG, dc="CPO").decode()
    t0 = time.monotonic()
    r = client.post(f"{url}/v1/enrollments", json={"csr": csr, "profile": "secc"},
                    headers={"Authorization": f"Bearer {key}"})
    return r, time.monotonic() - t0


def _ocsp_nonce(client: httpx.Client, url: str, ctx: Context, leaf: x509.Certificate) -> tuple[httpx.Response, bytes]:
    nonce = secrets.token_bytes(16)
    req = (ocsp.OCSPRequestBuilder().add_certificate(leaf, ctx.engine.ca("cpo-sub2").cert, hashes.SHA1())
           .add_extension(x509.OCSPNonce(nonce), critical=False).build())
    r = client.post(f"{url}/ocsp", content=req.public_bytes(serialization.Encoding.DER),
                    headers={"Content-Type": "application/ocsp-request"})
    return r, nonce


def test_server_killed_under_load_503_retry_after_fast_then_recovers(
        net: Net, ctx: Context, tmp_path: Path) -> None:
    key = create_api_key(ctx.db, ORG)[0]
    leaf = ctx.engine.issue_from_csr("secc", csr_pem(f"{PREFIX}*E{secrets.token_hex(3).upper()}", o=ORG, dc="CPO"))
    with serve(net, ctx, tmp_path) as srv, httpx.Client(timeout=30) as client:
        pid = srv.proc.pid
        # load: a bounded loop of enrollments in a thread, recording (time, status, latency, Retry-After)
        stop = threading.Event()
        rows: list[tuple[float, int, float, str | None]] = []

        def load() -> None:
            with httpx.Client(timeout=30) as c:
                for _ in range(3000):
                    if stop.is_set():
                        return
                    r, dt = _enroll(c, srv.url, key)
                    rows.append((time.monotonic(), r.status_code, dt, r.headers.get("retry-after")))

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            wait_for(lambda: sum(1 for row in rows if row[1] == 201) >= 20, 60, "20 enrollments before the kill")
            killed_at = time.monotonic()
            net.server.kill()
            wait_for(lambda: sum(1 for row in rows if row[0] > killed_at and row[1] == 503) >= 30, 30,
                     "30 answers 503 after the kill")
            # the OCSP live path: tryLater with Retry-After
            r, _ = _ocsp_nonce(client, srv.url, ctx, leaf.cert)
            assert ocsp.load_der_ocsp_response(r.content).response_status == ocsp.OCSPResponseStatus.TRY_LATER
            assert int(r.headers["retry-after"]) > 0
            assert httpx.get(f"{srv.url}/readyz", timeout=30).status_code == 503
            after = [row for row in rows if row[0] > killed_at]
            bad = [row for row in after if row[1] not in (201, 503)]
            assert not bad, bad[:5]
            down = [row for row in after if row[1] == 503]
            assert all(row[3] is not None and int(row[3]) > 0 for row in down)  # every 503 says when to retry
            # bounded retries once, then the breaker: no request waits anywhere near 6-7 s, and the 503s
            # come in milliseconds
            assert max(row[2] for row in after) < 4.0, sorted(row[2] for row in after)[-5:]
            assert statistics.median(row[2] for row in down) < 0.1, [row[2] for row in down][:20]
            net.server.start()  # back, on the same socket path
            restarted_at = time.monotonic()
            wait_for(lambda: any(row[0] > restarted_at and row[1] == 201 for row in rows), 30,
                     "an enrollment succeeding again without a restart")
        finally:
            stop.set()
            t.join(60)
        assert srv.proc.poll() is None and srv.proc.pid == pid  # the same process: no restart

        def recovered() -> bool:
            ready = httpx.get(f"{srv.url}/readyz", timeout=30).status_code == 200
            enrolled = _enroll(client, srv.url, key)[0].status_code == 201
            r, nonce = _ocsp_nonce(client, srv.url, ctx, leaf.cert)
            resp = ocsp.load_der_ocsp_response(r.content)
            ok = resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and (
                resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce)
            return ready and enrolled and ok

        wait_for(recovered, 30, "the service did not recover on its own")
        for _ in range(3):
            assert recovered()
        text = srv.log.read_text()
        assert "Traceback" not in text and TEST_PIN not in text


NEVER_REACHED = """
import sys, time
from hsm.errors import HSMConfigError, HSMUnavailable
from hsm.pkcs11 import Pkcs11KeyStore
ks = Pkcs11KeyStore(sys.argv[1], sys.argv[2], sys.argv[3], breaker_cooldown=0.2)
try:
    ks.list()
    print("reached")
except (HSMConfigError, HSMUnavailable) as exc:
    print(type(exc).__name__, exc)
sys.stdout.flush()
sys.stdin.readline()  # the test starts the server now
time.sleep(0.3)
print("then", len(ks.list()))
"""


def test_a_store_that_never_reached_the_token_says_configuration_error(net: Net) -> None:
    """The distinction kept (docs/operations.md): a process whose first contact finds no token reports a
    configuration error (a wrong label or module, or the HSM not reachable at start-up), yet finds the token
    once it is there, without a restart. Its own process: the client module reads P11_KIT_SERVER_ADDRESS at
    C_Initialize, and this process' library is connected to the module's server."""
    down = p11kit.P11KitServer(Path(tempfile.mkdtemp(prefix="v2p11-")) / "late.sock", LABEL,
                               net.token_root / "softhsm2.conf")
    env = dict(net.env, P11_KIT_SERVER_ADDRESS=down.address, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", NEVER_REACHED, net.client, LABEL, TEST_PIN], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        assert first.startswith("HSMConfigError") and "never reached by this process" in first, first
        assert TEST_PIN not in first
        down.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        assert out.startswith("then "), err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        down.kill()
        shutil.rmtree(down.socket.parent, ignore_errors=True)
