"""Fleet scale (#28): indexes for every scan, so nothing reads a table that grows with the fleet

- ocsp_response.this_update: the responders' change scan (rows re-signed since a watermark), the start-up
  warm-up (newest first) and pki/ocsp.py refresh (responses older than a replaced signer);
- ocsp_response.next_update: refresh of responses past half their validity, deletion of expired ones;
- ocsp_response (issuer, status): refresh of responses out of step with a valid certificate;
- certificate.revoked_at: the responders' revocation scan (revoked or put on hold since a watermark);
- certificate.created_at: refresh's search for certificates issued without a stored response;
- certificate (tenant, id): the console's and /v1's tenant-scoped lists, paged by id.

On PostgreSQL the indexes are built CONCURRENTLY (outside a transaction): a large table keeps taking
writes while they build.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 12:00:00
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_ocsp_response_this_update", "ocsp_response", ["this_update"]),
    ("ix_ocsp_response_next_update", "ocsp_response", ["next_update"]),
    ("ix_ocsp_response_issuer_status", "ocsp_response", ["issuer", "status"]),
    ("ix_certificate_revoked_at", "certificate", ["revoked_at"]),
    ("ix_certificate_created_at", "certificate", ["created_at"]),
    ("ix_certificate_tenant_id", "certificate", ["tenant", "id"]),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            for name, table, cols in INDEXES:
                op.create_index(name, table, cols, unique=False, postgresql_concurrently=True,
                                if_not_exists=True)
    else:
        for name, table, cols in INDEXES:
            op.create_index(name, table, cols, unique=False, if_not_exists=True)


def downgrade() -> None:
    for name, table, _cols in reversed(INDEXES):
        op.drop_index(name, table_name=table, if_exists=True)
