"""`v2gpki backup` / `v2gpki restore` (pki/backup.py), end to end through the real CLI, on SQLite and
PostgreSQL, each instance with its own SoftHSM2 token under its data directory:

source: init → issue → revoke (keyCompromise) and hold → serve OCSP and CRL → backup
target: restore (dry run changes nothing; --yes restores; a second --yes is refused; --force moves aside)
then the restored instance serves the same OCSP statuses and the same CRL over its HTTP routes, signs a
fresh CRL and OCSP responses with the restored token keys (verified against the CA certificate), and a
damaged archive is refused before anything is written. The archive never holds a PIN.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import V2GPKI_EXE, drop_pg_database, pg_admin_url

REPO = Path(__file__).resolve().parent.parent

# Runs inside the instance's own environment (one SoftHSM2 configuration per process), talking to the
# instance through its HTTP routes (Starlette's TestClient drives the ASGI app in-process).
PROBE = r'''
import json, secrets, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from api.app import create_app
from tests.conftest import csr_pem

mode, state = sys.argv[1], Path(sys.argv[2])

def verify(cert, signed_by, sig, tbs, hash_alg):
    signed_by.public_key().verify(sig, tbs, ec.ECDSA(hash_alg))

with TestClient(create_app()) as c:
    ctx = c.app.state.ctx
    if mode == "setup":
        tag = secrets.token_hex(2).upper()
        issued = [ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ICE*E{tag}BK{i}", dc="CPO")) for i in range(3)]
        ctx.engine.revoke(issued[0].serial, "keyCompromise", issuer=issued[0].issuer)
        ctx.engine.revoke(issued[1].serial, "certificateHold", issuer=issued[1].issuer)
        from pki.crl import generate_crl
        generate_crl(ctx, issued[0].issuer)  # as the workers' CRL refresh does; not left to a background thread
        state.write_text(json.dumps([{"issuer": i.issuer, "pem": i.cert.public_bytes(serialization.Encoding.PEM).decode()}
                                     for i in issued]))
        print("{}")
        sys.exit(0)
    certs = json.loads(state.read_text())
    out = {"ocsp": {}, "crl": {}}
    for item in certs:
        leaf = x509.load_pem_x509_certificate(item["pem"].encode())
        ca = ctx.engine.ca(item["issuer"]).cert
        req = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1()).build()
        r = c.post("/ocsp", content=req.public_bytes(serialization.Encoding.DER),
                   headers={"Content-Type": "application/ocsp-request"})
        resp = ocsp.load_der_ocsp_response(r.content)
        assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL, resp.response_status
        signer = resp.certificates[0]
        signer.verify_directly_issued_by(ca)  # delegated signer of this CA (RFC 6960 4.2.2.2)
        verify(None, signer, resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm)
        rt = resp.revocation_time_utc
        out["ocsp"][format(leaf.serial_number, "x")] = [
            resp.certificate_status.name, rt.isoformat() if rt else None,
            resp.revocation_reason.name if resp.revocation_reason else None]
    for issuer in sorted({i["issuer"] for i in certs}):
        ca = ctx.engine.ca(issuer).cert
        r = c.get(f"/crl/{issuer}.crl")
        assert r.status_code == 200, r.text
        crl = x509.load_der_x509_crl(r.content)
        assert crl.is_signature_valid(ca.public_key())
        out["crl"][issuer] = {"der": r.content.hex(), "revoked": sorted(
            [format(e.serial_number, "x"), str(e.extensions.get_extension_for_class(x509.CRLReason).value.reason.name)
             if e.extensions else "unspecified"] for e in crl)}
        if mode == "fresh":  # sign a new CRL with the (restored) CA key in the token
            from pki.crl import generate_crl, load_crl
            info = generate_crl(ctx, issuer)
            fresh = x509.load_der_x509_crl(load_crl(ctx.db, issuer, info.number).der)
            assert fresh.is_signature_valid(ca.public_key())
            out["fresh"] = {"number": info.number, "revoked": sorted(format(e.serial_number, "x") for e in fresh)}
print(json.dumps(out))
'''


def _base_env(home: Path, db_url: str | None) -> dict[str, str]:
    # An operator's environment: no SOFTHSM2_CONF (the token lives under V2GPKI_HOME), no test leftovers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}
    env.update(V2GPKI_HOME=str(home), V2GPKI_PUBLIC_URL="http://127.0.0.1:8000", V2GPKI_PKILINT="off",
               PYTHONPATH=str(REPO))
    if db_url:
        env["V2GPKI_DATABASE_URL"] = db_url
    return env


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([V2GPKI_EXE, *args], env=env, capture_output=True, text=True, timeout=300)


def probe(mode: str, state: Path, env: dict[str, str]) -> dict[str, object]:
    res = subprocess.run([sys.executable, "-c", PROBE, mode, str(state)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture
def databases(request: pytest.FixtureRequest) -> Iterator[tuple[str | None, str | None]]:
    if request.param == "sqlite":
        yield None, None
        return
    admin = pg_admin_url()
    if not admin:
        if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
            pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
        pytest.skip("no PostgreSQL (set V2GPKI_TEST_PG_ADMIN_URL or run scripts/test.sh)")
    import psycopg

    names = [f"v2gpki_bk_{secrets.token_hex(4)}" for _ in range(2)]
    with psycopg.connect(admin, autocommit=True) as conn:
        for n in names:
            conn.execute(f'CREATE DATABASE "{n}"')
    base = admin.rsplit("/", 1)[0]
    yield f"{base}/{names[0]}", f"{base}/{names[1]}"
    for n in names:
        drop_pg_database(n)


@pytest.mark.parametrize("databases", ["sqlite", "postgresql"], indirect=True)
def test_restored_instance_serves_the_same_ocsp_and_crl(tmp_path: Path, databases: tuple[str | None, str | None]
                                                        ) -> None:
    src_db, dst_db = databases
    src = _base_env(tmp_path / "src", src_db)
    dst = _base_env(tmp_path / "dst", dst_db)
    state = tmp_path / "certs.json"
    archive = tmp_path / "out" / "v2gpki.tar.gz"

    r = cli(["init"], src)
    assert r.returncode == 0, r.stderr
    probe("setup", state, src)
    before = probe("serve", state, src)
    statuses = sorted(v[0] for v in before["ocsp"].values())  # type: ignore[attr-defined]
    assert statuses == ["GOOD", "REVOKED", "REVOKED"]  # keyCompromise, and the hold (RFC 6960: revoked/certificateHold)

    r = cli(["backup", "--out", str(archive)], src)
    assert r.returncode == 0, r.stderr
    assert "token: softhsm2-directory" in r.stdout
    assert (archive.stat().st_mode & 0o777) == 0o600
    pin = (tmp_path / "src" / "softhsm" / "user.pin").read_text().strip()
    so_pin = (tmp_path / "src" / "softhsm" / "so.pin").read_text().strip()
    raw = gzip.decompress(archive.read_bytes())
    assert pin.encode() not in raw and so_pin.encode() not in raw
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and not any(n.endswith(".pin") or "softhsm2.conf" in n for n in names)

    dst["V2GPKI_HSM_PIN"] = pin  # development: the PIN comes from the operator, not from the archive
    dry = cli(["restore", str(archive)], dst)
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert not (tmp_path / "dst" / "softhsm").exists() and not (tmp_path / "dst" / "v2gpki.db").exists()

    r = cli(["restore", str(archive), "--yes"], dst)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "keys the database needs are present" in r.stdout

    after = probe("fresh", state, dst)
    assert after["ocsp"] == before["ocsp"]
    crl_before = before["crl"]
    crl_after = after["crl"]
    assert crl_after == crl_before  # byte-identical stored CRL served, same entries and reasons
    [issuer] = list(crl_before)  # type: ignore[call-overload]
    revoked = sorted(s for s, v in before["ocsp"].items() if v[0] == "REVOKED")  # type: ignore[attr-defined]
    assert {e[0] for e in crl_before[issuer]["revoked"]} == set(revoked)  # type: ignore[index]
    assert set(after["fresh"]["revoked"]) == set(revoked)  # type: ignore[index]

    again = cli(["restore", str(archive), "--yes"], dst)
    assert again.returncode == 3 and "refusing to overwrite" in again.stderr
    if dst_db is None:
        forced = cli(["restore", str(archive), "--yes", "--force"], dst)
        assert forced.returncode == 0, forced.stderr
        assert list((tmp_path / "dst").glob("v2gpki.db.pre-restore-*"))
        assert list((tmp_path / "dst" / "softhsm").glob("tokens.pre-restore-*"))


def test_damaged_archive_is_refused_before_writing(tmp_path: Path) -> None:
    """A member whose bytes differ from the manifest's checksum: nothing is restored."""
    import io

    from pki.backup import MANIFEST, SQLITE_MEMBER

    good = tmp_path / "good.tar.gz"
    db = tmp_path / "x.sqlite"
    import sqlite3

    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE alembic_version (version_num TEXT)")
    data = db.read_bytes()
    manifest = {"format": "v2gpki-backup/1", "created_at": "x", "v2gpki_version": "x",
                "database": {"kind": "sqlite", "member": SQLITE_MEMBER, "alembic_revision": None,
                             "counts": {"ca": 0, "certificate": 0, "revoked": 0}},
                "token": {"kind": "none"}, "keys": [], "members": {SQLITE_MEMBER: "0" * 64}}
    with tarfile.open(good, "w:gz") as tar:
        for name, blob in ((MANIFEST, json.dumps(manifest).encode()), (SQLITE_MEMBER, data)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    env = _base_env(tmp_path / "dst", None)
    env["V2GPKI_KEYSTORE"] = "soft"
    r = cli(["restore", str(good), "--yes"], env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "checksum mismatch" in r.stderr
    assert not (tmp_path / "dst" / "v2gpki.db").exists()
    notar = tmp_path / "not.tar.gz"
    notar.write_bytes(b"plain text")
    r = cli(["restore", str(notar)], env)
    assert r.returncode == 3 and "not a readable v2gpki backup" in r.stderr
