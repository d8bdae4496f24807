"""CLI commands of the service layer: serve, ocsp-serve, org, apikey, client-cert, audit checkpoint.

Registered into `v2gpki` by pki/cli.py. `v2gpki apikey create --org NAME` prints the new key as the
LAST line of stdout (scripts take it with `tail -1`); the key is shown once and stored hashed.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
from pathlib import Path

from pki.config import Settings, current


def _ctx():  # type: ignore[no-untyped-def]
    from pki.wiring import build_context

    return build_context(Settings())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    s = Settings()
    # Migrate and check the token once in the parent, so workers start on a ready schema and a bad PIN
    # fails here with a clear message instead of in every worker.
    ctx = _ctx()
    ctx.keystore.list()
    ctx.db.dispose()
    # Bounded request heads (api/http_limits.py): size (V2GPKI_HTTP_MAX_HEAD_BYTES) and time from the first
    # byte (V2GPKI_HTTP_HEAD_TIMEOUT); idle keep-alive V2GPKI_HTTP_KEEPALIVE_TIMEOUT.
    kw: dict[str, object] = {"http": "api.http_limits:BoundedHttpToolsProtocol",
                             "h11_max_incomplete_event_size": s.http_max_head_bytes,
                             "timeout_keep_alive": s.http_keepalive_timeout}
    if args.tls_cert:
        kw.update(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
        if args.client_ca:
            kw.update(ssl_ca_certs=args.client_ca,
                      ssl_cert_reqs=ssl.CERT_REQUIRED if args.require_client_cert else ssl.CERT_OPTIONAL)
        kw["http"] = "api.http_limits:BoundedTLSH11Protocol"
    print(f"v2gpki serving on {'https' if args.tls_cert else 'http'}://{args.host}:{args.port} "
          f"({args.workers} workers, public URL {s.public_base()})", file=sys.stderr)
    # One worker runs in this process, and uvicorn re-raises the signal that stopped it once it has shut
    # down cleanly: with this handler that ends uvicorn.run() instead of the process, so the shutdown
    # checkpoint below runs (several workers: the supervisor returns by itself).
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        uvicorn.run("api.main:create_default_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level, access_log=args.access_log,
                    proxy_headers=False, **kw)  # type: ignore[arg-type]
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    _shutdown_checkpoint(ctx)
    return 0


class _Stopped(Exception):
    pass


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped


def _shutdown_checkpoint(ctx) -> None:  # type: ignore[no-untyped-def]
    """#21 item 7: sign the audit chain head and record it outside the database when serving ends cleanly.
    A failure is reported and does not turn a clean stop into an error (the beat checkpoints too)."""
    from pki.audit_sign import checkpoint

    try:
        cp = checkpoint(ctx)
    except Exception as exc:  # noqa: BLE001 - reported, type and message only (never a secret in them)
        print(f"v2gpki: warning: audit checkpoint at shutdown failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    finally:
        ctx.db.dispose()
    if cp is not None:
        print(f"audit checkpoint at seq {cp.seq} signed at shutdown", file=sys.stderr)


def cmd_ocsp_serve(args: argparse.Namespace) -> int:
    try:
        from api.ocsp_app import serve_ocsp
    except ImportError:
        print("v2gpki: error: the standalone OCSP responder is not available", file=sys.stderr)
        return 6
    serve_ocsp(args.host, args.port, args.workers)
    return 0


def cmd_org_create(args: argparse.Namespace) -> int:
    from pki.errors import Conflict
    from pki.orgs import create_org

    ctx = _ctx()
    settings: dict[str, object] = {}
    if args.organization_name:
        settings["organization_name"] = args.organization_name
    if args.allow_any_station:
        settings["allow_any_station"] = True
    try:
        org = create_org(ctx.db, args.name, args.role, args.prefix or [], settings=settings)
    except Conflict as exc:
        # exit 5 = conflict (pki/cli.py): the name exists, or a prefix overlaps another organization's
        print(f"v2gpki: error: {exc.message}", file=sys.stderr)
        return 5
    print(f"organization {org.name!r} ({org.role}) created; prefixes: {', '.join(org.prefixes) or '-'}")
    return 0


def cmd_org_list(args: argparse.Namespace) -> int:
    from pki.orgs import list_orgs

    for o in list_orgs(_ctx().db):
        print(f"{o.name:<30} {o.role:<8} {','.join(o.prefixes)}")
    return 0


def cmd_apikey_create(args: argparse.Namespace) -> int:
    from pki.orgs import create_api_key

    if args.no_expiry:
        days = None
    elif args.days <= 0:
        # #21 item 12: a key that never expires only when asked for by name
        print("v2gpki: error: --days must be at least 1; a key that never expires needs --no-expiry",
              file=sys.stderr)
        return 3
    else:
        days = args.days
    full, row = create_api_key(_ctx().db, args.org, days=days)
    print(f"API key {row.key_id} for {args.org} (expires {row.expires_at or 'never'}); shown once:")
    print(full)
    return 0


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from pki.orgs import revoke_api_key

    key_id = args.key_id.split("_")[1] if args.key_id.startswith("v2k_") else args.key_id
    revoke_api_key(_ctx().db, key_id)
    print(f"API key {key_id} revoked")
    return 0


def cmd_client_cert_issue(args: argparse.Namespace) -> int:
    """Issue an api-client certificate bound to an organization (mutual TLS to the API)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from pki.orgs import get_org

    ctx = _ctx()
    with ctx.db.session() as s:
        get_org(s, args.org)
    if args.csr:
        csr = Path(args.csr).read_bytes()
    else:
        # The client's own key (not a CA key): generated here for convenience, written 0600.
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(args.new_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.cn or f"{args.org} API client"),
                                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, args.org)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    issued = ctx.engine.issue_from_csr("api-client", csr, tenant=args.org, actor="cli")
    out = issued.pem_chain(include_root=False)
    if args.out:
        Path(args.out).write_text(out)
    else:
        sys.stdout.write(out)
    print(f"api-client certificate {issued.serial.upper()} for {args.org}", file=sys.stderr)
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from pki.audit_sign import checkpoint

    cp = checkpoint(_ctx())
    print("no events yet" if cp is None else f"checkpoint at seq {cp.seq} signed ({cp.key_label})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sv = sub.add_parser("serve", help="serve the API, OCSP and CRL responders")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=current().workers)
    sv.add_argument("--tls-cert", help="server certificate (PEM) to terminate TLS in uvicorn")
    sv.add_argument("--tls-key", help="server private key (PEM)")
    sv.add_argument("--client-ca", help="CA bundle for client certificates (mutual TLS)")
    sv.add_argument("--require-client-cert", action="store_true")
    sv.add_argument("--log-level", default="info")
    sv.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)
    sv.set_defaults(fn=cmd_serve)

    oc = sub.add_parser("ocsp-serve", help="standalone OCSP/CRL responder (holds OCSP signer keys only)")
    oc.add_argument("--host", default="127.0.0.1")
    oc.add_argument("--port", type=int, default=8001)
    oc.add_argument("--workers", type=int, default=2)
    oc.set_defaults(fn=cmd_ocsp_serve)

    org = sub.add_parser("org", help="organizations (tenants)")
    osub = org.add_subparsers(dest="org_cmd", required=True)
    oc_ = osub.add_parser("create", help="create an organization")
    oc_.add_argument("name")
    oc_.add_argument("--role", required=True, choices=["cpo", "oem", "emsp", "admin", "auditor", "manufacturer"])
    oc_.add_argument("--prefix", action="append", help="identifier prefix it owns (repeatable): DE*ABC, DE-8AA, WP0")
    oc_.add_argument("--organization-name", help="the O= its station certificates carry (default: NAME)")
    oc_.add_argument("--allow-any-station", action="store_true",
                     help="enroll ChargingStationCertificates for unregistered stations")
    oc_.set_defaults(fn=cmd_org_create)
    osub.add_parser("list").set_defaults(fn=cmd_org_list)

    ak = sub.add_parser("apikey", help="API keys (bearer fallback to client certificates)")
    asub = ak.add_subparsers(dest="apikey_cmd", required=True)
    akc = asub.add_parser("create")
    akc.add_argument("--org", required=True)
    akd = akc.add_mutually_exclusive_group()
    akd.add_argument("--days", type=int, default=365, help="lifetime in days (at least 1; default 365)")
    akd.add_argument("--no-expiry", action="store_true", help="a key that never expires (not recommended)")
    akc.set_defaults(fn=cmd_apikey_create)
    akr = asub.add_parser("revoke")
    akr.add_argument("key_id")
    akr.set_defaults(fn=cmd_apikey_revoke)

    cc = sub.add_parser("client-cert", help="API client certificates (mutual TLS)")
    csub = cc.add_subparsers(dest="cc_cmd", required=True)
    cci = csub.add_parser("issue")
    cci.add_argument("--org", required=True)
    g = cci.add_mutually_exclusive_group(required=True)
    g.add_argument("--csr")
    g.add_argument("--new-key", help="generate the client's key into this file (0600)")
    cci.add_argument("--cn")
    cci.add_argument("--out")
    cci.set_defaults(fn=cmd_client_cert_issue)

    for action in sub.choices["audit"]._subparsers._group_actions:  # type: ignore[union-attr]
        action.add_parser("checkpoint", help="sign the audit chain head with the HSM audit key").set_defaults(
            fn=cmd_audit_checkpoint)
