"""Mutual TLS to the API, end to end: a real `v2gpki serve` process terminates TLS with a csms-server
certificate from the test hierarchy (software key file), trusts the csms-root for client certificates,
and maps a client certificate issued by `v2gpki client-cert issue` to its organization.

Covered: the api-client certificate authenticates (/v1/me shows its org) on one keep-alive connection
and on new ones; after `v2gpki revoke` the same certificate gets 401 (checked per request, so even the
already-open connection is refused); a certificate from a foreign CA and an expired certificate from
our own CA are refused in the TLS handshake; with --require-client-cert a client without a certificate
is refused too, and without it an API key still works over TLS. Behind a trusted proxy
(X-SSL-Client-Cert, V2GPKI_TRUSTED_PROXIES) the expired certificate is refused by the application.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.config import Settings
from pki.context import Context
from pki.hierarchy import init_hierarchy
from pki.orgs import create_api_key, create_org
from pki.store.models import Certificate
from pki.wiring import build_context
from tests.conftest import TEST_PIN, V2GPKI_EXE, cli_env, csr_pem, make_token, run_cli

# The server's DNS name. pkilint refuses the single-label "localhost"; clients connect to 127.0.0.1 and
# send/verify this name through httpx's "sni_hostname" extension.
SERVER_NAME = "csms.v2gpki.test"
SNI = {"sni_hostname": SERVER_NAME}

HIERARCHY = """
organization: mTLS Test PKI
country: DE
cas:
  - {name: csms-root, profile: csms-root, cn: CSMS Root CA, ocsp_signer: false}
"""


@dataclass
class Pki:
    ctx: Context
    env: dict[str, str]
    dir: Path
    org: str
    root: Path  # csms-root PEM: the client CA bundle and what clients verify the server against
    server_crt: Path
    server_key: Path
    api_key: str


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, token_root: Path) -> Iterator[Pki]:
    label = "t-mtls"
    make_token(token_root, label)
    os.environ["SOFTHSM2_CONF"] = str(token_root / "softhsm2.conf")
    home = tmp_path_factory.mktemp(label)
    s = Settings(home=home, token_label=label, hsm_pin=TEST_PIN,  # type: ignore[arg-type]
                 public_url="http://127.0.0.1:8000", pkilint="shape")
    ctx = build_context(s)
    (home / "hierarchy.yaml").write_text(HIERARCHY)
    init_hierarchy(ctx.engine, ctx.hierarchy(home / "hierarchy.yaml"))
    org = f"mtls-{secrets.token_hex(3)}"
    create_org(ctx.db, org, "cpo", [f"DE*{secrets.choice('ABCDEFGH')}ZZ"])
    api_key = create_api_key(ctx.db, org)[0]
    d = tmp_path_factory.mktemp("mtls-files")
    root = d / "csms-root.pem"
    root.write_bytes(ctx.engine.ca("csms-root").cert.public_bytes(serialization.Encoding.PEM))
    # The TLS server's own key is a software key file (uvicorn/OpenSSL read it), its certificate is a
    # csms-server certificate for SERVER_NAME (CN and SAN dNSName) from the csms-root in the HSM.
    skey = ec.generate_private_key(ec.SECP256R1())
    server_key = d / "server.key"
    _write_key(server_key, skey)
    issued = ctx.engine.issue_from_csr("csms-server", csr_pem(SERVER_NAME, o=None, c=None, key=skey),
                                       tenant=org, actor="test")
    server_crt = d / "server.crt"
    server_crt.write_text(issued.pem_chain(include_root=False))
    env = cli_env(ctx, V2GPKI_TRUSTED_PROXIES="127.0.0.1", V2GPKI_WORKERS="1")
    yield Pki(ctx, env, d, org, root, server_crt, server_key, api_key)
    ctx.db.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, *, verify: ssl.SSLContext, headers: dict[str, str] | None = None,
         timeout: float = 10) -> httpx.Response:
    """One request on a new connection, to 127.0.0.1 with SNI and hostname check on SERVER_NAME."""
    with httpx.Client(verify=verify, timeout=timeout) as c:
        return c.get(url, headers=headers, extensions=SNI)


def _client_ctx(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    c = ssl.create_default_context(cafile=str(pki.root))
    if cert is not None:
        c.load_cert_chain(str(cert), str(key) if key else None)
    return c


@dataclass
class Server:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path


def _start(pki: Pki, *, require: bool) -> Iterator[Server]:
    port = _free_port()
    log = pki.dir / f"serve-{port}.log"
    args = [V2GPKI_EXE, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--tls-cert", str(pki.server_crt), "--tls-key", str(pki.server_key), "--client-ca", str(pki.root),
            "--log-level", "warning"]
    if require:
        args.append("--require-client-cert")
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, env=pki.env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        _wait_ready(pki, proc, base, log, require)
        yield Server(base, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(pki: Pki, proc: subprocess.Popen[bytes], base: str, log: Path, require: bool) -> None:
    """The TLS port answers /healthz. With a required client certificate the probe presents one (issued
    straight from the engine: the readiness probe is not under test)."""
    probe = _client_ctx(pki, *_engine_client_cert(pki, "probe")) if require else _client_ctx(pki)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"v2gpki serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if _get(f"{base}/healthz", verify=probe, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"v2gpki serve did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    """Client certificate optional: certificates are verified when presented, API keys still work."""
    yield from _start(pki, require=False)


def _engine_client_cert(pki: Pki, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    crt, kp = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    _write_key(kp, key)
    issued = pki.ctx.engine.issue_from_csr("api-client", csr_pem(f"{pki.org} {name}", o=pki.org, c=None, key=key),
                                           tenant=pki.org, actor="test")
    crt.write_text(issued.pem_chain(include_root=False))
    return crt, kp


def _cli_client_cert(pki: Pki, name: str) -> tuple[Path, Path, x509.Certificate]:
    crt, key = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    r = run_cli(["client-cert", "issue", "--org", pki.org, "--new-key", str(key), "--out", str(crt)], pki.env)
    assert r.returncode == 0, r.stderr
    assert key.stat().st_mode & 0o077 == 0  # the client's key is written owner-only
    return crt, key, x509.load_pem_x509_certificates(crt.read_bytes())[0]


def _refused(call: Callable[[], httpx.Response]) -> str:
    """The TLS handshake fails (the server sends an alert; with TLS 1.3 the client sees it on first read)."""
    with pytest.raises(httpx.TransportError) as exc:
        r = call()
        pytest.fail(f"expected the TLS handshake to be refused, got HTTP {r.status_code}: {r.text[:200]}")
    return str(exc.value)


def _foreign_client_cert(pki: Pki) -> tuple[Path, Path]:
    """A root and an api-client-shaped leaf for the same organization name, from a CA we do not know."""
    now = datetime.now(UTC)
    rkey = ec.generate_private_key(ec.SECP256R1())
    rname = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CSMS Root CA")])  # same CN as ours
    root = (x509.CertificateBuilder().subject_name(rname).issuer_name(rname).public_key(rkey.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(rkey, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _leaf(root.subject, rkey, key, pki.org, now - timedelta(days=1), now + timedelta(days=30))
    crt, kp = pki.dir / "foreign.crt", pki.dir / "foreign.key"
    crt.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    _write_key(kp, key)
    return crt, kp


def _leaf(issuer: x509.Name, signer: object, key: ec.EllipticCurvePrivateKey, org: str, nb: datetime,
          na: datetime, aki: x509.AuthorityKeyIdentifier | None = None) -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{org} API client"),
                                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(nb).not_valid_after(na)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if aki is not None:
        b = b.add_extension(aki, critical=False)
    return b.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


def _expired_client_cert(pki: Pki) -> tuple[Path, Path, x509.Certificate]:
    """An api-client certificate signed by OUR csms-root key (in the HSM) whose validity ended yesterday,
    recorded in the inventory as valid: only its dates are wrong. The engine refuses to issue a certificate
    that is already expired, so it is built here and signed through the same HSM signer."""
    ca = pki.ctx.engine.ca("csms-root")
    signer = pki.ctx.engine.ca_signer(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC).replace(microsecond=0)
    cert = _leaf(ca.cert.subject, signer, key, pki.org, now - timedelta(days=30), now - timedelta(days=1),
                 x509.AuthorityKeyIdentifier(ca.ski, None, None))
    der = cert.public_bytes(serialization.Encoding.DER)
    import hashlib

    with pki.ctx.db.session() as s:
        s.add(Certificate(issuer="csms-root", serial=format(cert.serial_number, "x"), profile="api-client",
                          subject=cert.subject.rfc4514_string(), identifier=None, tenant=pki.org,
                          not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, status="valid",
                          fingerprint=hashlib.sha256(der).hexdigest(), der=der, created_at=now))
        s.commit()
    crt, kp = pki.dir / "expired.crt", pki.dir / "expired.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(kp, key)
    return crt, kp, cert


def test_client_certificate_authenticates_then_revoked_is_401(pki: Pki, server: Server) -> None:
    crt, key, cert = _cli_client_cert(pki, "client1")
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    tls = _client_ctx(pki, crt, key)
    with httpx.Client(base_url=server.base, verify=tls, timeout=10) as client:
        for _ in range(2):  # the same keep-alive connection, twice
            r = client.get("/v1/me", extensions=SNI)
            assert r.status_code == 200, r.text
            assert r.json()["org"] == pki.org and r.json()["credential"] == "cert"
        # the certificate's organization sees only its own inventory
        r = client.get("/v1/certificates?profile=api-client", extensions=SNI)
        assert r.status_code == 200 and {c["tenant"] for c in r.json()["items"]} == {pki.org}
        serial = format(cert.serial_number, "X")
        rv = run_cli(["revoke", serial, "--issuer", "csms-root", "--reason", "keyCompromise", "--yes"], pki.env)
        assert rv.returncode == 0, rv.stderr
        # the open connection: the certificate's status is checked on every request, not per handshake
        r = client.get("/v1/me", extensions=SNI)
        assert r.status_code == 401 and "revoked" in r.json()["detail"], r.text
    # a new connection with the revoked certificate: the handshake passes (the chain is fine), the API says no
    r = _get(f"{server.base}/v1/me", verify=_client_ctx(pki, crt, key), timeout=10)
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"


def test_foreign_ca_client_certificate_is_refused(pki: Pki, server: Server) -> None:
    crt, key = _foreign_client_cert(pki)
    _refused(lambda: _get(f"{server.base}/v1/me", verify=_client_ctx(pki, crt, key), timeout=10))
    assert server.proc.poll() is None  # a refused handshake does not take the server down


def test_expired_client_certificate_is_refused(pki: Pki, server: Server) -> None:
    crt, key, cert = _expired_client_cert(pki)
    _refused(lambda: _get(f"{server.base}/v1/me", verify=_client_ctx(pki, crt, key), timeout=10))
    # Behind a TLS-terminating proxy the application itself refuses the expired certificate.
    hdr = {"X-SSL-Client-Cert": quote(cert.public_bytes(serialization.Encoding.PEM).decode())}
    r = _get(f"{server.base}/v1/me", headers=hdr, verify=_client_ctx(pki), timeout=10)
    assert r.status_code == 401 and "expired" in r.json()["detail"], r.text
    # ...and the same header with a valid certificate is accepted from the trusted proxy address
    good, _ = _engine_client_cert(pki, "via-proxy")
    hdr = {"X-SSL-Client-Cert": quote(good.read_text())}
    r = _get(f"{server.base}/v1/me", headers=hdr, verify=_client_ctx(pki), timeout=10)
    assert r.status_code == 200 and r.json()["org"] == pki.org, r.text


def test_api_key_over_tls_without_client_certificate(pki: Pki, server: Server) -> None:
    r = _get(f"{server.base}/v1/me", headers={"Authorization": f"Bearer {pki.api_key}"},
                  verify=_client_ctx(pki), timeout=10)
    assert r.status_code == 200 and r.json()["credential"] == "apikey"
    assert _get(f"{server.base}/v1/me", verify=_client_ctx(pki), timeout=10).status_code == 401
    # The server certificate is the csms-server certificate for localhost, chained to the csms-root.
    with socket.create_connection(("127.0.0.1", int(server.base.rsplit(":", 1)[1]))) as raw, \
            _client_ctx(pki).wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [SERVER_NAME]


def test_required_client_certificate(pki: Pki) -> None:
    gen = _start(pki, require=True)
    srv = next(gen)
    try:
        _refused(lambda: _get(f"{srv.base}/v1/me", headers={"Authorization": f"Bearer {pki.api_key}"},
                                   verify=_client_ctx(pki), timeout=10))
        crt, key = _engine_client_cert(pki, "required")
        r = _get(f"{srv.base}/v1/me", verify=_client_ctx(pki, crt, key), timeout=10)
        assert r.status_code == 200 and r.json()["org"] == pki.org
    finally:
        next(gen, None)
