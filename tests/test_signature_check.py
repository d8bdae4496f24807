"""#23 item 5: every HSM signature is verified against the signer's public key before anything is stored.

The PKCS#11 signer (hsm/pkcs11.py) verifies each signature it returns with the public key it read at lookup and
raises SignatureCheckFailed otherwise; hsm.keystore.certified_signer links that key to the certificate that
names it (CA, OCSP signer, CPS). A faulty token is played by the real SoftHSM2 store with its sign_raw wrapped to
flip one bit of the signature (all keys, or some), a wrong key by a store whose cached public key belongs to
another key. For an issuance (single, batched, TBS template, API), a CRL, an OCSP pre-signature and a live OCSP
answer, a CPS installation and an audit checkpoint: the error is clear, and nothing is stored. The positive
path runs on the same SoftHSM2 token, unpatched.
"""

from __future__ import annotations

import argparse
import base64
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from hsm.errors import SignatureCheckFailed
from hsm.pkcs11 import Pkcs11ECKey, Pkcs11Ed448Key, Pkcs11KeyStore
from hsm.uri import key_label
from pki import audit_sign
from pki.context import Context
from pki.cps.exi import CertificateInstallationReq, MessageHeader, V2GMessage, encode_message
from pki.cps.exi.messages import X509IssuerSerial
from pki.cps.xmldsig import sign_elements
from pki.crl import generate_crl
from pki.issuance import IssueRequest
from pki.ocsp import responder_for
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from pki.store.models import (
    AuditCheckpoint,
    AuditEvent,
    Certificate,
    CertificateAuthority,
    CrlRecord,
    IssuanceIntent,
    OcspResponseCache,
)
from tests.conftest import csr_pem

_CERT = Certificate.__table__  # type: ignore[attr-defined]
_INTENT = IssuanceIntent.__table__  # type: ignore[attr-defined]
_CRL = CrlRecord.__table__  # type: ignore[attr-defined]
_CA = CertificateAuthority.__table__  # type: ignore[attr-defined]
_OCSP = OcspResponseCache.__table__  # type: ignore[attr-defined]
_AUDIT = AuditEvent.__table__  # type: ignore[attr-defined]
_CHECKPOINT = AuditCheckpoint.__table__  # type: ignore[attr-defined]


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


def _store(ctx: Context) -> Pkcs11KeyStore:
    ks = ctx.keystore
    assert isinstance(ks, Pkcs11KeyStore), "these tests run on SoftHSM2"
    return ks


@pytest.fixture
def faulty(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``faulty()``: from now on the token returns signatures with one bit flipped (``labels``: only for
    those keys). Undone at the end of the test."""
    ks = _store(ctx)

    def install(labels: set[str] | None = None) -> None:
        real = ks.sign_raw  # the method, or api/observability's timing wrapper around it

        def flipped(label: str, data: bytes, mechanism: Any) -> bytes:
            sig = bytearray(real(label, data, mechanism))
            if labels is None or label in labels:
                sig[-1] ^= 0x01
            return bytes(sig)

        monkeypatch.setattr(ks, "sign_raw", flipped)

    return install


def _count(ctx: Context, table: Any, *where: Any) -> int:
    with ctx.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _quiet(ctx: Context) -> None:
    """Let the OCSP pre-signer and the CRL scheduler finish what earlier tests queued (they write
    ocsp_response and crl rows; the scheduler's rate bound may hold a CRL back for a second)."""
    responder_for(ctx).presigner.flush()
    assert ctx.crl_scheduler.flush(60)


@dataclass
class Snapshot:
    audit: int
    checkpoints: int
    crls: int
    ocsp: int

    @staticmethod
    def take(ctx: Context) -> Snapshot:
        _quiet(ctx)
        return Snapshot(_count(ctx, _AUDIT), _count(ctx, _CHECKPOINT), _count(ctx, _CRL), _count(ctx, _OCSP))


def _evseid() -> str:
    return f"DE*SIG*E{_a(6)}"


def _intent_states(ctx: Context, cn: str) -> list[str]:
    with ctx.db.engine.connect() as conn:
        rows = conn.execute(select(_INTENT.c.state).where(_INTENT.c.subject.like(f"%CN={cn}%"))).all()
    return [r[0] for r in rows]


def _assert_nothing_issued(ctx: Context, before: Snapshot, *cns: str) -> None:
    for cn in cns:
        assert _count(ctx, _CERT, _CERT.c.subject.like(f"%CN={cn}%")) == 0, cn
        states = _intent_states(ctx, cn)
        assert states and set(states) == {"failed"}, (cn, states)  # the intent ends failed, not issued
    after = Snapshot.take(ctx)
    assert after.audit == before.audit  # no certificate.issue event
    assert after.ocsp == before.ocsp  # nothing pre-signed for a certificate that does not exist


# -- the signer itself --------------------------------------------------------------------------------------


def test_signatures_verify_on_the_real_token(ctx: Context) -> None:
    """Positive path on SoftHSM2: the signer returns signatures that verify (P-256, P-521, Ed448), and what
    the services store verifies with the certificate that names the key."""
    ks = _store(ctx)
    for name in ("cpo-sub2", "v2g-root-20", "v2g-root-20-ed448"):
        h = ctx.engine.ca(name)
        signer = ctx.engine.ca_signer(h)
        pub = h.cert.public_key()
        if isinstance(signer, ed448.Ed448PrivateKey):
            assert isinstance(signer, Pkcs11Ed448Key) and isinstance(pub, ed448.Ed448PublicKey)
            pub.verify(signer.sign(b"data"), b"data")
        else:
            assert isinstance(signer, Pkcs11ECKey) and isinstance(pub, ec.EllipticCurvePublicKey)
            algo = hashes.SHA512() if pub.curve.name == "secp521r1" else hashes.SHA256()
            pub.verify(signer.sign(b"data", ec.ECDSA(algo)), b"data", ec.ECDSA(algo))
    assert ks.public_key(key_label(ctx.engine.ca("cpo-sub2").row.key_uri)) == ctx.engine.ca("cpo-sub2").cert.public_key()

    issued = ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"), actor="test")
    ca = ctx.engine.ca(issued.issuer).cert
    issued.cert.verify_directly_issued_by(ca)
    info = generate_crl(ctx, issued.issuer)
    with ctx.db.engine.connect() as conn:
        crl_der = conn.execute(select(_CRL.c.der).where(_CRL.c.issuer == issued.issuer,
                                                        _CRL.c.number == info.number)).scalar_one()
    assert x509.load_der_x509_crl(bytes(crl_der)).is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    _quiet(ctx)
    with ctx.db.engine.connect() as conn:
        ocsp_der = conn.execute(select(_OCSP.c.der).where(_OCSP.c.issuer == issued.issuer,
                                                          _OCSP.c.serial == issued.serial)).scalar_one()
    resp = ocsp.load_der_ocsp_response(bytes(ocsp_der))
    signer_cert = resp.certificates[0]
    signer_cert.verify_directly_issued_by(ca)
    spub = signer_cert.public_key()
    assert isinstance(spub, ec.EllipticCurvePublicKey)
    spub.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    cp = audit_sign.checkpoint(ctx)
    assert cp is not None and audit_sign.verify_all(ctx).ok


@pytest.mark.parametrize("alg", ["p256", "ed448"])
def test_signer_refuses_a_signature_that_does_not_verify(ctx: Context, faulty: Callable[..., None],
                                                         alg: str, caplog: pytest.LogCaptureFixture) -> None:
    """A faulty token (a bit flipped) and a store whose cached public key belongs to another key: the
    signer raises SignatureCheckFailed naming the key, logs it, and forgets the key's cached handles."""
    ks = _store(ctx)
    label = key_label(ctx.engine.ca("cpo-sub2" if alg == "p256" else "v2g-root-20-ed448").row.key_uri)

    def sign(signer: Any) -> bytes:
        if isinstance(signer, ed448.Ed448PrivateKey):
            return signer.sign(b"tbs")
        return signer.sign(b"tbs", ec.ECDSA(hashes.SHA256()))  # type: ignore[no-any-return]

    # (1) the cached public key is another key's (a stale handle, a token re-initialised under the label)
    ks.public_key(label)
    priv, _pub, key_alg = ks._keys[label]
    other = (ed448.Ed448PrivateKey.generate() if alg == "ed448" else ec.generate_private_key(ec.SECP256R1()))
    ks._keys[label] = (priv, other.public_key(), key_alg)
    with pytest.raises(SignatureCheckFailed, match="signature that does not verify") as err:
        sign(ks.signer(ks.uri(label)))
    assert err.value.label == label and label in str(err.value)
    assert label not in ks._keys  # looked up afresh next time
    assert "does not verify" in caplog.text
    sign(ks.signer(ks.uri(label)))  # the real pair again: fine

    # (2) the token returns a damaged signature
    faulty({label})
    with pytest.raises(SignatureCheckFailed, match="nothing was stored"):
        sign(ks.signer(ks.uri(label)))


# -- issuance -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["single", "batch", "template"])
def test_issuance_with_a_bad_signature_stores_nothing(ctx: Context, faulty: Callable[..., None], path: str) -> None:
    if path == "template":
        # A first leaf of the shape is linted in full and leaves a TBS template; the next is encoded by it.
        ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"), actor="test")
    before = Snapshot.take(ctx)
    faulty()
    cns = [_evseid() for _ in range(3 if path == "batch" else 1)]
    with pytest.raises(SignatureCheckFailed, match="does not verify"):
        if path == "batch":
            from pki.csr import check_csr, parse_csr

            profile = ctx.engine.profiles.get("secc")
            reqs = []
            for cn in cns:
                checked = check_csr(profile, parse_csr(csr_pem(cn, dc="CPO")))
                reqs.append(IssueRequest(profile="secc", public_key=checked.public_key, subject=checked.subject,
                                         identifier=checked.identifier, actor="test"))
            ctx.engine.issue_many(reqs)
        else:
            ctx.engine.issue_from_csr("secc", csr_pem(cns[0], dc="CPO"), actor="test")
    _assert_nothing_issued(ctx, before, *cns)


def test_ca_key_that_is_not_the_certificates_key_is_refused_before_signing(ctx: Context) -> None:
    """The token holds another key under the CA's label (re-initialised, restored from another backup): the
    engine compares the token's public key with the CA certificate's before using it. Nothing is signed."""
    ks = _store(ctx)
    h = ctx.engine.ca("cpo-sub2")
    label = key_label(h.row.key_uri)
    ks.public_key(label)
    priv, _pub, key_alg = ks._keys[label]
    ctx.engine.forget_ca_signer(h)
    ks._keys[label] = (priv, ec.generate_private_key(ec.SECP256R1()).public_key(), key_alg)
    before = Snapshot.take(ctx)
    cn = _evseid()
    try:
        with pytest.raises(SignatureCheckFailed, match="is not the key of CA 'cpo-sub2'"):
            ctx.engine.issue_from_csr("secc", csr_pem(cn, dc="CPO"), ca="cpo-sub2", actor="test")
        assert ctx.engine.cached_ca_signer(h) is None  # not cached: the next issuance looks again
    finally:
        ks._keys.pop(label, None)
    _assert_nothing_issued(ctx, before, cn)
    ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"), ca="cpo-sub2", actor="test")  # the real key


# -- the API and the CLI ------------------------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    h: dict[str, dict[str, str]]
    prov: dict[str, str]


@pytest.fixture(scope="module")
def api(ctx: Context) -> Iterator[Api]:
    tag = secrets.token_hex(3)
    prov = {"emsp": f"DE{_a(3)}", "oem": _a(3), "cpo": f"DE*{_a(3)}"}
    h = {}
    for who in ("emsp", "oem", "cpo"):
        create_org(ctx.db, f"sig-{who}-{tag}", who, [prov[who]])
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, f'sig-{who}-{tag}')[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield Api(client, h, prov)


def test_api_answers_503_with_retry_after(ctx: Context, api: Api, faulty: Callable[..., None]) -> None:
    before = Snapshot.take(ctx)
    faulty()
    pcid = api.prov["oem"] + _a(14)
    r = api.client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM").decode(), "profile": "oem-prov"},
                        headers=api.h["oem"])
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/hsm-signature-invalid")
    assert body["detail"] == "the HSM returned a signature that does not verify; nothing was stored"
    assert "pkcs11" not in r.text.lower() and "label" not in r.text  # no internals
    _assert_nothing_issued(ctx, before, pcid)


def test_cli_exits_6_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pki import cli

    def boom(_args: argparse.Namespace) -> int:
        raise SignatureCheckFailed("the HSM returned a signature that does not verify (key 'ca-x' of token 't'); "
                                   "nothing was stored", label="ca-x")

    class Parser:
        def parse_args(self, _argv: object) -> argparse.Namespace:
            return argparse.Namespace(fn=boom)

    monkeypatch.setattr(cli, "build_parser", lambda: Parser())
    assert cli.main([]) == 6
    err = capsys.readouterr().err
    assert err.startswith("v2gpki: error: the HSM returned a signature that does not verify") and "ca-x" in err


# -- CRL ----------------------------------------------------------------------------------------------------


def test_crl_with_a_bad_signature_stores_nothing(ctx: Context, faulty: Callable[..., None]) -> None:
    """The streamed CRL: hashed while read back, the digest signed (Prehashed); the signer verifies it."""
    for name in ("cpo-sub2", "v2g-root-20-ed448"):  # ECDSA over a digest, and pure Ed448 over the whole TBS
        before = Snapshot.take(ctx)
        with ctx.db.engine.connect() as conn:
            number = conn.execute(select(_CA.c.crl_number).where(_CA.c.name == name)).scalar_one()
        faulty({key_label(ctx.engine.ca(name).row.key_uri)})
        with pytest.raises(SignatureCheckFailed):
            generate_crl(ctx, name)
        with ctx.db.engine.connect() as conn:
            assert conn.execute(select(_CA.c.crl_number).where(_CA.c.name == name)).scalar_one() == number
        assert Snapshot.take(ctx) == before


# -- OCSP ---------------------------------------------------------------------------------------------------


def test_ocsp_presigned_and_live_answers_with_a_bad_signature_store_nothing(
        ctx: Context, faulty: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> None:
    r = responder_for(ctx)
    iss = r.issuer("cpo-sub2")
    assert iss is not None and iss.signer is not None
    faulty({iss.signer.label})  # the OCSP signer's key only: the CA still signs well
    before = Snapshot.take(ctx)
    # the pre-signer thread after an issuance: logged, nothing stored
    issued = ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"), ca="cpo-sub2", actor="test")
    _quiet(ctx)

    def stored() -> int:
        return _count(ctx, _OCSP, _OCSP.c.issuer == issued.issuer, _OCSP.c.serial == issued.serial)

    assert stored() == 0

    # pre-signing (after issuance, the refresh worker): the error, nothing stored
    with pytest.raises(SignatureCheckFailed):
        r.presign(issued.issuer, [issued.serial])
    with pytest.raises(SignatureCheckFailed):
        r.presign_new(issued.issuer, [issued.serial])
    assert stored() == 0

    # live answers (a missing stored response; a nonce): tryLater, nothing stored, nothing cached
    issuer_cert = ctx.engine.ca(issued.issuer).cert
    plain = (ocsp.OCSPRequestBuilder().add_certificate(issued.cert, issuer_cert, hashes.SHA1()).build()
             .public_bytes(serialization.Encoding.DER))
    nonce = (ocsp.OCSPRequestBuilder().add_certificate(issued.cert, issuer_cert, hashes.SHA1())
             .add_extension(x509.OCSPNonce(secrets.token_bytes(16)), critical=False).build()
             .public_bytes(serialization.Encoding.DER))
    for der in (plain, nonce):
        ans = r.respond(der)
        assert ans.status == "tryLater" and not ans.successful
        assert ocsp.load_der_ocsp_response(ans.der).response_status == ocsp.OCSPResponseStatus.TRY_LATER
    assert stored() == 0
    assert Snapshot.take(ctx).audit == before.audit + 1  # the issuance's own event, nothing else

    # the token well again: the live answer is signed, verifies, and is stored
    monkeypatch.undo()
    ans = r.respond(plain)
    assert ans.successful
    resp = ocsp.load_der_ocsp_response(ans.der)
    spub = resp.certificates[0].public_key()
    assert isinstance(spub, ec.EllipticCurvePublicKey)
    spub.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    assert stored() == 1


# -- CPS ----------------------------------------------------------------------------------------------------


def _installation(ctx: Context, api: Api) -> tuple[str, str, bytes]:
    """A vehicle (OEM provisioning certificate) with a contract; the signed CertificateInstallationReq."""
    pcid = api.prov["oem"] + _a(14)
    key = ec.generate_private_key(ec.SECP256R1())
    r = api.client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM", key=key).decode(),
                                                 "profile": "oem-prov"}, headers=api.h["oem"])
    assert r.status_code == 201, r.text
    oem_cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    emaid = api.prov["emsp"] + _a(9)
    r = api.client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid,
                                               "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                        headers=api.h["emsp"])
    assert r.status_code == 201, r.text
    ids = tuple(X509IssuerSerial(c.subject.rfc4514_string(), c.serial_number)
                for c in (ctx.engine.ca("v2g-root").cert, ctx.engine.ca("mo-root").cert))
    body = CertificateInstallationReq("id1", oem_cert.public_bytes(serialization.Encoding.DER), ids)
    exi = encode_message(V2GMessage(MessageHeader(b"\x01" * 8, signature=sign_elements([body], key)), body))
    return pcid, emaid, exi


def _install(api: Api, exi: bytes) -> Any:
    return api.client.post("/ocpp/v201/get-15118-ev-certificate",
                           json={"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": "Install",
                                 "exiRequest": base64.b64encode(exi).decode()}, headers=api.h["cpo"])


def _cps_labels(ctx: Context) -> set[str]:
    """The -2 CPS signers' key labels (one after `v2gpki init`; more after renewals)."""
    with ctx.db.engine.connect() as conn:
        uris = conn.execute(select(_CERT.c.key_uri).where(_CERT.c.profile == "cps-leaf",
                                                          _CERT.c.status == "valid")).scalars().all()
    labels = {key_label(u) for u in uris if u}
    assert labels
    return labels


@pytest.mark.parametrize("fault", ["token", "cps-key-swapped"])
def test_cps_installation_with_a_bad_signature_stores_nothing(ctx: Context, api: Api, faulty: Callable[..., None],
                                                              fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A faulty token: the contract certificate's own signature fails first, so nothing is issued. The CPS
    key not being the CPS certificate's key: refused before the contract certificate is issued."""
    _pcid, emaid, exi = _installation(ctx, api)
    before = Snapshot.take(ctx)
    ks = _store(ctx)
    labels = _cps_labels(ctx)
    if fault == "token":
        faulty()
    else:
        for label in labels:
            ks.public_key(label)
            priv, _pub, key_alg = ks._keys[label]
            ks._keys[label] = (priv, ec.generate_private_key(ec.SECP256R1()).public_key(), key_alg)
    try:
        r = _install(api, exi)
    finally:
        if fault != "token":
            for label in labels:
                ks._keys.pop(label, None)
    assert r.status_code == 503, r.text
    assert r.json()["type"].endswith("/hsm-signature-invalid") and r.headers["retry-after"]
    assert _count(ctx, _CERT, _CERT.c.identifier == emaid) == 0  # no contract certificate
    assert Snapshot.take(ctx).audit == before.audit
    if fault == "token":
        assert set(_intent_states(ctx, emaid)) == {"failed"}
    else:
        assert _intent_states(ctx, emaid) == []  # refused before any intent
    monkeypatch.undo()
    r = _install(api, exi)  # the token well again: installed
    assert r.status_code == 200 and r.json()["status"] == "Accepted", r.text
    assert _count(ctx, _CERT, _CERT.c.identifier == emaid) == 1


def test_cps_signature_that_does_not_verify_is_never_sent(ctx: Context, api: Api,
                                                          faulty: Callable[..., None]) -> None:
    """Only the CPS key faulty: the contract certificate (signed well by the MO CA) is issued, but the
    response whose signature does not verify is refused with the clear error, not sent to the vehicle."""
    _pcid, emaid, exi = _installation(ctx, api)
    faulty(_cps_labels(ctx))
    r = _install(api, exi)
    assert r.status_code == 503 and r.json()["type"].endswith("/hsm-signature-invalid"), r.text
    assert "exiResponse" not in r.text


# -- audit checkpoint ---------------------------------------------------------------------------------------


def test_audit_checkpoint_with_a_bad_signature_stores_nothing(ctx: Context, faulty: Callable[..., None]) -> None:
    audit_sign.ensure_audit_key(ctx)
    ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"), actor="test")  # a new head to sign
    path = ctx.settings.audit_checkpoint_file
    external = path.read_bytes() if path.exists() else b""
    before = Snapshot.take(ctx)
    faulty({audit_sign.AUDIT_KEY})
    with pytest.raises(SignatureCheckFailed):
        audit_sign.checkpoint(ctx)
    assert Snapshot.take(ctx) == before
    assert (path.read_bytes() if path.exists() else b"") == external
