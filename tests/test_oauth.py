"""OAuth 2.0 client credentials at /oauth/token (#25): the requests MaEVe and CitrineOS send, read from their
code, the RFC 6749 answers and errors, the token on existing endpoints (Bearer and X-API-Key), its expiry and
its revocation with the API key; Schemathesis against OPCP's accessToken.v1.json as published."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jsonschema
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from sqlmodel import select

from api import auth as api_auth
from api import oauth as api_oauth
from api.app import create_app
from pki.context import Context
from pki.oauth import issue_token
from pki.orgs import create_api_key, create_org, revoke_api_key
from pki.store.db import utcnow
from pki.store.models import ApiKey
from tests.conftest import csr_pem, org_with_fresh_prefix

SPECS = Path(__file__).resolve().parent.parent.parent / "shared" / "specs" / "opcp"


@dataclass
class Env:
    ctx: Context
    app: FastAPI
    client: TestClient
    org: str
    prefix: str
    key: str

    @property
    def key_id(self) -> str:
        return self.key.split("_")[1]


@pytest.fixture(scope="module")
def env(ctx: Context) -> Iterator[Env]:
    tag = secrets.token_hex(3)
    org = f"oauth-cpo-{tag}"
    prefix = org_with_fresh_prefix(ctx, org, "cpo", settings={"organization_name": "Test Org"})
    key = create_api_key(ctx.db, org)[0]
    app = create_app(ctx)
    with TestClient(app) as client:
        yield Env(ctx, app, client, org, prefix, key)


@pytest.fixture(autouse=True)
def _lenient_fail_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed client authentications share the per-address limit of failed sign-ins; these tests fail on
    purpose many times from one address."""
    bucket = api_auth.TokenBucket(1e6, 1e6)
    monkeypatch.setattr(api_auth, "AUTH_FAIL_LIMIT", bucket)
    monkeypatch.setattr(api_oauth, "AUTH_FAIL_LIMIT", bucket)


def maeve_token(client: TestClient, client_id: str, secret: str) -> Any:
    """maeve-csms manager/services/http_token_service.go OAuth2HttpTokenService.GetToken: POST url, JSON
    {grant_type, client_id, client_secret} (that order), Content-Type application/json; reads
    access_token and expires_in."""
    body = json.dumps({"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
                      separators=(",", ":"))
    return client.post("/oauth/token", content=body, headers={"Content-Type": "application/json"})


def citrine_token(client: TestClient, client_id: str, secret: str, audience: str) -> Any:
    """citrineos-core 02_Util/src/certificate/client/hubject.ts _fetchNewToken: URLSearchParams
    {grant_type, client_id, client_secret, audience: baseUrl}, Content-Type application/x-www-form-urlencoded;
    reads access_token and expires_in (default 3600), sends `Bearer ${access_token}`."""
    body = urlencode({"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret,
                      "audience": audience})
    return client.post("/oauth/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})


def _accesstoken_doc() -> dict[str, Any]:
    return json.loads((SPECS / "accessToken.v1.json").read_text())  # type: ignore[no-any-return]


def test_maeve_json_client_credentials(env: Env) -> None:
    r = maeve_token(env.client, env.key_id, env.key)
    assert r.status_code == 200, r.text
    tok = r.json()
    assert tok["token_type"] == "Bearer" and isinstance(tok["expires_in"], int) and 0 < tok["expires_in"] <= 3600
    assert r.headers["cache-control"] == "no-store"
    # the 200 answer as accessToken.v1.json describes it
    schema = _accesstoken_doc()["paths"]["/oauth/token"]["post"]["responses"]["200"]["content"]["application/json"]
    jsonschema.validate(tok, schema["schema"])
    assert env.key not in r.text  # the secret is never echoed
    # MaEVe then sends both headers with the token on every OPCP call
    me = env.client.get("/v1/me", headers={"authorization": f"Bearer {tok['access_token']}",
                                           "x-api-key": tok["access_token"]})
    assert me.status_code == 200, me.text
    assert me.json() == {"org": env.org, "role": "cpo", "prefixes": [env.prefix], "credential": "oauth"}


def test_citrineos_form_client_credentials_with_audience(env: Env) -> None:
    r = citrine_token(env.client, env.key_id, env.key, "http://testserver")
    assert r.status_code == 200, r.text
    tok = r.json()
    claims = json.loads(base64.urlsafe_b64decode(tok["access_token"].split(".")[1] + "=="))
    assert claims["aud"] == "http://testserver" and claims["org"] == env.org and claims["sub"] == env.key_id
    header = json.loads(base64.urlsafe_b64decode(tok["access_token"].split(".")[0] + "=="))
    assert header["alg"] == "ES256"
    assert "svc-oauth" in env.ctx.keystore.list()  # the signing key lives in the HSM
    # the token enrolls like the key it came from (existing endpoint, FastAPI's path: not a cached key)
    csr = csr_pem(f"{env.prefix}*E{secrets.token_hex(3).upper()}")
    e = env.client.post("/v1/enrollments", json={"csr": csr.decode(), "profile": "secc"},
                        headers={"Authorization": f"Bearer {tok['access_token']}"})
    assert e.status_code == 201, e.text


def test_basic_client_authentication(env: Env) -> None:
    basic = base64.b64encode(f"{env.key_id}:{env.key}".encode()).decode()
    r = env.client.post("/oauth/token", data={"grant_type": "client_credentials"},
                        headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200, r.text


def test_x_api_key_alone(env: Env) -> None:
    tok = maeve_token(env.client, env.key_id, env.key).json()["access_token"]
    assert env.client.get("/v1/me", headers={"x-api-key": tok}).status_code == 200
    assert env.client.get("/v1/me", headers={"x-api-key": env.key}).status_code == 200  # an API key there too


@pytest.mark.parametrize(("body", "ctype", "status", "error"), [
    ({"grant_type": "client_credentials", "client_id": "x", "client_secret": "v2k_x_nope"}, "json", 401,
     "invalid_client"),
    ({"grant_type": "password", "client_id": "x", "client_secret": "y"}, "json", 400, "unsupported_grant_type"),
    ({"client_id": "x", "client_secret": "y"}, "json", 400, "invalid_request"),
    ({"grant_type": "client_credentials"}, "form", 400, "invalid_request"),
    ("[1, 2]", "json", 400, "invalid_request"),
    ("{not json", "json", 400, "invalid_request"),
    ("grant_type=client_credentials", "text/plain", 400, "invalid_request"),
    ("grant_type=client_credentials&grant_type=client_credentials", "form", 400, "invalid_request"),
    ({"grant_type": "client_credentials", "client_id": 5, "client_secret": []}, "json", 400, "invalid_request"),
])
def test_errors_are_rfc6749(env: Env, body: Any, ctype: str, status: int, error: str) -> None:
    media = {"json": "application/json", "form": "application/x-www-form-urlencoded"}.get(ctype, ctype)
    if isinstance(body, dict):
        content = json.dumps(body) if ctype == "json" else urlencode(body)
    else:
        content = body
    r = env.client.post("/oauth/token", content=content, headers={"Content-Type": media})
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["error_description"]
    assert r.headers["content-type"].startswith("application/json")
    doc = _accesstoken_doc()["paths"]["/oauth/token"]["post"]["responses"][str(status)]
    jsonschema.validate(r.json(), doc["content"]["application/json"]["schema"])


def test_client_id_must_be_the_keys_id(env: Env) -> None:
    other = create_api_key(env.ctx.db, env.org)[0]
    r = maeve_token(env.client, other.split("_")[1], env.key)  # a real id, another key's secret
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = maeve_token(env.client, env.key_id, env.key[:-2] + "xx")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


def test_token_dies_with_its_key_revoked(env: Env) -> None:
    key, row = create_api_key(env.ctx.db, env.org)
    tok = maeve_token(env.client, row.key_id, key).json()["access_token"]
    h = {"Authorization": f"Bearer {tok}"}
    assert env.client.get("/v1/me", headers=h).status_code == 200
    revoke_api_key(env.ctx.db, row.key_id)
    r = env.client.get("/v1/me", headers=h)
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    assert "revoked" in r.json()["detail"]
    assert env.client.get("/v1/me", headers={"x-api-key": tok}).status_code == 401
    assert maeve_token(env.client, row.key_id, key).status_code == 401  # and no new one


def test_token_dies_with_its_key_expired_and_never_outlives_it(env: Env) -> None:
    key, row = create_api_key(env.ctx.db, env.org)
    with env.ctx.db.session() as s:
        r = s.exec(select(ApiKey).where(ApiKey.key_id == row.key_id)).one()
        r.expires_at = utcnow() + timedelta(seconds=90)
        s.add(r)
        s.commit()
    got = maeve_token(env.client, row.key_id, key).json()
    assert 0 < got["expires_in"] <= 90  # capped at the key's expiry
    h = {"Authorization": f"Bearer {got['access_token']}"}
    assert env.client.get("/v1/me", headers=h).status_code == 200
    with env.ctx.db.session() as s:
        r = s.exec(select(ApiKey).where(ApiKey.key_id == row.key_id)).one()
        r.expires_at = utcnow() - timedelta(seconds=1)
        s.add(r)
        s.commit()
    res = env.client.get("/v1/me", headers=h)
    assert res.status_code == 401 and "expired" in res.json()["detail"]


def test_expired_and_forged_tokens(env: Env) -> None:
    old = issue_token(env.ctx, env.key_id, env.key, grant_type="client_credentials",
                      now=utcnow() - timedelta(hours=2))
    r = env.client.get("/v1/me", headers={"Authorization": f"Bearer {old.access_token}"})
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    good = maeve_token(env.client, env.key_id, env.key).json()["access_token"]
    h, c, s = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(c + "=="))
    claims["org"] = "admin"  # a claim changed: the signature no longer covers it
    forged = ".".join([h, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), s])
    assert env.client.get("/v1/me", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    for junk in ("a.b.c", "..", "eyJ.eyJ.AAAA", good + "x"):
        assert env.client.get("/v1/me", headers={"Authorization": f"Bearer {junk}"}).status_code == 401


def test_a_token_from_another_organization_stays_there(env: Env) -> None:
    tag = secrets.token_hex(3)
    other = f"oauth-emsp-{tag}"
    org_with_fresh_prefix(env.ctx, other, "emsp")
    key = create_api_key(env.ctx.db, other)[0]
    tok = maeve_token(env.client, key.split("_")[1], key).json()["access_token"]
    csr = csr_pem(f"{env.prefix}*E{secrets.token_hex(3).upper()}")
    r = env.client.post("/v1/enrollments", json={"csr": csr.decode(), "profile": "secc"},
                        headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 403


def test_schemathesis_access_token_document(env: Env) -> None:
    """accessToken.v1.json as published, every generated request (conforming and not) against the app:
    no 5xx, and every answer conforms to the document's response schemas (200, 400, 401)."""
    schema = schemathesis.openapi.from_path(str(SPECS / "accessToken.v1.json"))
    schema.app = env.app
    op = schema["/oauth/token"]["POST"]
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call()
            assert response.status_code in (200, 400, 401), response.text
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        run()


def test_existing_admin_flow_unchanged(env: Env, ctx: Context) -> None:
    """API keys keep working beside tokens (the fast path for keys is untouched)."""
    tag = secrets.token_hex(3)
    create_org(ctx.db, f"oauth-admin-{tag}", "admin", [])
    key = create_api_key(ctx.db, f"oauth-admin-{tag}")[0]
    assert env.client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).json()["credential"] == "apikey"
