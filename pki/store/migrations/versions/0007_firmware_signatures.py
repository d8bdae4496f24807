"""Signed firmware (#27 item 3): firmware_signature (pki/store/models_firmware.py)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 12:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('firmware_signature',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('product', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('issuer', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('serial', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('signature', sqlmodel.sql.sqltypes.AutoString(length=800), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('firmware_signature', schema=None) as batch_op:
        batch_op.create_index('ix_firmware_signature_tenant_product', ['tenant', 'product'], unique=False)
        batch_op.create_index(batch_op.f('ix_firmware_signature_product'), ['product'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('firmware_signature', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_firmware_signature_product'))
        batch_op.drop_index('ix_firmware_signature_tenant_product')
    op.drop_table('firmware_signature')
