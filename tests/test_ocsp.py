"""OCSP responder (RFC 6960 / RFC 5019 / RFC 8954), checked with independent clients: `openssl ocsp`
over HTTP POST, curl for RFC 5019 GET, cryptography's OCSP parser, and pkilint's OCSP linter."""

from __future__ import annotations

import base64
import contextlib
import io
import secrets
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from sqlmodel import select

from pki.context import Context
from pki.csr import SubjectFields
from pki.issuance import Issued, IssueRequest, pem
from pki.ocsp import OcspResponder, decode_ocpp_serial, parse_request, responder_for
from pki.store.db import utcnow
from pki.store.models import OcspResponseCache
from pki.wiring import build_context
from tests.conftest import csr_pem, serve_in_thread

OCSP_REQ = {"Content-Type": "application/ocsp-request"}


@dataclass
class Pki:
    dir: Path
    root: Path
    chain: Path  # the untrusted intermediates (Sub-CA 2, Sub-CA 1)
    issuer: Path  # Sub-CA 2
    issuer_cert: x509.Certificate
    leaves: dict[str, Issued]

    def leaf(self, name: str) -> Path:
        return self.dir / f"{name}.pem"


def _evseid() -> str:
    return f"DE*ICE*E{secrets.token_hex(4).upper()}"


@pytest.fixture(scope="module")
def pki(ctx: Context, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("ocsp")
    leaves = {n: ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"))
              for n in ("good", "good2", "revoke", "hold", "latency", "heal")}
    chain = ctx.engine.chain("cpo-sub2")
    (d / "root.pem").write_text(pem(chain[-1]))
    (d / "chain.pem").write_text("".join(pem(c) for c in chain[:-1]))
    (d / "issuer.pem").write_text(pem(chain[0]))
    for n, i in leaves.items():
        (d / f"{n}.pem").write_text(pem(i.cert))
    return Pki(d, d / "root.pem", d / "chain.pem", d / "issuer.pem", chain[0], leaves)


def openssl_ocsp(p: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["openssl", "ocsp", "-issuer", str(p.issuer), *args, "-CAfile", str(p.root),
           "-verify_other", str(p.chain)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def der_request(p: Pki, *names: str, alg: hashes.HashAlgorithm | None = None, nonce: bytes | None = None) -> bytes:
    b = ocsp.OCSPRequestBuilder()
    for n in names:
        b = b.add_certificate(p.leaves[n].cert, p.issuer_cert, alg or hashes.SHA1())
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def post(url: str, body: bytes) -> httpx.Response:
    r = httpx.post(f"{url}/ocsp", content=body, headers=OCSP_REQ, timeout=10)
    assert r.status_code in (200, 413), r.text
    assert r.headers["content-type"] == "application/ocsp-response"
    return r


def pkilint_ocsp(der: bytes, tmp: Path) -> tuple[int, str]:
    """pkilint's own CLI (lint_ocsp_response), run in-process: (finding count, report)."""
    from pkilint.bin import lint_ocsp_response

    f = tmp / f"resp-{secrets.token_hex(4)}.der"
    f.write_bytes(der)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = lint_ocsp_response.main(["lint", str(f)])
    return rc, out.getvalue()


# -- openssl as the client -----------------------------------------------------------------------------


def test_openssl_post_good_with_nonce(pki: Pki, responder_url: str) -> None:
    r = openssl_ocsp(pki, "-cert", str(pki.leaf("good")), "-url", f"{responder_url}/ocsp")
    assert r.returncode == 0, r.stderr
    assert "Response verify OK" in r.stderr
    assert "WARNING" not in r.stderr  # openssl sent a nonce (its default) and found it echoed
    assert f"{pki.leaf('good')}: good" in r.stdout


def test_openssl_post_no_nonce_gets_the_presigned_bytes(ctx: Context, pki: Pki, responder_url: str,
                                                         tmp_path: Path) -> None:
    # Pre-signed after issuance (Engine.on_issued hook → the background Presigner): the row exists
    # before any request once the pre-signer has drained its queue.
    assert responder_for(ctx).presigner.flush()
    with ctx.db.session() as s:
        row = s.exec(select(OcspResponseCache).where(
            OcspResponseCache.issuer == pki.leaves["good2"].issuer,
            OcspResponseCache.serial == pki.leaves["good2"].serial)).one()
    assert row.status == "good" and row.hash_alg == "sha1"
    out = tmp_path / "resp.der"
    r = openssl_ocsp(pki, "-no_nonce", "-cert", str(pki.leaf("good2")), "-url", f"{responder_url}/ocsp",
                     "-respout", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{pki.leaf('good2')}: good" in r.stdout
    assert out.read_bytes() == row.der  # served from the table, not re-signed


def test_openssl_get_via_curl_with_caching_headers(pki: Pki, responder_url: str, tmp_path: Path) -> None:
    req = tmp_path / "req.der"
    r = subprocess.run(["openssl", "ocsp", "-issuer", str(pki.issuer), "-cert", str(pki.leaf("good")),
                        "-no_nonce", "-reqout", str(req)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b64 = base64.b64encode(req.read_bytes()).decode()
    variants = {
        "url-encoded": urllib.parse.quote(b64, safe=""),  # RFC 6960 A.1
        "raw": b64,  # '/' and '+' left as they are (common in practice)
        "url-safe": base64.urlsafe_b64encode(req.read_bytes()).decode().rstrip("="),
    }
    bodies = []
    for name, path in variants.items():
        resp, hdr = tmp_path / f"resp-{name}.der", tmp_path / f"hdr-{name}.txt"
        c = subprocess.run(["curl", "-sS", "--path-as-is", "-o", str(resp), "-D", str(hdr),
                            f"{responder_url}/ocsp/{path}"], capture_output=True, text=True)
        assert c.returncode == 0, c.stderr
        headers = hdr.read_text().lower()
        assert " 200 " in headers.splitlines()[0], headers
        assert "content-type: application/ocsp-response" in headers
        for h in ("cache-control: max-age=", "public", "no-transform", "must-revalidate", "etag: ",
                  "last-modified: ", "expires: "):
            assert h in headers, (h, headers)
        v = openssl_ocsp(pki, "-respin", str(resp), "-cert", str(pki.leaf("good")))
        assert v.returncode == 0 and "Response verify OK" in v.stderr, v.stderr
        assert f"{pki.leaf('good')}: good" in v.stdout
        bodies.append(resp.read_bytes())
        etag = next(line.split(":", 1)[1].strip() for line in hdr.read_text().splitlines()
                    if line.lower().startswith("etag:"))
    assert len(set(bodies)) == 1
    # max-age counts down to nextUpdate (RFC 5019 §6.2)
    resp_obj = ocsp.load_der_ocsp_response(bodies[0])
    r2 = httpx.get(f"{responder_url}/ocsp/{variants['url-encoded']}", headers={"If-None-Match": etag})
    assert r2.status_code == 304
    assert r2.content == b"" and "content-length" not in r2.headers  # RFC 9110 §8.6
    max_age = int(r2.headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert resp_obj.next_update_utc is not None
    left = (resp_obj.next_update_utc - datetime.now(UTC)).total_seconds()
    assert 0 < max_age <= left + 1


def test_sha256_certid_is_answered_in_sha256(pki: Pki, responder_url: str, tmp_path: Path) -> None:
    out = tmp_path / "resp.der"
    for extra in ([], ["-no_nonce"]):
        r = openssl_ocsp(pki, *extra, "-sha256", "-cert", str(pki.leaf("good")), "-url", f"{responder_url}/ocsp",
                         "-respout", str(out))
        assert r.returncode == 0, r.stderr
        assert f"{pki.leaf('good')}: good" in r.stdout
        resp = ocsp.load_der_ocsp_response(out.read_bytes())
        assert isinstance(resp.hash_algorithm, hashes.SHA256)
    for alg in (hashes.SHA384(), hashes.SHA512()):
        resp = ocsp.load_der_ocsp_response(post(responder_url, der_request(pki, "good", alg=alg)).content)
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert type(resp.hash_algorithm) is type(alg)
        assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD


def test_several_certificates_in_one_request(ctx: Context, pki: Pki, responder_url: str) -> None:
    ensure_revoked(ctx, pki, "revoke")
    for extra in ([], ["-no_nonce"]):
        r = openssl_ocsp(pki, *extra, "-cert", str(pki.leaf("good")), "-cert", str(pki.leaf("revoke")),
                         "-cert", str(pki.leaf("good2")), "-url", f"{responder_url}/ocsp")
        assert r.returncode == 0, r.stderr
        assert "Response verify OK" in r.stderr
        assert f"{pki.leaf('good')}: good" in r.stdout
        assert f"{pki.leaf('good2')}: good" in r.stdout
        assert f"{pki.leaf('revoke')}: revoked" in r.stdout
        assert "Reason: keyCompromise" in r.stdout


def test_revocation_is_served_at_once(ctx: Context, pki: Pki, responder_url: str) -> None:
    leaf = pki.leaves["latency"]
    body = der_request(pki, "latency")
    with httpx.Client(timeout=10) as client:
        first = ocsp.load_der_ocsp_response(client.post(f"{responder_url}/ocsp", content=body).content)
        assert first.certificate_status == ocsp.OCSPCertStatus.GOOD
        ctx.engine.revoke(leaf.serial, "superseded", issuer=leaf.issuer)
        t0 = time.perf_counter()
        while True:
            resp = ocsp.load_der_ocsp_response(client.post(f"{responder_url}/ocsp", content=body).content)
            if resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                break
            assert time.perf_counter() - t0 < 5, "OCSP never said revoked"
        elapsed = time.perf_counter() - t0
    print(f"\n[{ctx.db.engine.dialect.name}] revoke() returned → OCSP says revoked: {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0  # a correctness requirement (revocation is effective at once), not a benchmark
    assert resp.revocation_reason == x509.ReasonFlags.superseded
    # openssl agrees, with the reason
    r = openssl_ocsp(pki, "-cert", str(pki.leaf("latency")), "-url", f"{responder_url}/ocsp")
    assert r.returncode == 0 and "revoked" in r.stdout and "Reason: superseded" in r.stdout, r.stdout + r.stderr


def test_certificate_hold_and_release(ctx: Context, pki: Pki, responder_url: str) -> None:
    leaf = pki.leaves["hold"]
    body = der_request(pki, "hold")
    ctx.engine.revoke(leaf.serial, "certificateHold", issuer=leaf.issuer)
    resp = ocsp.load_der_ocsp_response(post(responder_url, body).content)
    # RFC 6960 §2.2: a certificate on hold is 'revoked' with reason certificateHold
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason == x509.ReasonFlags.certificate_hold
    ctx.engine.release_hold(leaf.serial, issuer=leaf.issuer)
    resp = ocsp.load_der_ocsp_response(post(responder_url, body).content)
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD


def test_unknown_serial_and_unknown_issuer(pki: Pki, responder_url: str, tmp_path: Path) -> None:
    r = openssl_ocsp(pki, "-serial", "0x1234567890ABCDEF1234", "-url", f"{responder_url}/ocsp")
    assert r.returncode == 0, r.stderr
    assert "Response verify OK" in r.stderr
    assert "0x1234567890ABCDEF1234: unknown" in r.stdout
    # an issuer we do not serve → unauthorized (RFC 6960 §2.3, RFC 5019 §2.2.3)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA")])
    now = datetime.now(UTC)
    foreign = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(key, hashes.SHA256()))
    (tmp_path / "foreign.pem").write_text(pem(foreign))
    r = subprocess.run(["openssl", "ocsp", "-issuer", str(tmp_path / "foreign.pem"), "-serial", "42",
                        "-url", f"{responder_url}/ocsp"], capture_output=True, text=True)
    assert "Responder Error: unauthorized (6)" in r.stdout + r.stderr
    body = (ocsp.OCSPRequestBuilder().add_certificate_by_hash(b"\x01" * 20, b"\x02" * 20, 5, hashes.SHA1())
            .build().public_bytes(serialization.Encoding.DER))
    assert ocsp.load_der_ocsp_response(post(responder_url, body).content).response_status == \
        ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_mixed_issuers_foreign_certid_is_unknown(ctx: Context, pki: Pki) -> None:
    # Two CertIDs, one of ours and one of a foreign issuer: one signer per response (RFC 6960
    # §4.2.2.2), so the foreign one is 'unknown' (§2.2). Built by hand: cryptography builds one CertID.
    good = der_request(pki, "good", nonce=b"n" * 16)
    req = parse_request(good)
    from pki.ocsp import certid_der, der_oid, seq, tlv

    foreign = certid_der("sha1", b"\x01" * 20, b"\x02" * 20, 7)
    nonce_ext = tlv(0xA2, seq(seq(der_oid("1.3.6.1.5.5.7.48.1.2"), tlv(0x04, req.nonce_ext_value or b""))))
    der = seq(seq(seq(seq(req.cert_ids[0].raw), seq(foreign)), nonce_ext))
    ans = responder_for(ctx).respond(der)
    assert ans.successful
    resp = ocsp.load_der_ocsp_response(ans.der)
    statuses = [r.certificate_status for r in resp.responses]
    assert statuses == [ocsp.OCSPCertStatus.GOOD, ocsp.OCSPCertStatus.UNKNOWN]


def test_padded_serial_is_answered_with_a_decodable_certid(ctx: Context, pki: Pki) -> None:
    """A CertID whose serial INTEGER is not minimal (X.690 §8.3.2) is answered for the same serial with
    the CertID re-encoded: echoing it verbatim made the whole response undecodable (CI, fuzz over
    keep-alive). Known serial, unknown serial, unknown issuer, with and without a nonce."""
    from pki.ocsp import der_int, der_oid, seq, tlv

    cid = parse_request(der_request(pki, "good")).cert_ids[0]
    sha1 = seq(der_oid("1.3.14.3.2.26"), b"\x05\x00")
    body_of = der_int(cid.serial)[2:]
    cases = {
        "known, zero-padded": (cid.name_hash, cid.key_hash, b"\x00" + body_of, cid.serial),
        "unknown, zero-padded": (cid.name_hash, cid.key_hash, b"\x00\x00\x05", 5),
        "negative, ff-padded": (cid.name_hash, cid.key_hash, b"\xff\xff\x85", -123),
        "foreign issuer": (b"\x01" * 20, b"\x02" * 20, b"\x00\x07", 7),
    }
    nonce_ext = tlv(0xA2, seq(seq(der_oid("1.3.6.1.5.5.7.48.1.2"), tlv(0x04, tlv(0x04, b"n" * 16)))))
    for name, (nh, kh, serial_body, serial) in cases.items():
        certid = seq(sha1, tlv(0x04, nh), tlv(0x04, kh), tlv(0x02, serial_body))
        for tail in (b"", nonce_ext):
            ans = responder_for(ctx).respond(seq(seq(seq(seq(certid)), tail)))
            resp = ocsp.load_der_ocsp_response(ans.der)
            if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
                assert [r.serial_number for r in resp.responses] == [serial], name
            else:
                assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED, name


def test_nonce_echo_and_rfc8954_bounds(pki: Pki, responder_url: str) -> None:
    nonce = secrets.token_bytes(32)
    resp = ocsp.load_der_ocsp_response(post(responder_url, der_request(pki, "good", nonce=nonce)).content)
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    for bad in (b"", secrets.token_bytes(33)):  # RFC 8954 §2.1: 1..32 octets
        resp = ocsp.load_der_ocsp_response(post(responder_url, der_request(pki, "good", nonce=bad)).content)
        assert resp.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    # without a nonce: no nonce extension in the response
    resp = ocsp.load_der_ocsp_response(post(responder_url, der_request(pki, "good")).content)
    assert len(resp.extensions) == 0


def test_malformed_truncated_oversized_never_500(pki: Pki, responder_url: str) -> None:
    good = der_request(pki, "good")
    cases = {
        "empty": b"",
        "garbage": b"hello, responder",
        "truncated": good[:-3],
        "trailing": good + b"\x00",
        "wrong outer tag": b"\x31" + good[1:],
        "indefinite length": b"\x30\x80" + good[2:] + b"\x00\x00",
        "huge length": b"\x30\x84\xff\xff\xff\xff" + good[2:],
        "not ocsp": base64.b64decode(base64.b64encode(pem(pki.issuer_cert).encode())),
    }
    for name, body in cases.items():
        r = post(responder_url, body)
        assert r.status_code == 200, name
        assert ocsp.load_der_ocsp_response(r.content).response_status == \
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST, name
    big = post(responder_url, good + b"\x00" * 11_000)  # over 10 KiB: refused unread
    assert big.status_code == 413
    assert ocsp.load_der_ocsp_response(big.content).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    for path in ("", "/", "/not%20base64!", "/" + "A" * 20, "/MA=="):
        r = httpx.get(f"{responder_url}/ocsp{path}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/ocsp-response", path
        assert ocsp.load_der_ocsp_response(r.content).response_status == \
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST, path
        assert r.headers["cache-control"] == "no-store"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_requests_get_an_ocsp_answer(data: st.DataObject, ctx: Context, pki: Pki) -> None:
    """Mutations of a valid request (and random bytes) never raise and always yield a parseable
    OCSPResponse with a defined status."""
    base = der_request(pki, "good", nonce=b"x" * 16)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "random"]))
    if kind == "random":
        body = data.draw(st.binary(max_size=300))
    else:
        pos = data.draw(st.integers(0, len(base) - 1))
        if kind == "flip":
            body = base[:pos] + bytes([base[pos] ^ data.draw(st.integers(1, 255))]) + base[pos + 1:]
        elif kind == "truncate":
            body = base[:pos]
        else:
            body = base[:pos] + data.draw(st.binary(min_size=1, max_size=4)) + base[pos:]
    ans = responder_for(ctx).respond(body)
    resp = ocsp.load_der_ocsp_response(ans.der)
    assert resp.response_status in (ocsp.OCSPResponseStatus.SUCCESSFUL, ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
                                    ocsp.OCSPResponseStatus.UNAUTHORIZED)


# -- contents, linting, sizes ---------------------------------------------------------------------------


def test_pkilint_finds_nothing(ctx: Context, pki: Pki, responder_url: str, tmp_path: Path) -> None:
    ensure_revoked(ctx, pki, "revoke")
    bodies = {
        "good": der_request(pki, "good"),
        "good-sha256-nonce": der_request(pki, "good", alg=hashes.SHA256(), nonce=b"z" * 16),
        "revoked": der_request(pki, "revoke"),
        "several": _multi(pki),
        "unknown": ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            *_issuer_hashes(pki), 0x1234, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER),
    }
    for name, body in bodies.items():
        der = post(responder_url, body).content
        assert ocsp.load_der_ocsp_response(der).response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, name
        rc, report = pkilint_ocsp(der, tmp_path)
        assert rc == 0, f"{name}: {report}"


def ensure_revoked(ctx: Context, pki: Pki, name: str) -> None:
    if ctx.engine.get_certificate(pki.leaves[name].serial, "cpo-sub2").status == "valid":
        ctx.engine.revoke(pki.leaves[name].serial, "keyCompromise", issuer="cpo-sub2")


def _issuer_hashes(pki: Pki) -> tuple[bytes, bytes]:
    req = ocsp.OCSPRequestBuilder().add_certificate(pki.leaves["good"].cert, pki.issuer_cert, hashes.SHA1()).build()
    return req.issuer_name_hash, req.issuer_key_hash


def _multi(pki: Pki) -> bytes:
    parts = [parse_request(der_request(pki, n)).cert_ids[0].raw for n in ("good", "good2", "revoke")]
    from pki.ocsp import seq

    return seq(seq(seq(*[seq(c) for c in parts])))


@pytest.mark.parametrize("ca,key", [("cpo-sub2-20", "p521"), ("cpo-sub2-20-ed448", "ed448")])
def test_iso15118_20_chains_verify_and_fit_ocpp(ctx: Context, ca: str, key: str, tmp_path: Path) -> None:
    """P-521/ECDSA-SHA512 and Ed448 signers: openssl verifies, and the response fits OCPP's ocspResult
    (5500 base64 characters)."""
    priv = ec.generate_private_key(ec.SECP521R1()) if key == "p521" else ed448.Ed448PrivateKey.generate()
    leaf = ctx.engine.issue(IssueRequest(profile="secc-20", public_key=priv.public_key(), ca=ca,
                                         subject=SubjectFields(cn=_evseid(), o="Test Org", c="DE", dc="CPO")))
    chain = ctx.engine.chain(ca)
    (tmp_path / "root.pem").write_text(pem(chain[-1]))
    (tmp_path / "chain.pem").write_text("".join(pem(c) for c in chain[:-1]))
    (tmp_path / "issuer.pem").write_text(pem(chain[0]))
    (tmp_path / "leaf.pem").write_text(pem(leaf.cert))
    for alg in (hashes.SHA1(), hashes.SHA512()):
        body = (ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, chain[0], alg)
                .build().public_bytes(serialization.Encoding.DER))
        ans = responder_for(ctx).respond(body)
        assert ans.successful and ans.cert_status == "good"
        assert len(base64.b64encode(ans.der)) <= 5500
        (tmp_path / "resp.der").write_bytes(ans.der)
        r = subprocess.run(["openssl", "ocsp", "-respin", str(tmp_path / "resp.der"), "-issuer",
                            str(tmp_path / "issuer.pem"), f"-{alg.name}", "-cert", str(tmp_path / "leaf.pem"),
                            "-CAfile",
                            str(tmp_path / "root.pem"), "-verify_other", str(tmp_path / "chain.pem")],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
        assert ": good" in r.stdout
        rc, report = pkilint_ocsp(ans.der, tmp_path)
        assert rc == 0, report


def test_stale_or_out_of_step_cache_is_healed(ctx: Context, pki: Pki) -> None:
    """The served response always matches the certificate's status: a stored response left behind by a
    failed hook (or another process) is re-signed on the next request."""
    leaf = pki.leaves["heal"]
    r = responder_for(ctx)
    body = der_request(pki, "heal")
    good_der = r.respond(body).der
    from pki.wiring import OcspOnRevocation

    saved = ctx.engine.revocation_observers
    # simulate a revocation whose OCSP re-signing never ran
    ctx.engine.revocation_observers = tuple(o for o in saved if not isinstance(o, OcspOnRevocation))
    try:
        ctx.engine.revoke(leaf.serial, "keyCompromise", issuer=leaf.issuer)
    finally:
        ctx.engine.revocation_observers = saved
    with ctx.db.session() as s:
        row = s.exec(select(OcspResponseCache).where(OcspResponseCache.issuer == leaf.issuer,
                                                     OcspResponseCache.serial == leaf.serial)).one()
        assert row.der == good_der and row.status == "good"  # the stale 'good' is still stored
    ans = r.respond(body)
    assert ans.cert_status == "revoked"
    assert ocsp.load_der_ocsp_response(ans.der).certificate_status == ocsp.OCSPCertStatus.REVOKED
    # refresh(): responses near nextUpdate are re-signed
    with ctx.db.engine.begin() as conn:
        conn.execute(update(OcspResponseCache.__table__)  # type: ignore[attr-defined]
                     .where(OcspResponseCache.__table__.c.serial == pki.leaves["good2"].serial)  # type: ignore[attr-defined]
                     .values(next_update=utcnow() + timedelta(hours=1)))
    assert r.refresh() >= 1
    with ctx.db.session() as s:
        row = s.exec(select(OcspResponseCache).where(OcspResponseCache.serial == pki.leaves["good2"].serial)).one()
    assert row.next_update > utcnow() + timedelta(hours=ctx.settings.ocsp_validity_hours - 1)


def test_response_fields(ctx: Context, pki: Pki) -> None:
    ans = responder_for(ctx).respond(der_request(pki, "good"))
    resp = ocsp.load_der_ocsp_response(ans.der)
    signer = resp.certificates[0]
    # responderID byKey (RFC 6960 §4.2.1); the delegated signer's certificate is included
    assert resp.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest
    assert resp.responder_name is None
    assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in signer.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert signer.issuer == pki.issuer_cert.subject
    assert resp.next_update_utc is not None
    validity = resp.next_update_utc - resp.this_update_utc
    assert validity <= timedelta(hours=ctx.settings.ocsp_validity_hours)
    assert resp.serial_number == pki.leaves["good"].cert.serial_number


def test_responder_only_process_holds_no_ca_key(ctx: Context, pki: Pki) -> None:
    """The standalone responder (api/ocsp_app.py) signs with OCSP signer keys only."""
    from api.ocsp_app import create_ocsp_app

    rctx = build_context(ctx.settings, migrate=False, responder_only=True)
    url, stop = serve_in_thread(create_ocsp_app(rctx))
    try:
        ensure_revoked(ctx, pki, "revoke")
        for body in (der_request(pki, "good", nonce=b"q" * 8), der_request(pki, "good", alg=hashes.SHA384()),
                     der_request(pki, "revoke")):
            resp = ocsp.load_der_ocsp_response(post(url, body).content)
            assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        get = httpx.get(f"{url}/ocsp/" + urllib.parse.quote(base64.b64encode(der_request(pki, "good")).decode(),
                                                          safe=""))
        assert get.status_code == 200 and "public" in get.headers["cache-control"]
        assert ocsp.load_der_ocsp_response(get.content).certificate_status == ocsp.OCSPCertStatus.GOOD
        from pki.crl import generate_crl

        generate_crl(ctx, "cpo-sub2")  # published by the CA process, served by the responder
        crl = httpx.get(f"{url}/crl/cpo-sub2.crl")
        assert crl.status_code == 200 and crl.headers["content-type"] == "application/pkix-crl"
        assert httpx.get(f"{url}/v1/certificates").status_code == 404  # nothing else is mounted
    finally:
        stop()
    assert all(rctx.engine.cached_ca_signer(h) is None for h in rctx.engine.cas())
    loaded = getattr(rctx.keystore, "_keys", {})
    assert loaded and all(label.startswith("ocsp-") for label in loaded), sorted(loaded)
    from pki.errors import ConfigError

    with pytest.raises(ConfigError):
        rctx.engine.ca_signer(rctx.engine.ca("cpo-sub2"))
    assert isinstance(responder_for(rctx), OcspResponder)


def test_ocpp_serial_readings() -> None:
    assert decode_ocpp_serial("1234") == [0x1234, 1234]
    assert decode_ocpp_serial("ab12") == [0xAB12]
    assert decode_ocpp_serial("0x00AB") == [0xAB]
    assert decode_ocpp_serial("01") == [1]


def test_late_presign_never_overwrites_a_revocation(ctx: Context) -> None:
    """The background pre-signer stores a fresh certificate's 'good' insert-only: a revocation that was
    signed first (on_revoked hook) stays revoked."""
    from tests.conftest import csr_pem

    r = responder_for(ctx)
    assert r.presigner.flush()
    issued = ctx.engine.issue_from_csr("secc", csr_pem("DE*ICE*E9LATE", o="Test CPO", dc="CPO"), actor="test")
    assert r.presigner.flush()
    ctx.engine.revoke(issued.serial, "keyCompromise", issuer=issued.issuer)
    r.presign_new(issued.issuer, [issued.serial])  # a pre-sign arriving late, after the revocation
    with ctx.db.session() as s:
        row = s.exec(select(OcspResponseCache).where(OcspResponseCache.issuer == issued.issuer,
                                                     OcspResponseCache.serial == issued.serial)).one()
    assert row.status == "revoked"
