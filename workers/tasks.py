"""Thin Celery tasks: each one calls pki/ and enqueues what it produced. All idempotent (see workers/app.py).

Task names are a contract with beat schedules and Flower dashboards: keep them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from workers.app import LifecycleTask, app, transient_errors

log = logging.getLogger("v2gpki.tasks")
_T = transient_errors()


def _enqueue_deliveries(ids: Iterable[int]) -> None:
    for i in ids:
        try:
            deliver.apply_async(args=[i], task_id=f"delivery-{i}-{_attempt_tag()}", retry=False)
        except Exception:  # noqa: BLE001 - the sweep task picks pending deliveries up from the database
            log.warning("could not enqueue delivery %s; the sweep will", i, exc_info=True)
            return


def _attempt_tag() -> str:
    import secrets

    return secrets.token_hex(4)


@app.task(base=LifecycleTask, bind=True, name="v2gpki.outbox.drain", autoretry_for=_T)
def outbox_drain(self: LifecycleTask) -> int:
    from workers.outbox import drain

    return drain(self.ctx.db)


@app.task(base=LifecycleTask, bind=True, name="v2gpki.expiry.scan", autoretry_for=_T)
def expiry_scan(self: LifecycleTask) -> int:
    from pki.lifecycle import scan_expiring

    res = scan_expiring(self.ctx)
    _enqueue_deliveries(res.deliveries)
    return res.alerts


@app.task(base=LifecycleTask, bind=True, name="v2gpki.deliveries.send", autoretry_for=_T)
def deliver(self: LifecycleTask, delivery_pk: int) -> str:
    from pki.lifecycle import attempt_delivery

    a = attempt_delivery(self.ctx, delivery_pk)
    if a.state == "leased":  # another worker holds it (or died holding it): look again when the lease ends
        raise self.retry(countdown=a.retry_in, max_retries=None)
    return a.state  # 'retry' is scheduled in the database and re-driven by the sweep


@app.task(base=LifecycleTask, bind=True, name="v2gpki.deliveries.sweep", autoretry_for=_T)
def deliveries_sweep(self: LifecycleTask) -> int:
    from pki.lifecycle import due_deliveries

    ids = due_deliveries(self.ctx)
    _enqueue_deliveries(ids)
    return len(ids)


@app.task(base=LifecycleTask, bind=True, name="v2gpki.events.revocation", autoretry_for=_T)
def revocation(self: LifecycleTask, event: dict[str, Any]) -> int:
    from pki.lifecycle import refresh_crl_after_revocation, revocation_event

    ids = revocation_event(self.ctx, event)
    _enqueue_deliveries(ids)
    refresh_crl_after_revocation(self.ctx, event)
    return len(ids)


@app.task(base=LifecycleTask, bind=True, name="v2gpki.truststore.publish", autoretry_for=_T)
def truststore_publish(self: LifecycleTask, reason: str = "scheduled check", event: dict[str, Any] | None = None
                       ) -> list[str]:
    from pki.lifecycle import pending_truststore_deliveries
    from pki.trustlist import publish_all

    rows = publish_all(self.ctx, reason)
    _enqueue_deliveries(pending_truststore_deliveries(self.ctx, [(r.store, r.version) for r in rows]))
    if event:  # OPCP root.cert.added / root.cert.revoked for the roots of this change (#25)
        from pki.pools import root_events

        _enqueue_deliveries(root_events(self.ctx, event))
    return [f"{r.store}/{r.version}" for r in rows]


@app.task(base=LifecycleTask, bind=True, name="v2gpki.renewal.run", autoretry_for=_T)
def renewal(self: LifecycleTask) -> list[str]:
    from pki.lifecycle import renew_due

    return [f"{r.identifier}:{r.state}" for r in renew_due(self.ctx)]


@app.task(base=LifecycleTask, bind=True, name="v2gpki.crl.refresh", autoretry_for=_T)
def crl_refresh(self: LifecycleTask) -> int:
    # pki/crl.py: a new CRL for every CA whose current one is missing or nearing nextUpdate (RFC 5280 §5.1.2.5)
    from pki.crl import refresh_crls

    return len(refresh_crls(self.ctx))


@app.task(base=LifecycleTask, bind=True, name="v2gpki.ocsp.refresh", autoretry_for=_T)
def ocsp_refresh(self: LifecycleTask) -> int:
    # pki/ocsp/: re-sign pre-produced responses before nextUpdate (RFC 5019 §4)
    from pki.ocsp import refresh

    return refresh(self.ctx)


@app.task(base=LifecycleTask, bind=True, name="v2gpki.audit.checkpoint", autoretry_for=_T)
def audit_checkpoint(self: LifecycleTask) -> int:
    # pki/audit_sign.py: the chain head signed by the HSM audit key, recorded outside the database (#21 item 7)
    from pki.audit_sign import checkpoint

    cp = checkpoint(self.ctx)
    return 0 if cp is None else cp.seq


__all__ = ["audit_checkpoint", "crl_refresh", "deliver", "deliveries_sweep", "expiry_scan", "ocsp_refresh",
           "outbox_drain", "renewal", "revocation", "truststore_publish"]
