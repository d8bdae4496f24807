"""The OCSP signer ↔ CA link as a column (#23 item 4): certificate.ocsp_signer_for_ca_id

Until now the responder recognised a CA's delegated OCSP signer (RFC 6960 §4.2.2.2) by its key label: a
certificate of that CA whose key URI named the label ``ocsp-<ca>`` (or a renewal's ``ocsp-<ca>-r<time>``)
and whose EKU had id-kp-OCSPSigning. The link is now a column, set at issuance (pki/issuance.py) and
filled here for the existing rows by that same convention, so a key may be re-labelled without the
responder losing its signer.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 20:30:00
"""
import re

import sqlalchemy as sa
from alembic import op
from urllib.parse import unquote


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

OCSP_SIGNING = "1.3.6.1.5.5.7.3.9"  # id-kp-OCSPSigning (RFC 5280 §4.2.1.12)


def _label(key_uri: str) -> str | None:
    """The key label of an RFC 7512 pkcs11: URI (its 'object' attribute) or of the software twin's soft:LABEL."""
    if key_uri.startswith("soft:"):
        return key_uri[len("soft:"):]
    if key_uri.startswith("pkcs11:"):
        m = re.search(r"(?:^pkcs11:|;)object=([^;?]*)", key_uri)
        return unquote(m.group(1)) if m else None
    return None


def _ocsp_signing(der: bytes) -> bool:
    from cryptography import x509

    try:
        eku = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return any(oid.dotted_string == OCSP_SIGNING for oid in eku)


def upgrade() -> None:
    with op.batch_alter_table('certificate', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ocsp_signer_for_ca_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_certificate_ocsp_signer_for_ca_id'), ['ocsp_signer_for_ca_id'],
                              unique=False)
    conn = op.get_bind()
    cas = dict(conn.execute(sa.text("SELECT name, id FROM ca")).all())
    rows = conn.execute(sa.text("SELECT id, issuer, key_uri, der FROM certificate WHERE key_uri IS NOT NULL")).all()
    for cert_id, issuer, key_uri, der in rows:
        label = _label(key_uri)
        base = f"ocsp-{issuer}"
        if issuer not in cas or label is None or not (label == base or label.startswith(base + "-r")):
            continue
        if not _ocsp_signing(bytes(der)):
            continue
        conn.execute(sa.text("UPDATE certificate SET ocsp_signer_for_ca_id = :ca WHERE id = :id"),
                     {"ca": cas[issuer], "id": cert_id})


def downgrade() -> None:
    with op.batch_alter_table('certificate', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_certificate_ocsp_signer_for_ca_id'))
        batch_op.drop_column('ocsp_signer_for_ca_id')
