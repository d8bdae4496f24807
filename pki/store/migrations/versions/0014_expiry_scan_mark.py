"""Incremental expiry scan (#28 item 3): expiry_scan_mark, one row per scan scope

The expiry scan read every certificate inside an alert window on every run (linear in the fleet). With this
row it reads only certificates whose notAfter entered a window since the last complete scan, those created
or revoked since, and holds released since (pki/lifecycle.py scan_expiring); a changed window policy, or no
row, makes a full scan. A small table: no index beyond its primary key.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 23:10:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'expiry_scan_mark',
        sa.Column('scope', sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column('policy_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('scanned_now', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('changes_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('audit_seq', sa.Integer(), nullable=False),
        sa.Column('was_full', sa.Boolean(), nullable=False),
        sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('scope'),
    )


def downgrade() -> None:
    op.drop_table('expiry_scan_mark')
