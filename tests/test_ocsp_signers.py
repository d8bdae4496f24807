"""The OCSP signer ↔ CA link is a column (certificate.ocsp_signer_for_ca_id, migration 0011), not a key-label
convention: a re-labelled signer key is still found, and a signer linked to one CA never answers for another
(RFC 6960 §4.2.2.2: a delegated responder is authorised by, and speaks for, the CA that issued it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp
from sqlalchemy import text

from pki.context import Context
from pki.hierarchy import issue_service_cert, ocsp_profile_for
from pki.ocsp import responder_for
from tests.conftest import _initialised, csr_pem


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, token_root: Path) -> Context:
    """A context of its own: these tests replace signers, which the shared one must keep."""
    return _initialised(tmp_path_factory, token_root, "t-ocsp-signers", None)


def _links(ctx: Context) -> dict[int, int | None]:
    with ctx.db.engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT id, ocsp_signer_for_ca_id FROM certificate WHERE key_uri IS NOT NULL")).all())


def _ca_id(ctx: Context, name: str) -> int:
    with ctx.db.engine.connect() as conn:
        return int(conn.execute(text("SELECT id FROM ca WHERE name = :n"), {"n": name}).scalar_one())


def _request(ctx: Context, ca: str, cert: x509.Certificate) -> bytes:
    issuer = ctx.engine.ca(ca).cert
    return (x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER))


def test_issuance_links_signers_and_the_migration_fills_the_same(own: Context) -> None:
    linked = {k: v for k, v in _links(own).items() if v is not None}
    assert linked, "init issues a delegated OCSP signer per CA"
    with own.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT c.ocsp_signer_for_ca_id, ca.id FROM certificate c JOIN ca "
                                 "ON ca.name = c.issuer WHERE c.ocsp_signer_for_ca_id IS NOT NULL")).all()
    assert rows and all(a == b for a, b in rows)  # each linked to the CA that issued it
    # Migration 0011 fills existing rows by the label convention the column replaces: run it again on
    # this database (down to 0010 drops the column, up fills it) and get the same links.
    from alembic import command
    from alembic.config import Config

    from pki.store.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", own.db.url.replace("%", "%%"))
    cfg.attributes["engine"] = own.db.engine
    command.downgrade(cfg, "0010")
    command.upgrade(cfg, "head")
    assert {k: v for k, v in _links(own).items() if v is not None} == linked


def test_a_relabelled_signer_key_is_found(own: Context) -> None:
    h = own.hierarchy()
    issued = issue_service_cert(own.engine, issuer="cpo-sub2", profile_name=ocsp_profile_for(own.engine, h, "cpo-sub2"),
                                label="renamed-responder-key", cn="OCSP renamed", h=h, identifier="ocsp-cpo-sub2")
    r = responder_for(own)
    r.reload()
    iss = r.issuer("cpo-sub2")
    assert iss is not None and iss.signer is not None
    assert iss.signer.cert_der == issued.der and iss.signer.label == "renamed-responder-key"
    leaf = own.engine.issue_from_csr("secc", csr_pem("DE*ICE*E0SIGNER1", dc="CPO"))
    resp = x509_ocsp.load_der_ocsp_response(r.respond(_request(own, "cpo-sub2", leaf.cert)).der)
    assert resp.response_status == x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    assert resp.certificates[0] == issued.cert  # signed by the renamed key's certificate
    pub = issued.cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and resp.signature_hash_algorithm is not None
    pub.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))


def test_a_signer_of_one_ca_never_answers_for_another(own: Context) -> None:
    r = responder_for(own)
    r.reload()
    a, b = r.issuer("cpo-sub2"), r.issuer("cpo-sub1")
    assert a is not None and a.signer is not None and b is not None and b.signer is not None
    a_der, b_der = a.signer.cert_der, b.signer.cert_der
    a_id, b_id = _ca_id(own, "cpo-sub2"), _ca_id(own, "cpo-sub1")
    # Link A's (newest) signer to B: B must keep its own signer, and A, left without one, answers unauthorized.
    with own.db.engine.begin() as conn:
        conn.execute(text("UPDATE certificate SET ocsp_signer_for_ca_id = :b WHERE der = :der"),
                     {"b": b_id, "der": a_der})
    try:
        r.reload()
        b2 = r.issuer("cpo-sub1")
        assert b2 is not None and b2.signer is not None and b2.signer.cert_der == b_der
        a2 = r.issuer("cpo-sub2")
        assert a2 is not None and (a2.signer is None or a2.signer.cert_der != a_der)
        leaf = own.engine.issue_from_csr("secc", csr_pem("DE*ICE*E0SIGNER2", dc="CPO"))
        ans = r.respond(_request(own, "cpo-sub2", leaf.cert))
        if a2.signer is None:
            assert ans.status == "unauthorized"
        else:
            resp = x509_ocsp.load_der_ocsp_response(ans.der)
            assert resp.certificates[0].public_bytes(serialization.Encoding.DER) != a_der
    finally:
        with own.db.engine.begin() as conn:
            conn.execute(text("UPDATE certificate SET ocsp_signer_for_ca_id = :a WHERE der = :der"),
                         {"a": a_id, "der": a_der})
        r.reload()
