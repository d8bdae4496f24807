"""`v2gpki init` killed part-way and run again finishes the hierarchy without duplicates.

Each test runs the real CLI in a subprocess with its own V2GPKI_HOME, so the embedded default applies:
`init` creates the SoftHSM2 token under the home directory and a SQLite database beside it. What must hold
after any interruption and re-run: exactly one row per CA, one certificate per CA (one V2G root), one
OCSP signer per CA, no pending intents, and exactly the keys the hierarchy uses — each CA's certificate
carrying the key its token label holds.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsm.uri import key_label
from pki.hierarchy import ca_key_label, ocsp_key_label, svc_key_label
from tests.conftest import REPO, V2GPKI_EXE

SMALL: dict[str, Any] = {
    "organization": "Resume Test",
    "country": "DE",
    "cas": [
        {"name": "v2g-root", "profile": "v2g-root", "cn": "V2G Root CA"},
        {"name": "cpo-sub1", "profile": "cpo-sub1", "parent": "v2g-root", "cn": "CPO Sub-CA 1"},
        {"name": "cpo-sub2", "profile": "cpo-sub2", "parent": "cpo-sub1", "cn": "CPO Sub-CA 2"},
        {"name": "cps-sub1", "profile": "cps-sub1", "parent": "v2g-root", "cn": "CPS Sub-CA 1"},
        {"name": "cps-sub2", "profile": "cps-sub2", "parent": "cps-sub1", "cn": "CPS Sub-CA 2"},
        {"name": "mo-root", "profile": "mo-root", "cn": "MO Root CA"},
        {"name": "mo-sub1", "profile": "mo-sub1", "parent": "mo-root", "cn": "MO Sub-CA 1"},
        {"name": "mo-sub2", "profile": "mo-sub2", "parent": "mo-sub1", "cn": "MO Sub-CA 2"},
        {"name": "v2g-root-20", "profile": "v2g-root-20", "cn": "V2G Root CA 20"},
        {"name": "cpo-sub1-20", "profile": "cpo-sub1-20", "parent": "v2g-root-20", "cn": "CPO Sub-CA 1 20"},
        {"name": "mo-root-20-ed448", "profile": "mo-root-20", "key_alg": "ed448", "cn": "MO Root CA 20 Ed448"},
    ],
    "service_keys": [{"name": "cps-leaf", "profile": "cps-leaf", "issuer": "cps-sub2", "cn": "CPS Leaf"}],
}

# Inspect a token from outside this process: SoftHSM reads SOFTHSM2_CONF once per process, and this
# test process already serves the session tokens.
_INSPECT = """
import json, os
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hsm.pkcs11 import Pkcs11KeyStore
ks = Pkcs11KeyStore(token_label="v2gpki", pin=open(os.environ["PIN_FILE"]).read().strip())
objects = ks.session_call(lambda s: sorted([int(o.object_class), str(o.label)] for o in s.get_objects()))
pubs = {l: ks.public_key(l).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo).hex() for l in ks.list()}
print(json.dumps({"objects": objects, "pubs": pubs}))
"""

# `v2gpki init` that sends SIGKILL to itself when the token is about to sign (or has just signed) the
# certificate with subject CN = $KILL_CN: a crash with the key generated and the intent committed, but no
# certificate stored. Keyed on the certificate, not on a count of token signatures, because issuance hooks
# (OCSP pre-signing) sign with the same keys.
_KILL_AT_CERTIFICATE = """
import os, signal, sys
from asn1crypto import x509 as ax
import hsm.pkcs11 as hp
import pki.issuance as iss
target, when = os.environ["KILL_CN"], os.environ["KILL_WHEN"]
def subject_cn(tbs):
    try:
        return ax.TbsCertificate.load(bytes(tbs))["subject"].native.get("common_name")
    except Exception:
        return None  # OCSP/CRL data signed by the same key types is not a TBSCertificate
orig_sign = hp.Pkcs11ECKey.sign
def sign(self, data, *args, **kwargs):
    if when == "before" and subject_cn(data) == target:
        os.kill(os.getpid(), signal.SIGKILL)  # the HSM is about to sign; the intent is committed
    return orig_sign(self, data, *args, **kwargs)
hp.Pkcs11ECKey.sign = sign
orig_assemble = iss.assemble_certificate
def assemble(tbs, alg, sig):
    out = orig_assemble(tbs, alg, sig)
    if when == "after" and subject_cn(tbs) == target:
        os.kill(os.getpid(), signal.SIGKILL)  # signed by the HSM, never stored
    return out
iss.assemble_certificate = assemble
from pki.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Home:
    root: Path
    config: Path | None

    @property
    def db(self) -> Path:
        return self.root / "v2gpki.db"

    def env(self) -> dict[str, str]:
        # The embedded default: no PIN, no SOFTHSM2_CONF, no database URL — all under V2GPKI_HOME.
        env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}
        env.update(V2GPKI_HOME=str(self.root), V2GPKI_PKILINT="every")
        return env

    def init_args(self) -> list[str]:
        return ["init", *(["--config", str(self.config)] if self.config else [])]

    def run_init(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([V2GPKI_EXE, *self.init_args()], env=self.env(), capture_output=True, text=True,
                              timeout=600)

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    def count(self, sql: str, *params: object) -> int:
        return int(self.query(sql, *params)[0][0])

    def token(self) -> dict[str, Any]:
        env = dict(self.env(), SOFTHSM2_CONF=str(self.root / "softhsm" / "softhsm2.conf"),
                   PIN_FILE=str(self.root / "softhsm" / "user.pin"))
        res = subprocess.run([sys.executable, "-c", _INSPECT], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        out: dict[str, Any] = json.loads(res.stdout)
        return out


def _home(tmp_path: Path, hierarchy: dict[str, Any] | None) -> Home:
    config = None
    if hierarchy is not None:
        config = tmp_path / "hierarchy.yaml"
        config.write_text(yaml.safe_dump(hierarchy))
    return Home(tmp_path / "home", config)


def _hierarchy(home: Home) -> dict[str, Any]:
    path = home.config or REPO / "pki" / "policies" / "hierarchy.yaml"
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _steps(h: dict[str, Any]) -> int:
    """Progress steps of init: each CA, its OCSP signer, each service key."""
    return sum(2 if c.get("ocsp_signer", True) else 1 for c in h["cas"]) + len(h.get("service_keys") or [])


def _ca_rows(home: Home) -> int:
    try:
        return home.count("SELECT count(*) FROM ca")
    except sqlite3.OperationalError:  # database or table not created yet
        return 0


def _spki(der: bytes) -> str:
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo).hex()


def assert_complete(home: Home) -> dict[str, Any]:
    """The invariants of a finished hierarchy; returns a snapshot to compare runs with."""
    h = _hierarchy(home)
    cas: list[dict[str, Any]] = h["cas"]
    svcs: list[dict[str, Any]] = h.get("service_keys") or []
    ocsp = [c["name"] for c in cas if c.get("ocsp_signer", True)]
    rows = home.query("SELECT name, key_uri, serial, der FROM ca ORDER BY name")
    assert sorted(r[0] for r in rows) == sorted(c["name"] for c in cas)  # exactly one row per CA
    # Each CA certificate is stored exactly once in the certificate table too (one V2G root, ...).
    for c in cas:
        n = home.count("SELECT count(*) FROM certificate WHERE identifier = ? AND profile = ?", c["name"], c["profile"])
        assert n == 1, f"{c['name']}: {n} certificates"
    assert home.count("SELECT count(*) FROM certificate WHERE profile = 'v2g-root'") == 1
    # One OCSP signer per CA (none duplicated), one certificate per service key.
    for name in ocsp:
        n = home.count("SELECT count(*) FROM certificate WHERE identifier = ?", f"ocsp-{name}")
        assert n == 1, f"OCSP signer of {name}: {n}"
    for sk in svcs:
        assert home.count("SELECT count(*) FROM certificate WHERE identifier = ?", sk["name"]) == 1
    # `v2gpki init` also prepares the trust-list signer when its issuing CA (csms-root) is in the hierarchy.
    from hsm.sealing import SECRETS_KEY
    from pki.trustlist import SIGNER_ID, SIGNER_LABEL

    trustlist = any(c["name"] == "csms-root" for c in cas)
    if trustlist:
        assert home.count("SELECT count(*) FROM certificate WHERE identifier = ?", SIGNER_ID) == 1
    n_certs = home.count("SELECT count(*) FROM certificate")
    assert n_certs == len(cas) + len(ocsp) + len(svcs) + int(trustlist)
    # No intent left pending; every certificate has its issued intent.
    states = dict(home.query("SELECT state, count(*) FROM issuance_intent GROUP BY state"))
    assert states.get("pending", 0) == 0 and states.get("issued") == n_certs
    # The token holds exactly the hierarchy's keys, each once (one private and one public object) ...
    tok = home.token()
    owners = ({ca_key_label(c["name"]): c["name"] for c in cas} | {ocsp_key_label(n): f"ocsp-{n}" for n in ocsp}
              | {svc_key_label(sk["name"]): sk["name"] for sk in svcs}
              | ({SIGNER_LABEL: SIGNER_ID} if trustlist else {}))
    objects = sorted(tuple(o) for o in tok["objects"])
    # CKO_PUBLIC/PRIVATE_KEY of each owner, and the one AES key (CKO_SECRET_KEY) that seals webhook secrets
    # (hsm/sealing.py, #21 item 11), which init creates once
    assert objects == sorted([(2, lb) for lb in owners] + [(3, lb) for lb in owners] + [(4, SECRETS_KEY)])
    # ... and the certificate of each key's owner certifies that key (a re-run reused, not replaced, it).
    pubs: dict[str, str] = tok["pubs"]
    assert set(pubs) == set(owners)
    for label, identifier in owners.items():
        (der,) = home.query("SELECT der FROM certificate WHERE identifier = ? AND key_uri IS NOT NULL", identifier)[0]
        assert pubs[label] == _spki(der), label
    for name, key_uri, _serial, der in rows:
        assert pubs[key_label(key_uri)] == _spki(der), name
    return {"ca": rows, "certs": home.query("SELECT issuer, serial FROM certificate ORDER BY id"), "token": tok}


def _finish(home: Home, *, run_again: bool) -> int:
    """Re-run init after the crash; it completes the hierarchy. With run_again, a third run changes nothing.
    Returns how many steps the re-run created."""
    res = home.run_init()
    assert res.returncode == 0, res.stderr
    assert "hierarchies ready" in res.stdout
    created = int(res.stdout.split("hierarchies ready: ")[1].split(" created")[0])
    assert 0 < created <= _steps(_hierarchy(home))
    snapshot = assert_complete(home)
    if not run_again:
        return created
    again = home.run_init()
    assert again.returncode == 0, again.stderr
    assert f"0 created, {_steps(_hierarchy(home))} already present" in again.stdout
    assert assert_complete(home) == snapshot  # a third run changes nothing at all
    return created


def test_init_killed_from_outside_then_resumed(tmp_path: Path) -> None:
    """SIGKILL from outside once ≥ 3 CA rows exist (the database is polled), then run init again."""
    home = _home(tmp_path, SMALL)
    total = len(SMALL["cas"])
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen([V2GPKI_EXE, *home.init_args()], env=home.env(), stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300  # a guard against a hung child, not a timing assertion
            while _ca_rows(home) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "err.log").read_text()
    at_kill = _ca_rows(home)
    assert 3 <= at_kill < total, f"{at_kill} of {total} CAs existed when init was killed"
    # The re-run skips what exists: at least the CAs (and their OCSP signers but the last) before the kill.
    assert _finish(home, run_again=True) <= _steps(SMALL) - (2 * at_kill - 1)


@pytest.mark.parametrize(("cn", "when", "pending"), [
    ("V2G Root CA", "before", ("v2g-root", "v2g-root")),
    ("CPO Sub-CA 2", "after", ("cpo-sub1", "cpo-sub2")),
    ("OCSP CPO Sub-CA 2", "before", ("cpo-sub2", "ocsp-signer")),
], ids=["root-key-made-intent-pending", "cpo-sub2-signed-not-stored", "ocsp-signer-key-made"])
def test_init_killed_mid_certificate_then_resumed(tmp_path: Path, cn: str, when: str,
                                                  pending: tuple[str, str]) -> None:
    """SIGKILL (deterministic) while one certificate is being signed: its key exists in the token and
    its intent is committed, but the certificate was never stored."""
    home = _home(tmp_path, SMALL)
    env = dict(home.env(), KILL_CN=cn, KILL_WHEN=when)
    res = subprocess.run([sys.executable, "-c", _KILL_AT_CERTIFICATE, *home.init_args()], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert home.query("SELECT issuer, profile FROM issuance_intent WHERE state = 'pending'") == [pending]
    _finish(home, run_again=False)
    # The interrupted intent is kept and marked, its serial never reused.
    assert home.count("SELECT count(*) FROM issuance_intent WHERE state = 'abandoned'") == 1


def test_default_hierarchy_init_twice_is_idempotent(tmp_path: Path) -> None:
    home = _home(tmp_path, None)
    first = home.run_init()
    assert first.returncode == 0, first.stderr
    steps = _steps(_hierarchy(home))
    assert f"{steps} created, 0 already present" in first.stdout
    snapshot = assert_complete(home)
    second = home.run_init()
    assert second.returncode == 0, second.stderr
    assert f"0 created, {steps} already present" in second.stdout
    assert assert_complete(home) == snapshot
