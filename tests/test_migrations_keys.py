"""#23 item 5, migration 0012: keys are stored by URI. ``ca.key_label`` goes (the label it held becomes the
object of the row's ``key_uri``, the label being what the engine signed with until then), and a renewal's
``new_label`` becomes ``new_key_uri`` in the store of the certificate it renews; the downgrade brings the
labels back. On SQLite and PostgreSQL, from a database at 0011 holding rows of both schemes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, Table, inspect, select

from pki.store.db import MIGRATIONS, Database
from tests.conftest import drop_pg_database, own_pg_database

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        d = Database(f"sqlite:///{tmp_path / 'm.db'}")
        yield d
        d.dispose()
        return
    pg = own_pg_database("mig")
    if pg is None:
        pytest.skip("PostgreSQL not available")
    d = Database(pg[0])
    try:
        yield d
    finally:
        d.dispose()
        drop_pg_database(pg[1])


def _alembic(db: Database, rev: str, *, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    cfg.attributes["engine"] = db.engine
    (command.downgrade if down else command.upgrade)(cfg, rev)


def _table(db: Database, name: str) -> Table:
    return Table(name, MetaData(), autoload_with=db.engine)


def _ca(name: str, label: str, uri: str) -> dict[str, object]:
    return {"name": name, "profile": "cpo-sub2", "parent": None, "key_label": label, "key_uri": uri,
            "key_alg": "p256", "hierarchy": "v2g", "serial": "01", "subject": f"CN={name}",
            "name_hash_sha1": "0" * 40, "key_hash_sha1": "0" * 40, "not_before": NOW, "not_after": NOW,
            "der": b"\x30\x00", "crl_number": 0, "status": "active", "created_at": NOW}


def _cert(id_: int, uri: str) -> dict[str, object]:
    return {"id": id_, "issuer": "ca-a", "serial": f"{id_:02x}", "profile": "cps-leaf", "subject": "CN=x",
            "identifier": f"svc-{id_}", "tenant": None, "not_before": NOW, "not_after": NOW, "status": "valid",
            "revoked_at": None, "revocation_reason": None, "key_uri": uri, "fingerprint": f"{id_:064x}",
            "der": b"\x30\x00", "created_at": NOW}


def test_0012_converts_labels_to_uris_and_back(db: Database) -> None:
    _alembic(db, "0011")
    ca, cert, renewal = _table(db, "ca"), _table(db, "certificate"), _table(db, "renewal")
    with db.engine.begin() as c:
        c.execute(ca.insert(), [
            _ca("ca-a", "ca-a", "pkcs11:token=v2g%20pki;object=ca-a;type=private"),  # consistent: unchanged
            # the engine signed with the label: the URI is made to name it (same token)
            _ca("ca-b", "ca-b key", "pkcs11:token=v2g%20pki;object=stale;type=private"),
            _ca("ca-c", "ca-c", "soft:ca-c"),
        ])
        c.execute(cert.insert(), [_cert(1, "pkcs11:token=tok;object=svc-cps-leaf;type=private"),
                                  _cert(2, "soft:svc-x")])
        c.execute(renewal.insert(), [
            {"old_cert_id": 1, "identifier": "svc-1", "new_label": "svc-cps-leaf-r20261201000000",
             "new_serial": None, "state": "pending", "error": None, "created_at": NOW, "completed_at": None},
            {"old_cert_id": 2, "identifier": "svc-2", "new_label": "svc-x-r20261201000000",
             "new_serial": "0a", "state": "done", "error": None, "created_at": NOW, "completed_at": NOW},
        ])

    _alembic(db, "head")
    insp = inspect(db.engine)
    assert "key_label" not in {c["name"] for c in insp.get_columns("ca")}
    cols = {c["name"]: c for c in insp.get_columns("renewal")}
    assert "new_label" not in cols and cols["new_key_uri"]["nullable"] is False
    ca, renewal = _table(db, "ca"), _table(db, "renewal")
    with db.engine.connect() as c:
        assert dict(c.execute(select(ca.c.name, ca.c.key_uri)).all()) == {
            "ca-a": "pkcs11:token=v2g%20pki;object=ca-a;type=private",
            "ca-b": "pkcs11:token=v2g%20pki;object=ca-b%20key;type=private",
            "ca-c": "soft:ca-c",
        }
        assert dict(c.execute(select(renewal.c.old_cert_id, renewal.c.new_key_uri)).all()) == {
            1: "pkcs11:token=tok;object=svc-cps-leaf-r20261201000000;type=private",
            2: "soft:svc-x-r20261201000000",
        }
    # what the code reads from them: hsm/uri.py names the same labels
    from hsm.uri import key_label

    assert key_label("pkcs11:token=v2g%20pki;object=ca-b%20key;type=private") == "ca-b key"

    _alembic(db, "0011", down=True)
    ca, renewal = _table(db, "ca"), _table(db, "renewal")
    with db.engine.connect() as c:
        assert dict(c.execute(select(ca.c.name, ca.c.key_label)).all()) == {
            "ca-a": "ca-a", "ca-b": "ca-b key", "ca-c": "ca-c"}
        assert dict(c.execute(select(renewal.c.old_cert_id, renewal.c.new_label)).all()) == {
            1: "svc-cps-leaf-r20261201000000", 2: "svc-x-r20261201000000"}


def test_0012_on_an_empty_database(db: Database) -> None:
    db.migrate()
    assert "key_label" not in {c["name"] for c in inspect(db.engine).get_columns("ca")}
    _alembic(db, "0011", down=True)
    _alembic(db, "head")
