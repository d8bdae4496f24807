"""Property-based fuzzing of the whole HTTP API: no generated input may produce a 5xx.

Two layers, both over the real app (SoftHSM2 token, SQLite and PostgreSQL, `v2gpki init` hierarchy),
authenticated as an admin API key so every route is reached past authentication:

* Schemathesis walks the app's own OpenAPI document (every operation, positive and negative inputs:
  wrong types, out-of-range numbers, oversized strings, NUL bytes, unknown enum values) through ASGI.
* Schemathesis cannot write a *signed* CSR, so a Hypothesis strategy builds real, well-signed CSRs with
  hostile subjects (odd Unicode, control characters, empty or repeated RDNs, wrong country lengths, odd
  DC values), every key algorithm and every profile name, and sends them to each enrollment surface
  (/v1/enrollments, OCPP sign-certificate, EST simpleenroll).

Each backend gets a dedicated database and token: the fuzzer is an admin and may bulk-revoke
everything, which must not disturb the shared fixtures other tests use. Errors must be RFC 9457
problem documents, so a handler that leaks a framework error body is caught too.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api.app import create_app
from pki.config import Settings
from pki.context import Context
from pki.hierarchy import init_hierarchy
from pki.orgs import create_api_key, create_org
from pki.wiring import build_context
from tests.conftest import TEST_PIN, csr_pem, drop_pg_database, make_token

# Examples per operation (Schemathesis) and per enrollment surface (Hypothesis): small enough that the
# whole module stays well under two minutes on both backends, large enough to reach every branch of the
# request models (each run is fresh: no example database, so a found failure is shrunk and reported).
SCHEMA_EXAMPLES = int(os.environ.get("V2GPKI_FUZZ_EXAMPLES", "12"))
CSR_EXAMPLES = int(os.environ.get("V2GPKI_FUZZ_CSR_EXAMPLES", "30"))

ROUTERS: list[str] | None = None  # every router the service mounts


# Every enrollable hierarchy (ISO 15118-2 and -20 CPO, MO, OEM; CSMS) but without the delegated OCSP
# signers and the -20 Ed448 / CPS chains of the default: `v2gpki init` of the full default takes ~10 s
# per backend and adds no API surface the fuzzer can reach.
FUZZ_HIERARCHY = """
organization: Fuzz PKI
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA, ocsp_signer: false}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: CPO Sub-CA 1, ocsp_signer: false}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: CPO Sub-CA 2, ocsp_signer: false}
  - {name: oem-root, profile: oem-root, cn: OEM Root CA, ocsp_signer: false}
  - {name: oem-sub1, profile: oem-sub1, parent: oem-root, cn: OEM Sub-CA 1, ocsp_signer: false}
  - {name: oem-sub2, profile: oem-sub2, parent: oem-sub1, cn: OEM Sub-CA 2, ocsp_signer: false}
  - {name: mo-root, profile: mo-root, cn: MO Root CA, ocsp_signer: false}
  - {name: mo-sub1, profile: mo-sub1, parent: mo-root, cn: MO Sub-CA 1, ocsp_signer: false}
  - {name: mo-sub2, profile: mo-sub2, parent: mo-sub1, cn: MO Sub-CA 2, ocsp_signer: false}
  - {name: csms-root, profile: csms-root, cn: CSMS Root CA, ocsp_signer: false}
  - {name: v2g-root-20, profile: v2g-root-20, cn: V2G Root CA 20, ocsp_signer: false}
  - {name: cpo-sub1-20, profile: cpo-sub1-20, parent: v2g-root-20, cn: CPO Sub-CA 1 20, ocsp_signer: false}
  - {name: cpo-sub2-20, profile: cpo-sub2-20, parent: cpo-sub1-20, cn: CPO Sub-CA 2 20, ocsp_signer: false}
"""


@dataclass
class FuzzEnv:
    ctx: Context
    app: FastAPI
    client: TestClient
    headers: dict[str, str]  # admin
    cpo_headers: dict[str, str]
    cpo_org: str
    cpo_prefix: str


def _pg_database() -> Iterator[str]:
    admin = os.environ.get("V2GPKI_TEST_PG_ADMIN_URL")
    if not admin:
        if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
            pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
        pytest.skip("no PostgreSQL (set V2GPKI_TEST_PG_ADMIN_URL or run scripts/test.sh)")
    import psycopg

    name = f"v2gpki_fuzz_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        drop_pg_database(name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             token_root: Path) -> Iterator[FuzzEnv]:
    backend: str = request.param
    pg = _pg_database() if backend == "postgresql" else None
    db_url = next(pg) if pg is not None else None
    label = f"t-fuzz-{backend}"
    make_token(token_root, label)
    os.environ["SOFTHSM2_CONF"] = str(token_root / "softhsm2.conf")
    # pkilint "shape": every CA certificate and the first leaf of each shape is pkilinted; the profile
    # linter still runs on every certificate (the production default; the fuzzer is about the API).
    s = Settings(home=tmp_path_factory.mktemp(label), database_url=db_url, token_label=label,
                 hsm_pin=TEST_PIN, public_url="http://127.0.0.1:8000", pkilint="shape")  # type: ignore[arg-type]
    ctx = build_context(s)
    hfile = s.home_dir / "hierarchy.yaml"
    hfile.write_text(FUZZ_HIERARCHY)
    init_hierarchy(ctx.engine, ctx.hierarchy(hfile))
    tag = secrets.token_hex(3)
    prefix = "DE*" + "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
    create_org(ctx.db, f"admin-{tag}", "admin", [])
    # csr_pem's O is the CPO's registered certificate name (#21 item 6)
    create_org(ctx.db, f"cpo-{tag}", "cpo", [prefix],
               settings={"allow_any_station": True, "organization_name": "Test Org"})
    admin_key = create_api_key(ctx.db, f"admin-{tag}")[0]
    cpo_key = create_api_key(ctx.db, f"cpo-{tag}")[0]
    app = create_app(ctx, routers=ROUTERS)
    try:
        with TestClient(app) as client:
            yield FuzzEnv(ctx, app, client, {"Authorization": f"Bearer {admin_key}"},
                          {"Authorization": f"Bearer {cpo_key}"}, f"cpo-{tag}", prefix)
    finally:
        ctx.db.dispose()
        if pg is not None:
            next(pg, None)


def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in the app's OpenAPI document (built without a context)."""
    spec = create_app(routers=ROUTERS).openapi()
    methods = ("get", "put", "post", "delete", "patch")
    return [(m.upper(), path) for path, item in sorted(spec["paths"].items()) for m in methods if m in item]


@pytest.fixture(scope="module")
def api_schema(fuzz_env: FuzzEnv) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_env.app)


def _assert_sane(status: int, content_type: str, text: str, what: str) -> None:
    assert status < 500, f"{what} -> {status}: {text[:500]}"
    if status >= 400:
        # Interfaces with an error shape of their own answer in it (application/json): /ocpp/* with the
        # message's own OCPP answer (what a CSMS forwards to the station, api/ocpp/core.py); /oauth/token with
        # RFC 6749 §5.2 errors; OPCP's /v1/root/* with its {errorMessages, traceId}. Everything else, and
        # authentication failures everywhere, is a problem body.
        own_shape = any(f" {p}" in f" {what}" for p in ("/ocpp/", "/oauth/token", "/v1/root/"))
        assert (own_shape and content_type.startswith("application/json")) or \
            content_type.startswith("application/problem+json"), f"{what} -> {status} {content_type}: {text[:300]}"


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda v: str(v))
def test_no_5xx_on_any_generated_request(method: str, path: str, api_schema: Any, fuzz_env: FuzzEnv) -> None:
    """Schemathesis cases (schema-conforming and schema-violating) for one operation, as the admin.

    (Schemathesis' own pytest loader, `from_fixture`, does not run under pytest 9: the operation list is
    taken from the OpenAPI document at collection time and Schemathesis' Hypothesis strategies are driven
    here instead.)"""
    operation = api_schema[path][method]
    spec = operation.definition.raw
    violable = bool(spec.get("requestBody")) or any(p.get("in") in ("query", "header")
                                                     for p in spec.get("parameters", []))
    # Path segments are strings on the wire and an operation without parameters has nothing to violate:
    # negative generation would only spin until Hypothesis gives up.
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if violable else (GenerationMode.POSITIVE,)
    for mode in modes:
        try:
            _fuzz_operation(operation, mode, fuzz_env.headers)()
        except Unsatisfiable:
            # Nothing in this operation's schema can be violated in a request (e.g. only string path
            # parameters, or no parameters at all): the positive run covered it.
            assert mode is GenerationMode.NEGATIVE


def _fuzz_operation(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> Any:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        response = case.call(headers=headers)
        ctype = response.headers.get("content-type") or [""]
        _assert_sane(response.status_code, ctype[0], response.text,
                     f"{mode.value} {case.method} {case.formatted_path} query={case.query!r} body={case.body!r}")

    return run


# -- well-signed CSRs with hostile subjects ------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), min_size=0, max_size=80)
_ATTR_VALUE = st.one_of(
    _TEXT,
    st.sampled_from(["DE*ABC*E12345", "DE*ABC*E12345*1", "DEABCE12345", "ZZ*ZZZ*EHEHEH", "localhost",
                     "CS-0001", "DE-8AA-C00000001-X", "DE8AAC00000001", "WP0" + "A" * 14, " ", "*", "%", "\x00"]),
)
_OIDS = [NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.COUNTRY_NAME, NameOID.DOMAIN_COMPONENT,
         NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.SERIAL_NUMBER]
_DC = st.one_of(st.sampled_from(["CPO", "MO", "OEM", "V2G", "cpo", "CPS", ""]), _TEXT)


@st.composite
def _subject(draw: st.DrawFn, prefix: str) -> list[tuple[x509.ObjectIdentifier, str]]:
    kind = draw(st.sampled_from(["evseid", "station", "random"]))
    attrs: list[tuple[x509.ObjectIdentifier, str]] = []
    if kind == "evseid":
        tail = draw(st.text("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789*", min_size=0, max_size=40))
        attrs.append((NameOID.COMMON_NAME, f"{prefix}*E{tail}"))
        attrs.append((NameOID.DOMAIN_COMPONENT, draw(_DC)))
    elif kind == "station":
        attrs.append((NameOID.COMMON_NAME, draw(st.one_of(_TEXT, st.just("CS-" + secrets.token_hex(4))))))
        attrs.append((NameOID.ORGANIZATION_NAME, draw(st.one_of(_TEXT, st.just("")))))
    extra = draw(st.lists(st.tuples(st.sampled_from(_OIDS), _ATTR_VALUE), max_size=5))
    return attrs + extra


def _key(kind: str) -> Any:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


_KEYS = {k: _key(k) for k in ("p256", "p521", "p384", "ed448", "rsa")}


def _csr(attrs: list[tuple[x509.ObjectIdentifier, str]], key_kind: str, with_ext: bool) -> bytes | None:
    try:
        name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, v, _validate=False)])
                          for oid, v in attrs])
        b = x509.CertificateSigningRequestBuilder().subject_name(name)
        if with_ext:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
        key = _KEYS[key_kind]
        algo = None if key_kind == "ed448" else hashes.SHA256()
        return b.sign(key, algo).public_bytes(serialization.Encoding.DER)
    except (ValueError, TypeError, UnicodeError):
        return None  # the client library refuses to encode it: nothing to send


_PROFILES = ["secc", "secc-20", "cs-client", "contract", "contract-20", "oem-prov", "oem-prov-20", "api-client",
             "csms-server", "cps-leaf", "v2g-root", "cpo-sub2", "ocsp-signer", "no-such"]


@given(data=st.data())
@settings(max_examples=CSR_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_on_hostile_signed_csrs(fuzz_env: FuzzEnv, data: st.DataObject) -> None:
    attrs = data.draw(_subject(fuzz_env.cpo_prefix), label="subject")
    key_kind = data.draw(st.sampled_from(sorted(_KEYS)), label="key")
    der = _csr(attrs, key_kind, data.draw(st.booleans(), label="extensions"))
    if der is None:
        return
    as_pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()
    surface = data.draw(st.sampled_from(["v1", "ocpp", "est"]), label="surface")
    headers = data.draw(st.sampled_from([fuzz_env.headers, fuzz_env.cpo_headers]), label="who")
    client = fuzz_env.client
    if True:
        if surface == "v1":
            body = {"csr": data.draw(st.sampled_from([as_pem, base64.b64encode(der).decode()])),
                    "profile": data.draw(st.sampled_from(_PROFILES)),
                    "supersede": data.draw(st.booleans())}
            r = client.post("/v1/enrollments", json=body, headers=headers)
            if r.status_code == 201:  # what was issued can be read back and revoked
                out = r.json()
                g = client.get(f"/v1/certificates/{out['issuer']}/{out['serial']}", headers=headers)
                assert g.status_code == 200, g.text
        elif surface == "ocpp":
            ctype = data.draw(st.sampled_from([None, "V2GCertificate", "ChargingStationCertificate"]))
            payload: dict[str, Any] = {"csr": as_pem}
            if ctype is not None:
                payload["certificateType"] = ctype
            r = client.post("/ocpp/v201/sign-certificate", json=payload, headers=headers)
        else:
            label = data.draw(st.sampled_from(["cpo", "oem", "mo", "emsp", "csms", "cpo-sub2", "v2g-root", "x"]))
            version = data.draw(st.sampled_from(["ISO15118-2", "ISO15118-20", "15118-20", "3"]))
            r = client.post(f"/.well-known/est/{label}/simpleenroll/{version}",
                            content=base64.b64encode(der), headers={**headers, "content-type": "application/pkcs10"})
    _assert_sane(r.status_code, r.headers.get("content-type", ""), r.text,
                 f"{'/ocpp/v201/sign-certificate' if surface == 'ocpp' else surface} {attrs!r} {key_kind}")


# -- regressions the fuzzer found (kept deterministic: a handful of examples may not redraw them) --------


def test_nul_bytes_and_out_of_range_integers_are_client_errors(fuzz_env: FuzzEnv) -> None:
    """PostgreSQL refuses NUL in text and integers past 2**31-1 (INTEGER ids, audit seq): each was a 500;
    POST /v1/stations with an identity already registered was a 500 too (autoflush inside the audit
    append raised the unique violation outside the Conflict handler)."""
    c, h = fuzz_env.client, fuzz_env.headers
    gets = ["/v1/certificates?identifier=a%00b", "/v1/certificates?issuer=a%00b&profile=%00",
            "/v1/certificates/a%00b/01", "/v1/cas/a%00b/chain", "/.well-known/est/a%00b/cacerts",
            "/v1/certificates?cursor=2147483648", "/v1/audit?after=2147483648", "/v1/cas/2200000000/chain",
            "/v1/cas/%C2%B2/chain"]
    for url in gets:
        r = c.get(url, headers=h)
        _assert_sane(r.status_code, r.headers.get("content-type", ""), r.text, url)
        if "%00" not in url:  # SQLite stores NUL and finds nothing (200); out of range is 4xx everywhere
            assert r.status_code in (404, 422), f"{url} -> {r.status_code}"
    posts: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/stations", {"identity": "a\x00b"}, {}),
        ("/v1/revocations/bulk", {"reason": "unspecified", "identifier": "a\x00b"}, {}),
        ("/v1/revocations/bulk", {"reason": "unspecified", "subject_pattern": "%\x00%"}, {}),
        ("/v1/enrollments", {"csr": "x", "profile": "a\x00b"}, {}),
        ("/v1/enrollments", {"csr": "x", "profile": "secc"}, {"Idempotency-Key": "a\x00b"}),
        ("/ocpp/v201/sign-certificate", {"csr": "\x00"}, {}),
    ]
    for url, body, extra in posts:
        r = c.post(url, json=body, headers={**h, **extra})
        _assert_sane(r.status_code, r.headers.get("content-type", ""), r.text, f"{url} {body!r}")
    station = "CS-" + secrets.token_hex(4).upper()
    assert c.post("/v1/stations", json={"identity": station}, headers=h).status_code == 201
    r = c.post("/v1/stations", json={"identity": station}, headers=h)
    assert r.status_code == 409, r.text


# -- micro-batching of concurrent enrollments (pki.issuance.IssueBatcher) ---------------------------------


def _until(cond: Any, limit: float = 60) -> None:
    """Wait for a condition another thread brings about (bounded: a hang fails instead of blocking)."""
    import time

    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_concurrent_enrollments_share_a_batch_and_each_gets_its_own_certificate(fuzz_env: FuzzEnv) -> None:
    """16 concurrent enrollments: the first is issued alone while it holds the issuing thread, the other 15
    queue up and are issued as ONE batch (one intent and one certificate transaction); every caller gets
    the certificate for its own key, and the audit chain still verifies. Deterministic: the first batch
    is held until the 15 others are queued."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pki.audit_sign import verify_all
    from pki.enrollment import enroll
    from pki.issuance import IssueBatcher
    from pki.orgs import authenticate_api_key

    ctx = fuzz_env.ctx
    engine = ctx.engine
    p = authenticate_api_key(ctx.db, fuzz_env.cpo_headers["Authorization"].split(" ", 1)[1])
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(16)]
    csrs = [csr_pem(f"{fuzz_env.cpo_prefix}*EB{i:04d}", dc="CPO", key=k) for i, k in enumerate(keys)]
    batcher = IssueBatcher(engine)
    sizes: list[int] = []
    release = threading.Event()
    real = engine._issue_prepared

    def held(preps: list[Any], **kw: Any) -> Any:
        sizes.append(len(preps))
        if len(sizes) == 1:
            release.wait(60)
        return real(preps, **kw)

    saved = engine.batcher
    engine.batcher = batcher
    engine._issue_prepared = held  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(16) as ex:
            first = ex.submit(enroll, ctx, p, "secc", csrs[0])
            _until(lambda: bool(sizes) or first.done())
            rest = [ex.submit(enroll, ctx, p, "secc", c) for c in csrs[1:]]
            _until(lambda: len(batcher._queue) >= 15 or any(f.done() for f in rest))
            release.set()
            results = [first.result(60), *(f.result(60) for f in rest)]
    finally:
        engine.batcher = saved
        del engine._issue_prepared
    assert sizes == [1, 15] and batcher.batches == 2 and batcher.issued == 16
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    for key, res in zip(keys, results, strict=True):
        assert res.issued.cert.public_key().public_bytes(serialization.Encoding.DER, spki) == \
            key.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert len({r.issued.serial for r in results}) == 16
    for r in results:
        row = engine.get_certificate(r.issued.serial, r.issued.issuer)
        assert row.status == "valid" and row.tenant == fuzz_env.cpo_org
    assert verify_all(ctx).ok


def test_a_failed_batch_fails_every_caller_and_marks_intents_failed(fuzz_env: FuzzEnv) -> None:
    """An HSM failure while a batch is signed reaches each caller as that error (503 over HTTP), nothing
    is stored as issued, and the intents written before signing end up 'failed', not 'pending'."""
    from sqlmodel import select

    from hsm.errors import HSMUnavailable
    from pki.issuance import IssueBatcher
    from pki.store.models import IssuanceIntent

    ctx = fuzz_env.ctx
    engine = ctx.engine
    signer = engine.ca_signer(engine.ca("cpo-sub2"))
    saved_batcher = engine.batcher

    def down(*_: Any, **__: Any) -> bytes:
        raise HSMUnavailable("token gone")

    engine.batcher = IssueBatcher(engine)
    signer.sign = down  # type: ignore[method-assign]
    ev = f"{fuzz_env.cpo_prefix}*EFAIL{secrets.token_hex(2).upper()}"
    try:
        csr = csr_pem(ev, dc="CPO").decode()
        r = fuzz_env.client.post("/v1/enrollments", json={"csr": csr, "profile": "secc"},
                                 headers=fuzz_env.cpo_headers)
    finally:
        del signer.sign  # type: ignore[attr-defined]
        engine.batcher = saved_batcher
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", r.text
    with ctx.db.session() as s:
        states = {i.state for i in s.exec(select(IssuanceIntent).where(IssuanceIntent.subject.contains(ev)))}  # type: ignore[attr-defined]
    assert states == {"failed"}


# -- routes outside the OpenAPI document (raw Starlette: OCSP and CRL responders) -------------------------


@given(data=st.data())
@settings(max_examples=CSR_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_on_the_responders(fuzz_env: FuzzEnv, data: st.DataObject) -> None:
    """POST /ocsp with arbitrary bytes, GET /ocsp/{anything}, GET /crl/{anything}: OCSP answers errors as
    OCSP error responses (HTTP 200), the CRL route with 4xx; never a 5xx."""
    c = fuzz_env.client
    junk = data.draw(st.one_of(st.binary(max_size=600), st.builds(lambda b: b"\x30\x82" + b, st.binary(max_size=300))),
                     label="body")
    r = c.post("/ocsp", content=junk, headers={"content-type": "application/ocsp-request"})
    assert r.status_code < 500, (junk, r.status_code)
    raw = data.draw(st.one_of(st.text(min_size=1, max_size=120), st.builds(
        lambda b: base64.b64encode(b).decode(), st.binary(min_size=1, max_size=200))), label="segment")
    seg = quote(raw, safe="+=")  # any text, percent-encoded; base64 as a client would send it
    for url in (f"/ocsp/{seg}", f"/crl/{seg}", f"/crl/{seg}.crl"):
        r = c.get(url)
        assert r.status_code < 500, (url, r.status_code, r.text[:200])
