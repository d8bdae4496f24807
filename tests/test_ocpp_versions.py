"""Every OCPP version a CPO runs (issue #24): each /ocpp/* answer is exactly the message of its version that
a CSMS forwards to the station, checked against the official JSON schemas (PyPI `ocpp`, tests/ocpp_schemas.py)
— success and rejection; OCPP 2.1 (V2G20Certificate, requestId, hashRootCertificate, its limits,
GetCertificateChainStatus); OCPP 1.6 Plug & Charge over DataTransfer (the OCA whitepaper's vendorId and the
Has2Be `iso15118` variant); bad input (wrong version, oversize fields, bad JSON in `data`) refused with an
OCPP-shaped answer and nothing stored; cross-tenant requests refused."""

from __future__ import annotations

import base64
import http.server
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from sqlmodel import func, select

from api.app import create_app
from pki.context import Context
from pki.cps.exi import CertificateInstallationReq, MessageHeader, V2GMessage, encode_message
from pki.cps.exi.messages import X509IssuerSerial
from pki.cps.xmldsig import sign_elements
from pki.crl import generate_crl
from pki.orgs import create_api_key
from pki.roots import root_hash_data
from pki.store.db import utcnow
from pki.store.models import Certificate
from tests import ocpp_schemas
from tests.conftest import csr_pem, org_with_fresh_prefix

ISO2 = "urn:iso:15118:2:2013:MsgDef"
PNC = "org.openchargealliance.iso15118pnc"


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@dataclass
class W:
    client: TestClient
    ctx: Context
    h: dict[str, dict[str, str]]
    prefix: dict[str, str]
    org: dict[str, str]

    def post(self, path: str, body: Any, who: str = "cpo") -> Any:  # noqa: ANN401 - httpx.Response
        return self.client.post(path, json=body, headers=self.h[who])

    def evseid(self, who: str = "cpo") -> str:
        return f"{self.prefix[who]}*E{_a(6)}"

    def secc_csr(self, key: Any = None, who: str = "cpo") -> str:  # noqa: ANN401 - a private key
        return csr_pem(self.evseid(who), o=self.org[who], dc="CPO", key=key).decode()


@pytest.fixture(scope="module")
def w(ctx: Context) -> Iterator[W]:
    tag = secrets.token_hex(3)
    h, org, prefix = {}, {}, {}
    for who, role in (("cpo", "cpo"), ("cpo2", "cpo"), ("emsp", "emsp"), ("oem", "oem")):
        org[who] = f"ver-{who}-{tag}"
        prefix[who] = org_with_fresh_prefix(ctx, org[who], role)
    for who in ("cpo", "cpo2", "emsp", "oem"):
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, org[who])[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield W(client, ctx, h, prefix, org)


def certs(ctx: Context) -> int:
    with ctx.db.session() as s:
        return int(s.exec(select(func.count()).select_from(Certificate)).one())


def chain_of(body: dict[str, Any]) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(body["certificateChain"].encode())


# -- OCPP 2.0.1: every answer validates ----------------------------------------------------------------------


def test_v201_sign_certificate_answers_are_exactly_ocpp(w: W) -> None:
    r = w.post("/ocpp/v201/sign-certificate", {"csr": w.secc_csr(), "certificateType": "V2GCertificate"})
    assert r.status_code == 200, r.text
    body = ocpp_schemas.check("2.0.1", "CertificateSignedRequest", r.json())
    assert set(body) == {"certificateChain", "certificateType", "customData"}  # no extra top-level field
    assert body["customData"]["vendorId"] == "org.v2gpki"
    assert body["customData"]["serialNumber"] == r.headers["X-V2GPKI-Serial"]
    assert format(chain_of(body)[0].serial_number, "X") == r.headers["X-V2GPKI-Serial"].lstrip("0")
    # rejections: bad CSR, another CPO's EVSEID (403), a 2.1 field (wrong version), an oversize csr
    n = certs(w.ctx)
    for body_in, status in (({"csr": "garbage"}, 400),
                            ({"csr": w.secc_csr(who="cpo2"), "certificateType": "V2GCertificate"}, 403),
                            ({"csr": w.secc_csr(), "certificateType": "V2GCertificate", "requestId": 7}, 400),
                            ({"csr": w.secc_csr(), "certificateType": "V2G20Certificate"}, 400),
                            ({"csr": "A" * 5501}, 400)):
        r = w.post("/ocpp/v201/sign-certificate", body_in)
        assert r.status_code == status, (body_in, r.text)
        assert ocpp_schemas.check("2.0.1", "SignCertificateResponse", r.json())["status"] == "Rejected"
    assert certs(w.ctx) == n  # nothing issued for a refused request


def test_v201_status_and_authorize_answers_are_exactly_ocpp(w: W) -> None:
    leaf = w.ctx.engine.issue_from_csr("secc", w.secc_csr(), tenant=w.org["cpo"])
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, leaf.chain[0], hashes.SHA256()).build()
    data = {"hashAlgorithm": "SHA256", "issuerNameHash": req.issuer_name_hash.hex(),
            "issuerKeyHash": req.issuer_key_hash.hex(), "serialNumber": format(leaf.cert.serial_number, "x"),
            "responderURL": "http://127.0.0.1:9/ocsp"}
    r = w.post("/ocpp/v201/get-certificate-status", {"ocspRequestData": data})
    assert ocpp_schemas.check("2.0.1", "GetCertificateStatusResponse", r.json())["status"] == "Accepted"
    r = w.post("/ocpp/v201/get-certificate-status", {"ocspRequestData": {**data, "issuerNameHash": "zz"}})
    assert r.status_code == 400 and ocpp_schemas.check("2.0.1", "GetCertificateStatusResponse", r.json())
    r = w.post("/ocpp/v201/authorize", {"idToken": {"idToken": f"DE{_a(12)}", "type": "eMAID"}})
    assert ocpp_schemas.check("2.0.1", "AuthorizeResponse", r.json())["idTokenInfo"]["status"] in ("Unknown",
                                                                                                     "Invalid")
    r = w.post("/ocpp/v201/authorize", {"idToken": {"idToken": "x" * 37, "type": "eMAID"}})
    assert r.status_code == 400 and ocpp_schemas.check("2.0.1", "AuthorizeResponse", r.json())


# -- OCPP 2.1 -------------------------------------------------------------------------------------------------


def test_v21_sign_certificate_types_and_request_id(w: W) -> None:
    r = w.post("/ocpp/v21/sign-certificate", {"csr": w.secc_csr(), "certificateType": "V2GCertificate",
                                              "requestId": 4711})
    body = ocpp_schemas.check("2.1", "CertificateSignedRequest", r.json())
    assert body["requestId"] == 4711 and body["certificateType"] == "V2GCertificate"
    for key, root in ((ec.generate_private_key(ec.SECP521R1()), "v2g-root-20"),
                      (ed448.Ed448PrivateKey.generate(), "v2g-root-20-ed448")):
        r = w.post("/ocpp/v21/sign-certificate", {"csr": w.secc_csr(key), "certificateType": "V2G20Certificate",
                                                  "requestId": 1})
        assert r.status_code == 200, r.text
        body = ocpp_schemas.check("2.1", "CertificateSignedRequest", r.json())
        leaf, *subs = chain_of(body)
        assert body["certificateType"] == "V2G20Certificate"
        assert subs[-1].issuer == w.ctx.engine.ca(root).cert.subject  # under the -20 root of that algorithm
    n = certs(w.ctx)
    r = w.post("/ocpp/v21/sign-certificate", {"csr": w.secc_csr(), "certificateType": "V2G20Certificate"})
    assert r.status_code == 400, r.text  # a P-256 key is no ISO 15118-20 SECC key
    assert ocpp_schemas.check("2.1", "SignCertificateResponse", r.json())["statusInfo"]["reasonCode"] == "InvalidCSR"
    assert certs(w.ctx) == n


def test_v21_hash_root_certificate_selects_the_hierarchy(w: W) -> None:
    cases = [(None, "v2g-root"), (ec.generate_private_key(ec.SECP521R1()), "v2g-root-20"),
             (ed448.Ed448PrivateKey.generate(), "v2g-root-20-ed448"),
             (ec.generate_private_key(ec.SECP521R1()), "v2g-root-20-ed448")]  # P-521 key under the Ed448 root
    for key, root_name in cases:
        root = w.ctx.engine.ca(root_name).cert
        hd = root_hash_data(root, "SHA384")
        hash_root = {"hashAlgorithm": hd.hash_algorithm, "issuerNameHash": hd.issuer_name_hash,
                     "issuerKeyHash": base64.b64encode(bytes.fromhex(hd.issuer_key_hash)).decode(),  # base64 too
                     "serialNumber": hd.serial_number}
        ctype = "V2GCertificate" if key is None else "V2G20Certificate"
        r = w.post("/ocpp/v21/sign-certificate", {"csr": w.secc_csr(key), "certificateType": ctype,
                                                  "hashRootCertificate": hash_root})
        assert r.status_code == 200, (root_name, r.text)
        chain = chain_of(ocpp_schemas.check("2.1", "CertificateSignedRequest", r.json()))
        assert chain[-1].issuer == root.subject, root_name
        chain[-1].verify_directly_issued_by(root)
    # a root this PKI does not have: a clear rejection, nothing issued
    n = certs(w.ctx)
    unknown = {"hashAlgorithm": "SHA256", "issuerNameHash": secrets.token_hex(32),
               "issuerKeyHash": secrets.token_hex(32), "serialNumber": "1"}
    r = w.post("/ocpp/v21/sign-certificate", {"csr": w.secc_csr(), "certificateType": "V2GCertificate",
                                              "hashRootCertificate": unknown})
    assert r.status_code == 400
    assert ocpp_schemas.check("2.1", "SignCertificateResponse", r.json())["statusInfo"]["reasonCode"] == "UnknownRoot"
    # a root that exists but issues no SECC certificates (the MO root)
    mo = root_hash_data(w.ctx.engine.ca("mo-root").cert)
    r = w.post("/ocpp/v21/sign-certificate", {"csr": w.secc_csr(), "certificateType": "V2GCertificate",
                                              "hashRootCertificate": {
                                                  "hashAlgorithm": mo.hash_algorithm, "issuerNameHash": mo.issuer_name_hash,
                                                  "issuerKeyHash": mo.issuer_key_hash, "serialNumber": mo.serial_number}})
    assert r.status_code == 400 and "issues no" in r.json()["statusInfo"]["additionalInfo"]
    assert certs(w.ctx) == n


@dataclass
class Vehicle:
    pcid: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _vehicle_with_contract(w: W) -> Vehicle:
    pcid = w.prefix["oem"] + _a(14)
    key = ec.generate_private_key(ec.SECP256R1())
    r = w.post("/v1/enrollments", {"csr": csr_pem(pcid, dc="OEM", key=key).decode(), "profile": "oem-prov"}, "oem")
    assert r.status_code == 201, r.text
    r = w.post("/v1/contracts", {"emaid": w.prefix["emsp"].replace("-", "") + _a(9), "pcid": pcid,
                                 "valid_until": (utcnow() + timedelta(days=400)).isoformat()}, "emsp")
    assert r.status_code == 201, r.text
    return Vehicle(pcid, key, x509.load_pem_x509_certificate(r_cert(w, pcid)))


def r_cert(w: W, pcid: str) -> bytes:
    with w.ctx.db.session() as s:
        row = s.exec(select(Certificate).where(Certificate.identifier == pcid)).one()
    return x509.load_der_x509_certificate(row.der).public_bytes(serialization.Encoding.PEM)


def _install_exi(w: W, v: Vehicle) -> str:
    ids = tuple(X509IssuerSerial(w.ctx.engine.ca(n).cert.subject.rfc4514_string(), w.ctx.engine.ca(n).cert.serial_number)
                for n in ("v2g-root",))
    body = CertificateInstallationReq("id1", v.cert.public_bytes(serialization.Encoding.DER), ids)
    exi = encode_message(V2GMessage(MessageHeader(secrets.token_bytes(8), signature=sign_elements([body], v.key)),
                                    body))
    return base64.b64encode(exi).decode()


def test_v21_get_15118_ev_certificate(w: W) -> None:
    v = _vehicle_with_contract(w)
    req = {"iso15118SchemaVersion": ISO2, "action": "Install", "exiRequest": _install_exi(w, v)}
    r = w.post("/ocpp/v21/get-15118-ev-certificate", req)
    body = ocpp_schemas.check("2.1", "Get15118EVCertificateResponse", r.json())
    assert body["status"] == "Accepted" and body["remainingContracts"] == 0, body
    # 2.1 fields on an ISO 15118-2 request are accepted (they are for -20 sessions) …
    r = w.post("/ocpp/v21/get-15118-ev-certificate", {**req, "maximumContractCertificateChains": 2,
                                                      "prioritizedEMAIDs": ["DEABC123456789"]})
    assert ocpp_schemas.check("2.1", "Get15118EVCertificateResponse", r.json())["status"] == "Accepted"
    # … and refused as a wrong version on 2.0.1; an exiRequest over 2.0.1's 5600 but within 2.1's 11000
    n = certs(w.ctx)
    for path, body_in, version in (
            ("/ocpp/v201/get-15118-ev-certificate", {**req, "maximumContractCertificateChains": 2}, "2.0.1"),
            ("/ocpp/v201/get-15118-ev-certificate", {**req, "exiRequest": "A" * 6000}, "2.0.1"),
            ("/ocpp/v21/get-15118-ev-certificate", {**req, "exiRequest": "A" * 11001}, "2.1"),
            ("/ocpp/v21/get-15118-ev-certificate", {**req, "exiRequest": "A" * 6000}, "2.1"),  # not EXI
            ("/ocpp/v21/get-15118-ev-certificate",
             {**req, "iso15118SchemaVersion": "urn:iso:std:iso:15118:-20:CommonMessages"}, "2.1")):
        r = w.post(path, body_in)
        assert r.status_code == 400, (path, r.text)
        assert ocpp_schemas.check(version, "Get15118EVCertificateResponse", r.json())["status"] == "Failed"
    assert certs(w.ctx) == n
    # an eMSP or OEM key is no CSMS
    assert w.post("/ocpp/v21/get-15118-ev-certificate", req, "emsp").status_code == 403


def test_v21_status_and_authorize(w: W) -> None:
    leaf = w.ctx.engine.issue_from_csr("secc", w.secc_csr(), tenant=w.org["cpo"])
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf.cert, leaf.chain[0], hashes.SHA512()).build()
    data = {"hashAlgorithm": "SHA512", "issuerNameHash": req.issuer_name_hash.hex(),
            "issuerKeyHash": req.issuer_key_hash.hex(), "serialNumber": format(leaf.cert.serial_number, "x"),
            "responderURL": "http://127.0.0.1:9/ocsp"}
    r = w.post("/ocpp/v21/get-certificate-status", {"ocspRequestData": data})
    body = ocpp_schemas.check("2.1", "GetCertificateStatusResponse", r.json())
    assert ocsp.load_der_ocsp_response(base64.b64decode(body["ocspResult"])).certificate_status == \
        ocsp.OCSPCertStatus.GOOD
    r = w.post("/ocpp/v21/authorize", {"idToken": {"idToken": "X" * 100, "type": "eMAID"}})  # 2.1: ≤ 255
    assert ocpp_schemas.check("2.1", "AuthorizeResponse", r.json())["idTokenInfo"]["status"] == "Invalid"
    for who in ("emsp", "oem"):  # an oracle on contracts for nobody but the CSMS
        assert w.post("/ocpp/v21/authorize", {"idToken": {"idToken": "DEABC123456789", "type": "eMAID"}},
                      who).status_code == 403


class _Counter(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.send_response(500)
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *_: Any) -> None:
        return None


def _hash_data(cert: x509.Certificate, issuer: x509.Certificate) -> dict[str, str]:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    return {"hashAlgorithm": "SHA256", "issuerNameHash": req.issuer_name_hash.hex(),
            "issuerKeyHash": req.issuer_key_hash.hex(), "serialNumber": format(cert.serial_number, "x")}


def test_v21_get_certificate_chain_status(w: W) -> None:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/ocsp"
    try:
        leaf = w.ctx.engine.issue_from_csr("secc", w.secc_csr(), tenant=w.org["cpo"])
        sub2, sub1 = leaf.chain[0], leaf.chain[1]
        for ca in ("cpo-sub2", "cpo-sub1", "v2g-root"):
            generate_crl(w.ctx, ca)
        foreign_key = ec.generate_private_key(ec.SECP256R1())
        foreign = (x509.CertificateBuilder().subject_name(sub2.subject).issuer_name(sub2.subject)
                   .public_key(foreign_key.public_key()).serial_number(12345).not_valid_before(utcnow())
                   .not_valid_after(utcnow() + timedelta(days=1)).sign(foreign_key, hashes.SHA256()))

        def ask(source: str) -> list[dict[str, Any]]:
            reqs = [{"certificateHashData": hd, "source": source, "urls": [url]}
                    for hd in (_hash_data(leaf.cert, sub2), _hash_data(sub2, sub1), _hash_data(foreign, foreign))]
            r = w.post("/ocpp/v21/get-certificate-chain-status", {"certificateStatusRequests": reqs})
            assert r.status_code == 200, r.text
            return ocpp_schemas.check("2.1", "GetCertificateChainStatusResponse", r.json())["certificateStatus"]  # type: ignore[no-any-return]

        for source in ("OCSP", "CRL"):
            assert [e["status"] for e in ask(source)] == ["Good", "Good", "Unknown"], source
        w.ctx.engine.revoke(format(leaf.cert.serial_number, "x"), "keyCompromise", issuer=leaf.issuer)
        for source in ("OCSP", "CRL"):
            got = ask(source)
            assert [e["status"] for e in got] == ["Revoked", "Good", "Unknown"], source
            assert got[0]["certificateHashData"]["serialNumber"] == format(leaf.cert.serial_number, "x")
        assert _Counter.hits == 0  # the station-supplied URLs are never fetched
        # five requests: over 2.1's four, refused in the message's own shape
        hd = _hash_data(leaf.cert, sub2)
        r = w.post("/ocpp/v21/get-certificate-chain-status",
                   {"certificateStatusRequests": [{"certificateHashData": hd, "source": "OCSP", "urls": [url]}] * 5})
        assert r.status_code == 400
        ocpp_schemas.check("2.1", "GetCertificateChainStatusResponse", r.json())
        assert w.post("/ocpp/v21/get-certificate-chain-status",
                      {"certificateStatusRequests": [{"certificateHashData": hd, "source": "OCSP", "urls": [url]}]},
                      "emsp").status_code == 403
    finally:
        srv.shutdown()


# -- OCPP 1.6 Plug & Charge over DataTransfer ----------------------------------------------------------------


def dt(w: W, vendor: str, message: str | None, data: Any, who: str = "cpo") -> Any:  # noqa: ANN401
    req: dict[str, Any] = {"vendorId": vendor}
    if message is not None:
        req["messageId"] = message
    if data is not None:
        req["data"] = data if isinstance(data, str) else json.dumps(data)
    ocpp_schemas.check("1.6", "DataTransferRequest", req)  # what a 1.6 station sends
    return w.post("/ocpp/v16/data-transfer", req, who)


def conf_of(r: Any) -> tuple[dict[str, Any], Any]:  # noqa: ANN401
    out = r.json()
    assert set(out) == {"conf", "next"}
    conf = ocpp_schemas.check("1.6", "DataTransferResponse", out["conf"])
    for nxt in out["next"]:
        ocpp_schemas.check("1.6", "DataTransferRequest", nxt)
    return conf, json.loads(conf["data"]) if "data" in conf else None


def test_v16_sign_certificate_then_certificate_signed(w: W) -> None:
    r = dt(w, PNC, "SignCertificate", {"csr": w.secc_csr(), "certificateType": "V2GCertificate"})
    assert r.status_code == 200, r.text
    conf, inner = conf_of(r)
    assert conf["status"] == "Accepted" and ocpp_schemas.check("2.0.1", "SignCertificateResponse", inner) == \
        {"status": "Accepted"}
    (nxt,) = r.json()["next"]
    assert (nxt["vendorId"], nxt["messageId"]) == (PNC, "CertificateSigned")
    signed = ocpp_schemas.check("2.0.1", "CertificateSignedRequest", json.loads(nxt["data"]))
    assert len(chain_of(signed)) == 3
    # the Has2Be variant some CSMSs bridge: vendorId iso15118, typeOfCertificate
    r = dt(w, "iso15118", "SignCertificate", {"csr": w.secc_csr(), "typeOfCertificate": "V2GCertificate"})
    conf, inner = conf_of(r)
    assert conf["status"] == "Accepted" and inner == {"status": "Accepted"}
    data = json.loads(r.json()["next"][0]["data"])
    assert data["typeOfCertificate"] == "V2GCertificate" and len(chain_of(data)) == 3


def test_v16_other_messages(w: W) -> None:
    v = _vehicle_with_contract(w)
    exi = _install_exi(w, v)
    conf, inner = conf_of(dt(w, PNC, "Get15118EVCertificate",
                             {"iso15118SchemaVersion": ISO2, "action": "Install", "exiRequest": exi}))
    assert conf["status"] == "Accepted"
    assert ocpp_schemas.check("2.0.1", "Get15118EVCertificateResponse", inner)["status"] == "Accepted"
    # Has2Be: 15118SchemaVersion, no action — the EXI body says install
    conf, inner = conf_of(dt(w, "iso15118", "Get15118EVCertificate",
                             {"15118SchemaVersion": ISO2, "exiRequest": exi}))
    assert conf["status"] == "Accepted" and inner["status"] == "Accepted"
    leaf = w.ctx.engine.issue_from_csr("secc", w.secc_csr(), tenant=w.org["cpo"])
    conf, inner = conf_of(dt(w, PNC, "GetCertificateStatus",
                             {"ocspRequestData": {**_hash_data(leaf.cert, leaf.chain[0]), "responderURL": "x"}}))
    assert ocpp_schemas.check("2.0.1", "GetCertificateStatusResponse", inner)["status"] == "Accepted"
    conf, inner = conf_of(dt(w, PNC, "Authorize", {"idToken": {"idToken": "DEABC123456789", "type": "eMAID"}}))
    assert ocpp_schemas.check("2.0.1", "AuthorizeResponse", inner)["idTokenInfo"]["status"] in ("Unknown", "Invalid")
    conf, inner = conf_of(dt(w, "iso15118", "Authorize", {"idToken": {"idToken": "DEABC123456789", "type": "eMAID"},
                                                          "15118CertificateHashData": []}))
    assert conf["status"] in ("Accepted", "Rejected")


def test_v16_bad_input_is_an_ocpp_rejection_and_stores_nothing(w: W) -> None:
    n = certs(w.ctx)
    r = dt(w, "com.example.other", "SignCertificate", {"csr": w.secc_csr()})
    assert r.status_code == 400 and conf_of(r)[0] == {"status": "UnknownVendorId"}
    r = dt(w, PNC, "BootNotification", {})
    assert r.status_code == 400 and conf_of(r)[0] == {"status": "UnknownMessageId"}
    r = dt(w, PNC, None, None)
    assert conf_of(r)[0] == {"status": "UnknownMessageId"}
    for message, data in (("SignCertificate", "{not json"),  # a bad JSON string in data
                          ("SignCertificate", {"csr": w.secc_csr(), "certificateType": "V2G20Certificate"}),  # 2.1
                          ("SignCertificate", {"csr": w.secc_csr(), "requestId": 3}),  # a 2.1 field
                          ("SignCertificate", {"csr": "A" * 5501}),  # oversize
                          ("SignCertificate", {"csr": w.secc_csr(who="cpo2")}),  # cpo2's EVSEID, by cpo
                          ("Get15118EVCertificate", {"iso15118SchemaVersion": ISO2, "action": "Install",
                                                     "exiRequest": "A" * 5601}),
                          ("GetCertificateStatus", {"ocspRequestData": {"hashAlgorithm": "SHA256"}})):
        r = dt(w, PNC, message, data)
        assert 400 <= r.status_code < 500, (message, data, r.text)
        conf, inner = conf_of(r)
        assert conf["status"] == "Rejected" and r.json()["next"] == [], (message, r.text)
        name = {"SignCertificate": "SignCertificateResponse", "Get15118EVCertificate": "Get15118EVCertificateResponse",
                "GetCertificateStatus": "GetCertificateStatusResponse"}[message]
        ocpp_schemas.check("2.0.1", name, inner)
    assert certs(w.ctx) == n
    # the DataTransfer itself must be a 1.6 DataTransfer.req
    r = w.post("/ocpp/v16/data-transfer", {"vendorId": PNC, "messageId": "SignCertificate", "data": "{}", "extra": 1})
    assert r.status_code == 400 and r.json()["conf"] == {"status": "Rejected"}
    # only a CSMS (cpo, admin) forwards station messages
    assert dt(w, PNC, "SignCertificate", {"csr": w.secc_csr()}, "emsp").status_code == 403
