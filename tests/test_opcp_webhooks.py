"""OPCP webhooks and OPNC RCP (#25): /v1/webhook/endpoints on the lifecycle subscriptions, deliveries to a
loopback receiver in webhook.payload.v1.json's shape with its HMAC signature, tenancy (another
organization's endpoint is 404, its events never reach you), bad input (the documents' error shape,
nothing stored), the CPS subscriptionUrl one-shot, /opnc/v1/rcp; Schemathesis against webhooks.v1.json and
OPNC's rcp document as published (read from ../shared/specs/; only RootCertificateV1's unsatisfiable
``maxProperties: 1`` and 800-character ``caCertificate`` are relaxed, in memory, as for OPCP's RootCertV2,
and the payload document's contractCert ``pattern``, which is a sentence).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlmodel import col, func, select

from api.app import create_app
from pki import lifecycle, pools
from pki.context import Context
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from pki.store.models import CertificateAuthority
from pki.store.models_lifecycle import Delivery, Subscription
from tests.conftest import REPO, csr_pem, org_with_fresh_prefix
from tests.test_lifecycle import WebhookServer, start_webhook_server

SPECS = REPO.parent / "shared" / "specs"
WEBHOOKS = SPECS / "opcp" / "webhooks.v1.json"
PAYLOADS = SPECS / "opcp" / "webhook.payload.v1.json"
OPNC_RCP = SPECS / "opnc" / "specification" / "apis" / "rcp" / "rcp.api.v1.json"
ISO2 = "urn:iso:15118:2:2013:MsgDef"
pytestmark = pytest.mark.skipif(not SPECS.exists(), reason="../shared/specs not present")


@dataclass
class W:
    ctx: Context
    app: FastAPI
    client: TestClient
    keys: dict[str, str]
    prefixes: dict[str, str]
    hooks: WebhookServer

    def h(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", **extra}


@pytest.fixture(scope="module")
def w(ctx: Context) -> Iterator[W]:
    tag = secrets.token_hex(3)
    keys, prefixes = {}, {}
    for who, role in (("emsp", "emsp"), ("emsp2", "emsp"), ("oem", "oem"), ("cpo", "cpo")):
        name = f"wh-{who}-{tag}"
        prefixes[who] = org_with_fresh_prefix(ctx, name, role)
        keys[who] = create_api_key(ctx.db, name)[0]
    create_org(ctx.db, f"wh-auditor-{tag}", "auditor", [])
    keys["auditor"] = create_api_key(ctx.db, f"wh-auditor-{tag}")[0]
    hooks = start_webhook_server()
    app = create_app(ctx)
    with TestClient(app) as client:
        yield W(ctx, app, client, keys, prefixes, hooks)
    hooks.httpd.shutdown()


def _count(ctx: Context) -> int:
    with ctx.db.session() as s:
        return int(s.exec(select(func.count()).select_from(Subscription)).one())


def _deliver(ctx: Context, sub_id: str) -> list[Delivery]:
    """Run the pending deliveries of one subscription now (what the worker's sweep does)."""
    with ctx.db.session() as s:
        sub = s.exec(select(Subscription).where(Subscription.sub_id == sub_id)).one()
        rows = list(s.exec(select(Delivery).where(Delivery.subscription_id == sub.id).order_by(col(Delivery.id))))
    for d in rows:
        if d.state == "pending" and d.id is not None:
            lifecycle.attempt_delivery(ctx, d.id)
    with ctx.db.session() as s:
        return list(s.exec(select(Delivery).where(Delivery.subscription_id == sub.id).order_by(col(Delivery.id))))


def _payload_schema(kind: str) -> dict[str, Any]:
    doc = json.loads(PAYLOADS.read_text())
    path = "/customer.defined.root.event.webhook.path" if kind == "root" else \
        "/customer.defined.pcid.emaid.event.webhook.path"
    schema = dict(doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
    if kind != "root":
        # the document's contractCert "pattern" is its description ("Contract Certificate in base64 encoded DER
        # form"): no certificate matches it; the only keyword relaxed (the value is checked as DER below)
        schema["properties"]["payload"]["properties"]["contractCert"].pop("pattern", None)
    return schema


def _check_received(hooks: WebhookServer, path: str, secret: str, kind: str, n: int = 1) -> list[dict[str, Any]]:
    got = hooks.wait(path, n, timeout=10)
    assert len(got) == n, [r.path for r in hooks.received]
    out = []
    for r in got:
        assert r.headers["content-type"] == "application/json"
        mac = hmac.new(secret.encode(), r.body, hashlib.sha256).hexdigest()
        assert r.headers["payload-signature"] == mac
        assert r.headers["x-hubject-signature"] == f"sha256={mac}"
        assert lifecycle.verify_webhook(secret, r.headers["x-v2gpki-signature"], r.body)
        body = json.loads(r.body)
        jsonschema.validate(body, _payload_schema(kind), format_checker=jsonschema.FormatChecker())
        out.append(body)
    return out


def _endpoint(w: W, who: str, path: str, events: list[str], **extra: Any) -> dict[str, Any]:
    r = w.client.post("/v1/webhook/endpoints", headers=w.h(who),
                      json={"url": f"{w.hooks.url}{path}", "enabledEvents": events, **extra})
    assert r.status_code == 201, r.text
    body = r.json()
    schema = json.loads(WEBHOOKS.read_text())["components"]["schemas"]["EndpointResponse"]
    jsonschema.validate(body, schema)
    assert body["secret"] and body["enabledEvents"] == sorted(events)
    return dict(body)


def _vehicle(w: W) -> str:
    pcid = w.prefixes["oem"] + "".join(secrets.choice("ABCDEFGH0123456789") for _ in range(14))
    r = w.client.post("/v1/enrollments", headers=w.h("oem"), json={
        "csr": csr_pem(pcid, dc="OEM", key=ec.generate_private_key(ec.SECP256R1())).decode(), "profile": "oem-prov"})
    assert r.status_code == 201, r.text
    der = base64.b64encode(x509.load_pem_x509_certificate(r.json()["certificate"].encode())
                           .public_bytes(serialization.Encoding.DER)).decode()
    r = w.client.put("/opnc/v1/pcp/provisioningcertificates", headers=w.h("oem"),
                     json={"provisioningCertificateChain": {"certificate": der}})
    assert r.status_code == 200, r.text
    return pcid


def _generate(w: W, pcid: str, who: str = "emsp", emaid: str | None = None, **extra: Any) -> tuple[str, Any]:
    emaid = emaid or w.prefixes[who].replace("-", "") + "".join(secrets.choice("ABCDEFGH0123456789")
                                                                for _ in range(9))
    r = w.client.put("/v1/cps/generate/signedContractData", headers=w.h(who), json={
        "contractBegins": utcnow().isoformat(), "contractEnds": (utcnow() + timedelta(days=90)).isoformat(),
        "emaid": emaid, "pcid": pcid, "xsdMsgDefNamespace": ISO2, **extra})
    assert r.status_code == 201, r.text
    return emaid, r


# -- the endpoints API -----------------------------------------------------------------------------------


def test_endpoint_crud_and_tenancy(w: W) -> None:
    ep = _endpoint(w, "emsp", "/crud", ["mo.contract.created.sent.to.oem"], description="d", metadata={"k": "v"})
    assert ep["userRole"] == "MO" and ep["providerIds"] == [w.prefixes["emsp"]] and ep["status"] == "enabled"
    eid = ep["id"]
    got = w.client.get(f"/v1/webhook/endpoints/{eid}", headers=w.h("emsp")).json()
    assert "secret" not in got and got["metadata"] == {"k": "v"} and got["description"] == "d"
    assert eid in [e["id"] for e in w.client.get("/v1/webhook/endpoints", headers=w.h("emsp")).json()]
    # another organization: 404 on every operation, not in its list, nothing changed
    assert eid not in [e["id"] for e in w.client.get("/v1/webhook/endpoints", headers=w.h("emsp2")).json()]
    for method in ("GET", "PUT", "DELETE"):
        r = w.client.request(method, f"/v1/webhook/endpoints/{eid}", headers=w.h("emsp2"),
                             json={"url": "http://127.0.0.1:9/x"} if method == "PUT" else None)
        assert r.status_code == 404, (method, r.text)
        assert r.json()["errorMessages"] and r.json()["traceId"]
    # a /v1 subscription is not an OPCP endpoint
    sub = w.client.post("/v1/subscriptions", headers=w.h("emsp"), json={"url": f"{w.hooks.url}/v1"}).json()
    assert w.client.get(f"/v1/webhook/endpoints/{sub['id']}", headers=w.h("emsp")).status_code == 404
    # the auditor reads, never writes
    assert w.client.get(f"/v1/webhook/endpoints/{eid}", headers=w.h("auditor")).status_code == 200
    assert w.client.delete(f"/v1/webhook/endpoints/{eid}", headers=w.h("auditor")).status_code == 403
    r = w.client.put(f"/v1/webhook/endpoints/{eid}", headers=w.h("emsp"),
                     json={"url": f"{w.hooks.url}/crud2", "status": "disabled", "enabledEvents": ["oem.contract.created"]})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "disabled" and r.json()["url"].endswith("/crud2")
    assert r.json()["enabledEvents"] == ["oem.contract.created"] and r.json()["metadata"] == {"k": "v"}
    assert w.client.delete(f"/v1/webhook/endpoints/{eid}", headers=w.h("emsp")).status_code == 200
    assert w.client.get(f"/v1/webhook/endpoints/{eid}", headers=w.h("emsp")).status_code == 404
    assert w.client.get("/v1/webhook/endpoints").status_code == 401


@pytest.mark.parametrize("body", [
    {"url": "http://127.0.0.1:9/a", "enabledEvents": ["contract.deleted"]},
    {"url": "http://127.0.0.1:9/a", "enabledEvents": []},
    {"url": "http://127.0.0.1:9/a"},
    {"enabledEvents": ["oem.contract.created"]},
    {"url": "ftp://127.0.0.1/a", "enabledEvents": ["oem.contract.created"]},
    {"url": "http://user:pw@127.0.0.1/a", "enabledEvents": ["oem.contract.created"]},
    {"url": "http://127.0.0.1:9/a", "enabledEvents": ["oem.contract.created"], "status": "paused"},
    {"url": "http://127.0.0.1:9/a", "enabledEvents": ["oem.contract.created"], "metadata": {"x": "y" * 5000}},
    {"url": "http://127.0.0.1:9/a", "enabledEvents": ["oem.contract.created"], "metadata": "text"},
], ids=range(9))
def test_bad_input_is_400_in_the_error_shape_and_stores_nothing(w: W, body: dict[str, Any]) -> None:
    before = _count(w.ctx)
    r = w.client.post("/v1/webhook/endpoints", headers=w.h("emsp"), json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"errorMessages", "traceId"} and r.json()["errorMessages"]
    assert _count(w.ctx) == before
    assert w.client.post("/v1/webhook/endpoints", headers=w.h("emsp"), content=b"{not json").status_code == 400
    assert _count(w.ctx) == before


# -- deliveries ------------------------------------------------------------------------------------------


def test_contract_events_delivered_signed_and_only_to_their_tenants(w: W) -> None:
    t = secrets.token_hex(3)
    mo = _endpoint(w, "emsp", f"/mo-{t}", ["mo.contract.created.sent.to.oem", "mo.contract.deleted.sent.to.oem",
                                           "mo.prov.cert.deleted"])
    oem = _endpoint(w, "oem", f"/oem-{t}", ["oem.contract.created", "oem.contract.deleted"])
    other = _endpoint(w, "emsp2", f"/other-{t}", ["mo.contract.created.sent.to.oem", "mo.contract.deleted.sent.to.oem",
                                                  "mo.prov.cert.deleted"])
    off = _endpoint(w, "emsp", f"/off-{t}", ["mo.contract.created.sent.to.oem"], status="disabled")
    pcid = _vehicle(w)
    emaid, _ = _generate(w, pcid)

    _deliver(w.ctx, oem["id"])
    [o] = _check_received(w.hooks, f"/oem-{t}", oem["secret"], "pcid")
    assert o["eventType"] == "oem.contract.created" and o["xsdMsgDefNamespace"] == ISO2
    assert o["payload"]["emaid"] == emaid and o["payload"]["pcid"] == pcid
    cert = x509.load_der_x509_certificate(base64.b64decode(o["payload"]["contractCert"]))
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == emaid
    roots = {hashlib.sha256(r.der).hexdigest() for r in _roots(w.ctx)}
    assert o["payload"]["cpsSignerRootFingerprint"] in roots and o["payload"]["signatureAlgorithm"] == "secp256r1"
    _deliver(w.ctx, mo["id"])
    [m] = _check_received(w.hooks, f"/mo-{t}", mo["secret"], "pcid")
    assert m["eventType"] == "mo.contract.created.sent.to.oem" and m["payload"]["emaid"] == emaid

    # de-publish and pool removal reach the same two only
    assert w.client.delete(f"/v1/ccp/signedContractData/{emaid}", headers=w.h("emsp")).status_code == 200
    _deliver(w.ctx, oem["id"])
    _deliver(w.ctx, mo["id"])
    assert [b["eventType"] for b in _check_received(w.hooks, f"/oem-{t}", oem["secret"], "pcid", 2)] == [
        "oem.contract.created", "oem.contract.deleted"]
    assert _check_received(w.hooks, f"/mo-{t}", mo["secret"], "pcid", 2)[1]["eventType"] == \
        "mo.contract.deleted.sent.to.oem"
    # another eMSP subscribed to the same event types, a disabled endpoint: nothing queued, nothing sent
    assert _deliver(w.ctx, other["id"]) == [] and _deliver(w.ctx, off["id"]) == []
    assert w.hooks.on(f"/other-{t}") == [] and w.hooks.on(f"/off-{t}") == []


def test_provisioning_events_reach_the_emsp_with_a_contract(w: W) -> None:
    t = secrets.token_hex(3)
    mo = _endpoint(w, "emsp", f"/prov-{t}", ["mo.prov.cert.deleted"])
    other = _endpoint(w, "emsp2", f"/prov2-{t}", ["mo.prov.cert.deleted"])
    pcid = _vehicle(w)
    emaid, _ = _generate(w, pcid)
    assert w.client.delete(f"/opnc/v1/pcp/provisioningcertificates/{pcid}", headers=w.h("oem")).status_code == 200
    _deliver(w.ctx, mo["id"])
    [b] = _check_received(w.hooks, f"/prov-{t}", mo["secret"], "pcid")
    assert b["eventType"] == "mo.prov.cert.deleted" and b["payload"] == {"emaid": emaid, "pcid": pcid}
    assert _deliver(w.ctx, other["id"]) == []


def _roots(ctx: Context) -> list[CertificateAuthority]:
    with ctx.db.session() as s:
        return list(s.exec(select(CertificateAuthority).where(col(CertificateAuthority.parent).is_(None))))


def test_root_events(w: W) -> None:
    t = secrets.token_hex(3)
    ep = _endpoint(w, "cpo", f"/root-{t}", ["root.cert.added"])
    v2g = next(r for r in _roots(w.ctx) if r.hierarchy == "v2g" and r.status == "active")
    csms = next(r for r in _roots(w.ctx) if r.hierarchy == "csms")
    event = {"change": "added", "cas": [{"issuer": v2g.name, "serial": v2g.serial},
                                        {"issuer": csms.name, "serial": csms.serial}]}
    pools.root_events(w.ctx, event)
    pools.root_events(w.ctx, {**event, "change": "revoked"})  # not subscribed
    pools.root_events(w.ctx, event)  # the same outbox event again (a redelivered task): queued once
    _deliver(w.ctx, ep["id"])
    [b] = _check_received(w.hooks, f"/root-{t}", ep["secret"], "root")
    assert b["eventType"] == "root.cert.added" and b["payload"]["rootType"] == "V2G"
    rcp = w.client.get(f"/v1/root/rootCerts/{b['payload']['rootCertificateId']}", headers=w.h("cpo"))
    assert rcp.status_code == 200 and rcp.json()["RootResponse"]["fingerprint"] == b["payload"]["fingerprintSHA256"]


def test_subscription_url_is_a_one_shot_webhook(w: W) -> None:
    t = secrets.token_hex(3)
    pcid = _vehicle(w)
    before = _count(w.ctx)
    r = w.client.put("/v1/cps/generate/signedContractData", headers=w.h("emsp"), json={
        "contractBegins": utcnow().isoformat(), "contractEnds": (utcnow() + timedelta(days=9)).isoformat(),
        "emaid": "XX", "pcid": pcid, "xsdMsgDefNamespace": ISO2, "subscriptionUrl": f"{w.hooks.url}/bad"})
    assert r.status_code == 400 and _count(w.ctx) == before  # a bad EMAID: nothing stored, no subscription
    emaid, r = _generate(w, pcid, subscriptionUrl=f"{w.hooks.url}/once-{t}")
    sub_id, secret = r.headers["x-v2gpki-subscription"], r.headers["x-v2gpki-webhook-secret"]
    _generate(w, pcid, emaid=emaid, subscriptionUrl=None)  # the same contract again: updated, not sent twice
    _deliver(w.ctx, sub_id)
    [b] = _check_received(w.hooks, f"/once-{t}", secret, "pcid")
    assert b["eventType"] == "mo.contract.created.sent.to.oem" and b["payload"]["emaid"] == emaid
    assert len(_deliver(w.ctx, sub_id)) == 1
    # not an endpoint of the webhooks API
    assert w.client.get(f"/v1/webhook/endpoints/{sub_id}", headers=w.h("emsp")).status_code == 404


# -- OPNC RCP --------------------------------------------------------------------------------------------


def test_opnc_rcp(w: W) -> None:
    h = w.h("cpo", **{"OPNC-from-party-type": "cpo", "OPNC-from-party-id": w.prefixes["cpo"]})
    r = w.client.get("/opnc/v1/rcp/rootcertificates", headers=h)
    assert r.status_code == 200, r.text
    coll = r.json()["rootCertificateCollection"]
    opcp = w.client.get("/v1/root/rootCerts", headers=w.h("cpo")).json()["RootCertificateCollection"][
        "rootCertificates"]
    assert {e["rootCertificateId"] for e in coll} == {e["rootCertificateId"] for e in opcp}
    assert {e["rootType"] for e in coll} <= {"V2G", "eMSP", "OEM"}
    only = w.client.get("/opnc/v1/rcp/rootcertificates?pkiType=emsp", headers=h).json()["rootCertificateCollection"]
    assert only and {e["rootType"] for e in only} == {"eMSP"}
    assert w.client.get("/opnc/v1/rcp/rootcertificates?pkiType=pe", headers=h).json() == {
        "rootCertificateCollection": []}
    one = w.client.get(f"/opnc/v1/rcp/rootcertificates/{coll[0]['rootCertificateId']}", headers=h).json()
    assert one["roootCertificate"] == coll[0]
    v2g = next(e for e in coll if e["rootType"] == "V2G")
    assert w.client.get("/opnc/v1/rcp/rootcertificates", headers={
        **h, "OPNC-to-party-type": "pki", "OPNC-to-party-id": v2g["fingerprint"]}).status_code == 200
    for bad in ({"OPNC-to-party-type": "ccp"}, {"OPNC-to-party-type": "pki", "OPNC-to-party-id": "00" * 32},
                {"OPNC-from-party-type": "emsp"}, {"OPNC-from-party-id": w.prefixes["emsp"]}):
        r = w.client.get("/opnc/v1/rcp/rootcertificates", headers={**h, **bad})
        assert r.status_code == 403 and r.json()["errorMessages"], bad
    r = w.client.get("/opnc/v1/rcp/rootcertificates/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12, headers=h)
    assert r.status_code == 404 and r.json()["errorMessages"] == ["Root certificate with the given ID is not found"]
    assert w.client.get("/opnc/v1/rcp/rootcertificates?pkiType=x", headers=h).status_code == 400
    assert w.client.get("/opnc/v1/rcp/rootcertificates").status_code == 401


# -- Schemathesis ----------------------------------------------------------------------------------------


def _inline(obj: Any, base: Path) -> Any:
    """The OPNC document with its relative file $refs inlined (each resolved from its own file's folder)."""
    if isinstance(obj, dict):
        ref = obj.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            target = (base / ref).resolve()
            return _inline(json.loads(target.read_text()), target.parent)
        return {k: _inline(v, base) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_inline(v, base) for v in obj]
    return obj


def _relax_root(obj: Any) -> None:
    """RootCertificateV1 (as OPCP's RootCertV2): ``maxProperties: 1`` beside two required properties, and
    ``caCertificate`` ``maxLength: 800`` (a -20 P-521 root is longer): only these two are dropped."""
    if isinstance(obj, dict):
        if obj.get("title") == "RootCertificateV1":
            obj.pop("maxProperties", None)
            obj["properties"]["caCertificate"].pop("maxLength", None)
        for v in obj.values():
            _relax_root(v)
    elif isinstance(obj, list):
        for v in obj:
            _relax_root(v)


def _schema(doc: str) -> Any:
    if doc == "webhooks":
        return schemathesis.openapi.from_path(str(WEBHOOKS))
    raw = _inline(json.loads(OPNC_RCP.read_text()), OPNC_RCP.parent)
    _relax_root(raw)
    return schemathesis.openapi.from_dict(raw)


def _operations() -> list[tuple[str, str, str]]:
    out = []
    for doc in ("webhooks", "opnc-rcp"):
        for op in _schema(doc).get_all_operations():
            o = op.ok()  # type: ignore[union-attr]
            out.append((doc, o.method.upper(), o.path))
    return out


NOT_CLAIMED = {("opnc-rcp", "PUT", "/rootcertificates"), ("opnc-rcp", "DELETE", "/rootcertificates/{rootCertificateId}")}


@pytest.mark.parametrize(("doc", "method", "path"), _operations(), ids=lambda v: str(v))
def test_schemathesis(w: W, doc: str, method: str, path: str) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    op = _schema(doc)[path][method]
    base = "http://testserver" + ("/opnc/v1/rcp" if doc == "opnc-rcp" else "")
    who = "emsp" if doc == "webhooks" else "cpo"
    checks = [not_a_server_error] + ([] if (doc, method, path) in NOT_CLAIMED else [response_schema_conformance])
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            for hdr in ("OPNC-from-party-type", "OPNC-from-party-id", "OPNC-to-party-type", "OPNC-to-party-id"):
                (case.headers or {}).pop(hdr, None)
            response = case.call(app=w.app, base_url=base, headers=w.h(who))
            assert response.status_code < 500, response.text
            if response.status_code >= 400 and response.status_code not in (401, 405):
                assert response.json()["errorMessages"]
            case.validate_response(response, checks=checks)

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE
