"""ISO 15118-2 contract certificate installation and update through OCPP Get15118EVCertificate.

The vehicle side is played with the codec's encoder and plain `cryptography`: the test signs a
CertificateInstallationReq with an OEM provisioning key, then decodes our exiResponse, verifies the CPS
signature and both chains (openssl), decrypts the contract key and checks it matches the certificate.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlmodel import select

from api.app import create_app
from pki.context import Context
from pki.cps.exi import (
    CertificateChain,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    CertificateUpdateRes,
    MessageHeader,
    Node,
    V2GMessage,
    decode_message,
    decode_message_tree,
    encode_message,
)
from pki.cps.exi.messages import X509IssuerSerial
from pki.cps.keywrap import unwrap_contract_key
from pki.cps.xmldsig import sign_elements, verify_response
from pki.issuance import pem
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from pki.store.models import Certificate
from tests import ocpp_schemas
from tests.conftest import csr_pem


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@dataclass
class Env:
    client: TestClient
    ctx: Context
    h: dict[str, dict[str, str]]
    prov: dict[str, str]


@pytest.fixture(scope="module")
def env(ctx: Context) -> Iterator[Env]:
    tag = secrets.token_hex(3)
    prov = {"emsp": f"DE{_a(3)}", "emsp2": f"DE{_a(3)}", "oem": _a(3)}
    h = {}
    for who, role, pre in (("emsp", "emsp", prov["emsp"]), ("emsp2", "emsp", prov["emsp2"]),
                           ("oem", "oem", prov["oem"]), ("cpo", "cpo", "DE*" + _a(3))):
        create_org(ctx.db, f"{who}-{tag}", role, [pre])
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, f'{who}-{tag}')[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield Env(client, ctx, h, prov)


@dataclass
class Vehicle:
    pcid: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_vehicle(env: Env) -> Vehicle:
    pcid = env.prov["oem"] + _a(14)
    key = ec.generate_private_key(ec.SECP256R1())
    r = env.client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM", key=key).decode(),
                                                 "profile": "oem-prov"}, headers=env.h["oem"])
    assert r.status_code == 201, r.text
    return Vehicle(pcid, key, x509.load_pem_x509_certificate(r.json()["certificate"].encode()))


def new_contract(env: Env, pcid: str, who: str = "emsp") -> str:
    emaid = env.prov[who] + _a(9)
    r = env.client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid,
                                               "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                        headers=env.h[who])
    assert r.status_code == 201, r.text
    return emaid


def roots(env: Env) -> tuple[X509IssuerSerial, ...]:
    out = []
    for name in ("v2g-root", "mo-root"):
        c = env.ctx.engine.ca(name).cert
        out.append(X509IssuerSerial(c.subject.rfc4514_string(), c.serial_number))
    return tuple(out)


def install_request(v: Vehicle, ids: tuple[X509IssuerSerial, ...], key: ec.EllipticCurvePrivateKey | None = None,
                    session: bytes = b"\x01\x02\x03\x04\x05\x06\x07\x08") -> bytes:
    body = CertificateInstallationReq("id1", v.cert.public_bytes(serialization.Encoding.DER), ids)
    sig = sign_elements([body], key or v.key)
    return encode_message(V2GMessage(MessageHeader(session, signature=sig), body))


def call(env: Env, exi: bytes, action: str = "Install") -> dict:  # type: ignore[type-arg]
    r = env.client.post("/ocpp/v201/get-15118-ev-certificate",
                        json={"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": action,
                              "exiRequest": base64.b64encode(exi).decode()}, headers=env.h["cpo"])
    assert r.status_code == 200, r.text
    body = ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", r.json())
    assert len(body["exiResponse"]) <= 7500
    return body  # type: ignore[no-any-return]


def openssl_verify(tmp: Path, leaf: bytes, subs: tuple[bytes, ...], root: x509.Certificate) -> None:
    (tmp / "root.pem").write_text(pem(root))
    (tmp / "subs.pem").write_text("".join(pem(x509.load_der_x509_certificate(c)) for c in subs))
    (tmp / "leaf.pem").write_text(pem(x509.load_der_x509_certificate(leaf)))
    res = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(tmp / "root.pem"), "-untrusted",
                          str(tmp / "subs.pem"), str(tmp / "leaf.pem")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_installation_end_to_end(env: Env, tmp_path: Path) -> None:
    v = new_vehicle(env)
    emaid = new_contract(env, v.pcid)
    sid = secrets.token_bytes(8)
    out = call(env, install_request(v, roots(env), session=sid))
    assert out["status"] == "Accepted", out
    msg = decode_message(base64.b64decode(out["exiResponse"]))
    assert msg.header.session_id == sid
    res = msg.body
    assert isinstance(res, CertificateInstallationRes) and res.response_code == "OK"
    assert res.emaid.value == emaid
    # the CPS signature over the four elements, by the CPS leaf whose chain goes to the V2G root
    cps = x509.load_der_x509_certificate(res.sa_provisioning_certificate_chain.certificate)
    verify_response(msg, cps)
    openssl_verify(tmp_path, res.sa_provisioning_certificate_chain.certificate,
                   res.sa_provisioning_certificate_chain.sub_certificates, env.ctx.engine.ca("v2g-root").cert)
    openssl_verify(tmp_path, res.contract_signature_cert_chain.certificate,
                   res.contract_signature_cert_chain.sub_certificates, env.ctx.engine.ca("mo-root").cert)
    contract_cert = x509.load_der_x509_certificate(res.contract_signature_cert_chain.certificate)
    assert contract_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == emaid
    assert len(res.contract_signature_encrypted_private_key.value) == 48 and len(res.dh_public_key.value) == 65
    # the vehicle decrypts the contract key and finds it matches the certificate [V2G2-823]
    key = unwrap_contract_key(res.contract_signature_encrypted_private_key.value, res.dh_public_key.value, v.key,
                              contract_cert)
    assert key.public_key().public_numbers() == contract_cert.public_key().public_numbers()  # type: ignore[union-attr]
    # the contract key is never stored: the certificate row carries no key reference
    with env.ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.serial == format(contract_cert.serial_number, "x"))).one()
    assert row.key_uri is None and row.tenant is not None and row.profile == "contract"

    # CertificateUpdate signed with the current contract key: a new certificate, key wrapped for the old one
    body = CertificateUpdateReq("id1", CertificateChain(res.contract_signature_cert_chain.certificate,
                                                        res.contract_signature_cert_chain.sub_certificates, "id2"),
                                emaid, roots(env))
    upd = encode_message(V2GMessage(MessageHeader(sid, signature=sign_elements([body], key)), body))
    out = call(env, upd, action="Update")
    assert out["status"] == "Accepted", out
    msg2 = decode_message(base64.b64decode(out["exiResponse"]))
    assert isinstance(msg2.body, CertificateUpdateRes)
    verify_response(msg2, cps)
    new_cert = x509.load_der_x509_certificate(msg2.body.contract_signature_cert_chain.certificate)
    assert new_cert.serial_number != contract_cert.serial_number
    unwrap_contract_key(msg2.body.contract_signature_encrypted_private_key.value, msg2.body.dh_public_key.value,
                        key, new_cert)


def _failed_code(out: dict) -> str:  # type: ignore[type-arg]
    assert out["status"] == "Failed", out
    msg = decode_message(base64.b64decode(out["exiResponse"]))  # a FAILED_* V2G_Message, always present
    assert msg.body is not None
    return str(msg.body.response_code)  # type: ignore[union-attr]


def test_negative_cases(env: Env) -> None:
    # PCID with no contract
    v = new_vehicle(env)
    assert _failed_code(call(env, install_request(v, roots(env)))) == "FAILED_NoCertificateAvailable"
    # bad request signature (signed with another key)
    new_contract(env, v.pcid)
    bad = install_request(v, roots(env), key=ec.generate_private_key(ec.SECP256R1()))
    assert _failed_code(call(env, bad)) == "FAILED_SignatureError"
    # revoked provisioning certificate
    env.ctx.engine.revoke(format(v.cert.serial_number, "x"), "keyCompromise", issuer="oem-sub2")
    assert _failed_code(call(env, install_request(v, roots(env)))) == "FAILED_CertificateRevoked"
    # expired provisioning certificate (per our records)
    v2 = new_vehicle(env)
    new_contract(env, v2.pcid)
    with env.ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.serial == format(v2.cert.serial_number, "x"))).one()
        row.not_after = utcnow() - timedelta(seconds=1)
        s.add(row)
        s.commit()
    assert _failed_code(call(env, install_request(v2, roots(env)))) == "FAILED_CertificateExpired"
    # unknown chain: a self-signed "provisioning" certificate
    k = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem(env.prov["oem"] + _a(14), dc="OEM", key=k))
    from cryptography.hazmat.primitives import hashes

    fake = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(csr.subject).public_key(k.public_key())
            .serial_number(7).not_valid_before(utcnow()).not_valid_after(utcnow() + timedelta(days=9))
            .sign(k, hashes.SHA256()))
    assert _failed_code(call(env, install_request(Vehicle("X", k, fake), roots(env)))) == "FAILED_CertChainError"
    # terminated contract: nothing to install any more
    v3 = new_vehicle(env)
    emaid = new_contract(env, v3.pcid)
    assert env.client.post(f"/v1/contracts/{emaid}/terminate", headers=env.h["emsp"]).status_code == 200
    assert _failed_code(call(env, install_request(v3, roots(env)))) == "FAILED_NoCertificateAvailable"
    # vehicle trusting none of our roots
    v4 = new_vehicle(env)
    new_contract(env, v4.pcid)
    assert _failed_code(call(env, install_request(v4, (X509IssuerSerial("CN=Other Root", 1),)))) == \
        "FAILED_NoCertificateAvailable"
    # garbage EXI: OCPP Failed (no V2G_Message to answer under), never a 500
    r = env.client.post("/ocpp/v201/get-15118-ev-certificate",
                        json={"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": "Install",
                              "exiRequest": base64.b64encode(b"\x80\xff\x00garbage").decode()}, headers=env.h["cpo"])
    assert r.status_code == 400 and r.json()["status"] == "Failed"
    ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", r.json())
    # over OCPP's exiRequest limit: the message's own Failed answer
    r = env.client.post("/ocpp/v201/get-15118-ev-certificate",
                        json={"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": "Install",
                              "exiRequest": "A" * 5601}, headers=env.h["cpo"])
    assert r.status_code == 400 and r.json()["status"] == "Failed"
    ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", r.json())


def test_contract_data_ahead_of_time_and_tenancy(env: Env) -> None:
    v = new_vehicle(env)
    r = env.client.post("/v1/provisioning-certificates", json={"certificate": pem(v.cert)}, headers=env.h["oem"])
    assert r.status_code == 201
    emaid = new_contract(env, v.pcid, "emsp")
    # another eMSP cannot prepare or see this vehicle's contract data
    assert env.client.post("/v1/contract-data", json={"pcid": v.pcid}, headers=env.h["emsp2"]).status_code == 404
    r = env.client.post("/v1/contract-data", json={"pcid": v.pcid}, headers=env.h["emsp"])
    assert r.status_code == 201, r.text
    data = r.json()
    assert data["emaid"] == emaid and len(base64.b64decode(data["dhPublicKey"])) == 65
    got = env.client.get(f"/v1/contract-data?pcid={v.pcid}", headers=env.h["emsp"]).json()
    assert len(got) == 1
    assert env.client.get(f"/v1/contract-data?pcid={v.pcid}", headers=env.h["emsp2"]).json() == []
    # the prepared message decodes and its signature verifies; the key decrypts for the vehicle
    msg = decode_message(base64.b64decode(data["exiResponse"]))
    cps = x509.load_der_x509_certificate(msg.body.sa_provisioning_certificate_chain.certificate)  # type: ignore[union-attr]
    verify_response(msg, cps)
    cert = x509.load_pem_x509_certificate(data["contractSignatureCertChain"][0].encode())
    unwrap_contract_key(base64.b64decode(data["contractSignatureEncryptedPrivateKey"]),
                        base64.b64decode(data["dhPublicKey"]), v.key, cert)


def _as_xml(node: Node) -> ET.Element:
    """The element tree as XML, for an XML Schema validator: bytes as xs:hexBinary for SessionID (the only
    hexBinary of the subset, sessionIDType) and xs:base64Binary elsewhere."""
    local, ns = node.qname
    e = ET.Element(f"{{{ns}}}{local}" if ns else local)
    for (a_local, a_ns), value in node.attributes.items():
        e.set(f"{{{a_ns}}}{a_local}" if a_ns else a_local, str(value))
    text = []
    for item in node.content:
        if isinstance(item, Node):
            e.append(_as_xml(item))
        elif isinstance(item, bytes):
            text.append(item.hex().upper() if local == "SessionID" else base64.b64encode(item).decode())
        else:
            text.append(str(item))
    if text:
        e.text = "".join(text)
    return e


def test_messages_are_valid_against_the_iso_xsds(env: Env) -> None:
    """Requests and responses, accepted and failed, as XML valid against V2G_CI_MsgDef.xsd (ISO 15118-2)
    with an independent validator (xmlschema): every facet and bound of the schema, e.g. certificates of
    at most 800 octets, at most 4 SubCertificates, eMAID of 14–15 characters, the Id attributes."""
    import xmlschema

    from .test_exi_codec import xsd_dir_or_skip

    xsd_dir = xsd_dir_or_skip()
    xsd = xmlschema.XMLSchema(str(xsd_dir / "V2G_CI_MsgDef.xsd"))

    def valid(exi: bytes) -> None:
        xsd.validate(ET.ElementTree(_as_xml(decode_message_tree(exi))))

    v = new_vehicle(env)
    emaid = new_contract(env, v.pcid)
    req = install_request(v, roots(env))
    valid(req)
    out = call(env, req)
    assert out["status"] == "Accepted", out
    valid(base64.b64decode(out["exiResponse"]))
    res = decode_message(base64.b64decode(out["exiResponse"])).body
    assert isinstance(res, CertificateInstallationRes)
    key = unwrap_contract_key(res.contract_signature_encrypted_private_key.value, res.dh_public_key.value, v.key,
                              x509.load_der_x509_certificate(res.contract_signature_cert_chain.certificate))
    body = CertificateUpdateReq("id1", CertificateChain(res.contract_signature_cert_chain.certificate,
                                                        res.contract_signature_cert_chain.sub_certificates, "id2"),
                                emaid, roots(env))
    upd = encode_message(V2GMessage(MessageHeader(b"\x01" * 8, signature=sign_elements([body], key)), body))
    valid(upd)
    out = call(env, upd, action="Update")
    assert out["status"] == "Accepted", out
    valid(base64.b64decode(out["exiResponse"]))
    # a FAILED_* answer is a schema-valid message too (no contract for this PCID)
    out = call(env, install_request(new_vehicle(env), roots(env)))
    assert _failed_code(out) == "FAILED_NoCertificateAvailable"
    valid(base64.b64decode(out["exiResponse"]))
    # and the validator is not blind: a 15-character eMAID limit broken by hand is refused
    tree = _as_xml(decode_message_tree(upd))
    emaid_el = tree.find(".//{urn:iso:15118:2:2013:MsgBody}eMAID")
    assert emaid_el is not None
    emaid_el.text = "X" * 16
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        xsd.validate(ET.ElementTree(tree))
