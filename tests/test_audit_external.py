"""#21 item 7: the audit log survives a database rewrite.

Every signed checkpoint is also appended to a record outside the database ($V2GPKI_HOME/audit-checkpoints.jsonl
by default), checkpoints are taken by the beat and when `v2gpki serve` stops, and `v2gpki audit verify`
fails (exit 7) when the database falls short of that record. Each attack below made the old verifier
answer "audit chain OK":

  (a) every event after an earlier checkpoint deleted, the later checkpoint's row deleted, the head moved back
  (b) an event edited, the chain re-hashed with the service's own function, every checkpoint row deleted
  (c) one checkpoint row deleted

The database is edited behind the service's back (sqlite3 / psycopg), as someone with write access would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from pki import audit_sign
from pki.audit import GENESIS, chain_hash, verify_chain
from pki.context import Context
from pki.errors import ConfigError
from pki.orgs import create_api_key, create_org
from pki.store.models import AuditEvent
from pki.wiring import build_context
from tests.conftest import (
    TEST_PIN,
    V2GPKI_EXE,
    drop_pg_database,
    free_port,
    make_settings,
    make_token,
    own_pg_database,
    run_cli,
)

LABEL = "t-audit-ext"


@dataclass
class Log:
    home: Path
    db: Path
    env: dict[str, str]
    first_cp: int  # the checkpoint taken by `v2gpki audit checkpoint`
    last_cp: int  # the later one taken by the beat's task


@pytest.fixture(scope="module")
def ext_token(token_root: Path) -> Path:
    make_token(token_root, LABEL)
    return token_root


def _env(home: Path, token_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(home), SOFTHSM2_CONF=str(token_root / "softhsm2.conf"), V2GPKI_TOKEN_LABEL=LABEL,
               V2GPKI_HSM_PIN=TEST_PIN, V2GPKI_PKILINT="shape", **extra)
    return env


def _ctx(home: Path, token_root: Path, db_url: str | None = None, **kw: object) -> Context:
    return build_context(make_settings(home, token_root, LABEL, db_url, **kw))


def _beat_checkpoint(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> int:
    """What the beat's entry runs: the Celery task, in this process, on this context."""
    import workers.app as wapp
    from workers.tasks import audit_checkpoint

    monkeypatch.setattr(wapp, "_CTX", ctx)
    monkeypatch.setattr(wapp, "_CTX_PID", os.getpid())
    return int(audit_checkpoint.run())


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, ext_token: Path) -> Log:
    """Events from real code paths, a checkpoint by the CLI, more events, a checkpoint by the beat's task."""
    home = tmp_path_factory.mktemp("audit-ext") / "home"
    ctx = _ctx(home, ext_token)
    create_org(ctx.db, "Audited CPO", "cpo", ["DE*AXT"])
    for _ in range(3):
        create_api_key(ctx.db, "Audited CPO")
    ctx.db.dispose()
    env = _env(home, ext_token)
    r = run_cli(["audit", "checkpoint"], env)
    assert r.returncode == 0 and "signed" in r.stdout, r.stdout + r.stderr
    first = _records(home / "audit-checkpoints.jsonl")[-1]["seq"]
    ctx = _ctx(home, ext_token)
    create_org(ctx.db, "Later eMSP", "emsp", ["DE-LXT"])
    for _ in range(3):
        create_api_key(ctx.db, "Later eMSP")
    mp = pytest.MonkeyPatch()
    try:
        last = _beat_checkpoint(ctx, mp)
    finally:
        mp.undo()
        ctx.db.dispose()
    assert last >= first + 4
    return Log(home, home / "v2gpki.db", env, first, last)


@pytest.fixture
def log(pristine: Log, tmp_path: Path, ext_token: Path) -> Log:
    home = tmp_path / "home"
    shutil.copytree(pristine.home, home)
    return Log(home, home / "v2gpki.db", _env(home, ext_token), pristine.first_cp, pristine.last_cp)


def _sql(db: Path, *stmts: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            for sql, args in stmts:
                conn.execute(sql, args)
    finally:
        conn.close()


def _one(db: Path, sql: str, args: tuple[object, ...] = ()) -> Any:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


def _verify(lg: Log) -> tuple[int, str]:
    r = run_cli(["audit", "verify"], lg.env)
    return r.returncode, r.stdout + r.stderr


# -- the record and its modes ------------------------------------------------------------------------


def test_checkpoints_are_recorded_outside_the_database(log: Log) -> None:
    path = log.home / "audit-checkpoints.jsonl"
    recs = _records(path)
    assert [r["seq"] for r in recs] == [log.first_cp, log.last_cp]
    assert all(r["key_label"] == audit_sign.AUDIT_KEY and r["signature"] for r in recs)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, out = _verify(log)
    assert code == 0, out
    assert "2 signed checkpoints (2 in the external record)" in out


def test_checkpoint_dir_is_configurable(log: Log, tmp_path: Path, ext_token: Path) -> None:
    elsewhere = tmp_path / "worm" / "audit"
    ctx = _ctx(log.home, ext_token, audit_checkpoint_dir=elsewhere)
    try:
        create_org(ctx.db, "Third", "cpo", ["DE*TXT"])
        cp = audit_sign.checkpoint(ctx)
    finally:
        ctx.db.dispose()
    assert cp is not None
    assert _records(elsewhere / "audit-checkpoints.jsonl")[-1]["seq"] == cp.seq
    assert stat.S_IMODE((elsewhere).stat().st_mode) == 0o700


# -- the three attacks -------------------------------------------------------------------------------


def _truncate_after_first_checkpoint(lg: Log) -> None:
    """(a) Delete every event after the first checkpoint, the beat's later checkpoint row, and move the head
    back: the chain and the remaining checkpoint are consistent again."""
    keep = lg.first_cp
    last_hash = _one(lg.db, "SELECT hash FROM audit_event WHERE seq = ?", (keep,))
    _sql(lg.db, ("DELETE FROM audit_event WHERE seq > ?", (keep,)),
         ("DELETE FROM audit_checkpoint WHERE seq > ?", (keep,)),
         ("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (keep, last_hash)))


def _rehash_and_drop_checkpoints(lg: Log) -> None:
    """(b) Edit event 2, recompute every later hash and the head, delete every checkpoint row."""
    conn = sqlite3.connect(lg.db)
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM audit_event ORDER BY seq")]
    finally:
        conn.close()
    prev = GENESIS
    stmts: list[tuple[str, tuple[object, ...]]] = []
    for r in rows:
        details = json.loads(r["details"])
        if r["seq"] == 2:
            details = {**details, "forged": True}
        ts = datetime.fromisoformat(str(r["ts"]))
        ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)  # stored naive, hashed as UTC
        ev = AuditEvent(seq=r["seq"], ts=ts, actor=r["actor"], org=r["org"],
                        action=r["action"], object=r["object"], outcome=r["outcome"], details=details,
                        prev_hash=prev, hash="")
        h = chain_hash(prev, ev)
        stmts.append(("UPDATE audit_event SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                      (json.dumps(details), prev, h, r["seq"])))
        prev = h
    stmts.append(("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,)))
    stmts.append(("DELETE FROM audit_checkpoint", ()))
    _sql(lg.db, *stmts)


def _delete_checkpoint_row(lg: Log) -> None:
    """(c) One checkpoint row deleted, nothing else touched."""
    _sql(lg.db, ("DELETE FROM audit_checkpoint WHERE seq = ?", (lg.first_cp,)))


ATTACKS: dict[str, tuple[Callable[[Log], None], Callable[[Log], list[str]]]] = {
    "a-truncated-after-checkpoint": (_truncate_after_first_checkpoint, lambda lg: [
        f"external checkpoint at seq {lg.last_cp}: the database's chain ends at seq {lg.first_cp}",
        f"external checkpoint at seq {lg.last_cp}: no such checkpoint row in the database (deleted)"]),
    "b-rehashed-checkpoints-deleted": (_rehash_and_drop_checkpoints, lambda lg: [
        f"external checkpoint at seq {lg.first_cp}: event {lg.first_cp} no longer has the signed hash",
        f"external checkpoint at seq {lg.last_cp}: event {lg.last_cp} no longer has the signed hash",
        "no such checkpoint row in the database (deleted)"]),
    "c-checkpoint-row-deleted": (_delete_checkpoint_row, lambda lg: [
        f"external checkpoint at seq {lg.first_cp}: no such checkpoint row in the database (deleted)"]),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_database_rewrite_is_detected(attack: str, log: Log) -> None:
    tamper, expected = ATTACKS[attack]
    tamper(log)
    # The database by itself is consistent again: its chain verifies (what the old verifier relied on).
    from pki.store.db import Database

    db = Database(f"sqlite:///{log.db}")
    try:
        with db.session() as s:
            assert verify_chain(s).ok
    finally:
        db.dispose()
    code, out = _verify(log)
    assert code == 7, out
    assert "v2gpki: error: audit chain verification FAILED" in out
    for needle in expected(log):
        assert needle in out, out


def test_deleted_external_record_is_detected(log: Log) -> None:
    (log.home / "audit-checkpoints.jsonl").unlink()
    code, out = _verify(log)
    assert code == 7 and "audit-checkpoints.jsonl is missing although the database has 2 checkpoints" in out, out


def test_forged_external_record_is_detected(log: Log) -> None:
    """Appending a made-up checkpoint (say, to cover a rewritten chain) needs the HSM's signature."""
    path = log.home / "audit-checkpoints.jsonl"
    rec = _records(path)[-1]
    rec["hash"] = "ab" * 32
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    code, out = _verify(log)
    assert code == 7 and f"external checkpoint at seq {rec['seq']}: bad signature" in out, out


# -- when checkpoints are taken ------------------------------------------------------------------------


def test_beat_schedules_checkpoints_at_the_configured_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.app import beat_schedule

    monkeypatch.setenv("V2GPKI_AUDIT_CHECKPOINT_SECONDS", "42")
    entry = beat_schedule()["audit-checkpoint"]
    assert entry["task"] == "v2gpki.audit.checkpoint" and entry["schedule"].total_seconds() == 42
    monkeypatch.setenv("V2GPKI_AUDIT_CHECKPOINT_SECONDS", "0")
    assert "audit-checkpoint" not in beat_schedule()
    monkeypatch.delenv("V2GPKI_AUDIT_CHECKPOINT_SECONDS")
    assert beat_schedule()["audit-checkpoint"]["schedule"].total_seconds() == 300


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve did not become healthy")


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_checkpoints_when_it_stops_cleanly(workers: int, log: Log, ext_token: Path) -> None:
    ctx = _ctx(log.home, ext_token)
    try:
        create_org(ctx.db, f"Serve {workers}", "cpo", [f"DE*SV{workers}"])
        head = _one(log.db, "SELECT seq FROM audit_head WHERE id = 1")
    finally:
        ctx.db.dispose()
    assert head > log.last_cp
    port = free_port()
    proc = subprocess.Popen([V2GPKI_EXE, "serve", "--port", str(port), "--workers", str(workers)], env=log.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"audit checkpoint at seq {head} signed at shutdown" in err
    assert _records(log.home / "audit-checkpoints.jsonl")[-1]["seq"] == head
    assert _one(log.db, "SELECT max(seq) FROM audit_checkpoint") == head
    code, out = _verify(log)
    assert code == 0, out


# -- webhook -----------------------------------------------------------------------------------------------


class _Sink(BaseHTTPRequestHandler):
    status = 200
    got: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).got.append(json.loads(body))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[tuple[str, type[_Sink]]]:
    handler = type("Sink", (_Sink,), {"got": [], "status": 200})
    srv = HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/audit", handler
    srv.shutdown()
    srv.server_close()


def test_webhook_receives_each_checkpoint_and_a_failing_one_writes_nothing(
        log: Log, ext_token: Path, sink: tuple[str, type[_Sink]]) -> None:
    url, handler = sink
    ctx = _ctx(log.home, ext_token, audit_checkpoint_webhook=url)
    path = log.home / "audit-checkpoints.jsonl"
    try:
        create_org(ctx.db, "Hooked", "cpo", ["DE*HXT"])
        cp = audit_sign.checkpoint(ctx)
        assert cp is not None and handler.got[-1]["seq"] == cp.seq and handler.got[-1] == _records(path)[-1]
        handler.status = 500
        create_org(ctx.db, "Hooked 2", "cpo", ["DE*HXU"])
        lines = path.read_text()
        with pytest.raises(ConfigError, match="HTTP 500"):
            audit_sign.checkpoint(ctx)
        assert path.read_text() == lines  # nothing half-written
        assert _one(log.db, "SELECT max(seq) FROM audit_checkpoint") == cp.seq
    finally:
        ctx.db.dispose()


# -- PostgreSQL ----------------------------------------------------------------------------------------------


def test_postgresql_truncation_and_deleted_checkpoint_are_detected(tmp_path: Path, ext_token: Path,
                                                                   pg_url: str) -> None:
    pg = own_pg_database("auditext")
    assert pg is not None
    url, name = pg
    ctx = _ctx(tmp_path / "home", ext_token, url)
    try:
        create_org(ctx.db, "PG CPO", "cpo", ["DE*PXT"])
        first = audit_sign.checkpoint(ctx)
        create_api_key(ctx.db, "PG CPO")
        create_api_key(ctx.db, "PG CPO")
        second = audit_sign.checkpoint(ctx)
        assert first is not None and second is not None and second.seq > first.seq
        assert audit_sign.checkpoint(ctx) == second  # the head has not moved: no second signature
        assert audit_sign.verify_all(ctx).ok
        with ctx.db.engine.begin() as conn:  # (a) on PostgreSQL
            h = conn.execute(text("SELECT hash FROM audit_event WHERE seq = :s"), {"s": first.seq}).scalar()
            conn.execute(text("DELETE FROM audit_event WHERE seq > :s"), {"s": first.seq})
            conn.execute(text("DELETE FROM audit_checkpoint WHERE seq > :s"), {"s": first.seq})
            conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1"), {"s": first.seq, "h": h})
        res = audit_sign.verify_all(ctx)
        assert not res.ok
        assert any(f"external checkpoint at seq {second.seq}: the database's chain ends at seq {first.seq}" in p
                   for p in res.problems), res.problems
        with ctx.db.engine.begin() as conn:  # (c)
            conn.execute(text("DELETE FROM audit_checkpoint"))
        problems = audit_sign.verify_all(ctx).problems
        assert f"external checkpoint at seq {first.seq}: no such checkpoint row in the database (deleted)" in problems
    finally:
        ctx.db.dispose()
        drop_pg_database(name)


# -- incremental verification (#28 item 3) ----------------------------------------------------------------


def _verify_args(lg: Log, *extra: str) -> tuple[int, str]:
    r = run_cli(["audit", "verify", *extra], lg.env)
    return r.returncode, r.stdout + r.stderr


def _add_events(lg: Log, token_root: Path, tag: str) -> int:
    ctx = _ctx(lg.home, token_root)
    try:
        create_org(ctx.db, f"Incremental {tag}", "cpo", [f"DE*I{tag}{tag}"])
        create_api_key(ctx.db, f"Incremental {tag}")
    finally:
        ctx.db.dispose()
    return int(_one(lg.db, "SELECT seq FROM audit_head WHERE id = 1"))


def test_verification_is_incremental_from_the_last_verified_checkpoint(log: Log, ext_token: Path) -> None:
    code, out = _verify_args(log)  # no marker yet: the whole chain, then the marker at the newest checkpoint
    assert code == 0 and "incremental" not in out, out
    assert _one(log.db, "SELECT seq FROM audit_verification WHERE id = 1") == log.last_cp
    head = _add_events(log, ext_token, "A")
    code, out = _verify_args(log)
    assert code == 0, out
    assert f"{head} events" in out and f"incremental: events {log.last_cp}–{head} re-hashed" in out, out
    code, out = _verify_args(log, "--full")
    assert code == 0 and f"{head} events" in out and "incremental" not in out, out


def test_tampering_after_the_last_verified_checkpoint_is_found_incrementally(log: Log, ext_token: Path) -> None:
    assert _verify_args(log)[0] == 0
    head = _add_events(log, ext_token, "B")
    edited = head - 1
    assert edited > log.last_cp
    _sql(log.db, ("UPDATE audit_event SET details = ? WHERE seq = ?", (json.dumps({"forged": True}), edited)))
    code, out = _verify_args(log)
    assert code == 7 and f"event {edited}: content does not match its hash (edited)" in out, out
    # a failed verification leaves the marker where it was
    assert _one(log.db, "SELECT seq FROM audit_verification WHERE id = 1") == log.last_cp


def test_tampering_before_the_last_verified_checkpoint_needs_full(log: Log) -> None:
    """What incremental does not re-check (docs/operations.md): an event before the last verified
    checkpoint edited with its stored hashes left alone. `--full` re-hashes it."""
    assert _verify_args(log)[0] == 0
    _sql(log.db, ("UPDATE audit_event SET details = ? WHERE seq = 2", (json.dumps({"forged": True}),)))
    code, out = _verify_args(log)
    assert code == 0 and f"incremental: events {log.last_cp}–" in out, out
    code, out = _verify_args(log, "--full")
    assert code == 7 and "event 2: content does not match its hash (edited)" in out, out


def test_a_forged_marker_is_refused(log: Log, ext_token: Path) -> None:
    """Moving the marker past edited events needs the audit key's signature."""
    assert _verify_args(log)[0] == 0
    head = _add_events(log, ext_token, "C")
    _sql(log.db, ("UPDATE audit_event SET details = ? WHERE seq = ?", (json.dumps({"forged": True}), head - 1)))
    h = _one(log.db, "SELECT hash FROM audit_head")
    _sql(log.db, ("UPDATE audit_verification SET seq = ?, hash = ? WHERE id = 1", (head, h)))
    code, out = _verify_args(log)
    assert code == 7 and "verification marker" in out and "not signed by the audit key" in out, out
    assert f"event {head - 1}: content does not match its hash (edited)" in out, out  # then verified in full
    _sql(log.db, ("UPDATE audit_verification SET seq = 1, hash = ? WHERE id = 1",
                  (_one(log.db, "SELECT hash FROM audit_event WHERE seq = 1"),)))
    code, out = _verify_args(log)
    assert code == 7 and f"event {head - 1}: content does not match its hash (edited)" in out, out


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_database_rewrite_is_detected_after_a_verification(attack: str, log: Log) -> None:
    """The three attacks above, on a log whose last verification passed: the incremental run finds them."""
    assert _verify_args(log)[0] == 0
    tamper, expected = ATTACKS[attack]
    tamper(log)
    code, out = _verify_args(log)
    assert code == 7, out
    for needle in expected(log):
        assert needle in out, out


def test_the_api_verifies_incrementally_or_fully(log: Log, ext_token: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    ctx = _ctx(log.home, ext_token)
    try:
        create_org(ctx.db, "Auditors X", "auditor", [])
        key = create_api_key(ctx.db, "Auditors X")[0]
        with TestClient(create_app(ctx)) as c:
            hdr = {"Authorization": f"Bearer {key}"}
            first = c.get("/v1/audit/verify", headers=hdr).json()
            assert first["ok"] and first["from_seq"] == 0 and first["verified_through"] == log.last_cp
            again = c.get("/v1/audit/verify", headers=hdr).json()
            assert again["ok"] and again["from_seq"] == log.last_cp and again["events"] == first["events"]
            assert again["checked"] == first["events"] - log.last_cp + 1
            full = c.get("/v1/audit/verify?full=true", headers=hdr).json()
            assert full["ok"] and full["from_seq"] == 0 and full["checked"] == full["events"]
    finally:
        ctx.db.dispose()
