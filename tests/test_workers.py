"""Real Celery workers (subprocesses of `celery -A workers.app worker`) on a real Redis, SoftHSM2 and the
database (PostgreSQL when available): exactly one signed webhook per expiry window, a worker SIGKILLed
mid-task with the task finished by another worker without a duplicate effect, a Redis outage during
issuance and revocation with nothing lost, a root rollover reaching a subscriber who verifies it offline,
and the embedded (filesystem) broker with a worker and beat on one machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlmodel import col, select

from pki import lifecycle, trustlist
from pki.context import Context
from pki.issuance import pem
from pki.store.models_lifecycle import Delivery, ExpiryAlert
from tests.conftest import REPO, V2GPKI_EXE, cli_env, drop_pg_database, free_port, lifecycle_context, own_pg_database
from tests.test_lifecycle import WebhookServer, _issue_secc, cpo_org, insert_cert, start_webhook_server

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("V2GPKI_TEST_REDIS_URL")


def _require_redis() -> str:
    if not REDIS_URL:
        if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):  # the README's test command starts Redis too
            pytest.fail("Redis required (V2GPKI_TEST_REDIS_URL unset)")
        pytest.skip("no Redis (set V2GPKI_TEST_REDIS_URL or run scripts/test.sh)")
    return REDIS_URL


@pytest.fixture(scope="module")
def wk_ctx(tmp_path_factory: pytest.TempPathFactory, token_root: Path) -> Iterator[Context]:
    """A context of its own for the worker processes (PostgreSQL when available, else SQLite)."""
    pg = own_pg_database("wk")
    c = lifecycle_context(tmp_path_factory, token_root, "t-wk", pg[0] if pg else None)
    yield c
    c.db.dispose()
    if pg:
        drop_pg_database(pg[1])


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookServer]:
    srv = start_webhook_server()
    yield srv
    srv.httpd.shutdown()


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log.read_text()[-4000:]}")
            if " ready." in self.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children (its own process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def worker_env(ctx: Context, broker: str | None, queue: str, **extra: str) -> dict[str, str]:
    env = cli_env(ctx, V2GPKI_QUEUE=queue, V2GPKI_BROKER_VISIBILITY_TIMEOUT="6",
                  V2GPKI_BROKER_RESTORE_INTERVAL="1", V2GPKI_BROKER_RESTORE_THROTTLE="1",
                  V2GPKI_DELIVERY_LEASE_SECONDS="4", V2GPKI_HIERARCHY_FILE=str(ctx.settings.hierarchy_file),
                  PYTHONUNBUFFERED="1", **extra)
    if broker:
        env["V2GPKI_BROKER_URL"] = broker
    return env


def start_worker(ctx: Context, tmp: Path, name: str, broker: str | None, queue: str, **extra: str) -> Worker:
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-n", f"{name}@%h", "-c", "1",
         "--pool=prefork", "--without-mingle", "--without-gossip", "--loglevel=INFO"],
        env=worker_env(ctx, broker, queue, **extra), cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    w = Worker(proc, log)
    w.wait_ready()
    return w


@contextmanager
def client_app(broker: str, queue: str) -> Iterator[Celery]:
    """A Celery app in the test process configured exactly like the workers' (workers.app.make_app)."""
    from workers.app import make_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("V2GPKI_BROKER_URL", broker)
        mp.setenv("V2GPKI_QUEUE", queue)
        app = make_app()
    try:
        yield app
    finally:
        app.close()


def sender_for(app: Celery) -> Callable[[str, dict[str, Any], str], None]:
    def send(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        app.send_task(name, kwargs=kwargs, task_id=task_id, retry=False, ignore_result=True)

    return send


def run_task(app: Celery, name: str, **kwargs: Any) -> Any:
    return app.send_task(name, kwargs=kwargs, ignore_result=False).get(timeout=120)


def wait_until(pred: Callable[[], bool], timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def _deliveries(ctx: Context, org: str) -> list[Delivery]:
    with ctx.db.session() as s:
        return list(s.exec(select(Delivery).where(Delivery.org == org).order_by(col(Delivery.id))))


# -- tests ----------------------------------------------------------------------------------------------------


def test_one_signed_webhook_per_expiry_window(wk_ctx: Context, hooks: WebhookServer, tmp_path: Path) -> None:
    broker = _require_redis()
    queue = f"v2gpki-test-{secrets.token_hex(4)}"
    t = secrets.token_hex(3)
    org = cpo_org(wk_ctx, f"wk1-{t}")
    secret = "hook-secret-" + secrets.token_hex(8)
    lifecycle.add_subscription(wk_ctx, org, "webhook", f"{hooks.url}/exp-{t}", ["expiry"], secret=secret)
    cert = insert_cert(wk_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}", days=20)
    w = start_worker(wk_ctx, tmp_path, "w1", broker, queue)
    try:
        with client_app(broker, queue) as app:
            assert run_task(app, "v2gpki.expiry.scan") >= 1
            (first,) = hooks.wait(f"/exp-{t}", 1)
            assert lifecycle.verify_webhook(secret, first.headers["x-v2gpki-signature"], first.body)
            body = json.loads(first.body)
            (alert,) = body["alerts"]
            assert (alert["serial"], alert["window_days"], alert["identifier"]) == (cert.serial.upper(), 30,
                                                                                    cert.identifier)
            assert "TriggerMessage" in alert["action"] and body["tenant"] == org
            # Beat firing again, a redelivered scan, a sweep: still one webhook for this window.
            assert run_task(app, "v2gpki.expiry.scan") == 0
            run_task(app, "v2gpki.deliveries.sweep")
            assert wait_until(lambda: all(d.state == "delivered" for d in _deliveries(wk_ctx, org)))
            assert len(hooks.on(f"/exp-{t}")) == 1
            # Time passes (the row is moved 15 days closer to expiry): the 7-day window gives one more.
            with wk_ctx.db.session() as s:
                row = s.get(type(cert), cert.id)
                assert row is not None
                row.not_after = row.not_after - timedelta(days=15)
                s.add(row)
                s.commit()
            assert run_task(app, "v2gpki.expiry.scan") >= 1
            second = hooks.wait(f"/exp-{t}", 2)
            assert len(second) == 2
            assert json.loads(second[1].body)["alerts"][0]["window_days"] == 7
            assert run_task(app, "v2gpki.expiry.scan") == 0
    finally:
        w.stop()
    with wk_ctx.db.session() as s:
        windows = sorted(a.window_days for a in s.exec(select(ExpiryAlert).where(ExpiryAlert.cert_id == cert.id)))
    assert windows == [7, 30] and len(hooks.on(f"/exp-{t}")) == 2


def test_worker_killed_mid_task_is_redelivered_without_duplicates(wk_ctx: Context, hooks: WebhookServer,
                                                                  tmp_path: Path) -> None:
    import threading

    broker = _require_redis()
    queue = f"v2gpki-test-{secrets.token_hex(4)}"
    t = secrets.token_hex(3)
    org = cpo_org(wk_ctx, f"wk2-{t}")
    secret = "hook-secret-" + secrets.token_hex(8)
    path = f"/kill-{t}"
    lifecycle.add_subscription(wk_ctx, org, "webhook", f"{hooks.url}{path}", ["expiry"], secret=secret)
    cert = insert_cert(wk_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}K", days=10)
    release = threading.Event()
    hooks.hold[path] = release  # the first POST hangs: the worker is inside the task when we kill it
    a = start_worker(wk_ctx, tmp_path, "wa", broker, queue)
    b = None
    try:
        with client_app(broker, queue) as app:
            assert run_task(app, "v2gpki.expiry.scan") >= 1
            assert len(hooks.wait(path, 1)) == 1
            a.kill()  # SIGKILL main process and pool child, mid-POST, before the ack (acks_late)
            release.set()
            assert a.proc.returncode == -signal.SIGKILL
            (d,) = _deliveries(wk_ctx, org)
            assert d.state == "pending" and d.attempts == 1
            b = start_worker(wk_ctx, tmp_path, "wb", broker, queue)  # redelivery after the visibility timeout
            assert wait_until(lambda: _deliveries(wk_ctx, org)[0].state == "delivered", timeout=120), b.log.read_text()
    finally:
        release.set()
        a.stop()
        if b is not None:
            b.stop()
    reqs = hooks.on(path)
    assert len(reqs) == 2, "killed attempt + redelivered attempt"
    assert reqs[0].headers["x-v2gpki-delivery"] == reqs[1].headers["x-v2gpki-delivery"]  # receivers de-dup on it
    assert [r.answered for r in reqs] == [None, 200]  # exactly one acknowledged delivery
    assert lifecycle.verify_webhook(secret, reqs[1].headers["x-v2gpki-signature"], reqs[1].body)
    (d,) = _deliveries(wk_ctx, org)
    assert (d.state, d.attempts) == ("delivered", 2)
    with wk_ctx.db.session() as s:
        assert len(list(s.exec(select(ExpiryAlert).where(ExpiryAlert.cert_id == cert.id)))) == 1


def test_redis_down_during_issue_and_revoke_loses_nothing(wk_ctx: Context, hooks: WebhookServer,
                                                         tmp_path: Path) -> None:
    from workers.outbox import drain

    _require_redis()
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                                 text=True).stdout.strip() == "PONG", 30)
        return p

    redis = start_redis()
    queue = f"v2gpki-test-{secrets.token_hex(4)}"
    t = secrets.token_hex(3)
    org = cpo_org(wk_ctx, f"wk3-{t}")
    lifecycle.add_subscription(wk_ctx, org, "webhook", f"{hooks.url}/rev-{t}", ["revocation"])
    w = start_worker(wk_ctx, tmp_path, "wr", broker, queue)
    try:
        with client_app(broker, queue) as app:
            dispatcher = wk_ctx.outbox  # what the API process runs after commit
            dispatcher.start(sender_for(app))
            try:
                redis.terminate()
                redis.wait(30)
                serials = [_issue_secc(wk_ctx, org) for _ in range(2)]  # issuing works without the broker
                for s_ in serials:
                    wk_ctx.engine.revoke(s_, "keyCompromise", actor="test")  # and so does revoking
                assert lifecycle.outbox_backlog(wk_ctx) >= 2  # recorded, not sent
                assert drain(wk_ctx.db, sender_for(app)) == 0  # broker down: swallowed, logged
                redis = start_redis()

                def drained() -> bool:
                    drain(wk_ctx.db, sender_for(app))  # what beat's outbox-drain does every few seconds
                    return lifecycle.outbox_backlog(wk_ctx) == 0

                assert wait_until(drained, 60)
            finally:
                dispatcher.stop()
            got = hooks.wait(f"/rev-{t}", 2, timeout=120)
            assert sorted(json.loads(r.body)["serial"] for r in got) == sorted(s_.upper() for s_ in serials), \
                w.log.read_text()[-3000:]
    finally:
        w.stop()
        redis.terminate()
        redis.wait(30)


def test_root_rollover_reaches_subscriber_who_verifies_offline(wk_ctx: Context, hooks: WebhookServer,
                                                               tmp_path: Path) -> None:
    from workers.outbox import drain

    broker = _require_redis()
    queue = f"v2gpki-test-{secrets.token_hex(4)}"
    trustlist.publish_all(wk_ctx, "baseline")
    before = trustlist.latest(wk_ctx, "v2g")
    assert before is not None
    t = secrets.token_hex(3)
    org = cpo_org(wk_ctx, f"wk4-{t}")
    secret = "ts-secret-" + secrets.token_hex(8)
    lifecycle.add_subscription(wk_ctx, org, "webhook", f"{hooks.url}/ts-{t}", ["truststore"], secret=secret)
    pinned = pem(wk_ctx.engine.ca("csms-root").cert)  # what the subscriber trusts, obtained out of band
    w = start_worker(wk_ctx, tmp_path, "wt", broker, queue)
    try:
        with client_app(broker, queue) as app:
            r = lifecycle.rollover_root(wk_ctx, "v2g-root", actor="test")  # `v2gpki root rollover v2g-root --yes`
            drain(wk_ctx.db, sender_for(app))
            (req,) = hooks.wait(f"/ts-{t}", 1, timeout=120)
            # The worker records the delivery after the receiver has answered; stopped before that, the row
            # stayed pending (one failure in a loaded full run): wait for it with the worker running.
            assert wait_until(lambda: [d.state for d in _deliveries(wk_ctx, org)] == ["delivered"], timeout=120), \
                w.log.read_text()[-3000:]
    finally:
        w.stop()
    assert lifecycle.verify_webhook(secret, req.headers["x-v2gpki-signature"], req.body)
    doc = json.loads(req.body)
    assert doc["store"] == "v2g" and doc["version"] == before.version + 1
    verified = trustlist.verify_document(doc, pinned)  # offline: only the pinned root and the payload
    assert {"v2g-root", r.new} <= {a["name"] for a in verified["anchors"]}
    assert [c["subject_root"] for c in verified["cross_certificates"]] == [r.new]
    # The same check with openssl alone, as docs/trustlist.md describes it.
    import base64

    (tmp_path / "tl.json").write_bytes(base64.b64decode(doc["bundle_b64"]))
    (tmp_path / "tl.sig").write_bytes(base64.b64decode(doc["signature_b64"]))
    (tmp_path / "chain.pem").write_text(doc["signer_chain_pem"])
    (tmp_path / "root.pem").write_text(pinned)
    subprocess.run(["openssl", "x509", "-in", str(tmp_path / "chain.pem"), "-pubkey", "-noout", "-out",
                    str(tmp_path / "pub.pem")], check=True)
    ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature",
                         str(tmp_path / "tl.sig"), str(tmp_path / "tl.json")], capture_output=True, text=True)
    assert "Verified OK" in ok.stdout, ok.stderr
    with wk_ctx.db.session() as s:
        (d,) = [x for x in s.exec(select(Delivery).where(Delivery.org == org))]
    assert d.state == "delivered" and d.event_key == f"truststore:v2g:{doc['version']}"


def test_embedded_broker_worker_and_beat(wk_ctx: Context, hooks: WebhookServer, tmp_path: Path) -> None:
    """No V2GPKI_BROKER_URL: the filesystem broker under $V2GPKI_HOME; beat alone drives scan → webhook."""
    t = secrets.token_hex(3)
    org = cpo_org(wk_ctx, f"wk5-{t}")
    lifecycle.add_subscription(wk_ctx, org, "webhook", f"{hooks.url}/emb-{t}", ["expiry"])
    cert = insert_cert(wk_ctx, tenant=org, identifier=f"DE*ABC*E{t.upper()}B", days=3)
    queue = f"v2gpki-test-{secrets.token_hex(4)}"
    beat_env = dict(V2GPKI_EXPIRY_SCAN_SECONDS="2", V2GPKI_OUTBOX_DRAIN_SECONDS="2", V2GPKI_DELIVERY_SWEEP_SECONDS="2")
    w = start_worker(wk_ctx, tmp_path, "we", None, queue, **beat_env)
    log = tmp_path / "beat.log"
    beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel=INFO",
                             "-s", str(tmp_path / "beat-schedule")],
                            env=worker_env(wk_ctx, None, queue, **beat_env), cwd=REPO, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        got = hooks.wait(f"/emb-{t}", 1, timeout=120)
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(30)
        w.stop()
    assert len(got) == 1, log.read_text()[-2000:] + w.log.read_text()[-3000:]
    assert json.loads(got[0].body)["alerts"][0]["serial"] == cert.serial.upper()
    assert (wk_ctx.settings.home_dir / "broker" / "queue").is_dir()


@pytest.mark.parametrize("entry", ["v2gpki", "celery"])
def test_beat_first_on_a_fresh_data_directory(tmp_path: Path, entry: str) -> None:
    """`bash scripts/run.sh` starts the worker and beat at the same moment on a fresh data directory. Beat
    builds its scheduler — and with it the embedded broker's file:// result backend, which refuses a
    missing folder — before it sends any beat signal, so beat died whenever it won that race against the
    worker. Started alone here, through both entry points, it must stay up and publish its schedule into
    the embedded broker's queue folder."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("V2GPKI_", "CELERY_"))} | {
        "V2GPKI_HOME": str(home), "V2GPKI_QUEUE": f"v2gpki-test-{secrets.token_hex(4)}",
        "V2GPKI_OUTBOX_DRAIN_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ([V2GPKI_EXE, "beat"] if entry == "v2gpki"
           else [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel=INFO"])
    log = tmp_path / "beat.log"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    queue = home / "broker" / "queue"
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if queue.is_dir() and any(queue.iterdir()):
                break
            time.sleep(0.3)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert queue.is_dir() and any(queue.iterdir()), log.read_text()[-3000:]  # a scheduled task was sent
        assert "ImproperlyConfigured" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
