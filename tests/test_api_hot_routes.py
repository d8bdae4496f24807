"""The three hot POSTs (enrollment, OCPP SignCertificate, Get15118EVCertificate) are ordinary FastAPI routes
(#23: one API path) that run their blocking work in api/blocking.py: same answers whether the key is cached
or not, typed errors as problems, FastAPI's validation details, idempotent retries."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from api.app import create_app
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
