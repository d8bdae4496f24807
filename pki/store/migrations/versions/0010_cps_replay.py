"""Replayed contract installations return the same answer (#21 item 2): cps_replay

One row per answered ISO 15118-2 CertificateInstallationReq (SHA-256 of the signed body, contract): the
signed answer with SessionID 00, re-sent under the retry's SessionID while its contract and CPS
certificates are valid (pki/cps/service.py, docs/cps.md step 11).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-11 12:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cps_replay',
    sa.Column('request_digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('contract_id', sa.Integer(), nullable=False),
    sa.Column('emaid', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('cert_issuer', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('cert_serial', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('cps_issuer', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('cps_serial', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('response', sa.LargeBinary(), nullable=False),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('request_digest', 'contract_id')
    )
    with op.batch_alter_table('cps_replay', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cps_replay_contract_id'), ['contract_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_cps_replay_expires_at'), ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('cps_replay', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cps_replay_expires_at'))
        batch_op.drop_index(batch_op.f('ix_cps_replay_contract_id'))
    op.drop_table('cps_replay')
