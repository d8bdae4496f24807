"""Benchmark: one expiry scan (pki.lifecycle.scan_expiring) over N certificates, on SQLite and PostgreSQL.

Bulk-inserts N synthetic certificate rows (notAfter spread over [-30, +730] days, 5 % revoked, 1000
tenants, a subscription for every tenth), then runs ONE scan in a fresh process and reports wall time,
peak RSS of that process (before and during the scan), the alerts and notifications written, and the query
plan of the candidate query (EXPLAIN QUERY PLAN / EXPLAIN) to show the (not_after, status) index at work.
A second scan (nothing new to alert) is timed too: that is the steady-state hourly cost.

    .venv/bin/python bench/expiry.py --n 1000000                      # SQLite (default)
    .venv/bin/python bench/expiry.py --n 1000000 --pg postgresql://…  # or V2GPKI_TEST_PG_ADMIN_URL
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
                         "status": "revoked" if revoked else "valid", "revoked_at": now if revoked else None,
                         "revocation_reason": "superseded" if revoked else None,
                         "fingerprint": f"{i:064x}", "der": b"\x30\x00", "created_at": now})
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
    elapsed = time.perf_counter() - t0
    with ctx.db.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    ctx.db.dispose()
    return elapsed


def plan(ctx: Any) -> list[str]:
    from pki.lifecycle import _groups, candidate_query, lifecycle_of
    from pki.store.db import utcnow

    lc = lifecycle_of(ctx)
    windows, inc, exc = _groups(ctx, lc)[-1]  # the default group: every leaf profile
    stmt = candidate_query(ctx, utcnow(), windows, inc, exc)
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


def scan_once(home: Path, db_url: str | None) -> dict[str, Any]:
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
    t0 = time.perf_counter()
    res = scan_expiring(ctx)
    t1 = time.perf_counter()
    done.set()
    th.join()
    rss1 = max(peak[0], _rss_mib())
    t2 = time.perf_counter()
    res2 = scan_expiring(ctx)
    t3 = time.perf_counter()
    return {"seconds": round(t1 - t0, 2), "alerts": res.alerts, "batches": res.batches,
            "deliveries": len(res.deliveries), "peak_rss_mib": round(rss1, 1),
            "rss_before_mib": round(rss0, 1), "rss_growth_mib": round(rss1 - rss0, 1),
            "rescan_seconds": round(t3 - t2, 2), "rescan_alerts": res2.alerts, "plan": plan(ctx)}


def run_backend(name: str, n: int, tenants: int, pg_admin: str | None) -> dict[str, Any]:
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
        out = subprocess.run([sys.executable, __file__, "--scan-only", str(home), "--db", db_url or ""],
                             capture_output=True, text=True, check=True, cwd=REPO)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["insert_seconds"] = round(ins, 1)
        return res
    finally:
        if dbname:
            import psycopg

            with psycopg.connect(pg_admin or "", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="certificates (default 1,000,000)")
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--pg", default=os.environ.get("V2GPKI_TEST_PG_ADMIN_URL"),
                    help="PostgreSQL admin URL (a scratch database is created and dropped)")
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--scan-only", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.scan_only:
        print(json.dumps(scan_once(Path(a.scan_only), a.db or None)))
        return 0
    backends = ["sqlite", "postgresql"] if a.backend == "both" else [a.backend]
    if "postgresql" in backends and not a.pg:
        print("no PostgreSQL URL (--pg or V2GPKI_TEST_PG_ADMIN_URL): SQLite only", file=sys.stderr)
        backends.remove("postgresql")
    for b in backends:
        r = run_backend(b, a.n, a.tenants, a.pg)
        print(f"\n== {b}: one expiry scan over {a.n:,} certificates ==")
        print(f"bulk insert {r['insert_seconds']} s; scan {r['seconds']} s -> {r['alerts']:,} alerts in "
              f"{r['batches']:,} tenant batches, {r['deliveries']:,} webhook deliveries queued")
        print(f"peak RSS {r['peak_rss_mib']} MiB ({r['rss_before_mib']} MiB before the scan: imports, policies; "
              f"+{r['rss_growth_mib']} MiB during it)")
        print(f"steady state: re-scan {r['rescan_seconds']} s, {r['rescan_alerts']} new alerts")
        print("candidate query plan (default window group):")
        for line in r["plan"]:
            print("   ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
