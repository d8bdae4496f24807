"""Signed audit checkpoints: the chain head (seq, hash) signed by an audit key held in the HSM.

A checkpoint makes truncation detectable even by someone who can rewrite the whole table: they could
recompute the hash chain, but not the HSM signature over an earlier head. Because the checkpoints in the
database can be deleted as easily as the events, every checkpoint is also appended to a record outside the
database — ``audit-checkpoints.jsonl`` under $V2GPKI_HOME or V2GPKI_AUDIT_CHECKPOINT_DIR, one JSON object
per line, and optionally POSTed to V2GPKI_AUDIT_CHECKPOINT_WEBHOOK — before its row commits.
``verify_all`` checks every signature (database and external) against the HSM's public key and against
the chain, and fails when the database falls short of the external record: a signed checkpoint whose
event is gone or has another hash (truncation, a re-hashed chain), or whose row was deleted (#21 item 7).
Once a verification has passed it is incremental (#28 item 3): it re-hashes the chain from the last
verified checkpoint on (recorded in audit_verification, signed by the audit key); ``full=True`` re-hashes
everything (see ``verify_all`` for what incremental does not re-check).

Checkpoints are taken by `v2gpki audit checkpoint`, by the beat every V2GPKI_AUDIT_CHECKPOINT_SECONDS
(task ``v2gpki.audit.checkpoint``) and by `v2gpki serve` when it shuts down cleanly.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.algorithms import ALGORITHMS
from hsm.errors import HSMError, KeyNotFoundError
from hsm.keystore import KeyAlg
from pki.context import Context
from pki.errors import ConfigError
from pki.store import audit_log as store
from pki.store.db import utcnow
from pki.store.models import AuditCheckpoint, AuditVerification

AUDIT_KEY = "svc-audit"
# The audit key is P-256, signing ecdsa-with-SHA256: its row of the algorithm table (hsm/algorithms.py).
_AUDIT_ALG = ALGORITHMS[KeyAlg.P256]


def _message(seq: int, h: str) -> bytes:
    return f"v2gpki-audit-checkpoint:{seq}:{h}".encode()


def ensure_audit_key(ctx: Context) -> None:
    try:
        ctx.keystore.public_key(AUDIT_KEY)
    except KeyNotFoundError:
        ctx.keystore.create_key(AUDIT_KEY, _AUDIT_ALG.key_alg)




def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def record_of(cp: AuditCheckpoint) -> dict[str, Any]:
    """The external form of a checkpoint (one JSON line, the webhook's body)."""
    return {"v": 1, "seq": cp.seq, "hash": cp.hash, "ts": cp.ts.isoformat(), "key_label": cp.key_label,
            "alg": "ecdsa-p256-sha256", "signature": _b64(cp.signature)}


def append_external(path: Path, rec: dict[str, Any]) -> None:
    """Append one line to the record (created 0600 in a 0700 directory), locked and fsynced."""
    from pki.hardening import ensure_private_dir

    ensure_private_dir(path.parent)
    line = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ExternalRecord:
    path: Path
    exists: bool
    records: list[dict[str, Any]]
    problems: list[str]


def read_external(path: Path) -> ExternalRecord:
    if not path.exists():
        return ExternalRecord(path, False, [], [])
    recs: list[dict[str, Any]] = []
    problems: list[str] = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                rec["seq"] = int(rec["seq"])
                rec["signature_bytes"] = base64.b64decode(rec["signature"], validate=True)
                if not isinstance(rec["hash"], str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                problems.append(f"external checkpoint record {path} line {n} is not a checkpoint (edited)")
                continue
            recs.append(rec)
    return ExternalRecord(path, True, recs, problems)


def _post_webhook(url: str, rec: dict[str, Any]) -> None:
    import httpx

    try:
        r = httpx.post(url, json=rec, timeout=10.0, follow_redirects=False,
                       headers={"User-Agent": "v2gpki-audit/1"})
    except httpx.HTTPError as exc:
        raise ConfigError(f"the audit checkpoint webhook (V2GPKI_AUDIT_CHECKPOINT_WEBHOOK) failed: "
                          f"{type(exc).__name__}") from None
    if not 200 <= r.status_code < 300:
        raise ConfigError(f"the audit checkpoint webhook (V2GPKI_AUDIT_CHECKPOINT_WEBHOOK) answered HTTP "
                          f"{r.status_code}")


def _publish(ctx: Context, rec: dict[str, Any]) -> None:
    """Outside the database: the webhook (if configured), then the append-only file."""
    if ctx.settings.audit_checkpoint_webhook:
        _post_webhook(ctx.settings.audit_checkpoint_webhook, rec)
    append_external(ctx.settings.audit_checkpoint_file, rec)


def checkpoint(ctx: Context) -> AuditCheckpoint | None:
    """Sign the chain head with the HSM audit key, publish it outside the database, then commit its row.

    The head is read and signed without holding the database's write lock; the row is inserted under a
    lock that serialises checkpointers (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), and its
    external record is written before the row commits, so a failure leaves no row that the external
    record lacks. A head that already has a checkpoint is not signed again (its record is re-published if
    the external file lacks it, e.g. the first checkpoint after an upgrade)."""
    ensure_audit_key(ctx)
    head = store.chain_head(ctx.db)
    if head is None or head[0] == 0:
        return None
    seq, h = head
    path = ctx.settings.audit_checkpoint_file
    last = store.last_checkpoint(ctx.db)
    if last is not None and last.seq >= seq:
        if not any(r["seq"] == last.seq and r["hash"] == last.hash for r in read_external(path).records):
            _publish(ctx, record_of(last))
        return last
    sig = _AUDIT_ALG.sign(ctx.keystore.signer(ctx.keystore.uri(AUDIT_KEY)), _message(seq, h))
    cp = AuditCheckpoint(seq=seq, hash=h, ts=utcnow(), key_label=AUDIT_KEY, signature=sig)
    rec = record_of(cp)
    if ctx.settings.audit_checkpoint_webhook:  # a network call: never under the database lock
        _post_webhook(ctx.settings.audit_checkpoint_webhook, rec)
    # Another checkpointer may get there first: then its checkpoint is returned and ours is not stored.
    return store.add_checkpoint(ctx.db, cp, lambda: append_external(path, rec))


@dataclass
class FullResult:
    ok: bool
    events: int  # events the verified chain holds (incremental: those before its start were verified before)
    checkpoints: int
    problems: list[str]
    external: int = 0
    from_seq: int = 0  # the event the chain was re-hashed from: 0 for all of it (--full, or no marker yet)
    checked: int = 0  # events re-hashed by this run
    verified_through: int = 0  # the checkpoint the next incremental verification starts at (0: none)


def _verify_sig(pub: ec.EllipticCurvePublicKey | None, signature: bytes, seq: int, h: str) -> bool:
    if pub is None:
        return True  # reported once as "audit key missing"
    try:
        pub.verify(signature, _message(seq, h), _AUDIT_ALG.ecdsa)  # type: ignore[arg-type]
        return True
    except InvalidSignature:
        return False


def _marker_message(seq: int, h: str) -> bytes:
    # Its own prefix: a marker's signature can never pass for a checkpoint's, nor the reverse.
    return f"v2gpki-audit-verified:{seq}:{h}".encode()


def _marker_ok(pub: ec.EllipticCurvePublicKey, m: AuditVerification) -> bool:
    try:
        pub.verify(m.signature, _marker_message(m.seq, m.hash), _AUDIT_ALG.ecdsa)  # type: ignore[arg-type]
        return True
    except InvalidSignature:
        return False


def _audit_public_key(ctx: Context, problems: list[str]) -> ec.EllipticCurvePublicKey | None:
    try:
        key = ctx.keystore.public_key(AUDIT_KEY)
    except KeyNotFoundError:
        problems.append("audit key missing from the token: checkpoints cannot be verified")
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    problems.append("the audit key in the token is not an EC key: checkpoints cannot be verified")
    return None


def verify_all(ctx: Context, *, full: bool = False) -> FullResult:
    """Verify the audit log: the hash chain, every checkpoint (database and external record) against the
    chain, and their signatures.

    Incremental (the default) once a verification has passed: the chain is re-hashed from the last
    verified checkpoint S on (its event must still have the hash that was verified; the marker naming S
    is signed by the audit key), and only the checkpoints from S on have their signatures checked again.
    Every checkpoint row and external record is still matched against the other and against the event
    hash at its seq (truncation, a deleted checkpoint row, a rewritten chain that passes through S).
    Not re-checked: the content and links of the events before S (an edit there that leaves the stored
    hashes alone), and the signatures of the checkpoints before S — ``full=True`` re-checks everything.
    A verification without problems moves the marker to the newest checkpoint it verified."""
    problems: list[str] = []
    ext = read_external(ctx.settings.audit_checkpoint_file)
    marker = None if full else store.verification_marker(ctx.db)
    pub: ec.EllipticCurvePublicKey | None = None
    key_checked = False
    start: tuple[int, str] | None = None
    if marker is not None:
        pub, key_checked = _audit_public_key(ctx, problems), True
        if pub is not None and _marker_ok(pub, marker):
            start = (marker.seq, marker.hash)
        elif pub is not None:
            problems.append(f"the verification marker (checkpoint at seq {marker.seq}) is not signed by the audit "
                            "key (edited): the whole chain was verified")
    snap = store.snapshot_for_verification(ctx.db, (int(r["seq"]) for r in ext.records), start)
    res, cps, head, hashes_at = snap.chain, snap.checkpoints, snap.head, snap.hashes_at
    since = snap.from_seq  # 0: everything is checked
    problems.extend(res.problems)
    head_seq = head.seq if head is not None else 0
    if (cps or ext.records) and not key_checked:
        pub = _audit_public_key(ctx, problems)
    signed: set[tuple[int, str]] = set()  # checkpoints whose signature this run verified
    for c in cps:
        if c.seq >= since:
            if not _verify_sig(pub, c.signature, c.seq, c.hash):
                problems.append(f"checkpoint at seq {c.seq}: bad signature")
            else:
                signed.add((c.seq, c.hash))
        if hashes_at.get(c.seq) != c.hash:
            problems.append(f"checkpoint at seq {c.seq}: the log no longer has that event/hash")
    # The record outside the database: what the database must still hold.
    problems.extend(ext.problems)
    if not ext.exists and cps:
        problems.append(f"external checkpoint record {ext.path} is missing although the database has "
                        f"{len(cps)} checkpoints (deleted, or V2GPKI_AUDIT_CHECKPOINT_DIR changed)")
    db_cps = {(c.seq, c.hash, bytes(c.signature)) for c in cps}
    good_ext: set[tuple[int, str]] = set()
    for r in ext.records:
        seq, h = int(r["seq"]), str(r["hash"])
        if seq >= since and not _verify_sig(pub, r["signature_bytes"], seq, h):
            problems.append(f"external checkpoint at seq {seq}: bad signature (the record was edited)")
            continue
        good_ext.add((seq, h))
        if seq > head_seq:
            problems.append(f"external checkpoint at seq {seq}: the database's chain ends at seq {head_seq} "
                            "(events deleted and the head moved back)")
        elif seq not in hashes_at:
            problems.append(f"external checkpoint at seq {seq}: the database has no event {seq} (deleted)")
        elif hashes_at[seq] != h:
            problems.append(f"external checkpoint at seq {seq}: event {seq} no longer has the signed hash "
                            "(the chain was rewritten)")
        if (seq, h, bytes(r["signature_bytes"])) not in db_cps:
            problems.append(f"external checkpoint at seq {seq}: no such checkpoint row in the database (deleted)")
    if ext.records:
        first = min(int(r["seq"]) for r in ext.records)
        for c in cps:
            if c.seq >= first and (c.seq, c.hash) not in good_ext:
                problems.append(f"checkpoint at seq {c.seq} is not in the external record {ext.path}")
    events = res.events + (since - 1 if since else 0)
    through = marker.seq if start is not None and marker is not None else 0
    if not problems and pub is not None:
        through = _advance(ctx, cps, signed & good_ext, head_seq, through)
    return FullResult(ok=not problems, events=events, checkpoints=len(cps), problems=problems,
                      external=len(ext.records), from_seq=since, checked=res.events, verified_through=through)


def _advance(ctx: Context, cps: list[AuditCheckpoint], verified: set[tuple[int, str]], head_seq: int,
             current: int) -> int:
    """Sign and store the marker at the newest checkpoint this run verified (signature, external record,
    chain), when it is past ``current``; returns the marker's seq. A token that cannot sign (the audit key
    gone) leaves the marker where it was: the next run verifies more, never less."""
    best = max((c for c in cps if (c.seq, c.hash) in verified and c.seq <= head_seq), key=lambda c: c.seq,
               default=None)
    if best is None or best.seq <= current:
        return current
    try:
        sig = _AUDIT_ALG.sign(ctx.keystore.signer(ctx.keystore.uri(AUDIT_KEY)), _marker_message(best.seq, best.hash))
    except HSMError:  # the audit key gone, or a token that cannot sign now: verified, marker unmoved
        return current
    store.advance_verification_marker(ctx.db, AuditVerification(id=1, seq=best.seq, hash=best.hash,
                                                                verified_at=utcnow(), signature=sig))
    return best.seq
