"""`v2gpki worker|beat|outbox|expiry|renewal|truststore|root …|subscription` (registered by pki/cli.py).

`v2gpki worker` and `v2gpki beat` are plain Celery on `workers.app:app`, so `celery -A workers.app
worker|beat|flower` works the same way. Extra arguments after `--` go to Celery unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pki.config import Settings


def _ctx():  # type: ignore[no-untyped-def]
    from pki.wiring import build_context

    return build_context(Settings())


def _celery_argv(kind: str, args: argparse.Namespace) -> list[str]:
    argv = [kind, f"--loglevel={args.loglevel}"]
    if kind == "worker":
        argv += [f"--concurrency={args.concurrency}", f"--pool={args.pool}"]
        if args.hostname:
            argv.append(f"--hostname={args.hostname}")
    return argv + list(args.celery_args or [])


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.app import app

    app.worker_main(_celery_argv("worker", args))
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from workers.app import app

    app.start(_celery_argv("beat", args))
    return 0


def cmd_outbox_drain(args: argparse.Namespace) -> int:
    from pki.store.db import Database
    from workers.outbox import drain

    db = Database(Settings().db_url)
    db.migrate()
    n = drain(db)
    print(f"dispatched {n} outbox event(s)")
    return 0


def cmd_expiry_scan(args: argparse.Namespace) -> int:
    from pki.lifecycle import scan_expiring

    res = scan_expiring(_ctx(), full=args.full)
    kind = f"full scan ({res.why_full})" if res.full else "incremental scan"
    print(f"{kind}: {res.alerts} alert(s) in {res.batches} notification batch(es), {len(res.deliveries)} "
          "delivery(ies) queued (sent by the worker)")
    return 0


def cmd_renewal(args: argparse.Namespace) -> int:
    from pki.lifecycle import renew_due, renewal_due

    ctx = _ctx()
    if not args.yes:
        for r in renewal_due(ctx):
            print(f"due: {r.identifier} serial {r.serial.upper()} (expires {r.not_after:%Y-%m-%d})")
        print("dry run: add --yes to renew")
        return 0
    for res in renew_due(ctx):
        print(f"{res.identifier}: {res.state} {res.old_serial.upper()} -> {(res.new_serial or '-').upper()} "
              f"(key {res.new_label})")
    return 0


def cmd_truststore_publish(args: argparse.Namespace) -> int:
    from pki.trustlist import STORES, publish

    ctx = _ctx()
    stores = [args.store] if args.store else list(STORES)
    for st in stores:
        row = publish(ctx, st, args.reason, force=args.force)
        print(f"{st}: version {row.version} published" if row else f"{st}: unchanged")
    return 0


def cmd_root_rollover(args: argparse.Namespace) -> int:
    from pki.lifecycle import rollover_root

    ctx = _ctx()
    old = ctx.engine.ca(args.ca)
    if not args.yes:
        print(f"dry run: would create a new root after {args.ca} ({old.row.subject}, expires "
              f"{old.row.not_after:%Y-%m-%d}): new {old.alg.value} key in the HSM, a cross-certificate signed by "
              f"{args.ca}, and a new trust-store version for subscribers; add --yes to do it")
        return 0
    r = rollover_root(ctx, args.ca, actor="cli")
    print(f"new root {r.new} (serial {r.new_serial.upper()}, key {r.key_label}) cross-signed by {r.old} "
          f"(serial {r.cross_serial.upper()}); the worker publishes the new trust-store version")
    if args.publish:
        from pki.trustlist import publish_all

        for row in publish_all(ctx, f"root rollover {r.old} -> {r.new}"):
            print(f"{row.store}: version {row.version} published")
    return 0


def _conflict(exc: Exception) -> int:
    msg = getattr(exc, "message", str(exc))
    print(f"v2gpki: error: {msg}", file=sys.stderr)
    return 5


def _coverage_lines(cov: Any) -> list[str]:
    d = cov.as_json()
    ratio = "n/a (no registered station)" if d["coverage"] is None else f"{d['coverage']:.1%}"
    out = [f"root {d['root']} ({d['status']}): {d['with_root']} of {d['stations']} stations report it "
           f"({ratio}); switch threshold {d['threshold']:.1%}"]
    if d["campaign"]:
        c = d["campaign"]
        out.append(f"campaign {c['old_root']} -> {c['new_root']}: {c['state']}")
    for o in d["per_cpo"]:
        r = "n/a" if o["coverage"] is None else f"{o['coverage']:.1%}"
        out.append(f"  {o['org']:<30} {o['with_root']:>7} / {o['stations']:<7} {r:>7}  ({o['reported']} reported)")
    return out


def cmd_root_coverage(args: argparse.Namespace) -> int:
    from pki.root_campaign import coverage

    cov = coverage(_ctx(), args.ca)
    if args.json:
        print(json.dumps(cov.as_json(), indent=1))
        return 0
    print("\n".join(_coverage_lines(cov)))
    return 0


def cmd_root_switch(args: argparse.Namespace) -> int:
    from pki.errors import Conflict
    from pki.root_campaign import campaign_of, coverage, root_row, switch

    ctx = _ctx()
    if not args.yes:
        row = root_row(ctx, args.ca)
        camp = campaign_of(ctx, row.name)
        print("\n".join(_coverage_lines(coverage(ctx, camp.new_root if camp else row.name))))
        print("dry run: would switch issuance to the new root (its sub-CAs created under it, each with an OCSP "
              "signer); add --yes to do it" + ("" if not args.force else " (forced below the threshold)"))
        return 0
    try:
        res = switch(ctx, args.ca, force=args.force, actor="cli")
    except Conflict as exc:
        return _conflict(exc)
    c = res.campaign
    cov = "n/a" if res.coverage is None else f"{res.coverage:.1%}"
    print(f"issuance switched from {c.old_root} to {c.new_root} at coverage {cov}"
          + (" (forced)" if c.forced else "") + (f"; created {', '.join(res.created)}" if res.created else ""))
    print("restart `v2gpki serve` and the workers so every process picks the new issuers")
    return 0


def cmd_root_withdraw(args: argparse.Namespace) -> int:
    from pki.errors import Conflict
    from pki.root_campaign import blocking_certificates, campaign_of, root_row, withdraw

    ctx = _ctx()
    if not args.yes:
        row = root_row(ctx, args.ca)
        camp = campaign_of(ctx, row.name)
        old = camp.old_root if camp else row.name
        n = len(blocking_certificates(ctx, old))
        print(f"dry run: would withdraw {old} and its sub-CAs ({n} certificate(s) under it still valid and not "
              "replaced: withdrawal is refused while any remain); add --yes to do it")
        return 0
    try:
        res = withdraw(ctx, args.ca, actor="cli")
    except Conflict as exc:
        return _conflict(exc)
    print(f"withdrawn: {', '.join(res.retired)}; the next trust lists distrust them and the trust-store plans "
          "delete the root from stations that still report it")
    return 0


def cmd_root_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pki.errors import Conflict
    from pki.truststore_plan import import_root

    try:
        row = import_root(_ctx(), args.type, Path(args.file).read_bytes(), org=args.org, actor="cli")
    except Conflict as exc:
        return _conflict(exc)
    print(f"imported {row.certificate_type} {row.subject} (id {row.id}, sha256 {row.sha256}) for "
          f"{'every CPO' if row.scope == '*' else row.scope}")
    return 0


def cmd_root_imported(args: argparse.Namespace) -> int:
    from pki.truststore_plan import import_json, list_imports

    rows = [import_json(r) for r in list_imports(_ctx(), args.org)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'ID':>4} {'TYPE':<28} {'SCOPE':<20} {'STATUS':<10} SUBJECT")
    for r in rows:
        print(f"{r['id']:>4} {r['certificateType']:<28} {r['scope']:<20} {r['status']:<10} {r['subject']}")
    return 0


def cmd_root_unimport(args: argparse.Namespace) -> int:
    from pki.errors import Conflict
    from pki.truststore_plan import withdraw_import

    try:
        row = withdraw_import(_ctx(), args.id, actor="cli")
    except Conflict as exc:
        return _conflict(exc)
    print(f"withdrawn imported root {row.id} ({row.subject}): plans delete it from stations that report it")
    return 0


def cmd_sub_add(args: argparse.Namespace) -> int:
    from pki.lifecycle import add_subscription

    ctx = _ctx()
    kind = "email" if args.email else "webhook"
    target = args.email or args.url
    if not target:
        print("v2gpki: error: give --url (webhook) or --email", file=sys.stderr)
        return 2
    events = [e.strip() for e in args.events.split(",")] if args.events else []
    new = add_subscription(ctx, args.org, kind, target, events, actor="cli")
    print(f"subscription {new.row.sub_id} for {new.row.org}: {kind} {target} events {','.join(new.row.events)}")
    if new.secret:
        print("HMAC secret (shown once; receivers verify X-V2GPKI-Signature with it):")
        print(new.secret)
    return 0


def _sub_json(r: Any) -> dict[str, Any]:
    return {"id": r.sub_id, "org": r.org, "kind": r.kind, "target": r.target, "events": r.events,
            "created_at": r.created_at.isoformat()}


def cmd_sub_list(args: argparse.Namespace) -> int:
    from pki.lifecycle import list_subscriptions

    rows = list_subscriptions(_ctx(), args.org)
    if args.json:
        print(json.dumps([_sub_json(r) for r in rows], indent=1))
        return 0
    print(f"{'ID':<22} {'ORG':<20} {'KIND':<8} {'EVENTS':<34} TARGET")
    for r in rows:
        print(f"{r.sub_id:<22} {r.org:<20} {r.kind:<8} {','.join(r.events):<34} {r.target}")
    return 0


def cmd_sub_remove(args: argparse.Namespace) -> int:
    from pki.lifecycle import remove_subscription

    r = remove_subscription(_ctx(), args.id, args.org, actor="cli")
    print(f"removed subscription {r.sub_id} of {r.org}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def celery_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--loglevel", default="INFO")
        p.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra Celery arguments after --")

    w = sub.add_parser("worker", help="run a Celery worker (renewal, alerts, trust stores, CRL/OCSP refresh)")
    w.add_argument("--concurrency", type=int, default=2)
    w.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    w.add_argument("--hostname", help="Celery node name, e.g. w1@%%h")
    celery_opts(w)
    w.set_defaults(fn=cmd_worker)

    b = sub.add_parser("beat", help="run the Celery beat scheduler (one per deployment)")
    celery_opts(b)
    b.set_defaults(fn=cmd_beat)

    ob = sub.add_parser("outbox", help="transactional outbox")
    obs = ob.add_subparsers(dest="outbox_cmd", required=True)
    obs.add_parser("drain", help="send pending outbox events to the broker now").set_defaults(fn=cmd_outbox_drain)

    ex = sub.add_parser("expiry", help="expiry alerting")
    exs = ex.add_subparsers(dest="expiry_cmd", required=True)
    esc = exs.add_parser("scan", help="run one expiry scan now (incremental: what entered a window or changed "
                                      "since the last scan)")
    esc.add_argument("--full", action="store_true",
                     help="read every certificate inside a window, as after a change of the window policy (which "
                          "the scan detects by itself)")
    esc.set_defaults(fn=cmd_expiry_scan)

    rn = sub.add_parser("renewal", help="renew service-held certificates that are due (dry run unless --yes)")
    rn.add_argument("--yes", action="store_true")
    rn.set_defaults(fn=cmd_renewal)

    ts = sub.add_parser("truststore", help="signed trust lists")
    tss = ts.add_subparsers(dest="truststore_cmd", required=True)
    tp = tss.add_parser("publish", help="publish new versions where the content changed")
    tp.add_argument("--store", choices=["v2g", "mo", "oem", "csms"])
    tp.add_argument("--reason", default="manual publication")
    tp.add_argument("--force", action="store_true", help="publish even if unchanged")
    tp.set_defaults(fn=cmd_truststore_publish)

    rt = sub.add_parser("root", help="root CA operations")
    rts = rt.add_subparsers(dest="root_cmd", required=True)
    ro = rts.add_parser("rollover", help="new root cross-signed by the old one (dry run unless --yes)")
    ro.add_argument("ca", help="the root CA name, e.g. v2g-root")
    ro.add_argument("--yes", action="store_true")
    ro.add_argument("--publish", action="store_true", help="publish the trust stores now instead of via the worker")
    ro.set_defaults(fn=cmd_root_rollover)
    rc = rts.add_parser("coverage", help="how many of each CPO's stations report a root (from their last reports)")
    rc.add_argument("ca", help="root CA name or id, e.g. mo-root-g2")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(fn=cmd_root_coverage)
    rw = rts.add_parser("switch", help="switch issuance to the new root of a rollover (dry run unless --yes); "
                        "refused below V2GPKI_ROOT_SWITCH_MIN_COVERAGE unless --force")
    rw.add_argument("ca", help="the new root (or the old one)")
    rw.add_argument("--force", action="store_true", help="switch below the coverage threshold")
    rw.add_argument("--yes", action="store_true")
    rw.set_defaults(fn=cmd_root_switch)
    rd = rts.add_parser("withdraw", help="withdraw the old root once no valid certificate depends on it "
                        "(dry run unless --yes)")
    rd.add_argument("ca", help="the old root (or the new one)")
    rd.add_argument("--yes", action="store_true")
    rd.set_defaults(fn=cmd_root_withdraw)
    ri = rts.add_parser("import", help="import a root of another PKI that CPOs trust (pushed by the trust-store plans)")
    ri.add_argument("file", help="the root certificate, PEM or DER")
    ri.add_argument("--type", required=True, choices=["V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate",
                                                      "ManufacturerRootCertificate", "OEMRootCertificate"],
                    help="OCPP InstallCertificateUseEnumType (OEMRootCertificate: OCPP 2.1 stations only)")
    ri.add_argument("--org", help="for this CPO only (default: every CPO)")
    ri.set_defaults(fn=cmd_root_import)
    rl = rts.add_parser("imported", help="list imported roots")
    rl.add_argument("--org", help="those a CPO sees (global and its own)")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(fn=cmd_root_imported)
    ru = rts.add_parser("unimport", help="withdraw an imported root (plans then delete it from stations)")
    ru.add_argument("id", type=int)
    ru.set_defaults(fn=cmd_root_unimport)

    sb = sub.add_parser("subscription", help="lifecycle event subscriptions (webhook / e-mail) of an organization")
    sbs = sb.add_subparsers(dest="subscription_cmd", required=True)
    sa = sbs.add_parser("add", help="add a subscription (prints the HMAC secret once)")
    sa.add_argument("--org", required=True)
    sa.add_argument("--url", help="webhook URL (https in production)")
    sa.add_argument("--email", help="e-mail address instead of a webhook")
    sa.add_argument("--events", help="comma-separated: expiry,truststore,revocation,renewal (default all)")
    sa.set_defaults(fn=cmd_sub_add)
    sl = sbs.add_parser("list", help="list subscriptions")
    sl.add_argument("--org")
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(fn=cmd_sub_list)
    sr = sbs.add_parser("remove", help="remove a subscription")
    sr.add_argument("id")
    sr.add_argument("--org")
    sr.set_defaults(fn=cmd_sub_remove)


__all__ = ["register"]
