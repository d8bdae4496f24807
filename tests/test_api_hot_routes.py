"""The hot POSTs (enrollment, OCPP SignCertificate, Get15118EVCertificate, EST simpleenroll) are ordinary FastAPI
routes (#23: one API path) that run their blocking work in api/blocking.py: same answers whether the key is
cached or not, typed errors as problems, FastAPI's validation details, idempotent retries. Enrollment,
SignCertificate and EST read their request themselves (api/hot.py: no per-request dependency solving): the
answers to malformed requests, their order (401 before 422, a JSON decode error before both) and the
OpenAPI document are pinned to what FastAPI gave and generates for the usual declaration."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from cryptography import x509
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient

from api.app import create_app
from api.ocpp import ev_certificate, v201
from api.v1 import routes
from pki.context import Context
from pki.orgs import create_api_key
from tests import ocpp_schemas
from tests.conftest import csr_pem, org_with_fresh_prefix


@dataclass
class Env:
    client: TestClient
    key: str
    op: str


@pytest.fixture(scope="module")
def env(ctx: Context) -> Iterator[Env]:
    tag = secrets.token_hex(3)
    # a prefix no other tenant holds (#21 item 4); the O its SECC CSRs carry (csr_pem's) is its registered
    # certificate name (#21 item 6)
    op = org_with_fresh_prefix(ctx, f"lane-{tag}", "cpo", settings={"organization_name": "Test Org"})
    key = create_api_key(ctx.db, f"lane-{tag}")[0]
    with TestClient(create_app(ctx)) as client:
        yield Env(client, key, op)


def _auth(e: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {e.key}"}


def _evse(e: Env) -> str:
    return f"{e.op}*E{secrets.token_hex(3).upper()}"


def test_enrollment_with_a_cached_key_answers_like_the_first(env: Env) -> None:
    first = env.client.post("/v1/enrollments", json={"csr": csr_pem(_evse(env), dc="CPO").decode(),
                                                     "profile": "secc"}, headers=_auth(env))
    assert first.status_code == 201, first.text  # first use of the key: FastAPI authenticates and caches
    evse = _evse(env)
    second = env.client.post("/v1/enrollments", json={"csr": csr_pem(evse, dc="CPO").decode(), "profile": "secc"},
                             headers=_auth(env))
    assert second.status_code == 201, second.text
    assert set(second.json()) == set(first.json())
    leaf = x509.load_pem_x509_certificate(second.json()["certificate"].encode())
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == evse.replace("*", "*")
    assert second.headers.get("x-request-id")  # observability wraps every route


def test_enrollment_errors_are_problems(env: Env) -> None:
    env.client.get("/v1/me", headers=_auth(env))  # make sure the key is cached
    # Another operator's EVSEID: 403 problem, nothing stored (pki.enrollment raises Forbidden).
    r = env.client.post("/v1/enrollments", json={"csr": csr_pem("DE*ZZZ*E1", dc="CPO").decode(), "profile": "secc"},
                        headers=_auth(env))
    assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["type"].endswith("/forbidden")
    # Garbage CSR: the typed error becomes the same 4xx problem as through FastAPI.
    bad = env.client.post("/v1/enrollments", json={"csr": "not a csr", "profile": "secc"}, headers=_auth(env))
    assert bad.status_code == 400 and bad.json()["type"].endswith("/bad-csr"), bad.text
    idempotent = env.client.post("/v1/enrollments", json={"csr": "not a csr", "profile": "secc"},
                                    headers={**_auth(env), "Idempotency-Key": secrets.token_hex(8)})
    assert idempotent.status_code == bad.status_code and idempotent.json()["type"] == bad.json()["type"]


def test_enrollment_validation_details_and_idempotent_retries(env: Env) -> None:
    env.client.get("/v1/me", headers=_auth(env))
    r = env.client.post("/v1/enrollments", json={"csr": "x"}, headers=_auth(env))  # no profile
    assert r.status_code == 422 and r.json()["errors"], r.text  # FastAPI's validation problem, with details
    key = secrets.token_hex(8)
    body = {"csr": csr_pem(_evse(env), dc="CPO").decode(), "profile": "secc"}
    a = env.client.post("/v1/enrollments", json=body, headers={**_auth(env), "Idempotency-Key": key})
    b = env.client.post("/v1/enrollments", json=body, headers={**_auth(env), "Idempotency-Key": key})
    assert a.status_code == 201 and b.status_code == 200 and a.json()["serial"] == b.json()["serial"]
    unauth = env.client.post("/v1/enrollments", json=body, headers={"Authorization": "Bearer v2k_nope_nope"})
    assert unauth.status_code == 401


def test_ocpp_sign_certificate_answers_and_rejects(env: Env) -> None:
    env.client.get("/v1/me", headers=_auth(env))
    ok = env.client.post("/ocpp/v201/sign-certificate",
                         json={"csr": csr_pem(_evse(env), dc="CPO").decode(), "certificateType": "V2GCertificate"},
                         headers=_auth(env))
    assert ok.status_code == 200, ok.text
    ocpp_schemas.check("2.0.1", "CertificateSignedRequest", ok.json())
    assert ok.json()["certificateChain"].count("BEGIN CERTIFICATE") == 3  # leaf, Sub-CA 2, Sub-CA 1
    rej = env.client.post("/ocpp/v201/sign-certificate", json={"csr": "garbage", "certificateType": "V2GCertificate"},
                          headers=_auth(env))
    assert rej.status_code == 400 and rej.json()["status"] == "Rejected", rej.text
    ocpp_schemas.check("2.0.1", "SignCertificateResponse", rej.json())
    assert rej.json()["statusInfo"]["reasonCode"] == "InvalidCSR"


@pytest.mark.parametrize("threads", ["", "2"])
def test_contract_installations_run_on_the_loop_or_their_pool(ctx: Context, env: Env, threads: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """get-15118-ev-certificate runs on SQLite on the event loop itself (CPU-bound Python that SQLite never
    makes wait: no thread hand-off per request measured fastest), on PostgreSQL in the shared pool that
    overlaps its round trips; V2GPKI_CPS_THREADS=N gives installations a pool of N (api/blocking.py)."""
    import asyncio
    import threading

    from api.ocpp import core
    from pki.config import Settings

    monkeypatch.setenv("V2GPKI_CPS_THREADS", threads)
    monkeypatch.setattr(ctx.settings, "cps_threads", Settings().cps_threads)  # as a process started with it
    seen: list[tuple[str, bool]] = []
    real = core.get_15118_ev_certificate

    def spy(*args: object) -> object:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread().name, on_loop))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "get_15118_ev_certificate", spy)
    body = {"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": "Install",
            "exiRequest": "gAAAAA=="}
    with TestClient(create_app(ctx)) as client:
        client.get("/v1/me", headers=_auth(env))  # caches the key
        r = client.post("/ocpp/v201/get-15118-ev-certificate", json=body, headers=_auth(env))
    assert r.status_code < 500, r.text
    assert len(seen) == 1
    name, on_loop = seen[0]
    if threads:
        assert name.startswith("v2gpki-cps") and not on_loop, seen
    elif ctx.db.is_sqlite:
        assert on_loop, seen
    else:
        assert name.startswith("v2gpki-api") and not on_loop, seen


# -- the hot routes read their request themselves (api/hot.py): FastAPI's answers, in FastAPI's order -------

_JSON = {"Content-Type": "application/json"}
_INVALID = "https://v2gpki.dev/problems/invalid-request"
_REQUIRED = "Field required"
_NOT_OBJECT = "Input should be a valid dictionary or object to extract fields from"


def _problem(r: Any) -> tuple[int, str, list[tuple[tuple[str, ...], str]]]:
    """(status, problem type, [(error location, message)]) of a problem answer."""
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    body = r.json()
    return r.status_code, body["type"].rsplit("/", 1)[1], [(tuple(e["loc"]), e["msg"]) for e in body.get("errors", [])]


def test_unauthenticated_is_401_before_any_validation_error_but_after_a_json_decode_error(env: Env) -> None:
    """FastAPI decodes a JSON body before it solves dependencies, and solved the PrincipalDep dependency before
    it validated headers and body: an undecodable body is 422 whoever sends it, a decodable one 401 until the
    caller is known (the answers the routes gave before api/hot.py, on both databases)."""
    for headers in ({}, {"Authorization": "Bearer v2k_nope_nope"}):
        r = env.client.post("/v1/enrollments", content=b'{"csr": "x"}', headers={**_JSON, **headers})
        assert _problem(r) == (401, "unauthorized", []) and r.headers["www-authenticate"] == 'Bearer realm="v2gpki"'
        long_key = {**_JSON, **headers, "Idempotency-Key": "k" * 256}
        assert _problem(env.client.post("/v1/enrollments", content=b"", headers=long_key))[0] == 401
    r = env.client.post("/v1/enrollments", content=b"{not json", headers=_JSON)
    assert _problem(r) == (422, "invalid-request", [(("body", "1"), "JSON decode error")])
    # OCPP: the same order; a validation error is the message's own rejection, authentication still a problem
    r = env.client.post("/ocpp/v201/sign-certificate", content=b"{}", headers=_JSON)
    assert _problem(r) == (401, "unauthorized", [])
    r = env.client.post("/ocpp/v201/sign-certificate", content=b"{", headers=_JSON)
    assert r.status_code == 400 and r.json()["statusInfo"] == {"reasonCode": "InvalidRequest",
                                                              "additionalInfo": "1: JSON decode error"}
    # EST: authentication before the body is looked at
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = env.client.post("/.well-known/est/cpo/simpleenroll", content=b"garbage", headers=headers)
        assert _problem(r) == (401, "unauthorized", [])


@pytest.mark.parametrize(("headers", "body", "errors"), [
    # no body at all, whatever the Content-Type
    (_JSON, b"", [(("body",), _REQUIRED)]),
    ({}, b"", [(("body",), _REQUIRED)]),
    # a JSON value that is not an object (null is a value, not a missing body)
    (_JSON, b"null", [(("body",), _NOT_OBJECT)]),
    (_JSON, b"[1,2]", [(("body",), _NOT_OBJECT)]),
    (_JSON, b'"abc"', [(("body",), _NOT_OBJECT)]),
    # not declared as JSON: the bytes go to validation, which no model accepts
    ({"Content-Type": "text/plain"}, b'{"csr": "x", "profile": "secc"}', [(("body",), _NOT_OBJECT)]),
    ({}, b'{"csr": "x", "profile": "secc"}', [(("body",), _NOT_OBJECT)]),
    # JSON by its media type's parameters or +json suffix, in UTF-16, or after a byte-order mark
    ({"Content-Type": "application/json; charset=utf-8"}, b'{"csr": "x"}', [(("body", "profile"), _REQUIRED)]),
    ({"Content-Type": "application/merge-patch+json"}, b'{"csr": "x"}', [(("body", "profile"), _REQUIRED)]),
    (_JSON, '{"csr": "x"}'.encode("utf-16"), [(("body", "profile"), _REQUIRED)]),
    (_JSON, b'\xef\xbb\xbf{"csr": "x"}', [(("body", "profile"), _REQUIRED)]),
    # JSON the decoder refuses (a trailing comma, a raw control character) or takes (NaN, a float)
    (_JSON, b'{"csr": "x",}', [(("body", "12"), "JSON decode error")]),
    (_JSON, b'{"csr": "a\x01b", "profile": "secc"}', [(("body", "10"), "JSON decode error")]),
    (_JSON, b'{"csr": NaN, "profile": "secc"}', [(("body", "csr"), "Input should be a valid string")]),
    # the model's own bounds and types, every error reported
    (_JSON, b'{"csr": "' + b"x" * 10001 + b'", "profile": "secc"}',
     [(("body", "csr"), "String should have at most 10000 characters")]),
    (_JSON, b'{"csr": 1, "profile": null, "supersede": "maybe"}',
     [(("body", "csr"), "Input should be a valid string"), (("body", "profile"), "Input should be a valid string"),
      (("body", "supersede"), "Input should be a valid boolean, unable to interpret input")]),
    # the header's bound: its error first, then the body's
    ({**_JSON, "Idempotency-Key": "k" * 256}, b'{"csr": "x"}',
     [(("header", "idempotency-key"), "String should have at most 255 characters"), (("body", "profile"), _REQUIRED)]),
], ids=lambda v: repr(v)[:40])
def test_enrollment_validation_answers_are_fastapis(env: Env, headers: dict[str, str], body: bytes,
                                                    errors: list[tuple[tuple[str, ...], str]]) -> None:
    """What FastAPI answered when the route declared its body model and header (pinned before api/hot.py
    took over reading them)."""
    env.client.get("/v1/me", headers=_auth(env))
    r = env.client.post("/v1/enrollments", content=body, headers={**_auth(env), **headers})
    assert _problem(r) == (422, "invalid-request", errors)


def test_idempotency_key_bound_applies_to_a_valid_body(env: Env) -> None:
    body = {"csr": csr_pem(_evse(env), dc="CPO").decode(), "profile": "secc"}
    r = env.client.post("/v1/enrollments", json=body, headers={**_auth(env), "Idempotency-Key": "k" * 256})
    assert _problem(r) == (422, "invalid-request", [(("header", "idempotency-key"),
                                                     "String should have at most 255 characters")])
    ok = env.client.post("/v1/enrollments", json=body, headers={**_auth(env), "Idempotency-Key": "k" * 255})
    assert ok.status_code == 201, ok.text
    assert env.client.post("/v1/enrollments", json=body,
                           headers={**_auth(env), "Idempotency-Key": "k" * 255}).json() == ok.json()


def test_oversize_bodies(env: Env) -> None:
    """A declared length over the limit: 413 before anything reads it (api/limits.py). A chunked body that
    grows over it while the route reads: FastAPI's 400 for a body it could not read, kept."""
    r = env.client.post("/v1/enrollments", content=b"{" + b" " * 70000 + b"}", headers={**_auth(env), **_JSON})
    assert _problem(r) == (413, "payload-too-large", [])

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 4096

    for path in ("/v1/enrollments", "/ocpp/v201/sign-certificate"):
        r = env.client.post(path, content=chunks(), headers={**_auth(env), **_JSON})
        assert _problem(r) == (400, "http-error", []) and r.json()["detail"] == "There was an error parsing the body"
    # EST reads its body itself and bounds it (api/est.py MAX_BODY)
    r = env.client.post("/.well-known/est/cpo/simpleenroll", content=b"A" * 20000, headers=_auth(env))
    assert _problem(r) == (400, "bad-csr", [])


def test_ocpp_sign_certificate_validation_is_the_ocpp_rejection(env: Env) -> None:
    cases = {b"{}": "csr: Field required", b"": ": Field required",
             b'{"csr": "x", "foo": 1}': "foo: Extra inputs are not permitted",
             b'{"csr": "x", "certificateType": "Bogus"}':
                 "certificateType: Input should be 'V2GCertificate' or 'ChargingStationCertificate'"}
    for body, info in cases.items():
        r = env.client.post("/ocpp/v201/sign-certificate", content=body, headers={**_auth(env), **_JSON})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json() == {"status": "Rejected", "statusInfo": {"reasonCode": "InvalidRequest", "additionalInfo": info}}
        ocpp_schemas.check("2.0.1", "SignCertificateResponse", r.json())
    r = env.client.post("/ocpp/v201/sign-certificate", content=b'{"csr": "x"}',
                        headers={**_auth(env), "Content-Type": "text/plain"})
    assert r.json()["statusInfo"]["additionalInfo"] == f": {_NOT_OBJECT}"


def test_openapi_describes_the_hot_routes_as_their_usual_declaration() -> None:
    """The hot routes declare only `request: Request`; their OpenAPI operations (parameters, request body, answers)
    and the component schemas they refer to are what FastAPI generates for the usual declaration."""
    async def post_enrollment(body: routes.EnrollmentIn,
                              idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> None:
        pass

    async def sign_certificate(body: v201.SignCertificateIn) -> None:
        pass

    post_enrollment.__doc__ = routes.post_enrollment.__doc__
    sign_certificate.__doc__ = v201.sign_certificate.__doc__
    usual = FastAPI()
    usual.post("/v1/enrollments", response_model=routes.EnrollmentOut, status_code=201)(post_enrollment)
    usual.post("/ocpp/v201/sign-certificate", response_model=None, tags=["ocpp"])(sign_certificate)
    want = usual.openapi()
    got = create_app().openapi()
    for path in ("/v1/enrollments", "/ocpp/v201/sign-certificate"):
        assert got["paths"][path] == want["paths"][path], path
    for name, schema in want["components"]["schemas"].items():
        assert got["components"]["schemas"][name] == schema, name
    assert "EnrollmentIn" in want["components"]["schemas"] and "SignCertificate201" in want["components"]["schemas"]
    # served as the document, not only built (no lifespan: the document needs no Context)
    served = TestClient(create_app()).get("/openapi.json").json()
    assert served["components"]["schemas"]["EnrollmentIn"] == want["components"]["schemas"]["EnrollmentIn"]
    assert served["paths"]["/v1/enrollments"] == want["paths"]["/v1/enrollments"]


def test_get_15118_ev_certificate_reads_its_request_as_the_other_hot_routes(env: Env) -> None:
    """/ocpp/v201/get-15118-ev-certificate through api/hot.py: 401 before any validation error, a malformed
    body is the message's own rejection (valid against OCPP 2.0.1's schema), and the OpenAPI operation is
    what FastAPI generates for its usual declaration (the body model)."""
    path = "/ocpp/v201/get-15118-ev-certificate"
    assert _problem(env.client.post(path, content=b"{}", headers=_JSON)) == (401, "unauthorized", [])
    cases = {b"{}": "iso15118SchemaVersion: Field required",
             b'{"iso15118SchemaVersion": "x", "action": "Install", "exiRequest": "AA==", "foo": 1}':
                 "foo: Extra inputs are not permitted",
             b'{"iso15118SchemaVersion": "x", "action": "Bogus", "exiRequest": "AA=="}':
                 "action: Input should be 'Install' or 'Update'"}
    for body, info in cases.items():
        r = env.client.post(path, content=body, headers={**_auth(env), **_JSON})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["status"] == "Failed" and r.json()["statusInfo"]["reasonCode"] == "InvalidRequest"
        assert r.json()["statusInfo"]["additionalInfo"].startswith(info), r.text
        ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", r.json())

    async def get_15118_ev_certificate(body: ev_certificate.EvCertificateIn) -> None:
        pass

    get_15118_ev_certificate.__doc__ = ev_certificate.get_15118_ev_certificate.__doc__
    usual = FastAPI()
    usual.post(path, response_model=None, tags=["cps"])(get_15118_ev_certificate)
    want, got = usual.openapi(), create_app().openapi()
    assert got["paths"][path] == want["paths"][path]
    for name, schema in want["components"]["schemas"].items():
        assert got["components"]["schemas"][name] == schema, name
