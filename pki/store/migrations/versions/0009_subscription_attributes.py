"""OPCP/OPNC webhook endpoints on the lifecycle subscriptions (#25): subscription.attributes

A nullable JSON column for what the OPCP webhooks.v1.json and OPNC event API keep beside a subscription's
target and events (description, metadata, status, apiVersion) and for the one-shot subscription an OPCP
subscriptionUrl creates (oneShot, emaid). NULL for /v1/subscriptions rows: nothing changes for them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 12:00:00
"""
import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attributes', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.drop_column('attributes')
