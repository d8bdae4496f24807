"""End-to-end API tests over HTTP (httpx via Starlette's TestClient) with SoftHSM2, on SQLite and
PostgreSQL: each role's flow, tenancy (cross-tenant read/revoke/enroll refused), credentials (expired,
revoked API keys; client certificates through a trusted proxy), OCPP sign-certificate and EST."""

from __future__ import annotations

import base64
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlmodel import func, select

from api.app import create_app
from pki.context import Context
from pki.orgs import create_api_key, create_org
from pki.store.models import ApiKey, Certificate, OutboxEvent
from tests import ocpp_schemas
from tests.conftest import csr_pem, org_with_fresh_prefix


@dataclass
class Tenants:
    client: TestClient
    ctx: Context
    tag: str
    keys: dict[str, str]
    ops: dict[str, str]  # operator / provider / WMI prefixes per tenant

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def o(self, who: str) -> str:
        """The organization's registered name: the O a CPO's SECC CSR must carry (#21 item 6)."""
        return f"{who}-{self.tag}"


def _alnum(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(n))


@pytest.fixture(scope="module")
def t(ctx: Context) -> Iterator[Tenants]:
    tag = secrets.token_hex(3)
    # prefixes are exclusive per role (#21 item 4): drawn among those no other test's tenant holds
    ops = {who: org_with_fresh_prefix(ctx, f"{who}-{tag}", who.rstrip("12"))
           for who in ("cpo1", "cpo2", "emsp", "oem")}
    keys = {}
    for who in ("admin", "auditor"):
        create_org(ctx.db, f"{who}-{tag}", who, [])
    for who in (*ops, "admin", "auditor"):
        keys[who] = create_api_key(ctx.db, f"{who}-{tag}")[0]
    with TestClient(create_app(ctx)) as client:
        yield Tenants(client, ctx, tag, keys, ops)


def evseid(op: str) -> str:
    return f"{op}*E{_alnum(6)}"


def count_certs(ctx: Context) -> int:
    with ctx.db.session() as s:
        return int(s.exec(select(func.count()).select_from(Certificate)).one())


def enroll(t: Tenants, who: str, profile: str, csr: bytes, **extra: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = t.client.post("/v1/enrollments", json={"csr": csr.decode(), "profile": profile, **extra}, headers=t.h(who))
    return r.status_code, r.json()


def test_cpo_enrolls_secc_and_sees_only_its_own(t: Tenants) -> None:
    code, body = enroll(t, "cpo1", "secc", csr_pem(evseid(t.ops["cpo1"]), o=t.o("cpo1"), dc="CPO"))
    assert code == 201, body
    chain = x509.load_pem_x509_certificates(body["chain"].encode())
    assert len(chain) == 3 and chain[-1].subject != chain[-1].issuer  # leaf, Sub-CA 2, Sub-CA 1: no root
    serial, issuer = body["serial"], body["issuer"]
    # owner reads it, in JSON, PEM and DER
    r = t.client.get(f"/v1/certificates/{issuer}/{serial}", headers=t.h("cpo1"))
    assert r.status_code == 200 and r.json()["status"] == "valid"
    r = t.client.get(f"/v1/certificates/{issuer}/{serial}?format=der", headers=t.h("cpo1"))
    assert x509.load_der_x509_certificate(r.content).serial_number == int(serial, 16)
    # another CPO: 404 on read and on revoke, and it is not in their list
    assert t.client.get(f"/v1/certificates/{issuer}/{serial}", headers=t.h("cpo2")).status_code == 404
    r = t.client.post(f"/v1/certificates/{issuer}/{serial}/revoke", json={"reason": "keyCompromise"},
                      headers=t.h("cpo2"))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    listed = t.client.get("/v1/certificates?profile=secc&limit=1000", headers=t.h("cpo2")).json()["items"]
    assert serial not in {c["serial"] for c in listed}
    # the admin sees it
    assert t.client.get(f"/v1/certificates/{issuer}/{serial}", headers=t.h("admin")).status_code == 200
    # auditors may read but not revoke
    r = t.client.post(f"/v1/certificates/{issuer}/{serial}/revoke", json={"reason": "keyCompromise"},
                      headers=t.h("auditor"))
    assert r.status_code == 403
    # the owner revokes; a second revocation is a conflict
    r = t.client.post(f"/v1/certificates/{issuer}/{serial}/revoke", json={"reason": "keyCompromise"},
                      headers=t.h("cpo1"))
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = t.client.post(f"/v1/certificates/{issuer}/{serial}/revoke", json={"reason": "keyCompromise"},
                      headers=t.h("cpo1"))
    assert r.status_code == 409


def test_enrolling_another_cpos_evseid_is_403_and_stores_nothing(t: Tenants) -> None:
    before = count_certs(t.ctx)
    code, body = enroll(t, "cpo1", "secc", csr_pem(evseid(t.ops["cpo2"]), dc="CPO"))
    assert code == 403, body
    assert body["type"].endswith("/forbidden")
    assert count_certs(t.ctx) == before


def test_role_may_not_use_other_profiles(t: Tenants) -> None:
    code, _ = enroll(t, "cpo1", "contract", csr_pem(f"{t.ops['emsp'].replace('-', '')}ABCDEFGH1", dc="MO"))
    assert code == 403
    code, _ = enroll(t, "emsp", "secc", csr_pem(evseid(t.ops["cpo1"]), dc="CPO"))
    assert code == 403


def test_real_charger_csr_gets_profile_not_csr_extensions(t: Tenants) -> None:
    """A CSR shaped like EVerest's libocpp: DC=CPO, non-critical KU and a SAN — the CA applies its profile."""
    key = ec.generate_private_key(ec.SECP256R1())
    ev = evseid(t.ops["cpo1"])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ev),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, t.o("cpo1")),
                                    x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                                    x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "CPO")]))
           .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=False)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
           .sign(key, hashes.SHA256()))
    # OCPP carries the CSR PEM; base64 DER is accepted too
    der_b64 = base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()
    r = t.client.post("/v1/enrollments", json={"csr": der_b64, "profile": "secc"}, headers=t.h("cpo1"))
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_agreement and not ku.value.key_encipherment
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert cert.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT)[0].value == "CPO"


def test_emsp_and_oem_flows(t: Tenants) -> None:
    emaid = f"{t.ops['emsp']}-{_alnum(9)}"
    code, body = enroll(t, "emsp", "contract", csr_pem(emaid, dc="MO"))
    assert code == 201, body
    assert body["identifier"] == emaid.replace("-", "")
    code, _ = enroll(t, "emsp", "contract", csr_pem(f"DE-ZZ9-{_alnum(9)}", dc="MO"))
    assert code == 403
    pcid = t.ops["oem"] + _alnum(14)
    code, body = enroll(t, "oem", "oem-prov", csr_pem(pcid, dc="OEM"))
    assert code == 201, body
    code, _ = enroll(t, "oem", "oem-prov", csr_pem("ZZZ" + _alnum(14), dc="OEM"))
    assert code == 403


def test_bad_input_is_problem_json(t: Tenants) -> None:
    for csr, profile in [(b"garbage", "secc"), (csr_pem(evseid(t.ops["cpo1"]), dc="MO"), "secc"),
                         (csr_pem("not an evseid", dc="CPO"), "secc"),
                         (csr_pem(evseid(t.ops["cpo1"]), dc="CPO"), "no-such-profile")]:
        code, body = enroll(t, "admin", profile, csr)
        assert 400 <= code < 500, body
        assert body["status"] == code and "detail" in body
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    code, body = enroll(t, "cpo1", "secc", csr_pem(evseid(t.ops["cpo1"]), dc="CPO", key=rsa_key))
    assert code == 400 and body["type"].endswith("/bad-key")
    r = t.client.post("/v1/enrollments", content=b"x" * 200_000,
                      headers={**t.h("cpo1"), "content-type": "application/json"})
    assert r.status_code == 413
    r = t.client.post("/v1/enrollments", json={"profile": "secc"}, headers=t.h("cpo1"))
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


def test_api_key_expired_revoked_and_missing(t: Tenants) -> None:
    assert t.client.get("/v1/me").status_code == 401
    assert t.client.get("/v1/me", headers={"Authorization": "Bearer v2k_nope_nope"}).status_code == 401
    full, row = create_api_key(t.ctx.db, f"cpo1-{t.tag}")
    assert t.client.get("/v1/me", headers={"Authorization": f"Bearer {full}"}).status_code == 200
    with t.ctx.db.session() as s:
        r = s.exec(select(ApiKey).where(ApiKey.key_id == row.key_id)).one()
        r.expires_at = r.created_at - timedelta(seconds=1)
        s.add(r)
        s.commit()
    assert t.client.get("/v1/me", headers={"Authorization": f"Bearer {full}"}).status_code == 401
    full2, row2 = create_api_key(t.ctx.db, f"cpo1-{t.tag}")
    from pki.orgs import revoke_api_key

    revoke_api_key(t.ctx.db, row2.key_id)
    r = t.client.get("/v1/me", headers={"Authorization": f"Bearer {full2}"})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_client_certificate_via_trusted_proxy(t: Tenants, monkeypatch: pytest.MonkeyPatch) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    org = f"cpo1-{t.tag}"
    csr = csr_pem(f"{org} client", o=org, key=key)
    issued = t.ctx.engine.issue_from_csr("api-client", csr, tenant=org)
    hdr = {"X-SSL-Client-Cert": quote(issued.cert.public_bytes(serialization.Encoding.PEM).decode())}
    # Not from a trusted proxy: the header is ignored
    # V2GPKI_TRUSTED_PROXIES, as the process's settings read it (pki/config.py)
    monkeypatch.setattr(t.ctx.settings, "trusted_proxies", "10.9.9.9")
    assert t.client.get("/v1/me", headers=hdr).status_code == 401
    monkeypatch.setattr(t.ctx.settings, "trusted_proxies", "testclient")
    r = t.client.get("/v1/me", headers=hdr)
    assert r.status_code == 200 and r.json()["org"] == org and r.json()["credential"] == "cert"
    t.ctx.engine.revoke(issued.serial, "keyCompromise", issuer=issued.issuer)
    assert t.client.get("/v1/me", headers=hdr).status_code == 401
    # a certificate we did not issue
    other = csr_pem("foreign", o=org)
    self_signed = (x509.CertificateBuilder().subject_name(x509.load_pem_x509_csr(other).subject)
                   .issuer_name(x509.load_pem_x509_csr(other).subject).public_key(key.public_key())
                   .serial_number(1).not_valid_before(issued.cert.not_valid_before_utc)
                   .not_valid_after(issued.cert.not_valid_after_utc).sign(key, hashes.SHA256()))
    hdr = {"X-SSL-Client-Cert": quote(self_signed.public_bytes(serialization.Encoding.PEM).decode())}
    assert t.client.get("/v1/me", headers=hdr).status_code == 401


def test_idempotency_key_and_supersede(t: Tenants) -> None:
    ev = evseid(t.ops["cpo1"])
    csr = csr_pem(ev, o=t.o("cpo1"), dc="CPO").decode()
    h = {**t.h("cpo1"), "Idempotency-Key": secrets.token_hex(8)}
    r1 = t.client.post("/v1/enrollments", json={"csr": csr, "profile": "secc"}, headers=h)
    r2 = t.client.post("/v1/enrollments", json={"csr": csr, "profile": "secc"}, headers=h)
    assert r1.status_code == 201 and r2.status_code == 200
    assert r1.json()["serial"] == r2.json()["serial"]
    r3 = t.client.post("/v1/enrollments", json={"csr": csr_pem(ev, o=t.o("cpo1"), dc="CPO").decode(), "profile": "secc"}, headers=h)
    assert r3.status_code == 409
    # renewal superseding the old certificate
    r4 = t.client.post("/v1/enrollments", json={"csr": csr_pem(ev, o=t.o("cpo1"), dc="CPO").decode(), "profile": "secc",
                                                "supersede": True}, headers=t.h("cpo1"))
    assert r4.status_code == 201
    assert f"{r1.json()['issuer']}/{r1.json()['serial'].lower()}" in r4.json()["superseded"]
    old = t.client.get(f"/v1/certificates/{r1.json()['issuer']}/{r1.json()['serial']}", headers=t.h("cpo1")).json()
    assert old["status"] == "revoked" and old["revocation_reason"] == "superseded"


def test_ocpp_sign_certificate(t: Tenants) -> None:
    ev = evseid(t.ops["cpo1"])
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": csr_pem(ev, o=t.o("cpo1"), dc="CPO").decode(),
                                                           "certificateType": "V2GCertificate"}, headers=t.h("cpo1"))
    assert r.status_code == 200, r.text
    body = ocpp_schemas.check("2.0.1", "CertificateSignedRequest", r.json())  # forwarded to the station as is
    assert body["certificateType"] == "V2GCertificate" and r.headers["X-V2GPKI-Serial"]
    certs = x509.load_pem_x509_certificates(body["certificateChain"].encode())
    assert len(certs) == 3 and all(c.subject != c.issuer for c in certs)
    # no certificateType: inferred from the CSR (EVSEID → V2GCertificate)
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": csr_pem(ev, o=t.o("cpo1"), dc="CPO").decode()}, headers=t.h("cpo1"))
    assert r.json()["certificateType"] == "V2GCertificate"
    # invalid CSR → Rejected with OCPP reasonCode
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
                                                           "certificateType": "V2GCertificate"}, headers=t.h("cpo1"))
    assert r.status_code == 400 and r.json()["statusInfo"]["reasonCode"] == "InvalidCSR"
    ocpp_schemas.check("2.0.1", "SignCertificateResponse", r.json())
    # over OCPP's 5500-character CSR limit: the message's own rejection, not a problem body
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": "A" * 5501}, headers=t.h("cpo1"))
    assert r.status_code == 400 and ocpp_schemas.check("2.0.1", "SignCertificateResponse", r.json())["status"] == "Rejected"


def test_station_certificate_needs_registered_station(t: Tenants) -> None:
    org = f"cpo1-{t.tag}"
    station = f"CS-{_alnum(8)}"
    csr = csr_pem(station, o=org, c=None).decode()
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": csr, "certificateType": "ChargingStationCertificate"},
                      headers=t.h("cpo1"))
    assert r.status_code == 403
    assert t.client.post("/v1/stations", json={"identity": station}, headers=t.h("cpo1")).status_code == 201
    assert station not in {s["identity"] for s in t.client.get("/v1/stations", headers=t.h("cpo2")).json()}
    # O must be the CPO's organization
    bad = csr_pem(station, o="Someone Else", c=None).decode()
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": bad, "certificateType": "ChargingStationCertificate"},
                      headers=t.h("cpo1"))
    assert r.status_code == 403
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": csr, "certificateType": "ChargingStationCertificate"},
                      headers=t.h("cpo1"))
    assert r.status_code == 200, r.text
    leaf = x509.load_pem_x509_certificates(r.json()["certificateChain"].encode())[0]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    # the other CPO cannot enroll a station registered by cpo1
    r = t.client.post("/ocpp/v201/sign-certificate", json={"csr": csr_pem(station, o=f"cpo2-{t.tag}", c=None).decode(),
                                                           "certificateType": "ChargingStationCertificate"},
                      headers=t.h("cpo2"))
    assert r.status_code == 403


def test_est_with_openssl(t: Tenants, tmp_path: Path) -> None:
    r = t.client.get("/.well-known/est/cpo/cacerts")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/pkcs7-mime")
    (tmp_path / "ca.p7").write_bytes(base64.b64decode(r.content))
    out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "ca.p7"), "-print_certs",
                          "-noout"], capture_output=True, text=True)
    assert out.returncode == 0 and "CPO Sub-CA 2" in out.stdout
    csr = x509.load_pem_x509_csr(csr_pem(evseid(t.ops["cpo1"]), o=t.o("cpo1"), dc="CPO"))
    body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    r = t.client.post("/.well-known/est/cpo/simpleenroll/ISO15118-2", content=body,
                      headers={**t.h("cpo1"), "content-type": "application/pkcs10"})
    assert r.status_code == 200, r.text
    (tmp_path / "leaf.p7").write_bytes(base64.b64decode(r.content))
    out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "leaf.p7"), "-print_certs"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "DC = CPO" in out.stdout
    r = t.client.post("/.well-known/est/cpo/simpleenroll/ISO15118-2", content=body,
                      headers={**t.h("cpo2"), "content-type": "application/pkcs10"})
    assert r.status_code == 403


def test_truststores_and_cas(t: Tenants) -> None:
    for kind, dc in (("v2g", "V2G"), ("mo", "MO"), ("oem", "OEM")):
        r = t.client.get(f"/v1/truststores/{kind}")
        certs = x509.load_pem_x509_certificates(r.content)
        assert certs and all(c.subject == c.issuer for c in certs)
        assert all(c.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT)[0].value == dc for c in certs)
    cas = t.client.get("/v1/cas", headers=t.h("cpo1")).json()
    assert any(c["name"] == "cpo-sub2" and c["key_uri"].startswith("pkcs11:") for c in cas)
    r = t.client.get("/v1/cas/cpo-sub2/chain", headers=t.h("cpo1"))
    assert len(x509.load_pem_x509_certificates(r.content)) == 3


def test_audit_visible_to_auditor_only(t: Tenants) -> None:
    assert t.client.get("/v1/audit", headers=t.h("cpo1")).status_code == 403
    r = t.client.get("/v1/audit?limit=5", headers=t.h("auditor"))
    assert r.status_code == 200 and r.json()["items"]
    r = t.client.get("/v1/audit/verify", headers=t.h("auditor"))
    assert r.status_code == 200 and r.json()["ok"], r.json()


def test_bulk_revocation_dry_run_then_real(t: Tenants) -> None:
    ev = evseid(t.ops["cpo2"])
    for _ in range(2):
        assert enroll(t, "cpo2", "secc", csr_pem(ev, o=t.o("cpo2"), dc="CPO"))[0] == 201
    assert t.client.post("/v1/revocations/bulk", json={"reason": "cessationOfOperation", "identifier": ev},
                         headers=t.h("cpo2")).status_code == 403
    r = t.client.post("/v1/revocations/bulk", json={"reason": "cessationOfOperation", "identifier": ev},
                      headers=t.h("admin"))
    assert (r.json()["dry_run"], r.json()["count"]) == (True, 2)
    r = t.client.post("/v1/revocations/bulk", json={"reason": "cessationOfOperation", "identifier": ev,
                                                    "dry_run": False}, headers=t.h("admin"))
    assert (r.json()["dry_run"], r.json()["count"]) == (False, 2)  # in bounded transactions (pki/revocation.py)
    items = t.client.get(f"/v1/certificates?identifier={quote(ev)}", headers=t.h("cpo2")).json()["items"]
    assert {c["status"] for c in items} == {"revoked"}
    # one outbox event per certificate, written in the batch's transaction as one statement (outbox.batched)
    with t.ctx.db.session() as s:
        events = [e.payload for e in s.exec(select(OutboxEvent).where(OutboxEvent.kind == "revocation"))
                  if e.payload.get("identifier") == ev]
    assert sorted(e["serial"].upper() for e in events) == sorted(c["serial"].upper() for c in items)
    assert {(e["status"], e["reason"]) for e in events} == {("revoked", "cessationOfOperation")}
