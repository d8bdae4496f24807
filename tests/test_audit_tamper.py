"""Tamper evidence of the audit log, through the operator's tools: `v2gpki audit verify` (exit status and
message) and GET /v1/audit/verify.

Each case gets its own SQLite database (the same SoftHSM2 token, so one audit key signs every
checkpoint): real events from the service's own code paths, a signed checkpoint from
`v2gpki audit checkpoint`, then the test edits the database file with sqlite3 behind the service's back.

  (a) a row's details edited                         -> the event's hash no longer matches
  (b) a middle row deleted                           -> a missing sequence number, a broken prev_hash link
  (c) the tail deleted and the head row rewritten    -> the chain is consistent again; the signed
                                                        checkpoint names an event that is gone
  (d) an edit with every later hash recomputed       -> likewise caught only by the checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from pki.audit import GENESIS
from pki.config import Settings
from pki.orgs import create_api_key, create_org, revoke_api_key
from pki.wiring import build_context
from tests.conftest import TEST_PIN, make_token, run_cli

LABEL = "t-audit"


@dataclass
class Log:
    home: Path
    db: Path
    env: dict[str, str]
    auditor_key: str
    head_seq: int


@pytest.fixture(scope="module")
def audit_token(token_root: Path) -> Path:
    make_token(token_root, LABEL)
    return token_root


def _env(home: Path, token_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(home), SOFTHSM2_CONF=str(token_root / "softhsm2.conf"), V2GPKI_TOKEN_LABEL=LABEL,
               V2GPKI_HSM_PIN=TEST_PIN, V2GPKI_PKILINT="shape")
    return env


def _settings(home: Path, token_root: Path) -> Settings:
    os.environ["SOFTHSM2_CONF"] = str(token_root / "softhsm2.conf")
    return Settings(home=home, token_label=LABEL, hsm_pin=TEST_PIN, pkilint="shape")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, audit_token: Path) -> Log:
    """A database with ~10 events from real code paths (organizations, API keys, a revocation of a key)
    and a signed checkpoint at the head, taken by the CLI. Built once; each test tampers with a copy."""
    home = tmp_path_factory.mktemp("audit") / "home"
    env = _env(home, audit_token)
    ctx = build_context(_settings(home, audit_token))
    create_org(ctx.db, "Audited CPO", "cpo", ["DE*AUD"])
    create_org(ctx.db, "Auditors", "auditor", [])
    auditor_key = create_api_key(ctx.db, "Auditors")[0]
    for _ in range(3):
        _, row = create_api_key(ctx.db, "Audited CPO")
    revoke_api_key(ctx.db, row.key_id)
    create_org(ctx.db, "Later EMSP", "emsp", ["DE-LAT"])
    create_api_key(ctx.db, "Later EMSP")
    ctx.db.dispose()
    r = run_cli(["audit", "checkpoint"], env)
    assert r.returncode == 0 and "signed" in r.stdout, r.stdout + r.stderr
    db = home / "v2gpki.db"
    with sqlite3.connect(db) as conn:
        seq = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()[0]
    assert seq >= 9
    return Log(home, db, env, auditor_key, seq)


@pytest.fixture
def log(pristine: Log, tmp_path: Path, audit_token: Path) -> Log:
    home = tmp_path / "home"
    shutil.copytree(pristine.home, home)  # the database file (and its WAL, if any) as the CLI left it
    return Log(home, home / "v2gpki.db", _env(home, audit_token), pristine.auditor_key, pristine.head_seq)


def _sql(db: Path, *stmts: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            for sql, args in stmts:
                conn.execute(sql, args)
    finally:
        conn.close()


def _verify_cli(lg: Log) -> tuple[int, str]:
    r = run_cli(["audit", "verify"], lg.env)
    return r.returncode, r.stdout + r.stderr


def _verify_api(lg: Log, token_root: Path) -> dict[str, object]:
    ctx = build_context(_settings(lg.home, token_root))
    try:
        with TestClient(create_app(ctx)) as c:
            r = c.get("/v1/audit/verify", headers={"Authorization": f"Bearer {lg.auditor_key}"})
        assert r.status_code == 200, r.text
        body: dict[str, object] = r.json()
        return body
    finally:
        ctx.db.dispose()


def test_untouched_log_with_checkpoint_verifies(log: Log, audit_token: Path) -> None:
    code, out = _verify_cli(log)
    assert code == 0, out
    assert f"{log.head_seq} events" in out and "1 signed checkpoints" in out
    body = _verify_api(log, audit_token)
    assert body["ok"] is True and body["problems"] == [] and body["checkpoints"] == 1
    assert body["events"] == log.head_seq


def _edit_details(lg: Log) -> None:
    _sql(lg.db, ("UPDATE audit_event SET details = ? WHERE seq = 3", (json.dumps({"role": "admin"}),)))


def _delete_middle(lg: Log) -> None:
    _sql(lg.db, ("DELETE FROM audit_event WHERE seq = ?", (lg.head_seq // 2,)))


def _truncate_tail(lg: Log) -> None:
    """Drop the last three events and point the head at the new last one, so the chain itself is whole."""
    keep = lg.head_seq - 3
    conn = sqlite3.connect(lg.db)
    try:
        last_hash = conn.execute("SELECT hash FROM audit_event WHERE seq = ?", (keep,)).fetchone()[0]
    finally:
        conn.close()
    _sql(lg.db, ("DELETE FROM audit_event WHERE seq > ?", (keep,)),
         ("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (keep, last_hash)))


def _rewrite_after_edit(lg: Log) -> None:
    """Edit event 2 and recompute every later hash and the head with the service's own hash function: the
    chain is internally consistent again; only the checkpoint signature over the old head tells."""
    from datetime import datetime

    from pki.audit import chain_hash
    from pki.store.models import AuditEvent

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
        ev = AuditEvent(seq=r["seq"], ts=datetime.fromisoformat(str(r["ts"])), actor=r["actor"], org=r["org"],
                        action=r["action"], object=r["object"], outcome=r["outcome"], details=details,
                        prev_hash=prev, hash="")
        h = chain_hash(prev, ev)
        stmts.append(("UPDATE audit_event SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                      (json.dumps(details), prev, h, r["seq"])))
        prev = h
    stmts.append(("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,)))
    _sql(lg.db, *stmts)
    # the forgery is internally consistent: without the checkpoint nothing would notice
    conn = sqlite3.connect(lg.db)
    try:
        assert conn.execute("SELECT hash FROM audit_head").fetchone()[0] == prev
    finally:
        conn.close()


CASES: dict[str, tuple[Callable[[Log], None], list[str]]] = {
    "edited-details": (_edit_details, ["event 3: content does not match its hash (edited)"]),
    "deleted-middle-row": (_delete_middle, ["missing", "rows deleted"]),
    "truncated-tail-head-rewritten": (_truncate_tail, ["checkpoint at seq", "no longer has that event"]),
    "edit-with-rehashed-chain": (_rewrite_after_edit, ["checkpoint at seq", "no longer has that event"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_detected(case: str, log: Log, audit_token: Path) -> None:
    tamper, expected = CASES[case]
    tamper(log)
    code, out = _verify_cli(log)
    assert code != 0, out
    assert "verification FAILED" in out
    for needle in expected:
        assert needle in out, out
    body = _verify_api(log, audit_token)
    assert body["ok"] is False
    problems = "\n".join(str(p) for p in body["problems"])  # type: ignore[attr-defined]
    for needle in expected:
        assert needle in problems, problems


def test_checkpoint_signature_is_checked(log: Log, audit_token: Path) -> None:
    """Rewriting the checkpoint row to match a forged head does not help without the HSM key."""
    _rewrite_after_edit(log)
    conn = sqlite3.connect(log.db)
    try:
        head_hash = conn.execute("SELECT hash FROM audit_head").fetchone()[0]
    finally:
        conn.close()
    _sql(log.db, ("UPDATE audit_checkpoint SET hash = ?", (head_hash,)))
    code, out = _verify_cli(log)
    assert code != 0 and "bad signature" in out, out
