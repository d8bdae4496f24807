"""OCPP 2.0.1 GetCertificateStatus: every encoding chargers use, answered with a verifiable OCSP response;
the caller's responderURL is never contacted."""

from __future__ import annotations

import base64
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from pki.context import Context
from pki.issuance import Issued, pem
from pki.orgs import create_api_key, create_org
from tests import ocpp_schemas
from tests.conftest import csr_pem

PATH = "/ocpp/v201/get-certificate-status"


@pytest.fixture(scope="module")
def auth(ctx: Context) -> dict[str, str]:
    name = f"OCSP CPO {secrets.token_hex(4)}"
    create_org(ctx.db, name, "cpo", ["DE*ICE"])
    key, _ = create_api_key(ctx.db, name)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def leaf(ctx: Context) -> Issued:
    return ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ICE*E{secrets.token_hex(4).upper()}", dc="CPO"))


def hashes_of(leaf: Issued, alg: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, leaf.chain[0], alg).build()
    return req.issuer_name_hash, req.issuer_key_hash


def ask(url: str, auth: dict[str, str], data: dict[str, str]) -> httpx.Response:
    return httpx.post(url + PATH, json={"ocspRequestData": {"responderURL": "http://127.0.0.1:9/ocsp", **data}},
                      headers=auth, timeout=30)


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


ENCODINGS = {
    # EVerest (libevse-security): lower-case hex hashes, hex serial without leading zeros
    "everest": (lambda b: b.hex(), lambda n: format(n, "x")),
    # OCPP 2.1 text: hex; upper case seen too
    "upper-hex": (lambda b: b.hex().upper(), lambda n: format(n, "X")),
    # Josev: URL-safe base64 hashes, decimal serial
    "josev": (b64url, lambda n: str(n)),
    "base64": (lambda b: base64.b64encode(b).decode(), lambda n: str(n)),
}


@pytest.mark.parametrize("alg", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()], ids=lambda a: a.name)
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_every_encoding_is_answered(ctx: Context, responder_url: str, auth: dict[str, str], leaf: Issued,
                                    encoding: str, alg: hashes.HashAlgorithm) -> None:
    enc_hash, enc_serial = ENCODINGS[encoding]
    nh, kh = hashes_of(leaf, alg)
    r = ask(responder_url, auth, {"hashAlgorithm": alg.name.upper(), "issuerNameHash": enc_hash(nh),
                                  "issuerKeyHash": enc_hash(kh), "serialNumber": enc_serial(leaf.cert.serial_number)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"status", "ocspResult"} and body["status"] == "Accepted"
    assert len(body["ocspResult"]) <= 5500
    resp = ocsp.load_der_ocsp_response(base64.b64decode(body["ocspResult"]))
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert resp.serial_number == leaf.cert.serial_number  # the decimal reading was picked for Josev
    assert type(resp.hash_algorithm) is type(alg)  # answered in the algorithm asked
    assert (resp.issuer_name_hash, resp.issuer_key_hash) == (nh, kh)


def test_result_verifies_with_openssl_and_shows_revocation(ctx: Context, responder_url: str,
                                                          auth: dict[str, str], tmp_path: Path) -> None:
    leaf = ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ICE*E{secrets.token_hex(4).upper()}", dc="CPO"))
    nh, kh = hashes_of(leaf, hashes.SHA256())
    data = {"hashAlgorithm": "SHA256", "issuerNameHash": nh.hex(), "issuerKeyHash": kh.hex(),
            "serialNumber": format(leaf.cert.serial_number, "x")}
    ctx.engine.revoke(leaf.serial, "keyCompromise", issuer=leaf.issuer)
    body = ask(responder_url, auth, data).json()
    assert body["status"] == "Accepted"
    (tmp_path / "resp.der").write_bytes(base64.b64decode(body["ocspResult"]))
    (tmp_path / "root.pem").write_text(pem(leaf.chain[-1]))
    (tmp_path / "chain.pem").write_text("".join(pem(c) for c in leaf.chain[:-1]))
    (tmp_path / "issuer.pem").write_text(pem(leaf.chain[0]))
    (tmp_path / "leaf.pem").write_text(pem(leaf.cert))
    r = subprocess.run(["openssl", "ocsp", "-respin", str(tmp_path / "resp.der"), "-issuer", str(tmp_path / "issuer.pem"),
                        "-sha256", "-cert", str(tmp_path / "leaf.pem"), "-CAfile", str(tmp_path / "root.pem"),
                        "-verify_other", str(tmp_path / "chain.pem")], capture_output=True, text=True)
    assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
    assert "revoked" in r.stdout and "Reason: keyCompromise" in r.stdout


def test_unknown_serial_unknown_issuer_and_bad_input(responder_url: str, auth: dict[str, str], leaf: Issued) -> None:
    nh, kh = hashes_of(leaf, hashes.SHA256())
    good = {"hashAlgorithm": "SHA256", "issuerNameHash": nh.hex(), "issuerKeyHash": kh.hex()}
    body = ask(responder_url, auth, {**good, "serialNumber": "1234abcd"}).json()
    assert body["status"] == "Accepted"  # a successful OCSP response saying 'unknown' (RFC 6960 §2.2)
    assert ocsp.load_der_ocsp_response(base64.b64decode(body["ocspResult"])).certificate_status == \
        ocsp.OCSPCertStatus.UNKNOWN
    body = ask(responder_url, auth, {**good, "issuerKeyHash": "ab" * 32, "serialNumber": "1"}).json()
    assert body["status"] == "Failed" and body["statusInfo"]["reasonCode"] == "UnknownIssuer"
    assert "ocspResult" not in body
    for bad in ({**good, "issuerNameHash": "zz" * 32, "serialNumber": "1"},  # neither hex nor base64
                {**good, "issuerNameHash": nh.hex()[:-2], "serialNumber": "1"},  # wrong length for SHA-256
                {**good, "serialNumber": "12-34"},
                {**good, "hashAlgorithm": "MD5", "serialNumber": "1"}):
        r = ask(responder_url, auth, bad)  # the message's own Failed answer, forwardable as is
        assert r.status_code == 400 and r.json()["status"] == "Failed", bad
        ocpp_schemas.check("2.0.1", "GetCertificateStatusResponse", r.json())
    r = ask(responder_url, auth, {**good, "serialNumber": "1" * 41})  # OCPP: serialNumber ≤ 40 characters
    assert r.status_code == 400 and ocpp_schemas.check("2.0.1", "GetCertificateStatusResponse", r.json())
    r = httpx.post(responder_url + PATH, json={"ocspRequestData": {**good, "serialNumber": "1",
                                                                   "responderURL": ""}})
    assert r.status_code == 401  # the CSMS authenticates like every other API client


@pytest.fixture
def trap() -> Iterator[tuple[str, list[object]]]:
    """A listener that records every connection made to it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[object] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except OSError:
                continue
            hits.append(addr)
            conn.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/ocsp", hits
    stop.set()
    t.join(2)
    srv.close()


def test_responder_url_is_never_fetched(responder_url: str, auth: dict[str, str], leaf: Issued,
                                        trap: tuple[str, list[object]]) -> None:
    url, hits = trap
    for kh in (hashes_of(leaf, hashes.SHA256())[1].hex(), "cd" * 32):  # ours, and an issuer we do not serve
        r = httpx.post(responder_url + PATH, headers=auth, timeout=30, json={"ocspRequestData": {
            "hashAlgorithm": "SHA256", "issuerNameHash": hashes_of(leaf, hashes.SHA256())[0].hex(),
            "issuerKeyHash": kh, "serialNumber": format(leaf.cert.serial_number, "x"), "responderURL": url}})
        assert r.status_code == 200
    assert hits == []  # no server-side request forgery

