"""Database tables (SQLModel over SQLAlchemy; SQLite by default, PostgreSQL in production).

Designed up front for every open capability (engine, API, responders, CPS, workers) so that the first
migration already carries tenancy, audit and status columns. Serials are stored as lower-case hex
strings: ≤ 16 octets does not fit a 64-bit integer column (see pki/serials.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel


class CertificateAuthority(SQLModel, table=True):
    __tablename__ = "ca"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)  # e.g. "cpo-sub2", "v2g-root-20"
    profile: str = Field(max_length=64)
    parent: str | None = Field(default=None, max_length=64)  # issuing CA name; None for roots
    key_uri: str = Field(max_length=512)  # the CA's key (hsm/uri.py; migration 0012 dropped key_label)
    key_alg: str = Field(max_length=16)
    hierarchy: str = Field(max_length=32)  # v2g | oem | mo | csms | api
    serial: str = Field(max_length=40)  # hex serial of the CA's own certificate
    subject: str = Field(max_length=512)
    name_hash_sha1: str = Field(index=True, max_length=40)  # for OCSP CertID lookups (RFC 6960 §4.1.1)
    key_hash_sha1: str = Field(index=True, max_length=40)
    not_before: datetime
    not_after: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    crl_number: int = 0
    status: str = Field(default="active", max_length=16)  # active | staged | retired | revoked (pki/root_campaign.py)
    created_at: datetime


class Certificate(SQLModel, table=True):
    __tablename__ = "certificate"
    __table_args__ = (
        UniqueConstraint("issuer", "serial", name="uq_certificate_issuer_serial"),
        Index("ix_certificate_not_after_status", "not_after", "status"),
        Index("ix_certificate_issuer_status", "issuer", "status"),
        Index("ix_certificate_tenant_identifier", "tenant", "identifier"),
        # #28 (migration 0008): every scan by index
        Index("ix_certificate_revoked_at", "revoked_at"),
        Index("ix_certificate_created_at", "created_at"),
        Index("ix_certificate_tenant_id", "tenant", "id"),
        # #28 item 3 (migrations 0013, 0015): each console list filter narrows and orders by one index (keyset
        # pagination); the prefix indexes ix_certificate_identifier_c and ix_certificate_tenant_identifier_c,
        # (identifier COLLATE "C", id) on PostgreSQL, are the migration's alone (an expression per dialect)
        Index("ix_certificate_revoked_id", "id", sqlite_where=text("status = 'revoked'"),
              postgresql_where=text("status = 'revoked'")),
        Index("ix_certificate_hold_id", "id", sqlite_where=text("status = 'hold'"),
              postgresql_where=text("status = 'hold'")),
        Index("ix_certificate_not_after_id", "not_after", "id"),
        Index("ix_certificate_tenant_revoked_id", "tenant", "id", sqlite_where=text("status = 'revoked'"),
              postgresql_where=text("status = 'revoked'")),  # migration 0015, as the hold one
        Index("ix_certificate_tenant_hold_id", "tenant", "id", sqlite_where=text("status = 'hold'"),
              postgresql_where=text("status = 'hold'")),
        Index("ix_certificate_tenant_issuer_id", "tenant", "issuer", "id"),
        Index("ix_certificate_tenant_profile_id", "tenant", "profile", "id"),
        Index("ix_certificate_tenant_not_after_id", "tenant", "not_after", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    issuer: str = Field(max_length=64)  # CA name
    serial: str = Field(max_length=40)  # lower-case hex, no leading zeros
    profile: str = Field(index=True, max_length=64)
    subject: str = Field(max_length=512)
    identifier: str | None = Field(default=None, index=True, max_length=255)  # EVSEID/EMAID/PCID/...
    tenant: str | None = Field(default=None, max_length=128)  # owning organization name
    not_before: datetime
    not_after: datetime
    status: str = Field(default="valid", max_length=16)  # valid | revoked | hold
    revoked_at: datetime | None = None
    revocation_reason: str | None = Field(default=None, max_length=32)
    key_uri: str | None = Field(default=None, max_length=512)  # service-held keys only (OCSP, CPS)
    # A delegated OCSP signer (RFC 6960 §4.2.2.2): the id of the CA it answers for, which issued it (set at
    # issuance; migration 0011 filled it for older rows). NULL for every other certificate.
    ocsp_signer_for_ca_id: int | None = Field(default=None, index=True)
    fingerprint: str = Field(index=True, max_length=64)  # SHA-256 of DER, hex
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime


class IssuanceIntent(SQLModel, table=True):
    """What the HSM was asked to sign, recorded (and committed) before the signature (Boulder's
    linting-precertificate idea): a crash between sign and store leaves a pending intent."""

    __tablename__ = "issuance_intent"
    __table_args__ = (UniqueConstraint("issuer", "serial", name="uq_intent_issuer_serial"),)

    id: int | None = Field(default=None, primary_key=True)
    issuer: str = Field(max_length=64)
    serial: str = Field(max_length=40)
    profile: str = Field(max_length=64)
    subject: str = Field(max_length=512)
    tbs_sha256: str = Field(max_length=64)  # digest of the linted twin's TBS
    state: str = Field(default="pending", index=True, max_length=16)  # pending | issued | failed
    error: str | None = Field(default=None, max_length=512)
    created_at: datetime
    completed_at: datetime | None = None


class Organization(SQLModel, table=True):
    __tablename__ = "organization"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    role: str = Field(max_length=16)  # cpo | oem | emsp | admin | auditor
    prefixes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    settings: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    key_id: str = Field(index=True, unique=True, max_length=32)  # public part shown in lists
    org: str = Field(index=True, max_length=128)
    hash: str = Field(max_length=128)  # SHA-256 of the secret; the secret itself is shown once
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class AuditEvent(SQLModel, table=True):
    """Append-only, hash-chained log (hash = SHA-256(prev_hash || canonical JSON of the row))."""

    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(index=True, unique=True)
    ts: datetime
    actor: str = Field(max_length=128)
    org: str | None = Field(default=None, max_length=128)
    action: str = Field(index=True, max_length=64)
    object: str | None = Field(default=None, max_length=255)
    outcome: str = Field(max_length=16)  # success | failure | denied
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """One row: the chain head, locked (SELECT … FOR UPDATE) by each appender to serialise the chain."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(default="0" * 64, max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    __tablename__ = "audit_checkpoint"
    __table_args__ = (Index("ix_audit_checkpoint_seq", "seq"),)  # migration 0013

    id: int | None = Field(default=None, primary_key=True)
    seq: int
    hash: str = Field(max_length=64)
    ts: datetime
    key_label: str = Field(max_length=128)
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class AuditVerification(SQLModel, table=True):
    """One row (id 1): the newest checkpoint up to which the whole log was verified, so that the next
    verification starts there (#28 item 3). Signed by the audit key over (seq, hash), so that someone who
    can write the database cannot move it past events they edited (pki/audit_sign.py)."""

    __tablename__ = "audit_verification"

    id: int = Field(default=1, primary_key=True)
    seq: int
    hash: str = Field(max_length=64)
    verified_at: datetime
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class OcspResponseCache(SQLModel, table=True):
    """Pre-signed OCSP responses (RFC 5019 §2.1: responses may be produced ahead of requests)."""

    __tablename__ = "ocsp_response"
    __table_args__ = (
        UniqueConstraint("issuer", "serial", name="uq_ocsp_issuer_serial"),
        # #28 (migration 0008): the responders' change scan and refresh, by index
        Index("ix_ocsp_response_this_update", "this_update"),
        Index("ix_ocsp_response_next_update", "next_update"),
        Index("ix_ocsp_response_issuer_status", "issuer", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    issuer: str = Field(max_length=64)
    serial: str = Field(max_length=40)
    hash_alg: str = Field(default="sha1", max_length=16)
    status: str = Field(max_length=16)
    this_update: datetime
    next_update: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class CrlRecord(SQLModel, table=True):
    __tablename__ = "crl"
    __table_args__ = (UniqueConstraint("issuer", "number", name="uq_crl_issuer_number"),)

    id: int | None = Field(default=None, primary_key=True)
    issuer: str = Field(index=True, max_length=64)
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Station(SQLModel, table=True):
    __tablename__ = "station"
    __table_args__ = (UniqueConstraint("org", "identity", name="uq_station_org_identity"),)

    id: int | None = Field(default=None, primary_key=True)
    org: str = Field(max_length=128)
    identity: str = Field(max_length=64)
    created_at: datetime


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency"
    __table_args__ = (UniqueConstraint("org", "key", name="uq_idempotency_org_key"),)

    id: int | None = Field(default=None, primary_key=True)
    org: str = Field(max_length=128)
    key: str = Field(max_length=255)
    request_sha256: str = Field(max_length=64)
    response: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime


class OutboxEvent(SQLModel, table=True):
    """Work recorded in the same transaction as its cause, dispatched after commit (workers issue)."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True, max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime
    dispatched_at: datetime | None = Field(default=None, index=True)


class Contract(SQLModel, table=True):
    """An eMSP contract binding an EMAID to a vehicle (PCID). ISO 15118-2 installs the PCID's default."""

    __tablename__ = "contract"
    __table_args__ = (
        UniqueConstraint("emaid", name="uq_contract_emaid"),
        Index("ix_contract_pcid_status", "pcid", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    emaid: str = Field(max_length=255)  # normalised, without hyphens
    pcid: str = Field(max_length=18)
    emsp: str = Field(index=True, max_length=128)  # owning organization
    valid_until: datetime
    is_default: bool = True
    status: str = Field(default="active", max_length=16)  # active | terminated
    created_at: datetime
    terminated_at: datetime | None = None


class ProvisioningCertificate(SQLModel, table=True):
    """OEM provisioning certificate pool (the shape of the hosted platforms' PCP), keyed by PCID."""

    __tablename__ = "provisioning_certificate"

    id: int | None = Field(default=None, primary_key=True)
    pcid: str = Field(index=True, max_length=18)
    oem: str = Field(index=True, max_length=128)
    fingerprint: str = Field(index=True, unique=True, max_length=64)
    not_after: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime


class SignedContractData(SQLModel, table=True):
    """Contract data produced ahead of time (certificate chain, key encrypted for the vehicle, CPS
    signature) for lookup by PCID/EMAID. Holds no plaintext key: only what the vehicle can decrypt."""

    __tablename__ = "signed_contract_data"

    id: int | None = Field(default=None, primary_key=True)
    contract_id: int = Field(index=True)
    pcid: str = Field(index=True, max_length=18)
    emaid: str = Field(index=True, max_length=255)
    cert_serial: str = Field(max_length=40)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime


class CpsReplay(SQLModel, table=True):
    """An ISO 15118-2 installation answer kept for the vehicle's retries (#21 item 2, migration 0010).

    Keyed by the SHA-256 of the request body the vehicle signed (the verified Reference DigestValue) and the
    contract it was answered for: a retry of the same signed request gets the same answer (same contract
    certificate, same encrypted key, same CPS signature) under its new SessionID instead of a new
    certificate. ``response`` is the signed V2G_Message with SessionID 00; it holds no plaintext key, only
    what the vehicle's provisioning key can decrypt. Valid while both certificates are valid (checked on
    every use), until ``expires_at`` (the contract certificate's notAfter); deleted when the contract is
    terminated or loses its default."""

    __tablename__ = "cps_replay"

    request_digest: str = Field(primary_key=True, max_length=64)  # hex
    contract_id: int = Field(primary_key=True, index=True)
    emaid: str = Field(max_length=255)
    cert_issuer: str = Field(max_length=64)
    cert_serial: str = Field(max_length=40)
    cps_issuer: str = Field(max_length=64)
    cps_serial: str = Field(max_length=40)
    response: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    expires_at: datetime = Field(index=True)
    created_at: datetime
