"""Certificate issuance throughput next to the raw SoftHSM2 signing rate, measured in the same run.

    .venv/bin/python bench/issuance.py [--n 2000] [--db sqlite|postgresql|both] [--batch 64] [--no-profile]
    .venv/bin/python bench/issuance.py --p11-kit --compare --db sqlite [--module PATH]   # a "network HSM"

--module PATH signs through another PKCS#11 module than SoftHSM2's (V2GPKI_PKCS11_MODULE). With --p11-kit the
bench exports its own SoftHSM2 token with `p11-kit server` on a unix socket, sets P11_KIT_SERVER_ADDRESS (for
its spawned processes too) and signs through p11-kit's client module (found at run time unless --module
names it): every PKCS#11 call becomes a round trip over the socket, as with a network HSM. --compare runs
every measurement twice on the same token and database, SoftHSM2 directly and through the module, and
prints the ratios (through / direct).

What is measured, per database (SQLite file in a temp dir; PostgreSQL: a scratch database created from
$V2GPKI_TEST_PG_ADMIN_URL or --pg-admin-url, dropped afterwards):
  * raw     — python-pkcs11 `key.sign(digest, CKM_ECDSA)` with a P-256 key in a fresh SoftHSM2 token:
              the ceiling for anything that signs with the token (one library instance per process);
  * engine  — SECC leaves issued from pre-generated P-256 CSRs through pki.issuance.Engine: CSR parse and
              RA checks, TBS from the profile, lint of the software-signed twin (profile rules, size bound,
              pkilint in the default "shape" mode), intents committed, CKM_ECDSA in the token, certificate
              rows + intents marked issued + hash-chained audit rows committed. Engine.issue_many batches
              --batch requests into two transactions; batch=1 is the one-request-per-call figure.
Both with 1 process and with 2 processes (spawned; each its own library instance, token session and
database connection — the PKCS#11 calls of one process are serialised behind one lock, see hsm/pkcs11.py).
Ratios engine/raw are printed against the raw rate with the same process count. The engine here is the
bare Engine; `build_context` also installs issuance hooks (OCSP pre-signing: a second token signature
per certificate), reported on one extra line as "engine+hooks".

Then a cProfile of one single-process batched run, grouped by where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import multiprocessing as mp
import os
import pstats
import secrets
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

PIN = "bench-pin-1234"
HIERARCHY = """\
organization: V2G PKI Bench
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA, ocsp_signer: false}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: CPO Sub-CA 1, ocsp_signer: false}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: CPO Sub-CA 2}
"""
RAW_LABEL = "bench-raw-p256"


@dataclass(frozen=True)
class Setup:
    """Everything a (spawned) worker needs to open its own library, session and database connection."""

    softhsm_conf: str
    token: str
    module: str
    db_url: str
    policies: str
    work: str


# -- set-up ------------------------------------------------------------------------------------------------


def make_csrs(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"DE*ICE*E{i:08d}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench CPO"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "CPO"),
        ])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return out


def prepare(work: Path, db_url: str, token: str, module: str) -> Setup:
    """A fresh SoftHSM2 token with a 3-CA hierarchy and one raw P-256 key, and a migrated database."""
    from hsm.keystore import KeyAlg
    from hsm.pkcs11 import DEFAULT_MODULE, Pkcs11KeyStore
    from hsm.token import init_softhsm_token
    from pki.hierarchy import init_hierarchy
    from pki.issuance import Engine
    from pki.profiles import load_hierarchy, load_profiles
    from pki.store.db import Database

    # One token directory for all runs: SoftHSM reads SOFTHSM2_CONF once per C_Initialize.
    paths = init_softhsm_token(work.parent / "softhsm", token, pin=PIN)  # also sets SOFTHSM2_CONF
    (work / "hierarchy.yaml").write_text(HIERARCHY)
    ks = Pkcs11KeyStore(DEFAULT_MODULE, token, PIN)  # keys made directly; --module signs with them
    profiles = load_profiles(REPO / "pki" / "policies")
    db = Database(db_url)
    db.migrate()
    engine = Engine(db, ks, profiles, "http://127.0.0.1:8000")
    init_hierarchy(engine, load_hierarchy(work / "hierarchy.yaml", profiles))
    ks.create_key(RAW_LABEL, KeyAlg.P256)
    db.dispose()
    return Setup(str(paths.conf), token, module, db_url, str(REPO / "pki" / "policies"), str(work))


class Worker:
    """One process's engine: its own PKCS#11 library instance and session, its own DB engine."""

    def __init__(self, st: Setup, *, hooks: bool = False) -> None:
        os.environ["SOFTHSM2_CONF"] = st.softhsm_conf
        from hsm.pkcs11 import Pkcs11KeyStore
        from pki.issuance import Engine
        from pki.profiles import load_profiles
        from pki.store.db import Database

        self.ks = Pkcs11KeyStore(st.module, st.token, PIN)
        self.db = Database(st.db_url)
        self.profiles = load_profiles(Path(st.policies))
        self.engine = Engine(self.db, self.ks, self.profiles, "http://127.0.0.1:8000")
        if hooks:
            self._install_context_hooks(st)

    def _install_context_hooks(self, st: Setup) -> None:
        # The engine as build_context wires it (OCSP pre-signing, outbox rows, metrics: pki/wiring.py),
        # on this worker's key store.
        from pki.config import Settings
        from pki.wiring import build_context

        settings = Settings(home=Path(st.work) / "home", database_url=st.db_url, token_label=st.token,
                            hsm_pin=PIN, policies_dir=Path(st.policies))  # type: ignore[arg-type]
        ctx = build_context(settings, keystore=self.ks, migrate=False)
        self.db, self.engine = ctx.db, ctx.engine

    def raw_key(self) -> Any:
        """The python-pkcs11 private key object on this store's session (used outside the store's lock:
        the raw figure is the library's own)."""
        from pkcs11 import ObjectClass

        return self.ks.session_call(lambda s: s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=RAW_LABEL))

    def raw(self, n: int) -> None:
        from pkcs11 import Mechanism

        key = self.raw_key()
        digest = hashlib.sha256(b"bench").digest()
        for _ in range(n):
            key.sign(digest, mechanism=Mechanism.ECDSA)

    def issue(self, csrs: list[bytes], batch: int) -> None:
        from pki.csr import check_csr, parse_csr
        from pki.issuance import IssueRequest

        if batch == 1:
            for data in csrs:
                self.engine.issue_from_csr("secc", data, actor="bench")
            return
        profile = self.profiles.get("secc")
        for i in range(0, len(csrs), batch):
            reqs = []
            for data in csrs[i:i + batch]:
                c = check_csr(profile, parse_csr(data))
                reqs.append(IssueRequest(profile="secc", public_key=c.public_key, subject=c.subject,
                                         identifier=c.identifier, actor="bench"))
            self.engine.issue_many(reqs)


# -- measurements --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is what a busy machine distorts least; the
    wall time is the real figure (it includes waiting for the database server and for fsync)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _proc_main(st: Setup, job: str, arg: Any, batch: int, barrier: Any, q: Any) -> None:
    try:
        w = Worker(st)
        if job == "raw":
            w.raw(50)  # warm-up
            run: Callable[[], None] = lambda: w.raw(arg)  # noqa: E731
        else:
            w.issue(arg[:batch], batch)  # warm-up: CA cache, signer, first-of-shape pkilint
            run = lambda: w.issue(arg[batch:], batch)  # noqa: E731
        barrier.wait(timeout=600)
        t0 = time.perf_counter()
        run()
        q.put((t0, time.perf_counter(), None))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        q.put((0.0, 0.0, repr(exc)))


def in_processes(st: Setup, job: str, args: list[Any], batch: int) -> float:
    """Run ``job`` in len(args) spawned processes started together; the wall time from the first start
    to the last finish (perf_counter is system-wide monotonic on Linux)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc_main, args=(st, job, a, batch, barrier, q)) for a in args]
    for p in procs:
        p.start()
    res = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    errors = [e for *_, e in res if e]
    if errors:
        raise RuntimeError("; ".join(errors))
    return max(r[1] for r in res) - min(r[0] for r in res)


def count_rows(db_url: str) -> tuple[int, int, int]:
    from sqlalchemy import func
    from sqlmodel import select

    from pki.store.db import Database
    from pki.store.models import AuditEvent, Certificate, IssuanceIntent

    db = Database(db_url)
    with db.session() as s:
        out = tuple(int(s.exec(select(func.count()).select_from(m)).one())
                    for m in (Certificate, IssuanceIntent, AuditEvent))
    db.dispose()
    return out  # type: ignore[return-value]


@dataclass
class Result:
    db: str  # database, and " via <module>" when not SoftHSM2 directly
    what: str
    procs: int
    batch: int | None
    n: int
    seconds: float
    cpu_seconds: float | None = None  # single-process runs only

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def cpu_rate(self) -> float | None:
        return self.n / self.cpu_seconds if self.cpu_seconds else None


def run_db(name: str, db_url: str, st: Setup, csrs: list[bytes], args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    n, batch = args.n, args.batch
    n_raw = args.raw_n
    before = count_rows(db_url)

    # 1 process (this one): raw, engine batched, engine batch=1, engine with build_context's hooks.
    w = Worker(st)
    w.raw(50)
    results.append(Result(name, "raw CKM_ECDSA P-256", 1, None, n_raw, *timed(lambda: w.raw(n_raw))))
    w.issue(csrs[:batch], batch)  # warm-up
    used = batch
    part = csrs[used:used + n]
    used += n
    results.append(Result(name, "engine", 1, batch, len(part), *timed(lambda: w.issue(part, batch))))
    part1 = csrs[used:used + args.n1]
    used += args.n1
    results.append(Result(name, "engine", 1, 1, len(part1), *timed(lambda: w.issue(part1, 1))))
    if not args.no_hooks:
        wh = Worker(st, hooks=True)
        wh.issue(csrs[used:used + batch], batch)
        used += batch
        parth = csrs[used:used + args.n1]
        used += args.n1
        results.append(Result(name, "engine+hooks (OCSP pre-sign)", 1, batch, len(parth),
                              *timed(lambda: wh.issue(parth, batch))))
    w.db.dispose()

    # 2 processes, spawned, each with its own library instance.
    t = in_processes(st, "raw", [n_raw // 2, n_raw // 2], batch)
    results.append(Result(name, "raw CKM_ECDSA P-256", 2, None, n_raw, t))
    half = n // 2
    shares = [csrs[used:used + batch + half], csrs[used + batch + half:used + 2 * (batch + half)]]
    used += 2 * (batch + half)
    t = in_processes(st, "engine", shares, batch)
    results.append(Result(name, "engine", 2, batch, 2 * half, t))
    assert used <= len(csrs)

    # Every issued certificate is persisted with its intent and audit event.
    after = count_rows(db_url)
    issued = used
    assert [a - b for a, b in zip(after, before, strict=True)] == [issued, issued, issued], (before, after, issued)
    return results


def profile_run(st: Setup, csrs: list[bytes], batch: int, top: int) -> str:
    w = Worker(st)
    w.issue(csrs[:batch], batch)
    prof = cProfile.Profile()
    prof.enable()
    w.issue(csrs[batch:], batch)
    prof.disable()
    w.db.dispose()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    buckets: dict[str, float] = defaultdict(float)
    for (path, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        buckets[_bucket(path, func)] += tt
    out = io.StringIO()
    print(f"  where the time goes ({len(csrs) - batch} certificates, batch {batch}, own time by area):", file=out)
    for k, v in sorted(buckets.items(), key=lambda kv: -kv[1]):
        if v / total >= 0.005:
            print(f"    {100 * v / total:5.1f}%  {k}", file=out)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print(f"  top {top} functions by own time:", file=out)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    for ln in lines[start:start + top + 1]:
        print("    " + ln.replace(str(REPO) + "/", "").replace(sys.prefix, "<venv>"), file=out)
    return out.getvalue()


def _bucket(path: str, func: str) -> str:
    if "sign" in func and ("_pkcs11" in path or path == "~" and func.startswith("<method 'sign")):
        return "token: SoftHSM2 CKM_ECDSA (python-pkcs11 sign)"
    rules = [
        ("_pkcs11", "token: other python-pkcs11 calls"),
        ("hsm/pkcs11", "hsm/pkcs11.py (lock, retries, r||s -> DER)"),
        ("pkilint", "pkilint"),
        ("pyasn1", "pkilint (pyasn1 decoding)"),
        ("pki/lint", "pki/lint.py (profile lint)"),
        ("pki/audit", "pki/audit.py (hash chain)"),
        ("pki/csr", "pki/csr.py (CSR parse, RA checks)"),
        ("pki/names", "pki/csr.py (CSR parse, RA checks)"),
        ("pki/issuance", "pki/issuance.py (build, orchestration)"),
        ("sqlalchemy", "database: SQLAlchemy"),
        ("sqlmodel", "database: SQLAlchemy"),
        ("psycopg", "database: driver (psycopg)"),
        ("sqlite3", "database: driver (sqlite3)"),
        ("cryptography", "cryptography (builders, twin signature, parsing)"),
        ("json", "json"),
        ("hashlib", "hashing"),
    ]
    for needle, name in rules:
        if needle in path:
            return name
    if path == "~":
        f = func.lower()
        if "sqlite3" in f or "execute" in f or "commit" in f:
            return "database: driver (sqlite3)"
        if "sha256" in f or "hash" in f or "digest" in f:
            return "hashing"
        if "sign" in f or "x509" in f or "ec" in f or "der" in f or "pem" in f or "load_" in f:
            return "cryptography (builders, twin signature, parsing)"
        return "builtins (other)"
    return "other Python"


# -- main -------------------------------------------------------------------------------------------------------


def pg_scratch(admin: str) -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"v2gpki_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{admin.rsplit('/', 1)[0]}/{name}", drop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="certificates per batched engine run (default 2000)")
    ap.add_argument("--n1", type=int, default=0, help="certificates for the batch=1 and hooks runs (default n/4)")
    ap.add_argument("--raw-n", type=int, default=0, help="raw signatures per run (default 4 n)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--pg-admin-url", default=os.environ.get("V2GPKI_TEST_PG_ADMIN_URL"),
                    help="PostgreSQL URL allowed to CREATE DATABASE (default $V2GPKI_TEST_PG_ADMIN_URL; "
                         "`eval \"$(bash scripts/services.sh)\"` sets it)")
    ap.add_argument("--no-hooks", action="store_true", help="skip the engine+hooks line")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--module", help="PKCS#11 module to sign through (default: SoftHSM2's, directly)")
    ap.add_argument("--p11-kit", action="store_true",
                    help="export the bench's token with `p11-kit server` and sign through p11-kit-client.so")
    ap.add_argument("--compare", action="store_true",
                    help="measure SoftHSM2 directly and through --module / --p11-kit, side by side")
    args = ap.parse_args()
    from hsm.pkcs11 import DEFAULT_MODULE

    module = args.module
    if args.p11_kit and module is None:
        from hsm import p11kit
        from pki.config import Settings

        configured = Settings().p11kit_client  # V2GPKI_P11KIT_CLIENT
        why = p11kit.available(configured)
        if why:
            ap.error(why)
        module = p11kit.client_module(configured)
    module = module or DEFAULT_MODULE
    if args.compare and module == DEFAULT_MODULE:
        ap.error("--compare needs --module or --p11-kit")
    paths = ([("direct", DEFAULT_MODULE)] if args.compare or module == DEFAULT_MODULE else []) + (
        [("p11-kit" if args.p11_kit else "module", module)] if module != DEFAULT_MODULE else [])
    args.n1 = args.n1 or max(args.batch, args.n // 4)
    args.raw_n = args.raw_n or 4 * args.n
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in dbs and not args.pg_admin_url:
        ap.error("PostgreSQL needs --pg-admin-url or V2GPKI_TEST_PG_ADMIN_URL (see scripts/services.sh)")

    per_db = (args.batch + args.n + args.n1 + (args.batch + args.n1) + 2 * (args.batch + args.n // 2)) * len(paths)
    print(f"generating {per_db * len(dbs)} P-256 CSRs ...", file=sys.stderr)
    all_csrs = make_csrs(per_db * len(dbs))
    results: list[Result] = []
    profiles: list[str] = []
    work_root = Path(tempfile.mkdtemp(prefix="v2gpki-bench-"))
    try:
        for k, name in enumerate(dbs):
            work = work_root / name
            work.mkdir()
            drop: Callable[[], None] | None = None
            if name == "sqlite":
                url = f"sqlite:///{work / 'bench.db'}"
            else:
                url, drop = pg_scratch(args.pg_admin_url)
            server: Any = None
            try:
                st = prepare(work, url, f"bench-{name}", DEFAULT_MODULE)
                if args.p11_kit:  # the token exists and holds the keys: export it (one server per token)
                    from hsm.p11kit import P11KitServer

                    server = P11KitServer(Path(tempfile.mkdtemp(prefix="v2p11-")) / "bench.sock", st.token,
                                          Path(st.softhsm_conf))
                    server.start()
                    os.environ["P11_KIT_SERVER_ADDRESS"] = server.address  # inherited by spawned processes
                csrs_db = all_csrs[k * per_db:(k + 1) * per_db]
                share = len(csrs_db) // len(paths)
                for j, (tag, mod) in enumerate(paths):
                    stm = Setup(st.softhsm_conf, st.token, mod, st.db_url, st.policies, st.work)
                    label = name if mod == DEFAULT_MODULE else f"{name} via {tag}"
                    print(f"[{label}] measuring ...", file=sys.stderr)
                    results += run_db(label, url, stm, csrs_db[j * share:(j + 1) * share], args)
                    if not args.no_profile:
                        pcsrs = make_csrs(args.batch + min(args.n, 1024))
                        profiles.append(f"[{label}]\n" + profile_run(stm, pcsrs, args.batch, args.top))
            finally:
                if server is not None:
                    server.kill()
                    shutil.rmtree(server.socket.parent, ignore_errors=True)
                if drop is not None:
                    drop()
    finally:
        shutil.rmtree(work_root, ignore_errors=True)

    import pkcs11

    print(f"\nissuance: SECC leaves from P-256 CSRs, SoftHSM2 token, python-pkcs11 {_version('python-pkcs11')}, "
          f"cryptography {_version('cryptography')}, {os.cpu_count()} CPUs; pkcs11 module {pkcs11.__name__}; "
          f"through: {', '.join(f'{t} ({m})' for t, m in paths)}")
    print("ratio = rate / raw rate with the same number of processes; cpu: the same from CPU time of the "
          "process (1 process only)")
    print(f"{'database':<19} {'what':<30} {'procs':>5} {'batch':>5} {'n':>6} {'per s':>8} {'ratio':>6} "
          f"{'cpu/s':>8} {'ratio':>6}")
    for r in results:
        raw = next(x for x in results if x.db == r.db and x.what.startswith("raw") and x.procs == r.procs)
        ratio = "" if r is raw else f"{r.rate / raw.rate:6.2f}"
        cpu = cpu_ratio = ""
        if r.cpu_rate and raw.cpu_rate:
            cpu = f"{r.cpu_rate:8.0f}"
            cpu_ratio = "" if r is raw else f"{r.cpu_rate / raw.cpu_rate:6.2f}"
        print(f"{r.db:<19} {r.what:<30} {r.procs:>5} {r.batch or '-':>5} {r.n:>6} {r.rate:8.0f} {ratio:>6} "
              f"{cpu:>8} {cpu_ratio:>6}")
    for name in sorted({r.db for r in results}, key=[r.db for r in results].index):
        raw1 = next(x for x in results if x.db == name and x.what.startswith("raw") and x.procs == 1)
        eng2 = next(x for x in results if x.db == name and x.what == "engine" and x.procs == 2)
        print(f"{name}: engine with 2 processes / raw single-core = {eng2.rate / raw1.rate:.2f}")
    if len(paths) == 2:  # --compare: through the module / directly, the same measurement
        print(f"\nthrough {paths[1][0]} / SoftHSM2 directly (rate ratio):")
        for r in results:
            if " via " not in r.db:
                continue
            d = next(x for x in results if x.db == r.db.split(" via ")[0] and x.what == r.what
                     and x.procs == r.procs and x.batch == r.batch)
            print(f"  {d.db:<11} {r.what:<30} procs {r.procs} batch {r.batch or '-':>3}: "
                  f"{r.rate:8.0f}/s vs {d.rate:8.0f}/s = {r.rate / d.rate:5.2f}")
    for p in profiles:
        print("\n" + p, end="")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
