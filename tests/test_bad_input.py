"""Bad issuance requests: each gets its typed pki error and leaves nothing behind.

"Nothing behind" is counted, not assumed: certificate rows, issuance-intent rows, audit events and the
token's objects are the same before and after. The same inputs through `v2gpki issue` exit non-zero
with one `v2gpki: error:` line on stderr.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func
from sqlmodel import select

from api.problems import status_of
from hsm.errors import HSMUnavailable
from hsm.pkcs11 import Pkcs11ECKey, Pkcs11KeyStore
from pki.context import Context
from pki.csr import check_csr, parse_csr
from pki.errors import (
    BadCSR,
    BadKey,
    BadSignature,
    BadSubject,
    CertificateTooLarge,
    PKIError,
    UnknownProfile,
)
from pki.issuance import Engine, IssueRequest
from pki.profiles import ProfileSet
from pki.store.models import AuditEvent, Certificate, IssuanceIntent
from tests.conftest import REPO, cli_env, csr_pem, run_cli

EVSEID = "DE*ICE*E45B*78C"
# A public URL a deployment might really configure: every leaf carries it twice (AIA OCSP and CRLDP),
# so a long one pushes a SECC certificate past ISO 15118-2's 800 bytes [V2G2-010].
LONG_URL = "https://pki.operator.example.com/" + "/".join(["plug-and-charge-services"] * 16)


@functools.cache
def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def _der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def _tampered_signature() -> bytes:
    """Flip one bit of the last byte of the signature BIT STRING: still well-formed DER, bad signature."""
    der = x509.load_pem_x509_csr(csr_pem(EVSEID, dc="CPO")).public_bytes(serialization.Encoding.DER)
    return _der_to_pem(der[:-1] + bytes([der[-1] ^ 0x01]))


def _tampered_subject() -> bytes:
    """Change the requested EVSEID after signing: the signature covers the subject (RFC 2986 §4.2)."""
    der = x509.load_pem_x509_csr(csr_pem(EVSEID, dc="CPO")).public_bytes(serialization.Encoding.DER)
    assert der.count(b"E45B") == 1
    return _der_to_pem(der.replace(b"E45B", b"E45C"))


def _multi_valued_rdn() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, EVSEID), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CPO")])])
    return _pem(x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()))


def _no_cn() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CPO")])
    return _pem(x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()))


def _certificate_pem() -> bytes:
    """A certificate where a CSR belongs (a common operator mistake)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, EVSEID)])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Case:
    id: str
    profile: str
    csr: Callable[[], bytes]
    error: type[PKIError]
    match: str
    env: dict[str, str] = field(default_factory=dict)  # extra CLI environment


CASES = [
    Case("garbage-pem", "secc",
         lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS!!\n-----END CERTIFICATE REQUEST-----\n",
         BadCSR, "could not be decoded"),
    Case("garbage-bytes", "secc", lambda: b"\x00\xffnot a csr at all\x01", BadCSR, "neither PEM, DER nor base64"),
    Case("empty", "secc", lambda: b"", BadCSR, "could not be decoded"),
    Case("truncated-der", "secc",
         lambda: x509.load_pem_x509_csr(csr_pem(EVSEID, dc="CPO")).public_bytes(serialization.Encoding.DER)[:60],
         BadCSR, "could not be decoded"),
    Case("certificate-not-csr", "secc", _certificate_pem, BadCSR, "not a CERTIFICATE REQUEST"),
    Case("oversized", "secc", lambda: b"A" * 9000, BadCSR, "too large"),
    Case("tampered-signature", "secc", _tampered_signature, BadSignature, "does not verify"),
    Case("tampered-subject", "secc", _tampered_subject, BadSignature, "does not verify"),
    # ISO 15118-2 [V2G2-007]: secp256r1 only.
    Case("rsa-key", "secc", lambda: csr_pem(EVSEID, dc="CPO", key=_rsa()), BadKey, "RSA"),
    Case("p384-key", "secc", lambda: csr_pem(EVSEID, dc="CPO", key=ec.generate_private_key(ec.SECP384R1())),
         BadKey, "secp384r1"),
    Case("p521-key-for-p256-profile", "secc",
         lambda: csr_pem(EVSEID, dc="CPO", key=ec.generate_private_key(ec.SECP521R1())), BadKey, "p521"),
    Case("ed448-key-for-p256-profile", "contract",
         lambda: csr_pem("DE8AA1A2B3C4D5", dc="MO", key=ed448.Ed448PrivateKey.generate()), BadKey, "ed448"),
    Case("rsa-key-for-20-profile", "secc-20", lambda: csr_pem(EVSEID, dc="CPO", key=_rsa()), BadKey, "RSA"),
    Case("cn-not-evseid", "secc", lambda: csr_pem("charger-17", dc="CPO"), BadSubject, "EVSEID"),
    Case("cn-not-emaid", "contract", lambda: csr_pem("DE-8AA1A2B3C4D5", dc="MO"), BadSubject, "EMAID"),
    Case("cn-not-pcid", "oem-prov", lambda: csr_pem("WP0123", dc="OEM"), BadSubject, "PCID"),
    Case("dc-mo-in-secc", "secc", lambda: csr_pem(EVSEID, dc="MO"), BadSubject, "DC=MO"),
    Case("no-cn", "secc", _no_cn, BadSubject, "no CN"),
    Case("multi-valued-rdn", "secc", _multi_valued_rdn, BadSubject, "multi-valued"),
    Case("unknown-profile", "secc-21", lambda: csr_pem(EVSEID, dc="CPO"), UnknownProfile, "unknown profile"),
    Case("over-800-bytes-long-url", "secc", lambda: csr_pem(EVSEID, dc="CPO"), CertificateTooLarge, "800",
         env={"V2GPKI_PUBLIC_URL": LONG_URL}),
]


# The brief's list of bad inputs, through the CLI (the rest are covered at engine level above; each CLI
# run costs an interpreter start).
CLI_CASES = {"garbage-pem", "tampered-signature", "rsa-key", "p384-key", "cn-not-evseid", "cn-not-emaid",
             "cn-not-pcid", "dc-mo-in-secc", "unknown-profile", "over-800-bytes-long-url"}


def _state(ctx: Context) -> tuple[int, int, int, list[tuple[int, str]]]:
    """Rows that issuance writes, and every object in the token (keys of any class)."""
    with ctx.db.session() as s:
        certs = s.exec(select(func.count()).select_from(Certificate)).one()
        intents = s.exec(select(func.count()).select_from(IssuanceIntent)).one()
        events = s.exec(select(func.count()).select_from(AuditEvent)).one()
    ks = ctx.keystore
    assert isinstance(ks, Pkcs11KeyStore)
    objects = ks.session_call(lambda sess: sorted((int(o.object_class), str(o.label)) for o in sess.get_objects()))
    return certs, intents, events, objects


def _engine_for(ctx: Context, case: Case) -> Engine:
    url = case.env.get("V2GPKI_PUBLIC_URL")
    if url is None:
        return ctx.engine
    return Engine(ctx.db, ctx.keystore, ctx.profiles, url, pkilint_mode="every")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_and_leaves_nothing(ctx: Context, case: Case) -> None:
    engine = _engine_for(ctx, case)
    data = case.csr()
    before = _state(ctx)
    with pytest.raises(case.error, match=case.match) as exc_info:
        engine.issue_from_csr(case.profile, data, actor="test")
    assert type(exc_info.value) is case.error  # the precise type, not just a parent class
    assert (status_of(exc_info.value) or 500) < 500  # a caller's mistake, not a server error (api/problems.py)
    assert _state(ctx) == before


def test_default_secc_fits_but_long_url_does_not(ctx: Context) -> None:
    """The 800-byte case above is caused by the URL alone: the same request fits with the default URL."""
    issued = ctx.engine.issue_from_csr("secc", csr_pem(EVSEID, dc="CPO"), actor="test")
    assert len(issued.der) <= 800
    long_engine = Engine(ctx.db, ctx.keystore, ctx.profiles, LONG_URL, pkilint_mode="every")
    with pytest.raises(CertificateTooLarge) as exc_info:
        long_engine.issue_from_csr("secc", csr_pem(EVSEID, dc="CPO"), actor="test")
    size = exc_info.value.context["size"]
    assert isinstance(size, int) and size > 800


def test_profile_with_tiny_size_limit_refuses_before_signing(ctx: Context) -> None:
    """A profile's own max_der_size is enforced on the linted twin, before any intent or signature."""
    tiny = ProfileSet({**ctx.profiles.profiles,
                       "secc": ctx.profiles.get("secc").model_copy(update={"max_der_size": 400})})
    engine = Engine(ctx.db, ctx.keystore, tiny, ctx.settings.public_base(), pkilint_mode="every")
    before = _state(ctx)
    with pytest.raises(CertificateTooLarge, match="allows 400"):
        engine.issue_from_csr("secc", csr_pem(EVSEID, dc="CPO"), actor="test")
    assert _state(ctx) == before


# -- the same through the CLI ----------------------------------------------------------------------------


def _tiny_policies(tmp: Path) -> Path:
    """A copy of policies/ whose SECC profile allows 400 bytes (an operator's policy file)."""
    d = tmp / "policies"
    shutil.copytree(REPO / "pki" / "policies", d)
    f = d / "profiles-iso15118-2.yaml"
    data = yaml.safe_load(f.read_text())
    data["profiles"]["secc"]["max_der_size"] = 400
    f.write_text(yaml.safe_dump(data))
    return d


def test_cli_issue_bad_input_exits_nonzero_with_one_line(sqlite_ctx: Context, tmp_path: Path) -> None:
    """The bad inputs through the real `v2gpki issue`. One backend: the CLI refuses all of them before any
    database write (proven for both backends above), and each run costs ~1.5 s of interpreter start."""
    ctx = sqlite_ctx
    cases = [*(c for c in CASES if c.id in CLI_CASES), Case("tiny-policy", "secc", lambda: csr_pem(EVSEID, dc="CPO"), CertificateTooLarge, "400",
                          env={"V2GPKI_POLICIES_DIR": str(_tiny_policies(tmp_path))}),
             Case("missing-file", "secc", lambda: b"", BadCSR, "file not found")]
    jobs = []
    for case in cases:
        f = tmp_path / f"{case.id}.csr"
        if case.id != "missing-file":
            f.write_bytes(case.csr())
        jobs.append((case, ["issue", "--profile", case.profile, "--csr", str(f)], cli_env(ctx, **case.env)))
    before = _state(ctx)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda j: (j[0], run_cli(j[1], j[2])), jobs))
    failures = []
    for case, res in results:
        lines = res.stderr.splitlines()
        # Exit 3 = bad input / policy refusal (pki/cli.py); one line, no traceback, nothing on stdout.
        if (res.returncode != 3 or len(lines) != 1 or not lines[0].startswith("v2gpki: error: ")
                or case.match not in lines[0] or res.stdout):
            failures.append(f"{case.id}: rc={res.returncode} stdout={res.stdout[:80]!r} stderr={res.stderr!r}")
    assert not failures, "\n".join(failures)
    assert _state(ctx) == before


# -- a failure at the token leaves intents that say so ----------------------------------------------------


class _FailingKey(Pkcs11ECKey):
    """The CA's token key, failing from its ``ok``-th signature on (the token went away mid-batch)."""

    def __init__(self, real: Pkcs11ECKey, ok: int) -> None:
        super().__init__(real._store, real._label, real.public_key())
        self.left = ok

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if self.left == 0:
            raise HSMUnavailable("HSM unavailable: test")
        self.left -= 1
        return super().sign(data, signature_algorithm)


def test_token_failure_mid_batch_stores_nothing_and_marks_intents(ctx: Context,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.issue_many: the first certificate is signed, the second signature fails. Nothing is stored;
    the signed-but-unstored intent stays 'pending' (the token did sign that serial), the rest are 'failed'."""
    engine = Engine(ctx.db, ctx.keystore, ctx.profiles, ctx.settings.public_base(), pkilint_mode="every")
    real = engine.ca_signer(engine.ca("cpo-sub2"))
    assert isinstance(real, Pkcs11ECKey)
    failing = _FailingKey(real, ok=1)
    monkeypatch.setattr(engine, "ca_signer", lambda handle: failing)
    profile = ctx.profiles.get("secc")
    reqs = []
    for n in range(3):
        c = check_csr(profile, parse_csr(csr_pem(f"DE*ICE*E9{n}", dc="CPO")))
        reqs.append(IssueRequest(profile="secc", public_key=c.public_key, subject=c.subject,
                                 identifier=c.identifier, actor="test"))
    certs, intents, events, objects = _state(ctx)
    with pytest.raises(HSMUnavailable):
        engine.issue_many(reqs)
    after = _state(ctx)
    assert (after[0], after[2], after[3]) == (certs, events, objects)  # no certificate, no audit event, no key
    assert after[1] == intents + 3
    with ctx.db.session() as s:
        rows = list(s.exec(select(IssuanceIntent).order_by(IssuanceIntent.id.desc()).limit(3)))  # type: ignore[union-attr]
    assert sorted((r.state, r.error) for r in rows) == [
        ("failed", "HSMUnavailable"), ("failed", "HSMUnavailable"), ("pending", None)]


def _pop_reference(csr: x509.CertificateSigningRequest) -> bool:
    try:
        return bool(csr.is_signature_valid)
    except Exception:  # noqa: BLE001 - what check_csr did before: any error is 'does not verify'
        return False


def _signed_csrs() -> list[bytes]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DE*ABC*E1234")])
    out = []
    for key, algo in ((ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
                      (ec.generate_private_key(ec.SECP521R1()), hashes.SHA512()),
                      (ec.generate_private_key(ec.SECP256R1()), hashes.SHA384()),
                      (ed448.Ed448PrivateKey.generate(), None),
                      (rsa.generate_private_key(public_exponent=65537, key_size=1024), hashes.SHA256())):
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, algo)  # type: ignore[arg-type]
        out.append(csr.public_bytes(serialization.Encoding.DER))
    return out


_CSRS = _signed_csrs()


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_proof_of_possession_agrees_with_cryptography(data: st.DataObject) -> None:
    """pki.csr.proof_of_possession verifies with the key already loaded instead of csr.is_signature_valid;
    on valid CSRs of every key type and on byte-mutated ones (signature, algorithm, key, subject) both
    must give the same answer."""
    from pki.csr import proof_of_possession

    der = data.draw(st.sampled_from(_CSRS))
    if data.draw(st.booleans()):
        pos = data.draw(st.integers(0, len(der) - 1))
        der = der[:pos] + bytes([der[pos] ^ data.draw(st.integers(1, 255))]) + der[pos + 1:]
    try:
        csr = x509.load_der_x509_csr(der)
        key = csr.public_key()
    except Exception:  # noqa: BLE001 - parse_csr / check_csr reject these before any signature check
        return
    if isinstance(key, ec.EllipticCurvePublicKey | ed448.Ed448PublicKey):
        assert proof_of_possession(csr, key) == _pop_reference(csr)
    else:  # key_alg_of refuses these before the signature is looked at; never 'verified' here either
        assert proof_of_possession(csr, key) is False
