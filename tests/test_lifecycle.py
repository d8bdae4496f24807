"""Lifecycle domain (pki/lifecycle.py, pki/trustlist.py) on SoftHSM2, SQLite and PostgreSQL: expiry alerts
exactly once per window and grouped per tenant, webhook signing / backoff / dead-lettering, e-mail,
renewal of service-held keys, root rollover with a verifiable trust list, the transactional outbox, and
the subscription API. The real-worker tests are in tests/test_workers.py."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col, select

from pki import lifecycle, trustlist
from pki.context import Context
from pki.csr import SubjectFields
from pki.errors import AlreadyRevoked, PolicyError
from pki.issuance import IssueRequest, pem
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from pki.store.models import Certificate, OutboxEvent
from pki.store.models_lifecycle import Delivery, ExpiryAlert, Renewal
from tests.conftest import REPO, org_with_fresh_prefix

# -- helpers shared with tests/test_workers.py --------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None  # status sent back, None if the request was held and never answered in time


@dataclass
class WebhookServer:
    """A loopback HTTP receiver (http.server in a thread). ``fail[path]`` statuses are answered in order
    before 200; ``hold[path]`` makes the first request on that path wait until ``release`` is set."""

    httpd: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    fail: dict[str, list[int]] = field(default_factory=dict)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait(self, path: str, n: int, timeout: float = 90.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.on(path)
            if len(got) >= n:
                return got
            time.sleep(0.1)
        return self.on(path)


def start_webhook_server() -> WebhookServer:
    srv: WebhookServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            rec = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, None)
            with srv.lock:
                srv.received.append(rec)
                held = srv.hold.pop(self.path, None)
                queue = srv.fail.get(self.path) or []
                status = queue.pop(0) if queue else 200
            if held is not None:
                held.wait(120)  # the client may die meanwhile: this request then counts as unanswered
                return
            try:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                rec.answered = status
            except OSError:
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    srv = WebhookServer(httpd)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return srv


def tag() -> str:
    return secrets.token_hex(3)


def insert_cert(ctx: Context, *, tenant: str | None, identifier: str, days: float, profile: str = "secc",
                issuer: str = "cpo-sub2", lifetime_days: float = 90, status: str = "valid") -> Certificate:
    """A certificate row with a chosen notAfter (the scan reads rows; the DER is not parsed)."""
    now = utcnow()
    row = Certificate(issuer=issuer, serial=secrets.token_hex(8), profile=profile, subject=f"CN={identifier}",
                      identifier=identifier, tenant=tenant, not_before=now + timedelta(days=days - lifetime_days),
                      not_after=now + timedelta(days=days), status=status, fingerprint=secrets.token_hex(32),
                      revoked_at=None if status == "valid" else now,
                      revocation_reason=None if status == "valid" else "superseded",
                      der=b"\x30\x00", created_at=now)
    with ctx.db.session() as s:
        s.add(row)
        s.commit()
        s.refresh(row)
    return row


def cpo_org(ctx: Context, name: str) -> str:
    org_with_fresh_prefix(ctx, name, "cpo")  # prefixes are exclusive per role (#21 item 4)
    return name


def deliveries_of(ctx: Context, org: str, event: str = "expiry") -> list[Delivery]:
    with ctx.db.session() as s:
        return list(s.exec(select(Delivery).where(Delivery.org == org, Delivery.event == event)
                           .order_by(col(Delivery.id))))


def alerts_of(ctx: Context, tenant: str) -> list[ExpiryAlert]:
    with ctx.db.session() as s:
        return list(s.exec(select(ExpiryAlert).where(ExpiryAlert.tenant == tenant)))


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookServer]:
    srv = start_webhook_server()
    yield srv
    srv.httpd.shutdown()


# -- expiry alerts ----------------------------------------------------------------------------------------


def test_expiry_alerts_once_per_window_grouped_per_tenant(lc_ctx: Context, hooks: WebhookServer) -> None:
    t = tag()
    a, b = cpo_org(lc_ctx, f"cpoA-{t}"), cpo_org(lc_ctx, f"cpoB-{t}")
    for org in (a, b):
        lifecycle.add_subscription(lc_ctx, org, "webhook", f"{hooks.url}/{org}", ["expiry"])
    secc = insert_cert(lc_ctx, tenant=a, identifier=f"DE*ABC*E{t.upper()}1", days=20)
    contract = insert_cert(lc_ctx, tenant=a, identifier=f"DE8AA{t.upper()}XYZ", days=5, profile="contract",
                           issuer="mo-sub2")
    station = insert_cert(lc_ctx, tenant=a, identifier=f"CS-{t}", days=45, profile="cs-client", issuer="csms-root")
    replaced = insert_cert(lc_ctx, tenant=a, identifier=f"DE*ABC*E{t.upper()}2", days=10)
    insert_cert(lc_ctx, tenant=a, identifier=replaced.identifier or "", days=400)  # already renewed
    insert_cert(lc_ctx, tenant=a, identifier=f"DE*ABC*E{t.upper()}3", days=12, status="revoked")
    other = insert_cert(lc_ctx, tenant=b, identifier=f"DE*ABC*E{t.upper()}4", days=1.5)

    now = utcnow()
    lifecycle.scan_expiring(lc_ctx, now)
    da, db_ = deliveries_of(lc_ctx, a), deliveries_of(lc_ctx, b)
    assert len(da) == 1 and len(db_) == 1, "one notification per tenant"
    got = {x["serial"]: x for x in da[0].payload["alerts"]}
    assert set(got) == {secc.serial.upper(), contract.serial.upper(), station.serial.upper()}
    assert got[secc.serial.upper()]["window_days"] == 30
    assert got[contract.serial.upper()]["window_days"] == 7
    assert got[station.serial.upper()]["window_days"] == 60
    assert got[secc.serial.upper()]["identifier_type"] == "EVSEID"
    assert got[secc.serial.upper()]["identifier"] == secc.identifier
    assert "SignV2GCertificate" in got[secc.serial.upper()]["action"]
    assert got[contract.serial.upper()]["identifier_type"] == "EMAID"
    assert "CertificateUpdate" in got[contract.serial.upper()]["action"]
    assert "SignChargingStationCertificate" in got[station.serial.upper()]["action"]
    assert [x["window_days"] for x in db_[0].payload["alerts"]] == [7]
    assert db_[0].payload["alerts"][0]["serial"] == other.serial.upper()

    # The same scan again (a redelivered task, a second beat): nothing new.
    lifecycle.scan_expiring(lc_ctx, now)
    assert len(deliveries_of(lc_ctx, a)) == 1 and len(alerts_of(lc_ctx, a)) == 3

    # 16 days later: the SECC certificate (4 days left) enters the 7-day window, the station's the 30-day one.
    lifecycle.scan_expiring(lc_ctx, now + timedelta(days=16))
    da = deliveries_of(lc_ctx, a)
    assert len(da) == 2
    assert sorted((x["serial"], x["window_days"]) for x in da[1].payload["alerts"]) == sorted(
        [(secc.serial.upper(), 7), (station.serial.upper(), 30)])
    per_cert: dict[int, list[int]] = {}
    for al in alerts_of(lc_ctx, a):
        per_cert.setdefault(al.cert_id, []).append(al.window_days)
    assert sorted(per_cert[secc.id or 0]) == [7, 30]
    assert replaced.id not in per_cert


def test_concurrent_scanners_record_each_alert_once(lc_ctx: Context) -> None:
    t = tag()
    org = cpo_org(lc_ctx, f"cpoC-{t}")
    lifecycle.add_subscription(lc_ctx, org, "webhook", "http://127.0.0.1:9/x", ["expiry"])
    for i in range(3):
        insert_cert(lc_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}C{i}", days=20)
    now = utcnow()
    stale = [c for chunk in lifecycle.candidates(lc_ctx, now, tenant=org) for c in chunk]
    assert len(stale) == 3
    first = lifecycle.record_alerts(lc_ctx, stale[:1], now)  # "the other scanner" commits first
    second = lifecycle.record_alerts(lc_ctx, stale, now)  # our stale view collides on the unique constraint
    assert (first.alerts, second.alerts, second.conflicts) == (1, 2, 1)
    assert sorted((a.cert_id, a.window_days) for a in alerts_of(lc_ctx, org)) == sorted(
        {(c.cert_id, 30) for c in stale})
    notified = [x["serial"] for d in deliveries_of(lc_ctx, org) for x in d.payload["alerts"]]
    assert sorted(notified) == sorted(c.serial.upper() for c in stale), "each alert notified exactly once"

    # Real concurrency: four scanners at once over 40 certificates.
    org2 = cpo_org(lc_ctx, f"cpoD-{t}")
    lifecycle.add_subscription(lc_ctx, org2, "webhook", "http://127.0.0.1:9/y", ["expiry"])
    for i in range(40):
        insert_cert(lc_ctx, tenant=org2, identifier=f"DE*ABC*E{t.upper()}D{i}", days=3 + i)
    errors: list[BaseException] = []

    def scan() -> None:
        try:
            lifecycle.scan_expiring(lc_ctx, now, tenant=org2)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    alerts = alerts_of(lc_ctx, org2)
    assert len(alerts) == 40 and len({a.cert_id for a in alerts}) == 40
    notified = [x["serial"] for d in deliveries_of(lc_ctx, org2) for x in d.payload["alerts"]]
    assert len(notified) == 40 and len(set(notified)) == 40


# -- deliveries -------------------------------------------------------------------------------------------


def test_webhook_signed_retried_with_backoff_then_dead(lc_ctx: Context, hooks: WebhookServer) -> None:
    t = tag()
    org = cpo_org(lc_ctx, f"cpoW-{t}")
    secret = "s3cret-" + secrets.token_hex(8)
    sub = lifecycle.add_subscription(lc_ctx, org, "webhook", f"{hooks.url}/w-{t}", ["revocation"], secret=secret)
    assert sub.secret == secret
    ids = lifecycle.queue_event(lc_ctx, "revocation", f"test:{t}", {"event": "revocation", "serial": "AB"}, org)
    assert len(ids) == 1
    assert lifecycle.queue_event(lc_ctx, "revocation", f"test:{t}", {"event": "revocation"}, org) == ids  # idempotent
    assert lifecycle.attempt_delivery(lc_ctx, ids[0]).state == "delivered"
    assert lifecycle.attempt_delivery(lc_ctx, ids[0]).state == "skipped"  # a redelivered task does nothing
    (req,) = hooks.on(f"/w-{t}")
    sig = req.headers["x-v2gpki-signature"]
    assert lifecycle.verify_webhook(secret, sig, req.body)
    assert not lifecycle.verify_webhook("wrong-secret-000000", sig, req.body)
    assert not lifecycle.verify_webhook(secret, sig, req.body + b" ")
    body = json.loads(req.body)
    assert body["serial"] == "AB" and body["delivery_id"] == req.headers["x-v2gpki-delivery"]

    # A receiver that keeps failing: exponential backoff from the database, then dead-lettered.
    lc = lifecycle.lifecycle_of(lc_ctx)
    hooks.fail[f"/f-{t}"] = [500] * 10
    lifecycle.add_subscription(lc_ctx, org, "webhook", f"{hooks.url}/f-{t}", ["renewal"])
    (fid,) = lifecycle.queue_event(lc_ctx, "renewal", f"fail:{t}", {"event": "renewal"}, org)
    old = lc.settings.webhook_max_attempts
    lc.settings.webhook_max_attempts = 3
    try:
        now = utcnow()
        a1 = lifecycle.attempt_delivery(lc_ctx, fid, now)
        assert (a1.state, a1.retry_in) == ("retry", 30)
        assert lifecycle.attempt_delivery(lc_ctx, fid, now + timedelta(seconds=10)).state == "skipped"  # not due
        a2 = lifecycle.attempt_delivery(lc_ctx, fid, now + timedelta(seconds=31))
        assert (a2.state, a2.retry_in) == ("retry", 60)
        assert fid not in lifecycle.due_deliveries(lc_ctx, now + timedelta(seconds=60))
        assert fid in lifecycle.due_deliveries(lc_ctx, now + timedelta(seconds=92))
        a3 = lifecycle.attempt_delivery(lc_ctx, fid, now + timedelta(seconds=92))
        assert a3.state == "dead" and "HTTP 500" in (a3.error or "")
    finally:
        lc.settings.webhook_max_attempts = old
    assert len(hooks.on(f"/f-{t}")) == 3
    with lc_ctx.db.session() as s:
        row = s.get(Delivery, fid)
    assert row is not None and row.state == "dead" and row.attempts == 3


def test_expiry_alert_by_email(lc_ctx: Context) -> None:
    from aiosmtpd.controller import Controller

    from tests.conftest import free_port

    got: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            got.append(envelope)
            return "250 OK"

    port = free_port()
    ctl = Controller(Handler(), hostname="127.0.0.1", port=port)
    ctl.start()
    lc = lifecycle.lifecycle_of(lc_ctx)
    saved = (lc.settings.smtp_host, lc.settings.smtp_port)
    lc.settings.smtp_host, lc.settings.smtp_port = "127.0.0.1", port
    try:
        t = tag()
        org = cpo_org(lc_ctx, f"cpoM-{t}")
        lifecycle.add_subscription(lc_ctx, org, "email", f"ops-{t}@example.test", ["expiry"])
        cert = insert_cert(lc_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}M", days=6)
        res = lifecycle.scan_expiring(lc_ctx, tenant=org)
        (did,) = res.deliveries
        assert lifecycle.attempt_delivery(lc_ctx, did).state == "delivered"
    finally:
        lc.settings.smtp_host, lc.settings.smtp_port = saved
        ctl.stop()
    (env,) = got
    assert env.rcpt_tos == [f"ops-{t}@example.test"]
    msg = email.message_from_bytes(env.content, policy=email.policy.default)
    text = msg.get_content() + str(msg["Subject"])  # type: ignore[attr-defined]
    assert cert.identifier in text and cert.serial.upper() in text and "SignV2GCertificate" in text
    assert "1 certificate(s) expiring" in text


# -- renewal ----------------------------------------------------------------------------------------------


def test_renewal_of_service_held_keys(lc_ctx: Context) -> None:
    with lc_ctx.db.session() as s:
        leaf = s.exec(select(Certificate).where(Certificate.identifier == "cps-leaf",
                                                Certificate.status == "valid")
                      .order_by(col(Certificate.not_after).desc())).first()
    assert leaf is not None and leaf.key_uri
    life = leaf.not_after - leaf.not_before
    early = leaf.not_before + life * 0.5
    late = leaf.not_before + life * 0.7
    due_early = {r.identifier for r in lifecycle.renewal_due(lc_ctx, early)}
    assert "cps-leaf" not in due_early
    due = lifecycle.renewal_due(lc_ctx, late)
    ids = {r.identifier for r in due}
    assert "cps-leaf" in ids and "ocsp-cpo-sub2" in ids
    assert all(not r.identifier.startswith(("v2g-root", "cpo-sub", "mo-")) or r.identifier.startswith("ocsp-")
               for r in due if r.identifier)  # CA certificates are never renewed automatically

    res = lifecycle.renew(lc_ctx, leaf, late)
    assert res.state == "done" and res.new_serial and res.new_label.startswith("svc-cps-leaf-r")
    again = lifecycle.renew(lc_ctx, leaf, late + timedelta(seconds=5))  # a re-run: nothing new
    assert (again.new_serial, again.new_label) == (res.new_serial, res.new_label)
    with lc_ctx.db.session() as s:
        rows = list(s.exec(select(Certificate).where(Certificate.identifier == "cps-leaf")))
        renewals = list(s.exec(select(Renewal).where(Renewal.old_cert_id == leaf.id)))
    new = [r for r in rows if r.serial == res.new_serial]
    assert len(new) == 1 and len(renewals) == 1
    assert {r.serial for r in rows if r.status == "valid"} >= {leaf.serial, res.new_serial}  # old kept until expiry
    old_pub = x509.load_der_x509_certificate(leaf.der).public_key()
    new_pub = x509.load_der_x509_certificate(new[0].der).public_key()
    assert isinstance(new_pub, ec.EllipticCurvePublicKey)
    assert new_pub.public_numbers() != old_pub.public_numbers()  # type: ignore[union-attr]
    assert new_pub.public_numbers() == lc_ctx.keystore.public_key(res.new_label).public_numbers()  # type: ignore[union-attr]
    assert new[0].subject == leaf.subject and new[0].issuer == leaf.issuer
    assert leaf.id not in {r.id for r in lifecycle.renewal_due(lc_ctx, late)}  # superseded by the new one
    assert "cps-leaf" not in {r.identifier for r in lifecycle.renewal_due(lc_ctx)}  # and that one is young


# -- trust lists and root rollover --------------------------------------------------------------------------


def test_root_rollover_publishes_a_verifiable_trust_list(lc_ctx: Context, tmp_path: Path) -> None:
    trustlist.publish_all(lc_ctx, "baseline")
    before = trustlist.latest(lc_ctx, "mo")
    assert before is not None
    assert trustlist.publish(lc_ctx, "mo", "unchanged") is None  # same content: no new version
    with lc_ctx.db.session() as s:
        last_outbox = max([o.id or 0 for o in s.exec(select(OutboxEvent))] or [0])

    r = lifecycle.rollover_root(lc_ctx, "mo-root", actor="test")
    assert r.new.startswith("mo-root-g") and r.key_label == f"ca-{r.new}"
    with lc_ctx.db.session() as s:
        events = [o for o in s.exec(select(OutboxEvent).where(col(OutboxEvent.id) > last_outbox))
                  if o.kind == "ca.changed"]
    assert any(c["issuer"] == r.new for e in events for c in e.payload["cas"]), "the new root wrote an outbox row"

    row = trustlist.publish(lc_ctx, "mo", "rollover")
    assert row is not None and row.version == before.version + 1
    csms = pem(lc_ctx.engine.ca("csms-root").cert)
    doc = trustlist.verify_document(trustlist.version_document(lc_ctx, "mo", row.version), csms)
    names = {a["name"] for a in doc["anchors"]}
    assert {"mo-root", r.new} <= names
    (cross,) = [c for c in doc["cross_certificates"] if c["subject_root"] == r.new]
    cross_cert = x509.load_der_x509_certificate(base64.b64decode(cross["der"]))
    new_root = lc_ctx.engine.ca(r.new).cert
    cross_cert.verify_directly_issued_by(lc_ctx.engine.ca("mo-root").cert)  # old root vouches for ...
    assert cross_cert.public_key() == new_root.public_key() and cross_cert.subject == new_root.subject  # ... the new key

    # Offline, with the files as published: openssl, and the documented `python -m pki.trustlist verify`.
    d = trustlist.version_dir(lc_ctx, "mo", row.version)
    everest = (d / "everest/ca/mo/MO_ROOT_CA.pem").read_text()
    assert len(x509.load_pem_x509_certificates(everest.encode())) == len(doc["anchors"])
    assert (d / "josev/iso15118_2/certs/moRootCACert.der").exists()
    (tmp_path / "csms.pem").write_text(csms)
    signer = x509.load_pem_x509_certificates((d / "signer-chain.pem").read_bytes())[0]
    (tmp_path / "signer.pem").write_text(pem(signer))
    subprocess.run(["openssl", "x509", "-in", str(tmp_path / "signer.pem"), "-pubkey", "-noout", "-out",
                    str(tmp_path / "pub.pem")], check=True)
    ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature",
                         str(d / "trustlist.json.sig"), str(d / "trustlist.json")], capture_output=True, text=True)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    chain = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "csms.pem"), str(tmp_path / "signer.pem")],
                           capture_output=True, text=True)
    assert chain.returncode == 0, chain.stderr
    cli = subprocess.run([sys.executable, "-m", "pki.trustlist", "verify", str(d), "--anchor",
                          str(tmp_path / "csms.pem")], capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 0 and f"version {row.version}" in cli.stdout, cli.stderr

    # Tampering is detected.
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(d), str(tampered)], check=True)
    data = (tampered / "trustlist.json").read_bytes().replace(b'"mo-root"', b'"mo-rooX"', 1)
    (tampered / "trustlist.json").write_bytes(data)
    bad = subprocess.run([sys.executable, "-m", "pki.trustlist", "verify", str(tampered), "--anchor",
                          str(tmp_path / "csms.pem")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "INVALID" in bad.stderr
    with pytest.raises(trustlist.TrustListError):
        trustlist.verify_document(trustlist.version_document(lc_ctx, "mo", row.version),
                                  pem(lc_ctx.engine.ca("v2g-root").cert))  # the wrong pinned anchor
    current = trustlist.truststores_dir(lc_ctx) / "current"
    assert json.loads((current / "VERSIONS.json").read_text())["mo"] == row.version


# -- outbox ------------------------------------------------------------------------------------------------


def _issue_secc(ctx: Context, tenant: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    ev = f"DE*ABC*E{secrets.token_hex(4).upper()}"
    issued = ctx.engine.issue(IssueRequest(profile="secc", public_key=key.public_key(),
                                           subject=SubjectFields(cn=ev, o="Test", c="DE", dc="CPO"),
                                           identifier=ev, tenant=tenant, actor="test"))
    return issued.serial


def test_outbox_row_commits_with_revocation_and_survives_a_dead_broker(lc_ctx: Context) -> None:
    from workers.outbox import dispatch_pending

    t = tag()
    org = cpo_org(lc_ctx, f"cpoO-{t}")
    serial = _issue_secc(lc_ctx, org)
    lc_ctx.engine.revoke(serial, "keyCompromise", actor="test")
    with lc_ctx.db.session() as s:
        rows = [o for o in s.exec(select(OutboxEvent).where(OutboxEvent.kind == "revocation"))
                if o.payload.get("serial") == serial]
    assert len(rows) == 1 and rows[0].dispatched_at is None and rows[0].payload["tenant"] == org
    with pytest.raises(AlreadyRevoked):
        lc_ctx.engine.revoke(serial, "keyCompromise", actor="test")
    with lc_ctx.db.session() as s:  # the refused revocation rolled back: no second event
        assert len([o for o in s.exec(select(OutboxEvent).where(OutboxEvent.kind == "revocation"))
                    if o.payload.get("serial") == serial]) == 1

    def down(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        raise ConnectionRefusedError("broker down")

    assert dispatch_pending(lc_ctx.db, down) == 0  # swallowed and logged
    with lc_ctx.db.session() as s:
        assert s.get(OutboxEvent, rows[0].id).dispatched_at is None  # type: ignore[union-attr]
    sent: list[tuple[str, dict[str, Any], str]] = []
    assert dispatch_pending(lc_ctx.db, lambda n, k, i: sent.append((n, k, i))) >= 1
    assert ("v2gpki.events.revocation", f"outbox-{rows[0].id}") in {(n, i) for n, _k, i in sent}
    with lc_ctx.db.session() as s:
        assert s.get(OutboxEvent, rows[0].id).dispatched_at is not None  # type: ignore[union-attr]

    # After-commit dispatch: a revocation is sent right away by the process's dispatcher thread.
    got = threading.Event()
    seen: list[str] = []

    def record(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        seen.append(str(kwargs.get("event", {}).get("serial")))
        got.set()

    d = lc_ctx.outbox  # the Context's dispatcher, kicked by the engine's outbox observers
    d.start(record)
    try:
        serial2 = _issue_secc(lc_ctx, org)
        lc_ctx.engine.revoke(serial2, "superseded", actor="test")
        deadline = time.monotonic() + 30
        while serial2 not in seen and time.monotonic() < deadline:
            got.wait(0.5)
    finally:
        d.stop()
    assert serial2 in seen


def test_revocation_event_notifies_the_tenant_and_refreshes_the_crl(lc_ctx: Context, hooks: WebhookServer) -> None:
    from pki.crl import latest_meta

    t = tag()
    org = cpo_org(lc_ctx, f"cpoR-{t}")
    lifecycle.add_subscription(lc_ctx, org, "webhook", f"{hooks.url}/r-{t}", ["revocation"])
    serial = _issue_secc(lc_ctx, org)
    c = lc_ctx.engine.revoke(serial, "keyCompromise", actor="test")
    payload = {"issuer": c.issuer, "serial": serial, "tenant": org, "status": "revoked", "reason": "keyCompromise",
               "profile": "secc", "identifier": c.identifier,
               "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None}
    ids = lifecycle.revocation_event(lc_ctx, payload)
    assert len(ids) == 1 and lifecycle.revocation_event(lc_ctx, payload) == ids
    assert lifecycle.attempt_delivery(lc_ctx, ids[0]).state == "delivered"
    (req,) = hooks.on(f"/r-{t}")
    assert json.loads(req.body)["serial"] == serial.upper()
    lifecycle.refresh_crl_after_revocation(lc_ctx, payload)
    meta = latest_meta(lc_ctx.db, c.issuer)
    assert meta is not None and c.revoked_at is not None and meta[1] >= c.revoked_at


# -- policy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, field", [
    ("expiry: {default_windows: [0, 7]}", "default_windows"),
    ("expiry: {profiles: {no-such-profile: [7]}}", "no-such-profile"),
    ("renewal: {fraction: 1.5}", "fraction"),
    ("surprise: 1", "surprise"),
    ("profiles: {x: {description: d, standard: service, ca: false, issuers: [secc], key_algs: [p256], "
     "key_usage: [digital_signature], validity_days: 1, max_der_size: 800, subject: {cn: fixed}}}", "secc"),
])
def test_lifecycle_policy_is_validated(lc_ctx: Context, tmp_path: Path, body: str, field: str) -> None:
    p = tmp_path / "lifecycle.yaml"
    p.write_text(body)
    with pytest.raises(PolicyError) as e:
        lifecycle.load_policy(p, lc_ctx.profiles)
    assert field in e.value.message and str(p) in e.value.message
    pol, extra = lifecycle.load_policy(REPO / "pki" / "policies" / "lifecycle.yaml", lc_ctx.profiles)
    assert pol.expiry.default_windows == [60, 30, 14, 7, 1] and {"truststore-signer", "root-cross"} <= set(extra)


# -- API ---------------------------------------------------------------------------------------------------


def test_subscription_and_truststore_api(lc_ctx: Context, hooks: WebhookServer) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    t = tag()
    a, b = cpo_org(lc_ctx, f"apiA-{t}"), cpo_org(lc_ctx, f"apiB-{t}")
    create_org(lc_ctx.db, f"adm-{t}", "admin", [])
    create_org(lc_ctx.db, f"aud-{t}", "auditor", [])
    keys = {n: create_api_key(lc_ctx.db, n)[0] for n in (a, b, f"adm-{t}", f"aud-{t}")}

    def h(n: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[n]}"}

    app = create_app(lc_ctx, routers=["api.v1.subscriptions"], dispatch_outbox=False)  # no broker here
    with TestClient(app) as cl:
        r = cl.post("/v1/subscriptions", json={"url": f"{hooks.url}/api-{t}", "events": ["truststore"]}, headers=h(a))
        assert r.status_code == 201, r.text
        sub = r.json()
        assert sub["org"] == a and len(sub["secret"]) >= 32
        listed = cl.get("/v1/subscriptions", headers=h(a)).json()
        assert [x["id"] for x in listed] == [sub["id"]] and "secret" not in listed[0]  # shown once only
        assert cl.get("/v1/subscriptions", headers=h(b)).json() == []
        assert cl.delete(f"/v1/subscriptions/{sub['id']}", headers=h(b)).status_code == 404
        assert cl.post("/v1/subscriptions", json={"url": "http://x.test/a", "email": "a@b.test"},
                       headers=h(a)).status_code == 400
        assert cl.post("/v1/subscriptions", json={"url": "ftp://x.test/a"}, headers=h(a)).status_code == 400
        assert cl.post("/v1/subscriptions", json={"url": "http://x.test/a", "org": b}, headers=h(a)).status_code == 403
        assert cl.post("/v1/subscriptions", json={"email": "x@y.test"}, headers=h(f"aud-{t}")).status_code == 403
        r2 = cl.post("/v1/subscriptions", json={"email": f"ops@{t}.test", "org": b, "events": ["expiry"]},
                     headers=h(f"adm-{t}"))
        assert r2.status_code == 201 and r2.json()["org"] == b and "secret" not in r2.json()
        assert cl.get("/v1/subscriptions").status_code == 401

        row = trustlist.publish(lc_ctx, "csms", f"api test {t}", force=True)
        assert row is not None
        versions = cl.get("/v1/truststores/csms/versions").json()
        assert versions[0]["version"] == row.version
        doc = cl.get(f"/v1/truststores/csms/versions/{row.version}").json()
        assert trustlist.verify_document(doc, pem(lc_ctx.engine.ca("csms-root").cert))["version"] == row.version
        assert cl.get("/v1/truststores/csms/versions/99999").status_code == 404
        assert cl.get("/v1/truststores/nope/versions").status_code == 422
        dl = cl.get(f"/v1/truststores/csms/versions/{row.version}/deliveries", headers=h(a)).json()
        assert [(x["subscription"], x["state"]) for x in dl] == [(sub["id"], "pending")]
        assert cl.get(f"/v1/truststores/csms/versions/{row.version}/deliveries", headers=h(b)).json() == []
        admin_view = cl.get(f"/v1/truststores/csms/versions/{row.version}/deliveries", headers=h(f"adm-{t}")).json()
        assert sub["id"] in {x["subscription"] for x in admin_view}

        assert cl.delete(f"/v1/subscriptions/{sub['id']}", headers=h(a)).status_code == 204
        assert cl.get("/v1/subscriptions", headers=h(a)).json() == []


def test_expiry_windows_from_settings(lc_ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    lc = lifecycle.lifecycle_of(lc_ctx)
    monkeypatch.setattr(lc.settings, "expiry_windows", "10,3")
    assert lc.default_windows() == [10, 3]
    assert lc.windows_for(lc_ctx.profiles.get("v2g-root")) == [1095, 730, 365, 180, 90]
    assert lc.windows_for(lc_ctx.profiles.get("ocsp-signer")) == [14, 7, 1]
    t = tag()
    org = cpo_org(lc_ctx, f"cpoS-{t}")
    insert_cert(lc_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}S", days=20)  # outside 10 days
    near = insert_cert(lc_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}T", days=8)
    lifecycle.scan_expiring(lc_ctx, tenant=org)
    assert [(al.cert_id, al.window_days) for al in alerts_of(lc_ctx, org)] == [(near.id, 10)]





def test_cli_subscriptions_and_rollover_dry_run(lc_ctx: Context) -> None:
    from tests.conftest import cli_env, run_cli

    if not lc_ctx.db.is_sqlite:
        pytest.skip("the CLI is exercised once, on SQLite")
    t = tag()
    org = cpo_org(lc_ctx, f"cli-{t}")
    env = cli_env(lc_ctx, V2GPKI_HIERARCHY_FILE=str(lc_ctx.settings.hierarchy_file))
    add = run_cli(["subscription", "add", "--org", org, "--url", f"http://127.0.0.1:9/{t}", "--events",
                   "expiry,revocation"], env)
    assert add.returncode == 0, add.stderr
    sub_id, secret = add.stdout.split()[1], add.stdout.strip().splitlines()[-1]
    assert len(secret) >= 32 and secret not in add.stderr
    listed = run_cli(["subscription", "list", "--org", org, "--json"], env)
    assert [(x["id"], x["events"]) for x in json.loads(listed.stdout)] == [(sub_id, ["expiry", "revocation"])]
    assert secret not in listed.stdout  # shown once only
    bad = run_cli(["subscription", "add", "--org", org, "--url", "http://x.test/", "--events", "nope"], env)
    assert bad.returncode == 3 and "unknown event" in bad.stderr
    assert run_cli(["subscription", "remove", sub_id, "--org", org], env).returncode == 0
    assert run_cli(["subscription", "remove", sub_id, "--org", org], env).returncode == 4
    dry = run_cli(["root", "rollover", "v2g-root"], env)
    assert dry.returncode == 0 and "dry run" in dry.stdout
