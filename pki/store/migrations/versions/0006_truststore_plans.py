"""Chargers' trust stores and root transitions (#27 items 1 and 2): trusted_root, station_trust_report,
root_campaign (pki/store/models_truststore.py)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 10:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('trusted_root',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('scope', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('certificate_type', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('serial', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('not_after', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('withdrawn_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('scope', 'certificate_type', 'sha256', name='uq_trusted_root_scope_type_sha')
    )
    with op.batch_alter_table('trusted_root', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_trusted_root_scope'), ['scope'], unique=False)
        batch_op.create_index(batch_op.f('ix_trusted_root_sha256'), ['sha256'], unique=False)

    op.create_table('station_trust_report',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('org', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('station', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('ocpp_version', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('reported', sa.JSON(), nullable=False),
    sa.Column('roots', sa.JSON(), nullable=False),
    sa.Column('install', sa.JSON(), nullable=False),
    sa.Column('delete', sa.JSON(), nullable=False),
    sa.Column('reported_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('org', 'station', name='uq_station_trust_report_org_station')
    )
    with op.batch_alter_table('station_trust_report', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_station_trust_report_org'), ['org'], unique=False)

    op.create_table('root_campaign',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('old_root', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('new_root', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('successors', sa.JSON(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('switched_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('switched_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('switch_coverage', sa.Float(), nullable=True),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('withdrawn_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('withdrawn_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('new_root', name='uq_root_campaign_new_root')
    )
    with op.batch_alter_table('root_campaign', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_root_campaign_old_root'), ['old_root'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('root_campaign', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_root_campaign_old_root'))
    op.drop_table('root_campaign')
    with op.batch_alter_table('station_trust_report', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_station_trust_report_org'))
    op.drop_table('station_trust_report')
    with op.batch_alter_table('trusted_root', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_trusted_root_sha256'))
        batch_op.drop_index(batch_op.f('ix_trusted_root_scope'))
    op.drop_table('trusted_root')
