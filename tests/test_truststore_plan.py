"""Chargers' trust stores and root transitions over OCPP (issue #27 items 1 and 2), on SoftHSM2, SQLite and
PostgreSQL, each in a hierarchy of its own (tests/conftest.lifecycle_context: rollovers must not touch the
session's shared one).

Item 1 — POST /ocpp/v201|v21/trust-store-plan: a station that reports only the CSMS and V2G roots is told to
install the MO root and the Manufacturer root its CPO trusts (an import), OCPP 2.1 also the OEM root; a
withdrawn root it reports gets a DeleteCertificateRequest with its own hash data; every payload valid against
the official schema of its version; hash data matched in any hex case or base64; another CPO's station or an
unregistered one refused with nothing recorded.
Item 2 — a rollover campaign: the new root is pushed by the plans while nothing is issued under it, coverage
rises as stations report it (GET /v1/roots/{id}/coverage, metrics), the switch is refused below the threshold
and allowed at it (or forced, CLI), withdrawal is refused while certificates under the old root are valid and
allowed once they are replaced, and the plans then delete the old root.
"""

from __future__ import annotations

import base64
import hashlib
import os
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
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlmodel import col, select

from api.app import create_app
from pki import lifecycle, root_campaign
from pki.context import Context
from pki.csr import SubjectFields
from pki.issuance import IssueRequest
from pki.ocsp import spki_key_bits
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from pki.store.models import Certificate
from pki.store.models_truststore import StationTrustReport
from tests import ocpp_schemas
from tests.conftest import (
    drop_pg_database,
    lifecycle_context,
    org_with_fresh_prefix,
    own_pg_database,
)

OCPP = {"2.0.1": "v201", "2.1": "v21"}


def _own_context(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, token_root: Path,
                 tag: str) -> Iterator[Context]:
    db_url, name = None, None
    if request.param == "postgresql":
        pg = own_pg_database(tag)
        if pg is None:
            if os.environ.get("V2GPKI_TEST_REQUIRE_PG"):
                pytest.fail("PostgreSQL required (V2GPKI_TEST_PG_ADMIN_URL unset)")
            pytest.skip("no PostgreSQL (set V2GPKI_TEST_PG_ADMIN_URL or run scripts/test.sh)")
        db_url, name = pg
    c = lifecycle_context(tmp_path_factory, token_root, f"t-{tag}-{request.param}", db_url)
    yield c
    c.db.dispose()
    if name:
        drop_pg_database(name)


@dataclass
class World:
    ctx: Context
    client: TestClient
    keys: dict[str, dict[str, str]]
    org: dict[str, str]

    def post(self, path: str, body: Any, who: str) -> Any:  # noqa: ANN401 - httpx.Response
        return self.client.post(path, json=body, headers=self.keys[who])

    def get(self, path: str, who: str) -> Any:  # noqa: ANN401
        return self.client.get(path, headers=self.keys[who])

    def station(self, who: str = "cpo") -> str:
        ident = f"CS-{secrets.token_hex(5).upper()}"
        r = self.post("/v1/stations", {"identity": ident}, who)
        assert r.status_code == 201, r.text
        return ident

    def plan(self, station: str, installed: dict[str, Any], version: str = "2.0.1", who: str = "cpo") -> Any:  # noqa: ANN401
        ocpp_schemas.check(version, "GetInstalledCertificateIdsResponse", installed)  # what a station sends
        return self.post(f"/ocpp/{OCPP[version]}/trust-store-plan", {"stationId": station, "installed": installed}, who)


def _world(ctx: Context, tag: str) -> Iterator[World]:
    org, keys = {}, {}
    for who, role in (("cpo", "cpo"), ("cpo2", "cpo"), ("emsp", "emsp")):
        org[who] = f"tp-{who}-{tag}"
        org_with_fresh_prefix(ctx, org[who], role)
    org["admin"] = f"tp-admin-{tag}"
    create_org(ctx.db, org["admin"], "admin", [])
    for who in org:
        keys[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, org[who])[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield World(ctx, client, keys, org)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tp_ctx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           token_root: Path) -> Iterator[Context]:
    yield from _own_context(request, tmp_path_factory, token_root, "tp")


@pytest.fixture(scope="module")
def w(tp_ctx: Context) -> Iterator[World]:
    yield from _world(tp_ctx, secrets.token_hex(3))


# -- helpers ----------------------------------------------------------------------------------------------


def hash_data(cert: x509.Certificate, style: str = "hex", alg: str = "SHA256") -> dict[str, str]:
    """CertificateHashDataType of a root as a station computes it (its issuer is itself), in the encoding
    stations use: lower hex (OCPP), upper hex, or base64."""
    h = {"SHA256": hashlib.sha256, "SHA384": hashlib.sha384, "SHA512": hashlib.sha512}[alg]
    name, key = h(cert.issuer.public_bytes()).digest(), h(spki_key_bits(cert)).digest()
    serial = format(cert.serial_number, "x")
    if style == "b64":
        return {"hashAlgorithm": alg, "issuerNameHash": base64.b64encode(name).decode(),
                "issuerKeyHash": base64.b64encode(key).decode(), "serialNumber": serial}
    enc = (lambda b: b.hex().upper()) if style == "HEX" else (lambda b: b.hex())
    return {"hashAlgorithm": alg, "issuerNameHash": enc(name), "issuerKeyHash": enc(key),
            "serialNumber": serial.upper() if style == "HEX" else serial}


def report(*entries: tuple[str, x509.Certificate, str]) -> dict[str, Any]:
    """A GetInstalledCertificateIdsResponse naming these (type, root, encoding) entries."""
    if not entries:
        return {"status": "NotFound"}
    return {"status": "Accepted", "certificateHashDataChain": [
        {"certificateType": t, "certificateHashData": hash_data(c, style)} for t, c, style in entries]}


def foreign_root(cn: str) -> x509.Certificate:
    """A root of another PKI (what an admin imports)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Other PKI")])
    now = utcnow()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))


def pem_of(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def root(ctx: Context, name: str) -> x509.Certificate:
    return ctx.engine.ca(name).cert


def check_plan(plan: dict[str, Any], version: str) -> dict[str, Any]:
    """The plan's shape, and every payload a valid OCPP ``version`` message."""
    assert set(plan) == {"install", "delete"}
    for p in plan["install"]:
        ocpp_schemas.check(version, "InstallCertificateRequest", p)
        x509.load_pem_x509_certificate(p["certificate"].encode())
    for d in plan["delete"]:
        ocpp_schemas.check(version, "DeleteCertificateRequest", d)
    return plan


def installs(plan: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["certificateType"], x509.load_pem_x509_certificate(p["certificate"].encode()).subject.rfc4514_string())
            for p in plan["install"]]


def import_root(w: World, cert: x509.Certificate, ctype: str, org: str | None = None) -> dict[str, Any]:
    r = w.post("/v1/trusted-roots", {"certificateType": ctype, "certificate": pem_of(cert), "org": org}, "admin")
    assert r.status_code == 201, r.text
    return dict(r.json())


def report_row(ctx: Context, org: str, station: str) -> StationTrustReport | None:
    with ctx.db.session() as s:
        return s.exec(select(StationTrustReport).where(StationTrustReport.org == org,
                                                       StationTrustReport.station == station)).first()


# -- item 1: the plan -------------------------------------------------------------------------------------


def test_plan_installs_missing_roots_every_payload_schema_valid(w: World) -> None:
    ctx = w.ctx
    mfr = foreign_root(f"Manufacturer Root {secrets.token_hex(3)}")
    oem = foreign_root(f"Foreign OEM Root {secrets.token_hex(3)}")
    import_root(w, mfr, "ManufacturerRootCertificate", org=w.org["cpo"])  # configured for this CPO only
    import_root(w, oem, "OEMRootCertificate", org=w.org["cpo"])  # OCPP 2.1 has the type, 2.0.1 does not
    st = w.station()
    # CSMS root in upper-case hex, V2G root in base64: stations differ, both must match
    installed = report(("CSMSRootCertificate", root(ctx, "csms-root"), "HEX"),
                       ("V2GRootCertificate", root(ctx, "v2g-root"), "b64"))
    r = w.plan(st, installed, "2.0.1")
    assert r.status_code == 200, r.text
    plan = check_plan(r.json(), "2.0.1")
    assert installs(plan) == [("MORootCertificate", root(ctx, "mo-root").subject.rfc4514_string()),
                              ("ManufacturerRootCertificate", mfr.subject.rfc4514_string())]
    assert plan["delete"] == []
    row = report_row(ctx, w.org["cpo"], st)
    assert row is not None and row.ocpp_version == "2.0.1"
    assert [i["certificateType"] for i in row.install] == ["MORootCertificate", "ManufacturerRootCertificate"]
    assert [e["certificateType"] for e in row.reported] == ["CSMSRootCertificate", "V2GRootCertificate"]
    fp = {root(ctx, n).fingerprint(hashes.SHA256()).hex() for n in ("csms-root", "v2g-root")}
    assert set(row.roots) == fp

    r21 = w.plan(st, installed, "2.1")
    plan21 = check_plan(r21.json(), "2.1")
    assert [t for t, _ in installs(plan21)] == ["MORootCertificate", "ManufacturerRootCertificate", "OEMRootCertificate"]

    # Once the station holds them, nothing left to do; a V2GCertificateChain entry (a leaf) changes nothing.
    done = report(("CSMSRootCertificate", root(ctx, "csms-root"), "hex"), ("V2GRootCertificate", root(ctx, "v2g-root"), "hex"),
                  ("MORootCertificate", root(ctx, "mo-root"), "hex"), ("ManufacturerRootCertificate", mfr, "HEX"),
                  ("V2GCertificateChain", root(ctx, "mo-root"), "hex"))
    assert check_plan(w.plan(st, done).json(), "2.0.1") == {"install": [], "delete": []}
    # A root installed under the wrong type does not count as installed for its own type.
    wrong = report(("V2GRootCertificate", root(ctx, "mo-root"), "hex"))
    assert ("MORootCertificate", root(ctx, "mo-root").subject.rfc4514_string()) in installs(w.plan(st, wrong).json())

    # Another CPO does not get this CPO's imports; a station that reports nothing gets every root.
    st2 = w.station("cpo2")
    plan2 = check_plan(w.plan(st2, report(), "2.1", who="cpo2").json(), "2.1")
    assert [t for t, _ in installs(plan2)] == ["V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate"]
    # An admin may plan for any CPO's station (recorded under that CPO).
    assert w.plan(st2, report(), "2.0.1", who="admin").status_code == 200


def test_policy_types_of_the_cpo(w: World) -> None:
    """A CPO whose policy wants only some types (Organization.settings truststore_types) gets only those."""
    from pki.store.models import Organization

    with w.ctx.db.session() as s:
        o = s.exec(select(Organization).where(Organization.name == w.org["cpo2"])).one()
        o.settings = {**o.settings, "truststore_types": ["MORootCertificate"]}
        s.add(o)
        s.commit()
    try:
        st = w.station("cpo2")
        plan = check_plan(w.plan(st, report(), who="cpo2").json(), "2.0.1")
        assert [t for t, _ in installs(plan)] == ["MORootCertificate"]
    finally:
        with w.ctx.db.session() as s:
            o = s.exec(select(Organization).where(Organization.name == w.org["cpo2"])).one()
            o.settings = {k: v for k, v in o.settings.items() if k != "truststore_types"}
            s.add(o)
            s.commit()


def test_withdrawn_root_reported_gets_delete(w: World) -> None:
    foreign = foreign_root(f"Foreign V2G Root {secrets.token_hex(3)}")
    imp = import_root(w, foreign, "V2GRootCertificate")  # for every CPO
    st = w.station()
    held = report(("V2GRootCertificate", foreign, "HEX"), ("MORootCertificate", root(w.ctx, "mo-root"), "hex"))
    before = check_plan(w.plan(st, held).json(), "2.0.1")
    assert foreign.subject.rfc4514_string() not in {s for _, s in installs(before)} and before["delete"] == []
    listed = w.get("/v1/trusted-roots", "cpo").json()
    assert imp["id"] in {x["id"] for x in listed}

    r = w.post(f"/v1/trusted-roots/{imp['id']}/withdraw", {}, "admin")
    assert r.status_code == 200 and r.json()["status"] == "withdrawn"
    assert w.post(f"/v1/trusted-roots/{imp['id']}/withdraw", {}, "cpo").status_code == 403
    for version in ("2.0.1", "2.1"):
        plan = check_plan(w.plan(st, held, version).json(), version)
        # the station's own hash data, exactly as it reported them (upper-case hex here)
        assert [d["certificateHashData"] for d in plan["delete"]] == [hash_data(foreign, "HEX")]
        assert plan["delete"][0]["customData"]["reason"] == "withdrawn"
    row = report_row(w.ctx, w.org["cpo"], st)
    assert row is not None and len(row.delete) == 1 and row.delete[0]["reason"] == "withdrawn"
    # an unknown root the station holds is left alone
    unknown = foreign_root("Somebody Else's Root")
    assert check_plan(w.plan(st, report(("V2GRootCertificate", unknown, "hex"))).json(), "2.0.1")["delete"] == []


def test_plan_refused_across_tenants_and_for_bad_input(w: World) -> None:
    st = w.station("cpo")
    other = w.plan(st, report(), who="cpo2")
    assert other.status_code == 403 and other.headers["content-type"].startswith("application/problem+json")
    assert w.plan(f"CS-NOBODY-{secrets.token_hex(3)}", report()).status_code == 404
    assert w.plan(st, report(), who="emsp").status_code == 403
    assert report_row(w.ctx, w.org["cpo"], st) is None and report_row(w.ctx, w.org["cpo2"], st) is None
    # a 2.1-only type in a 2.0.1 report, or a missing field: an empty plan, HTTP 400, nothing recorded
    bad = {"stationId": st, "installed": {"status": "Accepted", "certificateHashDataChain": [
        {"certificateType": "OEMRootCertificate", "certificateHashData": hash_data(root(w.ctx, "mo-root"))}]}}
    r = w.post("/ocpp/v201/trust-store-plan", bad, "cpo")
    assert r.status_code == 400 and r.json() == {"install": [], "delete": []}
    assert r.headers["X-V2GPKI-Problem"] == "invalid-request"
    assert w.post("/ocpp/v21/trust-store-plan", {"installed": {"status": "NotFound"}}, "cpo").status_code == 400
    assert report_row(w.ctx, w.org["cpo"], st) is None
    # importing is an admin's: a CPO key is refused; not a root is refused
    assert w.post("/v1/trusted-roots", {"certificateType": "MORootCertificate",
                                        "certificate": pem_of(foreign_root("X"))}, "cpo").status_code == 403
    leafish = w.post("/v1/trusted-roots", {"certificateType": "MORootCertificate",
                                           "certificate": "not a certificate"}, "admin")
    assert leafish.status_code == 400


# -- item 2: a root transition ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def camp_ctx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             token_root: Path) -> Iterator[Context]:
    yield from _own_context(request, tmp_path_factory, token_root, "camp")


@pytest.fixture(scope="module")
def cw(camp_ctx: Context) -> Iterator[World]:
    yield from _world(camp_ctx, secrets.token_hex(3))


def _secc(ctx: Context, ident: str, tenant: str) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ctx.engine.issue(IssueRequest(profile="secc", public_key=key.public_key(),
                                           subject=SubjectFields(cn=ident, o="Test", c="DE", dc="CPO"),
                                           identifier=ident, tenant=tenant, actor="test"))
    return ctx.engine.get_certificate(issued.serial, issued.issuer)


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of ``name`` carrying these labels, from Prometheus text."""
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_rollover_campaign_from_new_root_to_withdrawal(cw: World) -> None:
    ctx = cw.ctx
    old = root(ctx, "v2g-root")
    stations = [cw.station("cpo") for _ in range(4)]
    base = [("CSMSRootCertificate", root(ctx, "csms-root"), "hex"), ("MORootCertificate", root(ctx, "mo-root"), "hex"),
            ("V2GRootCertificate", old, "hex")]
    for st in stations:
        assert check_plan(cw.plan(st, report(*base)).json(), "2.0.1") == {"install": [], "delete": []}
    before_secc = _secc(ctx, f"DE*ABC*E{secrets.token_hex(3).upper()}", cw.org["cpo"])
    assert before_secc.issuer == "cpo-sub2"

    # 1. rollover: the new root is staged — in the plans, issuing nothing
    r = lifecycle.rollover_root(ctx, "v2g-root", actor="test")
    new_name = r.new
    new = root(ctx, new_name)
    assert ctx.engine.ca(new_name).row.status == "staged"
    with pytest.raises(Exception, match="under way"):
        lifecycle.rollover_root(ctx, "v2g-root", actor="test")  # one transition at a time
    plan = check_plan(cw.plan(stations[0], report(*base)).json(), "2.0.1")
    assert installs(plan) == [("V2GRootCertificate", new.subject.rfc4514_string())]
    check_plan(cw.plan(stations[0], report(*base), "2.1").json(), "2.1")
    during = _secc(ctx, f"DE*ABC*E{secrets.token_hex(3).upper()}", cw.org["cpo"])
    assert ctx.engine.chain(during.issuer)[-1] == old, "nothing is issued under the staged root"
    with ctx.db.session() as s:
        under_new = list(s.exec(select(Certificate).where(Certificate.issuer == new_name)))
    # the root's own (self-signed) certificate and its delegated OCSP signer, nothing else
    assert {c.profile for c in under_new} == {"v2g-root", "ocsp-signer"}

    # 2. coverage rises as stations report the new root
    def cov() -> dict[str, Any]:
        res = cw.get(f"/v1/roots/{new_name}/coverage", "admin")
        assert res.status_code == 200, res.text
        return dict(res.json())

    assert cov()["coverage"] == 0.0 and cov()["campaign"]["state"] == "distributing"
    with_new = report(*base, ("V2GRootCertificate", new, "b64"))
    for st in stations[:2]:
        assert check_plan(cw.plan(st, with_new).json(), "2.0.1")["install"] == []
    c = cov()
    assert (c["stations"], c["with_root"], c["coverage"]) == (4, 2, 0.5)
    assert [(o["org"], o["stations"], o["with_root"]) for o in c["per_cpo"]] == [(cw.org["cpo"], 4, 2)]
    mine = cw.get(f"/v1/roots/{new_name}/coverage", "cpo2").json()  # a CPO sees its own stations only
    assert mine["per_cpo"] == [] and mine["stations"] == 0
    metrics = cw.client.get("/metrics").text
    assert _metric(metrics, "v2gpki_root_coverage_ratio", root=new_name) == 0.5
    assert _metric(metrics, "v2gpki_root_coverage_stations", root=new_name, org=cw.org["cpo"], kind="with_root") == 2

    # the console's trust-list page shows the transition, each CPO its own stations
    from tests.test_console import BASE, sign_in

    console = TestClient(cw.client.app, base_url=BASE)
    sign_in(console, cw.keys["cpo"]["Authorization"].split(" ", 1)[1])
    page = console.get("/console/trust-lists")
    assert page.status_code == 200 and "Root transitions" in page.text and new_name in page.text
    assert cw.org["cpo"] in page.text and "50.0 %" in page.text

    # 3. the switch: refused below the threshold (95 %), by an admin only; allowed at it
    refused = cw.post(f"/v1/roots/{new_name}/switch", {}, "admin")
    assert refused.status_code == 409 and refused.json()["type"].endswith("/coverage-too-low")
    assert "2 of 4 stations" in refused.json()["detail"]
    assert cw.post(f"/v1/roots/{new_name}/switch", {"force": True}, "cpo").status_code == 403
    for st in stations[2:]:
        cw.plan(st, with_new)
    assert cov()["coverage"] == 1.0
    sw = cw.post(f"/v1/roots/{new_name}/switch", {}, "admin")
    assert sw.status_code == 200, sw.text
    assert sw.json()["campaign"]["state"] == "switched" and not sw.json()["campaign"]["forced"]
    successors = sw.json()["campaign"]["successors"]
    assert successors["cpo-sub2"].startswith("cpo-sub2-g") and successors["cps-sub2"].startswith("cps-sub2-g")
    after = _secc(ctx, f"DE*ABC*E{secrets.token_hex(3).upper()}", cw.org["cpo"])
    assert after.issuer == successors["cpo-sub2"] and ctx.engine.chain(after.issuer)[-1] == new

    # 4. withdrawal: refused while certificates under the old root are valid and not replaced
    blocked = cw.post("/v1/roots/v2g-root/withdraw", {}, "admin")
    assert blocked.status_code == 409 and blocked.json()["type"].endswith("/root-in-use")
    assert "still valid and not replaced" in blocked.json()["detail"]
    for c_old in (before_secc, during):  # replaced by certificates from the new hierarchy
        _secc(ctx, str(c_old.identifier), cw.org["cpo"])
    left = {c.identifier for c in root_campaign.blocking_certificates(ctx, "v2g-root")}
    assert left == {"cps-leaf"}, left  # the CPS signer: renewed into the new hierarchy
    with ctx.db.session() as s:
        cps = s.exec(select(Certificate).where(Certificate.identifier == "cps-leaf", Certificate.status == "valid")
                     .order_by(col(Certificate.id).desc())).first()
    assert cps is not None
    res = lifecycle.renew(ctx, cps, now=utcnow() + timedelta(seconds=1))
    assert res.state == "done"
    assert ctx.engine.get_certificate(str(res.new_serial)).issuer == successors["cps-sub2"]
    assert root_campaign.blocking_certificates(ctx, "v2g-root") == []
    wd = cw.post("/v1/roots/v2g-root/withdraw", {}, "admin")
    assert wd.status_code == 200, wd.text
    assert wd.json()["campaign"]["state"] == "withdrawn" and "cpo-sub2" in wd.json()["retired"]
    assert ctx.engine.ca("v2g-root").row.status == "retired"

    # 5. the plans delete the old root from stations that still report it, in their own encoding
    for version in ("2.0.1", "2.1"):
        plan = check_plan(cw.plan(stations[0], with_new, version).json(), version)
        assert plan["install"] == []
        assert [d["certificateHashData"] for d in plan["delete"]] == [hash_data(old)]
    stale = report(*base)  # a station that never took the new root: install it, delete the old one
    plan = check_plan(cw.plan(stations[3], stale).json(), "2.0.1")
    assert installs(plan) == [("V2GRootCertificate", new.subject.rfc4514_string())] and len(plan["delete"]) == 1
    # and the trust lists distrust it
    from pki import trustlist

    content = trustlist.build_content(ctx, "v2g")
    assert {"v2g-root"} <= {d["name"] for d in content["distrusted"] if d["reason"] == "withdrawn"}
    assert new_name in {a["name"] for a in content["anchors"]} and "v2g-root" not in {a["name"] for a in content["anchors"]}


def test_cli_switch_forced_below_threshold(cw: World) -> None:
    """`v2gpki root switch` refuses below the threshold (exit 5), `--force` switches; `root coverage` and the
    dry runs print without changing anything."""
    from tests.conftest import cli_env, run_cli

    ctx = cw.ctx
    if not ctx.db.is_sqlite:
        pytest.skip("the CLI is exercised once, on SQLite")
    env = cli_env(ctx, V2GPKI_HIERARCHY_FILE=str(ctx.settings.hierarchy_file))
    ro = run_cli(["root", "rollover", "mo-root", "--yes"], env)
    assert ro.returncode == 0, ro.stderr
    ctx.engine.reload_cas()
    camp = root_campaign.campaign_of(ctx, "mo-root")
    assert camp is not None and camp.state == "distributing"
    covp = run_cli(["root", "coverage", camp.new_root], env)
    assert covp.returncode == 0 and "switch threshold 95.0%" in covp.stdout, covp.stderr
    dry = run_cli(["root", "switch", camp.new_root], env)
    assert dry.returncode == 0 and "dry run" in dry.stdout
    refused = run_cli(["root", "switch", camp.new_root, "--yes"], env)
    assert refused.returncode == 5 and "below the threshold" in refused.stderr, refused.stderr
    forced = run_cli(["root", "switch", camp.new_root, "--yes", "--force"], env)
    assert forced.returncode == 0 and "(forced)" in forced.stdout, forced.stderr
    camp = root_campaign.campaign_of(ctx, camp.new_root)
    assert camp is not None and camp.state == "switched" and camp.forced
    again = run_cli(["root", "withdraw", "mo-root", "--yes"], env)
    assert again.returncode == 0, again.stderr  # nothing was issued under the old MO hierarchy here
    mfr = Path(ctx.settings.home_dir) / "mfr.pem"
    mfr.write_text(pem_of(foreign_root("CLI Manufacturer Root")))
    imp = run_cli(["root", "import", "--type", "ManufacturerRootCertificate", str(mfr)], env)
    assert imp.returncode == 0 and "for every CPO" in imp.stdout, imp.stderr
    dup = run_cli(["root", "import", "--type", "ManufacturerRootCertificate", str(mfr)], env)
    assert dup.returncode == 5


def test_own_manufacturer_root_only_where_configured() -> None:
    """A Manufacturer root of this PKI (`v2gpki firmware setup`) is pushed only to a CPO whose policy names it
    (truststore_manufacturer_roots): it makes a station accept that manufacturer's firmware (OCPP 2.0.1 L01)."""
    from pki.truststore_plan import KnownRoot, compute_plan, policy_of

    cert = foreign_root("ACME Manufacturer Root CA")
    k = KnownRoot("mfr-root-acme", "ManufacturerRootCertificate", cert, cert.fingerprint(hashes.SHA256()).hex(), True)
    types, inc20, mfr = policy_of({}, "2.0.1")
    assert compute_plan([k], [], "2.0.1", types=types, iso15118_20=inc20, manufacturer_roots=mfr).install == []
    types, inc20, mfr = policy_of({"truststore_manufacturer_roots": ["mfr-root-acme"]}, "2.0.1")
    plan = compute_plan([k], [], "2.0.1", types=types, iso15118_20=inc20, manufacturer_roots=mfr)
    assert [p["certificateType"] for p in check_plan(plan.payload(), "2.0.1")["install"]] == \
        ["ManufacturerRootCertificate"]
