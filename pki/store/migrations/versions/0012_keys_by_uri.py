"""Keys by URI (#23 item 5): ca.key_label dropped, renewal.new_label becomes renewal.new_key_uri

The code signs with ``KeyStore.signer(uri)`` (hsm/uri.py); a CA row's key is its ``key_uri`` alone. Until now
the engine signed with ``ca.key_label``, so the label is what a CA's key really was: before the column goes,
every ``key_uri`` is rewritten to name that label in the same store (RFC 7512 pkcs11: token and type kept,
or soft:), a no-op for every row `v2gpki init` wrote. A pending or finished renewal's new key label becomes
the URI of that label in the store of the certificate it renews.

The URIs are built here, not with hsm/uri.py, so that this migration keeps meaning what it means today.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 20:30:00
"""
from urllib.parse import quote, unquote

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

_SAFE = "-._~"  # RFC 3986 unreserved characters: never percent-encoded in a pk11-path value


def _with_label(ref_uri: str, label: str) -> str:
    """The URI of key ``label`` in the store ``ref_uri`` names a key of."""
    if ref_uri.startswith("pkcs11:"):
        path = ref_uri[len("pkcs11:"):].split("?", 1)[0]
        attrs = dict(p.split("=", 1) for p in path.split(";") if "=" in p)
        token = attrs.get("token")
        if token is None:
            raise RuntimeError("a pkcs11: key URI without token= in the database; fix the row, then migrate")
        return f"pkcs11:token={token};object={quote(label, safe=_SAFE)};type={attrs.get('type', 'private')}"
    if ref_uri.startswith("soft:"):
        return f"soft:{quote(label, safe=_SAFE)}"
    raise RuntimeError("a key URI of no known scheme in the database; fix the row, then migrate")


def _label_of(uri: str) -> str:
    if uri.startswith("pkcs11:"):
        path = uri[len("pkcs11:"):].split("?", 1)[0]
        return unquote(dict(p.split("=", 1) for p in path.split(";") if "=" in p)["object"])
    return unquote(uri.split(":", 1)[1])


def upgrade() -> None:
    conn = op.get_bind()
    ca = sa.table('ca', sa.column('id', sa.Integer), sa.column('key_label', sa.String),
                  sa.column('key_uri', sa.String))
    for id_, label, uri in conn.execute(sa.select(ca.c.id, ca.c.key_label, ca.c.key_uri)).all():
        want = _with_label(uri, label)
        if want != uri:
            conn.execute(ca.update().where(ca.c.id == id_).values(key_uri=want))
    with op.batch_alter_table('ca', schema=None) as batch_op:
        batch_op.drop_column('key_label')

    with op.batch_alter_table('renewal', schema=None) as batch_op:
        batch_op.add_column(sa.Column('new_key_uri', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True))
    renewal = sa.table('renewal', sa.column('id', sa.Integer), sa.column('old_cert_id', sa.Integer),
                       sa.column('new_label', sa.String), sa.column('new_key_uri', sa.String))
    cert = sa.table('certificate', sa.column('id', sa.Integer), sa.column('key_uri', sa.String))
    rows = conn.execute(sa.select(renewal.c.id, renewal.c.new_label, cert.c.key_uri)
                        .select_from(renewal.outerjoin(cert, cert.c.id == renewal.c.old_cert_id))).all()
    for id_, label, old_uri in rows:
        if old_uri is None:
            raise RuntimeError(f"renewal {id_}: the renewed certificate has no key URI; fix the row, then migrate")
        conn.execute(renewal.update().where(renewal.c.id == id_).values(new_key_uri=_with_label(old_uri, label)))
    with op.batch_alter_table('renewal', schema=None) as batch_op:
        batch_op.alter_column('new_key_uri', existing_type=sqlmodel.sql.sqltypes.AutoString(length=512),
                              nullable=False)
        batch_op.drop_column('new_label')


def downgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table('renewal', schema=None) as batch_op:
        batch_op.add_column(sa.Column('new_label', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
    renewal = sa.table('renewal', sa.column('id', sa.Integer), sa.column('new_label', sa.String),
                       sa.column('new_key_uri', sa.String))
    for id_, uri in conn.execute(sa.select(renewal.c.id, renewal.c.new_key_uri)).all():
        conn.execute(renewal.update().where(renewal.c.id == id_).values(new_label=_label_of(uri)))
    with op.batch_alter_table('renewal', schema=None) as batch_op:
        batch_op.alter_column('new_label', existing_type=sqlmodel.sql.sqltypes.AutoString(length=128),
                              nullable=False)
        batch_op.drop_column('new_key_uri')

    with op.batch_alter_table('ca', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_label', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
    ca = sa.table('ca', sa.column('id', sa.Integer), sa.column('key_label', sa.String),
                  sa.column('key_uri', sa.String))
    for id_, uri in conn.execute(sa.select(ca.c.id, ca.c.key_uri)).all():
        conn.execute(ca.update().where(ca.c.id == id_).values(key_label=_label_of(uri)))
    with op.batch_alter_table('ca', schema=None) as batch_op:
        batch_op.alter_column('key_label', existing_type=sqlmodel.sql.sqltypes.AutoString(length=128),
                              nullable=False)
