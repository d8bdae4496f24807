"""`v2gpki` command line. Names and flags are a contract with operators' scripts: keep them.

Errors go to stderr as one line `v2gpki: error: <message>` with a non-zero exit:
2 usage, 3 bad input / policy refusal, 4 not found, 5 conflict (already revoked), 6 HSM / config (also an HSM
signature that does not verify: nothing was stored).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hsm.errors import HSMConfigError, HSMError, HSMUnavailable, SignatureCheckFailed
from pki.config import Settings
from pki.errors import AlreadyRevoked, ConfigError, NotFound, PKIError, UnknownCA


def _err(msg: str, code: int) -> int:
    print(f"v2gpki: error: {msg}", file=sys.stderr)
    return code


def _ctx(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pki.wiring import build_context

    return build_context(Settings())


def cmd_hsm_init(args: argparse.Namespace) -> int:
    from hsm.token import init_softhsm_token
    from pki.hardening import ensure_private_dir

    s = Settings()
    ensure_private_dir(s.home_dir)
    from_file = s.hsm_pin is None and s.hsm_pin_file is not None
    pin = s.hsm_pin.get_secret_value() if s.hsm_pin else _read_pin_file(s.hsm_pin_file) if from_file else None
    paths = init_softhsm_token(s.softhsm_dir, s.token_label, pin=pin)
    if from_file and s.hsm_pin_file is not None and paths.pin_file.resolve() != s.hsm_pin_file.resolve():
        # the PIN lives in the operator's secret; no copy beside the token it unlocks
        paths.pin_file.unlink(missing_ok=True)
    print(f"SoftHSM2 token {s.token_label!r} ready under {paths.tokendir}")
    print(f"SOFTHSM2_CONF={paths.conf}")
    return 0


def _read_pin_file(path: Path | None) -> str:
    """The PIN in V2GPKI_HSM_PIN_FILE. A file that is missing, unreadable or empty is an error: never a
    generated PIN, which would lock the token to a value the other processes do not know (#22 item 3)."""
    import os

    try:
        pin = Path(str(path)).read_text().strip()
    except OSError as exc:
        raise HSMConfigError(
            f"V2GPKI_HSM_PIN_FILE={path} cannot be read ({exc.strerror or exc}): the PIN secret must exist and be "
            f"readable by this process (uid {os.getuid()}); no token was created") from None
    if not pin:
        raise HSMConfigError(f"V2GPKI_HSM_PIN_FILE={path} is empty: put the token user PIN in it; no token was created")
    return pin


def cmd_init(args: argparse.Namespace) -> int:
    from pki.hierarchy import init_hierarchy

    s = Settings()
    if s.keystore == "pkcs11" and not (s.hsm_pin or s.hsm_pin_file) and not (s.softhsm_dir / "user.pin").exists():
        # Embedded default: create the SoftHSM2 token under the data directory first.
        cmd_hsm_init(args)
    ctx = _ctx(args)
    h = ctx.hierarchy(Path(args.config) if args.config else None)
    mechanisms = getattr(ctx.keystore, "mechanisms", None)
    if mechanisms is not None:  # a PKCS#11 token: can it hold the hierarchy? (#22 item 4)
        from pki.hierarchy import token_plan

        plan = token_plan(h, ctx.profiles, mechanisms())
        for warning in plan.warnings:
            print(f"v2gpki: warning: {warning}", file=sys.stderr)
        if plan.skipped:
            what = "; ".join(f"{name} ({why})" for name, why in plan.skipped.items())
            if not args.skip_unsupported:
                return _err(f"token {ctx.settings.token_label!r} lacks {', '.join(plan.missing)}: it cannot hold "
                            f"{len(plan.skipped)} entries of the hierarchy: {what}. Nothing was created. Remove them "
                            f"from the hierarchy file, or run `v2gpki init --skip-unsupported` to build the others", 6)
            print(f"v2gpki: skipping {len(plan.skipped)} entries the token cannot hold (it lacks "
                  f"{', '.join(plan.missing)}): {what}", file=sys.stderr)
            h = plan.reduced
    tty = sys.stderr.isatty()

    def progress(n: int, total: int, name: str, status: str) -> None:
        bar = "#" * int(30 * n / total)
        line = f"[{bar:<30}] {n:>3}/{total} {name}: {status}"
        print(("\r" + line.ljust(100)) if tty else line, file=sys.stderr, end="" if tty else "\n", flush=True)

    stats = init_hierarchy(ctx.engine, h, progress)
    _ensure_trustlist_signer(ctx)
    _seal_webhook_secrets(ctx)
    crls = _publish_first_crls(ctx)
    if tty:
        print(file=sys.stderr)
    print(f"hierarchies ready: {stats['created']} created, {stats['skipped']} already present"
          + (f", {stats['abandoned_intents']} abandoned intents from an interrupted run"
             if stats["abandoned_intents"] else ""))
    if crls:
        print(f"CRLs published: {crls}")
    return 0


def _publish_first_crls(ctx) -> int:  # type: ignore[no-untyped-def]
    """A CRL for every CA that has none (or one close to its nextUpdate), so /crl/<ca>.crl answers as soon as
    the services start rather than after beat's first refresh (#22 item 3). Idempotent: a re-run publishes
    only for CAs that need it."""
    from pki.crl import refresh_crls

    return len(refresh_crls(ctx))


def _ensure_trustlist_signer(ctx) -> None:  # type: ignore[no-untyped-def]
    """Create the trust-list signer key here, in one process: PKCS#11 has no atomic "create if absent",
    so lazily creating it in several worker processes at once could leave two keys under one label."""
    try:
        from pki.lifecycle import lifecycle_of
        from pki.trustlist import ensure_signer
    except ImportError:
        return
    try:
        issuer = lifecycle_of(ctx).policy.truststore.signer_issuer
        ctx.engine.ca(issuer)
    except PKIError:
        return  # a hierarchy without the signer's issuing CA: nothing to prepare
    ensure_signer(ctx)


def _seal_webhook_secrets(ctx) -> None:  # type: ignore[no-untyped-def]
    """The token's key that seals webhook secrets (created here, in one process, like the trust-list signer),
    and the sealing of secrets stored in clear by an earlier version (#21 item 11)."""
    try:
        from pki.lifecycle import seal_stored_secrets
    except ImportError:
        return
    n = seal_stored_secrets(ctx)
    if n:
        print(f"sealed {n} webhook secret(s) stored in clear by an earlier version", file=sys.stderr)


def cmd_issue(args: argparse.Namespace) -> int:
    ctx = _ctx(args)
    data = sys.stdin.buffer.read() if args.csr == "-" else Path(args.csr).read_bytes()
    issued = ctx.engine.issue_from_csr(args.profile, data, ca=args.ca, tenant=args.tenant, actor="cli")
    out = issued.pem_chain(include_root=not args.no_root)
    if args.out:
        Path(args.out).write_text(out)
        print(f"issued {issued.profile} serial {issued.serial.upper()} by {issued.issuer} -> {args.out}",
              file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pki.store.inventory import CertificateFilter, Inventory

    ctx = _ctx(args)
    rows = Inventory(ctx.db).certificates(CertificateFilter(profile=args.profile or "", status=args.status or "",
                                                            issuer=args.issuer or ""), limit=args.limit)
    if args.json:
        print(json.dumps([_row_json(r) for r in rows], indent=1))
        return 0
    print(f"{'SERIAL':<34} {'ISSUER':<18} {'PROFILE':<14} {'STATUS':<8} {'NOT AFTER':<20} SUBJECT")
    for r in rows:
        print(f"{r.serial.upper():<34} {r.issuer:<18} {r.profile:<14} {r.status:<8} "
              f"{r.not_after.strftime('%Y-%m-%d %H:%M'):<20} {r.subject}")
    return 0


def _row_json(r) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "serial": r.serial.upper(), "issuer": r.issuer, "profile": r.profile, "subject": r.subject,
        "identifier": r.identifier, "tenant": r.tenant, "status": r.status,
        "not_before": r.not_before.isoformat(), "not_after": r.not_after.isoformat(),
        "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        "revocation_reason": r.revocation_reason, "key_uri": r.key_uri, "sha256": r.fingerprint,
    }


def cmd_show(args: argparse.Namespace) -> int:
    from cryptography import x509

    from pki.issuance import pem
    from pki.serials import parse_serial

    ctx = _ctx(args)
    row = ctx.engine.get_certificate(parse_serial(args.serial), args.issuer)
    if args.pem:
        sys.stdout.write(pem(x509.load_der_x509_certificate(row.der)))
        return 0
    print(json.dumps(_row_json(row), indent=2))
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from pki.issuance import pem

    ctx = _ctx(args)
    name = args.ca
    if name.isdigit():
        from pki.store.inventory import Inventory

        row = Inventory(ctx.db).ca_by_id(int(name))
        if row is None:
            raise UnknownCA(f"unknown CA id {name}")
        name = row.name
    sys.stdout.write("".join(pem(c) for c in ctx.engine.chain(name)))
    return 0


def cmd_cas(args: argparse.Namespace) -> int:
    ctx = _ctx(args)
    print(f"{'ID':>3} {'NAME':<20} {'PROFILE':<14} {'PARENT':<20} {'ALG':<6} {'NOT AFTER':<11} KEY")
    for h in sorted(ctx.engine.cas(), key=lambda h: h.row.id or 0):
        r = h.row
        print(f"{r.id:>3} {r.name:<20} {r.profile:<14} {r.parent or '-':<20} {r.key_alg:<6} "
              f"{r.not_after.strftime('%Y-%m-%d'):<11} {r.key_uri}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from pki.issuance import REASONS
    from pki.serials import parse_serial

    if args.reason not in REASONS:
        raise PKIError(f"unknown reason {args.reason!r}; use one of: {', '.join(REASONS)}")
    ctx = _ctx(args)
    serial = parse_serial(args.serial)
    row = ctx.engine.get_certificate(serial, args.issuer)
    if row.status == "revoked":
        raise AlreadyRevoked(f"certificate {row.issuer}/{serial.upper()} is already revoked")
    if not args.yes:
        print(f"dry run: would revoke {row.subject} (serial {serial.upper()}, issuer {row.issuer}, "
              f"profile {row.profile}) with reason {args.reason}; add --yes to do it")
        return 0
    ctx.engine.revoke(serial, args.reason, issuer=row.issuer, actor="cli")
    print(f"revoked {row.issuer}/{serial.upper()} ({args.reason})")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from pki.profiles import load_profiles

    ps = load_profiles(Settings().policies_dir)
    for n in ps.names():
        p = ps.get(n)
        print(f"{n:<20} {p.standard:<12} {'CA' if p.ca else 'EE':<3} {','.join(a.value for a in p.key_algs):<12} "
              f"{p.description}")
    return 0


def cmd_policies_export(args: argparse.Namespace) -> int:
    from pki.config import export_policies

    dest = Path(args.dir)
    try:
        written = export_policies(dest, overwrite=args.force)
    except FileExistsError as exc:
        return _err(str(exc), 5)
    for f in written:
        print(f"wrote {f}")
    print(f"edit them, then point the service at them: V2GPKI_POLICIES_DIR={dest.resolve()}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from pki.audit_sign import verify_all

    res = verify_all(_ctx(args), full=args.full)
    if res.ok:
        how = (f"; incremental: events {res.from_seq}–{res.events} re-hashed from the last verified checkpoint "
               "(--full re-hashes all)" if res.from_seq else "")
        print(f"audit chain OK: {res.events} events, {res.checkpoints} signed checkpoints "
              f"({res.external} in the external record){how}")
        return 0
    for p in res.problems:
        print(f"audit: {p}", file=sys.stderr)
    return _err(f"audit chain verification FAILED ({len(res.problems)} problems)", 7)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v2gpki", description="Plug & Charge (ISO 15118 / OCPP) PKI service")
    sub = p.add_subparsers(dest="cmd", required=True)

    hsm = sub.add_parser("hsm", help="key store management")
    hsub = hsm.add_subparsers(dest="hsm_cmd", required=True)
    hsub.add_parser("init", help="create the SoftHSM2 token under $V2GPKI_HOME/softhsm").set_defaults(fn=cmd_hsm_init)

    i = sub.add_parser("init", help="build the configured V2G/OEM/MO/CSMS hierarchies (idempotent)")
    i.add_argument("--config", help="hierarchy YAML (default $V2GPKI_HIERARCHY_FILE, else hierarchy.yaml of the "
                   "policies directory)")
    i.add_argument("--skip-unsupported", action="store_true",
                   help="build what the token can hold and skip, naming them, the CAs whose keys need mechanisms "
                   "it lacks (default: refuse, exit 6, before creating anything)")
    i.set_defaults(fn=cmd_init)

    iss = sub.add_parser("issue", help="issue a certificate from a CSR; prints the PEM chain, leaf first")
    iss.add_argument("--profile", required=True)
    iss.add_argument("--csr", required=True, help="CSR file (PEM, DER or base64 DER); - for stdin")
    iss.add_argument("--out", help="write the chain here instead of stdout")
    iss.add_argument("--ca", help="issuing CA name (default: chosen by profile and key algorithm)")
    iss.add_argument("--tenant", help="owning organization")
    iss.add_argument("--no-root", action="store_true", help="leave the root out of the chain")
    iss.set_defaults(fn=cmd_issue)

    ls = sub.add_parser("list", help="list certificates")
    ls.add_argument("--profile")
    ls.add_argument("--status", choices=["valid", "revoked", "hold"])
    ls.add_argument("--issuer")
    ls.add_argument("--limit", type=int, default=1000)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)

    sh = sub.add_parser("show", help="show one certificate by serial (hex, as openssl prints it)")
    sh.add_argument("serial")
    sh.add_argument("--issuer")
    sh.add_argument("--pem", action="store_true")
    sh.set_defaults(fn=cmd_show)

    ch = sub.add_parser("chain", help="PEM chain of a CA up to its root")
    ch.add_argument("ca", help="CA name (e.g. cpo-sub2, v2g-root) or id")
    ch.set_defaults(fn=cmd_chain)

    sub.add_parser("cas", help="list CAs").set_defaults(fn=cmd_cas)
    sub.add_parser("profiles", help="list certificate profiles").set_defaults(fn=cmd_profiles)

    pol = sub.add_parser("policies", help="the default profiles, hierarchy and lifecycle policy")
    polsub = pol.add_subparsers(dest="policies_cmd", required=True)
    pe = polsub.add_parser("export", help="write the packaged default policies into DIR, for editing "
                           "(then set V2GPKI_POLICIES_DIR=DIR)")
    pe.add_argument("dir", metavar="DIR")
    pe.add_argument("--force", action="store_true", help="overwrite files that already exist in DIR")
    pe.set_defaults(fn=cmd_policies_export)

    rv = sub.add_parser("revoke", help="revoke a certificate (dry run unless --yes)")
    rv.add_argument("serial")
    rv.add_argument("--reason", required=True, help="RFC 5280 reason name, e.g. keyCompromise")
    rv.add_argument("--issuer")
    rv.add_argument("--yes", action="store_true")
    rv.set_defaults(fn=cmd_revoke)

    au = sub.add_parser("audit", help="audit log")
    asub = au.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser("verify", help="verify the hash chain and the signed checkpoints (from the last verified "
                         "checkpoint on, once one verification has passed)")
    av.add_argument("--full", action="store_true",
                    help="re-hash the whole chain and re-check every checkpoint's signature, not only those "
                    "after the last verified checkpoint")
    av.set_defaults(fn=cmd_audit_verify)

    _register_extra(sub)
    return p


def _register_extra(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Commands contributed by the service layers (serve, org, apikey, worker, backup, ...), each module's
    register(sub). This is the program's entry point, so it may name the layers above pki/; imported
    here, when the parser is built, so that importing pki.cli stays cheap."""
    from api import cli as api_cli
    from pki import firmware_cli, ops_cli
    from workers import cli as workers_cli

    for mod in (api_cli, workers_cli, ops_cli, firmware_cli):
        mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from pki.hardening import private_umask

    private_umask()  # everything this process creates under V2GPKI_HOME: 0600 files, 0700 directories
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except NotFound as exc:
        return _err(exc.message, 4)
    except AlreadyRevoked as exc:
        return _err(exc.message, 5)
    except ConfigError as exc:
        return _err(exc.message, 6)
    except PKIError as exc:
        return _err(exc.message, 3)
    except HSMConfigError as exc:
        return _err(str(exc), 6)
    except HSMUnavailable as exc:
        return _err(str(exc), 6)
    except SignatureCheckFailed as exc:  # "the HSM returned a signature that does not verify (key …)"
        return _err(str(exc), 6)
    except HSMError as exc:
        return _err(str(exc), 6)
    except FileNotFoundError as exc:
        return _err(f"file not found: {exc.filename}", 3)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
