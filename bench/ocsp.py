"""OCSP responder throughput next to OpenSSL's and CFSSL's responders, on the same certificate set.

    .venv/bin/python bench/ocsp.py [--n 10000] [--requests 4000] [--workers 2] [--database-url URL]
                                   [--servers fast,uvicorn,openssl,cfssl] [--repeat 1]

What runs (loopback only, bounded request counts):
  * fast     — ours: `serve_ocsp(framework="fast")` (api/ocsp_fast.py: raw asyncio HTTP server, forked
               --workers processes, pre-signed responses held in memory and refreshed by polling);
  * uvicorn  — ours: `serve_ocsp(framework="uvicorn")` (api/ocsp_app.py, --workers uvicorn processes),
               pre-signed responses read from the database per request;
  * openssl  — `openssl ocsp -index index.txt -port … -multi <workers>` (OpenSSL's responder: signs every
               response live, answers HTTP/1.0 and closes; restarted for every run);
  * cfssl    — `cfssl ocspserve -responses file`, the file made by `cfssl ocsprefresh` over a cfssl
               certdb (SQLite) holding the same certificates and `cfssl ocspdump` (Debian's
               golang-cfssl 1.2.0 has no ocspserve -db-config).
The same N SECC certificates (1 % revoked) are issued by our CA from a fresh SoftHSM2 token; the
references sign with a software OCSP signer certificate issued by the same CA. Load: ApacheBench, POST of
a SHA-1 CertID request without nonce (what the pre-signed path serves; OpenSSL signs it anyway), a
different certificate for every run; concurrency 1, 8, 32; a new connection per request and -k
keep-alive. Printed: requests/s, p50 and p99 (ms), the responder processes' own CPU time per request
(from /proc, so it holds even on a busy machine), the load average, and ratios of each of ours against
the faster reference. With --repeat N every configuration is run N times, the servers in rotating order,
and the medians are reported (the machine may be shared: one run alone says little).
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIERARCHY = """\
organization: V2G PKI Bench
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA, ocsp_signer: false}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: CPO Sub-CA 1, ocsp_signer: false}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: CPO Sub-CA 2}
"""
PIN = "bench-pin-1234"


ALL_SERVERS = ("fast", "uvicorn", "openssl", "cfssl")
OURS = ("fast", "uvicorn")
REFS = ("openssl", "cfssl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:  # openssl -multi's supervisor may be respawning children
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group: the
    responder's own cost per request, whatever else the machine is doing."""
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


def bench_env(work: Path, database_url: str | None) -> dict[str, str]:
    from hsm.token import init_softhsm_token

    paths = init_softhsm_token(work / "softhsm", "bench", pin=PIN)
    (work / "hierarchy.yaml").write_text(HIERARCHY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(work / "home"), V2GPKI_TOKEN_LABEL="bench", V2GPKI_HSM_PIN=PIN,
               SOFTHSM2_CONF=str(paths.conf), V2GPKI_HIERARCHY_FILE=str(work / "hierarchy.yaml"),
               V2GPKI_PKILINT="off", V2GPKI_PUBLIC_URL="http://127.0.0.1:8080")
    if database_url:
        env["V2GPKI_DATABASE_URL"] = database_url
    os.environ.update(env)
    return env


def build_pki(n: int, work: Path) -> dict[str, object]:
    """Init the CA, issue n leaves (pre-signed at issuance), revoke 1 %, make a software OCSP signer."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from pki.config import Settings
    from pki.csr import SubjectFields
    from pki.hierarchy import init_hierarchy
    from pki.issuance import IssueRequest, pem
    from pki.wiring import build_context

    ctx = build_context(Settings())
    init_hierarchy(ctx.engine, ctx.hierarchy())
    key = ec.generate_private_key(ec.SECP256R1())
    t0 = time.perf_counter()
    leaves = []
    for i in range(0, n, 250):
        reqs = [IssueRequest(profile="secc", public_key=key.public_key(), ca="cpo-sub2",
                             subject=SubjectFields(cn=f"DE*ICE*E{j:08X}", o="Bench CPO", c="DE", dc="CPO"))
                for j in range(i, min(n, i + 250))]
        leaves.extend(ctx.engine.issue_many(reqs))
    issue_s = time.perf_counter() - t0
    revoked = set(random.Random(7).sample(range(n), max(1, n // 100)))
    for k in sorted(revoked):
        ctx.engine.revoke(leaves[k].serial, "keyCompromise", issuer="cpo-sub2")
    # The references' signer: a software key with an OCSP-signing certificate from the same CA.
    rkey = ec.generate_private_key(ec.SECP256R1())
    rcert = ctx.engine.issue(IssueRequest(profile="ocsp-signer", public_key=rkey.public_key(), ca="cpo-sub2",
                                          subject=SubjectFields(cn="OCSP reference", o="Bench", c="DE", dc=None)))
    ca = ctx.engine.ca("cpo-sub2")
    (work / "ca.pem").write_text(pem(ca.cert))
    (work / "root.pem").write_text(pem(ctx.engine.chain("cpo-sub2")[-1]))
    (work / "chain.pem").write_text("".join(pem(c) for c in ctx.engine.chain("cpo-sub2")[:-1]))
    (work / "rsigner.pem").write_text(pem(rcert.cert))
    (work / "rkey.pem").write_bytes(rkey.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                                       serialization.NoEncryption()))
    # openssl index.txt (ca(1) "database" format)
    lines = []
    for k, leaf in enumerate(leaves):
        exp = leaf.cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        status, rev = ("R", datetime.now(UTC).strftime("%y%m%d%H%M%SZ") + ",keyCompromise") if k in revoked else ("V", "")
        lines.append(f"{status}\t{exp}\t{rev}\t{leaf.serial.upper()}\tunknown\t/CN=bench leaf {k}")
    (work / "index.txt").write_text("\n".join(lines) + "\n")
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    # cfssl certdb (its 1.2.0 SQLite schema) with the same certificates
    # On tmpfs when there is one: cfssl commits each response on its own (an fsync each), which would
    # measure the disk, not cfssl.
    shm = Path("/dev/shm")
    cfssl_db = (Path(tempfile.mkdtemp(prefix="ocspbench-cfssl-", dir=shm)) if shm.is_dir() else work) / "cfssl.db"
    if cfssl_db.parent != work:
        atexit.register(shutil.rmtree, cfssl_db.parent, True)
    db = sqlite3.connect(cfssl_db)
    db.executescript("""
        CREATE TABLE certificates (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
          ca_label blob, status blob NOT NULL, reason int, expiry timestamp, revoked_at timestamp,
          pem blob NOT NULL, PRIMARY KEY(serial_number, authority_key_identifier));
        CREATE TABLE ocsp_responses (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
          body blob NOT NULL, expiry timestamp, PRIMARY KEY(serial_number, authority_key_identifier));
    """)
    aki = ca.ski.hex()
    db.executemany("INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?)", [
        (str(leaf.cert.serial_number), aki, "", "revoked" if k in revoked else "good", 1 if k in revoked else 0,
         leaf.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S"),
         datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S") if k in revoked else "0001-01-01 00:00:00",
         pem(leaf.cert))  # cfssl 1.2 cannot scan a NULL revoked_at
        for k, leaf in enumerate(leaves)])
    db.commit()
    db.close()
    (work / "cfssl-db.json").write_text(json.dumps({"driver": "sqlite3", "data_source": str(cfssl_db)}))
    certs = [leaf.cert for leaf in leaves]
    ctx.db.dispose()
    return {"certs": certs, "issuer": ca.cert, "revoked": revoked, "issue_seconds": issue_s}


def request_der(cert: object, issuer: object) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    return (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # type: ignore[arg-type]
            .build().public_bytes(serialization.Encoding.DER))


def wait_healthz(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no /healthz answer on {port}")


def check_answer(url: str, body: bytes, want: str, work: Path) -> None:
    """Sanity: the responder answers, openssl verifies the response against the chain."""
    import httpx

    r = httpx.post(url, content=body, headers={"Content-Type": "application/ocsp-request"}, timeout=30)
    (work / "check.der").write_bytes(r.content)
    res = subprocess.run(["openssl", "ocsp", "-respin", str(work / "check.der"), "-CAfile", str(work / "root.pem"),
                          "-verify_other", str(work / "chain.pem"), "-resp_text"], capture_output=True, text=True)
    if "Response verify OK" not in res.stderr or f"Cert Status: {want}" not in res.stdout:
        raise RuntimeError(f"{url}: bad answer\n{res.stdout[:800]}\n{res.stderr}")


def ab(url: str, body: Path, n: int, c: int, keepalive: bool, work: Path) -> dict[str, float] | None:
    """One ApacheBench run; None if it stalled. (OpenSSL's responder handles one connection at a time
    per process and keeps a keep-alive connection open, so with more clients than processes some wait
    until ab's 10 s timeout; seen with -k at c=8/32, and once without -k at c=8.)"""
    out = work / "ab.csv"
    cmd = ["ab", "-q", "-n", str(n), "-c", str(c), "-s", "10", "-e", str(out), "-p", str(body),
           "-T", "application/ocsp-request"]
    if keepalive:
        cmd.append("-k")
    res = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        if "timeout" in res.stderr.lower():
            return None
        raise RuntimeError(f"ab failed: {res.stderr[-500:]}")
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", res.stdout).group(1))  # type: ignore[union-attr]
    # 'Length' failures only mean that response sizes differ (ECDSA signatures vary by a byte): not errors
    m = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", res.stdout)
    errors = sum(int(x) for x in m.groups()) if m else 0
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", res.stdout)
    pct = {int(row[0]): float(row[1]) for row in csv.reader(out.read_text().splitlines()[1:])}
    return {"rps": rps, "p50": pct[50], "p99": pct[99], "failed": errors + (int(non2xx.group(1)) if non2xx else 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="certificates in the set (default 10000)")
    ap.add_argument("--requests", type=int, default=4000, help="requests per ab run (default 4000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="responder processes (all three)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--database-url", default=None, help="default: SQLite in the work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the work directory (default: $TMPDIR)")
    ap.add_argument("--servers", default=",".join(ALL_SERVERS), help="which responders (default: all four)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; medians are reported")
    args = ap.parse_args()
    names = [x for x in args.servers.split(",") if x]
    if unknown := set(names) - set(ALL_SERVERS):
        print(f"bench/ocsp.py: unknown servers {sorted(unknown)}", file=sys.stderr)
        return 2
    for tool in ("ab", "openssl", "cfssl"):
        if not shutil.which(tool):
            print(f"bench/ocsp.py: {tool} is required", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="ocspbench-", dir=args.workdir))
    env = bench_env(work, args.database_url)
    print(f"work directory {work}; {args.n} certificates, {args.workers} responder processes, "
          f"{os.cpu_count()} CPUs", flush=True)
    pki = build_pki(args.n, work)
    print(f"issued {args.n} certificates with pre-signed OCSP responses in {pki['issue_seconds']:.1f} s", flush=True)

    # cfssl: responses from ocsprefresh over its certdb, dumped for ocspserve
    t0 = time.perf_counter()
    subprocess.run(["cfssl", "ocsprefresh", "-db-config", str(work / "cfssl-db.json"), "-ca", str(work / "ca.pem"),
                    "-responder", str(work / "rsigner.pem"), "-responder-key", str(work / "rkey.pem"),
                    "-interval", "216h", "-loglevel", "3"], check=True, env=env)
    dump = subprocess.run(["cfssl", "ocspdump", "-db-config", str(work / "cfssl-db.json"), "-loglevel", "3"],
                          check=True, capture_output=True, text=True, env=env).stdout
    (work / "cfssl-responses.txt").write_text(dump)
    print(f"cfssl ocsprefresh + ocspdump: {len(dump.split())} responses in {time.perf_counter() - t0:.1f} s",
          flush=True)

    certs, issuer, revoked = pki["certs"], pki["issuer"], pki["revoked"]
    assert isinstance(certs, list) and isinstance(revoked, set)
    rng = random.Random(11)

    def servers() -> dict[str, list[str]]:
        ours = ("import sys; from api.ocsp_app import serve_ocsp; "
                "serve_ocsp('127.0.0.1', int(sys.argv[1]), int(sys.argv[2]), framework=sys.argv[3])")
        return {
            "fast": [sys.executable, "-c", ours, "{port}", str(args.workers), "fast"],
            "uvicorn": [sys.executable, "-c", ours, "{port}", str(args.workers), "uvicorn"],
            "openssl": ["openssl", "ocsp", "-index", str(work / "index.txt"), "-CA", str(work / "ca.pem"),
                        "-rsigner", str(work / "rsigner.pem"), "-rkey", str(work / "rkey.pem"), "-ndays", "9",
                        "-resp_key_id", "-port", "{port}", "-multi", str(args.workers)],
            "cfssl": ["cfssl", "ocspserve", "-address", "127.0.0.1", "-port", "{port}", "-responses",
                      str(work / "cfssl-responses.txt"), "-loglevel", "5"],
        }

    def start(name: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        cmd = [a.replace("{port}", str(port)) for a in servers()[name]]
        log = (work / f"{name}.log").open("ab")
        # its own process group (not session: openssl -multi calls setpgid(0, 0), refused to a session leader)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log, process_group=0)
        log.close()
        try:
            wait_port(port, proc)
            if name in OURS:
                wait_healthz(port, proc)
        except RuntimeError:
            raise RuntimeError(f"{name} did not start:\n" + (work / f"{name}.log").read_text()[-2000:]) from None
        # let every worker finish starting (uvicorn's lifespan; the fast server's Context) — the warm-up
        # run below covers the rest
        time.sleep(1.0 if name in OURS else 0.1)
        return proc, f"http://127.0.0.1:{port}/ocsp"

    # sanity: all answer good and revoked, verifiably
    k_rev = next(iter(revoked))
    for name in names:
        proc, url = start(name)
        try:
            check_answer(url, request_der(certs[0], issuer), "good", work)
            check_answer(url, request_der(certs[k_rev], issuer), "revoked", work)
        finally:
            stop(proc)
    print(f"{', '.join(names)} answer good/revoked, verified by openssl against the chain\n", flush=True)

    results: dict[tuple[str, int, bool], dict[str, float] | None] = {}
    body = work / "req.der"
    loads: list[float] = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        for keepalive in (False, True):
            k = rng.randrange(len(certs))
            body.write_bytes(request_der(certs[k], issuer))
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            for rep in range(args.repeat):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for name in order:
                    proc, url = start(name)  # a fresh process per run (OpenSSL's responder in particular)
                    try:
                        ab(url, body, min(200, args.requests), c, keepalive, work)  # warm-up
                        cpu0 = group_cpu(proc.pid)
                        r = ab(url, body, args.requests, c, keepalive, work)
                        if r is not None:
                            r["cpu_us"] = (group_cpu(proc.pid) - cpu0) / args.requests * 1e6
                            r["load"] = os.getloadavg()[0]
                            loads.append(r["load"])
                            runs[name].append(r)
                    finally:
                        stop(proc)
                    conn = "keep-alive" if keepalive else "new conn  "
                    if r is None:
                        print(f"  {name:8} c={c:<3} {conn} stalled: ab got no answer within 10 s", flush=True)
                        continue
                    print(f"  {name:8} c={c:<3} {conn} {r['rps']:9.0f} req/s  p50 {r['p50']:7.2f} ms  "
                          f"p99 {r['p99']:7.2f} ms  server CPU {r['cpu_us']:6.0f} µs/req  load {r['load']:.1f}"
                          f"{'  ERRORS ' + str(int(r['failed'])) if r['failed'] else ''}", flush=True)
            for name, rs in runs.items():
                results[(name, c, keepalive)] = ({key: statistics.median(x[key] for x in rs) for key in rs[0]}
                                                 if rs else None)

    if args.repeat > 1:
        print(f"\nmedians of {args.repeat} runs")
        for (name, c, keepalive), r in results.items():
            if r is not None:
                print(f"  {name:8} c={c:<3} {'keep-alive' if keepalive else 'new conn  '} {r['rps']:9.0f} req/s  "
                      f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  server CPU {r['cpu_us']:6.0f} µs/req")
    if loads:
        print(f"\nload average (1 min) during the runs: {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs")
    refs_run = [x for x in REFS if x in names]
    print("\nratios: ours / the faster reference (req/s: > 1 is better; p50, p99, CPU: < 1 is better)")
    print(f"{'ours':<8} {'conc':>4} {'connection':<11} {'faster ref':<10} {'req/s':>7} {'p50':>7} {'p99':>7} "
          f"{'CPU/req':>8}   {'req/s vs openssl':>16} {'vs cfssl':>9}")
    for (name, c, keepalive), r in results.items():
        if name not in OURS or r is None or not refs_run:
            continue
        refs = {ref: results.get((ref, c, keepalive)) for ref in REFS}
        avail = {k: v for k, v in refs.items() if v is not None}
        if not avail:
            continue
        ref_name, ref = max(avail.items(), key=lambda kv: kv[1]["rps"])
        vs = {k: (f"{r['rps'] / v['rps']:.2f}" if v is not None else "n/a") for k, v in refs.items()}
        print(f"{name:<8} {c:>4} {'keep-alive' if keepalive else 'new':<11} {ref_name:<10} "
              f"{r['rps'] / ref['rps']:7.2f} {r['p50'] / ref['p50']:7.2f} {r['p99'] / ref['p99']:7.2f} "
              f"{r['cpu_us'] / ref['cpu_us']:8.2f}   {vs['openssl']:>16} {vs['cfssl']:>9}")
    if args.keep:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
