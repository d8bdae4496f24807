"""Tenancy and registration-authority holes of issue #21 (items 3, 4, 5, 6 and 14), on SQLite and
PostgreSQL through the real API (TestClient) and the real CLI:

 3. /ocpp/v201/authorize answers the CSMS (cpo) and admins only;
 4. identifier prefixes are exclusive per kind (normalised: 'de-aaa' is 'DE*AAA', 'DE8AA' is 'DE-8AA');
 5. a charging-station identity belongs to one organization;
 6. the SECC certificate's O is the CPO's registered name; no control characters in any DN attribute;
14. EVerest's ChargingStationCertificate CSR (C, O, CN and DC=CPO) is accepted, the certificate has no DC.

Every refusal is a 4xx application/problem+json (or a CLI exit code) and leaves nothing stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlmodel import func, select

from api.app import create_app
from pki.context import Context
from pki.csr import SubjectFields, check_csr, parse_csr
from pki.errors import BadSubject, Conflict
from pki.issuance import IssueRequest
from pki.orgs import BadOrganization, create_api_key, create_org
from pki.store.models import Certificate, Organization, Station
from tests import ocpp_schemas
from tests.conftest import cli_env, csr_pem, org_with_fresh_prefix, run_cli

PROBLEM = "application/problem+json"
WHO = ("alpha", "beta", "emsp", "oem", "admin", "auditor")


@dataclass
class World:
    client: TestClient
    ctx: Context
    tag: str
    names: dict[str, str]  # who → organization name
    prefixes: dict[str, str]  # who → its prefix
    keys: dict[str, str]

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


def _rand(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@pytest.fixture(scope="module")
def w(ctx: Context) -> Iterator[World]:
    tag = secrets.token_hex(3)
    names = {"alpha": f"CPO Alpha {tag}", "beta": f"CPO Beta {tag}", "emsp": f"eMSP One {tag}",
             "oem": f"OEM One {tag}", "admin": f"Admin {tag}", "auditor": f"Auditor {tag}"}
    prefixes = {
        "alpha": org_with_fresh_prefix(ctx, names["alpha"], "cpo"),
        # Beta may enroll ChargingStationCertificates for unregistered stations: exclusivity must hold
        # for such an organization too
        "beta": org_with_fresh_prefix(ctx, names["beta"], "cpo", settings={"allow_any_station": True}),
        "emsp": org_with_fresh_prefix(ctx, names["emsp"], "emsp"),
        "oem": org_with_fresh_prefix(ctx, names["oem"], "oem"),
    }
    create_org(ctx.db, names["admin"], "admin", [])
    create_org(ctx.db, names["auditor"], "auditor", [])
    keys = {who: create_api_key(ctx.db, names[who])[0] for who in WHO}
    with TestClient(create_app(ctx)) as client:
        yield World(client, ctx, tag, names, prefixes, keys)


def _count(ctx: Context, model: Any) -> int:  # noqa: ANN401 - a SQLModel table class
    with ctx.db.session() as s:
        return int(s.exec(select(func.count()).select_from(model)).one())


def _is_problem(r: Any, status: int) -> None:  # noqa: ANN401 - httpx.Response
    assert r.status_code == status, r.text
    if r.request.url.path == "/ocpp/v201/sign-certificate":
        # what the CSMS forwards to the station: the OCPP rejection, the problem code in a header (#24)
        assert ocpp_schemas.check("2.0.1", "SignCertificateResponse", r.json())["status"] == "Rejected"
        assert r.headers["X-V2GPKI-Problem"]
        return
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]


def _evseid(prefix: str) -> str:
    return f"{prefix}*E{_rand(6)}"


def _sign(w: World, who: str, csr: bytes, ctype: str) -> Any:  # noqa: ANN401 - httpx.Response
    return w.client.post("/ocpp/v201/sign-certificate", json={"csr": csr.decode(), "certificateType": ctype},
                         headers=w.h(who))


# -- item 3: /ocpp/v201/authorize answers cpo and admin only -------------------------------------------


def test_authorize_refused_to_emsp_oem_and_auditor(w: World) -> None:
    """#21 item 3: before the fix every role got Accepted/Unknown, an oracle on competitors' contracts."""
    emaid = f"{w.prefixes['emsp'].replace('-', '')}{_rand(9)}"
    body = {"idToken": {"idToken": emaid, "type": "eMAID"}}
    for who in ("emsp", "oem", "auditor"):
        r = w.client.post("/ocpp/v201/authorize", json=body, headers=w.h(who))
        _is_problem(r, 403)
        assert "idTokenInfo" not in r.json()
    for who in ("alpha", "admin"):
        r = w.client.post("/ocpp/v201/authorize", json=body, headers=w.h(who))
        assert r.status_code == 200, r.text
        assert r.json()["idTokenInfo"]["status"] in ("Unknown", "Invalid")


# -- item 4: exclusive prefixes ------------------------------------------------------------------------


def _variants(prefix: str) -> list[str]:
    flat = prefix.replace("*", "").replace("-", "")
    return [flat.lower(), f"{flat[:2].lower()}-{flat[2:].lower()}", f"{flat[:2]}*{flat[2:].lower()}", flat]


def test_overlapping_prefix_refused_in_the_library(w: World) -> None:
    """#21 item 4: 'de-aaa' vs Alpha's 'DE*AAA', 'DE8AA' vs 'DE-8AA', the same WMI: Conflict naming the
    organization that holds the prefix, and nothing stored."""
    orgs = _count(w.ctx, Organization)
    cases = [("cpo", v, "alpha") for v in _variants(w.prefixes["alpha"])]
    cases += [("emsp", v, "emsp") for v in (w.prefixes["emsp"].replace("-", ""), w.prefixes["emsp"].lower())]
    cases += [("oem", w.prefixes["oem"].lower(), "oem")]
    for i, (role, prefix, holder) in enumerate(cases):
        with pytest.raises(Conflict) as exc:
            create_org(w.ctx.db, f"Gamma {w.tag} {i}", role, [prefix])
        assert w.names[holder] in exc.value.message and "overlaps" in exc.value.message
    # the same identifiers twice in one request
    with pytest.raises(BadOrganization, match="overlap"):
        create_org(w.ctx.db, f"Gamma {w.tag} twice", "cpo", ["FR*QQ1", "fr-qq1"])
    assert _count(w.ctx, Organization) == orgs
    # another kind may use the same letters: an eMSP's provider ID is not a CPO's operator ID
    flat = w.prefixes["alpha"].replace("*", "")
    try:
        create_org(w.ctx.db, f"Gamma {w.tag} emsp", "emsp", [f"{flat[:2]}-{flat[2:]}"])
    except Conflict as exc:  # only if another test module's eMSP drew these letters
        assert "overlaps" in exc.message and w.names["alpha"] not in exc.message


def test_overlap_is_onto_inside_or_around() -> None:
    from pki.orgs import _overlaps

    assert _overlaps("de-aaa", "DE*AAA") and _overlaps("DE8AA", "DE-8AA")
    assert _overlaps("DE*AA", "DEAAA") and _overlaps("DEAAA", "DE*AA")  # inside / around
    assert not _overlaps("DE*AAA", "DE*AAB") and not _overlaps("DE*AAA", "FR*AAA")


def test_overlapping_prefix_refused_by_the_cli(w: World) -> None:
    """`v2gpki org create "CPO Gamma" --role cpo --prefix de-aaa`: exit 5 (conflict), one error line that
    names the other organization, no organization created."""
    orgs = _count(w.ctx, Organization)
    env = cli_env(w.ctx)
    flat = w.prefixes["alpha"].replace("*", "")
    res = run_cli(["org", "create", f"CPO Gamma {w.tag}", "--role", "cpo", "--prefix", flat.lower()], env)
    assert res.returncode == 5, res.stderr
    assert res.stdout == ""
    assert res.stderr.startswith("v2gpki: error: ") and w.names["alpha"] in res.stderr
    assert _count(w.ctx, Organization) == orgs


# -- item 5: station identities are exclusive ----------------------------------------------------------


def test_station_identity_exclusive_to_one_organization(w: World) -> None:
    """#21 item 5: Beta cannot register Alpha's station identity (any case), nor Alpha's EVSEID as a station,
    nor get a ChargingStationCertificate for either — although Beta may enroll unregistered stations."""
    station = f"CS-{_rand(8)}"
    assert w.client.post("/v1/stations", json={"identity": station}, headers=w.h("alpha")).status_code == 201
    stations, certs = _count(w.ctx, Station), _count(w.ctx, Certificate)
    for ident in (station, station.lower(), _evseid(w.prefixes["alpha"])):
        _is_problem(w.client.post("/v1/stations", json={"identity": ident}, headers=w.h("beta")), 409)
        r = _sign(w, "beta", csr_pem(ident, o=w.names["beta"], c=None), "ChargingStationCertificate")
        _is_problem(r, 403)
        assert r.json()["statusInfo"]["reasonCode"] == "NotAuthorized"
        r = w.client.post("/v1/enrollments", json={"csr": csr_pem(ident, o=w.names["beta"], c=None).decode(),
                                                   "profile": "cs-client"}, headers=w.h("beta"))
        _is_problem(r, 403)
    assert (_count(w.ctx, Station), _count(w.ctx, Certificate)) == (stations, certs)
    # Alpha, the owner, still enrolls it
    r = _sign(w, "alpha", csr_pem(station, o=w.names["alpha"], c=None), "ChargingStationCertificate")
    assert r.status_code == 200, r.text


def test_station_certified_elsewhere_cannot_be_taken(w: World) -> None:
    """A station Beta enrolled without registering it (allow_any_station) is Beta's: Alpha can neither
    register it nor enroll it."""
    station = f"CS-{_rand(8)}"
    assert _sign(w, "beta", csr_pem(station, o=w.names["beta"], c=None),
                 "ChargingStationCertificate").status_code == 200
    stations, certs = _count(w.ctx, Station), _count(w.ctx, Certificate)
    _is_problem(w.client.post("/v1/stations", json={"identity": station}, headers=w.h("alpha")), 409)
    _is_problem(_sign(w, "alpha", csr_pem(station, o=w.names["alpha"], c=None), "ChargingStationCertificate"), 403)
    assert (_count(w.ctx, Station), _count(w.ctx, Certificate)) == (stations, certs)


# -- item 6: the SECC certificate's O; control characters ----------------------------------------------


def test_secc_organization_bound_to_the_tenant(w: World) -> None:
    """#21 item 6: Beta used to get a SECC certificate reading O=CPO Alpha."""
    certs = _count(w.ctx, Certificate)
    ev = _evseid(w.prefixes["beta"])
    for o in (w.names["alpha"], w.names["beta"].upper()):
        r = w.client.post("/v1/enrollments", json={"csr": csr_pem(ev, o=o, dc="CPO").decode(), "profile": "secc"},
                          headers=w.h("beta"))
        _is_problem(r, 403)
        _is_problem(_sign(w, "beta", csr_pem(ev, o=o, dc="CPO"), "V2GCertificate"), 403)
    assert _count(w.ctx, Certificate) == certs
    r = _sign(w, "beta", csr_pem(ev, o=w.names["beta"], dc="CPO"), "V2GCertificate")
    assert r.status_code == 200, r.text
    leaf = x509.load_pem_x509_certificates(r.json()["certificateChain"].encode())[0]
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == w.names["beta"]


CONTROL = ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9b"]


def _subject_for(profile: str, w: World) -> dict[str, str | None]:
    subjects: dict[str, dict[str, str | None]] = {
        "secc": {"cn": _evseid(w.prefixes["alpha"]), "o": w.names["alpha"], "c": "DE", "dc": "CPO"},
        "cs-client": {"cn": f"CS-{_rand(6)}", "o": w.names["alpha"], "c": "DE", "dc": None},
        "contract": {"cn": f"{w.prefixes['emsp'].replace('-', '')}{_rand(9)}", "o": w.names["emsp"], "c": "DE",
                     "dc": "MO"},
        "oem-prov": {"cn": f"{w.prefixes['oem']}{_rand(14)}", "o": w.names["oem"], "c": "DE", "dc": "OEM"},
        "csms-server": {"cn": "csms.example.com", "o": w.names["alpha"], "c": "DE", "dc": None},
        "api-client": {"cn": "client", "o": w.names["alpha"], "c": "DE", "dc": None},
    }
    return subjects[profile]


@pytest.mark.parametrize("profile", ["secc", "cs-client", "contract", "oem-prov", "csms-server", "api-client"])
@pytest.mark.parametrize("attr", ["cn", "o", "dc"])
def test_control_characters_refused_in_every_dn_attribute(w: World, profile: str, attr: str) -> None:
    """#21 item 6: 'O' with NUL or LF was signed as is. Any C0/DEL/C1 control in CN, O or DC of any
    profile's request is refused (C is ISO 3166 alpha-2 and refused as such)."""
    prof = w.ctx.profiles.get(profile)
    for ch in CONTROL:
        subj = _subject_for(profile, w)
        base = subj[attr] or "CPO"
        for value in (base + ch, ch + base, base[:2] + ch + base[2:]):
            subj[attr] = value
            csr = _csr_any(subj)
            with pytest.raises(BadSubject, match="control character|not a valid"):
                check_csr(prof, parse_csr(csr))


def _csr_any(subj: dict[str, str | None], order: tuple[str, ...] = ("cn", "o", "c", "dc"),
             extensions: bool = False) -> bytes:
    oids = {"cn": NameOID.COMMON_NAME, "o": NameOID.ORGANIZATION_NAME, "c": NameOID.COUNTRY_NAME,
            "dc": NameOID.DOMAIN_COMPONENT}
    # a DC with a C1 control cannot be an IA5String: sent as a UTF8String, as a hostile client may
    attrs = [x509.NameAttribute(oids[k], v, _validate=False, _type=_ASN1Type.UTF8String)
             if k == "dc" and not v.isascii() else x509.NameAttribute(oids[k], v, _validate=False)
             for k in order if (v := subj.get(k))]
    key = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.RelativeDistinguishedName([a])
                                                                        for a in attrs]))
    if extensions:  # what evse_security adds (not copied: the CA applies its profile)
        b = b.add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), False)
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_control_characters_refused_over_the_api_nothing_stored(w: World) -> None:
    certs = _count(w.ctx, Certificate)
    ev = _evseid(w.prefixes["alpha"])
    for o in (w.names["alpha"] + "\x00", w.names["alpha"] + "\n", "\n" + w.names["alpha"]):
        r = w.client.post("/v1/enrollments", json={"csr": _csr_any({"cn": ev, "o": o, "c": "DE", "dc": "CPO"}).decode(),
                                                   "profile": "secc"}, headers=w.h("alpha"))
        _is_problem(r, 400)
        assert r.json()["type"].endswith("bad-subject")
        # admins are not bound to an O, but control characters are refused for them too
        r = w.client.post("/v1/enrollments", json={"csr": _csr_any({"cn": ev, "o": o, "c": "DE", "dc": "CPO"}).decode(),
                                                   "profile": "secc"}, headers=w.h("admin"))
        _is_problem(r, 400)
    assert _count(w.ctx, Certificate) == certs


def test_engine_refuses_control_characters_whatever_the_path(w: World) -> None:
    """The engine checks the subject it signs too (renewals, CPS, init do not pass through a CSR)."""
    certs = _count(w.ctx, Certificate)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(BadSubject, match="control character"):
        w.ctx.engine.issue(IssueRequest(profile="cs-client", public_key=key,
                                        subject=SubjectFields(cn="CS-1", o="CPO\nAlpha", c=None, dc=None),
                                        identifier="CS-1", tenant=w.names["alpha"], actor="test"))
    assert _count(w.ctx, Certificate) == certs


# -- item 14: EVerest's ChargingStationCertificate CSR ---------------------------------------------------


def test_everest_charging_station_csr_accepted(w: World) -> None:
    """#21 item 14: evse_security's x509_generate_csr writes C, O, CN, then DC=CPO (in that order) with
    keyUsage and basicConstraints extensions for every CSR, the ChargingStationCertificate's too. It used
    to be refused ("subject DC=CPO contradicts profile"); the certificate follows cs-client: no DC."""
    station = f"EVerest-{_rand(6)}"
    assert w.client.post("/v1/stations", json={"identity": station}, headers=w.h("alpha")).status_code == 201
    csr = _csr_any({"c": "DE", "o": w.names["alpha"], "cn": station, "dc": "CPO"}, order=("c", "o", "cn", "dc"),
                   extensions=True)
    r = _sign(w, "alpha", csr, "ChargingStationCertificate")
    assert r.status_code == 200, r.text
    assert r.json()["certificateType"] == "ChargingStationCertificate"
    leaf = x509.load_pem_x509_certificates(r.json()["certificateChain"].encode())[0]
    assert leaf.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT) == []
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == station
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == w.names["alpha"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]  # the profile's, not the CSR's
    # a DC the profile sets is still checked: DC=MO in a SECC request contradicts DC=CPO
    ev = _evseid(w.prefixes["alpha"])
    r = _sign(w, "alpha", _csr_any({"c": "DE", "o": w.names["alpha"], "cn": ev, "dc": "MO"}), "V2GCertificate")
    _is_problem(r, 400)
