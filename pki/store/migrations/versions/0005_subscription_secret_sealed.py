"""Subscription secrets sealed in the token: widen subscription.secret for the sealed form

A webhook HMAC secret (16–128 characters) is stored as "v2s1:" + base64url(key id | nonce | ciphertext |
tag) — up to 224 characters (hsm/sealing.py, #21 item 11). SQLite does not enforce VARCHAR lengths; on
PostgreSQL the column becomes VARCHAR(512). Secrets stored in clear before this revision are sealed by
`v2gpki init` (it needs the token, which a migration does not open).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00
"""
import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("subscription", "secret", type_=sa.String(length=512), existing_type=sa.String(length=128),
                        existing_nullable=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("subscription", "secret", type_=sa.String(length=128), existing_type=sa.String(length=512),
                        existing_nullable=True)
