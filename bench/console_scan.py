"""Console certificate lists and audit verification at fleet size (#28 item 3), measured in process with the
code of the tree whose interpreter runs this file (run it with another tree's .venv/bin/python to measure
that tree on the same database).

    <tree>/.venv/bin/python bench/console_scan.py --certificates N --events M [--database NAME] [--keep]
                                                  [--json FILE] [--pg-admin-url URL] [--repeat 5]

**Build** (without --database): a scratch PostgreSQL database from $V2GPKI_TEST_PG_ADMIN_URL, migrated by
the running tree; N certificate rows by COPY (30 tenants, 4 issuing CAs and their profiles, 1 % revoked,
notAfter spread over −100…1,400 days, identifiers DE*Ttt*Ennnnnnnn, a 600-byte DER blob each — the rows'
size, not real certificates: the queries are measured, not X.509); M audit events hash-chained with the
tree's own ``chain_hash`` and the head set; then ANALYZE. **With --database NAME**: that database (kept
by an earlier run), migrated to the running tree's head first (a later tree adds its migrations), then
ANALYZE. The database is dropped at the end unless --keep.

**Measure** (median of --repeat runs after one warm-up, ms): ``api.console.data.list_certificates`` (what
a /console/certificates page reads) for the admin and for one tenant (1/30 of the rows): the first page,
a deep page (cursor at the middle id), status=revoked, issuer=mo-sub2, an identifier prefix,
expiring_before = today + 7 days; ``visible_profiles`` (the filter's menu); the audit chain: the whole chain
re-hashed (``verify_chain``, one run after the warm-up) and, where the tree has it, the chain from 1,000 events before the head on
(``verify_chain_from``: an incremental verification's chain part since the last verified checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TENANTS = [f"Org {t:02d}" for t in range(30)]
PROFILES = [("secc", "cpo-sub2"), ("contract", "mo-sub2"), ("oem-prov", "oem-sub2"), ("cs-client", "csms-root")]
NOW = datetime.now(UTC).replace(microsecond=0)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(url: str, n: int, m: int) -> dict[str, float]:
    import psycopg

    from pki.store.audit_log import GENESIS, chain_hash

    out: dict[str, float] = {}
    blob = os.urandom(600)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cols = ("id, issuer, serial, profile, subject, identifier, tenant, not_before, not_after, status, revoked_at, "
                "revocation_reason, fingerprint, der, created_at")
        with cur.copy(f"COPY certificate ({cols}) FROM STDIN") as cp:
            for i in range(1, n + 1):
                t = (i * 7) % len(TENANTS)
                profile, issuer = PROFILES[i % 4]
                revoked = i % 100 == 0
                cp.write_row((i, issuer, f"{i:x}", profile, f"CN=leaf {i}", f"DE*T{t:02d}*E{i:08d}", TENANTS[t],
                              NOW - timedelta(days=30), NOW + timedelta(days=(i * 7919) % 1500 - 100),
                              "revoked" if revoked else "valid", NOW if revoked else None,
                              "keyCompromise" if revoked else None, f"{i:064x}", blob, NOW - timedelta(days=30)))
        cur.execute("SELECT setval(pg_get_serial_sequence('certificate', 'id'), %s)", (n,))
        conn.commit()
        out["certificates_copy_s"] = round(time.perf_counter() - t0, 1)
        say(f"{n:,} certificates in {out['certificates_copy_s']} s")
        t0 = time.perf_counter()
        prev = GENESIS
        with cur.copy("COPY audit_event (id, seq, ts, actor, org, action, object, outcome, details, prev_hash, hash) "
                      "FROM STDIN") as cp:
            for s in range(1, m + 1):
                row = {"seq": s, "ts": NOW - timedelta(seconds=m - s), "actor": "bench", "org": TENANTS[s % 30],
                       "action": "certificate.issue", "object": f"cpo-sub2/{s:x}", "outcome": "success",
                       "details": {"profile": "secc", "serial": f"{s:x}"}}
                h = chain_hash(prev, row)
                cp.write_row((s, s, row["ts"], "bench", row["org"], row["action"], row["object"], "success",
                              json.dumps(row["details"]), prev, h))
                prev = h
        cur.execute("DELETE FROM audit_head")
        cur.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, %s, %s)", (m, prev))
        conn.commit()
        out["events_copy_s"] = round(time.perf_counter() - t0, 1)
        say(f"{m:,} audit events in {out['events_copy_s']} s")
    return out


def timed(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 1)


def measure(url: str, repeat: int) -> dict[str, Any]:
    import api.console.data as data
    from pki.store import audit_log
    from pki.store.db import Database

    db = Database(url)
    ctx = SimpleNamespace(db=db)
    keyset = hasattr(data, "Listing")  # the tree of #28 item 3: string cursors
    with db.engine.connect() as conn:
        mid = conn.exec_driver_sql("SELECT (min(id) + max(id)) / 2 FROM certificate").scalar_one()
        head = conn.exec_driver_sql("SELECT seq FROM audit_head WHERE id = 1").scalar_one()
        at = conn.exec_driver_sql("SELECT hash FROM audit_event WHERE seq = %s" if not db.is_sqlite else
                                  "SELECT hash FROM audit_event WHERE seq = ?", (head - 1000,)).scalar_one()
    soon = (NOW + timedelta(days=7)).date()
    tenant = TENANTS[3]
    pages: dict[str, tuple[dict[str, Any], Any]] = {
        "first page": ({}, None),
        "deep cursor": ({}, str(mid) if keyset else int(mid)),
        "status=revoked": ({"status": "revoked"}, None),
        "issuer=mo-sub2": ({"issuer": "mo-sub2"}, None),
        "identifier prefix": ({"identifier": ""}, None),  # below: another tenant's for the admin, Org 03's
        "expiring_before": ({"expiring_before": soon}, None),
    }
    out: dict[str, Any] = {"tree_keyset": keyset}
    for who, t in (("admin", None), ("tenant", tenant)):
        for label, (crit, cursor) in pages.items():
            crit = dict(crit)
            if "identifier" in crit:  # ids 10,000–19,999 of the tenant: ≈ 333 matches at N = 10⁶
                crit["identifier"] = "DE*T03*E0001" if who == "tenant" else "DE*T21*E0001"
            f = data.CertFilter(**crit)
            out[f"{who}: {label}"] = timed(lambda f=f, cursor=cursor, t=t: data.list_certificates(
                ctx, t, f, cursor=cursor, limit=50), repeat)
        out[f"{who}: profile menu"] = timed(lambda t=t: data.visible_profiles(ctx, t), repeat)
        say(f"{who}: " + ", ".join(f"{k.split(': ')[1]} {v}" for k, v in out.items() if k.startswith(who)))

    def full() -> None:
        with db.session() as s:
            assert audit_log.verify_chain(s).ok

    out["audit: whole chain re-hashed"] = timed(full, 1)  # seconds at 10⁶ events: one run after the warm-up
    if hasattr(audit_log, "verify_chain_from"):
        def incremental() -> None:
            with db.session() as s:
                res = audit_log.verify_chain_from(s, head - 1000, at)
                assert res is not None and res.ok

        out["audit: chain from 1,000 events before the head"] = timed(incremental, repeat)
    say("audit: " + ", ".join(f"{k.split(': ')[1]} {v}" for k, v in out.items() if k.startswith("audit")))
    db.dispose()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--certificates", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--database", help="measure this database (kept by an earlier run) instead of building one")
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pg-admin-url", default=os.environ.get("V2GPKI_TEST_PG_ADMIN_URL"))
    args = ap.parse_args()
    if not args.pg_admin_url:
        print("bench/console_scan.py: PostgreSQL admin URL needed (--pg-admin-url or V2GPKI_TEST_PG_ADMIN_URL)",
              file=sys.stderr)
        return 2
    import psycopg

    from pki.store.db import Database

    name = args.database or f"v2gpki_scan_{secrets.token_hex(4)}"
    if not args.database:
        with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{args.pg_admin_url.rsplit('/', 1)[0]}/{name}"
    result: dict[str, Any] = {"date": date.today().isoformat(), "database": name, "load_before": os.getloadavg()}
    try:
        db = Database(url)
        t0 = time.perf_counter()
        db.migrate()
        result["migrate_s"] = round(time.perf_counter() - t0, 1)
        if not args.database:
            result["build"] = build(url, args.certificates, args.events)
        with db.autocommit.connect() as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
        db.dispose()
        say(f"database {name} migrated ({result['migrate_s']} s) and analysed; load {os.getloadavg()[0]:.1f}")
        result.update(measure(url, args.repeat))
        result["load_after"] = os.getloadavg()
    finally:
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        if not args.keep:
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
