"""The `v2gpki` command line against an initialised context (real subprocesses, real exit codes).

The CLI is pointed at the session's context the way an operator points it at a deployment: V2GPKI_HOME,
SOFTHSM2_CONF, V2GPKI_TOKEN_LABEL, V2GPKI_HSM_PIN and V2GPKI_DATABASE_URL (tests/conftest.py cli_env).
Read-only commands run concurrently to keep the suite quick; each gets its own assertions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import func
from sqlmodel import select

from pki.context import Context
from pki.issuance import pem
from pki.store.models import AuditEvent, Certificate
from tests.conftest import cli_env, csr_pem, run_cli

EVSEID = "DE*ICE*E45B*78C"


@dataclass
class CliIssued:
    env: dict[str, str]
    stdout_chain: list[x509.Certificate]  # `issue` printing to stdout
    out_file: Path  # `issue --csr - --out FILE --no-root`
    out_stderr: str
    out_stdout: str
    serials: list[str]  # lower-case hex, as stored


def _one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("v2gpki: error: "), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def issued(ctx: Context, tmp_path_factory: pytest.TempPathFactory) -> CliIssued:
    d = tmp_path_factory.mktemp("cli")
    env = cli_env(ctx)
    csr_file = d / "secc.csr"
    csr_file.write_bytes(csr_pem(EVSEID, o="Test CPO", dc="CPO"))
    out_file = d / "chain.pem"
    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(run_cli, ["issue", "--profile", "secc", "--csr", str(csr_file)], env)
        b = pool.submit(run_cli, ["issue", "--profile", "secc", "--csr", "-", "--out", str(out_file), "--no-root"],
                        env, csr_pem("de*ice*e45b*79c", o="Test CPO", dc="CPO").decode())
        ra, rb = a.result(), b.result()
    assert ra.returncode == 0, ra.stderr
    assert rb.returncode == 0, rb.stderr
    chain = x509.load_pem_x509_certificates(ra.stdout.encode())
    second = x509.load_pem_x509_certificates(out_file.read_bytes())[0]
    return CliIssued(env, chain, out_file, rb.stderr, rb.stdout,
                     [format(chain[0].serial_number, "x"), format(second.serial_number, "x")])


def test_issue_prints_pem_chain_leaf_first(ctx: Context, issued: CliIssued) -> None:
    chain = issued.stdout_chain
    assert chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == EVSEID
    # Leaf, CPO Sub-CA 2, CPO Sub-CA 1, V2G root: each certificate issued by the next.
    assert [c.subject for c in chain[1:]] == [c.subject for c in ctx.engine.chain("cpo-sub2")]
    for child, parent in zip(chain, chain[1:], strict=False):
        child.verify_directly_issued_by(parent)
    assert chain[-1].subject == chain[-1].issuer
    with ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.serial == issued.serials[0])).one()
    assert row.der == chain[0].public_bytes(serialization.Encoding.DER)
    assert row.profile == "secc" and row.issuer == "cpo-sub2" and row.status == "valid"


def test_issue_out_file_from_stdin_without_root(ctx: Context, issued: CliIssued) -> None:
    assert issued.out_stdout == ""  # the chain went to the file
    chain = x509.load_pem_x509_certificates(issued.out_file.read_bytes())
    assert len(chain) == 3 and chain[-1].subject != chain[-1].issuer  # --no-root
    # Lower-case input normalised (identifiers are case-insensitive, RFC 5234 ALPHA).
    assert chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "DE*ICE*E45B*79C"
    assert f"serial {issued.serials[1].upper()} by cpo-sub2 -> {issued.out_file}" in issued.out_stderr


# -- read-only commands ------------------------------------------------------------------------------------


def _openssl_serial(cert: x509.Certificate) -> str:
    res = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem(cert), capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("serial="), res.stderr
    return res.stdout.strip().split("=", 1)[1]


@pytest.fixture(scope="module")
def reads(issued: CliIssued) -> dict[str, subprocess.CompletedProcess[str]]:
    leaf = issued.stdout_chain[0]
    printed = _openssl_serial(leaf)  # upper-case hex, as `openssl x509 -serial` prints it
    padded = printed if len(printed) % 2 == 0 else "0" + printed
    colons = ":".join(padded[i:i + 2] for i in range(0, len(padded), 2))
    commands = {
        # The shared context may hold many certificates (other tests), and `list` shows the oldest first.
        "list": ["list", "--profile", "secc", "--limit", "1000000"],
        "show-upper": ["show", printed],
        "show-lower": ["show", printed.lower()],
        "show-colons-pem": ["show", colons, "--pem"],
        "show-unknown": ["show", "0123456789ABCDEF0123"],
        "chain-cpo-sub2": ["chain", "cpo-sub2"],
        "chain-v2g-root": ["chain", "v2g-root"],
    }
    assert printed.upper() == printed and printed.lstrip("0").lower() == issued.serials[0]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(run_cli, argv, issued.env) for k, argv in commands.items()}
        return {k: f.result() for k, f in futures.items()}


def test_list(issued: CliIssued, reads: dict[str, subprocess.CompletedProcess[str]]) -> None:
    res = reads["list"]
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["SERIAL", "ISSUER", "PROFILE", "STATUS"]
    for serial in issued.serials:
        (line,) = [ln for ln in lines if ln.startswith(serial.upper() + " ")]
        assert line.split()[1:4] == ["cpo-sub2", "secc", "valid"]


@pytest.mark.parametrize("form", ["show-upper", "show-lower"])
def test_show_accepts_serial_as_openssl_prints_it(issued: CliIssued,
                                                  reads: dict[str, subprocess.CompletedProcess[str]],
                                                  form: str) -> None:
    res = reads[form]
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    leaf = issued.stdout_chain[0]
    assert row["serial"] == issued.serials[0].upper()
    assert row["sha256"] == hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert (row["profile"], row["issuer"], row["status"]) == ("secc", "cpo-sub2", "valid")


def test_show_with_colons_as_pem(issued: CliIssued, reads: dict[str, subprocess.CompletedProcess[str]]) -> None:
    res = reads["show-colons-pem"]
    assert res.returncode == 0, res.stderr
    assert res.stdout == pem(issued.stdout_chain[0])


def test_show_unknown_serial_is_not_found(reads: dict[str, subprocess.CompletedProcess[str]]) -> None:
    res = reads["show-unknown"]
    assert res.returncode == 4 and res.stdout == ""
    assert "no certificate with serial" in _one_error_line(res)


def test_chain_up_to_root(ctx: Context, reads: dict[str, subprocess.CompletedProcess[str]]) -> None:
    sub2 = reads["chain-cpo-sub2"]
    assert sub2.returncode == 0, sub2.stderr
    assert sub2.stdout == "".join(pem(c) for c in ctx.engine.chain("cpo-sub2"))
    certs = x509.load_pem_x509_certificates(sub2.stdout.encode())
    assert len(certs) == 3 and certs[-1].subject == certs[-1].issuer
    root = reads["chain-v2g-root"]
    assert root.returncode == 0, root.stderr
    (only,) = x509.load_pem_x509_certificates(root.stdout.encode())
    assert only == certs[-1]


# -- revoke --------------------------------------------------------------------------------------------------


def _status(ctx: Context, serial: str) -> tuple[str, str | None]:
    with ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.serial == serial)).one()
    return row.status, row.revocation_reason


def _audit_count(ctx: Context) -> int:
    with ctx.db.session() as s:
        return int(s.exec(select(func.count()).select_from(AuditEvent)).one())


def test_revoke_is_dry_run_unless_yes(ctx: Context, issued: CliIssued,
                                      reads: dict[str, subprocess.CompletedProcess[str]]) -> None:
    # `reads` first: the read-only commands above expect a valid certificate.
    serial = issued.serials[0]
    printed = serial.upper()
    events = _audit_count(ctx)
    dry = run_cli(["revoke", printed, "--reason", "keyCompromise"], issued.env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("dry run: would revoke") and "--yes" in dry.stdout
    assert _status(ctx, serial) == ("valid", None) and _audit_count(ctx) == events  # nothing changed

    done = run_cli(["revoke", printed, "--reason", "keyCompromise", "--yes"], issued.env)
    assert done.returncode == 0, done.stderr
    assert f"revoked cpo-sub2/{printed} (keyCompromise)" in done.stdout
    assert _status(ctx, serial) == ("revoked", "keyCompromise")
    with ctx.db.session() as s:
        last = s.exec(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()  # type: ignore[attr-defined]
    assert last is not None and last.action == "certificate.revoke" and last.object == f"cpo-sub2/{serial}"

    again = run_cli(["revoke", printed.lower(), "--reason", "keyCompromise", "--yes"], issued.env)
    assert again.returncode == 5  # conflict: already revoked (pki/cli.py exit codes)
    assert "already revoked" in _one_error_line(again) and again.stdout == ""
    assert _status(ctx, serial) == ("revoked", "keyCompromise")


def test_revoke_unknown_reason_exits_nonzero(ctx: Context, issued: CliIssued) -> None:
    serial = issued.serials[1]
    res = run_cli(["revoke", serial.upper(), "--reason", "keyCompromised", "--yes"], issued.env)
    assert res.returncode == 3 and res.stdout == ""
    assert "unknown reason 'keyCompromised'" in _one_error_line(res)
    assert _status(ctx, serial) == ("valid", None)


# -- policies: shipped in the package, exported for editing, overridden by V2GPKI_POLICIES_DIR (#22) -------------

REPO = Path(__file__).resolve().parent.parent


def test_default_policies_are_package_data() -> None:
    from importlib import resources

    from pki.config import Settings

    packaged = resources.files("pki").joinpath("policies")
    assert Settings().policies_dir == packaged == REPO / "pki" / "policies"
    assert {f.name for f in packaged.iterdir()} >= {"hierarchy.yaml", "lifecycle.yaml", "profiles-ocpp.yaml"}


def test_policies_export_then_override(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}  # the packaged defaults
    dest = tmp_path / "etc" / "policies"
    done = run_cli(["policies", "export", str(dest)], env)
    assert done.returncode == 0, done.stderr
    shipped = {f.name: f.read_bytes() for f in (REPO / "pki" / "policies").glob("*.yaml")}
    assert {f.name: f.read_bytes() for f in dest.iterdir()} == shipped
    assert f"V2GPKI_POLICIES_DIR={dest}" in done.stdout

    # an operator's edits are never overwritten by accident (exit 5, conflict), only with --force
    profiles = dest / "profiles-ocpp.yaml"
    edited = profiles.read_text().replace("description: ", "description: EDITED ", 1)
    profiles.write_text(edited)
    again = run_cli(["policies", "export", str(dest)], env)
    assert again.returncode == 5 and "--force" in again.stderr and profiles.read_text() == edited

    # the service reads the edited copy once V2GPKI_POLICIES_DIR names it
    listed = run_cli(["profiles"], env | {"V2GPKI_POLICIES_DIR": str(dest)})
    assert listed.returncode == 0, listed.stderr
    assert "EDITED " in listed.stdout
    assert "EDITED " not in run_cli(["profiles"], env).stdout

    forced = run_cli(["policies", "export", "--force", str(dest)], env)
    assert forced.returncode == 0, forced.stderr
    assert profiles.read_bytes() == shipped["profiles-ocpp.yaml"]
