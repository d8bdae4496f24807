"""Fleet scale at small N (#28): scans by index (EXPLAIN on SQLite and PostgreSQL), the standalone
responder's memory bounded by its cache size (not by the number of certificates), a revocation served as
`revoked` by other responder processes within the documented propagation time, and the compromise drill
(bulk revocation in bounded transactions, killed halfway and resumed). Figures at 10^5+ are bench/fleet.py's.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import func, select

from api import ocsp_fast
from api.ocsp_fast import start_in_thread
from pki.context import Context
from pki.issuance import Issued
from pki.ocsp import responder_for
from pki.revocation import BulkRevocation, bulk_revoke, count
from pki.store import ocsp as ocsp_store
from pki.store.models import AuditEvent, Certificate, OcspResponseCache
from tests.conftest import (
    V2GPKI_EXE,
    cli_env,
    csr_pem,
    drop_pg_database,
    free_port,
    lifecycle_context,
    own_pg_database,
    run_cli,
)

N_LEAVES = 240
_C = Certificate.__table__  # type: ignore[attr-defined]
_O = OcspResponseCache.__table__  # type: ignore[attr-defined]
_A = AuditEvent.__table__  # type: ignore[attr-defined]


@dataclass
class Fleet:
    ctx: Context
    leaves: list[Issued]
    issuer_cert: x509.Certificate


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          token_root: Path) -> Iterator[Fleet]:
    """A hierarchy of its own (the drill revokes every leaf of cpo-sub2) with N_LEAVES SECC leaves."""
    db_url, name = None, None
    if request.param == "postgresql":
        pg = own_pg_database("fleet")
        if pg is None:
            if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
                pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
            pytest.skip("no PostgreSQL")
        db_url, name = pg
    c = lifecycle_context(tmp_path_factory, token_root, f"t-fleet-{request.param}", db_url)
    leaves = [c.engine.issue_from_csr("secc", csr_pem(f"DE*FLT*E{secrets.token_hex(4).upper()}", dc="CPO"))
              for _ in range(N_LEAVES)]
    responder_for(c).presigner.flush()
    if db_url:
        with c.db.autocommit.connect() as conn:  # planner statistics, as autovacuum would keep them
            conn.exec_driver_sql("ANALYZE")
    c.engine.revoke(leaves[0].serial, "keyCompromise", issuer=leaves[0].issuer)
    yield Fleet(c, leaves, c.engine.ca("cpo-sub2").cert)
    c.db.dispose()
    if name:
        drop_pg_database(name)


def _req(f: Fleet, leaf: Issued) -> bytes:
    return (ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, f.issuer_cert, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER))


def _status(url: str, body: bytes, client: httpx.Client | None = None) -> ocsp.OCSPCertStatus:
    post = (client or httpx).post  # type: ignore[attr-defined]
    r = post(f"{url}/ocsp", content=body, headers={"Content-Type": "application/ocsp-request"}, timeout=10)
    resp = ocsp.load_der_ocsp_response(r.content)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp.certificate_status  # type: ignore[no-any-return]


# -- 1. every scan by index ----------------------------------------------------------------------------

# (what, SQL with ? placeholders, parameters, the index the plan must use)
_PAST = "2000-01-01 00:00:00.000000"
_FUTURE = "2100-01-01 00:00:00.000000"
SCANS: list[tuple[str, str, tuple[Any, ...], str]] = [
    ("responder change scan: responses re-signed since the watermark", ocsp_store._CHANGED_RESPONSES,
     (_FUTURE,), "ix_ocsp_response_this_update"),
    ("responder change scan: certificates revoked since the watermark", ocsp_store._CHANGED_CERTS,
     (_FUTURE,), "ix_certificate_revoked_at"),
    ("responder warm-up: the newest responses", ocsp_store._ROWS + " ORDER BY o.this_update DESC LIMIT ?", (10,),
     "ix_ocsp_response_this_update"),
    ("responder miss: one row by unique key",
     "SELECT c.status, o.der FROM certificate c LEFT JOIN ocsp_response o ON o.issuer = c.issuer AND "
     "o.serial = c.serial WHERE c.issuer = ? AND c.serial = ?", ("cpo-sub2", "1a2b"),
     "uq_certificate_issuer_serial|sqlite_autoindex_certificate_1"),  # SQLite names a UNIQUE constraint's index
    ("expiry scan", "SELECT id FROM certificate WHERE not_after > ? AND not_after <= ? AND status = 'valid' "
     "ORDER BY not_after, id LIMIT 500", (_FUTURE, _FUTURE),
     # either walks the notAfter range in order; (not_after, id) (migration 0013, the console's "expiring
     # before" list) gives the ORDER BY's id tie-break as well
     "ix_certificate_not_after_status|ix_certificate_not_after_id"),
    ("OCSP refresh: responses past half their validity",
     "SELECT issuer, serial, this_update FROM ocsp_response WHERE next_update < ?", (_PAST,),
     "ix_ocsp_response_next_update"),
    ("OCSP refresh: responses older than the current signer",
     "SELECT issuer, serial, this_update FROM ocsp_response WHERE this_update < ?", (_PAST,),
     "ix_ocsp_response_this_update"),
    ("OCSP refresh: responses not 'good'",
     "SELECT serial FROM ocsp_response WHERE issuer = ? AND status IN ('revoked', 'hold')",
     ("cpo-sub2",), "ix_ocsp_response_issuer_status"),
    ("OCSP refresh: certificates issued recently without a response",
     "SELECT c.serial FROM certificate c LEFT JOIN ocsp_response o ON o.issuer = c.issuer AND o.serial = c.serial "
     "WHERE c.created_at >= ? AND o.id IS NULL", (_FUTURE,), "ix_certificate_created_at"),
    ("CRL generation: revoked certificates of one CA",
     "SELECT serial, revoked_at, status, revocation_reason FROM certificate WHERE issuer = ? AND "
     "status IN ('revoked', 'hold') AND not_after > ?", ("cpo-sub2", _PAST), "ix_certificate_issuer_status"),
    ("console list: one tenant's certificates, paged by id",
     "SELECT id FROM certificate WHERE tenant = ? AND id > ? ORDER BY id LIMIT 51", ("x", 0), "ix_certificate_tenant_id"),
    ("bulk revocation: the next batch",
     "SELECT id FROM certificate WHERE issuer = ? AND status IN ('valid', 'hold') AND key_uri IS NULL LIMIT 500",
     ("cpo-sub2",), "ix_certificate_issuer_status"),
    ("audit verification from a checkpoint", "SELECT seq, hash FROM audit_event WHERE seq > ? ORDER BY seq LIMIT 1000",
     (0,), "ix_audit_event_seq"),
]


def _plan(ctx: Context, sql: str, params: tuple[Any, ...]) -> str:
    raw = ctx.db.engine.raw_connection()
    try:
        cur = raw.cursor()
        if ctx.db.is_sqlite:
            cur.execute("EXPLAIN QUERY PLAN " + sql, params)
            return "\n".join(str(r[-1]) for r in cur.fetchall())
        # A small table would be read sequentially whatever its indexes: ask for the plan the planner
        # takes when the table is big (sequential scans priced out).
        cur.execute("SET enable_seqscan = off")
        cur.execute("EXPLAIN " + sql.replace("?", "%s"), params)
        out = "\n".join(r[0] for r in cur.fetchall())
        cur.execute("RESET enable_seqscan")
        return out
    finally:
        raw.rollback()
        raw.close()


@pytest.mark.parametrize("what,sql,params,index", SCANS, ids=[s[0] for s in SCANS])
def test_every_scan_uses_an_index(fleet: Fleet, what: str, sql: str, params: tuple[Any, ...], index: str) -> None:
    plan = _plan(fleet.ctx, sql, params)
    assert any(i in plan for i in index.split("|")), f"{what}: {index} not used:\n{plan}"
    if fleet.ctx.db.is_sqlite:
        # SQLite: "SCAN t" without an index is a full table read ("SCAN t USING INDEX" is an index walk)
        bad = [ln for ln in plan.splitlines() if ln.startswith("SCAN") and "INDEX" not in ln]
        assert not bad, f"{what}: full scan:\n{plan}"
    else:
        assert "Seq Scan" not in plan, f"{what}: sequential scan:\n{plan}"


def test_migration_0008_created_the_indexes(fleet: Fleet) -> None:
    from sqlalchemy import inspect

    insp = inspect(fleet.ctx.db.engine)
    have = {i["name"] for t in ("certificate", "ocsp_response") for i in insp.get_indexes(t)}
    assert {"ix_ocsp_response_this_update", "ix_ocsp_response_next_update", "ix_ocsp_response_issuer_status",
            "ix_certificate_revoked_at", "ix_certificate_created_at", "ix_certificate_tenant_id"} <= have


# -- 2. memory bounded by the cache, not by the fleet ------------------------------------------------------


def test_cache_is_bounded_by_its_size_not_by_the_certificates(fleet: Fleet) -> None:
    bound = 40
    url, responder, stop = start_in_thread(fleet.ctx, cache_entries=bound, warm_entries=10)
    try:
        cache = responder.cache
        assert cache.loads == 1 and len(cache.entries) <= bound  # warm-up ≤ 10, then changed rows while room
        with fleet.ctx.db.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(_O)).scalar_one()
        assert stored > 4 * bound  # the table holds several times what a worker may keep
        revoked = {fleet.leaves[0].serial}
        with httpx.Client() as client:
            for _round in range(2):
                for leaf in fleet.leaves[: 4 * bound]:
                    st = _status(url, _req(fleet, leaf), client)
                    want = ocsp.OCSPCertStatus.REVOKED if leaf.serial in revoked else ocsp.OCSPCertStatus.GOOD
                    assert st == want, leaf.serial
                    assert len(cache.entries) <= bound
            assert cache.evictions >= 4 * bound - bound and cache.fills >= 4 * bound - 10
            # a hot set within the bound is served from memory
            hot = [_req(fleet, leaf) for leaf in fleet.leaves[:10]]
            for body in hot:
                _status(url, body, client)
            fast0 = responder.fast
            for body in hot * 3:
                assert isinstance(responder.lookup(body), ocsp_fast.Answer)
                _status(url, body, client)
            assert responder.fast - fast0 == len(hot) * 3
        h = httpx.get(f"{url}/healthz").json()
        assert h["max_entries"] == bound and h["entries"] <= bound
    finally:
        stop()


# -- 3. a revocation through one process, served by others -------------------------------------------------


@pytest.fixture(scope="module")
def serve_two(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fleet-serve") / "server.log"
    env = cli_env(fleet.ctx, V2GPKI_OCSP_CACHE_ENTRIES="32", V2GPKI_OCSP_CACHE_WARM_ENTRIES="16")
    with log.open("wb") as out:
        proc = subprocess.Popen([V2GPKI_EXE, "ocsp-serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "2"], env=env, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


PROPAGATION_S = 1.0  # docs/responders.md: every worker answers `revoked` within about one poll (0.15 s)


@pytest.mark.parametrize("hook", [True, False], ids=["re-signed", "hook-failed"])
def test_revocation_in_this_process_is_served_by_the_responder_processes(fleet: Fleet, serve_two: str,
                                                                          hook: bool) -> None:
    leaf = fleet.leaves[-1 if hook else -2]
    body = _req(fleet, leaf)
    for _ in range(8):  # a new connection each: both workers answer, and cache it
        assert _status(serve_two, body) == ocsp.OCSPCertStatus.GOOD
    from pki.wiring import OcspOnRevocation

    saved = fleet.ctx.engine.revocation_observers
    if not hook:  # the stored response still says good
        fleet.ctx.engine.revocation_observers = tuple(o for o in saved if not isinstance(o, OcspOnRevocation))
    try:
        fleet.ctx.engine.revoke(leaf.serial, "keyCompromise", issuer=leaf.issuer)
    finally:
        fleet.ctx.engine.revocation_observers = saved
    t0 = time.perf_counter()
    streak, since = 0, 0.0
    while streak < 12:  # twelve answers in a row, new connections (both workers)
        t = time.perf_counter() - t0
        st = _status(serve_two, body)
        if st == ocsp.OCSPCertStatus.REVOKED:
            since, streak = (t if streak == 0 else since), streak + 1
        else:
            streak = 0
        assert time.perf_counter() - t0 < PROPAGATION_S + 3, "never revoked everywhere"
    first_all = since  # from then on every answer, from either worker, said revoked
    assert first_all < PROPAGATION_S, first_all
    print(f"\n[{fleet.ctx.db.engine.dialect.name}] hook={hook}: revoked on every worker after {first_all:.3f} s")


# -- 4. the compromise drill --------------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_bulk_revocation_killed_halfway_resumes(fleet: Fleet) -> None:
    ctx = fleet.ctx
    spec = BulkRevocation(issuer="cpo-sub2", reason="keyCompromise", batch=30)
    todo = count(ctx, spec)
    assert todo >= N_LEAVES - 3  # every leaf but those revoked above (service certificates never)
    dry = bulk_revoke(ctx, spec, dry_run=True, actor="drill")
    assert dry.dry_run and dry.count == todo
    with ctx.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(_C)
                            .where(_C.c.status == "revoked")).scalar_one() <= 3  # nothing yet
    from pki.crl import latest_meta

    # CRLs still scheduled by earlier revocations (the scheduler's rate bound may hold one back) are
    # published first: from here on, only the drill makes CRLs.
    assert ctx.crl_scheduler.flush(60)
    number0 = (latest_meta(ctx.db, "cpo-sub2") or (0,))[0]
    responder = responder_for(ctx)
    real_presign = responder.presign

    def presign_failing_on_3rd(issuer: str, serials: Any) -> int:
        if len(done_batches) == 2:  # batch 3 commits, its responses are not re-signed, then the kill
            raise RuntimeError("HSM gone")
        return real_presign(issuer, serials)

    done_batches: list[list[str]] = []

    def kill_after_3(n: int, serials: list[str]) -> None:
        done_batches.append(serials)
        if n == 3:
            raise Killed()

    responder.presign = presign_failing_on_3rd  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            bulk_revoke(ctx, spec, dry_run=False, actor="drill", after_batch=kill_after_3)
    finally:
        responder.presign = real_presign  # type: ignore[method-assign]
    first = [s for b in done_batches for s in b]
    assert len(first) == 90 and count(ctx, spec) == todo - 90
    assert (latest_meta(ctx.db, "cpo-sub2") or (0,))[0] == number0  # the killed run published no CRL
    with ctx.db.engine.connect() as conn:
        c = _C
        revoked_at: dict[str, Any] = dict(conn.execute(select(c.c.serial, c.c.revoked_at).where(c.c.serial.in_(first))).all())
        stale = conn.execute(select(func.count()).select_from(_O)
                             .where(_O.c.serial.in_(done_batches[2]),
                                    _O.c.status == "good")).scalar_one()
    assert stale == 30  # batch 3: revoked, responses not re-signed (the kill came between)
    # ... the responder never serves them as good meanwhile (it checks the certificate's status)
    by_serial = {i.serial: i for i in fleet.leaves}
    for serial in done_batches[2][:5]:
        assert _status_of(responder.respond(_req(fleet, by_serial[serial]))) == ocsp.OCSPCertStatus.REVOKED

    res = bulk_revoke(ctx, spec, dry_run=False, actor="drill", keep_serials=True)
    assert res.count == todo - 90 and res.remaining == 0
    assert not set(res.serials) & set(first)  # nothing twice
    with ctx.db.engine.connect() as conn:
        c = _C
        assert dict(conn.execute(select(c.c.serial, c.c.revoked_at).where(c.c.serial.in_(first))).all()) == revoked_at
        leaves = [i.serial for i in fleet.leaves]
        st: dict[str, str] = dict(conn.execute(select(c.c.serial, c.c.status).where(c.c.serial.in_(leaves))).all())
        assert set(st.values()) == {"revoked"}  # nothing missed
        o = _O
        assert set(conn.execute(select(o.c.status).where(o.c.serial.in_(leaves))).scalars()) == {"revoked"}
        a = _A
        objs = list(conn.execute(select(a.c.object).where(a.c.action == "certificate.revoke",
                                                          a.c.actor == "drill")).scalars())
    assert len(objs) == len(set(objs)) == todo  # one audit event per certificate, none twice
    assert res.crl_number == number0 + 1  # regenerated once
    from pki.crl import load_crl

    stored_crl = load_crl(ctx.db, "cpo-sub2")
    assert stored_crl is not None
    crl = x509.load_der_x509_crl(stored_crl.der)
    assert {format(e.serial_number, "x") for e in crl} >= set(leaves)
    for leaf in fleet.leaves[::37]:
        assert _status_of(responder.respond(_req(fleet, leaf))) == ocsp.OCSPCertStatus.REVOKED
    with ctx.db.engine.connect() as conn:
        a = _A
        actions = list(conn.execute(select(a.c.action).where(a.c.action.like("revocation.bulk.%"))).scalars())
    assert actions.count("revocation.bulk.dry_run") >= 1 and actions.count("revocation.bulk.done") == 1
    assert actions.count("revocation.bulk.start") == 2


def _status_of(ans: Any) -> ocsp.OCSPCertStatus:
    return ocsp.load_der_ocsp_response(ans.der).certificate_status  # type: ignore[no-any-return]


def test_revoke_bulk_cli_dry_run(fleet: Fleet) -> None:
    res = run_cli(["revoke-bulk", "--issuer", "cpo-sub2", "--reason", "keyCompromise"], cli_env(fleet.ctx))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("dry run: would revoke") and "--yes" in res.stdout
    bad = run_cli(["revoke-bulk", "--issuer", "cpo-sub2", "--reason", "certificateHold"], cli_env(fleet.ctx))
    assert bad.returncode != 0
