"""An ISO 15118-2 vehicle played by Josev (PyPI `iso15118`, EXIficient through py4j), for tests/test_cps_josev.py.

Runs in the peer's own virtual environment (scripts/peers.sh: .peers/josev), never in the service's: it
imports nothing from this repository, so every EXI encoding, digest, signature, chain check and key
decryption below is Josev's (or OpenSSL's), not ours.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout (the JVM behind the EXI
codec takes seconds to start, so one process serves a whole test module). Everything else that would
reach stdout (Josev's logging, the JVM) goes to stderr. Commands:

  {"cmd": "hello"}
      → {"ok": true, "codec": EXIficient version, "iso15118": package version}
  {"cmd": "install-request", "oem_cert": DER path, "oem_key": PEM path, "roots": [DER paths], "session_id": hex}
      → {"exi": base64 V2G_Message, "digest": hex}: a CertificateInstallationReq built with Josev's
        message models, its RootCertificateIDs taken with Josev's get_cert_issuer_serial, the body
        fragment EXI-encoded by EXIficient and signed with Josev's create_signature, as Josev's EVCC does.
  {"cmd": "update-request", "chain": [DER paths, leaf first], "key": PEM path, "roots": [...],
   "session_id": hex}
      → {"exi": ..., "digest": hex, "fragment": hex}: a CertificateUpdateReq signed with the current
        contract key by Josev's create_signature. Josev's EVCC never sends one: its pydantic model gives the
        request's eMAID an Id (the schema's eMAIDType is a plain string) and its JSON codec does not encode
        CertificateUpdateReq as a fragment. So the message is built as the JSON Josev's codec consumes, and
        the signed fragment is encoded by the EXIficient inside Josev's jar, driven directly (fragment mode,
        ISO 15118-2 grammars, valuePartitionCapacity 0) from the XML EXIficient decodes the message to.
  {"cmd": "check-response", "exi": base64, "kind": "install"|"update", "session_id": hex,
   "decrypt_key": PEM path (OEM provisioning key, or the current contract key for an update),
   "v2g_root": DER path, "mo_root": DER path, "save_contract_key": optional PEM path}
      → a verdict: decoded by Josev's EXI codec into its message models; each of the four signed elements
        re-encoded by EXIficient and digested by Josev, compared with the DigestValues the CPS signed;
        Josev's verify_signature (digests + SignatureValue over EXIficient's SignedInfo + the CPS chain to
        the V2G root with verify_certs); both chains also with Josev's verify_certs and `openssl verify`;
        the contract key decrypted with Josev's decrypt_priv_key and scalar·G compared with the contract
        certificate's public key [V2G2-823]; "ok" only when all hold.
  {"cmd": "decode", "exi": base64} → {"body": name, "response_code": ...}
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# Protocol answers use the original stdout; anything else printed in this process goes to stderr.
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
os.environ.setdefault("MESSAGE_LOG_JSON", "false")
os.environ.setdefault("MESSAGE_LOG_EXI", "false")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from iso15118.shared.exi_codec import EXI, CustomJSONEncoder  # noqa: E402
from iso15118.shared.exificient_exi_codec import ExificientEXICodec  # noqa: E402
from iso15118.shared.messages.enums import Namespace  # noqa: E402
from iso15118.shared.messages.iso15118_2.body import Body, CertificateInstallationReq  # noqa: E402
from iso15118.shared.messages.iso15118_2.datatypes import RootCertificateIDList  # noqa: E402
from iso15118.shared.messages.iso15118_2.header import MessageHeader  # noqa: E402
from iso15118.shared.messages.iso15118_2.msgdef import V2GMessage  # noqa: E402
from iso15118.shared.messages.xmldsig import X509IssuerSerial  # noqa: E402
from iso15118.shared.security import (  # noqa: E402
    KeyEncoding,
    create_digest,
    create_signature,
    decrypt_priv_key,
    get_cert_cn,
    get_cert_issuer_serial,
    load_cert,
    load_priv_key,
    to_ec_pub_key,
    verify_certs,
    verify_signature,
)
from iso15118.shared.settings import load_shared_settings  # noqa: E402

NS = Namespace.ISO_V2_MSG_DEF
_EMPTY_PASSWORD = Path(tempfile.mkdtemp(prefix="josev-ev-")) / "no-password.txt"
_EMPTY_PASSWORD.write_text("")  # Josev's load_priv_key reads the key password from a file; empty = none
_EMPTY_ENV = _EMPTY_PASSWORD.with_name("josev.env")
_EMPTY_ENV.write_text("")  # Josev's settings read a .env file; this one, not whatever lies around


def _key(path: str) -> ec.EllipticCurvePrivateKey:
    return load_priv_key(path, KeyEncoding.PEM, str(_EMPTY_PASSWORD))


def _root_ids(paths: list[str]) -> RootCertificateIDList:
    # What Josev's EVCC puts in ListOfRootCertificateIDs: issuer as Python's str(Name), serial number.
    out = []
    for p in paths:
        issuer, serial = get_cert_issuer_serial(p)
        out.append(X509IssuerSerial(x509_issuer_name=issuer, x509_serial_number=serial))
    return RootCertificateIDList(x509_issuer_serials=out)


def _message(session_id: str, body: Body, signature: Any) -> bytes:
    msg = V2GMessage(header=MessageHeader(session_id=session_id.upper(), signature=signature), body=body)
    return EXI().to_exi(msg, NS)


def install_request(a: dict[str, Any]) -> dict[str, Any]:
    req = CertificateInstallationReq(id="id1", oem_provisioning_cert=load_cert(a["oem_cert"]),
                                     list_of_root_cert_ids=_root_ids(a["roots"]))
    fragment = EXI().to_exi(req, NS)
    signature = create_signature([(req.id, fragment)], _key(a["oem_key"]))
    exi = _message(a["session_id"], Body.parse_obj({str(req): req.dict()}), signature)
    return {"exi": base64.b64encode(exi).decode(), "digest": create_digest(fragment).hex(), "fragment": fragment.hex()}


def _exificient(fragment: bool) -> Any:
    """An EXIFactory of the EXIficient inside Josev's jar, with the ISO 15118-2 grammars Josev's codec uses."""
    jvm = EXI().get_exi_codec().gateway.jvm
    f = jvm.com.siemens.ct.exi.core.helpers.DefaultEXIFactory.newInstance()
    f.setGrammars(jvm.com.siemens.ct.exi.main.generatedgrammar.ISO15118_2Grammar())
    f.setValuePartitionCapacity(0)
    f.setFragment(fragment)
    return f


def _body_fragment(exi_message: bytes, local: str) -> bytes:
    """The body element ``local`` of an EXI V2G_Message, as EXIficient encodes it as a fragment: EXIficient
    decodes the message to XML, the element is cut out, EXIficient encodes it in fragment mode."""
    jvm = EXI().get_exi_codec().gateway.jvm
    xml = jvm.java.io.StringWriter()
    source = jvm.com.siemens.ct.exi.main.api.sax.EXISource(_exificient(False))
    jvm.javax.xml.transform.TransformerFactory.newInstance().newTransformer().transform(
        jvm.javax.xml.transform.sax.SAXSource(source.getXMLReader(),
                                              jvm.org.xml.sax.InputSource(jvm.java.io.ByteArrayInputStream(exi_message))),
        jvm.javax.xml.transform.stream.StreamResult(xml))
    element = ET.fromstring(xml.toString()).find(f".//{{{Namespace.ISO_V2_MSG_BODY.value}}}{local}")
    if element is None:
        raise ValueError(f"no {local} in the message")
    result = jvm.com.siemens.ct.exi.main.api.sax.EXIResult(_exificient(True))
    out = jvm.java.io.ByteArrayOutputStream()
    result.setOutputStream(out)
    parsers = jvm.javax.xml.parsers.SAXParserFactory.newInstance()
    parsers.setNamespaceAware(True)
    reader = parsers.newSAXParser().getXMLReader()
    reader.setContentHandler(result.getHandler())
    reader.parse(jvm.org.xml.sax.InputSource(jvm.java.io.StringReader(ET.tostring(element, encoding="unicode"))))
    return bytes(out.toByteArray())


def update_request(a: dict[str, Any]) -> dict[str, Any]:
    codec = EXI().get_exi_codec()
    certs = [load_cert(p) for p in a["chain"]]
    chain: dict[str, Any] = {"Id": "id2", "Certificate": certs[0]}
    if len(certs) > 1:
        chain["SubCertificates"] = {"Certificate": certs[1:]}
    req = {"Id": "id1", "ContractSignatureCertChain": chain, "eMAID": get_cert_cn(certs[0]),
           "ListOfRootCertificateIDs": _root_ids(a["roots"]).dict(by_alias=True)}

    def message(signature: Any) -> bytes:
        header = MessageHeader(session_id=a["session_id"].upper(), signature=signature)
        doc = {"V2G_Message": {"Header": header.dict(by_alias=True, exclude_none=True),
                               "Body": {"CertificateUpdateReq": req}}}
        return bytes(codec.encode(json.dumps(doc, cls=CustomJSONEncoder), NS))

    # Josev's JSON codec puts only the elements its EVCC signs in fragment mode (not CertificateUpdateReq):
    # the fragment comes from the same EXIficient, driven directly.
    fragment = _body_fragment(message(None), "CertificateUpdateReq")
    exi = message(create_signature([("id1", fragment)], _key(a["key"])))
    return {"exi": base64.b64encode(exi).decode(), "digest": create_digest(fragment).hex(), "fragment": fragment.hex()}


def _openssl_verify(leaf: bytes, subs: list[bytes], root: bytes) -> str:
    def pem(der: bytes) -> bytes:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "root.pem").write_bytes(pem(root))
        (Path(d) / "subs.pem").write_bytes(b"".join(pem(c) for c in subs))
        (Path(d) / "leaf.pem").write_bytes(pem(leaf))
        r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", f"{d}/root.pem", "-untrusted",
                            f"{d}/subs.pem", f"{d}/leaf.pem"], capture_output=True, text=True, timeout=60)
    return "ok" if r.returncode == 0 else (r.stdout + r.stderr).strip()


def _verify_certs(leaf: bytes, subs: list[bytes], root: bytes) -> str:
    try:
        verify_certs(leaf, subs, root)
    except Exception as exc:  # Josev's Cert*Error family: report, the verdict says not ok
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _subs(chain: Any) -> list[bytes]:
    return list(chain.sub_certificates.certificates) if chain.sub_certificates else []


def check_response(a: dict[str, Any]) -> dict[str, Any]:
    exi = base64.b64decode(a["exi"])
    msg = EXI().from_exi(exi, NS)
    res = msg.body.certificate_update_res if a["kind"] == "update" else msg.body.certificate_installation_res
    if res is None:
        return {"ok": False, "error": f"expected a {a['kind']} response, got {msg.body.get_message_name()}"}
    v: dict[str, Any] = {"body": msg.body.get_message_name(), "response_code": str(res.response_code.value),
                         "session_id": msg.header.session_id.lower(),
                         "session_id_matches": msg.header.session_id.lower() == a["session_id"].lower()}
    elements = [(res.contract_cert_chain.id, EXI().to_exi(res.contract_cert_chain, NS)),
                (res.encrypted_private_key.id, EXI().to_exi(res.encrypted_private_key, NS)),
                (res.dh_public_key.id, EXI().to_exi(res.dh_public_key, NS)),
                (res.emaid.id, EXI().to_exi(res.emaid, NS))]
    signed = {r.uri: r.digest_value.hex() for r in msg.header.signature.signed_info.reference}
    v["digests"] = {i: {"josev": create_digest(e).hex(), "signed": signed.get("#" + i)} for i, e in elements}
    v["digests_match"] = all(d["josev"] == d["signed"] for d in v["digests"].values())
    v["emaid"] = res.emaid.value
    v["emaid_fragment"] = elements[3][1].hex()
    cps, contract = res.cps_cert_chain, res.contract_cert_chain
    v2g_root, mo_root = load_cert(a["v2g_root"]), load_cert(a["mo_root"])
    # Josev's check as its EVCC runs it: digests, SignatureValue, and the CPS chain to the V2G root.
    v["signature_valid"] = verify_signature(signature=msg.header.signature, elements_to_sign=elements,
                                            leaf_cert=cps.certificate, sub_ca_certs=_subs(cps),
                                            root_ca_cert=v2g_root)
    v["cps_chain"] = {"josev": _verify_certs(cps.certificate, _subs(cps), v2g_root),
                      "openssl": _openssl_verify(cps.certificate, _subs(cps), v2g_root)}
    v["contract_chain"] = {"josev": _verify_certs(contract.certificate, _subs(contract), mo_root),
                           "openssl": _openssl_verify(contract.certificate, _subs(contract), mo_root)}
    v["emaid_is_contract_cn"] = get_cert_cn(contract.certificate) == res.emaid.value
    v["key_matches_certificate"] = False
    try:
        raw = decrypt_priv_key(encrypted_priv_key_with_iv=res.encrypted_private_key.value,
                               ecdh_priv_key=_key(a["decrypt_key"]),
                               ecdh_pub_key=to_ec_pub_key(res.dh_public_key.value))
        v["decrypted_key_octets"] = len(raw)
        key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
        cert_pub = x509.load_der_x509_certificate(contract.certificate).public_key()
        v["key_matches_certificate"] = key.public_key().public_numbers() == cert_pub.public_numbers()
        if a.get("save_contract_key"):
            Path(a["save_contract_key"]).write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    except Exception as exc:  # a wrong key or point: the verdict says not ok
        v["decrypt_error"] = f"{type(exc).__name__}: {exc}"
    v["ok"] = bool(v["session_id_matches"] and v["response_code"] == "OK" and v["digests_match"]
                   and v["signature_valid"] and v["emaid_is_contract_cn"] and v["key_matches_certificate"]
                   and all(r == "ok" for c in (v["cps_chain"], v["contract_chain"]) for r in c.values()))
    return v


def decode(a: dict[str, Any]) -> dict[str, Any]:
    msg = EXI().from_exi(base64.b64decode(a["exi"]), NS)
    name = msg.body.get_message_name()
    res = getattr(msg.body, {"CertificateInstallationRes": "certificate_installation_res",
                             "CertificateUpdateRes": "certificate_update_res"}.get(name, "_"), None)
    return {"body": name, "session_id": msg.header.session_id.lower(),
            "response_code": str(res.response_code.value) if res is not None else None}


def hello(_: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {"ok": True, "codec": EXI().get_exi_codec().get_version(), "iso15118": version("iso15118")}


COMMANDS = {"hello": hello, "install-request": install_request, "update-request": update_request,
            "check-response": check_response, "decode": decode}


def main() -> int:
    load_shared_settings(str(_EMPTY_ENV))  # MESSAGE_LOG_* from the environment set above
    EXI().set_exi_codec(ExificientEXICodec())  # starts the JVM once
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            a = json.loads(line)
            out = COMMANDS[a["cmd"]](a)
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        _PROTO.write(json.dumps(out) + "\n")
        _PROTO.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
