"""eMSP contracts, the OEM provisioning pool, and OCPP Plug & Charge authorization over HTTP."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from asn1crypto import keys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from api.app import create_app
from pki.context import Context
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from tests.conftest import csr_pem


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@pytest.fixture(scope="module")
def env(ctx: Context) -> Iterator[dict[str, object]]:
    tag = secrets.token_hex(3)
    prov = {"emsp1": f"DE-{_a(3)}", "emsp2": f"DE-{_a(3)}", "oem": _a(3)}
    keys_ = {}
    for who, role in (("emsp1", "emsp"), ("emsp2", "emsp"), ("oem", "oem"), ("cpo", "cpo")):
        create_org(ctx.db, f"{who}-{tag}", role, [prov[who]] if who in prov else ["DE*" + _a(3)])
        keys_[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, f'{who}-{tag}')[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield {"client": client, "ctx": ctx, "prov": prov, "h": keys_}


def _hash_data(cert: x509.Certificate, issuer: x509.Certificate, alg: str = "SHA256", enc: str = "hex") -> dict:  # type: ignore[type-arg]
    fn = getattr(hashlib, alg.lower())
    nh = fn(issuer.subject.public_bytes()).digest()
    spki = issuer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    kh = fn(keys.PublicKeyInfo.load(spki)["public_key"].contents[1:]).digest()
    if enc == "hex":  # EVerest: lower-case hex, serial in hex without leading zeros
        return {"hashAlgorithm": alg, "issuerNameHash": nh.hex(), "issuerKeyHash": kh.hex(),
                "serialNumber": format(cert.serial_number, "x"), "responderURL": "http://169.254.169.254/"}
    # Josev: URL-safe base64 hashes and a decimal serial
    return {"hashAlgorithm": alg, "issuerNameHash": base64.urlsafe_b64encode(nh).decode(),
            "issuerKeyHash": base64.urlsafe_b64encode(kh).decode(), "serialNumber": str(cert.serial_number),
            "responderURL": "http://10.0.0.1/"}


def test_contract_lifecycle_and_authorize(env: dict) -> None:  # type: ignore[type-arg]
    client, prov, h = env["client"], env["prov"], env["h"]
    emaid = f"{prov['emsp1']}-{_a(9)}"
    pcid = prov["oem"] + _a(14)
    until = (utcnow() + timedelta(days=365)).isoformat()
    r = client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, "valid_until": until}, headers=h["emsp1"])
    assert r.status_code == 201, r.text
    assert r.json()["emaid"] == emaid.replace("-", "")
    # another eMSP cannot create under this provider prefix, nor see or terminate it
    r = client.post("/v1/contracts", json={"emaid": f"{prov['emsp1']}-{_a(9)}", "pcid": pcid, "valid_until": until},
                    headers=h["emsp2"])
    assert r.status_code == 403
    assert client.get(f"/v1/contracts/{emaid}", headers=h["emsp2"]).status_code == 404
    assert client.post(f"/v1/contracts/{emaid}/terminate", headers=h["emsp2"]).status_code == 404
    # the contract certificate (enrolled by the eMSP) authorizes with hash data in both encodings
    r = client.post("/v1/enrollments", json={"csr": csr_pem(emaid, dc="MO").decode(), "profile": "contract"},
                    headers=h["emsp1"])
    assert r.status_code == 201, r.text
    chain = x509.load_pem_x509_certificates(r.json()["chain"].encode())
    hd = [_hash_data(chain[0], chain[1], "SHA256", "hex"), _hash_data(chain[1], chain[2], "SHA512", "b64")]
    body = {"idToken": {"idToken": emaid, "type": "eMAID"}, "iso15118CertificateHashData": hd}
    r = client.post("/ocpp/v201/authorize", json=body, headers=h["cpo"])
    assert r.json() == {"idTokenInfo": {"status": "Accepted"}, "certificateStatus": "Accepted"}, r.text
    # by certificate PEM
    r = client.post("/ocpp/v201/authorize", json={"idToken": {"idToken": emaid},
                                                  "certificate": r.request.content and chain[0].public_bytes(
                                                      serialization.Encoding.PEM).decode()}, headers=h["cpo"])
    assert r.json()["certificateStatus"] == "Accepted"
    # unknown EMAID
    unknown = f"{prov['emsp1'].replace('-', '')}{_a(9)}"
    r = client.post("/ocpp/v201/authorize", json={"idToken": {"idToken": unknown}}, headers=h["cpo"])
    assert r.json()["idTokenInfo"]["status"] == "Unknown"
    # terminate: contract certificates revoked, authorization says ContractCancelled
    r = client.post(f"/v1/contracts/{emaid}/terminate", headers=h["emsp1"])
    assert r.status_code == 200 and len(r.json()["revoked_certificates"]) == 1
    r = client.post("/ocpp/v201/authorize", json=body, headers=h["cpo"])
    assert r.json() == {"idTokenInfo": {"status": "Invalid"}, "certificateStatus": "ContractCancelled"}


def test_a_second_contract_for_an_emaid_is_a_conflict_and_changes_nothing(env: dict) -> None:  # type: ignore[type-arg]
    """The contract table's unique EMAID refuses the second row: 409 (pki.store.errors.Duplicate, raised by
    the repository, not a database exception), and the transaction that would have taken the default
    from the first contract is rolled back: it is still its eMSP's default for the vehicle."""
    client, ctx, prov, h = env["client"], env["ctx"], env["prov"], env["h"]
    emaid = f"{prov['emsp1'].replace('-', '')}{_a(9)}"
    pcid = prov["oem"] + _a(14)
    until = (utcnow() + timedelta(days=30)).isoformat()
    r = client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, "valid_until": until}, headers=h["emsp1"])
    assert r.status_code == 201, r.text
    r = client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, "valid_until": until}, headers=h["emsp1"])
    assert r.status_code == 409, r.text
    assert emaid in r.json()["detail"]
    listed = client.get(f"/v1/contracts?pcid={pcid}", headers=h["emsp1"]).json()
    assert [(c["emaid"], c["is_default"]) for c in listed] == [(emaid, True)]
    from pki.contracts import default_contract_for

    found = default_contract_for(ctx, pcid)
    assert found is not None and found.emaid == emaid and found.is_default


def test_authorize_revoked_contract_certificate(env: dict) -> None:  # type: ignore[type-arg]
    client, ctx, prov, h = env["client"], env["ctx"], env["prov"], env["h"]
    emaid = f"{prov['emsp1'].replace('-', '')}{_a(9)}"
    until = (utcnow() + timedelta(days=30)).isoformat()
    assert client.post("/v1/contracts", json={"emaid": emaid, "pcid": prov["oem"] + _a(14), "valid_until": until},
                       headers=h["emsp1"]).status_code == 201
    r = client.post("/v1/enrollments", json={"csr": csr_pem(emaid, dc="MO").decode(), "profile": "contract"},
                    headers=h["emsp1"])
    chain = x509.load_pem_x509_certificates(r.json()["chain"].encode())
    ctx.engine.revoke(format(chain[0].serial_number, "x"), "keyCompromise", issuer=r.json()["issuer"])
    body = {"idToken": {"idToken": emaid}, "iso15118CertificateHashData": [_hash_data(chain[0], chain[1])]}
    assert client.post("/ocpp/v201/authorize", json=body, headers=h["cpo"]).json()["certificateStatus"] == \
        "CertificateRevoked"
    # hash data naming a certificate we never issued
    bogus = dict(_hash_data(chain[0], chain[1]), serialNumber="1234")
    body = {"idToken": {"idToken": emaid}, "iso15118CertificateHashData": [bogus]}
    assert client.post("/ocpp/v201/authorize", json=body, headers=h["cpo"]).json()["certificateStatus"] == \
        "CertChainError"


def test_provisioning_pool(env: dict) -> None:  # type: ignore[type-arg]
    client, prov, h = env["client"], env["prov"], env["h"]
    pcid = prov["oem"] + _a(14)
    r = client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM").decode(), "profile": "oem-prov"},
                    headers=h["oem"])
    assert r.status_code == 201, r.text
    r = client.post("/v1/provisioning-certificates", json={"certificate": r.json()["certificate"]}, headers=h["oem"])
    assert r.status_code == 201, r.text
    found = client.get(f"/v1/lookupvehicle/{pcid}", headers=h["oem"]).json()["provisioning_certificates"]
    assert len(found) == 1
    # an eMSP sees the vehicle only once it has a contract for it
    assert client.get(f"/v1/lookupvehicle/{pcid}", headers=h["emsp2"]).json()["provisioning_certificates"] == []
    until = (utcnow() + timedelta(days=30)).isoformat()
    assert client.post("/v1/contracts", json={"emaid": f"{prov['emsp2'].replace('-', '')}{_a(9)}", "pcid": pcid, "valid_until": until},
                       headers=h["emsp2"]).status_code == 201
    assert len(client.get(f"/v1/lookupvehicle/{pcid}", headers=h["emsp2"]).json()["provisioning_certificates"]) == 1
    # a certificate not from our OEM CAs is refused
    r = client.post("/v1/enrollments", json={"csr": csr_pem("DE*ABC*E1", dc="CPO").decode(), "profile": "secc"},
                    headers={"Authorization": h["oem"]["Authorization"]})
    assert r.status_code == 403


def test_one_query_installation_lookup_agrees_with_the_separate_ones(env: dict) -> None:  # type: ignore[type-arg]
    """provisioning_status_and_contract (the installation's single lookup) gives what chain_status and
    default_contract_for give separately, in every state a vehicle can be in."""
    from pki.contracts import chain_status, default_contract_for, provisioning_status_and_contract

    client, ctx, prov, h = env["client"], env["ctx"], env["prov"], env["h"]
    pcid = prov["oem"] + _a(14)
    r = client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM").decode(), "profile": "oem-prov"},
                    headers=h["oem"])
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificates(r.json()["chain"].encode())[0]
    issuer = r.json()["issuer"]

    def both() -> tuple[str, object, object]:
        status, row, contract = provisioning_status_and_contract(ctx, cert, pcid)
        assert (status, row) == chain_status(ctx, cert, "oem")
        return status, row, contract

    # no contract yet
    status, row, contract = both()
    assert status == "Accepted" and row is not None and contract is None
    assert default_contract_for(ctx, pcid) is None
    # one contract, then a second one made the default: the default is the one returned
    until = (utcnow() + timedelta(days=30)).isoformat()
    first, second = (f"{prov['emsp1'].replace('-', '')}{_a(9)}" for _ in range(2))
    for emaid in (first, second):
        assert client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, "valid_until": until},
                           headers=h["emsp1"]).status_code == 201
    status, _, contract = both()
    assert status == "Accepted" and contract == default_contract_for(ctx, pcid)
    assert contract is not None and contract.emaid == second and contract.is_default
    # a terminated default: the other contract is what remains
    assert client.post(f"/v1/contracts/{second}/terminate", headers=h["emsp1"]).status_code == 200
    assert both()[2] == default_contract_for(ctx, pcid) and default_contract_for(ctx, pcid).emaid == first  # type: ignore[union-attr]
    # not a PCID: no contract can match, the status is still given
    assert provisioning_status_and_contract(ctx, cert, "not a pcid")[::2] == ("Accepted", None)
    # a certificate of another hierarchy, and one we never issued
    r = client.post("/v1/enrollments", json={"csr": csr_pem(f"{prov['emsp1']}-{_a(9)}", dc="MO").decode(),
                                              "profile": "contract"}, headers=h["emsp1"])
    mo_cert = x509.load_pem_x509_certificates(r.json()["chain"].encode())[0]
    assert provisioning_status_and_contract(ctx, mo_cert, pcid) == ("CertChainError", None, None)
    # revoked: the contract is not handed out
    ctx.engine.revoke(format(cert.serial_number, "x"), "keyCompromise", issuer=issuer)
    status, row, contract = both()
    assert status == "CertificateRevoked" and row is not None and row.status == "revoked" and contract is None


def test_issuer_of_a_certificate_is_remembered_only_for_the_same_certificate_and_ca(
        env: dict, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    """find_our_issuer keeps which CA verified a certificate's signature: the second lookup verifies
    nothing, a certificate with one bit of its signature changed is still verified (and refused), and an
    entry naming a CA handle the engine no longer has is verified again."""
    from pki import contracts

    client, ctx, prov, h = env["client"], env["ctx"], env["prov"], env["h"]
    r = client.post("/v1/enrollments", json={"csr": csr_pem(prov["oem"] + _a(14), dc="OEM").decode(),
                                              "profile": "oem-prov"}, headers=h["oem"])
    cert = x509.load_pem_x509_certificates(r.json()["chain"].encode())[0]
    calls: list[int] = []
    real = contracts.verify_issued_by

    def counting(c: x509.Certificate, i: x509.Certificate) -> bool:
        calls.append(1)
        return real(c, i)

    monkeypatch.setattr(contracts, "verify_issued_by", counting)
    first = contracts.find_our_issuer(ctx, cert)
    assert first is not None and first.name == r.json()["issuer"] and calls
    calls.clear()
    assert contracts.find_our_issuer(ctx, cert) is first and not calls
    # the same certificate with its signature's last octet changed: a different DER, verified, refused
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    forged = x509.load_der_x509_certificate(bytes(der))
    assert contracts.find_our_issuer(ctx, forged) is None and calls
    # a remembered handle that is not the engine's any more (CA re-keyed or reloaded): verified again
    from dataclasses import replace

    der_key = cert.public_bytes(serialization.Encoding.DER)
    contracts._ISSUER_OF[der_key] = replace(contracts._ISSUER_OF[der_key])
    calls.clear()
    assert contracts.find_our_issuer(ctx, cert) is not None and calls
