"""Enrollments per second over HTTP: `v2gpki serve` against `cfssl serve`, same CSRs, same load generator.

    .venv/bin/python bench/enrollment.py                       # everything (≈ 5 min)
    .venv/bin/python bench/enrollment.py --seconds 5 --concurrency 8 --modes new --backends sqlite

What is compared
  ours   POST /v1/enrollments {"csr": PEM, "profile": "secc"} with `Authorization: Bearer <API key>`:
         the full service path — API key check, CSR parse and profile checks, tenant (prefix) check,
         lint, intent record, ECDSA signature by the CPO Sub-CA 2 key *in SoftHSM2* (PKCS#11), certificate
         row and audit event persisted — on SQLite and on PostgreSQL, `--workers` uvicorn processes.
  cfssl  POST /api/v1/cfssl/sign {"certificate_request": PEM}: CloudFlare's signer with a software CA
         key (a P-256 key file) and no database, no authentication.

Load generator: wrk (HTTP/1.1) with a Lua script that rotates through `--csrs` distinct CSRs (distinct
keys and EVSEIDs), so no server can profit from a repeated body; both servers get the same CSRs in the
same order. "new" sends `Connection: close` (one TCP connection per enrollment, as ab without -k),
"keepalive" reuses connections. ab is not used for keep-alive: it speaks HTTP/1.0, which uvicorn never
keeps alive while Go's net/http does, so ab -k would compare different things. `--tool ab` runs ab
instead (new connections only, one CSR repeated — fine for both: neither dedupes by key).

Load generator and servers share this machine's cores; the same holds for both sides. Every answer must
be 2xx: a run with errors is reported as such. After the runs the database is counted (certificates,
issued intents, audit events) to show that every enrollment was persisted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parent.parent
V2GPKI = str(Path(sys.executable).parent / "v2gpki")
OPERATOR = "DE*BEN"

HIERARCHY = """
organization: Bench PKI
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA, ocsp_signer: false}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: CPO Sub-CA 1, ocsp_signer: false}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: CPO Sub-CA 2, ocsp_signer: false}
"""

WRK_LUA = """
local bodies = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = tonumber(args[2]) or 0
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, nil, bodies[i])
end
"""


# -- inputs ------------------------------------------------------------------------------------------------


def make_csrs(n: int) -> list[str]:
    out = []
    for k in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{OPERATOR}*E{k:08d}"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench CPO"),
                          x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                          x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "CPO")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return out


def cfssl_ca(d: Path) -> tuple[Path, Path, Path]:
    """A P-256 CA as a software key file, for cfssl (it has no PKCS#11 here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cfssl bench CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench PKI"),
                      x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    ca, ca_key, cfg = d / "cfssl-ca.pem", d / "cfssl-ca-key.pem", d / "cfssl.json"
    ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
    # The same leaf shape as our secc profile: one year, digitalSignature + keyAgreement.
    cfg.write_text(json.dumps({"signing": {"default": {"expiry": "8760h",
                                                       "usages": ["digital signature", "key agreement"]}}}))
    return ca, ca_key, cfg


# -- servers ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server at {url} did not come up:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Target:
    name: str
    url: str
    headers: list[str]
    bodies: Path  # one request body per line
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)


def run(cmd: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def start_ours(d: Path, backend: str, csrs: list[str], workers: int, pg_admin: str | None,
               extra_env: dict[str, str]) -> Target:
    home = d / f"home-{backend}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}
    env.update(V2GPKI_HOME=str(home), V2GPKI_PKILINT="shape",
               # The per-organization limit (default 2000/s per worker) would turn the benchmark into a
               # rate-limit test; lifted here, documented in docs/api.md.
               V2GPKI_RATE_LIMIT="1000000000")
    env.update(extra_env)
    if backend == "postgresql":
        if not pg_admin:
            raise SystemExit("PostgreSQL: set V2GPKI_TEST_PG_ADMIN_URL (eval \"$(bash scripts/services.sh)\")")
        import psycopg

        db = f"v2gpki_bench_{secrets.token_hex(3)}"
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        env["V2GPKI_DATABASE_URL"] = f"{pg_admin.rsplit('/', 1)[0]}/{db}"
    run([V2GPKI, "hsm", "init"], env)
    (d / "hierarchy.yaml").write_text(HIERARCHY)
    run([V2GPKI, "init", "--config", str(d / "hierarchy.yaml")], env)
    run([V2GPKI, "org", "create", "bench-cpo", "--role", "cpo", "--prefix", OPERATOR,
         "--organization-name", "Bench CPO"], env)
    key = run([V2GPKI, "apikey", "create", "--org", "bench-cpo"], env).strip().splitlines()[-1]
    bodies = d / f"ours-{backend}.txt"
    bodies.write_text("".join(json.dumps({"csr": c, "profile": "secc"}) + "\n" for c in csrs))
    port = free_port()
    log = d / f"serve-{backend}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([V2GPKI, "serve", "--port", str(port), "--workers", str(workers),
                                 "--log-level", "warning"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    return Target(f"ours-{backend}", f"http://127.0.0.1:{port}/v1/enrollments",
                  [f"Authorization: Bearer {key}", "Content-Type: application/json"], bodies, proc, env)


def start_cfssl(d: Path, csrs: list[str]) -> Target:
    ca, ca_key, cfg = cfssl_ca(d)
    bodies = d / "cfssl.txt"
    bodies.write_text("".join(json.dumps({"certificate_request": c}) + "\n" for c in csrs))
    port = free_port()
    log = d / "cfssl.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(["cfssl", "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", str(ca),
                                 "-ca-key", str(ca_key), "-config", str(cfg), "-loglevel", "5"],
                                stdout=fh, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/api/v1/cfssl/scaninfo", proc, log)
    return Target("cfssl", f"http://127.0.0.1:{port}/api/v1/cfssl/sign", ["Content-Type: application/json"],
                  bodies, proc)


# -- load ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p99_ms: float
    requests: int
    errors: int
    cpu_ms: float = 0.0  # server CPU time (user + system, all its processes) per request


def cpu_seconds(root: int) -> float:
    """utime + stime of a process and all its descendants (uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, t in times.items():
        cur = pid
        while cur > 1 and cur != root:
            cur = parent.get(cur, 0)
        if cur == root:
            total += t
    return total


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def load_wrk(t: Target, d: Path, conc: int, mode: str, seconds: float) -> Result:
    lua = d / "rotate.lua"
    lua.write_text(WRK_LUA)
    headers = list(t.headers) + (["Connection: close"] if mode == "new" else [])
    cmd = ["wrk", "-t", str(min(conc, 2)), "-c", str(conc), "-d", f"{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
           "-s", str(lua)]
    for h in headers:
        cmd += ["-H", h]
    cmd += [t.url, "--", str(t.bodies), str(secrets.randbelow(1000))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0)
    if sock:
        # With Connection: close a read "error" is the server closing after the response: not an error.
        errors += int(sock.group(1)) + int(sock.group(3)) + int(sock.group(4))
    return Result(rps, p99, total, errors)


def load_ab(t: Target, d: Path, conc: int, mode: str, seconds: float) -> Result:
    body = d / f"{t.name}-one.json"
    body.write_text(t.bodies.read_text().splitlines()[0])
    cmd = ["ab", "-q", "-t", str(int(seconds)), "-n", "10000000", "-c", str(conc), "-p", str(body)]
    if mode == "keepalive":
        cmd.append("-k")
    ctype = "application/json"
    for h in t.headers:
        if h.lower().startswith("content-type:"):
            ctype = h.split(":", 1)[1].strip()
        else:
            cmd += ["-H", h]
    cmd += ["-T", ctype, t.url]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = float(re.search(r"^\s+99%\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"Complete requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return Result(rps, p99, total, failed + (int(non2xx.group(1)) if non2xx else 0))


def persisted(t: Target) -> str:
    """Count what the service stored (certificates, issued intents, audit events)."""
    code = ("from sqlmodel import select, func\n"
            "from pki.config import Settings\nfrom pki.store.db import Database\n"
            "from pki.store.models import Certificate, IssuanceIntent, AuditEvent\n"
            "db = Database(Settings().db_url)\n"
            "with db.session() as s:\n"
            "    c = s.exec(select(func.count()).select_from(Certificate).where(Certificate.profile == 'secc')).one()\n"
            "    i = s.exec(select(func.count()).select_from(IssuanceIntent)"
            ".where(IssuanceIntent.profile == 'secc', IssuanceIntent.state == 'issued')).one()\n"
            "    a = s.exec(select(func.count()).select_from(AuditEvent)"
            ".where(AuditEvent.action == 'certificate.issue')).one()\n"
            "print(f'{c} certificates, {i} issued intents, {a} certificate.issue audit events')\n")
    return subprocess.run([sys.executable, "-c", code], env=t.env, capture_output=True, text=True,
                          cwd=REPO).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--modes", default="new,keepalive")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("V2GPKI_WORKERS", "2")))
    ap.add_argument("--csrs", type=int, default=1000, help="distinct CSRs the load generator rotates through")
    ap.add_argument("--tool", choices=["wrk", "ab"], default="wrk")
    ap.add_argument("--no-cfssl", action="store_true")
    ap.add_argument("--keep", help="keep the work directory here (logs, databases)")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for our server (repeatable)")
    args = ap.parse_args()
    if shutil.which(args.tool) is None:
        raise SystemExit(f"{args.tool} not installed (apt-get install -y {'wrk' if args.tool == 'wrk' else 'apache2-utils'})")
    concs = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="v2gpki-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    extra = dict(kv.split("=", 1) for kv in args.env)
    print(f"# {os.cpu_count()} CPUs; {args.workers} workers; {args.csrs} distinct CSRs; {args.tool}; "
          f"{args.seconds:g}s per run; work dir {d}", file=sys.stderr)
    csrs = make_csrs(args.csrs)
    targets: list[Target] = []
    load = load_wrk if args.tool == "wrk" else load_ab
    results: dict[tuple[str, int, str], Result] = {}
    try:
        if not args.no_cfssl:
            targets.append(start_cfssl(d, csrs))
        for b in args.backends.split(","):
            targets.append(start_ours(d, b, csrs, args.workers, os.environ.get("V2GPKI_TEST_PG_ADMIN_URL"), extra))
        for t in targets:
            load(t, d, 8, "keepalive", 2)  # warm-up: connections, pools, first-shape pkilint in each worker
            for conc in concs:
                for mode in modes:
                    before = cpu_seconds(t.proc.pid) if t.proc else 0.0
                    r = load(t, d, conc, mode, args.seconds)
                    if t.proc and r.requests:
                        r.cpu_ms = 1000 * (cpu_seconds(t.proc.pid) - before) / r.requests
                    results[(t.name, conc, mode)] = r
                    print(f"{t.name:<16} c={conc:<3} {mode:<9} {r.rps:8.0f} req/s  p99 {r.p99_ms:7.1f} ms  "
                          f"server CPU {r.cpu_ms:5.2f} ms/req ({r.requests} requests, {r.errors} errors)",
                          file=sys.stderr, flush=True)
        for t in targets:
            if t.name.startswith("ours"):
                print(f"# {t.name} persisted: {persisted(t)}", file=sys.stderr)
    finally:
        for t in targets:
            if t.proc is not None:
                stop(t.proc)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    print("\n| server | conc | connections | req/s | p99 ms | server CPU ms/req | errors "
          "| req/s vs cfssl | p99 vs cfssl | CPU/req vs cfssl |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, conc, mode), r in results.items():
        base = results.get(("cfssl", conc, mode))
        ratio = f"{r.rps / base.rps:.2f}×" if base and base.rps else "-"
        p99r = f"{r.p99_ms / base.p99_ms:.2f}×" if base and base.p99_ms else "-"
        cpur = f"{r.cpu_ms / base.cpu_ms:.1f}×" if base and base.cpu_ms else "-"
        print(f"| {name} | {conc} | {mode} | {r.rps:.0f} | {r.p99_ms:.1f} | {r.cpu_ms:.2f} | {r.errors} "
              f"| {ratio} | {p99r} | {cpur} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{"server": n, "concurrency": c, "mode": m, **r.__dict__}
                                               for (n, c, m), r in results.items()], indent=1))
    return 1 if any(r.errors for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
