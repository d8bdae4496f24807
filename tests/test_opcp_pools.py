"""OPCP 1.0 pools and CPS (#25): the contract certificate pool as MaEVe and CitrineOS call it, with the
answer checked by the independent ISO 15118 vehicle (Josev), the provisioning certificate pool, the CPS
for eMSPs, tenancy and bad input. Schemathesis against the published documents: tests/test_opnc.py.

The clients' requests are replayed as their code writes them (read from their repositories):
- MaEVe, manager/services/contract_certificate_provider.go: POST {url}/v1/ccp/signedContractData, body
  json.Marshal of {certificateInstallationReq, xsdMsgDefNamespace: "urn:iso:15118:2:2013:MsgDef"} (Go's compact
  encoding, struct field order), headers x-api-key: T, authorization: Bearer T, content-type:
  application/json; any status but 200 is Failed; reads CCPResponse.emaidContent[0].messageDef.{emaid,
  certificateInstallationRes} and fails on an empty emaid.
- CitrineOS, 02_Util/src/certificate/client/hubject.ts getSignedContractData: the same URL, headers Accept and
  Content-Type application/json, Authorization; body JSON.stringify({certificateInstallationReq,
  xsdMsgDefNamespace}) with the station's iso15118SchemaVersion; on a non-200 it parses `errorMessages`
  out of the body; on 200 it takes the last emaidContent entry with a certificateInstallationRes.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlmodel import col, select

from api.app import create_app
from pki.context import Context
from pki.cps.exi import CertificateInstallationRes, decode_message
from pki.cps.keywrap import wrap_contract_key
from pki.cps.xmldsig import verify_response
from pki.orgs import create_api_key
from pki.store.db import utcnow
from pki.store.models import Contract, SignedContractData
from tests.conftest import org_with_fresh_prefix
from tests.test_cps_josev import Env, Peer, assert_accepted_by_josev, check, josev, new_vehicle  # noqa: F401

ISO2 = "urn:iso:15118:2:2013:MsgDef"


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@dataclass
class World:
    env: Env  # emsp, oem, cpo (tests/test_cps_josev.py's shape)
    keys: dict[str, str]
    prefixes: dict[str, str]

    @property
    def client(self) -> TestClient:
        return self.env.client

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def emaid(self, who: str = "emsp") -> str:
        return self.prefixes[who].replace("-", "") + _a(9)


@pytest.fixture(scope="module")
def world(ctx: Context) -> Iterator[World]:
    tag = secrets.token_hex(3)
    keys, prefixes = {}, {}
    for who, role in (("emsp", "emsp"), ("emsp2", "emsp"), ("oem", "oem"), ("oem2", "oem"), ("cpo", "cpo")):
        name = f"opcp-{who}-{tag}"
        prefixes[who] = org_with_fresh_prefix(ctx, name, role, settings={"organization_name": name})
        keys[who] = create_api_key(ctx.db, name)[0]
    with TestClient(create_app(ctx)) as client:
        env = Env(client, ctx, {w: {"Authorization": f"Bearer {k}"} for w, k in keys.items()},
                  {"emsp": prefixes["emsp"].replace("-", ""), "oem": prefixes["oem"]})
        yield World(env, keys, prefixes)


def contract(w: World, pcid: str, who: str = "emsp", **kw: Any) -> str:
    emaid = w.emaid(who)
    r = w.client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, **kw,
                                             "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                      headers=w.h(who))
    assert r.status_code == 201, r.text
    return emaid


def maeve_call(w: World, exi: str, token: str) -> tuple[int, dict[str, Any] | None, str | None]:
    """MaEVe's OpcpContractCertificateProvider.ProvideCertificate: (status, response, exiResponse)."""
    body = json.dumps({"certificateInstallationReq": exi, "xsdMsgDefNamespace": ISO2}, separators=(",", ":"))
    r = w.client.post("/v1/ccp/signedContractData", content=body.encode(),
                      headers={"x-api-key": token, "authorization": f"Bearer {token}",
                               "content-type": "application/json"})
    if r.status_code != 200:
        return r.status_code, None, None  # Iso15118EVCertificateStatusEnumTypeFailed
    out = r.json()
    contents = out["CCPResponse"]["emaidContent"]
    assert contents, "empty emaidContent array"
    assert contents[0]["messageDef"]["emaid"], "no emaid found"
    return 200, out, contents[0]["messageDef"]["certificateInstallationRes"]


def citrineos_call(w: World, exi: str, token: str, schema_version: str = ISO2) -> tuple[int, str | list[str]]:
    """CitrineOS Hubject.getSignedContractData: the exiResponse, or the error messages it would throw."""
    r = w.client.post("/v1/ccp/signedContractData",
                      content=json.dumps({"certificateInstallationReq": exi, "xsdMsgDefNamespace": schema_version},
                                         separators=(",", ":")).encode(),
                      headers={"Accept": "application/json", "Authorization": f"Bearer {token}",
                               "Content-Type": "application/json"})
    if r.status_code != 200:
        text = r.text
        return r.status_code, (json.loads(text)["errorMessages"] if "errorMessages" in text
                               else "Failed to get signed contract data")
    found = None
    for item in r.json()["CCPResponse"].get("emaidContent") or []:
        if item.get("messageDef", {}).get("certificateInstallationRes"):
            found = item["messageDef"]["certificateInstallationRes"]
    assert found, "Failed to find CertificateInstallationRes in response."
    return 200, found


def test_maeve_gets_contract_the_vehicle_accepts(josev: Peer, world: World, tmp_path: Path) -> None:  # noqa: F811
    v = new_vehicle(world.env, tmp_path / "v")
    emaid = contract(world, v.pcid)
    sid = secrets.token_bytes(8).hex()
    req = josev("install-request", session_id=sid, **v.files)
    status, out, exi = maeve_call(world, req["exi"], world.keys["cpo"])
    assert status == 200 and out is not None and exi is not None
    assert out["CCPResponse"]["emaidContent"][0]["messageDef"]["emaid"] == emaid
    verdict = check(josev, exi, "install", sid, v.dir / "oem.pem", v.dir)
    assert_accepted_by_josev(verdict, sid)
    assert verdict["emaid"] == emaid


def test_citrineos_gets_contract_and_reads_failures(josev: Peer, world: World, tmp_path: Path) -> None:  # noqa: F811
    v = new_vehicle(world.env, tmp_path / "v")
    sid = secrets.token_bytes(8).hex()
    req = josev("install-request", session_id=sid, **v.files)
    # no contract yet: not 200, errorMessages for CitrineOS; the ISO-compliant 404 carries the FAILED_* answer
    status, msgs = citrineos_call(world, req["exi"], world.keys["cpo"])
    assert status == 404 and isinstance(msgs, list) and msgs[0] == "FAILED_NoCertificateAvailable", msgs
    r = world.client.post("/v1/ccp/signedContractData", headers=world.h("cpo"),
                          json={"certificateInstallationReq": req["exi"], "xsdMsgDefNamespace": ISO2})
    failed = r.json()["CCPResponse"]["emaidContent"][0]["messageDef"]["certificateInstallationRes"]
    assert josev("decode", exi=failed) == {"body": "CertificateInstallationRes", "session_id": sid,
                                           "response_code": "FAILED_NoCertificateAvailable"}
    r = world.client.post("/v1/ccp/signedContractData", headers={**world.h("cpo"), "alwaysReturnEXI": "false"},
                          json={"certificateInstallationReq": req["exi"], "xsdMsgDefNamespace": ISO2})
    # without alwaysReturnEXI no EXI, but CCPResponse all the same: ccp.v1.json's 404 schema requires it
    assert r.status_code == 404 and r.json()["errorMessages"] == ["FAILED_NoCertificateAvailable",
                                                                  f"no active contract for PCID {v.pcid}"]
    assert r.json()["CCPResponse"] == {"emaidContent": [{"messageDef": {"certificateInstallationRes": ""}}]}

    emaid = contract(world, v.pcid)
    status, exi = citrineos_call(world, req["exi"], world.keys["cpo"])
    assert status == 200 and isinstance(exi, str)
    assert_accepted_by_josev(check(josev, exi, "install", sid, v.dir / "oem.pem", v.dir), sid)
    # the station's iso15118SchemaVersion is passed through: -20 is refused in the document's error shape
    status, msgs = citrineos_call(world, req["exi"], world.keys["cpo"], "urn:iso:std:iso:15118:-20:CommonMessages")
    assert status == 400 and "15118-20" in msgs[0]
    assert emaid


def test_ccp_bad_input_and_roles(world: World) -> None:
    c = world.client
    for body in ({"certificateInstallationReq": "not base64!", "xsdMsgDefNamespace": ISO2},
                 {"certificateInstallationReq": base64.b64encode(b"\x80\x98junk").decode(), "xsdMsgDefNamespace": ISO2},
                 {"certificateInstallationReq": "AAAA"}, {}):
        r = c.post("/v1/ccp/signedContractData", json=body, headers=world.h("cpo"))
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json" and r.json()["errorMessages"], r.text
        assert len(r.json()["traceId"]) == 36
    r = c.post("/v1/ccp/signedContractData", json={"certificateInstallationReq": "AAAA", "xsdMsgDefNamespace": ISO2},
               headers=world.h("oem"))
    assert r.status_code == 403 and r.json()["errorMessages"]
    r = c.post("/v1/ccp/signedContractData", json={"certificateInstallationReq": "AAAA", "xsdMsgDefNamespace": ISO2})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    # a CPO reads no contracts (no oracle on the eMSPs' customers)
    assert c.get(f"/v1/ccp/lookupContract/{world.emaid()}", headers=world.h("cpo")).status_code == 403


def own_pki_contract(emaid: str, vehicle: x509.Certificate, d: Path) -> dict[str, str]:
    """An eMSP with its own PKI: a root, a sub-CA and a contract certificate made here in software, the
    contract key wrapped for the vehicle with the service's key wrap (ISO 15118-2 [V2G2-818..820])."""
    def name(cn: str, dc: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(x509.NameOID.COMMON_NAME, cn), x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Own eMSP"),
                 x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "DE")]
        if dc:
            attrs.append(x509.NameAttribute(x509.NameOID.DOMAIN_COMPONENT, dc))
        return x509.Name(attrs)

    def cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, ikey: ec.EllipticCurvePrivateKey,
             ca: bool, path: int | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(utcnow() - timedelta(hours=1))
             .not_valid_after(utcnow() + timedelta(days=300))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=path), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()), critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        return b.sign(ikey, hashes.SHA256())

    rk, s1k, sk, ck = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = cert(name("Own MO Root"), rk, name("Own MO Root"), rk, True)
    sub1 = cert(name("Own MO Sub 1"), s1k, root.subject, rk, True, 1)
    sub = cert(name("Own MO Sub 2"), sk, sub1.subject, s1k, True, 0)
    leaf = cert(name(emaid, "MO"), ck, sub.subject, sk, False)
    (d / "own-mo-root.der").write_bytes(root.public_bytes(serialization.Encoding.DER))
    wrapped = wrap_contract_key(ck, vehicle)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return {"leaf": b64(leaf.public_bytes(serialization.Encoding.DER)),
            "sub": b64(sub.public_bytes(serialization.Encoding.DER)),
            "sub1": b64(sub1.public_bytes(serialization.Encoding.DER)),
            "key": b64(wrapped.encrypted_private_key), "dh": b64(wrapped.dh_public_key)}


def test_pools_and_cps_for_emsps(josev: Peer, world: World, ctx: Context, tmp_path: Path) -> None:  # noqa: F811
    c = world.client
    v = new_vehicle(world.env, tmp_path / "v")
    der = base64.b64encode(v.cert.public_bytes(serialization.Encoding.DER)).decode()
    subs = [base64.b64encode(x.public_bytes(serialization.Encoding.DER)).decode()
            for x in ctx.engine.chain("oem-sub2")[:2]]

    # PCP: the OEM publishes, the other OEM sees nothing, an eMSP with a contract may look the vehicle up
    r = c.put("/v1/oem/provCerts", json={"subCA1Certificate": subs[1], "subCA2Certificate": subs[0],
                                         "vehicleCertificate": der}, headers=world.h("oem"))
    assert r.status_code == 200, r.text
    assert r.json()["vehicleCertificate"] == der and r.json()["rootIssuerSerialNumber"]
    bad = c.put("/v1/oem/provCerts", json={"subCA1Certificate": der, "vehicleCertificate": der}, headers=world.h("oem"))
    assert bad.status_code == 400 and bad.json()["errorMessages"]
    assert c.put("/v1/oem/provCerts", json={"subCA1Certificate": subs[1], "vehicleCertificate": der},
                 headers=world.h("oem2")).status_code == 403  # another OEM's WMI
    assert c.get(f"/v1/oem/provCerts/lookupVehicle/{v.pcid}", headers=world.h("oem")).status_code == 200
    assert c.get(f"/v1/oem/provCerts/{v.pcid}", headers=world.h("oem")).json()["OEMMessage"]["vehicleCertificate"] == der
    for who in ("oem2", "emsp"):
        assert c.get(f"/v1/oem/provCerts/lookupVehicle/{v.pcid}", headers=world.h(who)).status_code == 404
        assert c.get(f"/v1/oem/provCerts/{v.pcid}", headers=world.h(who)).status_code == 404

    # CPS generate: the contract is registered and its data signed ahead of time for the pool certificate
    emaid = world.emaid()
    gen = {"contractBegins": utcnow().isoformat(), "contractEnds": (utcnow() + timedelta(days=200)).isoformat(),
           "emaid": emaid, "pcid": v.pcid, "xsdMsgDefNamespace": ISO2}
    r = c.put("/v1/cps/generate/signedContractData", json=gen, headers=world.h("emsp"))
    assert r.status_code == 201, r.text
    assert c.get(f"/v1/oem/provCerts/lookupVehicle/{v.pcid}", headers=world.h("emsp")).status_code == 200
    # another eMSP: the EMAID is outside its provider ID; nothing stored
    assert c.put("/v1/cps/generate/signedContractData", json={**gen, "emaid": emaid[:-1] + "Z"},
                 headers=world.h("emsp2")).status_code == 403

    # provideSignedContractData for the OEM backend, under its SessionID: the vehicle accepts it
    sid = secrets.token_bytes(4).hex()
    r = c.get(f"/v1/ccp/provideSignedContractData/{emaid}/{v.pcid}", params={"sessionID": sid},
              headers=world.h("oem"))
    assert r.status_code == 200, r.text
    assert_accepted_by_josev(check(josev, r.json()["certificateInstallationRes"], "install", sid,
                                   v.dir / "oem.pem", v.dir), sid)
    with ctx.db.session() as s:
        n_data = len(list(s.exec(select(SignedContractData).where(SignedContractData.emaid == emaid))))
    again = c.get(f"/v1/ccp/provideSignedContractData/{emaid}/{v.pcid}", headers=world.h("oem"))
    assert again.status_code == 200
    with ctx.db.session() as s:  # the prepared data is reused, not a certificate per call
        assert len(list(s.exec(select(SignedContractData).where(SignedContractData.emaid == emaid)))) == n_data
    for who in ("oem2", "emsp2"):
        assert c.get(f"/v1/ccp/provideSignedContractData/{emaid}/{v.pcid}", headers=world.h(who)).status_code == 404
    assert c.get(f"/v1/ccp/provideSignedContractData/{emaid}/{v.pcid}", params={"sessionID": "xyz"},
                 headers=world.h("oem")).status_code == 400

    # lookups: the eMSP and the vehicle's OEM see the contract, other tenants do not
    for who in ("emsp", "oem"):
        r = c.get(f"/v1/ccp/lookupContract/{emaid}", headers=world.h(who))
        assert r.status_code == 200, r.text
        item = r.json()["XMLContracts"][0]
        assert item["pcid"] == v.pcid and item["emaid"] == emaid and item["defaultContract"] is True
        # the certificate itself only when its base64 fits the document's maxLength (800 characters)
        assert item["certValidTo"].endswith("Z") and len(item.get("contractCertificate", "")) <= 800
        assert [i["emaid"] for i in c.get(f"/v1/ccp/signedContractData/{v.pcid}", headers=world.h(who))
                .json()["XMLContracts"]] == [emaid]
    for who in ("emsp2", "oem2"):
        assert c.get(f"/v1/ccp/lookupContract/{emaid}", headers=world.h(who)).status_code == 404
        assert c.get(f"/v1/ccp/signedContractData/{v.pcid}", headers=world.h(who)).json() == {"XMLContracts": []}

    # default: a second contract of the eMSP, then the first made default again by the OEM
    second = contract(world, v.pcid, is_default=True)
    assert c.post(f"/v1/ccp/signedContractData/{v.pcid}/{emaid}/default", headers=world.h("oem")).status_code == 200
    with ctx.db.session() as s:
        rows = {k.emaid: k.is_default for k in s.exec(select(Contract).where(Contract.pcid == v.pcid))}
    assert rows == {emaid: True, second: False}
    assert c.post(f"/v1/ccp/signedContractData/{v.pcid}/{emaid}/default",
                  headers=world.h("emsp2")).status_code == 403

    # the CPS signs an own-PKI eMSP's contract data; stored for its contract; the vehicle accepts it
    own = own_pki_contract(second, v.cert, tmp_path)
    body: dict[str, Any] = {"xsdMsgDefNamespace": ISO2, "pcid": v.pcid, "emaid": second,
            "contractData": {"contractSignatureCertChain": {"contractSignatureCertChainCertificate": own["leaf"],
                                                            "contractSignatureCertChainSubCertificates": [own["sub"], own["sub1"]]},
                             "contractSignatureEncryptedPrivateKey": own["key"], "dHpublickey": own["dh"],
                             "emaid": second}}
    r = c.put("/v1/cps/signedContractData", json=body, headers=world.h("emsp"))
    assert r.status_code == 200, r.text
    signed = r.json()
    assert signed["emaid"] == second and signed["pcid"] == v.pcid and len(signed["cpsV2GRootCertificateFingerprint"]) == 36
    msg = decode_message(base64.b64decode(signed["signedData"]))
    assert isinstance(msg.body, CertificateInstallationRes)
    verify_response(msg, x509.load_der_x509_certificate(msg.body.sa_provisioning_certificate_chain.certificate))
    verdict = josev("check-response", exi=signed["signedData"], kind="install", session_id="00",
                    decrypt_key=str(v.dir / "oem.pem"), v2g_root=str(v.dir / "v2g-root.der"),
                    mo_root=str(tmp_path / "own-mo-root.der"))
    assert verdict["ok"] is True, json.dumps(verdict)
    # ... and uploaded into the pool (PUT /v1/ccp/signedContractData) by the eMSP, not by another one
    up = {"xsdMsgDefNamespace": ISO2, "emaid": second, "pcid": v.pcid, "signedContractDataXML": signed["signedData"]}
    assert c.put("/v1/ccp/signedContractData", json=up, headers=world.h("emsp2")).status_code == 404
    assert c.put("/v1/ccp/signedContractData", json=up, headers=world.h("emsp")).status_code == 201
    tampered = bytearray(base64.b64decode(signed["signedData"]))
    tampered[-3] ^= 1
    r = c.put("/v1/ccp/signedContractData", json={**up, "signedContractDataXML": base64.b64encode(tampered).decode()},
              headers=world.h("emsp"))
    assert r.status_code == 400 and r.json()["errorMessages"]
    # a chain that is not a chain, a key of the wrong size, another eMSP's EMAID: refused, nothing signed
    changes: list[dict[str, Any]] = [{"contractSignatureEncryptedPrivateKey": own["dh"]},
                                     {"contractSignatureCertChain": {"contractSignatureCertChainCertificate": own["leaf"],
                                                   "contractSignatureCertChainSubCertificates": [own["leaf"]]}}]
    for change in changes:
        r = c.put("/v1/cps/signedContractData", json={**body, "contractData": {**body["contractData"], **change}},
                  headers=world.h("emsp"))
        assert r.status_code == 400, r.text
    assert c.put("/v1/cps/signedContractData", json=body, headers=world.h("emsp2")).status_code == 403

    # CPS signers
    r = c.get("/cps/signer", headers=world.h("emsp"))
    assert r.status_code == 200 and r.json()["cpsCertificates"][0]["cpsSubCa1Certificate"]

    # delete: another eMSP 404; with X-Skip-Revocation the certificate stays valid; the data is gone
    assert c.delete(f"/v1/ccp/signedContractData/{emaid}", headers=world.h("emsp2")).status_code == 404
    r = c.delete(f"/v1/ccp/signedContractData/{second}", headers={**world.h("emsp"), "X-Skip-Revocation": "true"})
    assert r.status_code == 200, r.text
    r = c.delete(f"/v1/ccp/signedContractData/{emaid}", headers=world.h("emsp"))
    assert r.status_code == 200
    with ctx.db.session() as s:
        assert not list(s.exec(select(SignedContractData).where(col(SignedContractData.emaid).in_([emaid, second]))))
        assert {k.status for k in s.exec(select(Contract).where(Contract.pcid == v.pcid))} == {"terminated"}
    assert c.delete(f"/v1/ccp/signedContractData/{emaid}", headers=world.h("emsp")).status_code == 404
    assert c.get(f"/v1/ccp/lookupContract/{emaid}", headers=world.h("emsp")).status_code == 404

    # the OEM takes its vehicle out of the pool; another OEM cannot
    assert c.delete(f"/v1/oem/provCerts/{v.pcid}", headers=world.h("oem2")).status_code == 404
    assert c.delete(f"/v1/oem/provCerts/{v.pcid}", headers=world.h("oem")).status_code == 200
    assert c.get(f"/v1/oem/provCerts/lookupVehicle/{v.pcid}", headers=world.h("oem")).status_code == 404
