"""Contract certificate installations per second, end to end over HTTP (EXI in → EXI out).

    .venv/bin/python bench/contract.py                                   # PostgreSQL, c=1 and c=8, profile
    .venv/bin/python bench/contract.py --db sqlite --seconds 10 --concurrency 1,4,8 --no-profile
    .venv/bin/python bench/contract.py --iso 2,20 --no-profile               # ISO 15118-2 and -20, same run

ISO 15118-20 (#26, --iso 20): POST /ocpp/v21/get-15118-ev-certificate with a -20 CertificateInstallationReq
(P-521 OEM provisioning certificate from OEM Sub-CA 2 (-20), header signature ecdsa-sha512 over the EXI
OEMProvisioningCertificateChain fragment); the CPS answers with a P-521 contract certificate from MO Sub-CA 2
(-20) *in the HSM*, the key encrypted with ECDH P-521 + SHA-512 concat KDF + AES-256-GCM, SignedInstallationData
signed ecdsa-sha512 by the -20 CPS leaf *in the HSM*. The rows of both are printed in one table.

What one installation is here: POST /ocpp/v201/get-15118-ev-certificate {iso15118SchemaVersion, action:
Install, exiRequest} against a real `v2gpki serve --workers N` (uvicorn, SoftHSM2, PostgreSQL or SQLite):
API key check, EXI decode of the V2G_Message, OEM provisioning certificate chain/validity/revocation
check, the vehicle's request signature verified (EXI fragment re-encoded, ECDSA), default contract of the
PCID looked up, contract key generated (P-256, software), contract certificate issued by MO Sub-CA 2 *in
the HSM* and persisted (intent, certificate row, audit row; OCSP pre-signing hook), the key wrapped for
the vehicle (ECDH + concat KDF + AES-CBC), the four elements EXI-encoded and digested, SignedInfo signed
by the CPS leaf key *in the HSM*, the V2G_Message encoded, base64 JSON back. Every answer must be HTTP 200
with status Accepted; one answer per run is decoded and fully checked (CPS signature, key unwraps to the
certificate) so the bench cannot measure a short-cut.

Vehicles and replay: --vehicles distinct vehicles (OEM provisioning certificate from OEM Sub-CA 2 through
/v1/enrollments, a contract through /v1/contracts, a signed CertificateInstallationReq each) are rotated
through. The same signed request is replayed many times. For ISO 15118-2, since #21 item 2, a replay (a
vehicle's retry: same signed body) gets the answer already given — same contract certificate, encrypted key
and CPS signature under the new SessionID, nothing issued, revoked or signed (docs/cps.md, step 11) — so
after the warm-up the -2 rows measure that replay path: the first answer per vehicle issues, every later one
is re-sent, and the database holds one -2 contract certificate per vehicle. (Before, every call issued a new
certificate and superseded the previous one.) ISO 15118-20 answers still issue on every call. The
database is counted afterwards.

--fresh (ISO 15118-2): measure the installation path itself, not the replay. Each vehicle signs
--fresh-requests / --vehicles distinct requests (the body's Id differs, so its digest — the replay key —
differs), and the generators rotate through all of them, so no request is sent twice in a run (the bench
refuses to start if one could be: raise --fresh-requests). Every answer issues a contract certificate and
supersedes the vehicle's previous one (revocation, OCSP re-signing): more work than a vehicle's very first
installation, which supersedes nothing — a conservative figure for it. The persisted count shows it.

--first (ISO 15118-2): --fresh with one request per vehicle (--fresh-requests vehicles, each enrolled and
given a contract beforehand): every answer is a vehicle's first installation — it issues a contract
certificate and keeps the answer, and supersedes nothing. This is the work an installation did when the
200/s target was set (bench/results/2026-11-24-contract-round10.md: every call issued, nothing was
revoked); --fresh adds a revocation (audit event, outbox event, OCSP re-signature) to each.

Load generator: wrk (default when installed; --client python for the Python one), one keep-alive
connection per unit of concurrency (the CSMS → CPS link is a persistent connection), closed loop: each
connection sends its next request when the previous answer arrived, rotating through the vehicles. Its Lua
script counts every answer that is not HTTP 200 with status Accepted as an error. It shares the machine's
two cores with the server and the database, as any generator here would; its own CPU time is printed
(wrk ≈ 2 % of a core; the Python generator — threads with one httpx client each — took ≈ 22 %, which on
this machine is CPU the server then lacks). The warm-up, and one request after each run whose answer is
decoded and checked, use the Python client.

Profile (unless --no-profile): py-spy samples one uvicorn worker during an extra run at the highest
concurrency (--gil: the thread holding the GIL, i.e. the worker's Python CPU), and the samples are grouped
by phase of the installation (inclusive) and by area (own time). Server CPU per installation (user +
system time of the worker processes / installations) is printed for every run: on a shared machine it is
the steadiest figure, and 1000 × cores / (server CPU ms) bounds what the workers alone could do.

Machine accounting (every run): the local PostgreSQL server's CPU per installation (all processes named
``postgres``: backends, WAL writer, checkpointer), the machine's idle and *steal* shares from /proc/stat
(steal: CPU time the hypervisor gave to another guest), and a CPU ceiling, cores × (1 − steal) / (server +
database + generator CPU per installation): the rate this machine could give if none of its CPU went
idle. A run near its ceiling is CPU-bound, and a target above the ceiling needs less CPU per installation,
not more workers or threads.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from enrollment import WRK_LUA as ROTATE_LUA  # noqa: E402 - bench/ is this script's directory

V2GPKI = str(Path(sys.executable).parent / "v2gpki")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
WMI = "BEN"  # the bench OEM's PCID prefix
EMSP = "DEBEN"  # the bench eMSP's EMAID prefix
CPO = "DE*BEN"
ISO2 = "urn:iso:15118:2:2013:MsgDef"
ISO20 = "urn:iso:std:iso:15118:-20:CommonMessages"
PATH = {"2": "/ocpp/v201/get-15118-ev-certificate", "20": "/ocpp/v21/get-15118-ev-certificate"}


# -- set-up ------------------------------------------------------------------------------------------------


def run(cmd: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    env: dict[str, str]
    keys: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    dbname: str | None = None


def prepare(d: Path, db: str, pg_admin: str | None) -> Server:
    home = d / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}
    env.update(V2GPKI_HOME=str(home), V2GPKI_PKILINT="shape",
               # the per-organization rate limit would make this a rate-limit test (as in bench/enrollment.py)
               V2GPKI_RATE_LIMIT="1000000000")
    dbname = None
    if db == "postgresql":
        if not pg_admin:
            raise SystemExit("PostgreSQL: set V2GPKI_TEST_PG_ADMIN_URL (eval \"$(bash scripts/services.sh)\")")
        import psycopg

        dbname = f"v2gpki_bench_{secrets.token_hex(3)}"
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        env["V2GPKI_DATABASE_URL"] = f"{pg_admin.rsplit('/', 1)[0]}/{dbname}"
    t0 = time.monotonic()
    run([V2GPKI, "hsm", "init"], env)
    run([V2GPKI, "init"], env)  # the default hierarchy (pki/policies/hierarchy.yaml): -2, -20, OCPP, CPS leaves
    keys = {}
    for name, role, prefix in (("bench-oem", "oem", WMI), ("bench-emsp", "emsp", EMSP), ("bench-cpo", "cpo", CPO)):
        run([V2GPKI, "org", "create", name, "--role", role, "--prefix", prefix], env)
        keys[role] = run([V2GPKI, "apikey", "create", "--org", name], env).strip().splitlines()[-1]
    print(f"# initialised ({db}) in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return Server("", env, keys, dbname=dbname)


def start(srv: Server, d: Path, workers: int) -> None:
    port = free_port()
    srv.log = d / f"serve-{workers}.log"
    with srv.log.open("wb") as fh:
        srv.proc = subprocess.Popen([V2GPKI, "serve", "--port", str(port), "--workers", str(workers),
                                     "--log-level", "warning"], env=srv.env, stdout=fh, stderr=subprocess.STDOUT)
    srv.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise SystemExit(f"server exited {srv.proc.returncode}:\n{srv.log.read_text()[-3000:]}")
        try:
            httpx.get(srv.url + "/healthz", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"server did not come up:\n{srv.log.read_text()[-3000:]}")


def stop(srv: Server) -> None:
    if srv.proc is None:
        return
    srv.proc.send_signal(signal.SIGINT)
    try:
        srv.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
    srv.proc = None


def _pcid() -> str:
    return WMI + "".join(secrets.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(14))


def _vehicle(c: httpx.Client, srv: Server, profile: str, curve: ec.EllipticCurve, digest: hashes.SHA256 | hashes.SHA512
             ) -> tuple[str, ec.EllipticCurvePrivateKey, x509.Certificate, str]:
    """One vehicle: its OEM provisioning certificate enrolled (``profile``), and a default contract for it."""
    from pki.store.db import utcnow

    pcid = _pcid()
    key = ec.generate_private_key(curve)
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, pcid), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench OEM"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "OEM")]))
        .sign(key, digest).public_bytes(serialization.Encoding.PEM).decode())
    r = c.post("/v1/enrollments", json={"csr": csr, "profile": profile},
               headers={"Authorization": f"Bearer {srv.keys['oem']}"})
    if r.status_code != 201:
        raise SystemExit(f"enrollment ({profile}): {r.status_code} {r.text[:300]}")
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    emaid = EMSP + "".join(secrets.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(9))
    r = c.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid,
                                      "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
               headers={"Authorization": f"Bearer {srv.keys['emsp']}"})
    if r.status_code != 201:
        raise SystemExit(f"contract: {r.status_code} {r.text[:300]}")
    return pcid, key, cert, emaid


def make_vehicles(srv: Server, n: int, per_vehicle: int = 1) -> list[dict[str, Any]]:
    """n vehicles: OEM provisioning certificate (enrolled), contract, signed CertificateInstallationReq body —
    or, with ``per_vehicle`` > 1, n request bodies from n / per_vehicle vehicles, each body distinct."""
    from pki.cps.exi import CertificateInstallationReq, MessageHeader, V2GMessage, X509IssuerSerial, encode_message
    from pki.cps.xmldsig import sign_elements

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        roots = []
        for name in ("v2g-root", "mo-root"):  # the roots the vehicle trusts (ListOfRootCertificateIDs)
            cert = x509.load_pem_x509_certificate(run([V2GPKI, "chain", name], srv.env).encode())
            roots.append(X509IssuerSerial(cert.subject.rfc4514_string(), cert.serial_number))
        out: list[dict[str, Any]] = []
        for _ in range(n // per_vehicle if per_vehicle > 1 else n):
            pcid, key, cert, emaid = _vehicle(c, srv, "oem-prov", ec.SECP256R1(), hashes.SHA256())
            for i in range(per_vehicle):
                # a distinct Id per request: a distinct signed body, so not a replay of another (--fresh)
                body = CertificateInstallationReq(f"id{i + 1}", cert.public_bytes(serialization.Encoding.DER),
                                                  tuple(roots))
                exi = encode_message(V2GMessage(MessageHeader(secrets.token_bytes(8),
                                                              signature=sign_elements([body], key)), body))
                out.append({"pcid": pcid, "emaid": emaid, "key": key, "cert": cert, "path": PATH["2"], "order": (i, len(out)),
                            "json": json.dumps({"iso15118SchemaVersion": ISO2, "action": "Install",
                                                "exiRequest": base64.b64encode(exi).decode()}).encode()})
    # round-robin over the vehicles (every vehicle's first request, then every second one, ...): requests in
    # flight at the same time are different vehicles', as in a fleet
    return sorted(out, key=lambda v: v["order"])


def _sign20(chain_node: Any, key: ec.EllipticCurvePrivateKey) -> Any:
    """The vehicle's header signature of a -20 request: SHA-512 of the EXI OEMProvisioningCertificateChain
    fragment, SignedInfo (xmldsig grammar) signed ECDSA-SHA512, r ‖ s (what tests/peers/josev_ev20.py does)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from pki.cps.crypto20 import DIGEST_SHA512, ECDSA_SHA512
    from pki.cps.exi.messages import Reference, Signature, SignedInfo, encode_signed_info
    from pki.cps.exi.messages20 import encode_fragment20

    si = SignedInfo((Reference("#id1", hashlib.sha512(encode_fragment20([chain_node])).digest(), DIGEST_SHA512),),
                    signature_method=ECDSA_SHA512)
    r, s_ = decode_dss_signature(key.sign(encode_signed_info(si), ec.ECDSA(hashes.SHA512())))
    return Signature(si, r.to_bytes(66, "big") + s_.to_bytes(66, "big"))


def make_vehicles20(srv: Server, n: int) -> list[dict[str, Any]]:
    """n ISO 15118-20 vehicles: P-521 OEM provisioning certificate (oem-prov-20), contract, signed -20 request."""
    from pki.cps.exi import X509IssuerSerial
    from pki.cps.exi.messages20 import CertificateInstallationReq20, Chain20, Header20, encode_message20

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        roots = []
        for name in ("v2g-root-20", "mo-root-20"):
            cert = x509.load_pem_x509_certificate(run([V2GPKI, "chain", name], srv.env).encode())
            roots.append(X509IssuerSerial(cert.subject.rfc4514_string(), cert.serial_number))
        subs = [x509.load_pem_x509_certificate(run([V2GPKI, "chain", name], srv.env).encode())
                .public_bytes(serialization.Encoding.DER) for name in ("oem-sub2-20", "oem-sub1-20")]
        out = []
        for _ in range(n):
            pcid, key, cert, emaid = _vehicle(c, srv, "oem-prov-20", ec.SECP521R1(), hashes.SHA512())
            chain = Chain20(cert.public_bytes(serialization.Encoding.DER), tuple(subs), "id1")
            node = chain.to_node("OEMProvisioningCertificateChain")
            req = CertificateInstallationReq20(Header20(secrets.token_bytes(8), int(time.time()), _sign20(node, key)),
                                               chain, tuple(roots), 1)
            out.append({"pcid": pcid, "emaid": emaid, "key": key, "cert": cert, "path": PATH["20"],
                        "json": json.dumps({"iso15118SchemaVersion": ISO20, "action": "Install",
                                            "exiRequest": base64.b64encode(encode_message20(req)).decode()
                                            }).encode()})
    return out


# -- load ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    concurrency: int
    seconds: float
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0  # user + system time of the uvicorn worker processes during the run
    percentiles: dict[float, float] = field(default_factory=dict)  # ms, when the generator reports them (wrk)
    mean_ms: float | None = None
    spread: str = ""  # connections per worker a moment into the run (wrk only), e.g. "4/4"
    db_cpu_s: float = 0.0  # user + system time of the local PostgreSQL server's processes (0 on SQLite)
    machine: dict[str, float] = field(default_factory=dict)  # /proc/stat shares during the run: idle, steal
    sent_upto: int = 0  # load(): one past the highest index of ``vehicles`` sent (thread i sends i, i + c, …)

    @property
    def db_cpu_ms(self) -> float:
        return 1000 * self.db_cpu_s / self.ok if self.ok else float("nan")

    @property
    def ceiling(self) -> float:
        """Installations/s the machine could give if every CPU second it was not robbed of (steal) went to
        this work: cores × (1 − steal) / (server + database + generator CPU per installation). A run near
        its ceiling is CPU-bound; a target above it needs less CPU per installation, not tuning."""
        per = (self.server_cpu_s + self.db_cpu_s + self.client_cpu_s) / self.ok if self.ok else 0.0
        if per <= 0:
            return float("nan")
        return (os.cpu_count() or 1) * (1 - self.machine.get("steal", 0.0)) / per

    @property
    def server_cpu_ms(self) -> float:
        """Server CPU per installation: the figure a busy machine distorts least."""
        return 1000 * self.server_cpu_s / self.ok if self.ok else float("nan")

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        if p in self.percentiles:
            return self.percentiles[p]
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


def connection_spread(srv: Server) -> str:
    """Established client connections per worker process, e.g. "4/4" — how the kernel's accept race
    spread the generator's keep-alive connections over the workers (an uneven spread, such as 7/1, leaves
    one worker idle while the other queues). Empty when `ss` is missing."""
    if srv.proc is None or shutil.which("ss") is None:
        return ""
    port = srv.url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    per = Counter(re.findall(r"pid=(\d+)", out))
    return "/".join(str(per.get(str(pid), 0)) for pid in uvicorn_workers(srv.proc.pid))


def server_cpu(srv: Server) -> float:
    """CPU seconds (user + system) used so far by the server's worker processes."""
    if srv.proc is None:
        return 0.0
    return _proc_cpu(worker_pids(srv.proc.pid))


def _proc_cpu(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def db_cpu(srv: Server) -> float:
    """CPU seconds used so far by the local PostgreSQL server: every process named ``postgres`` (backends,
    WAL writer, checkpointer — the commits' fsyncs are theirs too). 0 for SQLite, which runs inside the
    workers and is already in their CPU. On a machine that runs other PostgreSQL clusters this over-counts;
    the bench's is the only one on the CI machines."""
    if srv.dbname is None:
        return 0.0
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return _proc_cpu(pids)


def machine_ticks() -> list[int]:
    """The aggregate line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def machine_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """Idle and steal as shares of the machine's CPU time between two :func:`machine_ticks` (steal: time a
    virtual CPU wanted to run and the hypervisor ran something else — CPU this machine did not have)."""
    d = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(d[:8]) or 1
    return {"idle": (d[3] + d[4]) / total, "steal": (d[7] if len(d) > 7 else 0) / total}


def load(srv: Server, vehicles: list[dict[str, Any]], conc: int, seconds: float) -> tuple[Result, bytes | None]:
    res = Result(conc, seconds)
    lock = threading.Lock()
    sample: list[bytes] = []
    headers = {"Authorization": f"Bearer {srv.keys['cpo']}", "Content-Type": "application/json"}
    start_evt = threading.Event()
    deadline = [0.0]

    def worker(i: int) -> None:
        lat: list[float] = []
        ok = err = 0
        errs: list[str] = []
        with httpx.Client(base_url=srv.url, timeout=30, headers=headers) as c:
            c.get("/healthz")  # open the keep-alive connection before the clock starts
            start_evt.wait()
            j = i
            while time.perf_counter() < deadline[0]:
                v = vehicles[j % len(vehicles)]
                j += conc
                t = time.perf_counter()
                try:
                    r = c.post(v["path"], content=v["json"])
                    good = r.status_code == 200 and r.json().get("status") == "Accepted"
                except httpx.HTTPError as exc:
                    good, r = False, None
                    errs.append(repr(exc))
                lat.append(time.perf_counter() - t)
                if good:
                    ok += 1
                    if not sample:
                        sample.append(r.content)  # type: ignore[union-attr]
                else:
                    err += 1
                    if r is not None and len(errs) < 3:
                        errs.append(f"{r.status_code} {r.text[:200]}")
        with lock:
            res.ok += ok
            res.errors += err
            if j > i:
                res.sent_upto = max(res.sent_upto, j - conc + 1)
            res.latencies.extend(lat)
            res.error_samples.extend(errs[:3])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    cpu0, scpu0, dcpu0, m0 = time.process_time(), server_cpu(srv), db_cpu(srv), machine_ticks()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start_evt.set()
    for t in threads:
        t.join()
    res.seconds = time.perf_counter() - t0
    res.client_cpu_s = time.process_time() - cpu0
    res.server_cpu_s = server_cpu(srv) - scpu0
    res.db_cpu_s = db_cpu(srv) - dcpu0
    res.machine = machine_shares(m0, machine_ticks())
    return res, (sample[0] if sample else None)


# bench/enrollment.py's rotation over one request body per line, plus a check of every answer (wrk itself
# only counts non-2xx) and a summary line the parser below reads.
WRK_LUA = ROTATE_LUA + """
not_accepted = 0
response = function(status, headers, body)
  if status ~= 200 or not string.find(body, '"status":"Accepted"', 1, true) then
    not_accepted = not_accepted + 1
  end
end
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("not_accepted") end
  io.write(string.format("BENCH requests %d not_accepted %d p50 %d p99 %d mean %f\\n", summary.requests, bad,
           latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def load_wrk(srv: Server, vehicles: list[dict[str, Any]], conc: int, seconds: float, d: Path,
             start: int | None = None) -> Result:
    """The same closed loop as :func:`load`, generated by wrk (C, LuaJIT): on a 2-core machine the Python
    generator's own CPU (a fifth of a core) is taken from the server it measures."""
    lua, bodies = d / "contract.lua", d / "bodies.jsonl"
    lua.write_text(WRK_LUA)
    bodies.write_text("".join(v["json"].decode() + "\n" for v in vehicles))
    # each wrk thread rotates through the bodies from the same start: with a start given (--fresh), one thread
    # (it drives c connections), so no body is sent twice and the bodies sent are a prefix of the list
    cmd = ["wrk", "-t", str(min(conc, 2) if start is None else 1), "-c", str(conc), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(lua), "-H", f"Authorization: Bearer {srv.keys['cpo']}", "-H", "Content-Type: application/json",
           f"{srv.url}{vehicles[0]['path']}", "--", str(bodies),
           str(secrets.randbelow(len(vehicles)) if start is None else start)]
    children0 = os.times()
    scpu0, dcpu0, m0 = server_cpu(srv), db_cpu(srv), machine_ticks()
    t0 = time.perf_counter()
    spread: list[str] = []
    sampler = threading.Timer(min(2.0, seconds / 2), lambda: spread.append(connection_spread(srv)))
    sampler.start()
    out = subprocess.run(cmd, capture_output=True, text=True)
    res = Result(conc, time.perf_counter() - t0)
    sampler.join()
    res.spread = spread[0] if spread else ""
    res.server_cpu_s = server_cpu(srv) - scpu0
    res.db_cpu_s = db_cpu(srv) - dcpu0
    res.machine = machine_shares(m0, machine_ticks())
    children1 = os.times()
    res.client_cpu_s = (children1.children_user - children0.children_user
                        + children1.children_system - children0.children_system)
    m = re.search(r"BENCH requests (\d+) not_accepted (\d+) p50 (\d+) p99 (\d+) mean ([\d.]+)", out.stdout)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stdout[-800:]} {out.stderr[-800:]}")
    total, bad = int(m.group(1)), int(m.group(2))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout)
    res.ok, res.errors = total - bad, bad + (sum(int(g) for g in sock.groups()) if sock else 0)
    # wrk's -d is whole seconds and its own clock; rates use the wall time of the run (start-up included,
    # a few ms: conservative)
    res.percentiles = {50: int(m.group(3)) / 1000, 99: int(m.group(4)) / 1000}
    res.mean_ms = float(m.group(5)) / 1000
    if bad:
        res.error_samples.append(f"{bad} answers were not HTTP 200 with status Accepted")
    return res


def check_sample20(raw: bytes, vehicles: list[dict[str, Any]]) -> str:
    """A -20 answer checked as a vehicle would: the ecdsa-sha512 CPS signature over SignedInfo whose digest is
    SignedInstallationData's, and the AES-256-GCM contract key whose scalar gives the certificate's key."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pki.cps.crypto20 import aad, kdf
    from pki.cps.exi.messages import encode_signed_info
    from pki.cps.exi.messages20 import CertificateInstallationRes20, decode_message20, encode_fragment20

    res = decode_message20(base64.b64decode(json.loads(raw)["exiResponse"]))
    assert isinstance(res, CertificateInstallationRes20) and res.response_code == "OK"
    sd, sig = res.signed_installation_data, res.header.signature
    assert sig is not None
    assert sig.signed_info.references[0].digest_value == hashlib.sha512(encode_fragment20([sd.to_node()])).digest()
    cps_key = x509.load_der_x509_certificate(res.cps_chain.certificate).public_key()
    assert isinstance(cps_key, ec.EllipticCurvePublicKey)
    value = sig.signature_value
    cps_key.verify(encode_dss_signature(int.from_bytes(value[:66], "big"), int.from_bytes(value[66:], "big")),
                   encode_signed_info(sig.signed_info), ec.ECDSA(hashes.SHA512()))
    cert = x509.load_der_x509_certificate(sd.contract_chain.certificate)
    emaid = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    v = next(v for v in vehicles if v["emaid"] == emaid)
    z = v["key"].exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP521R1(), sd.dh_public_key))
    blob = sd.encrypted_private_key
    scalar = AESGCM(kdf(z)).decrypt(blob[:12], blob[12:], aad(v["pcid"], cert))
    got = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP521R1()).public_key().public_numbers()
    assert got == cert.public_key().public_numbers()  # type: ignore[union-attr]
    return f"checked (-20): {emaid}, contract serial {cert.serial_number:x}, signature and key OK"


def check_sample(raw: bytes, vehicles: list[dict[str, Any]]) -> str:
    """Decode one answer and check it as a vehicle would: CPS signature, contract key vs certificate."""
    if vehicles and vehicles[0]["path"] == PATH["20"]:
        return check_sample20(raw, vehicles)
    from pki.cps.exi import CertificateInstallationRes, decode_message
    from pki.cps.keywrap import unwrap_contract_key
    from pki.cps.xmldsig import verify_response

    msg = decode_message(base64.b64decode(json.loads(raw)["exiResponse"]))
    body = msg.body
    assert isinstance(body, CertificateInstallationRes) and body.response_code == "OK"
    verify_response(msg, x509.load_der_x509_certificate(body.sa_provisioning_certificate_chain.certificate))
    v = next(v for v in vehicles if v["emaid"] == body.emaid.value)
    cert = x509.load_der_x509_certificate(body.contract_signature_cert_chain.certificate)
    unwrap_contract_key(body.contract_signature_encrypted_private_key.value, body.dh_public_key.value, v["key"], cert)
    return f"checked: {body.emaid.value}, contract serial {cert.serial_number:x}, signature and key OK"


def persisted(srv: Server) -> int:
    code = ("from sqlmodel import select, func\nfrom pki.config import Settings\nfrom pki.store.db import Database\n"
            "from pki.store.models import Certificate\ndb = Database(Settings().db_url)\n"
            "with db.session() as s:\n"
            "    print(s.exec(select(func.count()).select_from(Certificate)"
            ".where(Certificate.profile.in_(['contract', 'contract-20']))).one())\n")
    out = subprocess.run([sys.executable, "-c", code], env=srv.env, capture_output=True, text=True, cwd=REPO)
    return int(out.stdout.strip() or -1)


# -- profile ---------------------------------------------------------------------------------------------

# Inclusive phases: a sample counts for the first of these frames found from the top of its stack down.
PHASES = [
    ("EXI decode of the request", r"decode_message \(.*pki/cps/exi"),
    ("request signature (re-encode + ECDSA verify)", r"verify_request \("),
    ("OEM chain/revocation check", r"chain_status \("),
    ("contract lookup", r"default_contract_for \("),
    ("contract key generation", r"_contract_key \("),
    # the issuing thread (IssueBatcher: intents, HSM signature, rows, audit, OCSP pre-signing) included
    ("contract certificate issuance (engine, HSM, DB)", r"\bissue \(.*pki/issuance|IssueBatcher\._run|_issue_prepared \("),
    ("key wrapping (ECDH/KDF/AES)", r"wrap_contract_key \("),
    ("CPS signature (fragments, SignedInfo, HSM)", r"sign_contract_response \("),
    ("EXI encode of the response", r"encode_message \(.*pki/cps/exi"),
    ("CPS signer / CA lookups", r"_cps_signer \(|_pick_ca \("),
    ("rest of deliver()", r"\bdeliver \(.*pki/cps/service|build_delivery \("),
    ("API key check", r"api/auth\.py"),
    ("HTTP, FastAPI, JSON, pydantic", r"uvicorn|starlette|fastapi|h11|pydantic|anyio"),
]
AREAS = [
    ("EXI codec", r"pki/cps/exi/"), ("xmldsig/keywrap", r"pki/cps/(xmldsig|keywrap)"),
    ("HSM (python-pkcs11, SoftHSM)", r"pkcs11|hsm/"), ("cryptography", r"cryptography"),
    ("SQLAlchemy/sqlmodel", r"sqlalchemy|sqlmodel"), ("DB driver", r"psycopg|sqlite3"),
    ("pki engine/lint/audit", r"pki/(issuance|lint|audit|profiles|csr|names|contracts|serials|ocsp)"),
    ("pkilint", r"pkilint|pyasn1"), ("CPS service", r"pki/cps/service"),
    ("HTTP/ASGI/FastAPI/pydantic", r"uvicorn|starlette|fastapi|h11|pydantic|anyio|httptools|json"),
]


def worker_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out.extend(int(k) for k in kids)
    return out


def uvicorn_workers(pid: int) -> list[int]:
    """The uvicorn worker processes among the server's children (not e.g. multiprocessing's tracker)."""
    return [p for p in worker_pids(pid)
            if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")] \
        or worker_pids(pid)


def profile(srv: Server, vehicles: list[dict[str, Any]], conc: int, seconds: float, d: Path) -> str:
    assert srv.proc is not None
    pids = uvicorn_workers(srv.proc.pid)
    if not pids:
        return "no worker process found"
    raw = d / "py-spy.txt"
    spy = subprocess.Popen([PY_SPY, "record", "--pid", str(pids[0]), "--format", "raw", "--rate", "200",
                            "--duration", str(int(seconds)), "--output", str(raw), "--nonblocking", "--gil"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)
    load(srv, vehicles, conc, seconds)
    try:
        _, err = spy.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
        return "py-spy did not finish"
    if not raw.exists():
        return f"py-spy failed: {err.decode()[-500:]}"
    phases: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        phase = next((name for name, rx in PHASES if any(re.search(rx, f) for f in frames)), "other (idle loop, GC, …)")
        phases[phase] += count
        leaf = frames[-1]
        areas[next((name for name, rx in AREAS if re.search(rx, leaf)), "other")] += count
        leaves[re.sub(r":\d+\)", ")", leaf)] += count
    lines = [f"py-spy, worker pid {pids[0]} of {len(pids)}, {total} samples at 200 Hz over {seconds:g}s "
             f"(c={conc}); --gil: only the thread holding the GIL is sampled, i.e. where the worker's Python CPU "
             f"goes (waits on PostgreSQL, the HSM's own signing time without the GIL and idle threads are not in it)", "", "| phase (inclusive) | share |", "|---|---|"]
    lines += [f"| {k} | {v / total:.1%} |" for k, v in phases.most_common()]
    lines += ["", "| area (own time) | share |", "|---|---|"]
    lines += [f"| {k} | {v / total:.1%} |" for k, v in areas.most_common()]
    lines += ["", "top functions (own time):"]
    lines += [f"  {v / total:6.1%}  {k}" for k, v in leaves.most_common(15)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("V2GPKI_WORKERS", "2")))
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--vehicles", type=int, default=32)
    ap.add_argument("--iso", default="2,20", help="ISO 15118 parts to measure, in this order (2, 20 or 2,20)")
    ap.add_argument("--fresh", action="store_true",
                    help="ISO 15118-2: every request distinct (the installation path, not the replay)")
    ap.add_argument("--first", action="store_true",
                    help="ISO 15118-2: every request a distinct vehicle's first installation (--fresh, one request "
                         "per vehicle: nothing superseded)")
    ap.add_argument("--fresh-requests", type=int, default=12000,
                    help="with --fresh: distinct -2 requests made beforehand (rotated through; none is re-sent)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--keep", help="keep the work directory here")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the server (repeatable), e.g. V2GPKI_FASTLANE_THREADS=2")
    ap.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python",
                    help="load generator (default wrk when installed: apt-get install -y wrk)")
    args = ap.parse_args()
    if args.first:  # one distinct request per vehicle, so none supersedes an earlier certificate
        args.fresh, args.vehicles = True, args.fresh_requests
    concs = [int(c) for c in args.concurrency.split(",")]
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="v2gpki-bench-contract-"))
    d.mkdir(parents=True, exist_ok=True)
    pg_admin = os.environ.get("V2GPKI_TEST_PG_ADMIN_URL")
    print(f"# {os.cpu_count()} CPUs; {args.workers} workers; {args.db}; {args.vehicles} vehicles; "
          f"{args.seconds:g}s per run; work dir {d}", file=sys.stderr)
    srv = prepare(d, args.db, pg_admin)
    for item in args.env:
        name, _, value = item.partition("=")
        srv.env[name] = value
    results: list[tuple[str, Result]] = []
    prof = ""
    isos = [i.strip() for i in args.iso.split(",") if i.strip()]
    try:
        start(srv, d, args.workers)
        counted = 0
        fleets = {iso: make_vehicles20(srv, args.vehicles) if iso == "20" else
                  make_vehicles(srv, args.fresh_requests, args.fresh_requests // args.vehicles) if args.fresh else
                  make_vehicles(srv, args.vehicles) for iso in isos}
        for iso in isos:
            pool = fleets[iso]
            fresh = args.fresh and iso == "2"
            cursor = 0  # --fresh: the bodies before it have been sent

            def unsent(sent: int, pool: list[dict[str, Any]] = pool) -> list[dict[str, Any]]:
                nonlocal cursor
                cursor += sent
                if cursor >= len(pool):
                    raise SystemExit(f"--fresh: {cursor} requests sent, {len(pool)} made: raise --fresh-requests")
                return pool[cursor:]

            vehicles = pool
            warm, sample = load(srv, vehicles, max(concs), 3)  # connections, pools, lazy grammars in every worker
            if fresh:  # every request sent or in flight is used up
                # the generator's threads do not keep pace, so the bodies sent are not a prefix: skip past the last
                vehicles = unsent(warm.sent_upto)
            counted += warm.ok
            if warm.errors or sample is None:
                raise SystemExit(f"warm-up (ISO 15118-{iso}) failed: {warm.errors} errors, "
                                 f"e.g. {warm.error_samples[:2]}")
            print(f"# {check_sample(sample, pool)}", file=sys.stderr)
            for conc in concs:
                if args.client == "wrk":
                    r = load_wrk(srv, vehicles, conc, args.seconds, d, start=0 if fresh else None)
                    if fresh:
                        vehicles = unsent(r.ok + r.errors + conc)
                    extra, sample = load(srv, vehicles, 1, 0.1)  # and one answer to decode and check
                    counted += extra.ok
                    if fresh:
                        vehicles = unsent(extra.sent_upto)
                else:
                    r, sample = load(srv, vehicles, conc, args.seconds)
                    if fresh:
                        vehicles = unsent(r.sent_upto)
                results.append((iso + ("-first" if fresh and args.first else "-fresh" if fresh else ""), r))
                print(f"-{iso:<2} c={conc:<3} {r.rps:7.1f} installations/s  p50 {r.pct(50):6.1f} ms  "
                      f"p99 {r.pct(99):6.1f} ms  server CPU {r.server_cpu_ms:5.1f} ms/installation  ({r.ok} ok, "
                      f"{r.errors} errors; load generator CPU {r.client_cpu_s / r.seconds:.0%} of a core; load "
                      f"average {os.getloadavg()[0]:.1f}" + (f"; connections per worker {r.spread}" if r.spread
                                                              else "") + ")", file=sys.stderr, flush=True)
                print(f"      machine: {r.machine.get('idle', 0):.0%} idle, {r.machine.get('steal', 0):.0%} stolen by "
                      f"the hypervisor; database CPU {r.db_cpu_ms:.1f} ms/installation; CPU ceiling ≈ "
                      f"{r.ceiling:.0f}/s (cores × (1 − steal) / CPU per installation of server + database + "
                      f"generator)", file=sys.stderr, flush=True)
                if r.error_samples:
                    print(f"   errors: {r.error_samples[:3]}", file=sys.stderr)
                counted += r.ok
                if sample is not None:
                    check_sample(sample, pool)
        # the profile's run sends what is left unsent (--fresh), so it too measures installations, not replays
        vehicles = vehicles if args.fresh and isos[-1] == "2" else fleets[isos[-1]]
        stored = persisted(srv)
        if args.client == "wrk":
            # wrk stops at its deadline with up to c requests in flight, which the server still completes
            print(f"# persisted: {stored} contract certificates; accepted and counted by the generators: "
                  f"{counted} (+ at most {sum(concs)} in flight when wrk stopped; " + (
                      "--fresh: every -2 request distinct, so one certificate per accepted -2 request)" if args.fresh
                      else "-2 retries re-send the kept answer: one -2 certificate per vehicle)"), file=sys.stderr)
        else:
            print(f"# persisted: {stored} contract certificates for {counted} accepted installations "
                  f"(+ none before the runs; -2 retries re-send the kept answer: one -2 certificate per vehicle)",
                  file=sys.stderr)
        if not args.no_profile:
            if Path(PY_SPY).exists():
                prof = profile(srv, vehicles, max(concs), min(args.seconds, 10), d)
            else:
                prof = "py-spy not installed (pip install py-spy)"
    finally:
        stop(srv)
        if srv.dbname and pg_admin:
            import psycopg

            with psycopg.connect(pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{srv.dbname}" WITH (FORCE)')
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    print("\n| ISO 15118 | db | workers | concurrency | installations/s | p50 ms | p99 ms | mean ms | server CPU "
          "ms/inst. | database CPU ms/inst. | steal | CPU ceiling /s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for iso, r in results:
        mean = (r.mean_ms if r.mean_ms is not None
                else statistics.fmean(r.latencies) * 1000 if r.latencies else float("nan"))
        print(f"| -{iso} | {args.db} | {args.workers} | {r.concurrency} | {r.rps:.1f} | {r.pct(50):.1f} | {r.pct(99):.1f} | "
              f"{mean:.1f} | {r.server_cpu_ms:.1f} | {r.db_cpu_ms:.1f} | {r.machine.get('steal', 0):.0%} | "
              f"{r.ceiling:.0f} | {r.errors} |")
    if prof:
        print("\n" + prof)
    if args.json:
        Path(args.json).write_text(json.dumps([{"iso15118": iso, "db": args.db, "workers": args.workers, "concurrency": r.concurrency,
                                                "rps": r.rps, "p50_ms": r.pct(50), "p99_ms": r.pct(99),
                                                "server_cpu_ms": r.server_cpu_ms, "db_cpu_ms": r.db_cpu_ms,
                                                "steal": r.machine.get("steal"), "idle": r.machine.get("idle"),
                                                "ceiling_per_s": r.ceiling,
                                                "ok": r.ok, "errors": r.errors} for iso, r in results],
                                              indent=1))
    return 1 if any(r.errors for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
