"""The lean standalone OCSP responder (api/ocsp_fast.py), on SQLite and PostgreSQL.

Run as operators run it — `v2gpki ocsp-serve --workers 2` in a subprocess (forked workers sharing one
socket) — and, for the tests that need to look inside, one worker on a thread. Checked with independent
clients (`openssl ocsp`, curl, httpx, raw sockets): answers verified against the chain, byte-identical to
the pre-signed rows, revocation served within 1 s of `revoke()` returning, and bad HTTP or DER never
kills a worker. No timing assertion beyond that correctness bound.
"""

from __future__ import annotations

import base64
import os
import random
import secrets
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import select

from api import ocsp_fast
from api.ocsp_fast import FastResponder, start_in_thread
from pki.context import Context
from pki.issuance import Issued, pem
from pki.ocsp import der_int, der_oid, parse_request, seq, tlv
from pki.store.models import OcspResponseCache
from tests.conftest import V2GPKI_EXE, cli_env, csr_pem, free_port

OCSP_REQ = {"Content-Type": "application/ocsp-request"}
OK_STATUSES = (ocsp.OCSPResponseStatus.SUCCESSFUL, ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
               ocsp.OCSPResponseStatus.UNAUTHORIZED)


@dataclass
class Pki:
    dir: Path
    root: Path
    chain: Path
    issuer: Path
    issuer_cert: x509.Certificate
    leaves: dict[str, Issued]

    def leaf(self, name: str) -> Path:
        return self.dir / f"{name}.pem"


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def fp(ctx: Context, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("ocsp-fast")
    leaves = {n: ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ICE*E{secrets.token_hex(4).upper()}", dc="CPO"))
              for n in ("good", "good2", "revoke", "latency", "thread", "heal", "hold")}
    ctx.engine.revoke(leaves["revoke"].serial, "keyCompromise", issuer=leaves["revoke"].issuer)
    chain = ctx.engine.chain("cpo-sub2")
    (d / "root.pem").write_text(pem(chain[-1]))
    (d / "chain.pem").write_text("".join(pem(c) for c in chain[:-1]))
    (d / "issuer.pem").write_text(pem(chain[0]))
    for n, i in leaves.items():
        (d / f"{n}.pem").write_text(pem(i.cert))
    return Pki(d, d / "root.pem", d / "chain.pem", d / "issuer.pem", chain[0], leaves)


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _wait_workers(srv: Server, n: int, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert srv.proc.poll() is None, srv.log.read_text()[-3000:]
        kids = _children(srv.proc.pid)
        if len(kids) == n:
            try:
                if httpx.get(f"{srv.url}/healthz", timeout=2).status_code == 200:
                    return kids
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise AssertionError("workers did not come up:\n" + srv.log.read_text()[-3000:])


@pytest.fixture(scope="module")
def fast(ctx: Context, fp: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`v2gpki ocsp-serve --workers 2` over the session's context (its database and token)."""
    port = free_port()
    log = tmp_path_factory.mktemp("ocsp-fast-log") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([V2GPKI_EXE, "ocsp-serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "2"], env=cli_env(ctx), stdout=out, stderr=out,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        _wait_workers(srv, 2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail("the responder did not stop on SIGTERM")
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def openssl_ocsp(p: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "ocsp", "-issuer", str(p.issuer), *args, "-CAfile", str(p.root),
                           "-verify_other", str(p.chain)], capture_output=True, text=True, timeout=30)


def der_request(p: Pki, *names: str, alg: hashes.HashAlgorithm | None = None, nonce: bytes | None = None) -> bytes:
    b = ocsp.OCSPRequestBuilder()
    for n in names:
        b = b.add_certificate(p.leaves[n].cert, p.issuer_cert, alg or hashes.SHA1())
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def stored(ctx: Context, leaf: Issued) -> bytes:
    with ctx.db.session() as s:
        row = s.exec(select(OcspResponseCache).where(OcspResponseCache.issuer == leaf.issuer,
                                                     OcspResponseCache.serial == leaf.serial)).one()
    return bytes(row.der)


def post(url: str, body: bytes) -> httpx.Response:
    r = httpx.post(f"{url}/ocsp", content=body, headers=OCSP_REQ, timeout=15)
    assert r.headers["content-type"] == "application/ocsp-response"
    return r


def status_of(content: bytes) -> ocsp.OCSPCertStatus:
    resp = ocsp.load_der_ocsp_response(content)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp.certificate_status


# -- raw HTTP ------------------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def read_response(s: socket.socket, buf: bytearray, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``s`` (``buf`` keeps what was read beyond it, for pipelining)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    n = 0 if head or status in (100, 304) else int(headers.get("content-length", "0"))
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a body")
        buf += chunk
    body = bytes(buf[:n])
    del buf[:n]
    return status, headers, body


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send ``raw`` on a new connection; (status, headers, body, closed by the server afterwards)."""
    with connect(port) as s:
        s.sendall(raw)
        buf = bytearray()
        status, headers, body = read_response(s, buf)
        s.settimeout(3)
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
    return status, headers, body, closed


def post_raw(body: bytes, *, version: str = "1.1", extra: str = "") -> bytes:
    return (f"POST /ocsp HTTP/{version}\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


# -- openssl and curl against the forked server ---------------------------------------------------------


def test_openssl_post_good_revoked_unknown_byte_identical(ctx: Context, fp: Pki, fast: Server,
                                                           tmp_path: Path) -> None:
    for name, want in (("good", "good"), ("revoke", "revoked")):
        out = tmp_path / f"{name}.der"
        r = openssl_ocsp(fp, "-no_nonce", "-cert", str(fp.leaf(name)), "-url", f"{fast.url}/ocsp",
                         "-respout", str(out))
        assert r.returncode == 0, r.stderr
        assert "Response verify OK" in r.stderr
        assert f"{fp.leaf(name)}: {want}" in r.stdout
        assert out.read_bytes() == stored(ctx, fp.leaves[name])  # the pre-signed row, byte for byte
    assert "Reason: keyCompromise" in r.stdout
    # openssl's default: with a nonce → the fallback signs live and echoes it
    r = openssl_ocsp(fp, "-cert", str(fp.leaf("good")), "-url", f"{fast.url}/ocsp")
    assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
    assert "WARNING" not in r.stderr and f"{fp.leaf('good')}: good" in r.stdout
    r = openssl_ocsp(fp, "-no_nonce", "-serial", "0x1234567890ABCDEF1234", "-url", f"{fast.url}/ocsp")
    assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
    assert "0x1234567890ABCDEF1234: unknown" in r.stdout


def test_get_via_curl_with_caching_headers(ctx: Context, fp: Pki, fast: Server, tmp_path: Path) -> None:
    req = tmp_path / "req.der"
    r = subprocess.run(["openssl", "ocsp", "-issuer", str(fp.issuer), "-cert", str(fp.leaf("good2")), "-no_nonce",
                        "-reqout", str(req)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b64 = base64.b64encode(req.read_bytes()).decode()
    variants = {"url-encoded": urllib.parse.quote(b64, safe=""), "raw": b64,
                "url-safe": base64.urlsafe_b64encode(req.read_bytes()).decode().rstrip("=")}
    want = stored(ctx, fp.leaves["good2"])
    etag = ""
    for name, path in variants.items():
        resp, hdr = tmp_path / f"resp-{name}.der", tmp_path / f"hdr-{name}.txt"
        c = subprocess.run(["curl", "-sS", "--path-as-is", "-o", str(resp), "-D", str(hdr),
                            f"{fast.url}/ocsp/{path}"], capture_output=True, text=True)
        assert c.returncode == 0, c.stderr
        headers = hdr.read_text().lower()
        assert " 200 " in headers.splitlines()[0], headers
        for h in ("content-type: application/ocsp-response", "cache-control: max-age=", "public", "no-transform",
                  "must-revalidate", "etag: ", "last-modified: ", "expires: "):
            assert h in headers, (h, headers)
        v = openssl_ocsp(fp, "-respin", str(resp), "-cert", str(fp.leaf("good2")))
        assert v.returncode == 0 and "Response verify OK" in v.stderr, v.stderr
        assert f"{fp.leaf('good2')}: good" in v.stdout
        assert resp.read_bytes() == want
        etag = next(line.split(":", 1)[1].strip() for line in hdr.read_text().splitlines()
                    if line.lower().startswith("etag:"))
    r2 = httpx.get(f"{fast.url}/ocsp/{variants['url-encoded']}", headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b"" and "content-length" not in r2.headers
    nxt = ocsp.load_der_ocsp_response(want).next_update_utc
    assert nxt is not None
    max_age = int(r2.headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= (nxt - datetime.now(UTC)).total_seconds() + 1
    head = httpx.head(f"{fast.url}/ocsp/{variants['raw']}")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(want)


def test_non_canonical_certid_gets_the_same_bytes(ctx: Context, fp: Pki, fast: Server) -> None:
    """A SHA-1 CertID without the NULL hash parameters (RFC 5754 allows it) or with a serial padded with
    a zero octet is not the dict key as sent, yet gets the stored response."""
    cid = parse_request(der_request(fp, "good")).cert_ids[0]
    sha1 = der_oid("1.3.14.3.2.26")
    no_params = seq(seq(sha1), tlv(0x04, cid.name_hash), tlv(0x04, cid.key_hash), der_int(cid.serial))
    padded = seq(seq(sha1, b"\x05\x00"), tlv(0x04, cid.name_hash), tlv(0x04, cid.key_hash),
                 tlv(0x02, b"\x00" + der_int(cid.serial)[2:]))
    for certid in (no_params, padded):
        r = post(fast.url, seq(seq(seq(seq(certid)))))
        assert r.status_code == 200
        assert r.content == stored(ctx, fp.leaves["good"])


def test_revocation_is_served_within_one_second(ctx: Context, fp: Pki, fast: Server) -> None:
    leaf = fp.leaves["latency"]
    body = der_request(fp, "latency")
    assert status_of(post(fast.url, body).content) == ocsp.OCSPCertStatus.GOOD
    ctx.engine.revoke(leaf.serial, "superseded", issuer=leaf.issuer)
    t0 = time.perf_counter()
    streak_start: float | None = None
    streak = 0
    while streak < 12:  # a new connection each time: both workers must have it
        sent = time.perf_counter()
        st_ = status_of(httpx.post(f"{fast.url}/ocsp", content=body, headers=OCSP_REQ, timeout=10).content)
        if st_ == ocsp.OCSPCertStatus.REVOKED:
            streak_start = sent if streak == 0 else streak_start
            streak += 1
        else:
            streak, streak_start = 0, None
        assert time.perf_counter() - t0 < 5, "the fast responder never said revoked"
    assert streak_start is not None
    elapsed = streak_start - t0
    print(f"\n[{ctx.db.engine.dialect.name}] revoke() returned → every answer says revoked: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0  # correctness (revocation effective at once), not a benchmark
    resp = ocsp.load_der_ocsp_response(post(fast.url, body).content)
    assert resp.revocation_reason == x509.ReasonFlags.superseded
    r = openssl_ocsp(fp, "-no_nonce", "-cert", str(fp.leaf("latency")), "-url", f"{fast.url}/ocsp")
    assert r.returncode == 0 and ": revoked" in r.stdout and "Reason: superseded" in r.stdout, r.stdout + r.stderr


def test_fallback_answers_other_algorithms_nonces_and_lists(fp: Pki, fast: Server) -> None:
    for alg in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        for _ in range(2):  # the second one comes from the worker's derived cache (or is signed again)
            resp = ocsp.load_der_ocsp_response(post(fast.url, der_request(fp, "good", alg=alg)).content)
            assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            assert type(resp.hash_algorithm) is type(alg)
            assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    nonce = secrets.token_bytes(32)
    resp = ocsp.load_der_ocsp_response(post(fast.url, der_request(fp, "revoke", nonce=nonce)).content)
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    r = openssl_ocsp(fp, "-cert", str(fp.leaf("good")), "-cert", str(fp.leaf("revoke")), "-cert",
                     str(fp.leaf("good2")), "-url", f"{fast.url}/ocsp")
    assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
    assert f"{fp.leaf('good')}: good" in r.stdout and f"{fp.leaf('revoke')}: revoked" in r.stdout


def test_unauthorized_and_malformed(fp: Pki, fast: Server, tmp_path: Path) -> None:
    body = (ocsp.OCSPRequestBuilder().add_certificate_by_hash(b"\x01" * 20, b"\x02" * 20, 5, hashes.SHA1())
            .build().public_bytes(serialization.Encoding.DER))
    for _ in range(3):  # the first goes to pki/ocsp/ (a new CA?), the next are answered at once
        assert ocsp.load_der_ocsp_response(post(fast.url, body).content).response_status == \
            ocsp.OCSPResponseStatus.UNAUTHORIZED
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA")])
    now = datetime.now(UTC)
    foreign = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
               .sign(key, hashes.SHA256()))
    (tmp_path / "foreign.pem").write_text(pem(foreign))
    o = subprocess.run(["openssl", "ocsp", "-issuer", str(tmp_path / "foreign.pem"), "-serial", "42",
                        "-url", f"{fast.url}/ocsp"], capture_output=True, text=True, timeout=30)
    assert "Responder Error: unauthorized (6)" in o.stdout + o.stderr
    good = der_request(fp, "good")
    cases = [b"", b"hello, responder", good[:-3], good + b"\x00", b"\x31" + good[1:],
             b"\x30\x80" + good[2:] + b"\x00\x00", b"\x30\x84\xff\xff\xff\xff" + good[2:], b"\x30\x00",
             b"\x30\x02\x30\x00", pem(fp.issuer_cert).encode()]
    for body in cases:
        r = post(fast.url, body)
        assert r.status_code == 200, body
        assert ocsp.load_der_ocsp_response(r.content).response_status == \
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST, body
    big = post(fast.url, good + b"\x00" * 11_000)
    assert big.status_code == 413
    assert ocsp.load_der_ocsp_response(big.content).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    for path in ("", "/", "/not%20base64!", "/" + "A" * 20, "/MA==", "/%FF%FE"):
        r = httpx.get(f"{fast.url}/ocsp{path}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/ocsp-response", path
        assert ocsp.load_der_ocsp_response(r.content).response_status == \
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST, path
        assert r.headers["cache-control"] == "no-store"
    long = httpx.get(f"{fast.url}/ocsp/" + "A" * 14_000)
    assert long.status_code == 414 and long.headers["content-type"] == "application/ocsp-response"


def test_crl_healthz_and_unknown_paths(ctx: Context, fast: Server) -> None:
    from pki.crl import generate_crl

    generate_crl(ctx, "cpo-sub2")  # published by the CA process, served by the responder
    r = httpx.get(f"{fast.url}/crl/cpo-sub2.crl")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-crl"
    assert x509.load_der_x509_crl(r.content).issuer == ctx.engine.ca("cpo-sub2").cert.subject
    assert httpx.get(f"{fast.url}/crl/cpo-sub2.crl", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    for path in ("/crl/nope.crl", "/crl/../../etc/passwd", "/v1/certificates", "/"):
        assert httpx.get(f"{fast.url}{path}").status_code == 404, path
    assert httpx.put(f"{fast.url}/ocsp", content=b"x").status_code == 405
    assert httpx.post(f"{fast.url}/crl/cpo-sub2.crl", content=b"x").status_code == 405
    h = httpx.get(f"{fast.url}/healthz").json()
    assert h["status"] == "ok" and h["entries"] > 0 and h["table_fresh"] is True
    ready = httpx.get(f"{fast.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "hsm": "ok"}
    assert "v2gpki_ocsp_requests_total" in httpx.get(f"{fast.url}/metrics").text


BAD_HTTP = {
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
    "bad request line": (b"POST  /ocsp HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "lower-case method": (b"post /ocsp HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "http/2": (b"GET /ocsp HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "no host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "two hosts": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no length": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    "chunked": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    "bad length": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n", 400),
    "negative length": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "two lengths": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "huge length": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    "too large": (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 10241\r\n\r\n", 413),
    "obs-fold": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued\r\n\r\n", 400),
    "space before colon": (b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "bare LF": (b"GET /healthz HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    "NUL": (b"GET /healthz HTTP/1.1\r\nHost: x\x00\r\n\r\n", 400),
    "header too large": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 30_000 + b"\r\n\r\n", 431),
    "too many headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 70 + b"\r\n", 431),
    "bad expect": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 400),
    "non-ascii target": (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "asterisk": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
}


def test_bad_http_is_refused_and_never_kills_a_worker(fp: Pki, fast: Server) -> None:
    workers = _children(fast.proc.pid)
    for name, (raw, want) in BAD_HTTP.items():
        status, _h, _b, closed = exchange(fast.port, raw)
        assert status == want, name
        assert closed, name  # framing errors end the connection
    # truncated requests and connections dropped mid-request: no answer, no harm
    good = der_request(fp, "good")
    for raw in (post_raw(good)[:30], post_raw(good)[:-10], b"GET /ocsp/MA", b"\r\n\r\n\r\n"):
        with connect(fast.port) as s:
            s.sendall(raw)
    with connect(fast.port) as s:  # reset instead of FIN
        s.sendall(post_raw(good)[:50])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    rng = random.Random(5)
    for _ in range(100):
        with connect(fast.port) as s:
            s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) + b"\r\n\r\n")
            s.settimeout(5)
            try:
                s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                pass
    for _ in range(4):
        assert status_of(post(fast.url, good).content) == ocsp.OCSPCertStatus.GOOD
    assert _children(fast.proc.pid) == workers  # nobody died and was replaced
    assert "Traceback" not in fast.log.read_text()


def test_der_fuzz_over_keep_alive(fp: Pki, fast: Server) -> None:
    base = der_request(fp, "good")
    nonce_base = der_request(fp, "good", nonce=b"x" * 16)
    rng = random.Random(1234)
    workers = _children(fast.proc.pid)
    with httpx.Client(timeout=15) as client:
        for i in range(300):
            src = nonce_base if i % 5 == 0 else base
            kind = rng.choice(["flip", "truncate", "insert", "random"])
            pos = rng.randrange(len(src))
            if kind == "random":
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            elif kind == "flip":
                body = src[:pos] + bytes([src[pos] ^ rng.randrange(1, 256)]) + src[pos + 1:]
            elif kind == "truncate":
                body = src[:pos]
            else:
                body = src[:pos] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5))) + src[pos:]
            r = client.post(f"{fast.url}/ocsp", content=body, headers=OCSP_REQ)
            assert r.status_code == 200
            assert ocsp.load_der_ocsp_response(r.content).response_status in OK_STATUSES
    assert _children(fast.proc.pid) == workers


def test_a_dead_worker_is_replaced(fp: Pki, fast: Server) -> None:
    workers = _children(fast.proc.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _children(fast.proc.pid)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.1)
    _wait_workers(fast, 2)
    for _ in range(6):
        assert status_of(post(fast.url, der_request(fp, "good")).content) == ocsp.OCSPCertStatus.GOOD
    assert status_of(post(fast.url, der_request(fp, "revoke")).content) == ocsp.OCSPCertStatus.REVOKED


# -- one worker on a thread: inside views ----------------------------------------------------------------


@dataclass
class Threaded:
    url: str
    port: int
    responder: FastResponder


@pytest.fixture(scope="module")
def threaded(ctx: Context, fp: Pki) -> Iterator[Threaded]:
    url, responder, stop = start_in_thread(ctx)
    try:
        yield Threaded(url, int(url.rsplit(":", 1)[1]), responder)
    finally:
        stop()


def test_rfc5019_requests_are_answered_from_memory(ctx: Context, fp: Pki, threaded: Threaded) -> None:
    r = threaded.responder
    fast0, fallback0 = r.fast, r.fallback
    for name in ("good", "good2", "revoke"):
        assert post(threaded.url, der_request(fp, name)).content == stored(ctx, fp.leaves[name])
    assert r.fast - fast0 == 3 and r.fallback == fallback0  # no database, no HSM, no thread hop
    post(threaded.url, der_request(fp, "good", nonce=b"n" * 8))
    assert r.fallback == fallback0 + 1
    # a freshly issued certificate: the poller brings its pre-signed response into memory
    leaf = ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ICE*E{secrets.token_hex(4).upper()}", dc="CPO"))
    req = (ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, fp.issuer_cert, hashes.SHA1()).build()
           .public_bytes(serialization.Encoding.DER))
    deadline = time.monotonic() + 10
    while not isinstance(r.lookup(req), ocsp_fast.Answer):
        assert time.monotonic() < deadline, "the new response never reached memory"
        time.sleep(0.05)
    assert post(threaded.url, req).content == stored(ctx, leaf)


def _until(url: str, body: bytes, want: ocsp.OCSPCertStatus, limit: float) -> tuple[float, ocsp.OCSPResponse]:
    t0 = time.perf_counter()
    while True:
        resp = ocsp.load_der_ocsp_response(post(url, body).content)
        if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and resp.certificate_status == want:
            return time.perf_counter() - t0, resp
        assert time.perf_counter() - t0 < limit, f"never {want}"
        time.sleep(0.01)


def test_revocation_whose_hook_failed_is_not_served_stale(ctx: Context, fp: Pki, threaded: Threaded) -> None:
    """The certificate is revoked but its stored response still says good (the re-signing hook failed, or
    ran in a process that died): the poll drops the stale bytes and pki/ocsp/ re-signs from the
    certificate's status."""
    leaf = fp.leaves["heal"]
    body = der_request(fp, "heal")
    r = threaded.responder
    assert isinstance(r.lookup(body), ocsp_fast.Answer)  # served from memory so far
    from pki.wiring import OcspOnRevocation

    saved = ctx.engine.revocation_observers
    ctx.engine.revocation_observers = tuple(o for o in saved if not isinstance(o, OcspOnRevocation))
    try:
        ctx.engine.revoke(leaf.serial, "keyCompromise", issuer=leaf.issuer)
    finally:
        ctx.engine.revocation_observers = saved
    elapsed, resp = _until(threaded.url, body, ocsp.OCSPCertStatus.REVOKED, 5)
    assert elapsed < 1.0
    assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    assert status_of(stored(ctx, leaf)) == ocsp.OCSPCertStatus.REVOKED  # healed in the table too


def test_hold_and_release_follow_the_database(ctx: Context, fp: Pki, threaded: Threaded) -> None:
    leaf = fp.leaves["hold"]
    body = der_request(fp, "hold")
    assert status_of(post(threaded.url, body).content) == ocsp.OCSPCertStatus.GOOD
    ctx.engine.revoke(leaf.serial, "certificateHold", issuer=leaf.issuer)
    elapsed, resp = _until(threaded.url, body, ocsp.OCSPCertStatus.REVOKED, 5)
    assert elapsed < 1.0 and resp.revocation_reason == x509.ReasonFlags.certificate_hold
    ctx.engine.release_hold(leaf.serial, issuer=leaf.issuer)
    elapsed, _ = _until(threaded.url, body, ocsp.OCSPCertStatus.GOOD, 5)
    assert elapsed < 1.0
    assert post(threaded.url, body).content == stored(ctx, leaf)
    assert isinstance(threaded.responder.lookup(body), ocsp_fast.Answer)  # and back in memory


def test_pipelining_keep_alive_and_http10(fp: Pki, threaded: Threaded) -> None:
    good = der_request(fp, "good")
    nonce = der_request(fp, "good", nonce=b"p" * 8)  # answered by the thread pool, between two fast ones
    with connect(threaded.port) as s:
        s.sendall(post_raw(good) + post_raw(nonce) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + post_raw(good))
        buf = bytearray()
        answers = [read_response(s, buf) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert status_of(answers[0][2]) == ocsp.OCSPCertStatus.GOOD
    resp = ocsp.load_der_ocsp_response(answers[1][2])
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"p" * 8
    assert answers[2][1]["content-type"] == "application/json"
    assert answers[3][2] == answers[0][2]
    # HTTP/1.0: closed after the answer unless keep-alive was asked for
    status, headers, _b, closed = exchange(threaded.port, post_raw(good, version="1.0"))
    assert status == 200 and closed and headers["connection"] == "close"
    with connect(threaded.port) as s:
        buf = bytearray()
        for _ in range(3):
            s.sendall(post_raw(good, version="1.0", extra="Connection: Keep-Alive\r\n"))
            status, headers, body = read_response(s, buf)
            assert status == 200 and headers["connection"] == "keep-alive"
    status, headers, _b, closed = exchange(threaded.port, post_raw(good, extra="Connection: close\r\n"))
    assert status == 200 and closed
    # Expect: 100-continue — the interim answer first, then the body is read
    with connect(threaded.port) as s:
        raw = post_raw(good, extra="Expect: 100-continue\r\n")
        head, body = raw.split(b"\r\n\r\n", 1)
        s.sendall(head + b"\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[0] == 100
        s.sendall(body)
        status, _h, content = read_response(s, buf)
        assert status == 200 and status_of(content) == ocsp.OCSPCertStatus.GOOD
    # a body in several pieces
    with connect(threaded.port) as s:
        raw = post_raw(good)
        for i in range(0, len(raw), 7):
            s.sendall(raw[i : i + 7])
            time.sleep(0.001)
        assert read_response(s, bytearray())[0] == 200


def test_idle_and_slow_connections_time_out(fp: Pki, threaded: Threaded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocsp_fast.Server, "KEEPALIVE_SECONDS", 0.5)
    monkeypatch.setattr(ocsp_fast.Server, "REQUEST_SECONDS", 1.0)
    with connect(threaded.port) as idle, connect(threaded.port) as slow:
        slow.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc")
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the server
        slow.settimeout(10)
        status, _h, _b = read_response(slow, bytearray())
        assert status == 408
        assert slow.recv(1) == b""
    assert status_of(post(threaded.url, der_request(fp, "good")).content) == ocsp.OCSPCertStatus.GOOD


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_http_never_breaks_the_worker(data: st.DataObject, fp: Pki, threaded: Threaded) -> None:
    base = post_raw(der_request(fp, "thread")) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "random"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=600))
    else:
        pos = data.draw(st.integers(0, len(base) - 1))
        if kind == "flip":
            raw = base[:pos] + bytes([base[pos] ^ data.draw(st.integers(1, 255))]) + base[pos + 1:]
        elif kind == "truncate":
            raw = base[:pos]
        else:
            raw = base[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + base[pos:]
    with connect(threaded.port) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert got == b"" or got.startswith(b"HTTP/1.1 "), got[:80]
    r = httpx.get(f"{threaded.url}/healthz", timeout=10)
    assert r.status_code == 200
