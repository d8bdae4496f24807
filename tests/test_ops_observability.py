"""Observability (api/observability.py): request IDs, JSON logs without secrets, Prometheus metrics (in one
process and summed across processes in multiprocess mode), on-scrape gauges checked against the
database, and /readyz with each dependency failing in turn. SoftHSM2 + SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import select

from api import observability
from api.app import create_app
from pki.context import Context
from pki.orgs import create_api_key
from pki.store.db import Database, utcnow
from pki.store.models import Certificate, OutboxEvent
from tests.conftest import csr_pem, org_with_fresh_prefix

REPO = Path(__file__).resolve().parent.parent


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclasses.dataclass
class Env:
    client: TestClient
    ctx: Context
    key: str
    op: str


@pytest.fixture(scope="module")
def env(ctx: Context) -> Iterator[Env]:
    tag = secrets.token_hex(3)
    # a prefix no other tenant holds (#21 item 4); csr_pem's O is its registered certificate name (item 6)
    op = org_with_fresh_prefix(ctx, f"obs-{tag}", "cpo", settings={"organization_name": "Test Org"})
    key = create_api_key(ctx.db, f"obs-{tag}")[0]
    with TestClient(create_app(ctx)) as client:
        yield Env(client, ctx, key, op)


def _enroll(e: Env) -> dict[str, str]:
    evse = f"{e.op}*E{secrets.token_hex(3).upper()}"
    r = e.client.post("/v1/enrollments", json={"csr": csr_pem(evse, dc="CPO").decode(), "profile": "secc"},
                      headers={"Authorization": f"Bearer {e.key}"})
    assert r.status_code == 201, r.text
    body: dict[str, str] = r.json()
    return body


# -- request IDs ------------------------------------------------------------------------------------------


def test_request_id_is_echoed_generated_or_replaced(env: Env) -> None:
    r = env.client.get("/healthz", headers={"X-Request-ID": "abc-123.x:y"})
    assert r.headers["x-request-id"] == "abc-123.x:y"
    gen = env.client.get("/healthz").headers["x-request-id"]
    assert len(gen) == 32 and int(gen, 16) >= 0
    assert env.client.get("/healthz").headers["x-request-id"] != gen
    for bad in (b"a b", b"x" * 129, "\u00e9vil".encode(), b"a\tb", b"{\"json\":1}"):
        got = env.client.get("/healthz", headers={"X-Request-ID": bad})
        assert got.headers["x-request-id"].encode() != bad and len(got.headers["x-request-id"]) == 32
    # problem responses carry it too
    nf = env.client.get("/v1/certificates/x/1", headers={"Authorization": f"Bearer {env.key}",
                                                         "X-Request-ID": "req-404"})
    assert nf.status_code == 404 and nf.headers["x-request-id"] == "req-404"


# -- JSON logs ---------------------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    observability.configure_logging("json", "INFO")
    yield
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    root.setLevel(saved[1])


def test_json_access_log_carries_request_id_and_no_secret(env: Env, json_logs: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    r = env.client.get("/v1/me", headers={"Authorization": f"Bearer {env.key}", "X-Request-ID": "log-check-1"})
    assert r.status_code == 200
    logging.getLogger("v2gpki.test").info("connecting with key %s to postgresql://u:hunter2@db/x pin=9876",
                                          env.key, extra={"hsm_pin": "9876", "serial": "AB"})
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [x for x in lines if x["logger"] == "v2gpki.access" and x.get("request_id") == "log-check-1"]
    assert len(access) == 1, err
    a = access[0]
    assert a["route"] == "/v1/me" and a["status"] == 200 and a["method"] == "GET" and a["duration_ms"] >= 0
    secret_part = env.key.split("_", 2)[2]
    assert secret_part not in err and "hunter2" not in err and "9876" not in err
    mine = [x for x in lines if x["logger"] == "v2gpki.test"]
    assert mine and mine[0]["hsm_pin"] == "[redacted]" and mine[0]["serial"] == "AB"
    assert "[redacted]" in mine[0]["msg"]


def test_redact_patterns() -> None:
    r = observability.redact
    assert r("v2k_0123456789ab_SeCrEt-_x") == "v2k_0123456789ab_[redacted]"
    assert r("Authorization: Bearer abc.def") == "Authorization: Bearer [redacted]"
    assert r("redis://:pw@h:6379/0 postgresql://user:p%40ss@h/db") == \
        "redis://:[redacted]@h:6379/0 postgresql://user:[redacted]@h/db"
    assert r("so_pin=1 user_pin: 2 password=3") == "so_pin=[redacted] user_pin: [redacted] password=[redacted]"
    assert r("serial 0A1B issued") == "serial 0A1B issued"


# -- metrics -----------------------------------------------------------------------------------------------


def test_issuance_revocation_and_hsm_metrics_count_what_happened(env: Env) -> None:
    before = scrape(env.client)
    cert = _enroll(env)
    mid = scrape(env.client)
    issued = value(mid, "v2gpki_certificates_issued_total", profile="secc", issuer=cert["issuer"]) - \
        value(before, "v2gpki_certificates_issued_total", profile="secc", issuer=cert["issuer"])
    assert issued == 1
    signs = value(mid, "v2gpki_hsm_sign_duration_seconds_count", mechanism="ecdsa") - \
        value(before, "v2gpki_hsm_sign_duration_seconds_count", mechanism="ecdsa")
    assert signs >= 1  # the certificate (and its pre-signed OCSP response, when the responder hooks run)
    r = env.client.post(f"/v1/certificates/{cert['issuer']}/{cert['serial']}/revoke",
                        json={"reason": "keyCompromise"}, headers={"Authorization": f"Bearer {env.key}"})
    assert r.status_code == 200, r.text
    again = env.client.post(f"/v1/certificates/{cert['issuer']}/{cert['serial']}/revoke",
                            json={"reason": "keyCompromise"}, headers={"Authorization": f"Bearer {env.key}"})
    assert again.status_code == 409  # refused: must not count
    after = scrape(env.client)
    assert value(after, "v2gpki_certificates_revoked_total", reason="keyCompromise") - \
        value(mid, "v2gpki_certificates_revoked_total", reason="keyCompromise") == 1
    assert value(after, "v2gpki_http_requests_total", method="POST", route="/v1/enrollments", status="201") >= 1
    assert value(after, "v2gpki_http_requests_total", method="POST",
                 route="/v1/certificates/{issuer}/{serial}/revoke", status="409") >= 1


def test_ocsp_metrics_label_the_certificate_status(env: Env) -> None:
    cert = _enroll(env)
    env.client.post(f"/v1/certificates/{cert['issuer']}/{cert['serial']}/revoke", json={"reason": "superseded"},
                    headers={"Authorization": f"Bearer {env.key}"})
    leaf = x509.load_pem_x509_certificate(cert["certificate"].encode())
    issuer = env.ctx.engine.ca(cert["issuer"]).cert
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    before = scrape(env.client)
    r = env.client.post("/ocsp", content=req.public_bytes(serialization.Encoding.DER),
                        headers={"Content-Type": "application/ocsp-request"})
    assert r.status_code == 200
    assert ocsp.load_der_ocsp_response(r.content).certificate_status is ocsp.OCSPCertStatus.REVOKED
    env.client.post("/ocsp", content=b"garbage", headers={"Content-Type": "application/ocsp-request"})
    after = scrape(env.client)
    key = {"method": "POST", "response_status": "successful", "cert_status": "revoked"}
    assert value(after, "v2gpki_ocsp_requests_total", **key) - value(before, "v2gpki_ocsp_requests_total", **key) == 1
    bad = {"method": "POST", "response_status": "malformed_request", "cert_status": "none"}
    assert value(after, "v2gpki_ocsp_requests_total", **bad) - value(before, "v2gpki_ocsp_requests_total", **bad) == 1
    assert value(after, "v2gpki_ocsp_request_duration_seconds_count") - \
        value(before, "v2gpki_ocsp_request_duration_seconds_count") == 2
    assert value(after, "v2gpki_http_requests_total", method="POST", route="/ocsp", status="200") >= 2


def test_expiring_and_outbox_gauges_match_the_database(env: Env) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=1)  # the gauge truncates "now" to whole seconds
    m = scrape(env.client)
    t1 = datetime.now(UTC)
    with env.ctx.db.session() as s:
        rows = [(r.status, _aware(r.not_after)) for r in s.exec(select(Certificate))]
        pending = [o for o in s.exec(select(OutboxEvent)) if o.dispatched_at is None]
    for name, days in observability.EXPIRY_WINDOWS:
        w = timedelta(days=days)
        # Certificates inside the window for every instant of [t0, t1] must be counted; only those inside
        # it at some instant may be: exact unless a notAfter falls on a window edge during the scrape.
        surely = sum(1 for st, na in rows if st == "valid" and t1 <= na < t0 + w)
        maybe = sum(1 for st, na in rows if st == "valid" and t0 <= na < t1 + w)
        got = value(m, "v2gpki_certificates_expiring", window=name)
        assert surely <= got <= maybe, (name, surely, got, maybe)
    assert value(m, "v2gpki_outbox_pending") == len(pending)
    assert value(m, "v2gpki_collector_up", source="database") == 1


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def test_expiring_windows_on_crafted_rows(tmp_path: Path) -> None:
    """Each window counts valid certificates with notAfter in [now, now+window): not the revoked, not the
    expired, not the later ones — on a database of its own."""
    db = Database(f"sqlite:///{tmp_path / 'g.db'}")
    db.migrate()
    now = utcnow()
    spec = [("valid", 2), ("valid", 3), ("valid", 20), ("valid", 60), ("valid", 400), ("revoked", 2),
            ("hold", 10), ("valid", -1)]
    with db.session() as s:
        for i, (status, days) in enumerate(spec):
            s.add(Certificate(issuer="x", serial=f"{i + 1:x}", profile="secc", subject="CN=x", status=status,
                              not_before=now - timedelta(days=500), not_after=now + timedelta(days=days),
                              fingerprint=f"{i:064x}", der=b"\x30\x00", created_at=now))
        s.add(OutboxEvent(kind="k", payload={}, created_at=now - timedelta(seconds=120)))
        s.add(OutboxEvent(kind="k", payload={}, created_at=now, dispatched_at=now))
        s.commit()
    fake = type("Ctx", (), {"db": db})()
    reg_out = {}
    for fam in observability.StateCollector(fake, None, []).collect():
        for smp in fam.samples:
            reg_out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert value(reg_out, "v2gpki_certificates_expiring", window="7d") == 2
    assert value(reg_out, "v2gpki_certificates_expiring", window="30d") == 3
    assert value(reg_out, "v2gpki_certificates_expiring", window="90d") == 4
    assert value(reg_out, "v2gpki_outbox_pending") == 1
    assert value(reg_out, "v2gpki_outbox_oldest_pending_seconds") >= 120
    db.dispose()


def test_multiprocess_mode_sums_worker_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (as deploy/ and scripts/stack.sh set it) a scrape answered by any one
    uvicorn worker shows the counts of all of them."""
    mp = tmp_path / "metrics"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    inc = ("from api.observability import ISSUED, HSM_SIGN_LATENCY\n"
           "ISSUED.labels('secc', 'cpo-sub2').inc(3)\nHSM_SIGN_LATENCY.labels('ecdsa').observe(0.001)\n")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", inc], env=env, check=True, cwd=REPO, timeout=60)
    out = subprocess.run([sys.executable, "-c", "import sys\nfrom api.observability import render_metrics\n"
                          "sys.stdout.write(render_metrics(None).decode())"],
                         env=env, check=True, cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    fams = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(out) for s in f.samples}
    assert value(fams, "v2gpki_certificates_issued_total", profile="secc", issuer="cpo-sub2") == 6
    assert value(fams, "v2gpki_hsm_sign_duration_seconds_count", mechanism="ecdsa") == 2
    assert len(list(mp.glob("*.db"))) >= 2


# -- readiness ---------------------------------------------------------------------------------------------


class _DeadHsm:
    def list(self) -> list[str]:
        from hsm.errors import HSMUnavailable

        raise HSMUnavailable("circuit open")


def _ready(ctx: Context) -> tuple[int, dict[str, object]]:
    with TestClient(create_app(ctx, routers=[])) as c:
        r = c.get("/readyz")
        return r.status_code, r.json()


def test_readyz_checks_database_hsm_and_broker(ctx: Context) -> None:
    redis_url = os.environ.get("V2GPKI_TEST_REDIS_URL")
    s = ctx.settings.model_copy(update={"broker_url": redis_url})
    code, body = _ready(dataclasses.replace(ctx, settings=s))
    assert code == 200, body
    want = {"database": "ok", "hsm": "ok"} | ({"broker": "ok"} if redis_url else {})
    assert body == {"status": "ready", "checks": want}

    code, body = _ready(dataclasses.replace(ctx, keystore=_DeadHsm()))  # type: ignore[arg-type]
    assert code == 503 and body["checks"] == {"database": "ok", "hsm": "failed: HSMUnavailable"}  # type: ignore[index]

    dead_db = Database(f"sqlite:////nonexistent-{secrets.token_hex(4)}/x.db")
    code, body = _ready(dataclasses.replace(ctx, db=dead_db))
    assert code == 503 and body["checks"]["database"].startswith("failed: ")  # type: ignore[index]
    assert body["checks"]["hsm"] == "ok"  # type: ignore[index]

    broken = ctx.settings.model_copy(update={"broker_url": "redis://:hunter2@127.0.0.1:1/0"})
    code, body = _ready(dataclasses.replace(ctx, settings=broken))
    assert code == 503 and body["checks"]["broker"].startswith("failed: ")  # type: ignore[index]
    assert "hunter2" not in json.dumps(body) and "127.0.0.1" not in json.dumps(body)


def test_after_commit_callbacks_run_once_on_commit_and_never_after_a_rollback() -> None:
    """Metrics count what committed (pki.store.db.on_commit, pki/metrics.py): a callback runs after its
    transaction commits, exactly once, and is dropped when the transaction rolls back or the session
    closes without committing — so an issuance that failed to store is never counted."""
    from sqlalchemy import create_engine
    from sqlmodel import Session

    from pki.store.db import on_commit as _after_commit

    eng = create_engine("sqlite://")
    ran: list[str] = []
    with Session(eng) as s:
        s.connection()
        _after_commit(s, lambda: ran.append("rolled back"))
        s.rollback()
        s.connection()
        s.commit()
        assert ran == []
        s.connection()
        _after_commit(s, lambda: ran.append("a"))
        _after_commit(s, lambda: ran.append("b"))
        s.commit()
        assert ran == ["a", "b"]
        s.connection()
        s.commit()
        assert ran == ["a", "b"]
    with Session(eng) as s:
        s.connection()
        _after_commit(s, lambda: ran.append("closed"))
    with Session(eng) as s:
        s.connection()
        s.commit()
    assert ran == ["a", "b"]
