"""Operator console over HTTP (Starlette's TestClient on https://testserver, so Secure cookies flow), on
SQLite and PostgreSQL: sign-in and its cookie, sessions checked server-side (sign-out, revoked key,
tampering, client-certificate binding), tenancy (another CPO's certificate is 404 everywhere), CSRF,
revocation through the engine (audited, OCSP answers revoked), security headers, expiry numbers and CSV,
hierarchies, audit verification, trust lists. The same flows in a real browser: test_console_browser.py.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import col, select

from api import auth as api_auth
from api.app import create_app
from api.auth import TokenBucket
from api.console import CSP, data, views
from api.console import session as sess
from pki.context import Context
from pki.issuance import Issued
from pki.orgs import create_api_key, create_org, revoke_api_key
from pki.store.models import AuditEvent, Certificate
from tests.conftest import csr_pem

BASE = "https://testserver"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def alnum(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(n))


def evseid(op: str) -> str:
    return f"{op}*E{alnum(6)}"


def issue_secc(ctx: Context, org: str, op: str, *, days: float | None = None, ident: str | None = None) -> Issued:
    cap = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days) if days is not None else None
    return ctx.engine.issue_from_csr("secc", csr_pem(ident or evseid(op), dc="CPO"), tenant=org, actor="test",
                                     not_after=cap)


def issue_station(ctx: Context, org: str, *, days: float) -> Issued:
    cap = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
    return ctx.engine.issue_from_csr("cs-client", csr_pem(f"CS-{alnum(8)}", o=org, c=None), tenant=org,
                                     actor="test", not_after=cap)


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def sign_in(client: TestClient, key: str) -> None:
    token = csrf_of(client.get("/console/login").text)
    r = client.post("/console/login", data={"csrf": token, "method": "apikey", "api_key": key, "next": "/console"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console"


def url_of(i: Issued) -> str:
    return f"/console/certificates/{quote(i.issuer, safe='')}/{i.serial.upper()}"


def db_status(ctx: Context, i: Issued) -> str:
    with ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.issuer == i.issuer,
                                               Certificate.serial == i.serial)).one()
    return row.status


@dataclass
class World:
    ctx: Context
    app: FastAPI
    tag: str
    keys: dict[str, str]
    ops: dict[str, str]
    certs: dict[str, Issued]

    def org(self, who: str) -> str:
        return f"{who}-{self.tag}"

    def client(self, who: str | None = None) -> TestClient:
        c = TestClient(self.app, base_url=BASE)
        if who is not None:
            sign_in(c, self.keys[who])
        return c


@pytest.fixture(scope="module")
def w(ctx: Context) -> Iterator[World]:
    tag = secrets.token_hex(3)
    ops = {"cpo1": f"DE*{alnum(3)}", "cpo2": f"DE*{alnum(3)}"}
    roles = {"cpo1": ("cpo", [ops["cpo1"]]), "cpo2": ("cpo", [ops["cpo2"]]), "admin": ("admin", []),
             "auditor": ("auditor", [])}
    keys = {}
    for who, (role, prefixes) in roles.items():
        create_org(ctx.db, f"{who}-{tag}", role, prefixes)
        keys[who] = create_api_key(ctx.db, f"{who}-{tag}")[0]
    certs = {
        "cpo1_a": issue_secc(ctx, f"cpo1-{tag}", ops["cpo1"]),
        "cpo1_b": issue_secc(ctx, f"cpo1-{tag}", ops["cpo1"]),
        "cpo2_a": issue_secc(ctx, f"cpo2-{tag}", ops["cpo2"]),
    }
    app = create_app(ctx)
    # Many sign-ins (and a few deliberate failures) from one test address: own budgets, so neither other
    # modules' failures nor ours decide an outcome here.
    saved = views.SIGNIN_LIMIT, api_auth.AUTH_FAIL_LIMIT
    views.SIGNIN_LIMIT, api_auth.AUTH_FAIL_LIMIT = TokenBucket(1000, 1000), TokenBucket(1000, 1000)
    try:
        with TestClient(app, base_url=BASE):  # runs the lifespan (startup hooks) once
            yield World(ctx, app, tag, keys, ops, certs)
    finally:
        views.SIGNIN_LIMIT, api_auth.AUTH_FAIL_LIMIT = saved


def ident(i: Issued) -> str:
    return str(i.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# -- sign-in, cookie, session ------------------------------------------------------------------------------


def test_sign_in_sets_a_strict_httponly_secure_cookie_that_holds_no_key(w: World) -> None:
    c = w.client()
    r = c.get("/console/certificates?profile=secc", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login?next=" + quote(
        "/console/certificates?profile=secc", safe="")
    page = c.get("/console/login")
    assert page.status_code == 200 and 'for="api_key"' in page.text
    token = csrf_of(page.text)
    r = c.post("/console/login", data={"csrf": token, "method": "apikey", "api_key": w.keys["cpo1"],
                                       "next": "/console/certificates?profile=secc"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/certificates?profile=secc"
    set_cookies = [v for k, v in r.headers.multi_items() if k == "set-cookie"]
    session_cookie = next(v for v in set_cookies if v.startswith(sess.COOKIE + "="))
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in session_cookie.split(";")[1:]}
    assert "httponly" in attrs and "secure" in attrs
    assert attrs["samesite"].lower() == "samesite=strict" and attrs["path"] == "Path=/console"
    value = c.cookies.get(sess.COOKIE)
    assert value
    secret_part = w.keys["cpo1"].split("_", 2)[2]
    assert secret_part not in value and w.keys["cpo1"] not in value
    key_id = w.keys["cpo1"].split("_")[1]
    payload = json.loads(sess._unb64(value.split(".")[1]))
    assert payload["cred"] == f"apikey:{key_id}" and payload["org"] == w.org("cpo1")
    home = c.get("/console")
    assert home.status_code == 200 and w.org("cpo1") in home.text
    assert w.keys["cpo1"] not in home.text and secret_part not in home.text


def test_secure_flag_can_be_dropped_only_by_explicit_setting(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w.ctx.settings, "console_insecure_cookies", "1")  # V2GPKI_CONSOLE_INSECURE_COOKIES=1
    c = TestClient(w.app, base_url="http://devbox.internal")
    token = csrf_of(c.get("/console/login").text)
    r = c.post("/console/login", data={"csrf": token, "api_key": w.keys["cpo1"]}, follow_redirects=False)
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(sess.COOKIE + "="))
    assert "secure" not in cookie.lower() and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert c.get("/console/certificates").status_code == 200


def test_next_parameter_cannot_leave_the_console(w: World) -> None:
    c = w.client()
    for evil in ("https://evil.example/", "//evil.example/console", "/v1/me", "/console\\@evil"):
        token = csrf_of(c.get("/console/login").text)
        r = c.post("/console/login", data={"csrf": token, "api_key": w.keys["cpo1"], "next": evil},
                   follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/console", evil


def test_failed_sign_in_is_audited_and_never_echoes_the_key(w: World) -> None:
    c = w.client()
    token = csrf_of(c.get("/console/login").text)
    wrong = "v2k_" + w.keys["cpo1"].split("_")[1] + "_" + secrets.token_urlsafe(32)
    r = c.post("/console/login", data={"csrf": token, "api_key": wrong}, follow_redirects=False)
    assert r.status_code == 401 and "Sign-in refused" in r.text
    assert wrong not in r.text and wrong.split("_", 2)[2] not in r.text
    assert sess.COOKIE not in c.cookies
    with w.ctx.db.session() as s:
        last = s.exec(select(AuditEvent).where(AuditEvent.action == "auth.failure")
                      .order_by(col(AuditEvent.seq).desc())).first()
    assert last is not None and last.details["path"] == "/console/login"


def test_sign_in_form_needs_its_csrf_token(w: World) -> None:
    c = w.client()
    c.get("/console/login")
    r = c.post("/console/login", data={"api_key": w.keys["cpo1"]}, follow_redirects=False)
    assert r.status_code == 403 and sess.COOKIE not in c.cookies
    other = w.client()
    foreign_token = csrf_of(other.get("/console/login").text)  # bound to the other browser's nonce
    r = c.post("/console/login", data={"csrf": foreign_token, "api_key": w.keys["cpo1"]}, follow_redirects=False)
    assert r.status_code == 403 and sess.COOKIE not in c.cookies


def test_sign_in_is_rate_limited(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "SIGNIN_LIMIT", TokenBucket(0.001, 2))
    c = w.client()

    def attempt(key: str) -> httpx.Response:
        token = csrf_of(c.get("/console/login").text)  # each answer carries a fresh form token
        return c.post("/console/login", data={"csrf": token, "api_key": key}, follow_redirects=False)

    codes = [attempt("v2k_x_y") for _ in range(3)]
    assert [r.status_code for r in codes] == [401, 401, 429]
    assert int(codes[2].headers["retry-after"]) >= 1
    # even a correct key is refused while the address is over its budget
    r = attempt(w.keys["cpo1"])
    assert r.status_code == 429 and sess.COOKIE not in c.cookies


def test_sign_out_ends_the_session_server_side(w: World) -> None:
    c = w.client("cpo1")
    stolen = c.cookies.get(sess.COOKIE)
    assert c.get("/console/certificates").status_code == 200
    home = c.get("/console")
    r = c.post("/console/logout", data={"csrf": csrf_of(home.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
    replay = w.client()
    replay.cookies.set(sess.COOKIE, stolen or "", domain="testserver", path="/console")
    r = replay.get("/console/certificates", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


def test_revoked_api_key_ends_its_sessions(w: World) -> None:
    full, row = create_api_key(w.ctx.db, w.org("cpo1"))
    c = w.client()
    sign_in(c, full)
    assert c.get("/console/certificates", follow_redirects=False).status_code == 200
    revoke_api_key(w.ctx.db, row.key_id)
    r = c.get("/console/certificates", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


def test_tampered_or_forged_cookies_are_refused(w: World) -> None:
    c = w.client("cpo1")
    value = c.cookies.get(sess.COOKIE) or ""
    v, body, mac = value.split(".")
    payload = json.loads(sess._unb64(body))
    payload["org"] = w.org("admin")
    forged_body = sess._b64(json.dumps(payload).encode())
    for bad in (f"{v}.{forged_body}.{mac}", f"{v}.{body}.{mac[:-2]}AA", "garbage", ""):
        d = w.client()
        d.cookies.set(sess.COOKIE, bad, domain="testserver", path="/console")
        r = d.get("/console/certificates", follow_redirects=False)
        assert r.status_code == 303, bad
    # a session token signed with another key (another installation) is worthless here
    other = sess.encode(b"k" * 32, sess.new_session(w.org("admin"), "apikey:" + w.keys["admin"].split("_")[1]))
    d = w.client()
    d.cookies.set(sess.COOKIE, other, domain="testserver", path="/console")
    assert d.get("/console/certificates", follow_redirects=False).status_code == 303


def test_expired_session_is_refused() -> None:
    key = b"x" * 32
    s = sess.new_session("org", "apikey:abc", now=1000)
    token = sess.encode(key, s)
    assert sess.decode(key, token, now=1001) == s
    assert sess.decode(key, token, now=s.expires_at) is None


def test_client_certificate_sign_in_via_trusted_proxy(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    org = w.org("cpo2")
    issued = w.ctx.engine.issue_from_csr("api-client", csr_pem(f"{org} console", o=org, key=key), tenant=org)
    hdr = {"X-SSL-Client-Cert": quote(issued.cert.public_bytes(serialization.Encoding.PEM).decode())}
    monkeypatch.setattr(w.ctx.settings, "trusted_proxies", "testclient")  # V2GPKI_TRUSTED_PROXIES
    c = w.client()
    page = c.get("/console/login", headers=hdr)
    assert "Sign in with this certificate" in page.text
    r = c.post("/console/login", data={"csrf": csrf_of(page.text), "method": "certificate"}, headers=hdr,
               follow_redirects=False)
    assert r.status_code == 303, r.text
    assert c.get("/console/certificates", headers=hdr).status_code == 200
    # the session is bound to that certificate: without it (or after its revocation) it is over
    assert c.get("/console/certificates", follow_redirects=False).status_code == 303
    w.ctx.engine.revoke(issued.serial, "keyCompromise", issuer=issued.issuer)
    assert c.get("/console/certificates", headers=hdr, follow_redirects=False).status_code == 303


# -- headers and page hygiene ----------------------------------------------------------------------------


def test_security_headers_and_no_inline_script_or_external_resources(w: World) -> None:
    c = w.client("admin")
    pages = ["/console", "/console/hierarchies", "/console/certificates", url_of(w.certs["cpo1_a"]),
             "/console/expiry", "/console/audit", "/console/login"]
    for path in pages:
        r = c.get(path)
        assert r.status_code == 200, path
        h = r.headers
        assert h["content-security-policy"] == CSP, path
        assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP and "script-src 'self'" in CSP
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["cache-control"] == "no-store"
        html = r.text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline script on {path}"
        assert not re.search(r"\son[a-z]+\s*=", html), f"inline event handler on {path}"
        assert not re.search(r"\sstyle\s*=", html), f"inline style on {path}"
        assert not re.search(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", html), f"external resource on {path}"
        assert html.count("<h1") == 1 and '<html lang="en">' in html
    for static in ("/console/static/console.css", "/console/static/console.js"):
        r = c.get(static)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
    r = c.get("/console/certificates/cpo-sub2/1")
    assert r.status_code == 404 and r.headers["x-frame-options"] == "DENY"
    # the API keeps its own (JSON) behaviour
    assert "content-security-policy" not in c.get("/healthz").headers


# -- tenancy -----------------------------------------------------------------------------------------------


def test_cpo_sees_only_its_own_certificates(w: World) -> None:
    c1, c2 = w.client("cpo1"), w.client("cpo2")
    mine, theirs = w.certs["cpo1_a"], w.certs["cpo2_a"]
    listing = c1.get("/console/certificates?profile=secc").text
    assert mine.serial.upper() in listing and w.certs["cpo1_b"].serial.upper() in listing
    assert theirs.serial.upper() not in listing
    # every row belongs to cpo1 (the DB also holds other test modules' certificates)
    with w.ctx.db.session() as s:
        own = {r.serial.upper() for r in s.exec(select(Certificate).where(Certificate.tenant == w.org("cpo1")))}
    assert set(re.findall(r'data-serial="([0-9A-F]+)"', listing)) <= own
    assert c1.get(url_of(mine)).status_code == 200
    for path in (url_of(mine), url_of(mine) + "/download?format=pem", url_of(mine) + "/download?format=der",
                 url_of(mine) + "/revoke?reason=keyCompromise"):
        r = c2.get(path)
        assert r.status_code == 404, path
        assert "No such certificate" in r.text and mine.serial.upper() not in r.text
    r = c2.post(url_of(mine) + "/revoke", data={"csrf": csrf_of(c2.get("/console").text), "reason": "keyCompromise"})
    assert r.status_code == 404 and db_status(w.ctx, mine) == "valid"
    searched = c2.get("/console/certificates?identifier=" + quote(ident(mine))).text
    assert 'data-testid="total">0<' in searched and mine.serial.upper() not in searched
    # admin and auditor see everyone's
    for who in ("admin", "auditor"):
        c = w.client(who)
        assert c.get(url_of(mine)).status_code == 200 and c.get(url_of(theirs)).status_code == 200


def test_auditor_cannot_revoke(w: World) -> None:
    c = w.client("auditor")
    page = c.get(url_of(w.certs["cpo1_b"])).text
    assert 'action="' + url_of(w.certs["cpo1_b"]) + '/revoke"' not in page
    assert c.get(url_of(w.certs["cpo1_b"]) + "/revoke?reason=keyCompromise").status_code == 403
    r = c.post(url_of(w.certs["cpo1_b"]) + "/revoke", data={"csrf": csrf_of(page), "reason": "keyCompromise"})
    assert r.status_code == 403 and db_status(w.ctx, w.certs["cpo1_b"]) == "valid"


def test_downloads_are_the_certificate(w: World) -> None:
    from cryptography import x509

    c = w.client("cpo1")
    i = w.certs["cpo1_a"]
    pem = c.get(url_of(i) + "/download?format=pem")
    assert pem.headers["content-type"].startswith("application/x-pem-file")
    assert "attachment" in pem.headers["content-disposition"]
    assert x509.load_pem_x509_certificate(pem.content) == i.cert
    der = c.get(url_of(i) + "/download?format=der")
    assert der.headers["content-type"] == "application/pkix-cert" and der.content == i.der


# -- CSRF and revocation --------------------------------------------------------------------------------------


def test_state_changing_posts_without_the_csrf_token_are_refused(w: World) -> None:
    c = w.client("cpo1")
    target = w.certs["cpo1_b"]
    other_session = w.client("cpo1")
    foreign = csrf_of(other_session.get("/console").text)
    for form in ({"reason": "keyCompromise"}, {"reason": "keyCompromise", "csrf": ""},
                 {"reason": "keyCompromise", "csrf": foreign}):
        r = c.post(url_of(target) + "/revoke", data=form)
        assert r.status_code == 403 and "Form refused" in r.text, form
    assert db_status(w.ctx, target) == "valid"
    assert c.post("/console/logout", data={"csrf": ""}).status_code == 403
    assert c.get("/console/certificates").status_code == 200  # still signed in
    with w.ctx.db.session() as s:
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "console.csrf_refused",
                                                  AuditEvent.org == w.org("cpo1"))).all()
    assert len(refused) >= 4
    # a JSON or multipart body is not a form this console sends
    r = c.post(url_of(target) + "/revoke", json={"reason": "keyCompromise"})
    assert r.status_code == 415 and db_status(w.ctx, target) == "valid"


def test_revocation_confirms_goes_through_the_engine_and_ocsp_says_revoked(w: World) -> None:
    c = w.client("cpo1")
    i = issue_secc(w.ctx, w.org("cpo1"), w.ops["cpo1"])
    detail = c.get(url_of(i)).text
    assert 'data-testid="ocsp-status">good<' in detail
    confirm = c.get(url_of(i) + "/revoke?reason=keyCompromise")
    assert confirm.status_code == 200 and ident(i) in confirm.text
    assert 'data-testid="confirm-identifier">' + ident(i) in confirm.text
    assert db_status(w.ctx, i) == "valid"  # the confirmation page changes nothing
    assert c.get(url_of(i) + "/revoke?reason=notAReason").status_code == 400
    r = c.post(url_of(i) + "/revoke", data={"csrf": csrf_of(confirm.text), "reason": "keyCompromise"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == url_of(i) + "?revoked=1"
    assert db_status(w.ctx, i) == "revoked"
    page = c.get(r.headers["location"]).text
    assert 'data-testid="status">revoked<' in page and 'data-testid="revoked-notice"' in page
    assert 'data-testid="ocsp-status">revoked<' in page and "as the OCSP responder answers it" in page
    assert 'data-testid="ocsp-reason">keyCompromise<' in page
    # the same audit event as the API's revoke, by this API key and organization
    with w.ctx.db.session() as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "certificate.revoke",
                                             AuditEvent.object == f"{i.issuer}/{i.serial}")).one()
    assert ev.actor == "apikey:" + w.keys["cpo1"].split("_")[1] and ev.org == w.org("cpo1")
    assert ev.details["reason"] == "keyCompromise"
    # the API agrees; a second revocation is a conflict
    api = c.get(f"/v1/certificates/{i.issuer}/{i.serial}", headers={"Authorization": f"Bearer {w.keys['cpo1']}"})
    assert api.json()["status"] == "revoked"
    r = c.post(url_of(i) + "/revoke", data={"csrf": csrf_of(confirm.text), "reason": "superseded"})
    assert r.status_code == 409
    listed = c.get("/console/certificates?status=revoked&identifier=" + quote(ident(i))).text
    assert f'data-serial="{i.serial.upper()}" data-status="revoked"' in listed


def test_ocsp_status_is_the_responders_answer(w: World) -> None:
    """The page shows what pki.ocsp answers for a real OCSP request — not a copy of the database row."""
    from cryptography.x509 import ocsp as x509_ocsp

    from api.console import ocsp_bridge

    i = issue_secc(w.ctx, w.org("cpo1"), w.ops["cpo1"])
    w.ctx.engine.revoke(i.serial, "certificateHold", issuer=i.issuer)
    with w.ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.serial == i.serial)).one()
    view = ocsp_bridge.responder_status(w.ctx, row)
    assert view is not None and view.source == "responder"
    assert view.status == "revoked" and view.revocation_reason == "certificateHold"
    assert view.next_update is not None and view.this_update is not None
    req = x509_ocsp.OCSPRequestBuilder().add_certificate(i.cert, i.chain[0], _sha1()).build()
    from pki.ocsp import responder_for

    resp = x509_ocsp.load_der_ocsp_response(responder_for(w.ctx).respond(req.public_bytes(serialization.Encoding.DER)).der)
    assert resp.certificate_status == x509_ocsp.OCSPCertStatus.REVOKED


def _sha1():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA1()  # noqa: S303 - the CertID hash chargers send


# -- filters --------------------------------------------------------------------------------------------


def test_certificate_filters(w: World) -> None:
    c = w.client("cpo2")
    org, op = w.org("cpo2"), w.ops["cpo2"]
    soon = issue_secc(w.ctx, org, op, days=5)
    later = issue_secc(w.ctx, org, op, days=60)
    station = issue_station(w.ctx, org, days=30)

    def serials(query: str) -> set[str]:
        r = c.get("/console/certificates?" + query)
        assert r.status_code == 200
        return set(re.findall(r'data-serial="([0-9A-F]+)"', r.text))

    cutoff = (date.today() + timedelta(days=10)).isoformat()
    got = serials(f"expiring_before={cutoff}")
    assert soon.serial.upper() in got and later.serial.upper() not in got
    assert serials("profile=cs-client") == {station.serial.upper()}
    assert serials("identifier=" + quote(ident(later).lower())) == {later.serial.upper()}  # prefix, any case
    assert later.serial.upper() in serials("identifier=" + quote(op))
    assert station.serial.upper() not in serials("identifier=" + quote(op))
    assert serials("status=revoked").isdisjoint({soon.serial.upper(), later.serial.upper()})
    assert soon.serial.upper() in serials("status=valid&profile=secc")
    r = c.get("/console/certificates?expiring_before=not-a-date&status=bogus")
    assert r.status_code == 200 and "must be a date" in r.text and "Unknown status" in r.text
    assert 'value="cs-client"' in r.text and 'value="contract"' not in r.text  # only profiles it has


def test_certificate_pages_follow_their_cursor_and_count_up_to_a_bound(w: World,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """#28 item 3: pages by keyset (the next page's link carries the last row's key), the matches counted up
    to COUNT_LIMIT and shown as "N+" past it, an edited cursor answered with the first page."""
    c = w.client("cpo2")
    org, op = w.org("cpo2"), w.ops["cpo2"]
    issued = [issue_secc(w.ctx, org, op, days=40 + i) for i in range(3)]
    monkeypatch.setattr(views, "PAGE_SIZE", 1)
    monkeypatch.setattr(data, "COUNT_LIMIT", 2)
    cutoff = (date.today() + timedelta(days=400)).isoformat()
    seen: list[str] = []
    url = f"/console/certificates?expiring_before={cutoff}&profile=secc"
    while url and len(seen) < 50:
        r = c.get(url)
        assert r.status_code == 200
        seen += re.findall(r'data-serial="([0-9A-F]+)"', r.text)
        assert 'data-testid="total">2+<' in r.text and "counted up to 2" in r.text
        m = re.search(r'href="(/console/certificates\?[^"]*cursor=[^"]*)" rel="next"', r.text)
        url = html.unescape(m.group(1)) if m else ""
    assert len(seen) == len(set(seen)) and {i.serial.upper() for i in issued} <= set(seen)
    r = c.get(f"/console/certificates?identifier={quote(op)}&cursor=12")  # an id cursor: not this order's
    assert r.status_code == 200 and "no longer fits these filters" in r.text
    r = c.get("/console/certificates?cursor=not-a-cursor")
    assert r.status_code == 200 and "no longer fits these filters" in r.text


# -- expiry ----------------------------------------------------------------------------------------------


def expected_weeks(not_afters: dict[str, list[datetime]], start: datetime, weeks: int = 26) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for profile, nas in not_afters.items():
        counts = [0] * weeks
        for na in nas:
            wk = (na - start) // timedelta(weeks=1)
            if 0 <= wk < weeks:
                counts[wk] += 1
        out[profile] = counts
    return {p: v for p, v in out.items() if any(v)}


def seed_expiry(ctx: Context, org: str, op: str) -> dict[str, list[datetime]]:
    """A known set: secc expiring in 3, 4, 10, 40 and 85 days; stations in 20, 100 and 170 days; one more
    of each that must not count (revoked; beyond 26 weeks)."""
    nas: dict[str, list[datetime]] = {"secc": [], "cs-client": []}
    for d in (3, 4, 10, 40, 85):
        nas["secc"].append(issue_secc(ctx, org, op, days=d).cert.not_valid_after_utc)
    for d in (20, 100, 170):
        nas["cs-client"].append(issue_station(ctx, org, days=d).cert.not_valid_after_utc)
    gone = issue_secc(ctx, org, op, days=12)
    ctx.engine.revoke(gone.serial, "superseded", issuer=gone.issuer)
    issue_station(ctx, org, days=200)  # after the 26th week
    return nas


def test_expiry_numbers_chart_and_csv(w: World) -> None:
    org = f"cpo3-{w.tag}"
    op = f"DE*{alnum(3)}"
    create_org(w.ctx.db, org, "cpo", [op])
    key = create_api_key(w.ctx.db, org)[0]
    nas = seed_expiry(w.ctx, org, op)
    c = w.client()
    sign_in(c, key)
    r = c.get("/console/expiry.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["week_start", "week_end", "total", "cs-client", "secc"] and len(rows) == 27
    start = datetime.combine(date.fromisoformat(rows[1][0]), time(0), tzinfo=UTC)
    assert start.date() == datetime.now(UTC).date() or start.date() == (datetime.now(UTC) - timedelta(days=1)).date()
    want = expected_weeks(nas, start)
    assert [int(x[4]) for x in rows[1:]] == want["secc"]
    assert [int(x[3]) for x in rows[1:]] == want["cs-client"]
    assert [int(x[2]) for x in rows[1:]] == [a + b for a, b in zip(want["secc"], want["cs-client"], strict=True)]
    assert sum(int(x[2]) for x in rows[1:]) == 8
    assert all(date.fromisoformat(x[1]) - date.fromisoformat(x[0]) == timedelta(days=7) for x in rows[1:])
    page = c.get("/console/expiry").text
    blob = re.search(r'data-expiry="([^"]+)"', page)
    assert blob
    chart = json.loads(blob.group(1).replace("&#34;", '"').replace("&quot;", '"'))
    assert chart["counts"] == want and chart["weeks"][0] == rows[1][0]
    bars = re.findall(r'data-profile="([^"]+)" data-week="(\d+)" data-count="(\d+)"', page)
    drawn: dict[str, list[int]] = {p: [0] * 26 for p in want}
    for p, wk, n in bars:
        drawn[p][int(wk)] += int(n)
    assert drawn == want
    assert 'data-testid="grand-total">8<' in page
    # the admin sees (at least) these too; another CPO sees none of them
    admin_rows = list(csv.reader(io.StringIO(w.client("admin").get("/console/expiry.csv").text)))
    assert sum(int(x[admin_rows[0].index("secc")]) for x in admin_rows[1:]) >= 5
    other = list(csv.reader(io.StringIO(w.client("cpo1").get("/console/expiry.csv").text)))
    assert "cs-client" not in other[0]


def test_expiry_buckets_edges(w: World) -> None:
    """Week boundaries are half-open and start at 00:00 UTC today (pure data function, fixed clock)."""
    e = data.expiry(w.ctx, "no-such-tenant")
    assert e.grand_total == 0 and e.profiles == [] and len(e.weeks) == 26
    assert data.expiry_csv(e).splitlines()[0] == "week_start,week_end,total"
    now = datetime(2030, 1, 1, 15, 0, tzinfo=UTC)
    assert data.expiry_start(now) == datetime(2030, 1, 1, tzinfo=UTC)


# -- hierarchies, audit, trust lists ----------------------------------------------------------------------


def test_hierarchy_tree_shows_chains_validity_and_key_uris(w: World) -> None:
    c = w.client("cpo1")
    page = c.get("/console/hierarchies").text
    kinds = dict(re.findall(r'data-ca="([^"]+)" data-kind="([^"]+)"', page))
    assert kinds["v2g-root"] == "root" and kinds["cpo-sub1"] == "sub-CA" and kinds["cpo-sub2"] == "issuing CA"
    assert kinds["mo-root"] == "root" and kinds["csms-root"] == "root"
    # cpo-sub2 is nested inside cpo-sub1, itself inside v2g-root (document order and nesting depth)
    pos = {n: page.index(f'data-ca="{n}"') for n in ("v2g-root", "cpo-sub1", "cpo-sub2", "cps-sub1", "oem-root")}
    assert pos["v2g-root"] < pos["cpo-sub1"] < pos["cpo-sub2"] < pos["cps-sub1"]
    assert page[pos["v2g-root"]:pos["cpo-sub2"]].count("<ul>") == 2
    tree = data.hierarchy_tree(w.ctx, w.org("cpo1"))
    v2g = next(n for n in tree.roots if n.row.name == "v2g-root")
    sub1 = next(n for n in v2g.children if n.row.name == "cpo-sub1")
    sub2 = next(n for n in sub1.children if n.row.name == "cpo-sub2")
    assert sub2.issued_valid >= 2  # cpo1's own SECC certificates only
    assert all(0 <= n.bar_x <= 100 and n.bar_x + n.bar_w <= 100.6 for n in (v2g, sub1, sub2))
    uris = re.findall(r'<code class="uri">([^<]+)</code>', page)
    assert uris and all(u.startswith("pkcs11:") for u in uris)
    assert "pin-value" not in page and "pin-source" not in page
    assert data.safe_key_uri("pkcs11:token=t;object=o;type=private?pin-value=1234&module-name=x") == \
        "pkcs11:token=t;object=o;type=private?module-name=x"
    assert data.safe_key_uri("pkcs11:token=t;object=o?pin-source=file:/p") == "pkcs11:token=t;object=o"


def test_audit_page_shows_verification_and_is_for_auditors(w: World) -> None:
    assert w.client("cpo1").get("/console/audit").status_code == 403
    c = w.client("auditor")
    r = c.get("/console/audit")
    assert r.status_code == 200
    assert 'data-testid="audit-verify" data-ok="true"' in r.text
    assert "console.signin" in r.text
    assert "Audit log" in w.client("admin").get("/console").text
    assert 'href="/console/audit"' not in w.client("cpo1").get("/console").text


def test_trust_lists_page(w: World) -> None:
    from api.console import trustlists

    if not trustlists.available(w.ctx):
        assert w.client("cpo1").get("/console/trust-lists").status_code == 404
        pytest.skip("the lifecycle workers' tables are not in this schema")
    from pki.store.models_lifecycle import Delivery, TrustStoreVersion

    now = datetime.now(UTC).replace(microsecond=0)
    store = f"t{secrets.token_hex(3)}"
    rows: list[Any] = [TrustStoreVersion(store=store, version=ver, content_sha256="ab" * 32, reason=f"test {ver}",
                                         bundle="{}", signature=b"x", jws="x", signer_chain_pem="", issued_at=now,
                                         next_update=now + timedelta(days=7)) for ver in (1, 2)]
    # delivered already, so no worker picks these up while they exist
    rows += [Delivery(delivery_id=secrets.token_hex(8), subscription_id=0, org=w.org(who), event="truststore",
                      event_key=f"{store}-{who}", payload={}, state="delivered", next_attempt_at=now,
                      last_error=f"err-{who}-{store}", created_at=now, delivered_at=now) for who in ("cpo1", "cpo2")]
    with w.ctx.db.session() as s:
        s.add_all(rows)
        s.commit()
    try:
        page = w.client("cpo1").get("/console/trust-lists")
        assert page.status_code == 200 and store in page.text
        assert f"err-cpo1-{store}" in page.text and f"err-cpo2-{store}" not in page.text
        assert 'href="/console/trust-lists"' in page.text
    finally:  # other modules share this database: leave no made-up trust-list versions behind
        with w.ctx.db.session() as s:
            for r in rows:
                s.delete(s.merge(r))
            s.commit()
