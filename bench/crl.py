"""CRL generation for a CA with a million revoked certificates, next to `openssl ca -gencrl`.

    .venv/bin/python bench/crl.py [--n 1000000] [--database-url URL] [--workdir DIR] [--keep]

Both sides get the same revocations (serials, dates, reasons): ours in the certificate table of a fresh
SQLite (or PostgreSQL) database, OpenSSL's in an ca(1) index.txt. Each generator runs as its own process
and is measured from outside (os.wait4: wall seconds and peak RSS); ours also reports the time inside
generate_crl() and its RSS before generating (imports, context), so the increment is visible. Both CRLs
are checked with `openssl crl -CAfile`. Our CA key is in SoftHSM2 (P-256, the ISO 15118-2 profile);
OpenSSL's CA is a P-256 software key with the same subject.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIERARCHY = """\
organization: V2G PKI Bench
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: V2G Root CA, ocsp_signer: false}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: CPO Sub-CA 1, ocsp_signer: false}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: CPO Sub-CA 2, ocsp_signer: false}
"""
PIN = "bench-pin-1234"
REASONS = [None, "keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged"]


def bench_env(work: Path, database_url: str | None) -> dict[str, str]:
    from hsm.token import init_softhsm_token

    paths = init_softhsm_token(work / "softhsm", "bench", pin=PIN)
    (work / "hierarchy.yaml").write_text(HIERARCHY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(work / "home"), V2GPKI_TOKEN_LABEL="bench", V2GPKI_HSM_PIN=PIN,
               SOFTHSM2_CONF=str(paths.conf), V2GPKI_HIERARCHY_FILE=str(work / "hierarchy.yaml"),
               V2GPKI_PKILINT="off")
    if database_url:
        env["V2GPKI_DATABASE_URL"] = database_url
    os.environ.update(env)
    return env


def populate(n: int, work: Path) -> dict[str, object]:
    """Init the CA hierarchy; insert n revoked certificates of cpo-sub2; write the same as index.txt."""
    from sqlalchemy import insert

    from pki.config import Settings
    from pki.hierarchy import init_hierarchy
    from pki.issuance import pem
    from pki.store.models import Certificate
    from pki.wiring import build_context

    ctx = build_context(Settings())
    init_hierarchy(ctx.engine, ctx.hierarchy())
    ca = ctx.engine.ca("cpo-sub2")
    (work / "ours-ca.pem").write_text(pem(ca.cert))
    table = Certificate.__table__  # type: ignore[attr-defined]
    rng = random.Random(1)
    now = datetime.now(UTC).replace(microsecond=0)
    not_after = now + timedelta(days=90)
    exp_txt = not_after.strftime("%y%m%d%H%M%SZ")
    t0 = time.perf_counter()
    with (work / "index.txt").open("w") as idx:
        for start in range(0, n, 50_000):
            rows, lines = [], []
            for k in range(start, min(n, start + 50_000)):
                serial = format(rng.getrandbits(127) | (1 << 120), "x")
                revoked_at = now - timedelta(seconds=rng.randrange(86400 * 60))
                reason = REASONS[k % len(REASONS)]
                rows.append(dict(issuer="cpo-sub2", serial=serial, profile="secc", subject="CN=bench",
                                 identifier=None, tenant=None, not_before=now - timedelta(days=60),
                                 not_after=not_after, status="revoked", revoked_at=revoked_at,
                                 revocation_reason=reason, key_uri=None, fingerprint=secrets.token_hex(32),
                                 der=b"\x00", created_at=now))
                rev = revoked_at.strftime("%y%m%d%H%M%SZ") + (f",{reason}" if reason else "")
                even = serial.upper() if len(serial) % 2 == 0 else "0" + serial.upper()  # ca(1) wants whole octets
                lines.append(f"R\t{exp_txt}\t{rev}\t{even}\tunknown\t/CN=bench {k}\n")
            with ctx.db.engine.begin() as conn:
                conn.execute(insert(table), rows)
            idx.writelines(lines)
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    seconds = time.perf_counter() - t0
    ctx.db.dispose()
    return {"subject": ca.cert.subject, "seconds": seconds}


def openssl_ca(work: Path, subject: object) -> None:
    """A software P-256 CA with the same subject, and a ca(1) configuration over index.txt."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)  # type: ignore[arg-type]
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    (work / "ossl-ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (work / "ossl-ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (work / "crlnumber").write_text("01\n")
    (work / "ca.cnf").write_text(f"""\
[ ca ]
default_ca = bench
[ bench ]
dir = {work}
database = $dir/index.txt
crlnumber = $dir/crlnumber
certificate = $dir/ossl-ca.pem
private_key = $dir/ossl-ca.key
default_md = sha256
default_crl_hours = 168
crl_extensions = crl_ext
[ crl_ext ]
authorityKeyIdentifier = keyid:always
""")


def measure(cmd: list[str], env: dict[str, str], out: Path) -> dict[str, float]:
    """Run cmd under /usr/bin/time: wall seconds and peak RSS (MiB) of that process alone. (Measuring a
    child of this Python process directly would count our own RSS: Linux keeps the high-water mark of
    the forked parent across exec.)"""
    stats = out.with_suffix(".time")
    with out.open("wb") as fh:
        res = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *cmd], env=env, cwd=REPO,
                             stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}):\n{out.read_text()[-2000:]}")
    seconds, kib = stats.read_text().split()[-2:]
    return {"seconds": float(seconds), "rss_mib": int(kib) / 1024}


def child_generate() -> int:
    """Our side, in its own process: context, then generate_crl, then report."""
    from pki.config import Settings
    from pki.crl import generate_crl, load_crl
    from pki.wiring import build_context

    ctx = build_context(Settings(), migrate=False)
    ctx.engine.ca_signer(ctx.engine.ca("cpo-sub2")).public_key()  # open the token before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = generate_crl(ctx, "cpo-sub2")
    peak_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    crl = load_crl(ctx.db, "cpo-sub2")
    assert crl is not None
    Path(os.environ["BENCH_CRL_OUT"]).write_bytes(crl.der)
    print(json.dumps({"generate_seconds": info.seconds, "entries": info.entries, "size": info.size,
                      "rss_before_mib": before, "rss_after_generate_mib": peak_gen}))
    return 0


def main() -> int:
    if "--child-generate" in sys.argv:
        return child_generate()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="revoked certificates (default 1000000)")
    ap.add_argument("--database-url", default=None, help="default: SQLite in the work directory")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the work directory (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crlbench-", dir=args.workdir))
    env = bench_env(work, args.database_url)
    print(f"work directory {work}; {args.n} revoked certificates", flush=True)
    pop = populate(args.n, work)
    print(f"populated the database and index.txt in {pop['seconds']:.1f} s", flush=True)
    openssl_ca(work, pop["subject"])

    ours_out = work / "ours.crl"
    ours = measure([sys.executable, str(Path(__file__).resolve()), "--child-generate"],
                   {**env, "BENCH_CRL_OUT": str(ours_out)}, work / "ours.log")
    detail = json.loads((work / "ours.log").read_text().strip().splitlines()[-1])
    ref_out = work / "openssl.crl"
    ref = measure(["openssl", "ca", "-gencrl", "-batch", "-config", str(work / "ca.cnf"), "-out", str(ref_out)],
                  env, work / "openssl.log")

    for label, crl, ca, form in (("ours", ours_out, work / "ours-ca.pem", "DER"),
                                 ("openssl", ref_out, work / "ossl-ca.pem", "PEM")):
        t0 = time.perf_counter()
        v = subprocess.run(["openssl", "crl", "-inform", form, "-in", str(crl), "-CAfile", str(ca), "-noout"],
                           capture_output=True, text=True)
        ok = v.returncode == 0 and "verify OK" in v.stderr
        print(f"openssl crl -CAfile on {label}'s CRL: {'verify OK' if ok else 'FAILED ' + v.stderr.strip()}"
              f" ({time.perf_counter() - t0:.1f} s)")
        if not ok:
            return 1
    ref_size = len(subprocess.run(["openssl", "crl", "-in", str(ref_out), "-outform", "DER"],
                                  capture_output=True).stdout)
    print(f"\n{'':9}{'process s':>10} {'peak RSS MiB':>13} {'DER bytes':>12}")
    print(f"{'ours':9}{ours['seconds']:10.2f} {ours['rss_mib']:13.0f} {detail['size']:12d}"
          f"   (generate_crl {detail['generate_seconds']:.2f} s; RSS {detail['rss_before_mib']:.0f} MiB before it, "
          f"{detail['rss_after_generate_mib']:.0f} MiB after it; the rest is this harness reading the CRL back)")
    print(f"{'openssl':9}{ref['seconds']:10.2f} {ref['rss_mib']:13.0f} {ref_size:12d}")
    print(f"\nratios ours/openssl: time {ours['seconds'] / ref['seconds']:.2f} "
          f"(generate_crl alone {detail['generate_seconds'] / ref['seconds']:.2f}), "
          f"peak RSS {ours['rss_mib'] / ref['rss_mib']:.2f}, "
          f"RSS increment {(ours['rss_mib'] - detail['rss_before_mib']) / ref['rss_mib']:.2f}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
