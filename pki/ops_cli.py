"""Operations commands: `v2gpki backup`, `v2gpki restore`, `v2gpki config check|show`, `v2gpki revoke-bulk`.

Registered into `v2gpki` by pki/cli.py (_register_extra). Restore is a dry run unless --yes (admin tools
default to dry-run); `config check` exits 6 when production mode would refuse the configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pki.config import Settings


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_backup(args: argparse.Namespace) -> int:
    from pki.backup import backup

    s = Settings()
    res = backup(s, Path(args.out), include_token=not args.no_token, progress=_say)
    m = res.manifest
    t = m["token"]
    print(f"backup {res.path}: {m['database']['kind']} database ({m['database']['counts']['certificate']} "
          f"certificates), token: {t['kind']}, {len(m['keys'])} key labels referenced")
    if t["kind"] == "softhsm2-directory":
        _say("note: the token's PINs are NOT in the archive; keep them in your secret store")
    elif t["kind"] == "external":
        _say("note: keys stay in the network HSM; back them up with the HSM's own procedure (docs/operations.md)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from pki.backup import plan_restore, raise_if_missing, restore

    s = Settings()
    plan = plan_restore(s, Path(args.archive), include_token=not args.no_token)
    for line in plan.describe():
        print(line)
    for problem in plan.problems:
        print(f"conflict: {problem}" + (" (replaced: --force)" if args.force else ""))
    if not args.yes:
        print("dry run: nothing changed; add --yes to restore" + ("" if not plan.problems else " (and --force)"))
        return 0
    res = restore(s, plan, force=args.force, progress=_say)
    for aside in res.moved_aside:
        print(f"moved aside: {aside}")
    if res.keys_elsewhere:
        print(f"keys on another token (not checked here): {', '.join(res.keys_elsewhere)}")
    raise_if_missing(res)
    print(f"restored; {res.keys_checked} keys the database needs are present in token {s.token_label!r}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    s = Settings()
    problems = s.production_problems()
    if not problems:
        print(f"configuration fit for production (V2GPKI_ENV={s.env})")
        return 0
    for p in problems:
        print(f"- {p}")
    label = "refused" if s.env == "production" else "would be refused with V2GPKI_ENV=production"
    print(f"v2gpki: error: {len(problems)} problems: {label}", file=sys.stderr)
    return 6


def cmd_config_show(args: argparse.Namespace) -> int:
    """Effective settings, secrets masked (the PIN never; a database password never)."""
    from pki.store.db import url_without_password

    s = Settings()
    out: dict[str, object] = {}
    for name in type(s).model_fields:
        value = getattr(s, name)
        if name == "hsm_pin":
            value = None if value is None else "[set]"
        elif name == "database_url" and value:
            value = url_without_password(value)
        elif name == "audit_checkpoint_webhook" and value:
            value = "[set]"  # its URL may carry a token
        elif name == "broker_url" and value and "@" in str(value):
            value = url_without_password(str(value))
        out[f"V2GPKI_{name.upper()}"] = str(value) if value is not None else None
    print(json.dumps(out, indent=1))
    return 0


def cmd_revoke_bulk(args: argparse.Namespace) -> int:
    """The compromise drill (#28): every end-entity certificate of one issuing CA, in bounded transactions;
    a dry-run count unless --yes. Interrupted, the same command again continues (pki/revocation.py)."""
    from pki.revocation import BulkRevocation, bulk_revoke
    from pki.wiring import build_context

    ctx = build_context(Settings())
    spec = BulkRevocation(issuer=args.issuer, reason=args.reason, identifier=args.identifier,
                          subject_pattern=args.subject, batch=args.batch)

    def progress(n: int, serials: list[str]) -> None:
        _say(f"batch {n}: {len(serials)} revoked")

    res = bulk_revoke(ctx, spec, dry_run=not args.yes, actor="cli", after_batch=progress)
    if res.dry_run:
        print(f"dry run: would revoke {res.count} certificates of {args.issuer} ({args.reason}); add --yes to do it")
    else:
        print(f"revoked {res.count} certificates of {args.issuer} ({args.reason}) in {res.batches} batches, "
              f"{res.seconds:.1f} s; {res.resigned} OCSP responses re-signed; CRL {res.crl_number}; "
              f"{res.remaining} left")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rb = sub.add_parser("revoke-bulk", help="revoke every end-entity certificate of one CA (dry run unless --yes)")
    rb.add_argument("--issuer", required=True, help="issuing CA name, e.g. cpo-sub2")
    rb.add_argument("--reason", default="keyCompromise", help="RFC 5280 reason name (default keyCompromise)")
    rb.add_argument("--identifier", help="only this identifier (EVSEID, EMAID, PCID)")
    rb.add_argument("--subject", help="only subjects matching this SQL LIKE pattern")
    rb.add_argument("--batch", type=int, default=500, help="certificates per transaction (default 500)")
    rb.add_argument("--yes", action="store_true", help="really revoke")
    rb.set_defaults(fn=cmd_revoke_bulk)

    b = sub.add_parser("backup", help="archive the database and the SoftHSM2 token (no PINs) into one file")
    b.add_argument("--out", required=True, help="archive to write (tar.gz, mode 0600)")
    b.add_argument("--no-token", action="store_true",
                   help="database only (network HSM, or the token is backed up separately)")
    b.set_defaults(fn=cmd_backup)

    r = sub.add_parser("restore", help="restore a backup archive (dry run unless --yes)")
    r.add_argument("archive")
    r.add_argument("--yes", action="store_true", help="really restore")
    r.add_argument("--force", action="store_true",
                   help="replace a non-empty database / token directory (old SQLite file and token are moved aside)")
    r.add_argument("--no-token", action="store_true", help="restore the database only")
    r.set_defaults(fn=cmd_restore)

    c = sub.add_parser("config", help="configuration (V2GPKI_* environment)")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    csub.add_parser("check", help="list what V2GPKI_ENV=production would refuse (exit 6 if anything)").set_defaults(
        fn=cmd_config_check)
    csub.add_parser("show", help="effective settings as JSON, secrets masked").set_defaults(fn=cmd_config_show)
