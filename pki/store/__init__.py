"""The storage seam (#23 item 2), like Boulder's storage authority: the only package that imports SQLAlchemy,
SQLModel, Alembic or a database driver (tests/test_arch_storage.py checks it).

Per consumer a narrow repository: certificates.py (issuance and revocation), inventory.py (listing and
counting certificates and CAs), audit_log.py (the hash-chained audit trail and its checkpoints), crl.py,
contracts.py (contracts, the contract installation's prepared lookups, the answers kept for replayed
installations, the provisioning pool), enrollment.py (stations, idempotency), orgs.py (organizations, API
keys), firmware.py, outbox.py, subscriptions.py (trust-store distribution), trust_reports.py (station trust
stores), root_campaigns.py, ocsp.py (responder lookups), pools.py (the OPCP/OPNC pools), backup.py (whole
databases for backup and restore), lifecycle.py (subscriptions, deliveries, expiry alerts, renewals);
errors.py turns database errors into typed PKI errors (Duplicate, InvalidValue). A repository function that
takes a Session runs in the caller's transaction (``with db.session() as s``), so writes that belong together
commit together. Rows come back as the SQLModel classes of models*.py, as plain data.
"""

from pki.store import models_lifecycle  # noqa: F401  (registers the lifecycle tables on the metadata)
from pki.store.db import Database, utcnow

__all__ = ["Database", "utcnow"]
