"""Contracts and contract installation across eMSPs (issue #21 items 1, 2, 15 and 16), on SQLite and
PostgreSQL (the session `ctx`, through TestClient).

1. one default contract per (PCID, eMSP): another eMSP's registration never touches an eMSP's contracts,
   and the installation's choice among eMSPs follows the documented rule (docs/cps.md, "Which contract");
2. /v1/contract-installations and /v1/contract-updates are scoped like /v1/contract-data; a retried
   installation (same signed request) gets the same answer, and a different request for the same contract
   supersedes (RFC 5280 reason superseded) the contract's earlier certificate;
15. a vehicle that lists only its V2G root gets a contract (request built by the Josev peer);
16. Get15118EVCertificate refuses an `action` that contradicts the EXI request, and an answer that could
   exceed 7500 characters, before anything is issued: no certificate, intent or OCSP row.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from api.app import create_app
from pki.context import Context
from pki.cps.exi import (
    CertificateChain,
    CertificateInstallationRes,
    CertificateUpdateReq,
    MessageHeader,
    V2GMessage,
    decode_message,
    encode_message,
)
from pki.cps.exi.messages import X509IssuerSerial
from pki.cps.keywrap import unwrap_contract_key
from pki.cps.xmldsig import sign_elements
from pki.issuance import pem
from pki.orgs import create_api_key, create_org
from pki.pools import with_session_id
from pki.store.db import utcnow
from pki.store.models import AuditEvent, Certificate, Contract, IssuanceIntent, OcspResponseCache
from tests import ocpp_schemas
from tests.conftest import org_with_fresh_prefix
from tests.test_cps import Vehicle, csr_pem, install_request, new_vehicle
from tests.test_cps_josev import Peer, assert_accepted_by_josev, check, josev  # noqa: F401 - josev: fixture
from tests.test_cps_josev import new_vehicle as josev_vehicle

ISO2 = "urn:iso:15118:2:2013:MsgDef"


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@dataclass
class Env:
    client: TestClient
    ctx: Context
    h: dict[str, dict[str, str]]
    prov: dict[str, str]
    org: dict[str, str]


@pytest.fixture(scope="module")
def env(ctx: Context) -> Iterator[Env]:
    tag = secrets.token_hex(3)
    # "emsp" is eMSP One (tests/test_cps's helpers create its contracts), "emsp2" eMSP Two. Prefixes are
    # exclusive per role (#21 item 4): drawn where no other tenant of the session's database has one.
    prov: dict[str, str] = {}
    h, org = {}, {}
    for who, role in (("emsp", "emsp"), ("emsp2", "emsp"), ("oem", "oem"), ("cpo", "cpo"), ("admin", "admin")):
        org[who] = f"tenancy-{who}-{tag}"
        if role == "admin":
            create_org(ctx.db, org[who], role, [])
        else:
            prov[who] = org_with_fresh_prefix(ctx, org[who], role).replace("-", "")
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, org[who])[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield Env(client, ctx, h, prov, org)


def contract(env: Env, pcid: str, who: str, *, is_default: bool = True) -> str:
    emaid = env.prov[who] + _a(9)
    r = env.client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, "is_default": is_default,
                                               "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                        headers=env.h[who])
    assert r.status_code == 201, r.text
    return emaid


def only_v2g_root(env: Env) -> tuple[X509IssuerSerial, ...]:
    c = env.ctx.engine.ca("v2g-root").cert
    return (X509IssuerSerial(c.subject.rfc4514_string(), c.serial_number),)


def both_roots(env: Env) -> tuple[X509IssuerSerial, ...]:
    out = []
    for name in ("v2g-root", "mo-root"):
        c = env.ctx.engine.ca(name).cert
        out.append(X509IssuerSerial(c.subject.rfc4514_string(), c.serial_number))
    return tuple(out)


def ocpp(env: Env, exi: bytes, action: str = "Install") -> Any:
    return env.client.post("/ocpp/v201/get-15118-ev-certificate",
                           json={"iso15118SchemaVersion": ISO2, "action": action,
                                 "exiRequest": base64.b64encode(exi).decode()}, headers=env.h["cpo"])


def installed_emaid(env: Env, exi: bytes) -> str:
    r = ocpp(env, exi)
    assert r.status_code == 200 and r.json()["status"] == "Accepted", r.text
    body = decode_message(base64.b64decode(r.json()["exiResponse"])).body
    assert isinstance(body, CertificateInstallationRes)
    return body.emaid.value


def contract_rows(env: Env, emaid: str) -> list[Certificate]:
    with env.ctx.db.session() as s:
        return list(s.exec(select(Certificate).where(Certificate.identifier == emaid,
                                                     Certificate.profile == "contract").order_by(col(Certificate.id))))


def valid_serials(env: Env, emaid: str) -> list[str]:
    return [c.serial for c in contract_rows(env, emaid) if c.status == "valid"]


def counts(ctx: Context) -> tuple[int, int, int]:
    """(certificates, issuance intents, OCSP rows), after the OCSP pre-signer has written what it had."""
    from pki.ocsp import responder_for

    responder_for(ctx).presigner.flush()
    with ctx.db.session() as s:
        return tuple(int(s.exec(select(func.count()).select_from(m)).one())  # type: ignore[return-value]
                     for m in (Certificate, IssuanceIntent, OcspResponseCache))


# -- item 1: one default per (PCID, eMSP); the installation's rule among eMSPs ---------------------------------


def test_another_emsp_contract_leaves_ones_contract_alone(env: Env) -> None:
    v = new_vehicle(env)  # type: ignore[arg-type]
    assert env.client.post("/v1/provisioning-certificates", json={"certificate": pem(v.cert)},
                           headers=env.h["oem"]).status_code == 201
    one = contract(env, v.pcid, "emsp")
    two = contract(env, v.pcid, "emsp2")  # eMSP Two registers a contract for the vehicle One serves
    got = env.client.get(f"/v1/contracts/{one}", headers=env.h["emsp"]).json()
    assert got["is_default"] is True and got["status"] == "active", got
    assert env.client.get(f"/v1/contracts/{two}", headers=env.h["emsp2"]).json()["is_default"] is True
    # each eMSP still prepares its own contract data for the vehicle, never the other's
    r = env.client.post("/v1/contract-data", json={"pcid": v.pcid}, headers=env.h["emsp"])
    assert r.status_code == 201 and r.json()["emaid"] == one, r.text
    r = env.client.post("/v1/contract-data", json={"pcid": v.pcid}, headers=env.h["emsp2"])
    assert r.status_code == 201 and r.json()["emaid"] == two, r.text
    # and the CPO's installation keeps delivering One's contract (One served the vehicle first)
    assert installed_emaid(env, install_request(v, both_roots(env))) == one
    # Two's registration wrote no change to One's contract into the audit log either
    with env.ctx.db.session() as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "contract.create", AuditEvent.object == two)).one()
    assert "replaced_default" not in (ev.details or {})


def test_installation_picks_the_emsp_that_served_the_vehicle_first(env: Env) -> None:
    """The documented rule (docs/cps.md): the eMSP with the oldest active contract for the PCID, that
    eMSP's default; an eMSP's new default replaces only its own; when it has none left, the next eMSP."""
    v = new_vehicle(env)  # type: ignore[arg-type]
    req = install_request(v, both_roots(env))
    one = contract(env, v.pcid, "emsp")
    two = contract(env, v.pcid, "emsp2")
    assert installed_emaid(env, req) == one
    # One replaces its default: its own earlier contract loses the flag, and One's new default is installed
    one_b = contract(env, v.pcid, "emsp")
    assert env.client.get(f"/v1/contracts/{one}", headers=env.h["emsp"]).json()["is_default"] is False
    assert env.client.get(f"/v1/contracts/{two}", headers=env.h["emsp2"]).json()["is_default"] is True
    assert installed_emaid(env, req) == one_b
    with env.ctx.db.session() as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "contract.create",
                                             AuditEvent.object == one_b)).one()
    assert (ev.details or {}).get("replaced_default") == [one]
    # a non-default contract of One's does not change the choice
    contract(env, v.pcid, "emsp", is_default=False)
    assert installed_emaid(env, req) == one_b
    # One ends the contracts it had before Two came: its remaining (non-default) contract is younger than
    # Two's, so Two, now the eMSP with the oldest active contract, is installed
    for emaid in (one, one_b):
        assert env.client.post(f"/v1/contracts/{emaid}/terminate", headers=env.h["emsp"]).status_code == 200
    assert installed_emaid(env, req) == two


# -- item 2: /v1/contract-installations scoped; repeated installations supersede ---------------------------


def test_contract_installations_are_scoped_to_the_emsps_own_contracts(env: Env) -> None:
    v = new_vehicle(env)  # type: ignore[arg-type]
    one = contract(env, v.pcid, "emsp")
    exi = base64.b64encode(install_request(v, both_roots(env))).decode()
    before = counts(env.ctx)
    # eMSP Two posts One's vehicle's signed request: 404, like /v1/contract-data, and nothing issued
    r = env.client.post("/v1/contract-installations", json={"exiRequest": exi}, headers=env.h["emsp2"])
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert one not in r.text
    assert counts(env.ctx) == before
    # One gets its own contract
    r = env.client.post("/v1/contract-installations", json={"exiRequest": exi}, headers=env.h["emsp"])
    assert r.status_code == 200 and r.json()["responseCode"] == "OK" and r.json()["emaid"] == one, r.text
    first = r.json()
    # Two having a contract of its own for the vehicle gets its own, never One's
    two = contract(env, v.pcid, "emsp2")
    r = env.client.post("/v1/contract-installations", json={"exiRequest": exi}, headers=env.h["emsp2"])
    assert r.status_code == 200 and r.json()["emaid"] == two, r.text
    # updates: Two cannot renew One's contract with One's vehicle's request
    cert = x509.load_pem_x509_certificate(first["contractSignatureCertChain"][0].encode())
    key = unwrap_contract_key(base64.b64decode(first["contractSignatureEncryptedPrivateKey"]),
                              base64.b64decode(first["dhPublicKey"]), v.key, cert)
    subs = tuple(x509.load_pem_x509_certificate(p.encode()).public_bytes(serialization.Encoding.DER)
                 for p in first["contractSignatureCertChain"][1:])
    der = cert.public_bytes(serialization.Encoding.DER)
    body = CertificateUpdateReq("id1", CertificateChain(der, subs, "id2"), one, both_roots(env))
    upd = base64.b64encode(encode_message(V2GMessage(MessageHeader(b"\x01" * 8, signature=sign_elements([body], key)),
                                                     body))).decode()
    before = counts(env.ctx)
    r = env.client.post("/v1/contract-updates", json={"exiRequest": upd}, headers=env.h["emsp2"])
    assert r.status_code == 404, r.text
    assert counts(env.ctx) == before
    # an installation request on the updates endpoint (and the reverse) is refused before issuing
    r = env.client.post("/v1/contract-updates", json={"exiRequest": exi}, headers=env.h["emsp"])
    assert r.status_code == 400 and r.json()["type"].endswith("action-mismatch"), r.text
    assert counts(env.ctx) == before
    r = env.client.post("/v1/contract-updates", json={"exiRequest": upd}, headers=env.h["emsp"])
    assert r.status_code == 200 and r.json()["responseCode"] == "OK" and r.json()["emaid"] == one, r.text


def _answer(r: Any) -> V2GMessage:
    assert r.status_code == 200 and r.json()["status"] == "Accepted", r.text
    msg = decode_message(base64.b64decode(r.json()["exiResponse"]))
    assert isinstance(msg.body, CertificateInstallationRes)
    return msg


def _serial(msg: V2GMessage) -> str:
    assert isinstance(msg.body, CertificateInstallationRes)
    return format(x509.load_der_x509_certificate(msg.body.contract_signature_cert_chain.certificate).serial_number,
                  "x")


def _same_answer(a: V2GMessage, b: V2GMessage) -> bool:
    """Identical but for the SessionID: body and the CPS signature in the header."""
    return encode_message(replace(a, header=replace(a.header, session_id=b"\x00"))) == \
        encode_message(replace(b, header=replace(b.header, session_id=b"\x00")))


def test_replayed_installation_returns_the_same_answer(env: Env) -> None:
    """A retry of the same signed request (a new V2G session: new SessionID, same body; or the same body
    signed again) gets the same answer — same contract certificate, encrypted key, DH public key and CPS
    signature — under its own SessionID, and nothing is issued, revoked or signed. A *different* request
    for the same contract (other trust anchors, a new provisioning key) still supersedes."""
    from pki.store.models import CpsReplay

    v = new_vehicle(env)  # type: ignore[arg-type]
    emaid = contract(env, v.pcid, "emsp")
    req = install_request(v, both_roots(env))
    first = _answer(ocpp(env, req))
    serial = _serial(first)
    before = counts(env.ctx)
    with env.ctx.db.session() as s:
        audit_before = s.exec(select(func.count()).select_from(AuditEvent)).one()
    retries = [req, req, with_session_id(req, b"\x0a" * 8), with_session_id(req, b"\x0b\x0c"),
               install_request(v, both_roots(env), session=b"\x0d" * 8)]  # the same body signed again
    for retry in retries:
        again = _answer(ocpp(env, retry))
        assert again.header.session_id == decode_message(retry).header.session_id
        assert _same_answer(again, first)
        assert valid_serials(env, emaid) == [serial]
    assert counts(env.ctx) == before  # no certificate, intent or OCSP response
    with env.ctx.db.session() as s:
        assert s.exec(select(func.count()).select_from(AuditEvent)).one() == audit_before
    assert [c.serial for c in contract_rows(env, emaid)] == [serial]
    # the replayed answer is what a vehicle accepts: the key decrypts to the certificate's
    body = again.body
    assert isinstance(body, CertificateInstallationRes)
    cert = x509.load_der_x509_certificate(body.contract_signature_cert_chain.certificate)
    key = unwrap_contract_key(body.contract_signature_encrypted_private_key.value, body.dh_public_key.value,
                              v.key, cert)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]

    # a different request for the same contract supersedes: other trust anchors ...
    other = _answer(ocpp(env, install_request(v, only_v2g_root(env))))
    assert _serial(other) != serial and valid_serials(env, emaid) == [_serial(other)]
    # ... and a new provisioning key for the same PCID
    key2 = ec.generate_private_key(ec.SECP256R1())
    r = env.client.post("/v1/enrollments", json={"csr": csr_pem(v.pcid, dc="OEM", key=key2).decode(),
                                                 "profile": "oem-prov"}, headers=env.h["oem"])
    assert r.status_code == 201, r.text
    v2 = Vehicle(v.pcid, key2, x509.load_pem_x509_certificate(r.json()["certificate"].encode()))
    third = _answer(ocpp(env, install_request(v2, both_roots(env))))
    assert valid_serials(env, emaid) == [_serial(third)]
    rows = {c.serial: c for c in contract_rows(env, emaid)}
    for gone in (serial, _serial(other)):
        assert rows[gone].status == "revoked" and rows[gone].revocation_reason == "superseded", rows[gone]
    # the OCSP responder says so too (re-signed at revocation)
    from pki.ocsp import responder_for

    responder_for(env.ctx).presigner.flush()
    with env.ctx.db.session() as s:
        ocsp = {o.serial: o for o in s.exec(select(OcspResponseCache).where(
            col(OcspResponseCache.serial).in_(list(rows))))}
    assert set(ocsp) == set(rows)
    # the first request again: its answer's certificate was superseded, so it is answered anew (and that
    # answer is then the one its retries get)
    fourth = _answer(ocpp(env, req))
    assert _serial(fourth) not in rows and valid_serials(env, emaid) == [_serial(fourth)]
    assert _same_answer(_answer(ocpp(env, with_session_id(req, b"\x0e" * 8))), fourth)

    # a default change or a termination drops the kept answers of the contract
    with env.ctx.db.session() as s:
        cid = s.exec(select(Contract.id).where(Contract.emaid == emaid)).one()
        assert s.exec(select(func.count()).select_from(CpsReplay).where(CpsReplay.contract_id == cid)).one() == 3
    emaid2 = contract(env, v.pcid, "emsp")
    with env.ctx.db.session() as s:
        assert s.exec(select(func.count()).select_from(CpsReplay).where(CpsReplay.contract_id == cid)).one() == 0
    assert _answer(ocpp(env, req)).body.emaid.value == emaid2  # type: ignore[union-attr]
    assert env.client.post(f"/v1/contracts/{emaid2}/terminate", headers=env.h["emsp"]).status_code == 200
    with env.ctx.db.session() as s:
        cid2 = s.exec(select(Contract.id).where(Contract.emaid == emaid2)).one()
        assert s.exec(select(func.count()).select_from(CpsReplay).where(CpsReplay.contract_id == cid2)).one() == 0
    # back to the first contract (the eMSP's newest active one): its kept answers are gone, so a new certificate
    fifth = _answer(ocpp(env, req))
    assert fifth.body.emaid.value == emaid and _serial(fifth) != _serial(fourth)  # type: ignore[union-attr]
    assert valid_serials(env, emaid) == [_serial(fifth)]

    # updates are not kept: an update keeps the certificate it was signed with (the vehicle holds it until it has the new one),
    # and a replayed update supersedes the certificate the first update produced
    body = fifth.body
    assert isinstance(body, CertificateInstallationRes)
    serials = [_serial(fifth)]
    last = x509.load_der_x509_certificate(body.contract_signature_cert_chain.certificate)
    key = unwrap_contract_key(body.contract_signature_encrypted_private_key.value, body.dh_public_key.value,
                              v.key, last)
    upd_body = CertificateUpdateReq("id1", CertificateChain(body.contract_signature_cert_chain.certificate,
                                                            body.contract_signature_cert_chain.sub_certificates,
                                                            "id2"), emaid, both_roots(env))
    upd = encode_message(V2GMessage(MessageHeader(b"\x02" * 8, signature=sign_elements([upd_body], key)), upd_body))
    new = []
    for _ in range(2):
        r = ocpp(env, upd, "Update")
        assert r.status_code == 200 and r.json()["status"] == "Accepted", r.text
        res = decode_message(base64.b64decode(r.json()["exiResponse"])).body
        new.append(format(x509.load_der_x509_certificate(res.contract_signature_cert_chain.certificate)  # type: ignore[union-attr]
                          .serial_number, "x"))
        assert sorted(valid_serials(env, emaid)) == sorted([serials[-1], new[-1]])


# -- item 15: a vehicle listing only its V2G root -----------------------------------------------------------


def test_vehicle_listing_only_its_v2g_root_gets_a_contract(env: Env) -> None:
    v = new_vehicle(env)  # type: ignore[arg-type]
    emaid = contract(env, v.pcid, "emsp")
    assert installed_emaid(env, install_request(v, only_v2g_root(env))) == emaid
    # the CPS chain must still lead to a listed V2G root: listing only the MO root gets no contract
    mo = env.ctx.engine.ca("mo-root").cert
    r = ocpp(env, install_request(v, (X509IssuerSerial(mo.subject.rfc4514_string(), mo.serial_number),)))
    assert r.status_code == 200 and r.json()["status"] == "Failed", r.text
    body = decode_message(base64.b64decode(r.json()["exiResponse"])).body
    assert str(body.response_code) == "FAILED_NoCertificateAvailable"  # type: ignore[union-attr]


def test_josev_vehicle_listing_only_its_v2g_root_gets_a_contract(josev: Peer, env: Env,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    """The request built and signed by the independent peer, with only the V2G root in
    ListOfRootCertificateIDs (what Josev's EVCC sends); Josev verifies the answer (CPS chain to that V2G
    root, contract chain to the eMSP's MO root, contract key)."""
    v = josev_vehicle(env, tmp_path / "vehicle")  # type: ignore[arg-type]
    emaid = contract(env, v.pcid, "emsp")
    sid = secrets.token_bytes(8).hex()
    req = josev("install-request", session_id=sid, oem_cert=v.files["oem_cert"], oem_key=v.files["oem_key"],
                roots=[str(v.dir / "v2g-root.der")])
    ids = decode_message(base64.b64decode(req["exi"])).body.root_certificate_ids  # type: ignore[union-attr]
    assert [i.serial_number for i in ids] == [env.ctx.engine.ca("v2g-root").cert.serial_number]
    r = env.client.post("/ocpp/v201/get-15118-ev-certificate",
                        json={"iso15118SchemaVersion": ISO2, "action": "Install", "exiRequest": req["exi"]},
                        headers=env.h["cpo"])
    assert r.status_code == 200 and r.json()["status"] == "Accepted", r.text
    verdict = check(josev, r.json()["exiResponse"], "install", sid, v.dir / "oem.pem", v.dir)
    assert_accepted_by_josev(verdict, sid)
    assert verdict["emaid"] == emaid
    # a retry (new V2G session, same signed request) gets the same answer under its SessionID: Josev accepts it
    sid2 = secrets.token_bytes(8).hex()
    r2 = env.client.post("/ocpp/v201/get-15118-ev-certificate",
                         json={"iso15118SchemaVersion": ISO2, "action": "Install", "exiRequest": base64.b64encode(
                             with_session_id(base64.b64decode(req["exi"]), bytes.fromhex(sid2))).decode()},
                         headers=env.h["cpo"])
    assert r2.status_code == 200 and r2.json()["status"] == "Accepted", r2.text
    assert _same_answer(_answer(r2), _answer(r))
    verdict2 = check(josev, r2.json()["exiResponse"], "install", sid2, v.dir / "oem.pem", v.dir)
    assert_accepted_by_josev(verdict2, sid2)
    assert verdict2["emaid"] == emaid and valid_serials(env, emaid) == [_serial(_answer(r))]


# -- item 16: refusals before issuance ------------------------------------------------------------------------


def test_action_mismatch_is_refused_before_issuing(env: Env) -> None:
    v = new_vehicle(env)  # type: ignore[arg-type]
    contract(env, v.pcid, "emsp")
    req = install_request(v, both_roots(env))
    before = counts(env.ctx)
    r = ocpp(env, req, "Update")
    assert r.status_code == 400 and r.json()["status"] == "Failed", r.text
    assert r.headers["X-V2GPKI-Problem"] == "action-mismatch"
    ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", r.json())
    assert counts(env.ctx) == before
    # the same request with the right action is installed
    assert ocpp(env, req).json()["status"] == "Accepted"


def test_answer_too_large_is_refused_before_issuing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import pki.cps.service as svc

    v = new_vehicle(env)  # type: ignore[arg-type]
    contract(env, v.pcid, "emsp")
    req = install_request(v, both_roots(env))
    r = ocpp(env, req)
    assert r.status_code == 200 and r.json()["status"] == "Accepted", r.text
    actual = len(r.json()["exiResponse"])
    # a limit this answer exceeds: 422, OCPP-shaped, and nothing issued, no intent, no OCSP row
    monkeypatch.setattr(svc, "EXI_RESPONSE_MAX_B64", actual - 1)
    before = counts(env.ctx)
    r = ocpp(env, req)
    assert r.status_code == 422 and r.json()["status"] == "Failed", r.text
    assert r.headers["X-V2GPKI-Problem"] == "response-too-large"
    ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", r.json())
    assert counts(env.ctx) == before
    # the bound computed from the chain lengths is never below a real answer's length, and close to it
    cps_row, subs = svc._cps_signer(env.ctx, both_roots(env))
    mo_ca = svc._pick_ca(env.ctx, {"mo-sub2"}, both_roots(env))
    assert mo_ca is not None
    bound = svc._max_response_b64(env.ctx, CertificateChain(cps_row.der, tuple(subs)), mo_ca, False)
    assert actual <= bound < actual + 600, (actual, bound)


def test_refused_request_signature_issues_nothing(env: Env) -> None:
    """A request signed with another key is answered FAILED_SignatureError, and nothing is issued."""
    v = new_vehicle(env)  # type: ignore[arg-type]
    contract(env, v.pcid, "emsp")
    before = counts(env.ctx)
    bad = install_request(Vehicle(v.pcid, ec.generate_private_key(ec.SECP256R1()), v.cert), both_roots(env))
    r = ocpp(env, bad)
    assert r.status_code == 200 and r.json()["status"] == "Failed"
    assert counts(env.ctx) == before
