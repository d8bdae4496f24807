"""ISO 15118-20 contract certificate installation (#26): the -20 EXI grammar against an independent codec.

The independent side is Josev (PyPI `iso15118`) with the EXIficient in its jar, run in its own virtual
environment as tests/peers/josev_ev20.py (it imports nothing from this repository). Every stream our codec
writes — whole CertificateInstallationReq/Res documents, the signed fragments (OEMProvisioningCertificateChain,
SignedInstallationData with each of its three key elements) and SignedInfo — is decoded by EXIficient and
re-encoded by it: the octets must be ours. Without the peer the module is skipped, unless CI or
V2GPKI_TEST_REQUIRE_PEERS is set: then it fails.
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pki.cps.exi import native
from pki.cps.exi.messages import Reference, Signature, SignedInfo, X509IssuerSerial, encode_signed_info
from pki.cps.exi.messages20 import (
    CertificateInstallationReq20,
    CertificateInstallationRes20,
    Chain20,
    Header20,
    SignedInstallationData,
    decode_message20,
    encode_fragment20,
    encode_message20,
)
from pki.cps.exi.schema20 import CM20, RESPONSE_CODES_20
from tests.conftest import REPO
from tests.test_cps_josev import PEER_PYTHON, Peer, _need_peer

PEER20 = Path(__file__).resolve().parent / "peers" / "josev_ev20.py"
SHA512 = "http://www.w3.org/2001/04/xmlenc#sha512"
ECDSA_SHA512 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512"
ED448 = "http://www.w3.org/2021/04/xmldsig-more#eddsa-ed448"


class Peer20(Peer):
    """tests/peers/josev_ev20.py as a long-lived subprocess (the -2 peer's protocol and plumbing)."""

    def __init__(self) -> None:  # noqa: D107 - Peer.__init__ with the -20 script
        self.proc = subprocess.Popen([str(PEER_PYTHON), str(PEER20)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=PEER20.parent)
        import queue

        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()


@pytest.fixture(scope="module")
def josev20() -> Iterator[Peer20]:
    if not PEER_PYTHON.exists():
        _need_peer(f"no {PEER_PYTHON}")
    probe = subprocess.run([str(PEER_PYTHON), "-c", "import iso15118.shared.messages.iso15118_20.common_messages"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        _need_peer(f"iso15118 does not import in {PEER_PYTHON}: {probe.stderr.strip()[-300:]}")
    if subprocess.run(["java", "-version"], capture_output=True).returncode != 0:
        _need_peer("no Java runtime for EXIficient")
    peer = Peer20()
    try:
        assert peer("hello")["ok"]
        yield peer
    finally:
        peer.close()


def exificient_roundtrip(peer: Peer20, data: bytes, *, fragment: bool, grammar: str = "cm20") -> bytes:
    out = peer("roundtrip", exi=base64.b64encode(data).decode(), fragment=fragment, grammar=grammar)
    return base64.b64decode(out["exi"])


# -- generated messages ---------------------------------------------------------------------------------------


def _signature(rnd: random.Random, ed448: bool = False) -> Signature:
    si = SignedInfo((Reference("#" + rnd.choice(["id1", "ID2", "sid"]), rnd.randbytes(64), SHA512),),
                    signature_method=ED448 if ed448 else ECDSA_SHA512)
    return Signature(si, rnd.randbytes(114 if ed448 else 132))


def _chain(rnd: random.Random, ident: str | None = None, subs_min: int = 0) -> Chain20:
    return Chain20(rnd.randbytes(rnd.randint(1, 1600)),
                   tuple(rnd.randbytes(rnd.randint(1, 1600)) for _ in range(rnd.randint(subs_min, 3))), ident)


def random_request(rnd: random.Random) -> CertificateInstallationReq20:
    roots = tuple(X509IssuerSerial(rnd.choice(["CN=V2G Root CA 20,O=V2G PKI Demo,C=DE", "", "<Name(CN=é)>"]),
                                   rnd.choice([0, 1, 2**159 + rnd.randint(0, 99)]))
                  for _ in range(rnd.randint(1, 20)))
    emaids = tuple(rnd.choice(["DEABC123456789", "", "X" * 255]) for _ in range(rnd.randint(1, 8)))
    return CertificateInstallationReq20(
        Header20(rnd.randbytes(8), rnd.choice([0, 1_700_000_000, 2**63 - 1, 2**64 - 1]),
                 _signature(rnd) if rnd.random() < 0.8 else None),
        _chain(rnd, "id1"), roots, rnd.randint(0, 255), emaids if rnd.random() < 0.5 else None)


def random_installation_data(rnd: random.Random) -> SignedInstallationData:
    kind = rnd.choice(["SECP521", "X448", "TPM"])
    size = {"SECP521": 94, "X448": 84, "TPM": 206}[kind]
    return SignedInstallationData(rnd.choice(["id1", "SID"]), _chain(rnd, subs_min=1),
                                  rnd.choice(["SECP521", "X448"]), rnd.randbytes(133), rnd.randbytes(size), kind)


def random_response(rnd: random.Random) -> CertificateInstallationRes20:
    return CertificateInstallationRes20(
        Header20(rnd.randbytes(8), rnd.randint(0, 2**40), _signature(rnd, rnd.random() < 0.3)),
        rnd.choice(RESPONSE_CODES_20), rnd.choice(["Finished", "Ongoing", "Ongoing_WaitingForCustomerInteraction"]),
        _chain(rnd), random_installation_data(rnd), rnd.randint(0, 255))


def test_committed_names20_match_the_xsds() -> None:
    xsd = Path(os.environ.get("V2G20_XSD_DIR", "")) if os.environ.get("V2G20_XSD_DIR") else None
    if xsd is None:
        found = sorted((REPO / ".peers" / "josev").glob("lib/python3*/site-packages/iso15118/shared/schemas/iso15118_20"))
        if not found:
            _need_peer("no -20 XSDs (set V2G20_XSD_DIR or install the Josev peer)")
        xsd = found[0]
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "pki/cps/exi/derive_names.py"), "--iso20",
                          str(xsd)], capture_output=True, text=True, check=True)
    assert out.stdout == (REPO / "pki/cps/exi/_names20.py").read_text()


def test_cm20_grammar_is_compiled_for_the_c_half() -> None:
    if not native.available():
        if os.environ.get("V2GPKI_TEST_REQUIRE_NATIVE"):
            pytest.fail("the C half of the EXI codec is not built")
        pytest.skip("no C half")
    assert native._program(CM20) is not None  # the -20 grammar runs in C, not a Python fallback


def test_messages_and_fragments_byte_exact_with_exificient(josev20: Peer20) -> None:
    rnd = random.Random(26)
    for _ in range(12):
        for message in (random_request(rnd), random_response(rnd)):
            exi = encode_message20(message)
            assert decode_message20(exi) == message
            assert exificient_roundtrip(josev20, exi, fragment=False) == exi, type(message).__name__
        req = random_request(rnd)
        oem = encode_fragment20([req.oem_provisioning_chain.to_node("OEMProvisioningCertificateChain")])
        assert exificient_roundtrip(josev20, oem, fragment=True) == oem
        sid = encode_fragment20([random_installation_data(rnd).to_node()])
        assert exificient_roundtrip(josev20, sid, fragment=True) == sid
        if req.header.signature is not None:
            si = encode_signed_info(req.header.signature.signed_info)
            assert exificient_roundtrip(josev20, si, fragment=True, grammar="xmldsig") == si


def _python_only(fn: Any, *args: Any) -> Any:
    saved = native.ENABLED
    native.ENABLED = False
    try:
        return fn(*args)
    finally:
        native.ENABLED = saved


def test_c_and_python_agree_on_the_20_grammar() -> None:
    rnd = random.Random(2026)
    for _ in range(40):
        for message in (random_request(rnd), random_response(rnd)):
            exi = encode_message20(message)
            assert _python_only(encode_message20, message) == exi
            assert _python_only(decode_message20, exi) == decode_message20(exi)


# -- the service: OCPP 2.1 Get15118EVCertificate with ISO 15118-20 (#26 b, c) ------------------------------

import secrets  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import timedelta  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlmodel import col, select  # noqa: E402

from api.app import create_app  # noqa: E402
from pki.context import Context  # noqa: E402
from pki.orgs import create_api_key, create_org  # noqa: E402
from pki.store.db import utcnow  # noqa: E402
from pki.store.models import Certificate  # noqa: E402
from tests.conftest import csr_pem  # noqa: E402

NS20 = "urn:iso:std:iso:15118:-20:CommonMessages"


def _a(n: int) -> str:
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(n))


@dataclass
class Env20:
    client: TestClient
    ctx: Context
    h: dict[str, dict[str, str]]
    prov: dict[str, str]


@pytest.fixture(scope="module")
def env20(ctx: Context) -> Iterator[Env20]:
    tag = secrets.token_hex(3)
    prov = {"emsp": f"DE{_a(3)}", "oem": _a(3)}
    h = {}
    for who, role, pre in (("emsp", "emsp", prov["emsp"]), ("oem", "oem", prov["oem"]), ("cpo", "cpo", "DE*" + _a(3))):
        create_org(ctx.db, f"j20-{who}-{tag}", role, [pre])
        h[who] = {"Authorization": f"Bearer {create_api_key(ctx.db, f'j20-{who}-{tag}')[0]}"}
    with TestClient(create_app(ctx)) as client:
        yield Env20(client, ctx, h, prov)


def _write_der(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return str(path)


def vehicle20(env: Env20, d: Path, curve: ec.EllipticCurve | None = None, profile: str = "oem-prov-20") -> dict[str, Any]:
    d.mkdir(parents=True, exist_ok=True)
    pcid = env.prov["oem"] + _a(14)
    key = ec.generate_private_key(curve or ec.SECP521R1())
    r = env.client.post("/v1/enrollments", json={"csr": csr_pem(pcid, dc="OEM", key=key).decode(), "profile": profile},
                        headers=env.h["oem"])
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    (d / "oem.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    issuer = "oem-sub2-20" if profile == "oem-prov-20" else "oem-sub2"
    subs = [_write_der(d / f"sub{i}.der", c) for i, c in enumerate(env.ctx.engine.chain(issuer)[:-1])]
    for name in ("v2g-root-20", "mo-root-20", "v2g-root"):
        _write_der(d / f"{name}.der", env.ctx.engine.ca(name).cert)
    return {"pcid": pcid, "oem_chain": [_write_der(d / "oem.der", cert), *subs], "oem_key": str(d / "oem.pem"),
            "roots": [str(d / "v2g-root-20.der")], "dir": d}


def contract20(env: Env20, pcid: str, default: bool = True) -> str:
    emaid = env.prov["emsp"] + _a(9)
    r = env.client.post("/v1/contracts", json={"emaid": emaid, "pcid": pcid, "is_default": default,
                                               "valid_until": (utcnow() + timedelta(days=400)).isoformat()},
                        headers=env.h["emsp"])
    assert r.status_code == 201, r.text
    return emaid


def ocpp21(env: Env20, exi_b64: str, schema: str = NS20, action: str = "Install") -> tuple[int, dict[str, Any]]:
    r = env.client.post("/ocpp/v21/get-15118-ev-certificate",
                        json={"iso15118SchemaVersion": schema, "action": action, "exiRequest": exi_b64},
                        headers=env.h["cpo"])
    out: dict[str, Any] = r.json()
    assert len(out.get("exiResponse", "")) <= 17000
    return r.status_code, out


def _issued(env: Env20, emaid: str) -> int:
    with env.ctx.db.session() as s:
        return len(list(s.exec(select(Certificate).where(Certificate.identifier == emaid,
                                                         col(Certificate.profile).in_(["contract-20", "contract"])))))


def _request(josev20: Peer20, v: dict[str, Any], **kw: Any) -> dict[str, Any]:
    args = {"oem_chain": v["oem_chain"], "oem_key": v["oem_key"], "roots": v["roots"],
            "session_id": secrets.token_hex(8), "max_chains": 1, "emaids": None, "sign": "ecdsa-sha512"}
    args.update(kw)
    return {**josev20("install-request", **args), "session_id": args["session_id"]}


def _validate_xsd(josev20: Peer20, exi_b64: str) -> None:
    import xmlschema

    found = sorted((REPO / ".peers" / "josev").glob("lib/python3*/site-packages/iso15118/shared/schemas"))
    if not found:
        _need_peer("no -20 XSDs")
    xml = josev20("roundtrip", exi=exi_b64, fragment=False, grammar="cm20")["xml"]
    schema = xmlschema.XMLSchema(str(found[0] / "iso15118_20" / "V2G_CI_CommonMessages.xsd"),
                                 locations={"http://www.w3.org/2000/09/xmldsig#":
                                            str(found[0] / "xmldsig-core-schema.xsd")})
    schema.validate(xml)


def _xsd_errors(josev20: Peer20, exi_b64: str) -> list[str]:
    import xmlschema

    found = sorted((REPO / ".peers" / "josev").glob("lib/python3*/site-packages/iso15118/shared/schemas"))
    if not found:
        _need_peer("no -20 XSDs")
    xml = josev20("roundtrip", exi=exi_b64, fragment=False, grammar="cm20")["xml"]
    schema = xmlschema.XMLSchema(str(found[0] / "iso15118_20" / "V2G_CI_CommonMessages.xsd"),
                                 locations={"http://www.w3.org/2000/09/xmldsig#":
                                            str(found[0] / "xmldsig-core-schema.xsd")})
    return [f"{e.path}: {e.reason}" for e in schema.iter_errors(xml)]


def test_p521_installation_verified_by_an_independent_ev(josev20: Peer20, env20: Env20, tmp_path: Path) -> None:
    v = vehicle20(env20, tmp_path / "v")
    emaid = contract20(env20, v["pcid"])
    req = _request(josev20, v)
    # our codec reads Josev's request exactly: decode, re-encode, same octets
    raw = base64.b64decode(req["exi"])
    assert encode_message20(decode_message20(raw)) == raw
    _validate_xsd(josev20, req["exi"])
    status, out = ocpp21(env20, req["exi"])
    assert status == 200 and out["status"] == "Accepted", out
    assert out["remainingContracts"] == 0
    _validate_xsd(josev20, out["exiResponse"])
    verdict = josev20("check-response", exi=out["exiResponse"], session_id=req["session_id"], oem_key=v["oem_key"],
                      pcid=v["pcid"], v2g_root=str(v["dir"] / "v2g-root-20.der"),
                      mo_root=str(v["dir"] / "mo-root-20.der"))
    assert verdict["ok"], verdict
    assert verdict["emaid"] == emaid and verdict["signature_method"].endswith("ecdsa-sha512")
    # the signed fragment EXIficient encodes is the one we digested
    res = decode_message20(base64.b64decode(out["exiResponse"]))
    assert isinstance(res, CertificateInstallationRes20)
    assert bytes.fromhex(verdict["fragment"]) == encode_fragment20([res.signed_installation_data.to_node()])
    assert len(res.signed_installation_data.encrypted_private_key) == 94

    # a tampered response is refused by the EV: one bit of the encrypted key, then of the contract chain
    for field_ in ("encrypted_private_key", "contract_chain"):
        sd = res.signed_installation_data
        if field_ == "encrypted_private_key":
            k = sd.encrypted_private_key
            sd = SignedInstallationData(sd.id, sd.contract_chain, sd.ecdh_curve, sd.dh_public_key,
                                        k[:40] + bytes([k[40] ^ 1]) + k[41:], sd.key_kind)
        else:
            c = sd.contract_chain
            sd = SignedInstallationData(sd.id, Chain20(c.certificate[:-1] + bytes([c.certificate[-1] ^ 1]),
                                                       c.sub_certificates), sd.ecdh_curve, sd.dh_public_key,
                                        sd.encrypted_private_key, sd.key_kind)
        bad = CertificateInstallationRes20(res.header, res.response_code, res.evse_processing, res.cps_chain, sd,
                                           res.remaining_contract_certificate_chains)
        verdict = josev20("check-response", exi=base64.b64encode(encode_message20(bad)).decode(),
                          session_id=req["session_id"], oem_key=v["oem_key"], pcid=v["pcid"],
                          v2g_root=str(v["dir"] / "v2g-root-20.der"), mo_root=str(v["dir"] / "mo-root-20.der"))
        assert not verdict["ok"] and not verdict["digest_matches"], verdict


def test_several_contracts_in_prioritized_order_one_per_exchange(josev20: Peer20, env20: Env20,
                                                                 tmp_path: Path) -> None:
    v = vehicle20(env20, tmp_path / "v")
    e1 = contract20(env20, v["pcid"])
    e2 = contract20(env20, v["pcid"], default=False)
    e3 = contract20(env20, v["pcid"], default=False)
    got = []
    for expect_remaining in (1, 0):
        req = _request(josev20, v, max_chains=2, emaids=[e3, e1])
        status, out = ocpp21(env20, req["exi"], schema="urn:iso:15118:20:2020:MsgDef")
        assert status == 200 and out["status"] == "Accepted", out
        assert out["remainingContracts"] == expect_remaining
        verdict = josev20("check-response", exi=out["exiResponse"], session_id=req["session_id"],
                          oem_key=v["oem_key"], pcid=v["pcid"], v2g_root=str(v["dir"] / "v2g-root-20.der"),
                          mo_root=str(v["dir"] / "mo-root-20.der"))
        assert verdict["ok"], verdict
        got.append(verdict["emaid"])
    assert got == [e3, e1]  # PrioritizedEMAIDs order, MaximumContractCertificateChains 2: e2 not served
    assert _issued(env20, e2) == 0


def test_bad_input_is_refused_and_nothing_is_issued(josev20: Peer20, env20: Env20, tmp_path: Path) -> None:
    v = vehicle20(env20, tmp_path / "v")
    emaid = contract20(env20, v["pcid"])
    # a bad request signature
    status, out = ocpp21(env20, _request(josev20, v, corrupt_signature=True)["exi"])
    assert out["status"] == "Failed" and out["statusInfo"]["reasonCode"] == "FAILED_SignatureError"[:20], out
    assert josev20("decode", exi=out["exiResponse"])["response_code"] == "FAILED_SignatureError"
    # an unsigned request
    status, out = ocpp21(env20, _request(josev20, v, sign="none")["exi"])
    assert out["status"] == "Failed" and out["statusInfo"]["reasonCode"] == "FAILED_SignatureError"[:20], out
    # a root the CPS has no chain to (the -2 V2G root only)
    status, out = ocpp21(env20, _request(josev20, v, roots=[str(v["dir"] / "v2g-root.der")])["exi"])
    assert out["status"] == "Failed" and out["statusInfo"]["reasonCode"] == "WARNING_NoCertificateAvailable"[:20], out
    # a -20 request sent as ISO 15118-2, and an ISO 15118-2 request sent as -20
    req20 = _request(josev20, v)["exi"]
    r = env20.client.post("/ocpp/v21/get-15118-ev-certificate",
                          json={"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": "Install",
                                "exiRequest": req20}, headers=env20.h["cpo"])
    assert r.json()["status"] == "Failed", r.text
    from pki.cps.exi import CertificateInstallationReq, MessageHeader, V2GMessage, encode_message

    req2 = encode_message(V2GMessage(MessageHeader(bytes(8)), CertificateInstallationReq(
        "id1", Path(v["oem_chain"][0]).read_bytes()[:800], (X509IssuerSerial("CN=V2G Root CA", 1),))))
    status, out = ocpp21(env20, base64.b64encode(req2).decode())
    assert status == 400 and out["status"] == "Failed", out
    # ISO 15118-20 has no CertificateUpdate
    status, out = ocpp21(env20, req20, action="Update")
    assert status == 400 and out["status"] == "Failed"
    assert _issued(env20, emaid) == 0
    # a P-256 (-2) provisioning certificate in a -20 request
    v2 = vehicle20(env20, tmp_path / "p256", ec.SECP256R1(), profile="oem-prov")
    e2 = contract20(env20, v2["pcid"])
    v2["oem_chain"] = v2["oem_chain"][:1]
    status, out = ocpp21(env20, _request(josev20, v2, sign="ecdsa-sha256")["exi"])
    assert out["status"] == "Failed" and out["statusInfo"]["reasonCode"] == "WARNING_CertificateValidationError"[:20], out
    assert _issued(env20, e2) == 0



# -- Ed448 / X448 (#26 item 1) --------------------------------------------------------------------------------

from cryptography.hazmat.primitives.asymmetric import ed448, x448  # noqa: E402

from pki.der import bit_string, tlv  # noqa: E402

ALT_SPKI = x509.ObjectIdentifier("2.5.29.72")  # subjectAltPublicKeyInfo (ITU-T X.509 §9.8.2)


def _forge_oem_prov(env: Env20, pcid: str, key: ed448.Ed448PublicKey, extras: list[x509.ExtensionType]) -> x509.Certificate:
    """An Ed448 OEM provisioning certificate with extensions the engine's oem-prov-20 profile does not write (the
    X448 Alternate Subject Public Key [V2G20-2534], a TPM-like private extension): built here, signed by
    oem-sub2-20-ed448's key in the HSM, recorded as the engine records its certificates."""
    import hashlib as _hl

    ca = env.ctx.engine.ca("oem-sub2-20-ed448")
    now = utcnow()
    b = (x509.CertificateBuilder().subject_name(x509.Name([
        x509.NameAttribute(x509.NameOID.COMMON_NAME, pcid), x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "OEM"),
        x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(x509.NameOID.DOMAIN_COMPONENT, "OEM")]))
        .issuer_name(ca.cert.subject).public_key(key).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(ca.ski, None, None), critical=False))
    for ext in extras:
        b = b.add_extension(ext, critical=False)
    draft = b.sign(ed448.Ed448PrivateKey.generate(), None)
    assert ca.row.key_uri is not None
    signer = env.ctx.keystore.signer(ca.row.key_uri)
    assert isinstance(signer, ed448.Ed448PrivateKey)
    sig = signer.sign(draft.tbs_certificate_bytes)
    der_ = tlv(0x30, draft.tbs_certificate_bytes + bytes.fromhex("300506032b6571") + bit_string(sig))
    cert = x509.load_der_x509_certificate(der_)
    with env.ctx.db.session() as s:
        s.add(Certificate(issuer=ca.name, serial=format(cert.serial_number, "x"), profile="oem-prov-20",
                          subject=cert.subject.rfc4514_string(), identifier=pcid, not_before=now - timedelta(minutes=5),
                          not_after=now + timedelta(days=30), fingerprint=_hl.sha256(der_).hexdigest(), der=der_,
                          created_at=now))
        s.commit()
    return cert


def _spki(key: x448.X448PublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _alt_value(cert: x509.Certificate) -> bytes:
    value = cert.extensions.get_extension_for_oid(ALT_SPKI).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def ed448_csr(pcid: str, key: ed448.Ed448PrivateKey | ec.EllipticCurvePrivateKey, alt_spki: bytes | None) -> str:
    """An OEM provisioning CSR whose extensionRequest (PKCS#9) asks for the X448 Alternate Subject Public Key."""
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(x509.NameOID.COMMON_NAME, pcid), x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Test Org"),
        x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(x509.NameOID.DOMAIN_COMPONENT, "OEM")]))
    if alt_spki is not None:
        b = b.add_extension(x509.UnrecognizedExtension(ALT_SPKI, alt_spki), critical=False)
    algo = None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA512()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM).decode()


def vehicle20_ed448(env: Env20, d: Path, *, alt: bool = True, tpm: bool = False) -> dict[str, Any]:
    """An Ed448 vehicle: enrolled through the API (its CSR requests the X448 key, #26) — or, for shapes the
    engine refuses to issue (no X448 key, a TPM-like extension), a provisioning certificate forged here."""
    d.mkdir(parents=True, exist_ok=True)
    pcid = env.prov["oem"] + _a(14)
    key, xkey = ed448.Ed448PrivateKey.generate(), x448.X448PrivateKey.generate()
    if alt and not tpm:
        r = env.client.post("/v1/enrollments", json={"csr": ed448_csr(pcid, key, _spki(xkey.public_key())),
                                                     "profile": "oem-prov-20"}, headers=env.h["oem"])
        assert r.status_code == 201, r.text
        cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
        assert _alt_value(cert) == _spki(xkey.public_key())
        assert r.json()["issuer"] == "oem-sub2-20-ed448", r.json()
    else:
        extras: list[x509.ExtensionType] = []
        if alt:
            extras.append(x509.UnrecognizedExtension(ALT_SPKI, _spki(xkey.public_key())))
        if tpm:
            extras.append(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.15118.1"), b"\x04\x02TP"))
        cert = _forge_oem_prov(env, pcid, key.public_key(), extras)
    pk8 = serialization.PrivateFormat.PKCS8
    (d / "oem.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, pk8, serialization.NoEncryption()))
    (d / "x448.pem").write_bytes(xkey.private_bytes(serialization.Encoding.PEM, pk8, serialization.NoEncryption()))
    subs = [_write_der(d / f"sub{i}.der", c) for i, c in enumerate(env.ctx.engine.chain("oem-sub2-20-ed448")[:-1])]
    for name in ("v2g-root-20-ed448", "mo-root-20-ed448", "v2g-root-20", "mo-root-20"):
        _write_der(d / f"{name}.der", env.ctx.engine.ca(name).cert)
    return {"pcid": pcid, "oem_chain": [_write_der(d / "oem.der", cert), *subs], "oem_key": str(d / "oem.pem"),
            "oem_x448": str(d / "x448.pem"), "roots": [str(d / "v2g-root-20-ed448.der")], "dir": d}


def _check_ed448(josev20: Peer20, v: dict[str, Any], exi_b64: str, session_id: str) -> dict[str, Any]:
    out: dict[str, Any] = josev20("check-response", exi=exi_b64, session_id=session_id, oem_key=v["oem_key"],
                                  oem_x448=v["oem_x448"], pcid=v["pcid"],
                                  v2g_root=str(v["dir"] / "v2g-root-20-ed448.der"),
                                  mo_root=str(v["dir"] / "mo-root-20-ed448.der"))
    return out


def test_ed448_x448_installation_verified_by_an_independent_ev(josev20: Peer20, env20: Env20,
                                                              tmp_path: Path) -> None:
    v = vehicle20_ed448(env20, tmp_path / "v")
    emaid = contract20(env20, v["pcid"])
    req = _request(josev20, v, sign="ed448")
    raw = base64.b64decode(req["exi"])
    assert encode_message20(decode_message20(raw)) == raw
    status, out = ocpp21(env20, req["exi"])
    assert status == 200 and out["status"] == "Accepted", out
    res = decode_message20(base64.b64decode(out["exiResponse"]))
    assert isinstance(res, CertificateInstallationRes20)
    sd = res.signed_installation_data
    assert (sd.ecdh_curve, sd.key_kind, len(sd.dh_public_key), len(sd.encrypted_private_key)) == ("X448", "X448", 57, 84)
    assert res.header.signature is not None and res.header.signature.signed_info.signature_method == ED448
    assert len(res.header.signature.signature_value) == 114
    # byte-exact with EXIficient, and valid against the -20 XSD but for DHPublicKey's length facet (docs/cps.md)
    assert exificient_roundtrip(josev20, raw := base64.b64decode(out["exiResponse"]), fragment=False) == raw
    _validate_xsd(josev20, req["exi"])
    errors = _xsd_errors(josev20, out["exiResponse"])
    assert len(errors) == 1 and "DHPublicKey" in errors[0] and "133" in errors[0], errors  # [V2G20-2489] NOTE 7
    verdict = _check_ed448(josev20, v, out["exiResponse"], req["session_id"])
    assert verdict["ok"], verdict
    assert verdict["emaid"] == emaid and verdict["signature_method"] == ED448 and verdict["signs"]
    assert verdict["dh_public_key_octets"] == 57 and verdict["decrypted_octets"] == 56

    # tampered: a bit of the encrypted key, of the DH public key, of the signature — each refused by the EV
    k, dh = sd.encrypted_private_key, sd.dh_public_key
    for bad_sd, header in (
            (SignedInstallationData(sd.id, sd.contract_chain, sd.ecdh_curve, sd.dh_public_key,
                                    k[:30] + bytes([k[30] ^ 1]) + k[31:], sd.key_kind), res.header),
            (SignedInstallationData(sd.id, sd.contract_chain, sd.ecdh_curve, dh[:-1] + bytes([dh[-1] ^ 1]),
                                    k, sd.key_kind), res.header),
            (sd, Header20(res.header.session_id, res.header.timestamp, Signature(
                res.header.signature.signed_info, bytes([res.header.signature.signature_value[0] ^ 1])
                + res.header.signature.signature_value[1:])))):
        bad = CertificateInstallationRes20(header, res.response_code, res.evse_processing, res.cps_chain, bad_sd,
                                           res.remaining_contract_certificate_chains)
        verdict = _check_ed448(josev20, v, base64.b64encode(encode_message20(bad)).decode(), req["session_id"])
        assert not verdict["ok"], verdict


def test_ed448_vehicle_refusals_nothing_issued(josev20: Peer20, env20: Env20, tmp_path: Path) -> None:
    # no X448 Alternate Subject Public Key: its contract key could not be encrypted for it [V2G20-2534]
    v = vehicle20_ed448(env20, tmp_path / "noalt", alt=False)
    emaid = contract20(env20, v["pcid"])
    status, out = ocpp21(env20, _request(josev20, v, sign="ed448")["exi"])
    assert out["status"] == "Failed" and out["statusInfo"]["reasonCode"] == "WARNING_CertificateValidationError"[:20]
    assert "Alternate Subject Public Key" in out["statusInfo"]["additionalInfo"]
    assert _issued(env20, emaid) == 0
    # a TPM vehicle (a custom extension in its provisioning certificate, [V2G20-2518/2521]): refused clearly
    v = vehicle20_ed448(env20, tmp_path / "tpm", tpm=True)
    emaid = contract20(env20, v["pcid"])
    status, out = ocpp21(env20, _request(josev20, v, sign="ed448")["exi"])
    assert out["status"] == "Failed" and out["statusInfo"]["reasonCode"] == "FAILED"
    assert "TPM_EncryptedPrivateKey" in out["statusInfo"]["additionalInfo"]
    assert josev20("decode", exi=out["exiResponse"])["response_code"] == "FAILED"
    assert _issued(env20, emaid) == 0
    # a bad Ed448 request signature
    v = vehicle20_ed448(env20, tmp_path / "badsig")
    emaid = contract20(env20, v["pcid"])
    status, out = ocpp21(env20, _request(josev20, v, sign="ed448", corrupt_signature=True)["exi"])
    assert out["statusInfo"]["reasonCode"] == "FAILED_SignatureError"[:20], out
    assert _issued(env20, emaid) == 0


def test_ed448_provisioning_enrollment_carries_the_requested_x448_key(env20: Env20, tmp_path: Path) -> None:
    """The engine writes the X448 Alternate Subject Public Key an Ed448 CSR requests [V2G20-2534] — each
    certificate its own (no template reuses another request's key) — and refuses every other shape before
    issuing anything."""
    certs, keys = [], []
    for _ in range(3):
        key, xkey = ed448.Ed448PrivateKey.generate(), x448.X448PrivateKey.generate()
        pcid = env20.prov["oem"] + _a(14)
        r = env20.client.post("/v1/enrollments", json={"csr": ed448_csr(pcid, key, _spki(xkey.public_key())),
                                                       "profile": "oem-prov-20"}, headers=env20.h["oem"])
        assert r.status_code == 201, r.text
        cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
        assert not cert.extensions.get_extension_for_oid(ALT_SPKI).critical
        assert _alt_value(cert) == _spki(xkey.public_key())
        assert isinstance(cert.public_key(), ed448.Ed448PublicKey) and cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == pcid
        certs.append(cert)
        keys.append(_alt_value(cert))
    assert len(set(keys)) == 3
    # openssl verifies the chain; pkilint finds nothing wrong with the extension (RFC 5280 §4.2: non-critical,
    # unknown to it)
    chain = env20.ctx.engine.chain("oem-sub2-20-ed448")
    (tmp_path / "root.pem").write_bytes(chain[-1].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "subs.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[:-1]))
    (tmp_path / "leaf.pem").write_bytes(certs[0].public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                           str(tmp_path / "subs.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    from pki.lint import pkilinter
    assert pkilinter().findings(certs[0].public_bytes(serialization.Encoding.DER), set()) == []

    def refused(csr: str, status: int, code: str, words: str) -> None:
        before = _count_certs(env20)
        r = env20.client.post("/v1/enrollments", json={"csr": csr, "profile": "oem-prov-20"}, headers=env20.h["oem"])
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["type"].endswith(code) and words in r.json()["detail"], r.json()
        assert _count_certs(env20) == before

    pcid = env20.prov["oem"] + _a(14)
    ed, p521 = ed448.Ed448PrivateKey.generate(), ec.generate_private_key(ec.SECP521R1())
    x = _spki(x448.X448PrivateKey.generate().public_key())
    refused(ed448_csr(pcid, ed, None), 400, "bad-key", "2.5.29.72")  # no X448 key: no contract could reach it
    refused(ed448_csr(pcid, ed, _spki(p521.public_key())), 400, "bad-key", "X448")  # not an X448 key
    refused(ed448_csr(pcid, ed, b"\x30\x03\x02\x01\x00"), 400, "bad-key", "SubjectPublicKeyInfo")
    refused(ed448_csr(pcid, p521, x), 400, "bad-csr", "p521")  # a P-521 vehicle does ECDH with its own key
    # the engine itself refuses the extension where its profile does not define it
    from pki.csr import SubjectFields
    from pki.errors import BadKey
    from pki.issuance import IssueRequest

    with pytest.raises(BadKey):
        env20.ctx.engine.issue(IssueRequest(profile="oem-prov-20", public_key=p521.public_key(), alt_spki=x,
                                            subject=SubjectFields(pcid, None, None, "OEM"), identifier=pcid))


def _count_certs(env: Env20) -> int:
    with env.ctx.db.session() as s:
        return len(list(s.exec(select(Certificate))))


# -- refusals before issuing, the JSON endpoint, OCPP 2.1's own fields (#26 item 2) ---------------------------


def test_response_size_checked_before_issuing(josev20: Peer20, env20: Env20, tmp_path: Path) -> None:
    from pki.cps.errors import ResponseTooLarge
    from pki.cps.service20 import deliver20

    v = vehicle20(env20, tmp_path / "v")
    emaid = contract20(env20, v["pcid"])
    exi = base64.b64decode(_request(josev20, v)["exi"])
    with pytest.raises(ResponseTooLarge):
        deliver20(env20.ctx, exi, max_b64=4000)  # the chains alone would exceed it
    assert _issued(env20, emaid) == 0
    d = deliver20(env20.ctx, exi)  # OCPP 2.1's 17000: fits, and the bound held
    assert d.response_code == "OK" and len(base64.b64encode(d.exi)) <= 17000
    assert decode_message20(d.exi).signed_installation_data.key_kind == "SECP521"  # type: ignore[union-attr]


def test_ocpp21_fields_must_agree_with_the_exi_request(josev20: Peer20, env20: Env20, tmp_path: Path) -> None:
    v = vehicle20(env20, tmp_path / "v")
    e1 = contract20(env20, v["pcid"])
    e2 = contract20(env20, v["pcid"], default=False)
    req = _request(josev20, v, max_chains=2, emaids=[e2, e1])

    def post(**extra: Any) -> tuple[int, dict[str, Any]]:
        r = env20.client.post("/ocpp/v21/get-15118-ev-certificate",
                              json={"iso15118SchemaVersion": NS20, "action": "Install", "exiRequest": req["exi"],
                                    **extra}, headers=env20.h["cpo"])
        return r.status_code, r.json()

    for extra in ({"maximumContractCertificateChains": 1}, {"prioritizedEMAIDs": [e1, e2]},
                  {"prioritizedEMAIDs": [e2]}):
        status, out = post(**extra)
        assert status == 400 and out["status"] == "Failed" and out["exiResponse"] == "", out
        assert "disagree" in out["statusInfo"]["additionalInfo"]
    assert _issued(env20, e1) == _issued(env20, e2) == 0
    # agreeing copies (hyphens and case as OCPP carries them) are accepted
    status, out = post(maximumContractCertificateChains=2, prioritizedEMAIDs=[e2.lower(), e1])
    assert status == 200 and out["status"] == "Accepted" and out["remainingContracts"] == 1, out
    assert _issued(env20, e2) == 1 and _issued(env20, e1) == 0


def test_json_installation_endpoint_serves_20(josev20: Peer20, env20: Env20, tmp_path: Path) -> None:
    v = vehicle20(env20, tmp_path / "v")
    emaid = contract20(env20, v["pcid"])
    for schema in (NS20, None):  # named, or recognised from the EXI body
        req = _request(josev20, v)
        body: dict[str, Any] = {"exiRequest": req["exi"]}
        if schema:
            body["iso15118SchemaVersion"] = schema
        r = env20.client.post("/v1/contract-installations", json=body, headers=env20.h["emsp"])
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["responseCode"] == "OK" and out["emaid"] == emaid and out["ecdhCurve"] == "SECP521", out
        assert len(base64.b64decode(out["encryptedPrivateKey"])) == 94 and len(out["contractCertificateChain"]) == 3
        verdict = josev20("check-response", exi=out["exiResponse"], session_id=req["session_id"],
                          oem_key=v["oem_key"], pcid=v["pcid"], v2g_root=str(v["dir"] / "v2g-root-20.der"),
                          mo_root=str(v["dir"] / "mo-root-20.der"))
        assert verdict["ok"], verdict
    # another eMSP's vehicle: not found for this eMSP, nothing issued
    other = vehicle20(env20, tmp_path / "o")
    r = env20.client.post("/v1/contract-installations", json={"exiRequest": _request(josev20, other)["exi"],
                                                                "iso15118SchemaVersion": NS20},
                          headers=env20.h["emsp"])
    assert r.status_code == 404, r.text
