"""Issuance and revocation storage: what pki/issuance.py's Engine writes and reads.

Statements and round trips are the engine's own, moved here unchanged (bench/issuance.py measures them):
the intents of a batch as ONE multi-row INSERT in autocommit before anything is signed; after the HSM,
one transaction with the certificate rows, the intents marked issued and the audit chain's statements,
sent together (pki/store/fast.run_together: one round trip on PostgreSQL). The caller opens that
transaction (``db.session()``) so its observers write their rows (outbox, pre-signed OCSP) in it too;
a transaction is never split to fit this seam.

Revocation is one guarded UPDATE per certificate (Boulder's RevokeCertificate): a second revocation of
the same certificate matches no row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from pki.store.audit_log import Entry, append_statements
from pki.store.db import Database, utcnow
from pki.store.fast import BulkInsert, MultiRowInsert, Prepared, run_together
from pki.store.models import Certificate, CertificateAuthority, IssuanceIntent, OcspResponseCache

_INTENT_TABLE = IssuanceIntent.__table__  # type: ignore[attr-defined]
_CERT_TABLE = Certificate.__table__  # type: ignore[attr-defined]
_INSERT_CERTS = BulkInsert(_CERT_TABLE, ("issuer", "serial", "profile", "subject", "identifier", "tenant", "not_before",
                                         "not_after", "status", "revoked_at", "revocation_reason", "key_uri",
                                         "ocsp_signer_for_ca_id", "fingerprint", "der", "created_at"))
_INSERT_INTENTS = MultiRowInsert(_INTENT_TABLE, ("issuer", "serial", "profile", "subject", "tbs_sha256", "state",
                                                 "error", "created_at", "completed_at"))
_MARK_INTENTS = Prepared(
    update(_INTENT_TABLE)
    .where(_INTENT_TABLE.c.issuer == bindparam("b_issuer"), _INTENT_TABLE.c.serial == bindparam("b_serial"))
    .values(state=bindparam("b_state"), completed_at=bindparam("b_completed_at"), error=bindparam("b_error"))
)
INTENT_ROWS_PER_STATEMENT = 500  # bound one statement's parameters (drivers' limits)


def _intent_marks(intents: Sequence[dict[str, object]], *, state: str, completed_at: datetime,
                  error: str | None = None) -> list[dict[str, object]]:
    return [{"b_issuer": it["issuer"], "b_serial": it["serial"], "b_state": state, "b_completed_at": completed_at,
             "b_error": error} for it in intents]


def _mark_intents(conn: Connection, intents: Sequence[dict[str, object]], *, state: str, completed_at: datetime,
                  error: str | None = None) -> None:
    """UPDATE the intents of a batch by (issuer, serial), unique by uq_intent_issuer_serial: one prepared
    statement, executemany."""
    _MARK_INTENTS.execute(conn, _intent_marks(intents, state=state, completed_at=completed_at, error=error))


# -- CAs ---------------------------------------------------------------------------------------------------


def all_cas(db: Database) -> list[CertificateAuthority]:
    """Every CA row (the engine's cache reloads from this)."""
    with db.session() as s:
        return list(s.exec(select(CertificateAuthority)))


def abandon_pending_intents(db: Database) -> int:
    """Mark every pending intent abandoned (``v2gpki init`` resuming an interrupted run); how many."""
    with db.session() as s:
        n = s.execute(
            update(IssuanceIntent).where(IssuanceIntent.state == "pending")  # type: ignore[arg-type]
            .values(state="abandoned", completed_at=utcnow())
        ).rowcount  # type: ignore[attr-defined]
        s.commit()
    return int(n)


def has_valid_certificate(db: Database, *, issuer: str, profile: str, key_uri: str, now: datetime) -> bool:
    """A valid unexpired certificate of this profile from ``issuer`` for a key this service holds."""
    with db.session() as s:
        return s.exec(select(Certificate).where(
            Certificate.issuer == issuer, Certificate.profile == profile,
            Certificate.key_uri == key_uri, Certificate.status == "valid",
            Certificate.not_after > now,
        )).first() is not None


# -- issuance ----------------------------------------------------------------------------------------------


def record_intents(db: Database, intents: Sequence[dict[str, object]]) -> None:
    """The intents (columns of issuance_intent) of a batch about to be signed, committed before the HSM is
    asked: as ONE multi-row INSERT per 500 in autocommit — atomic by itself (all rows or none) and one round
    trip instead of BEGIN, INSERT, COMMIT (a batch is often one request under HTTP load)."""
    for k in range(0, len(intents), INTENT_ROWS_PER_STATEMENT):
        _INSERT_INTENTS.execute_on(db.autocommit, list(intents[k:k + INTENT_ROWS_PER_STATEMENT]))


def fail_intents(db: Database, intents: Sequence[dict[str, object]], error: str) -> None:
    """Mark intents whose signing failed (best effort: on a database error they stay pending)."""
    if not intents:
        return
    try:
        with db.engine.begin() as conn:
            _mark_intents(conn, intents, state="failed", completed_at=utcnow(), error=error)
    except Exception:  # noqa: BLE001 - the original error matters more; the intent stays pending
        pass


class IssuedWrites:
    """The writes that store a signed batch, in the caller's transaction ``s``: certificate rows (columns of
    the certificate table), the batch's intents marked issued, and the audit entries — the chain's
    statements last (on PostgreSQL the server extends the chain, pki/store/audit_log.py)."""

    def __init__(self, s: Session, certificates: Sequence[dict[str, Any]], intents: Sequence[dict[str, object]],
                 completed_at: datetime, entries: Sequence[Entry]) -> None:
        self.s = s
        self.conn = s.connection()
        self.writes: list[tuple[Prepared, Sequence[dict[str, Any]]]] = [
            (_INSERT_CERTS, certificates),
            (_MARK_INTENTS, _intent_marks(intents, state="issued", completed_at=completed_at)),
            *append_statements(self.conn, *entries),
        ]

    def send(self, *, commit_if_nothing_else: bool = False) -> None:
        """Run the writes together. ``commit_if_nothing_else``: when the session holds no other pending ORM
        row (observers add theirs before this call), COMMIT travels with the writes — one round trip fewer
        on PostgreSQL; the session's commit then finds the transaction closed."""
        s = self.s
        run_together(self.conn, self.writes,
                     commit=commit_if_nothing_else and not (s.new or s.dirty or s.deleted))


# -- lookups and revocation ----------------------------------------------------------------------------------


def find_certificates(db: Database, serial: str, issuer: str | None = None,
                      tenant: str | None = None) -> list[Certificate]:
    """Certificates with this serial (hex, as stored), of one issuer and/or tenant when given."""
    with db.session() as s:
        stmt = select(Certificate).where(Certificate.serial == serial)
        if issuer is not None:
            stmt = stmt.where(Certificate.issuer == issuer)
        if tenant is not None:
            stmt = stmt.where(Certificate.tenant == tenant)
        return list(s.exec(stmt))


# The guarded UPDATE per allowed set, built once (Prepared): the ORM's update() cost about as much client CPU
# as the rest of a revocation's statements together (bench/results/2026-12-08-contract-supersede.md).
_SET_REVOKED_FROM = {tuple(f): Prepared(
    update(_CERT_TABLE)
    .where(_CERT_TABLE.c.id == bindparam("b_id"), or_(*(_CERT_TABLE.c.status == v for v in f)))
    .values(status=bindparam("b_status"), revoked_at=bindparam("b_at"), revocation_reason=bindparam("b_reason")))
    for f in (("valid",), ("valid", "hold"))}


def set_revoked(s: Session, cert_id: int | None, *, status: str, allowed_from: Sequence[str], at: datetime,
                reason: str) -> bool:
    """The guarded UPDATE of a revocation (status becomes ``status`` only from one of ``allowed_from``),
    in the caller's transaction; False when no row matched (already revoked)."""
    if s.new or s.dirty or s.deleted:
        s.flush()  # statement order as the ORM would keep it
    stmt = _SET_REVOKED_FROM[tuple(allowed_from)]
    res = stmt.execute(s.connection(), {"b_id": cert_id, "b_status": status, "b_at": at, "b_reason": reason})
    return bool(res.rowcount)


_CERT_COLUMNS = tuple(c.name for c in _CERT_TABLE.columns)
_ID, _ISSUER, _SERIAL = (_CERT_COLUMNS.index(n) for n in ("id", "issuer", "serial"))
_VALID_OF_IDENTIFIER = Prepared(
    sa_select(*_CERT_TABLE.columns)
    .where(_CERT_TABLE.c.identifier == bindparam("b_identifier"), _CERT_TABLE.c.profile == bindparam("b_profile"),
           or_(_CERT_TABLE.c.status == "valid", _CERT_TABLE.c.status == "hold")))


def valid_of_identifier(db: Database, identifier: str, profile: str,
                        skip: Callable[[int, str, str], bool] = lambda row_id, issuer, serial: False,
                        ) -> list[Certificate]:
    """The valid or on-hold certificates of ``profile`` for ``identifier`` (a contract's EMAID: what an
    installation supersedes) but those ``skip(id, issuer, serial)`` leaves out, read with one prepared
    statement on an autocommit connection (the ORM's entity loading was most of this lookup's cost, once
    per contract installation; a row object is built only for a certificate not skipped)."""
    rows = _VALID_OF_IDENTIFIER.fetch_on(db.autocommit, {"b_identifier": identifier, "b_profile": profile})
    return [Certificate(**dict(zip(_CERT_COLUMNS, r, strict=True))) for r in rows
            if not skip(r[_ID], r[_ISSUER], r[_SERIAL])]


def retire_ca(s: Session, serial: str, parent: str) -> None:
    """Take the CA whose certificate (serial, issued by ``parent``) was revoked out of service."""
    s.execute(update(CertificateAuthority)
              .where(CertificateAuthority.serial == serial)  # type: ignore[arg-type]
              .where(CertificateAuthority.parent == parent)  # type: ignore[arg-type]
              .values(status="revoked"))


def release_hold(s: Session, cert_id: int | None) -> bool:
    """removeFromCRL: a certificate on hold becomes valid, in the caller's transaction; False when it was
    not on hold."""
    res = s.execute(
        update(Certificate).where(Certificate.id == cert_id)  # type: ignore[arg-type]
        .where(Certificate.status == "hold")  # type: ignore[arg-type]
        .values(status="valid", revoked_at=None, revocation_reason=None)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


# -- bulk revocation (pki/revocation.py) --------------------------------------------------------------------

_RESP = OcspResponseCache.__table__  # type: ignore[attr-defined]


def _revocable(issuer: str, identifier: str | None, subject_like: str | None) -> Any:
    # ix_certificate_issuer_status (issuer, status); CA and service certificates (key_uri) never.
    c = _CERT_TABLE.c
    cond = and_(c.issuer == issuer, c.status.in_(("valid", "hold")), c.key_uri.is_(None))
    if identifier:
        cond = and_(cond, c.identifier == identifier)
    if subject_like:
        cond = and_(cond, c.subject.like(subject_like))
    return cond


def count_revocable(db: Database, issuer: str, identifier: str | None = None, subject_like: str | None = None) -> int:
    """End-entity certificates of ``issuer`` still valid or on hold (identifier exact as stored; subject a
    SQL LIKE pattern), counted by index."""
    with db.engine.connect() as conn:
        return int(conn.execute(sa_select(func.count()).select_from(_CERT_TABLE)
                                .where(_revocable(issuer, identifier, subject_like))).scalar_one())


def revoke_batch(s: Session, issuer: str, identifier: str | None, subject_like: str | None, *, limit: int,
                 reason: str, at: datetime, skip_locked: bool) -> list[tuple[int, str, str | None]]:
    """In the caller's transaction: pick up to ``limit`` revocable certificates (``skip_locked``: FOR UPDATE
    SKIP LOCKED, PostgreSQL, so two runs share the work) and revoke them with a guarded UPDATE (status
    still revocable). Returns (id, serial, identifier) of those revoked; when none, the transaction is
    rolled back."""
    c = _CERT_TABLE.c
    pick = sa_select(c.id).where(_revocable(issuer, identifier, subject_like)).limit(limit)
    if skip_locked:
        pick = pick.with_for_update(skip_locked=True)
    ids = [r[0] for r in s.execute(pick)]
    if not ids:
        return []
    rows = [(int(r[0]), str(r[1]), r[2]) for r in s.execute(
        update(_CERT_TABLE).where(c.id.in_(ids), c.status.in_(("valid", "hold")))
        .values(status="revoked", revoked_at=at, revocation_reason=reason)
        .returning(c.id, c.serial, c.identifier))]
    if not rows:
        s.rollback()
    return rows


def certificates_by_id(s: Session, ids: Sequence[int]) -> list[Certificate]:
    """The certificate rows with these ids, in the caller's transaction."""
    return list(s.exec(select(Certificate).where(col(Certificate.id).in_(list(ids)))))


def revoked_without_revoked_response(db: Database, issuer: str, now: datetime) -> list[str]:
    """Serials of unexpired revoked certificates of ``issuer`` whose stored OCSP response does not say so
    (or predates the revocation, or is missing). By index: certificate (issuer, status), then the
    response's unique key."""
    c, r = _CERT_TABLE.c, _RESP.c
    j = _CERT_TABLE.outerjoin(_RESP, and_(r.issuer == c.issuer, r.serial == c.serial))
    with db.engine.connect() as conn:
        return [str(x[0]) for x in conn.execute(
            sa_select(c.serial).select_from(j)
            .where(c.issuer == issuer, c.status == "revoked", c.not_after > now)
            .where(or_(r.id.is_(None), r.status != "revoked", r.this_update < c.revoked_at)))]


__all__ = ["abandon_pending_intents", "has_valid_certificate",
           "certificates_by_id", "count_revocable", "revoke_batch", "revoked_without_revoked_response",
           "IssuedWrites", "all_cas", "fail_intents", "find_certificates", "record_intents",
           "release_hold", "retire_ca", "set_revoked"]
