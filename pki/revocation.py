"""Bulk revocation: the compromise drill (#28 item 4).

Revoke every end-entity certificate of one issuing CA (optionally narrowed to an identifier or a subject
pattern) in bounded transactions that survive the process being killed halfway:

* **dry run** — a count by index (certificate (issuer, status)), audited as ``revocation.bulk.dry_run``;
* **batches** — each one transaction: take up to ``batch`` certificates still ``valid`` (or on ``hold``)
  — on PostgreSQL ``FOR UPDATE SKIP LOCKED``, so two runs share the work —, a guarded UPDATE (status still
  revocable, so nothing is revoked twice), one ``certificate.revoke`` audit event per certificate and the
  engine's in-transaction revocation hooks (the lifecycle outbox), then COMMIT. A kill loses at most the
  batch in flight, which rolls back; running the same command again continues with what is still valid,
  so nothing is missed either;
* **OCSP** — after each batch commits, the batch's stored responses are re-signed (``revoked``); a run
  that died between a commit and the re-signing leaves revoked certificates with ``good`` responses, which
  the next run (or any run: the last step) finds by index and re-signs — and the responders never serve
  them meanwhile (pki/ocsp/ checks the certificate's status; ocsp-serve's poller drops cached entries
  of certificates revoked since its watermark);
* **CRL** — regenerated once, at the end (not per certificate).

Errors are typed (pki/errors.py); the API maps them to problems.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pki import audit
from pki.errors import BadRevocation
from pki.issuance import REASONS
from pki.store import certificates as store
from pki.store import outbox as outbox_rows
from pki.store.db import utcnow

if TYPE_CHECKING:
    from pki.context import Context

log = logging.getLogger("v2gpki.revocation")

DEFAULT_BATCH = 500
MAX_BATCH = 5_000


@dataclass
class BulkRevocation:
    """What to revoke. ``issuer`` is required for a run (a compromise drill is per issuing CA)."""

    issuer: str
    reason: str = "keyCompromise"
    identifier: str | None = None
    subject_pattern: str | None = None
    batch: int = DEFAULT_BATCH


@dataclass
class BulkResult:
    job: str
    dry_run: bool
    count: int  # dry run: how many would be revoked; run: how many this run revoked
    batches: int = 0
    resigned: int = 0  # OCSP responses re-signed 'revoked'
    crl_number: int | None = None
    remaining: int = 0  # still revocable after the run (0 unless interrupted or racing issuance)
    seconds: float = 0.0
    serials: list[str] = field(default_factory=list, repr=False)


def _check(spec: BulkRevocation) -> None:
    if spec.reason not in REASONS:
        raise BadRevocation(f"unknown revocation reason {spec.reason!r} (use one of: {', '.join(REASONS)})")
    if spec.reason == "certificateHold":
        raise BadRevocation("bulk revocation does not put certificates on hold; name a revocation reason")
    if not spec.issuer:
        raise BadRevocation("name the issuing CA")
    if not 1 <= spec.batch <= MAX_BATCH:
        raise BadRevocation(f"batch must be between 1 and {MAX_BATCH}")


def count(ctx: Context, spec: BulkRevocation) -> int:
    return store.count_revocable(ctx.db, spec.issuer, spec.identifier.upper() if spec.identifier else None,
                                 spec.subject_pattern)


def bulk_revoke(ctx: Context, spec: BulkRevocation, *, dry_run: bool = True, actor: str = "cli",
                org: str | None = None, after_batch: Callable[[int, list[str]], None] | None = None,
                keep_serials: bool = False) -> BulkResult:
    """Dry run (the default): count and audit. Otherwise revoke in batches (see the module docstring).
    ``after_batch(n, serials)`` is called after batch ``n`` committed and its responses were re-signed
    (progress; the tests raise from it to simulate a kill)."""
    _check(spec)
    ctx.engine.ca(spec.issuer)  # NotFound for an unknown CA
    job = uuid.uuid4().hex[:16]
    t0 = time.perf_counter()
    details: dict[str, Any] = {"job": job, "issuer": spec.issuer, "reason": spec.reason,
                               "identifier": spec.identifier, "subject_pattern": spec.subject_pattern}
    n = count(ctx, spec)
    if dry_run:
        audit.record(ctx.db, audit.Entry(actor=actor, org=org, action="revocation.bulk.dry_run",
                                         object=spec.issuer, details={**details, "count": n}))
        return BulkResult(job, True, n, seconds=time.perf_counter() - t0)
    audit.record(ctx.db, audit.Entry(actor=actor, org=org, action="revocation.bulk.start", object=spec.issuer,
                                     details={**details, "count": n, "batch": spec.batch}))
    from pki.ocsp import responder_for

    responder = responder_for(ctx)
    res = BulkResult(job, False, 0)
    # First the responses a killed earlier run committed as revoked but did not re-sign.
    res.resigned += _resign_stale(ctx, spec.issuer)
    while True:
        serials = _one_batch(ctx, spec, job, actor, org)
        if not serials:
            break
        res.batches += 1
        res.count += len(serials)
        if keep_serials:
            res.serials.extend(serials)
        try:
            res.resigned += responder.presign(spec.issuer, serials)
        except Exception:  # noqa: BLE001 - revoked stands; _resign_stale / refresh / the responder re-sign
            log.warning("re-signing %d OCSP responses of %s failed", len(serials), spec.issuer, exc_info=True)
        if after_batch is not None:
            after_batch(res.batches, serials)
    res.resigned += _resign_stale(ctx, spec.issuer)
    from pki.crl import generate_crl

    res.crl_number = generate_crl(ctx, spec.issuer).number  # once, for the whole run
    res.remaining = count(ctx, spec)
    res.seconds = time.perf_counter() - t0
    audit.record(ctx.db, audit.Entry(actor=actor, org=org, action="revocation.bulk.done", object=spec.issuer,
                                     details={**details, "revoked": res.count, "batches": res.batches,
                                              "crl_number": res.crl_number, "remaining": res.remaining}))
    return res


def _one_batch(ctx: Context, spec: BulkRevocation, job: str, actor: str, org: str | None) -> list[str]:
    """One transaction: pick, revoke (guarded), audit, hooks, commit. Returns the serials revoked."""
    with ctx.db.session() as s:
        rows = store.revoke_batch(s, spec.issuer, spec.identifier.upper() if spec.identifier else None,
                                  spec.subject_pattern, limit=spec.batch, reason=spec.reason, at=utcnow(),
                                  skip_locked=not ctx.db.is_sqlite)
        if not rows:
            return []
        audit.append(s, *[audit.Entry(actor=actor, org=org, action="certificate.revoke",
                                      object=f"{spec.issuer}/{serial}",
                                      details={"reason": spec.reason, "identifier": ident, "bulk": job})
                          for _id, serial, ident in rows])
        # The engine's revocation observers, inside this batch's transaction (outbox rows, metrics); their
        # after-commit half is done in bulk below (OCSP re-signed per batch, one CRL for the run).
        observers = ctx.engine.revocation_observers
        if observers:
            done = [r[0] for r in rows]
            certs = store.certificates_by_id(s, done)
            with outbox_rows.batched(s):  # the batch's outbox events as one statement
                for cert in certs:
                    for observer in observers:
                        observer.in_transaction(s, cert)
        s.commit()
    return [r[1] for r in rows]


def _resign_stale(ctx: Context, issuer: str) -> int:
    """Revoked certificates of ``issuer`` whose stored response does not say so (or that have none):
    re-sign them. By index: certificate (issuer, status), then the response's unique key."""
    from pki.ocsp import responder_for

    serials = store.revoked_without_revoked_response(ctx.db, issuer, utcnow())
    return responder_for(ctx).presign(issuer, serials) if serials else 0


__all__ = ["BulkResult", "BulkRevocation", "bulk_revoke", "count"]
