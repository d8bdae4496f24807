"""An independent ISO 15118-2 vehicle accepts our contract certificate installation and update.

The vehicle is Josev (PyPI `iso15118`, its EXIficient EXI codec through py4j, its security helpers), run
in its own virtual environment (scripts/peers.sh → .peers/josev) as tests/peers/josev_ev.py. Josev builds
and signs the CertificateInstallationReq / CertificateUpdateReq; the service answers through OCPP
Get15118EVCertificate (TestClient over the session's `ctx`, SQLite and PostgreSQL); Josev decodes the
exiResponse, recomputes the four digests with EXIficient, verifies the CPS signature and both chains,
decrypts the contract key and checks it against the contract certificate. The eMAID (#id4) digest —
the EXI element-fragment-grammar trap — is compared explicitly with ours.

Without the peer the module is skipped, unless CI or V2GPKI_TEST_REQUIRE_PEERS is set: then it fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import secrets
import subprocess
import threading
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

from api.app import create_app
from pki.context import Context
from pki.cps.exi import (
    EMAID,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    V2GMessage,
    decode_message,
    encode_body_fragment,
    encode_message,
)
from pki.cps.service import _cps_signer
from pki.cps.xmldsig import sign_contract_response
from pki.orgs import create_api_key, create_org
from pki.store.db import utcnow
from tests.conftest import REPO, csr_pem, need_peer

PEER = Path(__file__).resolve().parent / "peers" / "josev_ev.py"
PEER_PYTHON = Path(os.environ.get("V2GPKI_JOSEV_PYTHON", REPO / ".peers" / "josev" / "bin" / "python"))
PEER_TIMEOUT = 180  # seconds for one answer (the first one starts the JVM); a hang fails, it never blocks CI


def _need_peer(reason: str) -> None:
    need_peer(f"Josev peer unavailable: {reason} (install it with `bash scripts/peers.sh`)")


class Peer:
    """tests/peers/josev_ev.py as a long-lived subprocess: one JSON line in, one JSON line out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(PEER_PYTHON), str(PEER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=PEER.parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr = [*self.stderr[-200:], line]

    def __call__(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=PEER_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"Josev peer gave no answer to {cmd}:\n{''.join(self.stderr[-40:])}") from None
        if line is None:
            raise AssertionError(f"Josev peer exited ({self.proc.poll()}):\n{''.join(self.stderr[-40:])}")
        out: dict[str, Any] = json.loads(line)
        assert "error" not in out, f"{cmd}: {out['error']}\n{out.get('traceback', '')}"
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def josev() -> Iterator[Peer]:
    if not PEER_PYTHON.exists():
        _need_peer(f"no {PEER_PYTHON}")
    probe = subprocess.run([str(PEER_PYTHON), "-c", "import iso15118.shared.security, py4j"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        _need_peer(f"iso15118 does not import in {PEER_PYTHON}: {probe.stderr.strip()[-300:]}")
    if subprocess.run(["java", "-version"], capture_output=True).returncode != 0:
        _need_peer("no Java runtime for EXIficient")
    peer = Peer()
    try:
        hello = peer("hello")
        assert hello["ok"] and hello["codec"], hello
        yield peer
    finally:
        peer.close()


# -- the service side -----------------------------------------------------------------------------------


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
    prov = {"emsp": f"DE{_a(3)}", "oem": _a(3)}
    h = {}
    for who, role, pre in (("emsp", "emsp", prov["emsp"]), ("oem", "oem", prov["oem"]), ("cpo", "cpo", "DE*" + _a(3))):
        create_org(ctx.db, f"josev-{who}-{tag}", role, [pre])
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, f'josev-{who}-{tag}')[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield Env(client, ctx, h, prov)


@dataclass
class Vehicle:
    pcid: str
    dir: Path
    cert: x509.Certificate

    @property
    def files(self) -> dict[str, Any]:
        return {"oem_cert": str(self.dir / "oem.der"), "oem_key": str(self.dir / "oem.pem"),
                "roots": [str(self.dir / "v2g-root.der"), str(self.dir / "mo-root.der")]}


def new_vehicle(env: Env, d: Path) -> Vehicle:
    """An OEM provisioning certificate from our OEM Sub-CA 2, its key and the two roots as files for Josev."""
    d.mkdir(parents=True, exist_ok=True)
    pcid = env.prov["oem"] + _a(14)
    key = ec.generate_private_key(ec.SECP256R1())
    r = env.client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM", key=key).decode(),
                                                 "profile": "oem-prov"}, headers=env.h["oem"])
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    (d / "oem.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (d / "oem.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    for name in ("v2g-root", "mo-root"):
        (d / f"{name}.der").write_bytes(env.ctx.engine.ca(name).cert.public_bytes(serialization.Encoding.DER))
    return Vehicle(pcid, d, cert)


def new_contract(env: Env, pcid: str) -> str:
    emaid = env.prov["emsp"] + _a(9)
    r = env.client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid,
                                               "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                        headers=env.h["emsp"])
    assert r.status_code == 201, r.text
    return emaid


def ocpp(env: Env, exi_b64: str, action: str) -> dict[str, Any]:
    r = env.client.post("/ocpp/v201/get-15118-ev-certificate",
                        json={"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": action,
                              "exiRequest": exi_b64}, headers=env.h["cpo"])
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert len(out["exiResponse"]) <= 7500
    return out


def check(josev: Peer, exi_b64: str, kind: str, sid: str, key: Path, d: Path, **extra: Any) -> dict[str, Any]:
    return josev("check-response", exi=exi_b64, kind=kind, session_id=sid, decrypt_key=str(key),
                 v2g_root=str(d / "v2g-root.der"), mo_root=str(d / "mo-root.der"), **extra)


def assert_accepted_by_josev(v: dict[str, Any], sid: str) -> None:
    assert v["response_code"] == "OK" and v["session_id_matches"] and v["session_id"] == sid, v
    for ref in ("id1", "id2", "id3", "id4"):
        assert v["digests"][ref]["josev"] == v["digests"][ref]["signed"], (ref, v["digests"])
    assert v["signature_valid"] is True, v
    assert v["cps_chain"] == {"josev": "ok", "openssl": "ok"}, v["cps_chain"]
    assert v["contract_chain"] == {"josev": "ok", "openssl": "ok"}, v["contract_chain"]
    assert v["emaid_is_contract_cn"] and v["decrypted_key_octets"] == 32 and v["key_matches_certificate"], v
    assert v["ok"] is True


def assert_emaid_digest_is_ours(v: dict[str, Any], exi_b64: str) -> None:
    """#id4: EXIficient's eMAID fragment and digest = ours (element fragment grammar, EXI 1.0 §8.5.3)."""
    msg = decode_message(base64.b64decode(exi_b64))
    assert msg.header.signature is not None and msg.body is not None
    ours = {r.uri: r.digest_value.hex() for r in msg.header.signature.signed_info.references}
    emaid: EMAID = msg.body.emaid  # type: ignore[union-attr]
    assert emaid.id == "id4"
    fragment = encode_body_fragment(emaid)
    assert v["emaid_fragment"] == fragment.hex()
    assert v["digests"]["id4"]["josev"] == hashlib.sha256(fragment).hexdigest() == ours["#id4"]
    # and the libcbv2g reading of the same element (EMAIDType grammar) is a different octet string
    assert encode_body_fragment(emaid, emaid_libcbv2g_compat=True).hex() != v["emaid_fragment"]


def test_josev_vehicle_installs_then_updates(josev: Peer, env: Env, tmp_path: Path) -> None:
    v = new_vehicle(env, tmp_path / "vehicle")
    emaid = new_contract(env, v.pcid)
    sid = secrets.token_bytes(8).hex()

    # The request as Josev's EVCC builds it: EXIficient encoding, Josev's signature, Josev's root IDs.
    req = josev("install-request", session_id=sid, **v.files)
    raw = base64.b64decode(req["exi"])
    msg = decode_message(raw)
    assert isinstance(msg.body, CertificateInstallationReq) and msg.header.session_id.hex() == sid
    assert encode_message(msg) == raw  # our codec and EXIficient agree on the whole message, octet for octet
    assert hashlib.sha256(encode_body_fragment(msg.body)).hexdigest() == req["digest"]
    assert {r.serial_number for r in msg.body.root_certificate_ids} == {
        env.ctx.engine.ca("v2g-root").cert.serial_number, env.ctx.engine.ca("mo-root").cert.serial_number}

    out = ocpp(env, req["exi"], "Install")
    assert out["status"] == "Accepted", out
    verdict = check(josev, out["exiResponse"], "install", sid, tmp_path / "vehicle" / "oem.pem", v.dir,
                    save_contract_key=str(tmp_path / "contract.pem"))
    assert_accepted_by_josev(verdict, sid)
    assert verdict["emaid"] == emaid and verdict["body"] == "CertificateInstallationRes"
    assert_emaid_digest_is_ours(verdict, out["exiResponse"])
    first = decode_message(base64.b64decode(out["exiResponse"])).body
    assert isinstance(first, CertificateInstallationRes)

    # CertificateUpdate: EXIficient-encoded request signed by Josev with the contract key it just decrypted;
    # the new contract key comes back wrapped for the current contract certificate [V2G2-821].
    chain = [tmp_path / "contract.der", *(tmp_path / f"contract-sub{i}.der"
                                          for i in range(len(first.contract_signature_cert_chain.sub_certificates)))]
    for p, der in zip(chain, (first.contract_signature_cert_chain.certificate,
                              *first.contract_signature_cert_chain.sub_certificates), strict=True):
        p.write_bytes(der)
    sid2 = secrets.token_bytes(8).hex()
    upd = josev("update-request", chain=[str(p) for p in chain], key=str(tmp_path / "contract.pem"),
                roots=v.files["roots"], session_id=sid2)
    umsg = decode_message(base64.b64decode(upd["exi"]))
    assert isinstance(umsg.body, CertificateUpdateReq) and umsg.body.emaid == emaid
    assert encode_message(umsg) == base64.b64decode(upd["exi"])
    assert encode_body_fragment(umsg.body).hex() == upd["fragment"]  # the signed fragment, octet for octet
    out2 = ocpp(env, upd["exi"], "Update")
    assert out2["status"] == "Accepted", out2
    verdict2 = check(josev, out2["exiResponse"], "update", sid2, tmp_path / "contract.pem", v.dir)
    assert_accepted_by_josev(verdict2, sid2)
    assert verdict2["body"] == "CertificateUpdateRes" and verdict2["emaid"] == emaid
    assert_emaid_digest_is_ours(verdict2, out2["exiResponse"])
    second = decode_message(base64.b64decode(out2["exiResponse"])).body
    assert second.contract_signature_cert_chain.certificate != first.contract_signature_cert_chain.certificate  # type: ignore[union-attr]


def _resign(env: Env, msg: V2GMessage, body: Any, *, libcbv2g: bool = False) -> str:
    """``body`` signed again by the service's own CPS leaf key (HSM), optionally with libcbv2g's eMAID encoding."""
    row, _ = _cps_signer(env.ctx, tuple(_root_ids(env)))
    assert row.key_uri is not None
    signer = env.ctx.keystore.signer(row.key_uri)
    out = sign_contract_response(msg.header.session_id, body, signer, emaid_libcbv2g_compat=libcbv2g)  # type: ignore[arg-type]
    return base64.b64encode(encode_message(out)).decode()


def _root_ids(env: Env) -> list[Any]:
    from pki.cps.exi import X509IssuerSerial

    return [X509IssuerSerial(env.ctx.engine.ca(n).cert.subject.rfc4514_string(), env.ctx.engine.ca(n).cert.serial_number)
            for n in ("v2g-root", "mo-root")]


def test_josev_refuses_what_a_vehicle_must_refuse(josev: Peer, env: Env, tmp_path: Path) -> None:
    """The peer is not a rubber stamp: it catches the eMAID trap, tampering and a wrong key, and reads a
    FAILED_* answer."""
    v = new_vehicle(env, tmp_path / "vehicle")
    sid = secrets.token_bytes(8).hex()
    req = josev("install-request", session_id=sid, **v.files)
    # no contract for this PCID yet: a FAILED_* V2G_Message that Josev decodes, SessionID copied
    out = ocpp(env, req["exi"], "Install")
    assert out["status"] == "Failed"
    dec = josev("decode", exi=out["exiResponse"])
    assert dec == {"body": "CertificateInstallationRes", "session_id": sid,
                   "response_code": "FAILED_NoCertificateAvailable"}

    new_contract(env, v.pcid)
    out = ocpp(env, req["exi"], "Install")
    assert out["status"] == "Accepted"
    good = check(josev, out["exiResponse"], "install", sid, v.dir / "oem.pem", v.dir)
    assert good["ok"] is True
    msg = decode_message(base64.b64decode(out["exiResponse"]))
    body = msg.body
    assert isinstance(body, CertificateInstallationRes)

    # the same response, signed by the same CPS key, but with the eMAID digest libcbv2g computes
    trap = check(josev, _resign(env, msg, body, libcbv2g=True), "install", sid, v.dir / "oem.pem", v.dir)
    assert [trap["digests"][i]["josev"] == trap["digests"][i]["signed"] for i in ("id1", "id2", "id3", "id4")] \
        == [True, True, True, False]
    assert trap["signature_valid"] is False and trap["ok"] is False
    # control: re-signed the specification's way, the same response is accepted again
    assert check(josev, _resign(env, msg, body), "install", sid, v.dir / "oem.pem", v.dir)["ok"] is True

    # a tampered eMAID under the original signature
    other = body.emaid.value[:-1] + ("A" if body.emaid.value[-1] != "A" else "B")
    forged = encode_message(replace(msg, body=replace(body, emaid=EMAID(other, "id4"))))
    bad = check(josev, base64.b64encode(forged).decode(), "install", sid, v.dir / "oem.pem", v.dir)
    assert bad["digests"]["id4"]["josev"] != bad["digests"]["id4"]["signed"]
    assert bad["signature_valid"] is False and bad["ok"] is False

    # another vehicle's key cannot recover the contract key
    w = new_vehicle(env, tmp_path / "other")
    wrong = check(josev, out["exiResponse"], "install", sid, w.dir / "oem.pem", v.dir)
    assert wrong["signature_valid"] is True and wrong["key_matches_certificate"] is False and wrong["ok"] is False

    # a vehicle whose V2G root is not ours rejects the CPS chain
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Foreign V2G Root")])
    from cryptography.hazmat.primitives import hashes

    foreign = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(utcnow() - timedelta(days=1))
               .not_valid_after(utcnow() + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(k, hashes.SHA256()))
    (tmp_path / "foreign.der").write_bytes(foreign.public_bytes(serialization.Encoding.DER))
    alien = josev("check-response", exi=out["exiResponse"], kind="install", session_id=sid,
                  decrypt_key=str(v.dir / "oem.pem"), v2g_root=str(tmp_path / "foreign.der"),
                  mo_root=str(v.dir / "mo-root.der"))
    assert alien["signature_valid"] is False and alien["cps_chain"]["openssl"] != "ok" and alien["ok"] is False
