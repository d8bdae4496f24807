"""Benchmark: one expiry scan (pki.lifecycle.scan_expiring) over N certificates, on SQLite and PostgreSQL.

Bulk-inserts N synthetic certificate rows (notAfter spread over [-30, +730] days, 5 % revoked, 1000
tenants, a subscription for every tenth; created a day before the scan, as a fleet exists before its
first scan), then runs ONE scan in a fresh process and reports wall time, peak RSS of that process (before
and during the scan), the alerts and notifications written, and the query plan of the candidate query
(EXPLAIN QUERY PLAN / EXPLAIN) to show the (not_after, status) index at work. Then, in the same process:

* the re-scan at once (nothing new to alert): the steady-state hourly cost;
* the next day's scan: N/1000 certificates issued meanwhile (notAfter spread like the fleet's, so some
  inside a window at once), N/10,000 revoked, and the clock one day on, so the certificates whose notAfter
  entered a window during that day get their alerts — the daily cost, with the alerts it writes (the same
  count whichever scan runs, full or incremental: a check that both find the same).

The incremental scan (#28 item 3) reports whether it ran full or incremental; an older tree reports neither.

``--reference-tree DIR`` (a worktree of another commit, e.g. ``git worktree add /tmp/ref main``): the data
are built once per backend, then the same scans (this script's, importing DIR's pki/ or this tree's) run
on fresh copies of that database (a copied SQLite file, a PostgreSQL database made from it as a template),
the two trees alternating ``--rounds`` times: the side-by-side figures come from identical data under the
same machine load, with the ratio this / reference of each median.

    .venv/bin/python bench/expiry.py --n 1000000                      # SQLite (default)
    .venv/bin/python bench/expiry.py --n 1000000 --pg postgresql://…  # or V2GPKI_TEST_PG_ADMIN_URL
    .venv/bin/python bench/expiry.py --json out.json …                 # the figures as JSON too
    .venv/bin/python bench/expiry.py --reference-tree /tmp/ref --rounds 3 …  # this tree against another
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROFILES = [("secc", "cpo-sub2", 0.6), ("contract", "mo-sub2", 0.3), ("cs-client", "csms-root", 0.1)]


def _settings(home: Path, db_url: str | None) -> Any:
    from pki.config import Settings

    return Settings(home=home, database_url=db_url, keystore="soft", pkilint="off")  # type: ignore[arg-type]


def populate(home: Path, db_url: str | None, n: int, tenants: int) -> float:
    from hsm.soft import SoftKeyStore
    from pki.orgs import create_org
    from pki.store.db import utcnow
    from pki.store.models_lifecycle import Subscription
    from pki.wiring import build_context

    ctx = build_context(_settings(home, db_url), keystore=SoftKeyStore())
    now = utcnow()
    rnd = random.Random(42)
    t0 = time.perf_counter()
    for i in range(0, tenants, 10):  # every tenth tenant subscribes to expiry webhooks
        create_org(ctx.db, f"tenant-{i}", "cpo", [])
    with ctx.db.session() as s:
        s.add_all([Subscription(sub_id=f"sub_{i}", org=f"tenant-{i}", kind="webhook", target="http://127.0.0.1:9/",
                                secret="x" * 32, events=["expiry"], created_at=now) for i in range(0, tenants, 10)])
        s.commit()
    weights = [p[2] for p in PROFILES]
    batch = 50_000
    for start in range(0, n, batch):
        rows = []
        for i in range(start, min(n, start + batch)):
            prof, issuer, _ = rnd.choices(PROFILES, weights)[0]
            na = now + timedelta(seconds=rnd.randint(-30 * 86400, 730 * 86400))
            revoked = rnd.random() < 0.05
            rows.append({"issuer": issuer, "serial": f"{i:032x}", "profile": prof, "subject": f"CN=X{i}",
                         "identifier": f"ID{i}", "tenant": f"tenant-{i % tenants}",
                         "not_before": na - timedelta(days=365), "not_after": na,
                         "status": "revoked" if revoked else "valid", "revoked_at": now - timedelta(days=1) if revoked else None,
                         "revocation_reason": "superseded" if revoked else None,
                         "fingerprint": f"{i:064x}", "der": b"\x30\x00", "created_at": now - timedelta(days=1)})
        _write(ctx, rows)
    elapsed = time.perf_counter() - t0
    # The scans run at this `now` (and one day later): the same alerts whichever tree or scan runs them.
    (home / "bench-now").write_text(now.isoformat())
    with ctx.db.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    ctx.db.dispose()
    return elapsed


def _write(ctx: Any, rows: list[dict[str, Any]]) -> None:
    if ctx.db.is_sqlite:  # plain executemany (the ORM's insertmanyvalues costs 3x here)
        cols = list(rows[0])

        def conv(v: Any) -> Any:
            return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v

        with ctx.db.engine.begin() as conn:
            conn.exec_driver_sql(f"INSERT INTO certificate ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                 [tuple(conv(r[c]) for c in cols) for r in rows])
    else:  # COPY: the fast bulk path of PostgreSQL
        raw = ctx.db.engine.raw_connection()
        try:
            cols = list(rows[0])
            with raw.cursor() as cur, cur.copy(f"COPY certificate ({', '.join(cols)}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row([r[c] for c in cols])
            raw.commit()
        finally:
            raw.close()


def a_day_passes(ctx: Any, now: datetime, tenants: int) -> tuple[int, int]:
    """N/1000 certificates issued (created now), N/10,000 revoked: a day of a fleet's changes."""
    from sqlalchemy import text

    from pki.store.db import utcnow

    with ctx.db.engine.connect() as conn:
        n = int(conn.execute(text("SELECT count(*) FROM certificate")).scalar_one())
    rnd = random.Random(7)
    weights = [p[2] for p in PROFILES]
    real = utcnow()
    rows = []
    for i in range(max(1, n // 1000)):
        prof, issuer, _ = rnd.choices(PROFILES, weights)[0]
        na = now + timedelta(days=1) + timedelta(seconds=rnd.randint(3600, 730 * 86400))
        rows.append({"issuer": issuer, "serial": f"d1{i:030x}", "profile": prof, "subject": f"CN=D{i}",
                     "identifier": f"DAY{i}", "tenant": f"tenant-{i % tenants}",
                     "not_before": na - timedelta(days=365), "not_after": na, "status": "valid", "revoked_at": None,
                     "revocation_reason": None, "fingerprint": f"d1{i:062x}", "der": b"\x30\x00", "created_at": real})
    _write(ctx, rows)
    revoke = max(1, n // 10000)
    with ctx.db.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM certificate WHERE status = 'valid' ORDER BY id LIMIT :k"),
                                          {"k": revoke * 7}) if r[0] % 7 == 0]
        conn.execute(text("UPDATE certificate SET status = 'revoked', revoked_at = :t, revocation_reason = "
                          "'superseded' WHERE id = :i"), [{"t": real, "i": i} for i in ids])
    return len(rows), len(ids)


def plan(ctx: Any) -> list[str]:
    from pki.lifecycle import _groups, candidate_query, lifecycle_of
    from pki.store.db import utcnow

    lc = lifecycle_of(ctx)
    windows, inc, exc = _groups(ctx, lc)[-1]  # the default group: every leaf profile
    now = utcnow()
    out = _plan(ctx, candidate_query(ctx, now, windows, inc, exc))
    try:  # the incremental scan's change queries (#28 item 3), where the tree has them
        from pki.store import lifecycle as store
    except ImportError:
        return out
    if not hasattr(store, "created_query"):
        return out
    for what, stmt in (("created since", store.created_query(now, windows, inc, exc, None, now)),
                       ("no longer replaced", store.unreplaced_query(now, windows, inc, exc, None, now)),
                       ("holds released", store.released_query(0))):
        out += [f"-- incremental: {what}", *_plan(ctx, stmt)]
    return out


def _plan(ctx: Any, stmt: Any) -> list[str]:
    dialect = ctx.db.engine.dialect.name
    prefix = "EXPLAIN QUERY PLAN" if dialect == "sqlite" else "EXPLAIN"
    compiled = stmt.compile(dialect=ctx.db.engine.dialect, compile_kwargs={"render_postcompile": True})
    raw = compiled.construct_params()
    proc = compiled._bind_processors  # the same value conversion the real execution applies

    def value(k: str) -> Any:
        return proc[k](raw[k]) if k in proc else raw[k]

    params: Any = (tuple(value(k) for k in compiled.positiontup or []) if compiled.positional
                   else {k: value(k) for k in raw})
    with ctx.db.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"{prefix} {compiled}", params).all()
    if dialect == "sqlite":
        return [f"{r[0]}|{r[1]}|{r[3]}" for r in rows]
    return [str(r[0]) for r in rows]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def scan_once(home: Path, db_url: str | None, tenants: int = 1000) -> dict[str, Any]:
    """Run in a fresh process: the RSS peak then belongs to the scan alone."""
    from hsm.soft import SoftKeyStore
    from pki.lifecycle import scan_expiring
    from pki.wiring import build_context

    ctx = build_context(_settings(home, db_url), keystore=SoftKeyStore(), migrate=False)
    rss0 = _rss_mib()
    peak = [rss0]
    done = threading.Event()

    def sample() -> None:  # current RSS every 20 ms: ru_maxrss would report the import-time high-water mark
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mib())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    from pki.store.db import utcnow

    mark = home / "bench-now"  # absent in a bench/fleet.py home: its fleet is measured at the current time
    now = datetime.fromisoformat(mark.read_text()) if mark.exists() else utcnow()
    t0 = time.perf_counter()
    res = scan_expiring(ctx, now)
    t1 = time.perf_counter()
    done.set()
    th.join()
    rss1 = max(peak[0], _rss_mib())
    t2 = time.perf_counter()
    res2 = scan_expiring(ctx, now)
    t3 = time.perf_counter()
    out = {"rescan_full": getattr(res2, "full", None), "plan": plan(ctx)}
    if mark.exists():  # not in a bench/fleet.py fleet: its later measurements must see only its own rows
        issued, revoked = a_day_passes(ctx, now, tenants)
        t4 = time.perf_counter()
        res3 = scan_expiring(ctx, now + timedelta(days=1))
        t5 = time.perf_counter()
        out |= {"nextday_seconds": round(t5 - t4, 2), "nextday_alerts": res3.alerts, "nextday_issued": issued,
                "nextday_revoked": revoked, "nextday_full": getattr(res3, "full", None)}
    return out | {"seconds": round(t1 - t0, 2), "alerts": res.alerts, "batches": res.batches,
                  "deliveries": len(res.deliveries), "peak_rss_mib": round(rss1, 1),
                  "rss_before_mib": round(rss0, 1), "rss_growth_mib": round(rss1 - rss0, 1),
                  "rescan_seconds": round(t3 - t2, 2), "rescan_alerts": res2.alerts}


def _scan_copy(name: str, home: Path, db_url: str | None, tenants: int, code: Path) -> dict[str, Any]:
    """One scan sequence with ``code``'s pki/ on a fresh copy of the populated database."""
    import shutil

    copy = Path(tempfile.mkdtemp(prefix=f"v2gpki-bench-{name}-copy-"))
    shutil.rmtree(copy)
    shutil.copytree(home, copy)
    url, dbname = db_url, None
    if db_url:
        import psycopg

        admin, master = db_url.rsplit("/", 1)
        dbname = f"{master}_c{secrets.token_hex(3)}"
        with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}" TEMPLATE "{master}"')
        url = f"{admin}/{dbname}"
    try:
        out = subprocess.run([sys.executable, __file__, "--scan-only", str(copy), "--db", url or "",
                              "--tenants", str(tenants), "--code", str(code)],
                             capture_output=True, text=True, check=True, cwd=code)
        res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return res
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        if dbname:
            import psycopg

            with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def run_backend(name: str, n: int, tenants: int, pg_admin: str | None, reference: Path | None = None,
                rounds: int = 2) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"v2gpki-bench-{name}-"))
    db_url, dbname = None, None
    if name == "postgresql":
        import psycopg

        assert pg_admin
        dbname = f"v2gpki_bench_{secrets.token_hex(4)}"
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        db_url = f"{pg_admin.rsplit('/', 1)[0]}/{dbname}"
    try:
        ins = populate(home, db_url, n, tenants)
        if reference is not None:
            runs: dict[str, list[dict[str, Any]]] = {"reference": [], "this": []}
            for i in range(rounds):  # alternating, so both trees see the same drift of the machine's load
                order = [("reference", reference), ("this", REPO)]
                for label, code in (order if i % 2 == 0 else order[::-1]):
                    runs[label].append(_scan_copy(name, home, db_url, tenants, code))
                    runs[label][-1]["load1"] = os.getloadavg()[0]
            return {"insert_seconds": round(ins, 1), "runs": runs}
        out = subprocess.run([sys.executable, __file__, "--scan-only", str(home), "--db", db_url or "",
                              "--tenants", str(tenants)],
                             capture_output=True, text=True, check=True, cwd=REPO)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["insert_seconds"] = round(ins, 1)
        return res
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)  # a SQLite file of ~0.9 GB at 10^6
        if dbname:
            import psycopg

            with psycopg.connect(pg_admin or "", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def side_by_side(backend: str, n: int, r: dict[str, Any], reference: Path) -> None:
    import statistics

    ref, this = r["runs"]["reference"], r["runs"]["this"]
    print(f"\n== {backend}: {n:,} certificates (bulk insert {r['insert_seconds']} s, once); reference "
          f"{reference} vs this tree, {len(this)} alternated runs each, medians ==")
    print(f"{'figure':<44}{'reference':>12}{'this':>12}{'this/ref':>10}")
    for key, what in (("seconds", "first scan s"), ("rescan_seconds", "re-scan at once s"),
                      ("nextday_seconds", "next day's scan s"), ("alerts", "first scan: alerts"),
                      ("rescan_alerts", "re-scan: alerts"), ("nextday_alerts", "next day: alerts"),
                      ("peak_rss_mib", "peak RSS MiB")):
        a_, b_ = statistics.median(x[key] for x in ref), statistics.median(x[key] for x in this)
        print(f"{what:<44}{a_:>12,.2f}{b_:>12,.2f}{(b_ / a_ if a_ else float('nan')):>10.2f}")
    print("runs (first / re-scan / next day s, load1):")
    for label, runs in (("reference", ref), ("this", this)):
        print(f"  {label:<10}", "; ".join(f"{x['seconds']} / {x['rescan_seconds']} / {x['nextday_seconds']} "
                                         f"({x['load1']:.1f})" for x in runs))
    print(f"this tree: re-scan {'full' if this[0].get('rescan_full') else 'incremental'}, next day "
          f"{'full' if this[0].get('nextday_full') else 'incremental'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="certificates (default 1,000,000)")
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--pg", default=os.environ.get("V2GPKI_TEST_PG_ADMIN_URL"),
                    help="PostgreSQL admin URL (a scratch database is created and dropped)")
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--json", help="write every backend's figures to this file")
    ap.add_argument("--reference-tree", type=Path, help="another worktree: its pki/ measured beside this one")
    ap.add_argument("--rounds", type=int, default=2, help="alternations with --reference-tree (default 2)")
    ap.add_argument("--scan-only", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.scan_only:
        if a.code:  # the tree whose pki/ is measured (--reference-tree): ahead of this one on the path
            sys.path.insert(0, str(Path(a.code).resolve()))
        print(json.dumps(scan_once(Path(a.scan_only), a.db or None, a.tenants)))
        return 0
    backends = ["sqlite", "postgresql"] if a.backend == "both" else [a.backend]
    if "postgresql" in backends and not a.pg:
        print("no PostgreSQL URL (--pg or V2GPKI_TEST_PG_ADMIN_URL): SQLite only", file=sys.stderr)
        backends.remove("postgresql")
    results: dict[str, Any] = {}
    for b in backends:
        r = results[b] = run_backend(b, a.n, a.tenants, a.pg, a.reference_tree, a.rounds)
        if a.json:
            Path(a.json).write_text(json.dumps({"certificates": a.n, **results}, indent=1))
        if a.reference_tree is not None:
            side_by_side(b, a.n, r, a.reference_tree)
            continue
        print(f"\n== {b}: one expiry scan over {a.n:,} certificates ==")
        print(f"bulk insert {r['insert_seconds']} s; scan {r['seconds']} s -> {r['alerts']:,} alerts in "
              f"{r['batches']:,} tenant batches, {r['deliveries']:,} webhook deliveries queued")
        print(f"peak RSS {r['peak_rss_mib']} MiB ({r['rss_before_mib']} MiB before the scan: imports, policies; "
              f"+{r['rss_growth_mib']} MiB during it)")
        kind = {None: "", True: " (full)", False: " (incremental)"}
        print(f"steady state: re-scan {r['rescan_seconds']} s{kind[r['rescan_full']]}, {r['rescan_alerts']} new alerts")
        print(f"next day ({r['nextday_issued']:,} issued, {r['nextday_revoked']:,} revoked meanwhile): scan "
              f"{r['nextday_seconds']} s{kind[r['nextday_full']]}, {r['nextday_alerts']:,} new alerts")
        print("candidate query plan (default window group):")
        for line in r["plan"]:
            print("   ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
