"""Signed audit checkpoints: the chain head (seq, hash) signed by an audit key held in the HSM.

A checkpoint makes truncation detectable even by someone who can rewrite the whole table: they could
recompute the hash chain, but not the HSM signature over an earlier head.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col, select

from hsm.errors import KeyNotFoundError
from hsm.keystore import KeyAlg
from pki.audit import verify_chain
from pki.context import Context
from pki.store.db import utcnow
from pki.store.models import AuditCheckpoint, AuditEvent, AuditHead

AUDIT_KEY = "svc-audit"


def _message(seq: int, h: str) -> bytes:
    return f"v2gpki-audit-checkpoint:{seq}:{h}".encode()


def ensure_audit_key(ctx: Context) -> None:
    try:
        ctx.keystore.public_key(AUDIT_KEY)
    except KeyNotFoundError:
        ctx.keystore.create_key(AUDIT_KEY, KeyAlg.P256)


def checkpoint(ctx: Context) -> AuditCheckpoint | None:
    ensure_audit_key(ctx)
    with ctx.db.session() as s:
        head = s.get(AuditHead, 1)
        if head is None or head.seq == 0:
            return None
        last = s.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq).desc())).first()
        if last is not None and last.seq == head.seq:
            return last
        sig = ctx.keystore.signer(AUDIT_KEY).sign(_message(head.seq, head.hash), ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
        cp = AuditCheckpoint(seq=head.seq, hash=head.hash, ts=utcnow(), key_label=AUDIT_KEY, signature=sig)
        s.add(cp)
        s.commit()
        s.refresh(cp)
        return cp


@dataclass
class FullResult:
    ok: bool
    events: int
    checkpoints: int
    problems: list[str]


def verify_all(ctx: Context) -> FullResult:
    with ctx.db.session() as s:
        res = verify_chain(s)
        problems = list(res.problems)
        cps = list(s.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq))))
        hashes_at = {}
        if cps:
            seqs = [c.seq for c in cps]
            for ev in s.exec(select(AuditEvent).where(col(AuditEvent.seq).in_(seqs))):
                hashes_at[ev.seq] = ev.hash
    pub = None
    if cps:
        try:
            pub = ctx.keystore.public_key(AUDIT_KEY)
        except KeyNotFoundError:
            problems.append("audit key missing from the token: checkpoints cannot be verified")
    for c in cps:
        if pub is not None:
            try:
                assert isinstance(pub, ec.EllipticCurvePublicKey)
                pub.verify(c.signature, _message(c.seq, c.hash), ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, AssertionError):
                problems.append(f"checkpoint at seq {c.seq}: bad signature")
        if hashes_at.get(c.seq) != c.hash:
            problems.append(f"checkpoint at seq {c.seq}: the log no longer has that event/hash")
    return FullResult(ok=not problems, events=res.events, checkpoints=len(cps), problems=problems)
