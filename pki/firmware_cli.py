"""`v2gpki firmware setup|sign|verify|list` (#27 item 3; pki/firmware.py).

Registered into `v2gpki` by pki/cli.py (_register_extra). Exit codes as README's: 3 refused (rollback,
another manufacturer's product, bad input, a signature that does not verify), 4 not found (no such
organization, no signing certificate yet), 6 HSM / configuration (clock skew included).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from pki.config import Settings
from pki.errors import BadSubject


def _ctx():  # type: ignore[no-untyped-def]
    from pki.wiring import build_context

    return build_context(Settings())


def _org(ctx, name: str | None) -> str:  # type: ignore[no-untyped-def]
    """--org, or the only manufacturer organization there is."""
    if name:
        return name
    from pki.firmware import ROLE
    from pki.store.orgs import org_names_with_role

    names = org_names_with_role(ctx.db, ROLE)
    if len(names) != 1:
        raise BadSubject(f"name the manufacturer with --org ({len(names)} {ROLE} organizations)")
    return str(names[0])


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadSubject(f"{value!r} is not an ISO 8601 date-time") from None
    if t.tzinfo is None:
        raise BadSubject(f"{value!r}: give a time zone (e.g. 2027-01-01T02:00:00Z)")
    return t


def cmd_setup(args: argparse.Namespace) -> int:
    from pki.firmware import setup

    ctx = _ctx()
    res = setup(ctx, args.org, country=args.country, actor="cli")
    for what in res.created:
        print(f"created {what}", file=sys.stderr)
    print(f"{args.org}: Manufacturer root {res.ca}, firmware-signing certificate serial {res.signing.serial.upper()} "
          f"(valid until {res.signing.not_after:%Y-%m-%d}); install the root as ManufacturerRootCertificate: "
          f"`v2gpki chain {res.ca}`")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from pki.firmware import sign_file

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(2, "not a file", str(path))
    ctx = _ctx()
    org = _org(ctx, args.org)
    signed = sign_file(ctx, org, path, product=args.product, version=args.version,
                       location=args.location or path.name, retrieve_at=_time(args.retrieve_at),
                       install_at=_time(args.install_at), force=args.force, actor=f"cli:{org}")
    out = json.dumps(signed.firmware if not args.details else signed.as_json(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(out)
        print(f"signed {signed.product} {signed.version} (sha256 {signed.sha256}) with "
              f"{signed.issuer}/{signed.serial.upper()} -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from cryptography import x509

    from pki.firmware import FirmwareVerificationFailed, sha256_file, verify_digest

    if args.json:
        fw = json.loads(Path(args.json).read_text())
        fw = fw.get("firmware", fw)
        signature, certificate = fw.get("signature"), fw.get("signingCertificate")
    else:
        signature = args.signature
        if signature and signature.startswith("@"):
            signature = Path(signature[1:]).read_text()
        certificate = Path(args.certificate).read_text() if args.certificate else None
    if not signature or not certificate:
        raise BadSubject("give --json FIRMWARE.json, or --signature (base64 or @FILE) and --certificate PEM")
    root = x509.load_pem_x509_certificate(Path(args.root).read_bytes()) if args.root else None
    ctx = _ctx()
    with Path(args.file).open("rb") as f:
        digest, _ = sha256_file(f)
    res = verify_digest(ctx, digest, signature, certificate, root)
    for c in res.checks:
        print(f"ok: {c}")
    if not res.ok:
        for p in res.problems:
            print(f"FAIL: {p}")
        raise FirmwareVerificationFailed("a charging station would refuse this firmware: " + "; ".join(res.problems))
    print("firmware signature OK")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pki.firmware import signatures

    ctx = _ctx()
    rows = signatures(ctx, args.org, args.product)
    if not rows and args.org:
        from pki.firmware import _manufacturer

        with ctx.db.session() as s:
            _manufacturer(s, args.org)
    for r in rows:
        print(json.dumps({"tenant": r.tenant, "product": r.product, "version": r.version, "sha256": r.sha256,
                          "size": r.size, "signingCertificate": f"{r.issuer}/{r.serial.upper()}",
                          "forced": r.forced, "actor": r.actor, "created_at": r.created_at.isoformat()}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fw = sub.add_parser("firmware", help="signed firmware for charging stations (OCPP 2.0.1 L01)")
    fsub = fw.add_subparsers(dest="firmware_cmd", required=True)

    su = fsub.add_parser("setup", help="the manufacturer's root and firmware-signing certificate (idempotent)")
    su.add_argument("--org", required=True, help="a --role manufacturer organization")
    su.add_argument("--country", help="C of the root and signing certificate (default: the hierarchy's)")
    su.set_defaults(fn=cmd_setup)

    sg = fsub.add_parser("sign", help="sign a firmware image; writes UpdateFirmwareRequest's firmware object")
    sg.add_argument("file")
    sg.add_argument("--product", required=True)
    sg.add_argument("--version", required=True)
    sg.add_argument("--org", help="the manufacturer (default: the only manufacturer organization)")
    sg.add_argument("--location", help="URI chargers download the image from (default: the file's name)")
    sg.add_argument("--retrieve-at", help="retrieveDateTime, ISO 8601 with zone (default: now)")
    sg.add_argument("--install-at", help="installDateTime, ISO 8601 with zone (default: none)")
    sg.add_argument("--force", action="store_true",
                    help="sign even below the highest version already signed for the product (rollback)")
    sg.add_argument("--details", action="store_true", help="wrap the firmware object with product, version, digest")
    sg.add_argument("--out", help="write the JSON here (default: stdout)")
    sg.set_defaults(fn=cmd_sign)

    vf = fsub.add_parser("verify", help="check a signed image as a charging station does (exit 3 if it would refuse)")
    vf.add_argument("file")
    vf.add_argument("--json", help="the firmware object (or `firmware sign --details` output)")
    vf.add_argument("--signature", help="base64 signature, or @FILE holding it")
    vf.add_argument("--certificate", help="signing certificate, PEM file")
    vf.add_argument("--root", help="the Manufacturer root the station has installed (default: ours)")
    vf.set_defaults(fn=cmd_verify)

    ls = fsub.add_parser("list", help="firmware signatures made (JSON lines)")
    ls.add_argument("--org")
    ls.add_argument("--product")
    ls.set_defaults(fn=cmd_list)


__all__ = ["register"]
