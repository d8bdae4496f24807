"""Tables of the lifecycle workers (migration 0002): subscriptions, expiry alerts, notification
deliveries, renewals and trust-store versions.

Exactly-once effects are made by unique constraints, not by the broker: Celery delivers at least once
(acks_late), so every task re-runs safely and the database refuses the duplicate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class Subscription(SQLModel, table=True):
    """Where an organization wants its lifecycle events: a webhook (HMAC-signed) or an e-mail address."""

    __tablename__ = "subscription"

    id: int | None = Field(default=None, primary_key=True)
    sub_id: str = Field(index=True, unique=True, max_length=32)  # public id, e.g. "sub_3f2a…"
    org: str = Field(index=True, max_length=128)
    kind: str = Field(max_length=16)  # webhook | email
    target: str = Field(max_length=512)  # URL or e-mail address
    # The HMAC key must be usable to sign, so it cannot be hashed: it is sealed with an AES key generated in
    # the token (hsm/sealing.py, "v2s1:..."), so a database read alone does not reveal it; shown once at
    # creation, never listed, never logged. (Migration 0005 widened the column for the sealed form.)
    secret: str | None = Field(default=None, max_length=512)
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime
    deleted_at: datetime | None = None
    # What the OPCP/OPNC webhook APIs keep beside the target and events (migration 0009): description,
    # metadata, status ("disabled": no deliveries), apiVersion; ``oneShot`` + ``emaid`` for an OPCP
    # subscriptionUrl (one delivery for one contract). None for /v1/subscriptions rows.
    attributes: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class ExpiryAlert(SQLModel, table=True):
    """One row per certificate and alert window: the unique constraint is what makes alerts exactly-once."""

    __tablename__ = "expiry_alert"
    __table_args__ = (UniqueConstraint("cert_id", "window_days", name="uq_expiry_alert_cert_window"),)

    id: int | None = Field(default=None, primary_key=True)
    cert_id: int
    window_days: int
    kind: str = Field(max_length=16)  # expiry | rollover
    tenant: str | None = Field(default=None, max_length=128)
    issuer: str = Field(max_length=64)
    serial: str = Field(max_length=40)
    not_after: datetime
    batch: str = Field(index=True, max_length=64)  # the notification that carried it
    created_at: datetime


class ExpiryScanMark(SQLModel, table=True):
    """Where the last complete expiry scan of one scope got to (migration 0014, #28 item 3), so the next
    reads only what changed since: for every window d of the policy, certificates whose notAfter entered
    the window, (scanned_now + d, now + d]; certificates created or revoked since changes_at (less an
    overlap for transactions still open then); holds released since audit_seq. Written only after every
    alert of that scan committed; a different ``policy_sha256`` (window sizes, profile groups) means a
    full scan."""

    __tablename__ = "expiry_scan_mark"

    scope: str = Field(primary_key=True, max_length=160)  # "*" (every tenant) or "tenant:<name>"
    policy_sha256: str = Field(max_length=64)  # digest of the window groups the scan used
    scanned_now: datetime  # the scan's ``now``: window d is covered up to notAfter <= scanned_now + d
    changes_at: datetime  # wall clock when that scan began reading changes
    audit_seq: int  # audit chain head then (hold releases are read from the audit trail after it)
    was_full: bool  # whether that scan was a full one (read every certificate inside a window)
    updated_at: datetime


class Delivery(SQLModel, table=True):
    """A notification to one subscription (or to the log). Retried with exponential backoff; 'dead'
    after the configured number of attempts. (subscription, event_key) is the idempotency key."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("subscription_id", "event_key", name="uq_delivery_subscription_event"),
        Index("ix_delivery_state_next", "state", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True, unique=True, max_length=40)  # sent as X-V2GPKI-Delivery
    subscription_id: int = Field(index=True)  # 0 = the log sink
    org: str | None = Field(default=None, max_length=128)
    event: str = Field(max_length=32)  # expiry | truststore | revocation | renewal
    event_key: str = Field(max_length=160)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(default="pending", max_length=16)  # pending | delivered | dead
    attempts: int = 0
    next_attempt_at: datetime
    lease_until: datetime | None = None
    last_error: str | None = Field(default=None, max_length=512)
    created_at: datetime
    delivered_at: datetime | None = None


class Renewal(SQLModel, table=True):
    """Automatic renewal of a service-held certificate, keyed by the certificate it replaces."""

    __tablename__ = "renewal"
    __table_args__ = (UniqueConstraint("old_cert_id", name="uq_renewal_old_cert"),)

    id: int | None = Field(default=None, primary_key=True)
    old_cert_id: int
    identifier: str | None = Field(default=None, max_length=255)
    new_key_uri: str = Field(max_length=512)  # the renewed certificate's new key (hsm/uri.py; migration 0012)
    new_serial: str | None = Field(default=None, max_length=40)
    state: str = Field(default="pending", max_length=16)  # pending | done | failed
    error: str | None = Field(default=None, max_length=512)
    created_at: datetime
    completed_at: datetime | None = None


class TrustStoreVersion(SQLModel, table=True):
    """A signed, versioned trust list of one store (v2g | mo | oem | csms). (store, version) is unique, so
    two publishers racing for the next number cannot both win; content_sha256 keys idempotency."""

    __tablename__ = "truststore_version"
    __table_args__ = (UniqueConstraint("store", "version", name="uq_truststore_store_version"),)

    id: int | None = Field(default=None, primary_key=True)
    store: str = Field(max_length=16)
    version: int
    content_sha256: str = Field(max_length=64)  # digest of the trust content (anchors, intermediates)
    reason: str = Field(max_length=255)
    bundle: str = Field(sa_column=Column(Text, nullable=False))  # the exact signed JSON text
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # DER ECDSA-SHA256
    jws: str = Field(sa_column=Column(Text, nullable=False))  # detached JWS (RFC 7515 Appendix F)
    signer_chain_pem: str = Field(sa_column=Column(Text, nullable=False))
    issued_at: datetime
    next_update: datetime


__all__ = ["Delivery", "ExpiryAlert", "ExpiryScanMark", "Renewal", "Subscription", "TrustStoreVersion"]
