"""Certificate lifecycle: outbox hooks, expiry alerting, notification delivery, renewal, root rollover.

The domain half of the workers (workers/ holds only thin Celery tasks that call this module):

* **Outbox** — the engine's outbox observers (pki/outbox.py, connected in pki/wiring.py) write an
  `outbox` row *in the same transaction* as a revocation or a new CA certificate (transactional outbox:
  the event exists iff the change committed); they are sent to the broker after commit and periodically.
* **Expiry alerts** — one alert per certificate and window (default 60/30/14/7/1 days; sub-CAs and roots
  get rollover-plan windows, roots 2 years ahead). The unique constraint (cert_id, window_days) is what
  makes an alert exactly-once, whatever the broker redelivers; alerts and their notifications commit
  together, grouped per tenant.
* **Deliveries** — webhook (JSON, HMAC-SHA256 over "timestamp.body", RFC 2104) or e-mail (SMTP);
  retried with exponential backoff from the database (not from broker countdowns, so a broker restart
  loses nothing), 'dead' after N attempts. Webhooks are at-least-once: receivers de-duplicate on the
  X-V2GPKI-Delivery header.
* **Renewal** — service-held certificates (OCSP signers, CPS leaves, the trust-list signer) are renewed
  after a configurable fraction of their life with a new key under a fresh HSM label; the old
  certificate stays valid until it expires. Renewal rows keyed by the old certificate make it idempotent.
* **Root rollover** — a new root (new key, new label) cross-signed by the old one; the outbox then
  publishes a new trust-store version (pki/trustlist.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import smtplib
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509

from hsm import sealing
from hsm.uri import key_label
from pki import audit
from pki.errors import BadRevocation, ConfigError, Conflict, NotFound, PKIError, UnknownCA
from pki.lifecycle_policy import (  # noqa: F401 - re-exported: callers find the policy here
    ExpiryPolicy,
    Lifecycle,
    LifecyclePolicy,
    LifecycleSettings,
    RenewalPolicy,
    TrustStorePolicy,
    _check_windows,
    load_policy,
)
from pki.names import subject_fields_of as _subject_fields
from pki.outbox import add_outbox
from pki.profiles import Profile
from pki.store import lifecycle as store
from pki.store.db import utcnow
from pki.store.models import Certificate
from pki.store.models_lifecycle import Delivery, ExpiryScanMark, Subscription
from pki.store.subscriptions import new_delivery as _new_delivery
from pki.store.subscriptions import subscribers as _subscribers

if TYPE_CHECKING:
    from pki.context import Context
    from pki.store.db import Session

log = logging.getLogger("v2gpki.lifecycle")

EVENTS = ("expiry", "truststore", "revocation", "renewal")
SUB_KINDS = ("webhook", "email")
# OPCP 1.0 webhook event types (webhooks.v1.json ``Event``; root.cert.revoked from webhook.payload.v1.json).
# A subscription made through /v1/webhook/endpoints lists these; their deliveries carry the OPCP payload
# shape (webhook.payload.v1.json: timestamp, eventId, eventType, xsdMsgDefNamespace, payload) signed with
# the ``payload-signature`` / ``X-Hubject-Signature`` headers (beside X-V2GPKI-Signature).
OPCP_ROOT_EVENTS = ("root.cert.added", "root.cert.expired", "root.cert.revoked")
OPCP_CONTRACT_EVENTS = (
    "mo.prov.cert.updated", "mo.prov.cert.deleted", "mo.prov.cert.updated.factory.reset",
    "mo.contract.delivered.to.oem", "mo.contract.created.sent.to.oem", "mo.contract.updated.sent.to.oem",
    "mo.contract.deleted.sent.to.oem", "mo.contract.rejected.by.oem", "mo.contract.queued.to.oem",
    "oem.contract.created", "oem.contract.updated", "oem.contract.deleted",
)
OPCP_EVENTS = OPCP_ROOT_EVENTS + OPCP_CONTRACT_EVENTS

def lifecycle_of(ctx: Context) -> Lifecycle:
    """The Context's lifecycle policy and engine (pki/wiring.py builds them)."""
    return ctx.lifecycle


# -- subscriptions ---------------------------------------------------------------------------------------

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}$")


def check_webhook_url(url: str, settings: LifecycleSettings, *, resolve: bool = False) -> None:
    """https only in production; no loopback/private/link-local targets unless allowed (SSRF guard)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise PKIError("webhook URL must be an absolute http(s) URL")
    if parts.scheme != "https" and settings.env == "production":
        raise PKIError("webhook URL must use https in production")
    if parts.username or parts.password:
        raise PKIError("webhook URL must not carry credentials (the HMAC secret authenticates us)")
    if settings.allow_private_targets():
        return
    hosts = [parts.hostname]
    if resolve:
        try:
            hosts = [str(ai[4][0]) for ai in socket.getaddrinfo(parts.hostname, parts.port or 443)]
        except OSError as exc:
            raise PKIError(f"webhook host does not resolve: {exc}") from None
    for h in hosts:
        try:
            ip = ipaddress.ip_address(str(h))
        except ValueError:
            if str(h).lower() in ("localhost",) or str(h).endswith(".localhost"):
                raise PKIError("webhook URL points at this host") from None
            continue
        if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise PKIError("webhook URL points at a private or loopback address")


@dataclass
class NewSubscription:
    row: Subscription
    secret: str | None  # shown once


def _check_events(events: Sequence[str] | None) -> list[str]:
    evs = sorted(set(events or EVENTS))
    bad = [e for e in evs if e not in EVENTS and e not in OPCP_EVENTS]
    if bad:
        raise PKIError(f"unknown event(s) {', '.join(bad)} "
                       f"(use {', '.join(EVENTS)} or OPCP's {', '.join(OPCP_EVENTS)})")
    return evs


def add_subscription(ctx: Context, org: str, kind: str, target: str, events: Sequence[str], *,
                     secret: str | None = None, actor: str = "cli",
                     attributes: dict[str, Any] | None = None) -> NewSubscription:
    """A subscription of ``org`` to ``events`` (lifecycle events, or OPCP's event types — then delivered in
    the OPCP payload shape). ``attributes``: what the OPCP/OPNC webhook APIs keep beside it (description,
    metadata, status — "disabled" gets no deliveries —, apiVersion) or a one-shot subscription (``oneShot``,
    ``emaid``: one delivery for that contract's events, never matched otherwise)."""
    lc = lifecycle_of(ctx)
    if kind not in SUB_KINDS:
        raise PKIError(f"subscription kind must be one of {', '.join(SUB_KINDS)}")
    evs = _check_events(events)
    if kind == "webhook":
        check_webhook_url(target, lc.settings)
        if secret is not None and not 16 <= len(secret) <= 128:
            raise PKIError("the HMAC secret must be 16–128 characters")
        secret = secret or secrets.token_urlsafe(32)
    else:
        if not _EMAIL_RE.match(target):
            raise PKIError("not an e-mail address")
        secret = None
    with ctx.db.session() as s:
        if not store.organization_exists(s, org):
            raise NotFound(f"no organization {org!r}")
        sub_id = "sub_" + secrets.token_hex(8)
        # Sealed in the token (hsm/sealing.py): a database read alone does not reveal it (#21 item 11).
        row = Subscription(sub_id=sub_id, org=org, kind=kind, target=target,
                           secret=None if secret is None else sealing.seal(ctx.keystore, secret, sub_id),
                           events=evs, created_at=utcnow(), attributes=attributes)
        s.add(row)
        # The target is recorded, the secret never (audit details are readable by auditors).
        audit.append(s, audit.Entry(actor=actor, org=org, action="subscription.create", object=row.sub_id,
                                    details={"kind": kind, "target": _redact_url(target), "events": evs}))
        s.commit()
        s.refresh(row)
    return NewSubscription(row, secret)


def seal_stored_secrets(ctx: Context) -> int:
    """Create the token's sealing key if absent and seal every webhook secret an earlier version stored in
    clear (run by `v2gpki init`, after upgrades). Returns how many were sealed."""
    sealing.ensure_key(ctx.keystore)
    n = 0
    with ctx.db.session() as s:
        for row in store.subscriptions_with_secret(s):
            if row.secret is not None and not sealing.is_sealed(row.secret):
                row.secret = sealing.seal(ctx.keystore, row.secret, row.sub_id)
                s.add(row)
                n += 1
        s.commit()
    return n


def _redact_url(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}{':' + str(p.port) if p.port else ''}{p.path}" if p.scheme else url


def list_subscriptions(ctx: Context, org: str | None) -> list[Subscription]:
    with ctx.db.session() as s:
        return store.active_subscriptions(s, org)


def _active_subscription(s: Session, sub_id: str, org: str | None) -> Subscription:
    """The active subscription ``sub_id``; another organization's (``org`` set) is NotFound, like an unknown one."""
    row = store.active_subscription(s, sub_id, org)
    if row is None:
        raise NotFound(f"no subscription {sub_id!r}")
    return row


def get_subscription(ctx: Context, sub_id: str, org: str | None) -> Subscription:
    """One active subscription; another organization's (``org`` set) is NotFound, like an unknown one."""
    with ctx.db.session() as s:
        return _active_subscription(s, sub_id, org)


def update_subscription(ctx: Context, sub_id: str, org: str | None, *, target: str | None = None,
                        events: Sequence[str] | None = None, attributes: dict[str, Any] | None = None,
                        actor: str = "cli") -> Subscription:
    """Change a webhook subscription's URL, events or attributes (OPCP update-webhook-endpoint); the
    secret stays. Checked as at creation; another organization's is NotFound."""
    lc = lifecycle_of(ctx)
    evs = _check_events(events) if events is not None else None
    with ctx.db.session() as s:
        row = _active_subscription(s, sub_id, org)
        if target is not None:
            if row.kind == "webhook":
                check_webhook_url(target, lc.settings)
            row.target = target
        if evs is not None:
            row.events = evs
        if attributes is not None:
            row.attributes = attributes
        s.add(row)
        audit.append(s, audit.Entry(actor=actor, org=row.org, action="subscription.update", object=sub_id,
                                    details={"target": _redact_url(row.target), "events": list(row.events)}))
        s.commit()
        s.refresh(row)
        return row


def remove_subscription(ctx: Context, sub_id: str, org: str | None, *, actor: str = "cli") -> Subscription:
    with ctx.db.session() as s:
        row = _active_subscription(s, sub_id, org)
        row.deleted_at = utcnow()
        s.add(row)
        audit.append(s, audit.Entry(actor=actor, org=row.org, action="subscription.delete", object=sub_id))
        s.commit()
        return row


def queue_one_shot(ctx: Context, event: str, key: str, payload: dict[str, Any], org: str, emaid: str) -> list[int]:
    """The delivery of ``org``'s one-shot subscriptions for contract ``emaid`` (an OPCP subscriptionUrl) that
    have had none yet: each is called once, with the first event of its contract."""
    now = utcnow()
    with ctx.db.session() as s:
        subs = [r for r in store.active_subscriptions(s, org)
                if (r.attributes or {}).get("oneShot") and (r.attributes or {}).get("emaid") == emaid]
        if not subs:
            return []
        done = store.subscriptions_delivered(s, [r.id for r in subs if r.id is not None])
        rows = [_new_delivery(int(r.id), r.org, event, key, payload, now) for r in subs
                if r.id is not None and r.id not in done]
        if rows:
            store.insert_deliveries(s, rows)  # False: a concurrent run inserted them; they exist once
        return store.pending_delivery_ids(s, [key])


def opcp_event(event_type: str, payload: dict[str, Any], namespace: str = "urn:iso:15118:2:2013:MsgDef",
               at: datetime | None = None) -> dict[str, Any]:
    """An OPCP webhook body (webhook.payload.v1.json): the eventId is fixed when the event is queued, so a
    retried delivery carries the same one (receivers de-duplicate on it)."""
    import uuid

    if event_type not in OPCP_EVENTS:
        raise PKIError(f"not an OPCP event type: {event_type}")
    return {"timestamp": (at or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ"), "eventId": str(uuid.uuid4()),
            "eventType": event_type, "xsdMsgDefNamespace": namespace, "payload": payload}


def queue_event(ctx: Context, event: str, key: str, payload: dict[str, Any], tenant: str | None, *,
                everyone: bool = False) -> list[int]:
    """Deliveries of one event to the tenant's subscribers (or to every subscriber), idempotent on
    (subscription, key): a re-run after a crash creates nothing twice. Returns pending delivery ids."""
    now = utcnow()
    with ctx.db.session() as s:
        by_org = _subscribers(s, event)
        targets = {r.id: r for rs in by_org.values() for r in rs} if everyone else {
            r.id: r for r in by_org.get(tenant, [])}
        have = store.subscriptions_with_event(s, key)
        rows = [_new_delivery(int(sid), r.org, event, key, payload, now) for sid, r in targets.items()
                if sid is not None and sid not in have]
        if rows:
            store.insert_deliveries(s, rows)  # False: a concurrent run inserted them; they exist once
        return store.pending_delivery_ids(s, [key])


# -- expiry alerting -------------------------------------------------------------------------------------

_ACTIONS = {
    "secc": "send OCPP 2.0.1 TriggerMessage(requestedMessage=SignV2GCertificate) to the charging station so "
            "it sends SignCertificateRequest(certificateType=V2GCertificate) with a fresh CSR",
    "cs-client": "send OCPP 2.0.1 TriggerMessage(requestedMessage=SignChargingStationCertificate) to the "
                 "station so it sends SignCertificateRequest(certificateType=ChargingStationCertificate)",
    "contract": "re-provision the contract: ISO 15118-2 CertificateUpdate (OCPP Get15118EVCertificate "
                "action=Update) before expiry, or issue a new contract for the EMAID",
    "oem-prov": "re-provision the vehicle's OEM provisioning certificate through the OEM back end "
                "(contract installation needs a valid one)",
    "csms-server": "renew the CSMS server TLS certificate (new CSR) before chargers reject the connection",
    "api-client": "renew the API client certificate (new CSR) and deploy it to the client",
}


def _family(profile: str) -> str:
    return re.sub(r"-20$", "", profile)


def _identifier_type(profile: Profile | None, ident: str | None) -> str:
    from pki.names import EVSEID_RE

    if profile is None:
        return "other"
    if profile.ca:
        return "CA"
    fam = _family(profile.name)
    if fam == "secc":
        return "EVSEID" if ident and EVSEID_RE.match(ident) else "SECCID"
    return {"contract": "EMAID", "oem-prov": "PCID", "cs-client": "station", "csms-server": "FQDN"}.get(
        fam, "service")


def action_for(profile: Profile, identifier: str | None, key_uri: str | None, renewal_ids: Sequence[str]) -> str:
    if profile.ca:
        if profile.self_signed:
            return (f"plan the root rollover now: `v2gpki root rollover {identifier}` creates a new root (new HSM "
                    "key) cross-signed by this one and publishes a new trust-store version; EVs and chargers "
                    "must have it installed before this root expires")
        return (f"issue a successor for sub-CA {identifier} (new key) and move issuance to it before this "
                "certificate expires; certificates it issued cannot outlive it")
    if key_uri and any(fnmatch.fnmatch(identifier or "", p) for p in renewal_ids):
        return ("renewed automatically by the renewal worker (service-held key); if this alert repeats, check "
                "that `v2gpki worker` and `v2gpki beat` run")
    return _ACTIONS.get(_family(profile.name), "request a new certificate (new CSR) before expiry")


@dataclass
class Candidate:
    cert_id: int
    issuer: str
    serial: str
    profile: str
    identifier: str | None
    tenant: str | None
    subject: str
    not_after: datetime
    key_uri: str | None
    window: int


@dataclass
class ScanResult:
    alerts: int = 0
    batches: int = 0
    deliveries: list[int] = field(default_factory=list)
    conflicts: int = 0
    candidates: int = 0
    unresolved: int = 0  # candidates left unrecorded after the conflict retries (the mark then stays)
    full: bool = True  # read every certificate inside a window (False: the incremental scan)
    why_full: str | None = None  # why this scan was a full one


def _groups(ctx: Context, lc: Lifecycle) -> list[tuple[list[int], list[str] | None, list[str]]]:
    """(windows, profiles IN list or None, profiles NOT IN list) — one query per distinct window set:
    CA profiles and per-profile overrides explicitly, every other profile with the default windows."""
    profiles = {**ctx.profiles.profiles, **lc.extra_profiles}
    by_windows: dict[tuple[int, ...], list[str]] = defaultdict(list)
    explicit: set[str] = set(lc.policy.expiry.exclude_profiles)
    for name, p in profiles.items():
        if name in lc.policy.expiry.exclude_profiles:
            continue
        if p.ca or name in lc.policy.expiry.profiles:
            by_windows[tuple(lc.windows_for(p))].append(name)
            explicit.add(name)
    out: list[tuple[list[int], list[str] | None, list[str]]] = [
        (list(w), sorted(names), []) for w, names in by_windows.items()]
    out.append((lc.default_windows(), None, sorted(explicit)))
    return out


def candidate_query(ctx: Context, now: datetime, windows: Sequence[int], include: list[str] | None,
                    exclude: list[str], tenant: str | None = None) -> Any:
    """The SQL of one window group's candidates (pki/store/lifecycle.py; bench/expiry.py shows its plan)."""
    return store.candidate_query(now, windows, include, exclude, tenant)


def candidates(ctx: Context, now: datetime | None = None, *, chunk: int = 20000,
               tenant: str | None = None) -> Iterable[list[Candidate]]:
    """All candidates, in chunks (keyset pagination on (notAfter, id): the (not_after, status) index drives
    the range scan and memory stays bounded by the chunk, whatever the table size)."""
    lc = lifecycle_of(ctx)
    now = now or utcnow()
    for windows, inc, exc in _groups(ctx, lc):
        for rows in store.candidate_rows(ctx.db, now, windows, inc, exc, tenant, chunk):
            yield [Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], int(r[9])) for r in rows]


def _alert_json(profiles: dict[str, Profile], lc: Lifecycle, cand: Candidate, now: datetime) -> dict[str, Any]:
    prof = profiles.get(cand.profile)
    is_ca = bool(prof and prof.ca)
    action = action_for(prof, cand.identifier, cand.key_uri, lc.policy.renewal.identifiers) if prof \
        else "request a new certificate before expiry"
    return {
        "kind": "rollover" if is_ca else "expiry",
        "window_days": cand.window,
        "issuer": cand.issuer,
        "serial": cand.serial.upper(),
        "profile": cand.profile,
        "identifier": cand.identifier,
        "identifier_type": _identifier_type(prof, cand.identifier),
        "subject": cand.subject,
        "not_after": cand.not_after.isoformat(),
        "days_left": max(0, (cand.not_after - now).days),
        "action": action,
    }


def record_alerts(ctx: Context, cands: Sequence[Candidate], now: datetime | None = None) -> ScanResult:
    """Insert alerts and their tenant-grouped notifications in ONE transaction. A concurrent scanner that
    inserted some of the same (cert, window) rows makes this one fail on the unique constraint; we then
    drop those and try again, so each alert is recorded — and notified — exactly once."""
    lc = lifecycle_of(ctx)
    now = now or utcnow()
    res = ScanResult(candidates=len(cands))
    todo = list(cands)
    for _attempt in range(3):
        if not todo:
            return res
        by_tenant: dict[str | None, list[Candidate]] = defaultdict(list)
        for cnd in todo:
            by_tenant[cnd.tenant].append(cnd)
        alerts: list[dict[str, Any]] = []
        deliveries: list[dict[str, Any]] = []
        logs: list[tuple[str | None, int, str]] = []
        profiles = {**ctx.profiles.profiles, **lc.extra_profiles}
        with ctx.db.session() as s:
            subs = _subscribers(s, "expiry")
            for tenant, items in by_tenant.items():
                step = lc.policy.expiry.max_alerts_per_message
                for i in range(0, len(items), step):
                    part = items[i:i + step]
                    batch = "exp_" + secrets.token_hex(12)
                    for cnd in part:
                        p = profiles.get(cnd.profile)
                        alerts.append({"cert_id": cnd.cert_id, "window_days": cnd.window,
                                       "kind": "rollover" if p is not None and p.ca else "expiry",
                                       "tenant": tenant, "issuer": cnd.issuer, "serial": cnd.serial,
                                       "not_after": cnd.not_after, "batch": batch, "created_at": now})
                    targets = subs.get(tenant, [])
                    payload = {"event": "expiry", "tenant": tenant, "batch": batch,
                               "generated_at": now.isoformat(),
                               "alerts": [_alert_json(profiles, lc, cnd, now) for cnd in part]} if targets else {}
                    for sub in targets:
                        assert sub.id is not None
                        deliveries.append(_new_delivery(sub.id, sub.org, "expiry", f"expiry:{batch}", payload, now))
                    logs.append((tenant, len(part), batch))
            if not store.commit_alerts(s, alerts, deliveries):
                res.conflicts += 1
                taken = store.alerted(s, list({cnd.cert_id for cnd in todo}))
                todo = [cnd for cnd in todo if (cnd.cert_id, cnd.window) not in taken]
                continue
            res.alerts += len(alerts)
            res.batches += len(logs)
            if deliveries:
                res.deliveries += store.pending_delivery_ids(s, [dl["event_key"] for dl in deliveries])
        for tenant, count, batch in logs:  # the log sink: always on
            log.info("expiry alert batch %s: tenant %s, %d certificate(s)", batch, tenant or "(operator)", count)
        return res
    res.unresolved = len(todo)
    return res


def _is_ca_profile(ctx: Context, lc: Lifecycle, name: str) -> bool:
    p = ctx.profiles.profiles.get(name) or lc.extra_profiles.get(name)
    return bool(p and p.ca)


def policy_digest(groups: Sequence[tuple[list[int], list[str] | None, list[str]]]) -> str:
    """SHA-256 of the window groups (window sizes, the profiles each covers): what makes a certificate a
    candidate besides its own rows. A scan mark made under another digest cannot be continued."""
    canon = json.dumps([[sorted(w), inc, sorted(exc)] for w, inc, exc in groups], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _merged(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Non-empty (lo, hi] intervals merged into disjoint ones, so no certificate is read twice."""
    out: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _incremental(ctx: Context, groups: Sequence[tuple[list[int], list[str] | None, list[str]]], now: datetime,
                 mark: ExpiryScanMark, since: datetime, tenant: str | None,
                 chunk: int) -> Iterable[list[Candidate]]:
    """What became a candidate since ``mark``: per window group, the certificates whose notAfter entered
    one of its windows — (mark.scanned_now + d, now + d] for each window d, merged — then those that
    changed without crossing a boundary (pki/store/lifecycle.py: created, no longer replaced, hold
    released). Chunks are recorded before the next query runs, so the anti-join drops what an earlier
    chunk of this scan alerted; within a chunk (cert, window) is unique."""
    for windows, inc, exc in groups:
        ranges = _merged((max(mark.scanned_now + timedelta(days=d), now), now + timedelta(days=d)) for d in windows)
        for rows in store.candidate_rows(ctx.db, now, windows, inc, exc, tenant, chunk, ranges=ranges):
            yield [Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], int(r[9])) for r in rows]
        seen: set[tuple[int, int]] = set()
        changed = []
        for r in store.changed_rows(ctx.db, now, windows, inc, exc, tenant, since, mark.audit_seq):
            if (r[0], int(r[9])) not in seen:
                seen.add((r[0], int(r[9])))
                changed.append(Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], int(r[9])))
        for i in range(0, len(changed), chunk):
            yield changed[i:i + chunk]


def scan_expiring(ctx: Context, now: datetime | None = None, *, tenant: str | None = None, full: bool = False,
                  chunk: int = 20000) -> ScanResult:
    """One expiry scan: every certificate inside a window gets its alert (once), grouped per tenant.

    Incremental (#28 item 3) when the scope (every tenant, or ``tenant``) has a mark from a complete scan
    under the same window policy: then only what entered a window or changed since is read, so a re-scan
    costs what changed, not the fleet. Full — every certificate inside a window, as before — with
    ``full``, without a mark, after a change of the window policy (sizes, profile groups, exclusions), for a
    ``now`` before the mark's, or past ``incremental_max_changes`` changes. Either way the mark advances
    only once every alert of this scan has committed: a scan that dies halfway leaves the old mark, and
    the next one reads the same certificates again (the unique (cert, window) constraint drops what the
    dead one committed)."""
    lc = lifecycle_of(ctx)
    now = now or utcnow()
    groups = _groups(ctx, lc)
    digest = policy_digest(groups)
    scope = "*" if tenant is None else f"tenant:{tenant}"
    # Read before any certificate is: a change committed after these is the next scan's.
    started = utcnow()
    seq = store.audit_seq(ctx.db)
    pol = lc.policy.expiry
    mark = None if full else store.scan_mark(ctx.db, scope)
    since = None if mark is None else mark.changes_at - timedelta(seconds=pol.change_overlap_seconds)
    why: str | None
    if full:
        why = "asked for"
    elif mark is None or since is None:
        why = "no earlier complete scan"
    elif mark.policy_sha256 != digest:
        why = "the window policy changed"
    elif now < mark.scanned_now:
        why = "now is before the last scan's"
    elif (n := store.changed_count(ctx.db, since, mark.audit_seq, pol.incremental_max_changes)) \
            > pol.incremental_max_changes:
        why = f"{n:,}+ certificates changed since the last scan"
    else:
        why = None
    if why is None and mark is not None and since is not None:
        chunks = _incremental(ctx, groups, now, mark, since, tenant, chunk)
    else:
        chunks = candidates(ctx, now, chunk=chunk, tenant=tenant)
    total = ScanResult(full=why is not None, why_full=why)
    for part in chunks:
        r = record_alerts(ctx, part, now)
        total.alerts += r.alerts
        total.batches += r.batches
        total.conflicts += r.conflicts
        total.candidates += r.candidates
        total.deliveries += r.deliveries
        total.unresolved += r.unresolved
    if total.unresolved:  # some candidates were neither recorded by us nor by a concurrent scanner
        log.warning("expiry scan: %d candidate(s) unrecorded; the mark stays, the next scan reads them again",
                    total.unresolved)
        return total
    store.save_scan_mark(ctx.db, ExpiryScanMark(scope=scope, policy_sha256=digest, scanned_now=now,
                                                changes_at=started, audit_seq=seq, was_full=total.full,
                                                updated_at=utcnow()))
    log.info("expiry scan (%s): %d candidate(s), %d alert(s)", "full: " + why if why else "incremental",
             total.candidates, total.alerts)
    return total


# -- deliveries ------------------------------------------------------------------------------------------

SIG_HEADER = "X-V2GPKI-Signature"


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 (RFC 2104) over ``timestamp + "." + body``; the timestamp bounds replays."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_webhook(secret: str, header: str, body: bytes, *, tolerance: float | None = 300,
                   now: float | None = None) -> bool:
    """Receiver side (documented in docs/workers.md): constant-time compare, optional replay window."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts, mac = parts["t"], parts["v1"]
    except (ValueError, KeyError):
        return False
    want = sign_webhook(secret, ts, body).split("v1=", 1)[1]
    if not hmac.compare_digest(want, mac):
        return False
    if tolerance is not None and abs((now if now is not None else time.time()) - int(ts)) > tolerance:
        return False
    return True


@dataclass
class Attempt:
    state: str  # delivered | retry | dead | skipped | leased
    retry_in: float = 0.0
    error: str | None = None


def _body(ctx: Context, row: Delivery) -> dict[str, Any]:
    body = dict(row.payload)
    if row.event in OPCP_EVENTS:  # the document's shape exactly; the delivery id is in X-V2GPKI-Delivery
        return body
    ref = body.pop("truststore_ref", None)
    if ref is not None:
        from pki.trustlist import version_document

        body.update(version_document(ctx, ref[0], int(ref[1])))
    body["delivery_id"] = row.delivery_id
    return body


def attempt_delivery(ctx: Context, delivery_pk: int, now: datetime | None = None) -> Attempt:
    """One attempt: claim (guarded UPDATE with a lease), send, record the outcome. Safe to run twice."""
    lc = lifecycle_of(ctx)
    st = lc.settings
    now = now or utcnow()
    lease = now + timedelta(seconds=st.delivery_lease_seconds)
    with ctx.db.session() as s:
        claimed = store.claim_delivery(s, delivery_pk, now, lease)
        s.commit()
        row = store.delivery(s, delivery_pk)
        if not claimed:
            if row is None or row.state != "pending":
                return Attempt("skipped")
            if row.lease_until is not None and row.lease_until >= now:
                return Attempt("leased", (row.lease_until - now).total_seconds() + 1)
            return Attempt("skipped", max(0.0, (row.next_attempt_at - now).total_seconds()))
        assert row is not None
        sub = store.subscription(s, row.subscription_id)
    try:
        if sub is None or sub.deleted_at is not None:
            return _finish(ctx, row, now, ok=False, error="subscription removed", final=True)
        body = _body(ctx, row)
        if sub.kind == "webhook":
            assert sub.secret is not None
            _send_webhook(sub, row, body, st, sealing.unseal(ctx.keystore, sub.secret, sub.sub_id))
        else:
            _send_email(sub, row, body, st)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried with backoff
        msg = f"{type(exc).__name__}: {exc}"[:500]
        return _finish(ctx, row, now, ok=False, error=msg, final=row.attempts >= st.webhook_max_attempts)
    return _finish(ctx, row, now, ok=True)


def _finish(ctx: Context, row: Delivery, now: datetime, *, ok: bool, error: str | None = None,
            final: bool = False) -> Attempt:
    st = lifecycle_of(ctx).settings
    if ok:
        values: dict[str, Any] = {"state": "delivered", "delivered_at": utcnow(), "lease_until": None,
                                  "last_error": None}
        out = Attempt("delivered")
    elif final:
        values = {"state": "dead", "lease_until": None, "last_error": error}
        out = Attempt("dead", error=error)
        log.warning("delivery %s (%s) is dead after %d attempts: %s", row.delivery_id, row.event, row.attempts,
                    error)
    else:
        delay = min(st.webhook_backoff_seconds * 2 ** max(0, row.attempts - 1), st.webhook_backoff_max_seconds)
        values = {"lease_until": None, "last_error": error, "next_attempt_at": now + timedelta(seconds=delay)}
        out = Attempt("retry", delay, error)
        log.info("delivery %s attempt %d failed (%s); next in %.0fs", row.delivery_id, row.attempts, error, delay)
    with ctx.db.session() as s:
        store.finish_delivery(s, row.id, values)
        s.commit()
    return out


def opcp_signature(secret: str, body: bytes) -> str:
    """OPCP's ``payload-signature``: HMAC-SHA256 (RFC 2104) of the raw body with the endpoint's secret, hex
    (``X-Hubject-Signature`` is the same as ``sha256=<hex>``). No timestamp: replays are bounded by the
    X-V2GPKI-Signature header sent beside it and de-duplicated on eventId."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _send_webhook(sub: Subscription, row: Delivery, body: dict[str, Any], st: LifecycleSettings,
                  secret: str) -> None:
    import httpx

    check_webhook_url(sub.target, st, resolve=True)
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "v2gpki-webhooks/1",
        "X-V2GPKI-Event": row.event,
        "X-V2GPKI-Delivery": row.delivery_id,
        SIG_HEADER: sign_webhook(secret, ts, raw),
    }
    if row.event in OPCP_EVENTS:
        mac = opcp_signature(secret, raw)
        headers["payload-signature"] = mac
        headers["X-Hubject-Signature"] = f"sha256={mac}"
    # No redirects: a 3xx could point the worker at an internal address (SSRF).
    r = httpx.post(sub.target, content=raw, headers=headers, timeout=st.webhook_timeout_seconds,
                   follow_redirects=False)
    if not 200 <= r.status_code < 300:
        raise PKIError(f"HTTP {r.status_code}")


def _send_email(sub: Subscription, row: Delivery, body: dict[str, Any], st: LifecycleSettings) -> None:
    if not st.smtp_host:
        raise ConfigError("no SMTP server configured (V2GPKI_SMTP_HOST)")
    msg = EmailMessage()
    msg["From"] = st.smtp_from
    msg["To"] = sub.target
    msg["Subject"] = _email_subject(row, body)
    msg["X-V2GPKI-Delivery"] = row.delivery_id
    msg.set_content(_email_text(row, body))
    with smtplib.SMTP(st.smtp_host, st.smtp_port, timeout=st.webhook_timeout_seconds) as smtp:
        if st.smtp_starttls:
            smtp.starttls()
        if st.smtp_user and st.smtp_password:
            smtp.login(st.smtp_user, st.smtp_password.get_secret_value())
        smtp.send_message(msg)


def _email_subject(row: Delivery, body: dict[str, Any]) -> str:
    if row.event == "expiry":
        alerts = body.get("alerts", [])
        soonest = min((a["days_left"] for a in alerts), default=0)
        return f"[v2gpki] {len(alerts)} certificate(s) expiring (soonest in {soonest} days)"
    if row.event == "truststore":
        return f"[v2gpki] trust store {body.get('store')} version {body.get('version')} published"
    return f"[v2gpki] {row.event}"


def _email_text(row: Delivery, body: dict[str, Any]) -> str:
    if row.event != "expiry":
        return json.dumps(body, indent=2, sort_keys=True)
    lines = [f"Tenant: {body.get('tenant') or '(operator)'}", ""]
    for a in body.get("alerts", []):
        lines += [f"- {a['identifier_type']} {a['identifier']} ({a['profile']}), serial {a['serial']} "
                  f"from {a['issuer']}, expires {a['not_after']} ({a['days_left']} days)",
                  f"  what to do: {a['action']}"]
    return "\n".join(lines) + "\n"


def due_deliveries(ctx: Context, now: datetime | None = None, limit: int = 1000) -> list[int]:
    return store.due_deliveries(ctx.db, now or utcnow(), limit)


# -- revocation events -----------------------------------------------------------------------------------


def revocation_event(ctx: Context, payload: dict[str, Any]) -> list[int]:
    key = f"revocation:{payload['issuer']}/{payload['serial']}:{payload.get('status')}"
    body = {"event": "revocation", **{k: payload.get(k) for k in
                                      ("issuer", "serial", "profile", "identifier", "tenant", "status", "reason")}}
    body["serial"] = str(body["serial"]).upper()
    return queue_event(ctx, "revocation", key, body, payload.get("tenant"))


def refresh_crl_after_revocation(ctx: Context, payload: dict[str, Any]) -> bool:
    """A new CRL for the issuer unless one issued after this revocation exists already (coalesces bursts:
    a thousand revocations of one CA need one CRL, not a thousand). RFC 5280 §5.1.2.4 (thisUpdate)."""
    from pki.crl import generate_crl, latest_meta

    revoked_at = payload.get("revoked_at")
    meta = latest_meta(ctx.db, payload["issuer"])
    if meta is not None and revoked_at is not None and meta[1] > datetime.fromisoformat(revoked_at):
        return False
    try:
        generate_crl(ctx, payload["issuer"])
    except UnknownCA:
        return False
    return True


def pending_truststore_deliveries(ctx: Context, versions: Iterable[tuple[str, int]]) -> list[int]:
    with ctx.db.session() as s:
        return store.pending_delivery_ids(s, [f"truststore:{st}:{v}" for st, v in versions])


# -- renewal of service-held certificates ----------------------------------------------------------------


@dataclass
class RenewalResult:
    identifier: str | None
    old_serial: str
    new_serial: str | None
    new_label: str
    state: str


def renewal_due(ctx: Context, now: datetime | None = None) -> list[Certificate]:
    lc = lifecycle_of(ctx)
    now = now or utcnow()
    frac = lc.policy.renewal.fraction
    pats = lc.policy.renewal.identifiers
    out = []
    for row in store.renewable_certificates(ctx.db, now):
        if not row.identifier or not any(fnmatch.fnmatch(row.identifier, p) for p in pats):
            continue
        if _is_ca_profile(ctx, lc, row.profile):
            continue
        life = row.not_after - row.not_before
        if now >= row.not_before + life * frac:
            out.append(row)
    return out


def renew(ctx: Context, old: Certificate, now: datetime | None = None) -> RenewalResult:
    """Renew one service-held certificate: new key under a fresh label, new certificate, same identifier.
    Re-running after a crash at any point finishes the same renewal (keyed by the old certificate)."""
    from hsm.errors import KeyNotFoundError
    from pki.issuance import IssueRequest

    lc = lifecycle_of(ctx)
    now = now or utcnow()
    assert old.id is not None and old.key_uri is not None
    # the renewed key's label: the old one's base (hsm/uri.py parses the URI) with a fresh time suffix
    base = re.sub(r"-r\d{14}$", "", key_label(old.key_uri))
    label = f"{base}-r{now:%Y%m%d%H%M%S}"
    rec = store.start_renewal(ctx.db, old, ctx.keystore.uri(label), now)
    if rec.state == "done":
        return RenewalResult(old.identifier, old.serial, rec.new_serial, key_label(rec.new_key_uri), "done")
    uri = rec.new_key_uri  # the key this renewal made (or makes) and the new certificate names
    label = key_label(uri)
    ks = ctx.keystore
    # issued before a crash that hit before 'done'? then only record it
    prior = store.certificate_of_key(ctx.db, uri, old.identifier)
    if prior is None:
        old_cert = x509.load_der_x509_certificate(old.der)
        from pki.issuance import key_alg_of_public

        alg = key_alg_of_public(old_cert.public_key())  # type: ignore[arg-type]
        try:
            pub = ks.public_key(label)
        except KeyNotFoundError:
            pub = ks.create_key(label, alg)
        issuer = old.issuer
        if not old.profile.startswith("ocsp-signer"):  # an OCSP signer is its CA's own delegate: it stays
            from pki.root_campaign import successor_of

            # after a root transition switched issuance (#27 item 2), a service certificate moves to the new
            # hierarchy at its renewal, so the old root can be withdrawn once the old one expires
            issuer = successor_of(ctx, old.issuer) or old.issuer
        issued = lc.engine.issue(IssueRequest(
            profile=old.profile, public_key=pub, subject=_subject_fields(old_cert), identifier=old.identifier,
            ca=issuer, tenant=old.tenant, key_uri=uri, actor="renewal"))
        new_serial = issued.serial
    else:
        new_serial = prior.serial
    with ctx.db.session() as s:
        store.finish_renewal(s, old.id, new_serial, utcnow())
        audit.append(s, audit.Entry(actor="renewal", action="certificate.renew", object=f"{old.issuer}/{old.serial}",
                                    details={"identifier": old.identifier, "new_serial": new_serial,
                                             "new_label": label}))
        s.commit()
    log.info("renewed %s: %s -> %s (key %s)", old.identifier, old.serial, new_serial, label)
    return RenewalResult(old.identifier, old.serial, new_serial, label, "done")


def renew_due(ctx: Context, now: datetime | None = None) -> list[RenewalResult]:
    out = []
    for row in renewal_due(ctx, now):
        try:
            out.append(renew(ctx, row, now))
        except PKIError as exc:
            log.error("renewal of %s failed: %s", row.identifier, exc.message)
            out.append(RenewalResult(row.identifier, row.serial, None, "", "failed"))
    return out


# -- root rollover ---------------------------------------------------------------------------------------


@dataclass
class Rollover:
    old: str
    new: str
    new_serial: str
    cross_serial: str
    key_label: str


def _next_generation(ctx: Context, name: str, cn: str) -> tuple[str, str]:
    base = re.sub(r"-g\d+$", "", name)
    cn_base = re.sub(r" G\d+$", "", cn)
    names = store.ca_names(ctx.db)
    n = 2
    while f"{base}-g{n}" in names:
        n += 1
    new = f"{base}-g{n}"
    if len(new) > 63:
        raise PKIError(f"CA name {new!r} is too long")
    new_cn = f"{cn_base} G{n}"
    if len(new_cn) > 64:
        new_cn = f"{cn_base[:64 - len(f' G{n}')]} G{n}"
    return new, new_cn


def rollover_root(ctx: Context, ca_name: str, *, actor: str = "cli") -> Rollover:
    """Root rollover: a new root (new key in the HSM under a fresh label) and a cross-certificate of the new
    root's key and name signed by the old root, so relying parties that trust the old root can verify the
    new one offline (RFC 4210 §4.4 'root CA key update': NewWithOld). The cross-certificate is issued
    first, the new root second; the new root's issuance writes the outbox row that publishes the next
    trust-store version. Both roots are trusted: existing chains keep validating. The new root starts
    ``staged`` — distributed to stations, issuing nothing — until the campaign switches issuance to it
    (pki/root_campaign.py, #27 item 2)."""
    from hsm.errors import KeyNotFoundError
    from pki.hierarchy import ca_key_label, create_ca, ensure_ocsp_signer
    from pki.issuance import IssueRequest, key_alg_of_public
    from pki.profiles import CAEntry, Hierarchy

    lc = lifecycle_of(ctx)
    eng = lc.engine
    eng.reload_cas()
    old = eng.ca(ca_name)
    if old.row.parent is not None:
        raise UnknownCA(f"{ca_name!r} is not a root CA (it has a parent): roll over sub-CAs by issuing a successor",
                        ca=ca_name)
    if old.row.status != "active":
        raise BadRevocation(f"root {ca_name!r} is {old.row.status}")
    from pki import root_campaign

    running = root_campaign.open_campaign_from(ctx, ca_name)
    if running is not None:  # one transition at a time (#27 item 2)
        raise Conflict(f"a transition from {ca_name!r} to {running.new_root!r} is under way ({running.state}): "
                       f"finish it (`v2gpki root switch`, `v2gpki root withdraw`) before another rollover")
    old_fields = _subject_fields(old.cert)
    new_name, new_cn = _next_generation(ctx, ca_name, old_fields.cn)
    label = ca_key_label(new_name)
    ks = ctx.keystore
    try:
        pub = ks.public_key(label)
    except KeyNotFoundError:
        pub = ks.create_key(label, old.alg)
    if key_alg_of_public(pub) is not old.alg:
        raise Conflict(f"key {label!r} exists with another algorithm")
    prof = eng.profiles.get(old.row.profile)
    from pki.csr import SubjectFields

    subject = SubjectFields(cn=new_cn, o=old_fields.o, c=old_fields.c, dc=prof.subject.dc)
    cross_id = f"cross:{new_name}"
    cross = store.valid_certificate_of(ctx.db, cross_id)
    if cross is None:
        ci = eng.issue(IssueRequest(profile=lc.policy.truststore.cross_profile, public_key=pub, subject=subject,
                                    identifier=cross_id, ca=ca_name, actor=actor))
        cross_serial = ci.serial
    else:
        cross_serial = cross.serial
    default_h = ctx.hierarchy()
    h = Hierarchy(organization=old_fields.o or default_h.organization, country=old_fields.c or default_h.country,
                  cas=[], ocsp_signer_profile=default_h.ocsp_signer_profile,
                  ocsp_signer_profile_20=default_h.ocsp_signer_profile_20)
    entry = CAEntry(name=new_name, profile=old.row.profile, cn=new_cn, key_alg=old.alg)
    issued = create_ca(eng, entry, h)
    try:
        ensure_ocsp_signer(eng, h, new_name)
    except PKIError as exc:  # the root stands; `v2gpki init`-style repair can add the signer later
        log.warning("OCSP signer for %s not created: %s", new_name, exc.message)
    # The fleet side (#27 item 2): the new root is staged — in the trust lists and the stations' trust-store
    # plans, issuing nothing — until `v2gpki root switch` (pki/root_campaign.py).
    root_campaign.start(ctx, ca_name, new_name, actor=actor)
    ctx.engine.reload_cas()
    with ctx.db.session() as s:
        audit.append(s, audit.Entry(actor=actor, action="ca.rollover", object=ca_name,
                                    details={"new": new_name, "new_serial": issued.serial,
                                             "cross_serial": cross_serial, "key_label": label}))
        s.commit()
    return Rollover(ca_name, new_name, issued.serial, cross_serial, label)


# -- small queries for the API / CLI ---------------------------------------------------------------------


def outbox_backlog(ctx: Context) -> int:
    return store.outbox_backlog(ctx.db)


__all__ = [
    "EVENTS", "OPCP_EVENTS", "Attempt", "Candidate", "Lifecycle", "LifecyclePolicy", "LifecycleSettings", "Rollover",
    "ScanResult", "add_outbox", "add_subscription", "attempt_delivery", "candidates", "due_deliveries",
    "candidate_query", "lifecycle_of", "list_subscriptions", "queue_event", "record_alerts",
    "get_subscription", "opcp_event", "opcp_signature", "queue_one_shot", "remove_subscription",
    "update_subscription",
    "renew", "renew_due", "revocation_event", "rollover_root", "scan_expiring", "sign_webhook", "verify_webhook",
]
