"""`v2gpki worker|beat|outbox|expiry|renewal|truststore|root rollover|subscription` (registered by pki/cli.py).

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
    from pki.context import build_context

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

    res = scan_expiring(_ctx())
    print(f"{res.alerts} alert(s) in {res.batches} notification batch(es), {len(res.deliveries)} delivery(ies) "
          "queued (sent by the worker)")
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
    exs.add_parser("scan", help="run one expiry scan now").set_defaults(fn=cmd_expiry_scan)

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
