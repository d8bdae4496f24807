"""Console lists by index (#28 item 3), and the audit log's incremental verification

Every filter the console's certificate list offers is served by an index that both narrows and orders
the page (keyset pagination: ``WHERE <filter> AND (key, id) > cursor ORDER BY key, id LIMIT 51``), for
the admin's view and, led by the tenant column, for a tenant's:

- (id) WHERE status = 'revoked', (id) WHERE status = 'hold': the revoked and held certificates, a small
  share, in id order (partial: the query inlines the status, pki/store/inventory.py);
- (profile, id): a profile filter, in id order. The admin's "valid" and issuing-CA filters walk the
  primary key and filter (a page reads ~51 / the filter's share of rows): a (status, id) index drew
  SQLite's planner, without statistics, from the expiry scan's notAfter range to a walk of every valid
  certificate and a sort, and an (issuer, id) index drew PostgreSQL's from (issuer, status) for the bulk
  revocation's batches, which would then walk the rows already revoked, batch after batch;
- (identifier, id) and (tenant, identifier, id), on PostgreSQL under COLLATE "C": an identifier prefix
  is the range [prefix, prefix') only in code point order (the database's collation may order "DE*A"
  and "DE-A" linguistically); SQLite's BINARY collation already is code point order;
- (not_after, id) and (tenant, not_after, id): "expiring before", in notAfter order;
- (tenant, status, id), (tenant, issuer, id), (tenant, profile, id): a tenant's filtered lists
  ((tenant, id), migration 0008, serves its unfiltered list).

audit_checkpoint.seq gets an index (incremental verification reads the checkpoints from the last verified
one on), and audit_verification holds that checkpoint: one row, signed by the audit key (pki/audit_sign.py).

On PostgreSQL the indexes are built CONCURRENTLY (outside a transaction), as in 0008.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 23:30:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

# (name, columns); "identifier" in a pattern index is COLLATE "C" on PostgreSQL
INDEXES: list[tuple[str, list[str]]] = [
    ("ix_certificate_profile_id", ["profile", "id"]),
    ("ix_certificate_identifier_c", ["identifier", "id"]),
    ("ix_certificate_not_after_id", ["not_after", "id"]),
    ("ix_certificate_tenant_status_id", ["tenant", "status", "id"]),
    ("ix_certificate_tenant_issuer_id", ["tenant", "issuer", "id"]),
    ("ix_certificate_tenant_profile_id", ["tenant", "profile", "id"]),
    ("ix_certificate_tenant_identifier_c", ["tenant", "identifier", "id"]),
    ("ix_certificate_tenant_not_after_id", ["tenant", "not_after", "id"]),
]


PARTIAL: list[tuple[str, str]] = [
    ("ix_certificate_revoked_id", "revoked"),
    ("ix_certificate_hold_id", "hold"),
]


def _columns(cols: list[str], pg: bool) -> list[object]:
    return [sa.text('identifier COLLATE "C"') if pg and c == "identifier" else c for c in cols]


def upgrade() -> None:
    op.create_table(
        'audit_verification',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('verified_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('signature', sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:
        with op.get_context().autocommit_block():
            op.create_index("ix_audit_checkpoint_seq", "audit_checkpoint", ["seq"], postgresql_concurrently=True,
                            if_not_exists=True)
            for name, cols in INDEXES:
                op.create_index(name, "certificate", _columns(cols, pg), unique=False, postgresql_concurrently=True,
                                if_not_exists=True)
            for name, status in PARTIAL:
                op.create_index(name, "certificate", ["id"], postgresql_concurrently=True, if_not_exists=True,
                                postgresql_where=sa.text(f"status = '{status}'"))
    else:
        op.create_index("ix_audit_checkpoint_seq", "audit_checkpoint", ["seq"], if_not_exists=True)
        for name, cols in INDEXES:
            op.create_index(name, "certificate", _columns(cols, pg), unique=False, if_not_exists=True)
        for name, status in PARTIAL:
            op.create_index(name, "certificate", ["id"], if_not_exists=True,
                            sqlite_where=sa.text(f"status = '{status}'"))


def downgrade() -> None:
    for name, _status in PARTIAL:
        op.drop_index(name, table_name="certificate", if_exists=True)
    for name, _cols in reversed(INDEXES):
        op.drop_index(name, table_name="certificate", if_exists=True)
    op.drop_index("ix_audit_checkpoint_seq", table_name="audit_checkpoint", if_exists=True)
    op.drop_table('audit_verification')
