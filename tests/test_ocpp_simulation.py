"""A charging station per OCPP version (1.6, 2.0.1, 2.1) talks to a CSMS over websockets; the CSMS forwards
every certificate message over HTTP to this service and relays the answers, as a CSMS integrating v2gpki
does (issue #24 item 4).

Both ends are the PyPI `ocpp` package's ChargePoint classes (ocpp.v16 / ocpp.v201 / ocpp.v21) with their
default JSON-schema validation on both sides: a request or answer that is not a valid message of its
version fails the call. The CSMS below is deliberately minimal: it posts the payload the station sent, as
received, to /ocpp/v16/data-transfer, /ocpp/v201/... or /ocpp/v21/..., answers the station with what comes
back and sends what the service says comes next (CertificateSigned; in 1.6 a DataTransfer from `next`).
The service runs under a real uvicorn server on loopback (tests.conftest.serve_in_thread), websockets on
127.0.0.1 only.

Per version, one station (its own EVSEID under the CPO's prefix, its own P-256 key):
  * SignCertificate (V2GCertificate; 2.1 also with requestId and hashRootCertificate, then a
    V2G20Certificate with a P-521 key) → Accepted → CertificateSigned from the CSMS; the station checks the
    chain (its own key in the leaf, each certificate issued by the next, the last by a V2G root from
    GET /v1/truststores/v2g — or the -20 root for V2G20Certificate) and answers Accepted only then;
  * Get15118EVCertificate with an ISO 15118-2 CertificateInstallationReq built and signed by the
    independent vehicle (Josev, tests/peers/josev_ev.py) → Accepted exiResponse, verified by Josev
    (signature, digests, both chains, decrypted contract key);
  * the CPO revokes the station's SECC certificate through POST /v1/certificates/.../revoke; then
    GetCertificateStatus → Accepted with an OCSP response that says revoked (checked with cryptography:
    CertID, responder signature by the delegated signer of the issuing CA); for 2.1 also
    GetCertificateChainStatus (station → CSMS in OCPP 2.1) → leaf Revoked by OCSP and CRL, Sub-CAs Good.

Runs on the `ctx` fixture: SQLite and PostgreSQL (issuance, revocation and OCSP go through the database).
Without the Josev peer the test is skipped, unless CI or V2GPKI_TEST_REQUIRE_PEERS is set: then it fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from ocpp import v16, v21, v201
from ocpp.charge_point import camel_to_snake_case
from ocpp.exceptions import OCPPError
from ocpp.routing import after, on
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from api.app import create_app
from pki.context import Context
from pki.crl import generate_crl
from pki.orgs import create_api_key
from pki.roots import root_hash_data
from pki.store.db import utcnow
from tests import ocpp_schemas
from tests.conftest import csr_pem, org_with_fresh_prefix, serve_in_thread
from tests.test_cps_josev import Peer, assert_accepted_by_josev, josev  # noqa: F401 - josev: the peer fixture

ISO2 = "urn:iso:15118:2:2013:MsgDef"
PNC = "org.openchargealliance.iso15118pnc"
SCENARIO_TIMEOUT = 300.0  # seconds for one station's whole session (Josev's checks included)
STEP_TIMEOUT = 60.0  # seconds for one OCPP exchange, one HTTP call or one awaited event
SUBPROTOCOL = {"1.6": "ocpp1.6", "2.0.1": "ocpp2.0.1", "2.1": "ocpp2.1"}


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


# -- the service, its tenants --------------------------------------------------------------------------------


@dataclass
class Service:
    url: str
    ctx: Context
    h: dict[str, dict[str, str]]
    prefix: dict[str, str]
    org: dict[str, str]


@pytest.fixture(scope="module")
def service(ctx: Context) -> Iterator[Service]:
    tag = secrets.token_hex(3)
    org, prefix, h = {}, {}, {}
    for who in ("cpo", "emsp", "oem"):
        org[who] = f"sim-{who}-{tag}"
        prefix[who] = org_with_fresh_prefix(ctx, org[who], who)
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, org[who])[0]}"}
    for ca in ("cpo-sub2", "cpo-sub1", "v2g-root"):
        generate_crl(ctx, ca)  # GetCertificateChainStatus with source CRL answers until the CRL's nextUpdate
    url, stop = serve_in_thread(create_app(ctx))
    try:
        yield Service(url, ctx, h, prefix, org)
    finally:
        stop()


@pytest.fixture(scope="module")
def peer(request: pytest.FixtureRequest) -> Peer:
    """The Josev vehicle (tests/test_cps_josev.py's module fixture `josev`: started once, a missing peer is a
    skip, or a failure under CI / V2GPKI_TEST_REQUIRE_PEERS)."""
    out: Peer = request.getfixturevalue("josev")
    return out


# -- the CSMS: forwards each station message over HTTP, relays the answers -----------------------------------


Tamper = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class Relay:
    """The CSMS's HTTP side: one Bearer key (the CPO's), every exchange logged."""

    http: httpx.AsyncClient
    tamper: Tamper | None = None  # for the negative test: alters an answer before the CSMS uses it
    log: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        r = await self.http.post(path, json=body)
        assert r.headers["content-type"].startswith("application/json"), (path, r.status_code, r.text)
        out: dict[str, Any] = r.json()
        if self.tamper is not None:
            out = self.tamper(path, out)
        self.log.append((path, r.status_code, out))
        return r.status_code, out


class _Csms:
    """What every version's CSMS shares: the raw payload of the call being handled (forwarded as the
    station sent it, not re-serialized), what it sent the station next and what the station answered."""

    prefix = ""

    def __init__(self, station_id: str, connection: ServerConnection, relay: Relay) -> None:
        super().__init__(station_id, connection, response_timeout=STEP_TIMEOUT)  # type: ignore[call-arg]
        self.relay = relay
        self.raw: dict[str, Any] = {}
        self.pending: list[dict[str, Any]] = []  # what to send the station after answering it
        self.followups: asyncio.Queue[tuple[dict[str, Any], Any]] = asyncio.Queue()  # (sent, station's answer)

    async def _handle_call(self, msg: Any) -> Any:  # noqa: ANN401 - ocpp.messages.Call
        self.raw = msg.payload  # calls are handled one at a time per connection (ChargePoint.start)
        return await super()._handle_call(msg)  # type: ignore[misc]

    async def forward(self, path: str, result: Any) -> Any:  # noqa: ANN401 - a call_result class and instance
        body = (await self.relay.post(f"{self.prefix}/{path}", self.raw))[1]
        return result(**camel_to_snake_case(body))

    async def send_pending(self, make: Any) -> None:  # noqa: ANN401 - a call class
        while self.pending:
            payload = self.pending.pop(0)
            try:
                answer = await self.call(make(**camel_to_snake_case(payload)), suppress=False)  # type: ignore[attr-defined]
            except Exception as exc:  # an after-hook runs as a detached task: hand failures to the test
                answer = exc
            await self.followups.put((payload, answer))


class _Csms2(_Csms):
    """OCPP 2.0.1 / 2.1: one endpoint per message under /ocpp/v201 or /ocpp/v21."""

    async def _sign(self) -> Any:  # noqa: ANN401
        status, body = await self.relay.post(f"{self.prefix}/sign-certificate", self.raw)
        result = self._call_result.SignCertificate  # type: ignore[attr-defined]
        if status == 200:  # the CertificateSignedRequest: SignCertificate is Accepted, the chain follows
            self.pending.append(body)
            return result(status="Accepted")
        return result(**camel_to_snake_case(body))  # the Rejected SignCertificateResponse, as is


class Csms201(_Csms2, v201.ChargePoint):
    prefix = "/ocpp/v201"

    @on("SignCertificate")
    async def on_sign_certificate(self, **_: Any) -> Any:  # noqa: ANN401
        return await self._sign()

    @after("SignCertificate")
    async def after_sign_certificate(self, **_: Any) -> None:
        await self.send_pending(v201.call.CertificateSigned)

    @on("Get15118EVCertificate")
    async def on_get_15118_ev_certificate(self, **_: Any) -> Any:  # noqa: ANN401
        return await self.forward("get-15118-ev-certificate", v201.call_result.Get15118EVCertificate)

    @on("GetCertificateStatus")
    async def on_get_certificate_status(self, **_: Any) -> Any:  # noqa: ANN401
        return await self.forward("get-certificate-status", v201.call_result.GetCertificateStatus)


class Csms21(_Csms2, v21.ChargePoint):
    prefix = "/ocpp/v21"

    @on("SignCertificate")
    async def on_sign_certificate(self, **_: Any) -> Any:  # noqa: ANN401
        return await self._sign()

    @after("SignCertificate")
    async def after_sign_certificate(self, **_: Any) -> None:
        await self.send_pending(v21.call.CertificateSigned)

    @on("Get15118EVCertificate")
    async def on_get_15118_ev_certificate(self, **_: Any) -> Any:  # noqa: ANN401
        return await self.forward("get-15118-ev-certificate", v21.call_result.Get15118EVCertificate)

    @on("GetCertificateStatus")
    async def on_get_certificate_status(self, **_: Any) -> Any:  # noqa: ANN401
        return await self.forward("get-certificate-status", v21.call_result.GetCertificateStatus)

    @on("GetCertificateChainStatus")
    async def on_get_certificate_chain_status(self, **_: Any) -> Any:  # noqa: ANN401
        return await self.forward("get-certificate-chain-status", v21.call_result.GetCertificateChainStatus)


class Csms16(_Csms, v16.ChargePoint):
    """OCPP 1.6: every DataTransfer goes to /ocpp/v16/data-transfer; `conf` is the answer, `next` the
    DataTransfer.req to send afterwards (CertificateSigned)."""

    @on("DataTransfer")
    async def on_data_transfer(self, **_: Any) -> Any:  # noqa: ANN401
        body = (await self.relay.post("/ocpp/v16/data-transfer", self.raw))[1]
        self.pending.extend(body["next"])
        return v16.call_result.DataTransfer(**camel_to_snake_case(body["conf"]))

    @after("DataTransfer")
    async def after_data_transfer(self, **_: Any) -> None:
        await self.send_pending(v16.call.DataTransfer)


CSMS_CLASSES: dict[str, type[_Csms]] = {"ocpp1.6": Csms16, "ocpp2.0.1": Csms201, "ocpp2.1": Csms21}


class Csms:
    """The websocket server: one CSMS ChargePoint per connected station, by the path's station id."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stations: dict[str, _Csms] = {}
        self.errors: list[BaseException] = []

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.subprotocol is not None, "a station must negotiate an OCPP subprotocol"
        cp = CSMS_CLASSES[ws.subprotocol](ws.request.path.strip("/") if ws.request else "", ws, self.relay)
        self.stations[cp.id] = cp  # type: ignore[attr-defined]
        try:
            await cp.start()  # type: ignore[attr-defined]
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:
            self.errors.append(exc)
            raise


# -- the charging station ------------------------------------------------------------------------------------


def verify_chain(pem: str, key: ec.EllipticCurvePrivateKey, roots: list[x509.Certificate]) -> list[x509.Certificate]:
    """What a station checks before installing a chain: its own key in the leaf, each certificate issued
    by the next, the last by a root it trusts, all valid now. Raises on any failure."""
    chain = x509.load_pem_x509_certificates(pem.encode())
    assert chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for cert, issuer in zip(chain, chain[1:], strict=False):
        cert.verify_directly_issued_by(issuer)
    anchors = [r for r in roots if r.subject == chain[-1].issuer]
    assert anchors, f"no trusted root named {chain[-1].issuer.rfc4514_string()}"
    for root in anchors:
        try:
            chain[-1].verify_directly_issued_by(root)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise AssertionError("the chain's last certificate is issued by none of the trusted roots")
    now = utcnow()
    assert all(c.not_valid_before_utc <= now <= c.not_valid_after_utc for c in chain)
    return chain


@dataclass
class Enrollment:
    """A SignCertificate the station sent and is waiting to see signed."""

    key: ec.EllipticCurvePrivateKey
    roots: list[x509.Certificate]
    certificate_type: str


class _Station:
    """What every version's station shares: raw payloads of what it received, its pending enrollments
    (in order), the chains it accepted (or why it refused one)."""

    version = ""

    def __init__(self, station_id: str, connection: ClientConnection) -> None:
        super().__init__(station_id, connection, response_timeout=STEP_TIMEOUT)  # type: ignore[call-arg]
        self.enrollments: list[Enrollment] = []
        self.installed: asyncio.Queue[tuple[dict[str, Any], list[x509.Certificate] | str]] = asyncio.Queue()
        self.last_answer: dict[str, Any] = {}
        self.raw_call: dict[str, Any] = {}

    async def _handle_call(self, msg: Any) -> Any:  # noqa: ANN401 - ocpp.messages.Call
        self.raw_call = msg.payload  # the call as it came over the wire
        return await super()._handle_call(msg)  # type: ignore[misc]

    async def _get_specific_response(self, unique_id: str, timeout: float) -> Any:  # noqa: ANN401
        response = await super()._get_specific_response(unique_id, timeout)  # type: ignore[misc]
        self.last_answer = getattr(response, "payload", {})  # the answer as it came over the wire (no CallError)
        return response

    def install(self, signed: dict[str, Any]) -> bool:
        """A CertificateSignedRequest (2.0.1/2.1 payload, camelCase): verify, record, say whether accepted."""
        assert self.enrollments, "CertificateSigned without a pending SignCertificate"
        pending = self.enrollments.pop(0)
        try:
            assert signed.get("certificateType", pending.certificate_type) == pending.certificate_type
            chain: list[x509.Certificate] | str = verify_chain(signed["certificateChain"], pending.key, pending.roots)
        except Exception as exc:
            chain = f"{type(exc).__name__}: {exc}"
        self.installed.put_nowait((signed, chain))
        return not isinstance(chain, str)

    @abstractmethod
    async def request(self, message: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` (its 2.0.1/2.1 payload, camelCase) the way this version carries it; the answer's
        payload (camelCase, as received). Each version's station class carries it its own way."""


class Station2(_Station):
    def _build(self, message: str, p: dict[str, Any]) -> Any:  # noqa: ANN401 - a call dataclass
        call = self._call  # type: ignore[attr-defined]
        if message == "Get15118EVCertificate":  # ocpp names this field differently in v201 and v21
            name = "iso15118_schema_version" if self.version == "2.0.1" else "iso_15118_schema_version"
            return call.Get15118EVCertificate(**{name: p["iso15118SchemaVersion"]}, action=p["action"],
                                              exi_request=p["exiRequest"])
        return getattr(call, message)(**camel_to_snake_case(p))

    async def request(self, message: str, payload: dict[str, Any]) -> dict[str, Any]:
        await self.call(self._build(message, payload), suppress=False)  # type: ignore[attr-defined]
        return self.last_answer


class Station201(Station2, v201.ChargePoint):
    version = "2.0.1"

    @on("CertificateSigned")
    async def on_certificate_signed(self, **_: Any) -> Any:  # noqa: ANN401
        ok = self.install(self.raw_call)
        return v201.call_result.CertificateSigned(status="Accepted" if ok else "Rejected")


class Station21(Station2, v21.ChargePoint):
    version = "2.1"

    @on("CertificateSigned")
    async def on_certificate_signed(self, **_: Any) -> Any:  # noqa: ANN401
        ok = self.install(self.raw_call)
        return v21.call_result.CertificateSigned(status="Accepted" if ok else "Rejected")


class Station16(_Station, v16.ChargePoint):
    """OCPP 1.6 with the OCA's "Using ISO 15118 Plug & Charge with OCPP 1.6": the 2.0.1 payloads as JSON
    strings in DataTransfer (vendorId org.openchargealliance.iso15118pnc); the CSMS's CertificateSigned
    arrives as a DataTransfer.req too."""

    version = "1.6"

    async def request(self, message: str, payload: dict[str, Any]) -> dict[str, Any]:
        ocpp_schemas.check("2.0.1", f"{message}Request", payload)  # the payload the whitepaper wraps
        await self.call(v16.call.DataTransfer(vendor_id=PNC, message_id=message,
                                              data=json.dumps(payload)), suppress=False)
        conf = self.last_answer
        assert conf["status"] == "Accepted", conf
        inner: dict[str, Any] = json.loads(conf["data"])
        return ocpp_schemas.check("2.0.1", f"{message}Response", inner)

    @on("DataTransfer")
    async def on_data_transfer(self, vendor_id: str, message_id: str | None = None, data: str | None = None) -> Any:  # noqa: ANN401
        if vendor_id != PNC:
            return v16.call_result.DataTransfer(status="UnknownVendorId")
        if message_id != "CertificateSigned":
            return v16.call_result.DataTransfer(status="UnknownMessageId")
        signed = ocpp_schemas.check("2.0.1", "CertificateSignedRequest", json.loads(data or ""))
        ok = self.install(signed)
        return v16.call_result.DataTransfer(status="Accepted",
                                            data=json.dumps({"status": "Accepted" if ok else "Rejected"}))


STATION_CLASSES: dict[str, type[_Station]] = {"1.6": Station16, "2.0.1": Station201, "2.1": Station21}


# -- helpers -------------------------------------------------------------------------------------------------


def ocsp_request_data(cert: x509.Certificate, issuer: x509.Certificate) -> dict[str, str]:
    """OCSPRequestDataType as a station computes it for a certificate of its chain."""
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    return {"hashAlgorithm": "SHA256", "issuerNameHash": req.issuer_name_hash.hex(),
            "issuerKeyHash": req.issuer_key_hash.hex(), "serialNumber": format(cert.serial_number, "x")}


def _pem_list(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode()) if text.strip() else []


@dataclass
class Vehicle:
    dir: Path
    emaid: str

    @property
    def files(self) -> dict[str, Any]:
        return {"oem_cert": str(self.dir / "oem.der"), "oem_key": str(self.dir / "oem.pem"),
                "roots": [str(self.dir / "v2g-root.der"), str(self.dir / "mo-root.der")]}


def new_vehicle(svc: Service, http: httpx.Client, d: Path) -> Vehicle:
    """An OEM provisioning certificate (over /v1/enrollments), a contract for its PCID (/v1/contracts) and
    the files Josev reads."""
    d.mkdir(parents=True, exist_ok=True)
    pcid = svc.prefix["oem"] + _a(14)
    key = ec.generate_private_key(ec.SECP256R1())
    r = http.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM", key=key).decode(), "profile": "oem-prov"},
                  headers=svc.h["oem"])
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    (d / "oem.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (d / "oem.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    for name in ("v2g-root", "mo-root"):
        (d / f"{name}.der").write_bytes(svc.ctx.engine.ca(name).cert.public_bytes(serialization.Encoding.DER))
    emaid = svc.prefix["emsp"].replace("-", "") + _a(9)
    r = http.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid,
                                         "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                  headers=svc.h["emsp"])
    assert r.status_code == 201, r.text
    return Vehicle(d, emaid)


# -- the session of one station ------------------------------------------------------------------------------


@dataclass
class Outcome:
    timings: dict[str, float] = field(default_factory=dict)
    relayed: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Link:
    """A station connected to the CSMS, the CSMS's HTTP client (the CPO's key) and its relay log."""

    station: Any  # a _Station that is also an ocpp ChargePoint of its version
    csms: Csms
    http: httpx.AsyncClient
    relay: Relay


@asynccontextmanager
async def linked(version: str, svc: Service, tamper: Tamper | None = None) -> AsyncIterator[Link]:
    """The service's HTTP API ← CSMS (websocket server on 127.0.0.1) ← one station of ``version``; all
    closed on exit, and any error inside the CSMS fails the test."""
    async with httpx.AsyncClient(base_url=svc.url, headers=svc.h["cpo"], timeout=STEP_TIMEOUT) as http:
        relay = Relay(http, tamper)
        csms = Csms(relay)
        async with serve(csms.handler, "127.0.0.1", 0,
                         subprotocols=[Subprotocol(s) for s in SUBPROTOCOL.values()]) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            station_id = f"sim-{version.replace('.', '')}-{_a(6)}"
            async with connect(f"ws://127.0.0.1:{port}/{station_id}",
                               subprotocols=[Subprotocol(SUBPROTOCOL[version])], open_timeout=STEP_TIMEOUT,
                               close_timeout=5) as ws:
                assert ws.subprotocol == SUBPROTOCOL[version]
                station: Any = STATION_CLASSES[version](station_id, ws)
                runner = asyncio.create_task(station.start())
                try:
                    yield Link(station, csms, http, relay)
                finally:
                    runner.cancel()
                    await asyncio.gather(runner, return_exceptions=True)
        assert not csms.errors, csms.errors


async def station_session(version: str, svc: Service, peer: Peer, vehicle: Vehicle, tmp: Path) -> Outcome:
    out = Outcome()
    t0 = time.monotonic()
    async with linked(version, svc) as link:
        out.relayed = link.relay.log
        v2g_roots = _pem_list((await link.http.get("/v1/truststores/v2g")).text)  # public: what a station trusts
        assert v2g_roots
        await exchanges(version, svc, peer, vehicle, tmp, link.station, link.csms, v2g_roots, svc.ctx.engine, out,
                        link.http)
    out.timings["total"] = time.monotonic() - t0
    return out


async def _enroll(station: Any, csms: Csms, payload: dict[str, Any], enrollment: Enrollment) -> tuple[  # noqa: ANN401
        dict[str, Any], list[x509.Certificate]]:
    """SignCertificate → Accepted → CertificateSigned, accepted by the station; the signed payload and chain."""
    station.enrollments.append(enrollment)
    answer = await station.request("SignCertificate", payload)
    assert answer["status"] == "Accepted", answer
    signed, chain = await asyncio.wait_for(station.installed.get(), STEP_TIMEOUT)
    assert not isinstance(chain, str), f"the station refused the chain: {chain}"
    cp = csms.stations[station.id]
    sent, reply = await asyncio.wait_for(cp.followups.get(), STEP_TIMEOUT)
    assert not isinstance(reply, BaseException), reply
    if station.version == "1.6":  # the CSMS's DataTransfer.req carried the service's `next` as is
        assert sent["messageId"] == "CertificateSigned" and json.loads(sent["data"]) == signed
        assert reply.status == "Accepted" and json.loads(reply.data) == {"status": "Accepted"}
    else:
        assert sent == signed  # the station received exactly what the service answered
        assert reply.status == "Accepted"
    return signed, chain


async def exchanges(version: str, svc: Service, peer: Peer, vehicle: Vehicle, tmp: Path,  # noqa: PLR0913
                    station: Any, csms: Csms, v2g_roots: list[x509.Certificate], engine: Any,  # noqa: ANN401
                    out: Outcome, http: httpx.AsyncClient) -> None:
    # 1. SignCertificate → CertificateSigned, verified by the station
    t = time.monotonic()
    key = ec.generate_private_key(ec.SECP256R1())
    evseid = f"{svc.prefix['cpo']}*E{_a(6)}"
    csr = csr_pem(evseid, o=svc.org["cpo"], dc="CPO", key=key).decode()
    payload: dict[str, Any] = {"csr": csr, "certificateType": "V2GCertificate"}
    if version == "2.1":
        h = root_hash_data(engine.ca("v2g-root").cert)
        payload |= {"requestId": 4711, "hashRootCertificate": {
            "hashAlgorithm": h.hash_algorithm, "issuerNameHash": h.issuer_name_hash,
            "issuerKeyHash": h.issuer_key_hash, "serialNumber": h.serial_number}}
    signed, chain = await _enroll(station, csms, payload, Enrollment(key, v2g_roots, "V2GCertificate"))
    leaf, sub2 = chain[0], chain[1]
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == evseid
    assert chain[-1].issuer == engine.ca("v2g-root").cert.subject
    assert format(leaf.serial_number, "X") == signed["customData"]["serialNumber"].lstrip("0")
    if version == "2.1":
        assert signed["requestId"] == 4711
        key20 = ec.generate_private_key(ec.SECP521R1())
        csr20 = csr_pem(f"{svc.prefix['cpo']}*E{_a(6)}", o=svc.org["cpo"], dc="CPO", key=key20).decode()
        signed20, chain20 = await _enroll(
            station, csms, {"csr": csr20, "certificateType": "V2G20Certificate", "requestId": 4712},
            Enrollment(key20, [engine.ca("v2g-root-20").cert], "V2G20Certificate"))
        assert signed20["requestId"] == 4712 and isinstance(chain20[0].public_key().curve, ec.SECP521R1)  # type: ignore[union-attr]
    out.timings["sign"] = time.monotonic() - t

    # 2. Get15118EVCertificate: the vehicle's (Josev's) CertificateInstallationReq, answered and verified
    t = time.monotonic()
    sid = secrets.token_bytes(8).hex()
    req = await asyncio.to_thread(peer, "install-request", session_id=sid, **vehicle.files)
    ev = await station.request("Get15118EVCertificate",
                               {"iso15118SchemaVersion": ISO2, "action": "Install", "exiRequest": req["exi"]})
    assert ev["status"] == "Accepted", ev
    if version == "2.1":
        assert ev["remainingContracts"] == 0
    verdict = await asyncio.to_thread(peer, "check-response", exi=ev["exiResponse"], kind="install", session_id=sid,
                                      decrypt_key=vehicle.files["oem_key"], v2g_root=vehicle.files["roots"][0],
                                      mo_root=vehicle.files["roots"][1])
    assert_accepted_by_josev(verdict, sid)
    assert verdict["emaid"] == vehicle.emaid
    out.timings["ev-certificate"] = time.monotonic() - t

    # 3. the CPO revokes the station's certificate; GetCertificateStatus says revoked
    t = time.monotonic()
    data = ocpp_request_data_with_url(leaf, sub2)
    before = await station.request("GetCertificateStatus", {"ocspRequestData": data})
    assert ocsp_status(before, leaf, sub2, engine) == ocsp.OCSPCertStatus.GOOD
    r = await http.post(f"/v1/certificates/{signed['customData']['issuer']}/{signed['customData']['serialNumber']}/revoke",
                        json={"reason": "keyCompromise"})
    assert r.status_code == 200, r.text
    after_ = await station.request("GetCertificateStatus", {"ocspRequestData": data})
    assert ocsp_status(after_, leaf, sub2, engine) == ocsp.OCSPCertStatus.REVOKED
    if version == "2.1":
        hd = {k: v for k, v in data.items() if k != "responderURL"}
        urls = ["http://127.0.0.1:9/never-fetched"]
        reqs = [{"certificateHashData": hd, "source": "OCSP", "urls": urls},
                {"certificateHashData": hd, "source": "CRL", "urls": urls},
                {"certificateHashData": ocsp_request_data(sub2, chain[2]), "source": "CRL", "urls": urls},
                {"certificateHashData": ocsp_request_data(chain[2], engine.ca("v2g-root").cert), "source": "CRL",
                 "urls": urls}]
        st = await station.request("GetCertificateChainStatus", {"certificateStatusRequests": reqs})
        assert [e["status"] for e in st["certificateStatus"]] == ["Revoked", "Revoked", "Good", "Good"], st
        assert st["certificateStatus"][0]["certificateHashData"] == hd
    out.timings["status"] = time.monotonic() - t


def ocpp_request_data_with_url(cert: x509.Certificate, issuer: x509.Certificate) -> dict[str, str]:
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    url = next(str(d.access_location.value) for d in aia if d.access_method == x509.AuthorityInformationAccessOID.OCSP)
    return {**ocsp_request_data(cert, issuer), "responderURL": url}


def ocsp_status(answer: dict[str, Any], cert: x509.Certificate, issuer: x509.Certificate,
                engine: Any) -> ocsp.OCSPCertStatus:  # noqa: ANN401
    """The station's reading of an ocspResult: a successful OCSP response for exactly this certificate,
    signed by the issuing CA or its delegated OCSP signer (itself issued by that CA)."""
    assert answer["status"] == "Accepted", answer
    res = ocsp.load_der_ocsp_response(base64.b64decode(answer["ocspResult"]))
    assert res.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert res.serial_number == cert.serial_number
    want = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    assert (res.issuer_name_hash, res.issuer_key_hash) == (want.issuer_name_hash, want.issuer_key_hash)
    signer = next((c for c in res.certificates), issuer)
    if signer is not issuer:
        signer.verify_directly_issued_by(issuer)
        assert x509.OID_OCSP_SIGNING in signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    pub = signer.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert res.signature_hash_algorithm is not None
    pub.verify(res.signature, res.tbs_response_bytes, ec.ECDSA(res.signature_hash_algorithm))
    now = utcnow()
    assert res.this_update_utc <= now and (res.next_update_utc is None or now <= res.next_update_utc)
    return res.certificate_status


# -- the test ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.6", "2.0.1", "2.1"])
def test_station_through_csms(version: str, service: Service, peer: Peer, tmp_path: Path) -> None:
    with httpx.Client(base_url=service.url, timeout=STEP_TIMEOUT) as http:
        vehicle = new_vehicle(service, http, tmp_path / "vehicle")
    out = asyncio.run(asyncio.wait_for(station_session(version, service, peer, vehicle, tmp_path),
                                       SCENARIO_TIMEOUT))
    # every answer the CSMS relayed was a valid OCPP message of its version (the ocpp library validated
    # them on both sides); and it went over HTTP to exactly the version's endpoints
    assert all(status == 200 for _, status, _ in out.relayed), out.relayed
    paths = {p for p, _, _ in out.relayed}
    if version == "1.6":
        assert paths == {"/ocpp/v16/data-transfer"}
    else:
        pre = "/ocpp/v201" if version == "2.0.1" else "/ocpp/v21"
        want = {f"{pre}/sign-certificate", f"{pre}/get-15118-ev-certificate", f"{pre}/get-certificate-status"}
        assert paths == want | ({f"{pre}/get-certificate-chain-status"} if version == "2.1" else set())
    print(f"OCPP {version} simulation: " + ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items()))


def test_the_simulation_is_no_rubber_stamp(service: Service) -> None:
    """What the version tests rely on: the ocpp library refuses an answer that is not schema-valid (one the
    pre-#24 service gave: a status outside the enumeration), and the station refuses a chain that does not
    lead to a root it trusts (its CertificateSigned answer is Rejected). OCPP 2.0.1; the database plays no
    part beyond issuance (both backends run anyway through `ctx`)."""

    def bad_status(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "status": "Good"} if path.endswith("/get-certificate-status") else body

    async def session() -> None:
        async with linked("2.0.1", service, bad_status) as link:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = csr_pem(f"{service.prefix['cpo']}*E{_a(6)}", o=service.org["cpo"], dc="CPO", key=key).decode()
            oem_root = service.ctx.engine.ca("oem-root").cert
            link.station.enrollments.append(Enrollment(key, [oem_root], "V2GCertificate"))
            answer = await link.station.request("SignCertificate", {"csr": csr, "certificateType": "V2GCertificate"})
            assert answer == {"status": "Accepted"}
            _, chain = await asyncio.wait_for(link.station.installed.get(), STEP_TIMEOUT)
            assert isinstance(chain, str) and "no trusted root" in chain, chain
            _, reply = await asyncio.wait_for(link.csms.stations[link.station.id].followups.get(), STEP_TIMEOUT)
            assert reply.status == "Rejected"
            leaf = x509.load_pem_x509_certificates(link.relay.log[0][2]["certificateChain"].encode())
            with pytest.raises(OCPPError) as err:  # the CSMS's own validation refuses to send it: a CallError
                await link.station.request("GetCertificateStatus",
                                           {"ocspRequestData": ocpp_request_data_with_url(leaf[0], leaf[1])})
            assert "Good" in str(err.value), err.value

    asyncio.run(asyncio.wait_for(session(), SCENARIO_TIMEOUT))
