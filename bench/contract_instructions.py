"""Instructions per contract installation, counted by callgrind: a figure that does not drift.

    eval "$(bash scripts/services.sh)"
    .venv/bin/python bench/contract_instructions.py [--db postgresql|sqlite] [--n 100] [--iso 2|20]

This VM's speed drifts by a third within minutes (bench/results/2026-11-23-contract-round8.md), so
installations/s and CPU milliseconds compare two versions of the code only over many alternated runs. The
number of instructions the server process executes per installation does not drift: it is what this script
reports, for ``deliver()`` (EXI in, contract key, issuance with the token signature, key wrap, CPS signature,
EXI out; the OCSP pre-signer thread included), in process, without HTTP. It cycles through 16 vehicles'
requests, so for ISO 15118-2 every installation after a vehicle's first replays the kept answer (#21 item 2);
``--fresh`` makes every installation a distinct signed request instead: each one issues a contract
certificate and supersedes the vehicle's previous one, as ``bench/contract.py --fresh`` does. It counts the
Python process only: the database server's work is not in it (bench/contract.py reports that as CPU time).
``--iso 20`` counts ISO 15118-20 installations instead (``deliver20()``: P-521 vehicle, ecdsa-sha512,
AES-256-GCM; #26). Needs valgrind (``apt-get install -y valgrind``); about three minutes for the default 100
installations.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARM = 64  # installations before the count starts
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def child(n: int, state: Path) -> None:
    """Run under callgrind with instrumentation off; counts only the ``n`` measured installations."""
    env, requests, iso = pickle.loads(state.read_bytes())
    os.environ.update(env)
    from pki.cps.service import deliver
    from pki.cps.service20 import deliver20
    from pki.ocsp import responder_for
    from pki.wiring import build_context

    ctx = build_context()
    if iso == "20":
        def ok(out: object) -> bool:
            return getattr(out, "response_code", None) == "OK"
        run = deliver20
    else:
        def ok(out: object) -> bool:
            return getattr(getattr(out, "response_code", None), "name", None) == "OK"
        run = deliver  # type: ignore[assignment]
    for i in range(WARM):  # caches, pools, prepared statements, lazily built grammars
        run(ctx, requests[i % len(requests)])
    responder_for(ctx).presigner.flush()
    toggle = ["callgrind_control", "-i"]
    subprocess.run([*toggle, "on", str(os.getpid())], capture_output=True, check=True)
    for i in range(WARM, WARM + n):
        out = run(ctx, requests[i % len(requests)])
        if not ok(out):
            raise SystemExit(f"installation failed: {out.response_code} {out.notes}")
    responder_for(ctx).presigner.flush()
    subprocess.run([*toggle, "off", str(os.getpid())], capture_output=True, check=True)
    os._exit(0)  # no interpreter teardown in the count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--iso", choices=["2", "20"], default="2")
    ap.add_argument("--fresh", action="store_true",
                    help="ISO 15118-2: every installation a distinct signed request (issues and supersedes), "
                         "not the replay of a kept answer (bench/contract.py --fresh)")
    ap.add_argument("--keep", type=Path, help="copy callgrind's output file into this directory (callgrind_annotate)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.n, Path(args.child))
        return 0
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    import contract as bench

    d = Path(tempfile.mkdtemp(prefix="v2gpki-bench-instructions-"))
    pg_admin = os.environ.get("V2GPKI_TEST_PG_ADMIN_URL")
    srv = bench.prepare(d, args.db, pg_admin)
    try:
        bench.start(srv, d, 1)
        if args.fresh and args.iso == "2":  # 16 vehicles, each with distinct bodies: none is sent twice
            per = -(-(WARM + args.n) // 16)
            vehicles = bench.make_vehicles(srv, 16 * per, per)
        else:
            vehicles = (bench.make_vehicles20 if args.iso == "20" else bench.make_vehicles)(srv, 16)
        bench.stop(srv)
        requests = [base64.b64decode(json.loads(v["json"])["exiRequest"]) for v in vehicles]
        state = d / "state.pkl"
        state.write_bytes(pickle.dumps((srv.env, requests, args.iso)))
        out = d / "callgrind.out"
        r = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                            sys.executable, __file__, "--n", str(args.n), "--child", str(state)],
                           env={**os.environ, **srv.env}, capture_output=True, text=True)
        total = 0
        for f in d.glob("callgrind.out*"):
            for line in f.read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")):
                    total = max(total, int(line.split()[1]))
        if not total:
            raise SystemExit(f"callgrind counted nothing:\n{r.stderr[-3000:]}")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for f in d.glob("callgrind.out*"):
                shutil.copy(f, args.keep)
        print(f"{args.db}, ISO 15118-{args.iso}: {total / args.n / 1e6:.2f} M instructions per installation "
              f"(in process, {args.n} installations, callgrind)")
    finally:
        bench.stop(srv)
        if srv.dbname and pg_admin:
            import psycopg

            with psycopg.connect(pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{srv.dbname}" WITH (FORCE)')
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
