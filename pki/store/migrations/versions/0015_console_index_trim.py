"""Console list indexes trimmed (#28 item 3): fewer full indexes on the certificate table

Every full index on ``certificate`` takes an entry per row written, and a revocation changes ``status``,
an indexed column, so each revoked row writes every index again: with migration 0013's indexes a 5,000-row
revocation UPDATE took 2.7–2.8 s against 1.0–1.3 s without them (200,000 rows, PostgreSQL, load 9). Two
full indexes go:

- (profile, id): an admin's profile filter walks the primary key and filters instead (a profile holds a
  large share of the certificates; the profile menu seeks ix_certificate_profile);
- (tenant, status, id): a tenant's revoked and held certificates get partial (tenant, id) indexes, as the
  admin's have (id) ones — an entry per revoked or held row only, and none for a row that stays valid;
  a tenant's "valid" list walks (tenant, id), "expired" (tenant, not_after, id).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 00:05:00
"""
import sqlalchemy as sa
from alembic import op


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

DROPPED: list[tuple[str, list[str]]] = [
    ("ix_certificate_profile_id", ["profile", "id"]),
    ("ix_certificate_tenant_status_id", ["tenant", "status", "id"]),
]
PARTIAL: list[tuple[str, str]] = [
    ("ix_certificate_tenant_revoked_id", "revoked"),
    ("ix_certificate_tenant_hold_id", "hold"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            for name, status in PARTIAL:
                op.create_index(name, "certificate", ["tenant", "id"], postgresql_concurrently=True,
                                if_not_exists=True, postgresql_where=sa.text(f"status = '{status}'"))
            for name, _cols in DROPPED:
                op.drop_index(name, table_name="certificate", postgresql_concurrently=True, if_exists=True)
    else:
        for name, status in PARTIAL:
            op.create_index(name, "certificate", ["tenant", "id"], if_not_exists=True,
                            sqlite_where=sa.text(f"status = '{status}'"))
        for name, _cols in DROPPED:
            op.drop_index(name, table_name="certificate", if_exists=True)


def downgrade() -> None:
    for name, cols in DROPPED:
        op.create_index(name, "certificate", cols, unique=False, if_not_exists=True)
    for name, _status in PARTIAL:
        op.drop_index(name, table_name="certificate", if_exists=True)
