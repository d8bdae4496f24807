"""The incremental expiry scan (#28 item 3, pki/lifecycle.py scan_expiring) on SQLite and PostgreSQL.

Over a sequence of simulated days with issuance (short-lived certificates inside a window, renewals),
revocation (of a renewal, which makes the certificate it replaced a candidate again), holds put and
released, tenants scanned on their own, a window-policy change and a scan that dies halfway, each
incremental scan records exactly what a full scan would have recorded at that moment (the full scan's
candidates, computed just before) and leaves nothing for a full scan to find. Each scan's queries use an
index (EXPLAIN on both databases), and concurrent incremental scanners record each alert once.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, select

from pki import lifecycle
from pki.context import Context
from pki.store import lifecycle as store
from pki.store.db import MIGRATIONS, Database, utcnow
from pki.store.models import Certificate
from pki.store.models_lifecycle import ExpiryAlert, ExpiryScanMark
from tests.conftest import csr_pem, drop_pg_database, lifecycle_context, own_pg_database

_C = Certificate.__table__  # type: ignore[attr-defined]
_A = ExpiryAlert.__table__  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ectx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         token_root: Path) -> Iterator[Context]:
    """A database of its own: the scans here are of the whole fleet (scope "*")."""
    db_url, name = None, None
    if request.param == "postgresql":
        pg = own_pg_database("expiry")
        if pg is None:
            if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
                pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
            pytest.skip("no PostgreSQL")
        db_url, name = pg
    c = lifecycle_context(tmp_path_factory, token_root, f"t-exp-{request.param}", db_url)
    yield c
    c.db.dispose()
    if name:
        drop_pg_database(name)


class Fleet:
    """Certificate rows with notAfter chosen relative to a simulated clock (the scan reads rows; the DER
    is not parsed). ``created`` is the wall-clock creation time: the fleet that exists before the first
    scan was created a day earlier, what the simulation issues later is created now."""

    def __init__(self, ctx: Context, start: datetime) -> None:
        self.ctx = ctx
        self.now = start
        self.n = 0
        # One real leaf's DER for every row: revocation observers parse it (is it a CA?), the scan does not.
        self.der = ctx.engine.issue_from_csr("secc", csr_pem("DE*EXP*E1", dc="CPO")).der

    def add(self, days: float, *, tenant: str | None, profile: str = "secc", issuer: str = "cpo-sub2",
            identifier: str | None = None, status: str = "valid", old: bool = False) -> int:
        self.n += 1
        real = utcnow()
        na = self.now + timedelta(days=days)
        row = {"issuer": issuer, "serial": secrets.token_hex(8), "profile": profile, "subject": f"CN=c{self.n}",
               "identifier": identifier or f"ID-{secrets.token_hex(4)}", "tenant": tenant,
               "not_before": na - timedelta(days=400), "not_after": na, "status": status,
               "revoked_at": None if status == "valid" else real,
               "revocation_reason": None if status == "valid" else "superseded",
               "fingerprint": secrets.token_hex(32), "der": self.der,
               "created_at": real - timedelta(days=1) if old else real}
        with self.ctx.db.engine.begin() as conn:
            return int(conn.execute(_C.insert().values(**row).returning(_C.c.id)).scalar_one())

    def serial(self, cert_id: int) -> tuple[str, str]:
        with self.ctx.db.engine.connect() as conn:
            r = conn.execute(select(_C.c.issuer, _C.c.serial).where(_C.c.id == cert_id)).one()
        return str(r[0]), str(r[1])

    def revoke(self, cert_id: int, reason: str = "superseded") -> None:
        issuer, serial = self.serial(cert_id)
        self.ctx.engine.revoke(serial, reason, issuer=issuer, actor="test")

    def release(self, cert_id: int) -> None:
        issuer, serial = self.serial(cert_id)
        self.ctx.engine.release_hold(serial, issuer=issuer, actor="test")


def full_candidates(ctx: Context, now: datetime, tenant: str | None = None) -> set[tuple[int, int]]:
    """What a full scan would record now: every (certificate, window) inside a window, not yet alerted."""
    return {(c.cert_id, c.window) for chunk in lifecycle.candidates(ctx, now, tenant=tenant) for c in chunk}


def alerts(ctx: Context) -> set[tuple[int, int]]:
    with ctx.db.engine.connect() as conn:
        return {(int(r[0]), int(r[1])) for r in conn.execute(select(_A.c.cert_id, _A.c.window_days))}


def mark(ctx: Context, scope: str = "*") -> ExpiryScanMark | None:
    return store.scan_mark(ctx.db, scope)


def scan_like_full(ctx: Context, now: datetime, *, tenant: str | None = None, want_full: bool = False,
                   **kw: Any) -> lifecycle.ScanResult:
    """One scan; it must record exactly the full scan's candidates of that moment and leave none."""
    expected = full_candidates(ctx, now, tenant)
    before = alerts(ctx)
    res = lifecycle.scan_expiring(ctx, now, tenant=tenant, **kw)
    assert res.full is want_full, res.why_full
    assert alerts(ctx) - before == expected
    assert res.alerts == len(expected)
    assert full_candidates(ctx, now, tenant) == set()
    return res


def test_incremental_scan_records_what_a_full_scan_would(ectx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = utcnow()
    f = Fleet(ectx, t0)
    ta, tb = f"tA-{secrets.token_hex(3)}", f"tB-{secrets.token_hex(3)}"
    # The fleet before the first scan: notAfter spread over 0.5..120 days, two tenants and the operator's,
    # a station certificate (cs-client) and a contract profile, some revoked.
    for i in range(160):
        f.add(0.5 + (i * 0.75) % 120, tenant=(ta, tb, None)[i % 3],
              profile=("secc", "cs-client", "contract")[i % 5 % 3],
              issuer={"secc": "cpo-sub2", "cs-client": "csms-root", "contract": "mo-sub2"}[
                  ("secc", "cs-client", "contract")[i % 5 % 3]],
              status="revoked" if i % 17 == 0 else "valid", old=True)
    # A certificate replaced by a renewal; the renewal gets revoked on day 3.
    replaced = f.add(45, tenant=ta, identifier="DE*ABC*EREPL1", old=True)
    renewal = f.add(400, tenant=ta, identifier="DE*ABC*EREPL1", old=True)
    # A certificate put on hold before it enters its 30-day window, released on day 5 (inside it).
    held = f.add(33, tenant=tb, old=True)
    f.revoke(held, "certificateHold")

    res = scan_like_full(ectx, f.now, want_full=True)  # no mark yet
    assert res.why_full == "no earlier complete scan" and res.alerts > 50
    m0 = mark(ectx)
    assert m0 is not None and m0.scanned_now == f.now and m0.was_full

    # The same scan again: nothing new, and read incrementally.
    assert scan_like_full(ectx, f.now).alerts == 0

    for day in range(1, 13):
        f.now = t0 + timedelta(days=day)
        if day == 2:  # issued today, already inside windows (short-lived certificates)
            for d in (0.3, 2, 6, 13, 20, 59):
                f.add(d, tenant=ta)
            f.add(3, tenant=tb, profile="cs-client", issuer="csms-root")
        if day == 3:
            f.revoke(renewal)  # `replaced` (42 days left) is no longer replaced: alert in its 60-day window
        if day == 4:
            f.add(1.5, tenant=None, status="revoked")  # revoked at issuance: never a candidate
            f.revoke(f.add(8, tenant=tb), "certificateHold")  # issued and held the same day
        if day == 5:
            f.release(held)  # valid again, 28 days left: its 30-day alert is due now
        if day == 6:
            # a tenant scanned on its own first: its own mark; the fleet scan then finds the rest
            scan_like_full(ectx, f.now, tenant=ta, want_full=mark(ectx, f"tenant:{ta}") is None)
        if day == 8:
            f.add(500, tenant=ta, identifier="DE*ABC*EREPL1")  # renewed again: `replaced` is quiet from now on
        res = scan_like_full(ectx, f.now)
        if day == 3:
            assert (replaced, 60) in alerts(ectx)
        if day == 5:
            assert (held, 30) in alerts(ectx)
        got = mark(ectx)
        assert got is not None and got.scanned_now == f.now and not got.was_full
    assert {w for (c, w) in alerts(ectx) if c == replaced} == {60}

    # A window-policy change: a full scan, by itself, and the same equality.
    lc = lifecycle.lifecycle_of(ectx)
    monkeypatch.setattr(lc.settings, "expiry_windows", "90,45,10,3")
    f.now += timedelta(days=1)
    res = scan_like_full(ectx, f.now, want_full=True)
    assert res.why_full == "the window policy changed" and res.alerts > 0
    f.now += timedelta(days=1)
    scan_like_full(ectx, f.now)  # incremental again under the new policy
    monkeypatch.undo()

    # Asked for: `v2gpki-worker expiry scan --full`.
    f.now += timedelta(days=1)
    assert scan_like_full(ectx, f.now, full=True, want_full=True).why_full == "asked for"

    # A scan that dies halfway: what it committed stays, the mark does not move, the next scan finishes.
    f.now += timedelta(days=9)
    expected = full_candidates(ectx, f.now)
    assert len(expected) >= 3
    before_mark, before = mark(ectx), alerts(ectx)
    real_record = lifecycle.record_alerts
    calls: list[int] = []

    def dies_after_one_chunk(ctx: Context, cands: Any, now: Any = None) -> lifecycle.ScanResult:
        calls.append(len(cands))
        if len(calls) > 1:
            raise RuntimeError("worker killed")
        return real_record(ctx, cands, now)

    monkeypatch.setattr(lifecycle, "record_alerts", dies_after_one_chunk)
    with pytest.raises(RuntimeError):
        lifecycle.scan_expiring(ectx, f.now, chunk=2)
    monkeypatch.undo()
    committed = alerts(ectx) - before
    assert 0 < len(committed) <= 2 and committed < expected
    after = mark(ectx)
    assert after is not None and before_mark is not None and after.scanned_now == before_mark.scanned_now
    res = lifecycle.scan_expiring(ectx, f.now)
    assert not res.full and alerts(ectx) - before == expected
    assert full_candidates(ectx, f.now) == set()

    # An earlier `now` than the mark's cannot continue it: a full scan.
    assert lifecycle.scan_expiring(ectx, f.now - timedelta(days=2)).why_full == "now is before the last scan's"


def test_many_changes_fall_back_to_a_full_scan(ectx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    now = utcnow() + timedelta(days=40)
    f = Fleet(ectx, now)
    lifecycle.scan_expiring(ectx, now, full=True)
    lc = lifecycle.lifecycle_of(ectx)
    expiry = lc.policy.expiry.model_copy(update={"incremental_max_changes": 3})
    monkeypatch.setattr(ectx, "lifecycle", dataclasses.replace(lc, policy=lc.policy.model_copy(update={"expiry": expiry})))
    for d in (2, 5, 9, 20):
        f.add(d, tenant=None)
    res = scan_like_full(ectx, now, want_full=True)
    assert res.why_full is not None and "changed since the last scan" in res.why_full


def test_concurrent_incremental_scanners_record_each_alert_once(ectx: Context) -> None:
    now = utcnow() + timedelta(days=60)
    f = Fleet(ectx, now)
    for i in range(30):  # alerted in their 14-day window now; most enter the 7-day one in the next 3 days
        f.add(7.5 + 0.1 * i, tenant=f"tc-{i % 4}", old=True)
    lifecycle.scan_expiring(ectx, now, full=True)
    later = now + timedelta(days=3)
    for i in range(30):  # and issued in between, inside a window
        f.add(0.2 * i + 3, tenant=f"tc-{i % 4}")
    expected = full_candidates(ectx, later)
    before = alerts(ectx)
    errors: list[BaseException] = []
    results: list[lifecycle.ScanResult] = []

    def scan() -> None:
        try:
            results.append(lifecycle.scan_expiring(ectx, later))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(not r.full for r in results)
    assert alerts(ectx) - before == expected and len(expected) >= 40
    assert sum(r.alerts for r in results) == len(expected), "each alert recorded by exactly one scanner"


# -- EXPLAIN: every query of the incremental scan starts from an index -------------------------------------------


def _explain(ctx: Context, stmt: Any) -> str:
    """The plan of a SQLAlchemy statement with its parameters bound as the real execution binds them."""
    eng = ctx.db.engine
    compiled = stmt.compile(dialect=eng.dialect, compile_kwargs={"render_postcompile": True})
    raw = compiled.construct_params()
    proc = compiled._bind_processors

    def value(k: str) -> Any:
        return proc[k](raw[k]) if k in proc else raw[k]

    params: Any = (tuple(value(k) for k in compiled.positiontup or []) if compiled.positional
                   else {k: value(k) for k in raw})
    with eng.connect() as conn:
        if ctx.db.is_sqlite:
            return "\n".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params))
        # A small table would be read sequentially whatever its indexes: ask for the plan the planner
        # takes when the table is big (sequential scans priced out), as tests/test_fleet_scale.py does.
        conn.exec_driver_sql("SET enable_seqscan = off")
        try:
            return "\n".join(str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN {compiled}", params))
        finally:
            conn.exec_driver_sql("RESET enable_seqscan")


def _queries(ctx: Context) -> list[tuple[str, Any, tuple[str, ...]]]:
    lc = lifecycle.lifecycle_of(ctx)
    windows, inc, exc = lifecycle._groups(ctx, lc)[-1]  # the default group: every leaf profile
    now = utcnow()
    # The steady state: few rows changed since the last scan (here none: a watermark past every row, as
    # tests/test_fleet_scale.py's change scans are planned), so the planner starts from the change index.
    since = now + timedelta(days=1)
    crossing = store.crossing_query(now, windows, inc, exc, None, now + timedelta(days=30),
                                    now + timedelta(days=31)).order_by(_C.c.not_after, _C.c.id).limit(500)
    return [
        # (not_after, status), or (not_after, id) of migration 0013, which also gives the keyset's order
        ("certificates that entered a window", crossing,
         ("ix_certificate_not_after_status|ix_certificate_not_after_id",)),
        ("certificates created since the last scan", store.created_query(now, windows, inc, exc, None, since),
         ("ix_certificate_created_at",)),
        ("certificates no longer replaced (their renewal revoked)",
         store.unreplaced_query(now, windows, inc, exc, None, since),
         # then to the certificates they replaced by identifier: asked of SQLite, which has no statistics to
         # choose with; PostgreSQL's choice on a table this small says nothing about a large one (bench/expiry.py
         # prints the plan at 10^6)
         ("ix_certificate_revoked_at", "ix_certificate_identifier|ix_certificate_identifier_c") if ctx.db.is_sqlite
         else ("ix_certificate_revoked_at",)),
        ("holds released since the last scan", store.released_query(10**9),
         ("ix_audit_event_action|ix_audit_event_seq",)),
    ]


def test_incremental_queries_use_indexes(ectx: Context) -> None:
    if not ectx.db.is_sqlite:
        with ectx.db.autocommit.connect() as conn:  # planner statistics, as autovacuum would keep them
            conn.exec_driver_sql("ANALYZE")
    for what, stmt, indexes in _queries(ectx):
        plan = _explain(ectx, stmt)
        for index in indexes:
            assert any(i in plan for i in index.split("|")), f"{what}: {index} not used:\n{plan}"
        if ectx.db.is_sqlite:
            # "SCAN t" without an index is a full table read ("SCAN t USING INDEX" is an index walk)
            bad = [ln for ln in plan.splitlines() if ln.strip().startswith("SCAN") and "INDEX" not in ln]
        else:
            bad = [ln for ln in plan.splitlines() if "Seq Scan" in ln]
        assert not bad, f"{what}: a table read whole:\n{plan}"


def test_scan_mark_is_replaced_whole(ectx: Context) -> None:
    at = utcnow()
    first = ExpiryScanMark(scope="tenant:nobody", policy_sha256="a" * 64, scanned_now=at, changes_at=at,
                           audit_seq=1, was_full=True, updated_at=at)
    store.save_scan_mark(ectx.db, first)
    later = at + timedelta(days=1)
    store.save_scan_mark(ectx.db, ExpiryScanMark(scope="tenant:nobody", policy_sha256="b" * 64, scanned_now=later,
                                                 changes_at=later, audit_seq=7, was_full=False, updated_at=later))
    got = store.scan_mark(ectx.db, "tenant:nobody")
    assert got is not None
    assert (got.policy_sha256, got.scanned_now, got.changes_at, got.audit_seq, got.was_full) == (
        "b" * 64, later, later, 7, False)


# -- migration 0014 -------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def bare_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        d = Database(f"sqlite:///{tmp_path / 'm.db'}")
        yield d
        d.dispose()
        return
    pg = own_pg_database("mig13")
    if pg is None:
        if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
            pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
        pytest.skip("no PostgreSQL")
    d = Database(pg[0])
    try:
        yield d
    finally:
        d.dispose()
        drop_pg_database(pg[1])


def _alembic(db: Database, rev: str, *, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    cfg.attributes["engine"] = db.engine
    (command.downgrade if down else command.upgrade)(cfg, rev)


def test_migration_0014_up_and_down(bare_db: Database) -> None:
    _alembic(bare_db, "0013")
    assert "expiry_scan_mark" not in inspect(bare_db.engine).get_table_names()
    _alembic(bare_db, "0014")
    cols = {c["name"] for c in inspect(bare_db.engine).get_columns("expiry_scan_mark")}
    assert cols == {"scope", "policy_sha256", "scanned_now", "changes_at", "audit_seq", "was_full", "updated_at"}
    at = utcnow()
    store.save_scan_mark(bare_db, ExpiryScanMark(scope="*", policy_sha256="c" * 64, scanned_now=at, changes_at=at,
                                                 audit_seq=0, was_full=True, updated_at=at))
    got = store.scan_mark(bare_db, "*")
    assert got is not None and got.scanned_now == at
    _alembic(bare_db, "0013", down=True)
    assert "expiry_scan_mark" not in inspect(bare_db.engine).get_table_names()
