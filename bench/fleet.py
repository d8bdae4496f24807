"""Fleet scale (#28): an N-certificate PostgreSQL database, measured with the service's own processes.

    .venv/bin/python bench/fleet.py --certificates N [--json FILE] [--pg-admin-url URL]
                                    [--build-procs 2] [--duration 10] [--reference FILE.json] [--keep]

**Build** (a scratch database created from $V2GPKI_TEST_PG_ADMIN_URL / --pg-admin-url, dropped at the end
unless --keep). `v2gpki init` makes the default hierarchy (pki/policies/hierarchy.yaml) in a fresh SoftHSM2
token, with every CA's delegated OCSP signer; 30 tenant organizations are created with pki.orgs. Then
--build-procs processes (spawned; each its own Context, token session and database connection) make the
leaves, 40 % SECC (cpo-sub2, 90 days), 30 % contract (mo-sub2, 730 days), 20 % OEM provisioning
(oem-sub2, 1461 days), 10 % charging-station client (csms-root, 365 days):

* each leaf's TBS comes from the CA engine's own `Engine._prepare` (profile, issuer, serial, backdated
  notBefore, notAfter capped by `IssueRequest.not_after` to a uniform draw over the profile's validity:
  the spread of expiry dates; TBS template of pki/tbs.py), is signed by the issuing CA's key **in the HSM
  through the key store** (`Engine.ca_signer`, CKM_ECDSA) and assembled by `assemble_certificate`, as
  `Engine._issue_prepared` does; subject public keys come from a pool of 64 P-256 keys per process
  (SPKIs of the same size as distinct keys; generating 10^7 keys would measure OpenSSL, not the PKI);
* 1 % (a seeded draw) are revoked (keyCompromise / superseded / cessationOfOperation, revoked within
  the last hour), as `Engine.revoke` leaves the row;
* each leaf's OCSP response is pre-signed by the CA's delegated OCSP signer **in the HSM** through
  pki/ocsp/'s own `OcspResponder._sign_one` over `certid_der("sha1", …)` — the row `_store` writes;
* rows go in by COPY, 2,000 leaves per transaction: `certificate`, `issuance_intent` (state `issued`) and
  `ocsp_response`, with every column as the engine and the responder write them. Not written: the
  per-certificate `certificate.issue` audit events (a hash chain, extended one at a time by the
  server function); the bulk-revocation drill below measures what those rows weigh.
* the non-unique indexes of those three tables are dropped before the COPY and re-created after it from
  their own definitions (pg_indexes), then VACUUM ANALYZE — the state autovacuum keeps.

**Measure** (each with the service's processes, on loopback):

* OCSP: `v2gpki ocsp-serve --workers 2` (api/ocsp_fast.py). start-up = spawn to the first /healthz 200;
  load = wrk (apt), c = 32, 2 threads, POSTs of RFC 5019 SHA-1 CertID requests over a Zipf (s = 1) mix of
  all leaves (rank = ⌊(N + 1)^u⌋, ranks mapped to leaves by a fixed permutation; 200,000 requests cycled),
  --duration s keep-alive after a warm-up of --warmup s (default the same), then --duration s with a new connection per
  request; requests/s, p50, p99; each worker's VmRSS and VmHWM after the runs; answers spot-checked
  (status, signature by the delegated signer);
* expiry: one `pki.lifecycle.scan_expiring` in a fresh process (bench/expiry.py --scan-only), and the
  re-scan (steady state);
* CRL: `pki.crl.generate_crl` for each issuing CA that has leaves, in a fresh process;
* console: `v2gpki serve --workers 1`, signed in with an admin API key (and a tenant's), the certificate
  list pages (first, deep cursor, filters) — median of 3 fetches;
* compromise drill: `v2gpki revoke-bulk --issuer csms-root` (dry run, then --yes: N/10 leaves) while
  the responder runs; 500 of those leaves, cached by the responder before, are polled until every one is
  answered `revoked`: ocsp_revoked_after_s is counted from the drill command's return.

--json writes {"certificates", "ocsp": {"rps", "p50_ms", "p99_ms", "rss_mb_per_worker", "startup_s"},
"expiry_scan_s", "crl_s", "bulk_revoke": {"certificates", "seconds", "ocsp_revoked_after_s"}} plus the
details (new-connection figures, build, sizes, console, per-CA CRLs). --reference FILE (the JSON of a
run at 10^4) prints this run's figures as ratios to it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXE = str(Path(sys.executable).parent / "v2gpki")
PIN = "fleet-pin-1234"
CHUNK = 2000
# (profile, issuing CA, share, tenant role)
MIX = [("secc", "cpo-sub2", 0.4, "cpo"), ("contract", "mo-sub2", 0.3, "emsp"),
       ("oem-prov", "oem-sub2", 0.2, "oem"), ("cs-client", "csms-root", 0.1, "cpo")]
DRILL_CA = "csms-root"
TABLES = ("certificate", "issuance_intent", "ocsp_response")
REASONS = ("keyCompromise", "superseded", "cessationOfOperation")

WRK_LUA = r"""
local bodies, count, idx, hdr = {}, 0, 0, nil
function init(args)
  local f = assert(io.open(args[1], "rb")); local data = f:read("*a"); f:close()
  local pos = 1
  while pos <= #data do
    local len = data:byte(pos) * 256 + data:byte(pos + 1)
    count = count + 1; bodies[count] = data:sub(pos + 2, pos + 1 + len); pos = pos + 2 + len
  end
  idx = math.random(count)
  hdr = {["Host"] = "127.0.0.1", ["Content-Type"] = "application/ocsp-request"}
  if args[2] == "close" then hdr["Connection"] = "close" end
end
function request()
  idx = idx + 1; if idx > count then idx = 1 end
  return wrk.format("POST", "/ocsp", hdr, bodies[idx])
end
function done(summary, latency, requests)
  io.write(string.format('FLEETJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout))
end
"""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- build -------------------------------------------------------------------------------------------------


def _tenant(role: str, k: int) -> str:
    return f"fleet-{role}-{k}"


def _subject(profile: str, i: int) -> tuple[Any, str]:
    from pki.csr import SubjectFields

    if profile == "secc":
        cn = f"DE*FLT*E{i:09X}"
        return SubjectFields(cn=cn, o="Fleet CPO", c="DE", dc="CPO"), cn
    if profile == "contract":
        cn = f"DEFLT{i:09X}"
        return SubjectFields(cn=cn, o="Fleet eMSP", c="DE", dc="MO"), cn
    if profile == "oem-prov":
        cn = f"FLTOEM{i:012X}"
        return SubjectFields(cn=cn, o="Fleet OEM", c="DE", dc="OEM"), cn
    cn = f"CS{i:010X}"
    return SubjectFields(cn=cn, o="Fleet CPO", c="DE", dc=None), cn


def build_worker(env: dict[str, str], start: int, stop: int, seed: int, q: Any) -> None:
    """Make leaves start..stop-1 (see the module docstring) and COPY them in; progress counts on q."""
    os.environ.update(env)
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ec

    from hsm.algorithms import ALGORITHMS
    from pki.config import Settings
    from pki.issuance import IssueRequest, assemble_certificate
    from pki.ocsp import certid_der, responder_for
    from pki.serials import to_hex
    from pki.store.db import utcnow
    from pki.wiring import build_context

    ctx = build_context(Settings(), migrate=False)
    eng = ctx.engine
    resp = responder_for(ctx)
    rng = random.Random(seed)
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(64)]
    signers = {ca: eng.ca_signer(eng.ca(ca)) for _, ca, _, _ in MIX}
    issuers = {ca: resp.issuer(ca) for _, ca, _, _ in MIX}
    hashes = {ca: iss.hashes["sha1"] for ca, iss in issuers.items() if iss is not None}
    validity = {p: eng.profiles.get(p).validity_days for p, _, _, _ in MIX}
    weights = [m[2] for m in MIX]
    raw: Any = ctx.db.engine.raw_connection()
    cert_cols = ("issuer, serial, profile, subject, identifier, tenant, not_before, not_after, status, revoked_at, "
                 "revocation_reason, key_uri, fingerprint, der, created_at")
    intent_cols = "issuer, serial, profile, subject, tbs_sha256, state, error, created_at, completed_at"
    resp_cols = "issuer, serial, hash_alg, status, this_update, next_update, der"
    try:
        for lo in range(start, stop, CHUNK):
            hi = min(stop, lo + CHUNK)
            now = utcnow()
            certs, intents, resps = [], [], []
            for i in range(lo, hi):
                profile, ca, _, role = rng.choices(MIX, weights)[0]
                subject, cn = _subject(profile, i)
                cap = now + timedelta(seconds=rng.randint(86_400, validity[profile] * 86_400))
                req = IssueRequest(profile=profile, public_key=keys[i % len(keys)], subject=subject, identifier=cn,
                                   ca=ca, tenant=_tenant(role, i % 10), not_after=cap)
                p = eng._prepare(req)
                sig = ALGORITHMS[p.alg].sign(signers[ca], p.tbs)
                der = assemble_certificate(p.tbs, p.sig_alg_der, sig)
                serial = to_hex(p.serial)
                not_before = now - timedelta(seconds=p.profile.not_before_margin_seconds)
                not_before = max(not_before, eng.ca(ca).cert.not_valid_before_utc).replace(microsecond=0)
                not_after = min(not_before + timedelta(days=validity[profile]), cap.replace(microsecond=0),
                                eng.ca(ca).cert.not_valid_after_utc)
                revoked = rng.random() < 0.01
                revoked_at = now - timedelta(seconds=rng.randint(1, 3600)) if revoked else None
                reason = rng.choice(REASONS) if revoked else None
                done = utcnow()
                certs.append((ca, serial, profile, p.subject, cn, req.tenant, not_before, not_after,
                              "revoked" if revoked else "valid", revoked_at, reason, None,
                              hashlib.sha256(der).hexdigest(), der, done))
                intents.append((ca, serial, profile, p.subject, p.tbs_sha256, "issued", None, now, done))
                iss = issuers[ca]
                assert iss is not None
                nh, kh = hashes[ca]
                rder, this, nxt = resp._sign_one(iss, certid_der("sha1", nh, kh, p.serial),
                                                 "revoked" if revoked else "good", revoked_at, reason)
                resps.append((ca, serial, "sha1", "revoked" if revoked else "good", this, nxt, rder))
            with raw.cursor() as cur:
                for table, cols, rows in (("certificate", cert_cols, certs), ("issuance_intent", intent_cols, intents),
                                          ("ocsp_response", resp_cols, resps)):
                    with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as cp:
                        for r in rows:
                            cp.write_row(r)
            raw.commit()
            q.put(hi - lo)
    finally:
        raw.close()
        ctx.db.dispose()


def build(n: int, env: dict[str, str], db_url: str, procs: int) -> dict[str, Any]:
    import psycopg

    from pki.config import Settings
    from pki.orgs import create_org
    from pki.wiring import build_context

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    subprocess.run([EXE, "init"], env=env, check=True, cwd=REPO, capture_output=True)
    ctx = build_context(Settings(), migrate=False)
    for role in ("cpo", "emsp", "oem"):
        for k in range(10):
            create_org(ctx.db, _tenant(role, k), role, [])
    ctx.db.dispose()
    out["init_s"] = round(time.perf_counter() - t0, 1)
    say(f"init (default hierarchy, {out['init_s']} s); dropping the non-unique indexes of {', '.join(TABLES)}")
    pg = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(pg, autocommit=True) as conn:
        idx = conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
            "JOIN pg_index x ON x.indexrelid = c.oid WHERE i.schemaname = 'public' AND i.tablename = ANY(%s) "
            "AND NOT x.indisunique AND NOT x.indisprimary", (list(TABLES),)).fetchall()
        for name, _ in idx:
            conn.execute(f'DROP INDEX "{name}"')
    t1 = time.perf_counter()
    q: Any = mp.get_context("spawn").Queue()
    per = math.ceil(n / procs)
    ps = [mp.get_context("spawn").Process(target=build_worker, args=(env, k * per, min(n, (k + 1) * per), 1000 + k, q))
          for k in range(procs) if k * per < n]
    for p in ps:
        p.start()
    made, last = 0, time.monotonic()
    while made < n:
        try:
            made += q.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty: check the workers are alive
            if any(p.exitcode not in (None, 0) for p in ps):
                raise RuntimeError("a build process failed") from None
        if time.monotonic() - last > 30:
            el = time.perf_counter() - t1
            say(f"  {made:,} / {n:,} leaves, {made / el:,.0f}/s, ETA {(n - made) / max(1, made / el):,.0f} s")
            last = time.monotonic()
    for p in ps:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError("a build process failed")
    out["leaves_s"] = round(time.perf_counter() - t1, 1)
    out["leaves_per_s"] = round(n / out["leaves_s"])
    say(f"{n:,} leaves + pre-signed responses in {out['leaves_s']} s ({out['leaves_per_s']:,}/s, {procs} processes)")
    t2 = time.perf_counter()
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _, ddl in idx:
            conn.execute(ddl)
        out["index_s"] = round(time.perf_counter() - t2, 1)
        t3 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        out["vacuum_analyze_s"] = round(time.perf_counter() - t3, 1)
        out["database_bytes"] = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]  # type: ignore[index]
        out["tables"] = {t: {"rows": conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0],  # type: ignore[index]
                             "heap_bytes": conn.execute("SELECT pg_table_size(%s)", (t,)).fetchone()[0],  # type: ignore[index]
                             "index_bytes": conn.execute("SELECT pg_indexes_size(%s)", (t,)).fetchone()[0]}  # type: ignore[index]
                         for t in TABLES}
    say(f"indexes re-created in {out['index_s']} s, VACUUM ANALYZE {out['vacuum_analyze_s']} s; database "
        f"{out['database_bytes'] / 2**20:,.0f} MiB")
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


# -- OCSP --------------------------------------------------------------------------------------------------


def _issuer_hashes(ctx: Any) -> dict[str, tuple[bytes, bytes]]:
    from pki.ocsp import responder_for

    resp = responder_for(ctx)
    out = {}
    for _, ca, _, _ in MIX:
        iss = resp.issuer(ca)
        assert iss is not None
        out[ca] = iss.hashes["sha1"]
    return out


def ocsp_request(nh: bytes, kh: bytes, serial: int) -> bytes:
    from pki.ocsp import certid_der, seq

    return seq(seq(seq(seq(certid_der("sha1", nh, kh, serial)))))  # OCSPRequest{TBSRequest{requestList{Request}}}


def zipf_requests(ctx: Any, n_leaves: int, count: int, path: Path) -> dict[str, Any]:
    """`count` requests over a Zipf (s = 1) mix of the leaves, written length-prefixed for the wrk script."""
    from sqlalchemy import text

    rng = random.Random(5)
    with ctx.db.engine.connect() as conn:
        lo, hi = conn.execute(text("SELECT min(id), max(id) FROM certificate WHERE profile = ANY(:p)"),
                              {"p": [m[0] for m in MIX]}).one()
    span = hi - lo + 1
    a = 2_654_435_761 % span or 1
    while math.gcd(a, span) != 1:
        a += 1
    ranks = [min(n_leaves, int((n_leaves + 1) ** rng.random())) for _ in range(count)]
    ids = [lo + (a * (r - 1) + 12_345) % span for r in ranks]
    uniq = sorted(set(ids))
    rows: dict[int, tuple[str, str, str]] = {}
    with ctx.db.engine.connect() as conn:
        for k in range(0, len(uniq), 20_000):
            for r in conn.execute(text("SELECT id, issuer, serial, status FROM certificate WHERE id = ANY(:ids)"),
                                  {"ids": uniq[k:k + 20_000]}):
                rows[r[0]] = (r[1], r[2], r[3])
    hashes = _issuer_hashes(ctx)
    with path.open("wb") as f:
        for i in ids:
            if i in rows:
                issuer, serial, _ = rows[i]
                body = ocsp_request(*hashes[issuer], int(serial, 16))
                f.write(len(body).to_bytes(2, "big") + body)
    top = sum(1 for r in ranks if r <= 100_000) / count
    return {"requests": count, "distinct": len(uniq), "share_in_top_100k": round(top, 3),
            "sample": [rows[i] for i in uniq[:50] if i in rows]}


def wrk(port: int, script: Path, bodies: Path, seconds: int, close: bool) -> dict[str, float]:
    cmd = ["wrk", "-t", "2", "-c", "32", "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script),
           f"http://127.0.0.1:{port}/ocsp", "--", str(bodies), "close" if close else "keep"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"FLEETJSON (\{.*\})", res.stdout)
    if not m:
        raise RuntimeError(f"wrk: {res.stdout[-800:]} {res.stderr[-800:]}")
    d = json.loads(m.group(1))
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return {"rps": round(d["requests"] / (d["duration_us"] / 1e6)), "p50_ms": round(d["p50_us"] / 1000, 3),
            "p99_ms": round(d["p99_us"] / 1000, 3), "errors": errors, "load": round(os.getloadavg()[0], 1)}


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group (the responder's
    own cost per request, whatever else the machine is doing)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def counters(port: int) -> tuple[int, int]:
    """(answers from the cache, answers from pki/ocsp/) of the worker that answers /healthz; summed
    over a few requests, which land on either worker."""
    import httpx

    seen: dict[int, tuple[int, int]] = {}
    for _ in range(200):  # until both workers answered (a new connection lands on either)
        h = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        seen[int(h["pid"])] = (h.get("fast", 0), h.get("fallback", 0))
        if len(seen) >= 2:
            break
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


def measured_wrk(pgid: int, port: int, script: Path, bodies: Path, seconds: int, close: bool) -> dict[str, float]:
    """wrk, plus the responder processes' CPU per request and the share of answers from pki/ocsp/."""
    f0, b0 = counters(port)
    cpu0 = group_cpu(pgid)
    r = wrk(port, script, bodies, seconds, close)
    cpu = group_cpu(pgid) - cpu0
    f1, b1 = counters(port)
    n = r["rps"] * seconds
    r["server_cpu_us_per_req"] = round(cpu / n * 1e6, 1) if n else 0.0
    r["fallback_share"] = round((b1 - b0) / max(1, (f1 - f0) + (b1 - b0)), 4)
    return r


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def mem_mb(pid: int) -> dict[str, float]:
    st = Path(f"/proc/{pid}/status").read_text()
    return {k: round(int(re.search(rf"{k}:\s+(\d+) kB", st).group(1)) / 1024, 1)  # type: ignore[union-attr]
            for k in ("VmRSS", "VmHWM")}


def start_ocsp(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int, float]:
    import httpx

    port = free_port()
    fh = log.open("ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([EXE, "ocsp-serve", "--port", str(port), "--workers", "2"], env=env, cwd=REPO,
                            stdout=fh, stderr=fh, process_group=0)
    fh.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ocsp-serve exited:\n" + log.read_text()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, port, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError("ocsp-serve did not answer /healthz")


def all_workers_ready(port: int, workers: int, t0: float, timeout: float = 60) -> float | None:
    """Seconds from ``t0`` until /healthz was answered by ``workers`` different processes (each worker
    answers once its cache is warm; a new connection lands on whichever worker accepts first)."""
    import httpx

    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids.add(int(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()["pid"]))
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if len(pids) >= workers:
            return time.perf_counter() - t0
        time.sleep(0.005)
    return None


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ocsp_status(port: int, body: bytes, client: Any) -> str:
    from cryptography.x509 import ocsp

    r = client.post(f"http://127.0.0.1:{port}/ocsp", content=body,
                    headers={"Content-Type": "application/ocsp-request"})
    o = ocsp.load_der_ocsp_response(r.content)
    if o.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return o.response_status.name
    return o.certificate_status.name


def check_answers(port: int, sample: list[tuple[str, str, str]], hashes: dict[str, tuple[bytes, bytes]],
                  ctx: Any) -> int:
    """The responder's answers match the database's status, and verify under the delegated signer."""
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import load_der_x509_certificate, ocsp

    want = {"valid": "GOOD", "revoked": "REVOKED"}
    with httpx.Client(timeout=30) as c:
        for issuer, serial, status in sample:
            r = c.post(f"http://127.0.0.1:{port}/ocsp", content=ocsp_request(*hashes[issuer], int(serial, 16)))
            o = ocsp.load_der_ocsp_response(r.content)
            if o.certificate_status.name != want[status]:
                raise RuntimeError(f"{issuer}/{serial}: answered {o.certificate_status.name}, database {status}")
            signer = load_der_x509_certificate(o.certificates[0].public_bytes(__import__("cryptography").hazmat.
                                                                              primitives.serialization.Encoding.DER))
            key = signer.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(o.signature, o.tbs_response_bytes, ec.ECDSA(o.signature_hash_algorithm))  # type: ignore[arg-type]
            if signer.issuer != ctx.engine.ca(issuer).cert.subject:
                raise RuntimeError("the response's signer is not a delegated signer of the issuer")
    return len(sample)


# -- the other measurements -----------------------------------------------------------------------------------


def expiry_scan(env: dict[str, str], home: Path, db_url: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, str(REPO / "bench" / "expiry.py"), "--scan-only", str(home), "--db", db_url],
                         capture_output=True, text=True, env=env, cwd=REPO, check=True)
    d: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return d


def child_crl() -> int:
    from pki.config import Settings
    from pki.crl import generate_crl
    from pki.wiring import build_context

    ctx = build_context(Settings(), migrate=False)
    out = {}
    for _, ca, _, _ in MIX:
        ctx.engine.ca_signer(ctx.engine.ca(ca)).public_key()  # open the token before timing
        t0 = time.perf_counter()
        info = generate_crl(ctx, ca)
        out[ca] = {"seconds": round(time.perf_counter() - t0, 3), "entries": info.entries, "bytes": info.size}
    print(json.dumps(out))
    return 0


def console(env: dict[str, str], work: Path, ctx: Any) -> dict[str, Any]:
    import httpx
    from sqlalchemy import text

    from pki.orgs import create_api_key, create_org

    create_org(ctx.db, "fleet-admin", "admin", [])
    admin_key, _ = create_api_key(ctx.db, "fleet-admin")
    tenant_key, _ = create_api_key(ctx.db, _tenant("cpo", 3))
    with ctx.db.engine.connect() as conn:
        mid = conn.execute(text("SELECT (min(id) + max(id)) / 2 FROM certificate")).scalar_one()
    port = free_port()
    log = (work / "serve.log").open("ab")
    # httpx sends no Secure cookie over plain http (a browser does, to 127.0.0.1)
    proc = subprocess.Popen([EXE, "serve", "--port", str(port), "--workers", "1", "--log-level", "warning"],
                            env={**env, "V2GPKI_CONSOLE_INSECURE_COOKIES": "1"}, cwd=REPO, stdout=log, stderr=log, process_group=0)
    log.close()
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("v2gpki serve did not start:\n" + (work / "serve.log").read_text()[-2000:])
            time.sleep(0.1)
        pages = {"first page": "/console/certificates", "deep cursor": f"/console/certificates?cursor={mid}",
                 "status=revoked": "/console/certificates?status=revoked",
                 "issuer=mo-sub2": "/console/certificates?issuer=mo-sub2",
                 "identifier prefix": "/console/certificates?identifier=DEFLT0000",
                 "expiring_before": "/console/certificates?expiring_before="
                                    + (datetime.now(UTC) + timedelta(days=7)).date().isoformat()}
        for who, key in (("admin", admin_key), ("tenant", tenant_key)):
            with httpx.Client(base_url=base, timeout=120, follow_redirects=False) as c:
                r = c.get("/console/login")
                csrf = re.search(r'name="csrf" value="([^"]+)"', r.text)
                assert csrf, r.text[:500]
                r = c.post("/console/login", data={"csrf": csrf.group(1), "api_key": key, "method": "apikey",
                                                   "next": "/console"})
                if r.status_code != 303:
                    raise RuntimeError(f"console sign-in: {r.status_code}")
                for label, path in pages.items():
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        r = c.get(path)
                        times.append(time.perf_counter() - t0)
                        if r.status_code != 200:
                            raise RuntimeError(f"{path}: {r.status_code}")
                    out[f"{who}: {label}"] = round(statistics.median(times) * 1000, 1)
    finally:
        stop(proc)
    return out


def drill(env: dict[str, str], port: int, ctx: Any, hashes: dict[str, tuple[bytes, bytes]]) -> dict[str, Any]:
    import httpx
    from sqlalchemy import text

    with ctx.db.engine.connect() as conn:
        sample = [(r[0], r[1]) for r in conn.execute(text(
            "SELECT issuer, serial FROM certificate WHERE issuer = :ca AND profile = 'cs-client' "
            "AND status = 'valid' ORDER BY md5(serial) LIMIT 500"), {"ca": DRILL_CA})]
    bodies = [ocsp_request(*hashes[i], int(s, 16)) for i, s in sample]
    with httpx.Client(timeout=30) as c:
        for b in bodies:  # into the workers' caches (each request lands on either worker)
            for _ in range(2):
                assert ocsp_status(port, b, c) == "GOOD"
    t0 = time.perf_counter()
    dry = subprocess.run([EXE, "revoke-bulk", "--issuer", DRILL_CA], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True)
    dry_s = time.perf_counter() - t0
    count = int(re.search(r"would revoke (\d+)", dry.stdout).group(1))  # type: ignore[union-attr]
    t1 = time.perf_counter()
    run = subprocess.run([EXE, "revoke-bulk", "--issuer", DRILL_CA, "--yes"], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True)
    t2 = time.perf_counter()
    left = list(range(len(bodies)))
    polls = 0
    with httpx.Client(timeout=30) as c:
        while left and time.perf_counter() - t2 < 120:
            polls += 1
            left = [k for k in left if ocsp_status(port, bodies[k], c) != "REVOKED"]
    t3 = time.perf_counter()
    m = re.search(r"revoked (\d+) certificates .* in (\d+) batches, ([\d.]+) s; (\d+) OCSP responses re-signed; "
                  r"CRL (\d+)", run.stdout)
    with ctx.db.engine.connect() as conn:
        audit_rows, audit_bytes = conn.execute(text(
            "SELECT count(*), coalesce(sum(pg_column_size(a.*)), 0) FROM audit_event a "
            "WHERE action = 'certificate.revoke'")).one()
    return {"certificates": int(m.group(1)) if m else count, "dry_run_count": count, "dry_run_s": round(dry_s, 2),
            "seconds": round(t2 - t1, 1), "batches": int(m.group(2)) if m else None,
            "inside_s": float(m.group(3)) if m else None, "resigned": int(m.group(4)) if m else None,
            "ocsp_revoked_after_s": round(t3 - t2, 3) if not left else None, "sample": len(bodies),
            "not_revoked_after_120s": len(left), "audit_rows": audit_rows,
            "audit_bytes_per_row": round(audit_bytes / max(1, audit_rows)), "stdout_tail": run.stdout[-300:]}


# -- main -----------------------------------------------------------------------------------------------------


def measure(n: int, env: dict[str, str], work: Path, db_url: str, duration: int, warmup: int) -> dict[str, Any]:
    from pki.config import Settings
    from pki.wiring import build_context

    ctx = build_context(Settings(), migrate=False)
    res: dict[str, Any] = {}
    bodies = work / "bodies.bin"
    script = work / "fleet.lua"
    script.write_text(WRK_LUA)
    t0 = time.perf_counter()
    mix = zipf_requests(ctx, n, 200_000, bodies)
    sample = mix.pop("sample")
    say(f"Zipf mix: {mix['requests']:,} requests over {mix['distinct']:,} distinct leaves, "
        f"{mix['share_in_top_100k']:.0%} within the 100,000 most asked ({time.perf_counter() - t0:.1f} s)")
    hashes = _issuer_hashes(ctx)

    t_spawn = time.perf_counter()
    proc, port, startup = start_ocsp(env, work / "ocsp.log")
    try:
        startup_all = all_workers_ready(port, 2, t_spawn)
        workers = children(proc.pid)
        rss_start = {w: mem_mb(w) for w in workers}
        say(f"ocsp-serve: /healthz after {startup:.2f} s, from both workers after {startup_all} s; workers {workers} RSS "
            f"{[v['VmRSS'] for v in rss_start.values()]} MB")
        checked = check_answers(port, sample, hashes, ctx)
        warm = wrk(port, script, bodies, warmup, close=False)
        ka = measured_wrk(proc.pid, port, script, bodies, duration, close=False)
        nc = measured_wrk(proc.pid, port, script, bodies, duration, close=True)
        rss = {w: mem_mb(w) for w in workers if Path(f"/proc/{w}").exists()}
        say(f"OCSP c=32 keep-alive: {ka['rps']:,} req/s p50 {ka['p50_ms']} ms p99 {ka['p99_ms']} ms "
            f"({ka['server_cpu_us_per_req']} µs server CPU/req, {ka['fallback_share']:.1%} from pki/ocsp/) "
            f"(warm-up run {warm['rps']:,}); new connections: {nc['rps']:,} req/s p50 {nc['p50_ms']} p99 "
            f"{nc['p99_ms']} ms; worker RSS {[v['VmRSS'] for v in rss.values()]} MB (peak "
            f"{[v['VmHWM'] for v in rss.values()]}); load {ka['load']}")
        import httpx

        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        res["ocsp"] = {"rps": ka["rps"], "p50_ms": ka["p50_ms"], "p99_ms": ka["p99_ms"],
                       "rss_mb_per_worker": max(v["VmRSS"] for v in rss.values()),
                       "rss_peak_mb_per_worker": max(v["VmHWM"] for v in rss.values()),
                       "startup_s": round(startup, 3),
                       "startup_all_workers_s": round(startup_all, 3) if startup_all is not None else None,
                       "worker_ready_log": re.findall(r"ready: \d+ cached responses in [\d.]+ s",
                                                      (work / "ocsp.log").read_text()),
                       "rss_mb_at_start": max(v["VmRSS"] for v in rss_start.values()),
                       "keepalive": ka, "new_connections": nc, "warmup": warm, "mix": mix,
                       "answers_checked": checked, "healthz": health}
        say("expiry scan")
        res["expiry"] = expiry_scan(env, Path(env["V2GPKI_HOME"]), db_url)
        res["expiry_scan_s"] = res["expiry"]["seconds"]
        say(f"expiry scan {res['expiry']['seconds']} s ({res['expiry']['alerts']:,} alerts), re-scan "
            f"{res['expiry']['rescan_seconds']} s; CRLs")
        crl = subprocess.run([sys.executable, __file__, "--child-crl"], env=env, cwd=REPO, capture_output=True,
                             text=True, check=True)
        res["crl"] = json.loads(crl.stdout.strip().splitlines()[-1])
        res["crl_s"] = round(sum(v["seconds"] for v in res["crl"].values()), 2)
        say(f"CRLs {res['crl']}; console")
        res["console_ms"] = console(env, work, ctx)
        say(f"console pages (ms, median of 3): {res['console_ms']}; compromise drill")
        res["bulk_revoke"] = drill(env, port, ctx, hashes)
        say(f"drill: {res['bulk_revoke']}")
        rss = {w: mem_mb(w) for w in workers if Path(f"/proc/{w}").exists()}
        res["ocsp"]["rss_mb_after_drill"] = max(v["VmRSS"] for v in rss.values())
    finally:
        stop(proc)
        ctx.db.dispose()
    return res


def main() -> int:
    if "--child-crl" in sys.argv:
        return child_crl()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--certificates", type=int, required=True, help="leaves to build (N)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--pg-admin-url", default=os.environ.get("V2GPKI_TEST_PG_ADMIN_URL"))
    ap.add_argument("--build-procs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--warmup", type=int, default=0, help="seconds of the keep-alive warm-up run (default: --duration)")
    ap.add_argument("--reference", type=Path, help="JSON of a run at 10^4: print ratios to it")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and the database")
    args = ap.parse_args()
    if not args.pg_admin_url:
        print("bench/fleet.py: PostgreSQL admin URL needed (--pg-admin-url or V2GPKI_TEST_PG_ADMIN_URL)",
              file=sys.stderr)
        return 2
    if not shutil.which("wrk"):
        print("bench/fleet.py: wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    import psycopg

    from hsm.token import init_softhsm_token

    work = Path(tempfile.mkdtemp(prefix="fleetbench-"))
    dbname = f"v2gpki_fleet_{secrets.token_hex(4)}"
    with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db_url = f"{args.pg_admin_url.rsplit('/', 1)[0]}/{dbname}"
    paths = init_softhsm_token(work / "softhsm", "fleet", pin=PIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(work / "home"), V2GPKI_TOKEN_LABEL="fleet", V2GPKI_HSM_PIN=PIN,
               SOFTHSM2_CONF=str(paths.conf), V2GPKI_PKILINT="off", V2GPKI_PUBLIC_URL="http://127.0.0.1:8080",
               V2GPKI_DATABASE_URL=db_url)
    os.environ.update(env)
    say(f"work {work}, database {dbname}; {args.certificates:,} leaves; {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}")
    result: dict[str, Any] = {"certificates": args.certificates, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "cpus": os.cpu_count()}
    try:
        result["build"] = build(args.certificates, env, db_url, args.build_procs)
        result.update(measure(args.certificates, env, work, db_url, args.duration, args.warmup or args.duration))
        result["load_after"] = os.getloadavg()
    finally:
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        if not args.keep:
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work} and database {dbname}")
    if args.reference and "ocsp" in result:
        ref = json.loads(args.reference.read_text())
        print(f"\nratios to the run at {ref['certificates']:,} certificates (×N/{ref['certificates']:,} = "
              f"{args.certificates / ref['certificates']:,.0f}):")
        for label, a, b in (("OCSP req/s keep-alive", result["ocsp"]["rps"], ref["ocsp"]["rps"]),
                            ("OCSP p99", result["ocsp"]["p99_ms"], ref["ocsp"]["p99_ms"]),
                            ("OCSP req/s new conn", result["ocsp"]["new_connections"]["rps"],
                             ref["ocsp"]["new_connections"]["rps"]),
                            ("RSS per worker", result["ocsp"]["rss_mb_per_worker"], ref["ocsp"]["rss_mb_per_worker"]),
                            ("start-up", result["ocsp"]["startup_s"], ref["ocsp"]["startup_s"]),
                            ("expiry scan", result["expiry_scan_s"], ref["expiry_scan_s"]),
                            ("CRLs", result["crl_s"], ref["crl_s"])):
            print(f"  {label:<24} {a:>10} / {b:>10} = {a / b if b else float('nan'):.2f}")
    print(json.dumps({k: result.get(k) for k in ("certificates", "expiry_scan_s", "crl_s")}
                     | {"ocsp": {k: result.get("ocsp", {}).get(k) for k in
                                 ("rps", "p50_ms", "p99_ms", "rss_mb_per_worker", "startup_s")},
                        "bulk_revoke": {k: result.get("bulk_revoke", {}).get(k) for k in
                                        ("certificates", "seconds", "ocsp_revoked_after_s")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
