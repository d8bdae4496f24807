"""An ISO 15118-20 vehicle played by Josev (PyPI `iso15118`, EXIficient through py4j), for tests/test_cps20.py (#26).

Runs in the peer's own virtual environment (scripts/peers.sh: .peers/josev) and imports nothing from this
repository: every EXI encoding below is Josev's / EXIficient's, every digest, signature, ECDH, KDF and
AES-GCM operation is written here with `cryptography` primitives (Josev implements neither -20 signing nor
-20 key decryption), so the EV side shares no code with the service.

Protocol as tests/peers/josev_ev.py: one JSON object per line in, one JSON answer per line out. Commands:

  {"cmd": "hello"} → {"ok": true, "codec": ..., "iso15118": ...}
  {"cmd": "roundtrip", "exi": b64, "fragment": bool, "grammar": "cm20"|"xmldsig"}
      → {"exi": b64, "xml": str}: EXIficient (the -20 CommonMessages grammar in Josev's jar, or its xmldsig
        grammar) decodes the stream to XML and encodes that XML again with the same options.
  {"cmd": "install-request", "oem_chain": [DER paths, leaf first], "oem_key": PEM path, "roots": [DER paths],
   "session_id": hex, "max_chains": int, "emaids": [str] | null, "sign": "ecdsa-sha512" | "ecdsa-sha256" |
   "none", "corrupt_signature": bool}
      → {"exi": b64, "fragment": hex, "signed_info": hex}: a CertificateInstallationReq built with Josev's
        -20 message classes and encoded by its codec (OEMProvisioningCertificateChain as a fragment, SignedInfo
        with the xmldsig grammar, as Josev's EVCC does), signed here with the OEM provisioning key.
  {"cmd": "check-response", "exi": b64, "session_id": hex, "oem_key": PEM path, "pcid": str,
   "v2g_root": DER path, "mo_root": DER path}
      → a verdict: decoded by Josev into its -20 message classes; SignedInstallationData re-encoded as a
        fragment by EXIficient and digested (SHA-512), compared with the signed DigestValue; SignedInfo
        re-encoded by Josev's codec and the SignatureValue verified (ecdsa-sha512 r‖s, or Ed448) with the
        CPS leaf's key; CPS chain to the V2G root and contract chain to the MO root with `openssl verify`;
        the contract key decrypted (ECDH with the OEM provisioning key, SP 800-56A concatenation KDF with
        SHA-512 and OtherInfo 01 'U' 'V' [V2G20-2535], AES-256-GCM with AAD = PCID ‖ SKI hex [V2G20-2492],
        IV ‖ ciphertext ‖ tag [V2G20-2499/2502]) and scalar·G compared with the contract certificate's key
        [V2G20-2507/2510]; "ok" only when all hold.
  {"cmd": "decode", "exi": b64} → {"name": ..., "response_code": ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
os.environ.setdefault("MESSAGE_LOG_JSON", "false")
os.environ.setdefault("MESSAGE_LOG_EXI", "false")

from cryptography import x509  # noqa: E402
from cryptography.exceptions import InvalidSignature, InvalidTag  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x448  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from iso15118.shared.exi_codec import EXI  # noqa: E402
from iso15118.shared.exificient_exi_codec import ExificientEXICodec  # noqa: E402
from iso15118.shared.messages.enums import Namespace  # noqa: E402
from iso15118.shared.messages.iso15118_20.common_messages import (  # noqa: E402
    CertificateInstallationReq,
    CertificateInstallationRes,
    EMAIDList,
    SignedCertificateChain,
    SubCertificates,
)
from iso15118.shared.messages.iso15118_20.common_types import MessageHeader, RootCertificateIDList  # noqa: E402
from iso15118.shared.messages.xmldsig import (  # noqa: E402
    CanonicalizationMethod,
    DigestMethod,
    Reference,
    Signature,
    SignatureMethod,
    SignatureValue,
    SignedInfo,
    Transform,
    Transforms,
    X509IssuerSerial,
)
from iso15118.shared.settings import load_shared_settings  # noqa: E402

NS20 = Namespace.ISO_V20_COMMON_MSG
CANONICAL_EXI = "http://www.w3.org/TR/canonical-exi/"
SHA512_URI = "http://www.w3.org/2001/04/xmlenc#sha512"
SHA256_URI = "http://www.w3.org/2001/04/xmlenc#sha256"
ECDSA_SHA512 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512"
ECDSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
ED448_URI = "http://www.w3.org/2021/04/xmldsig-more#eddsa-ed448"
_ENV = Path(tempfile.mkdtemp(prefix="josev-ev20-")) / "josev.env"
_ENV.write_text("")


def _jvm() -> Any:
    return EXI().get_exi_codec().gateway.jvm


def _factory(fragment: bool, grammar: str) -> Any:
    jvm = _jvm()
    f = jvm.com.siemens.ct.exi.core.helpers.DefaultEXIFactory.newInstance()
    g = jvm.com.siemens.ct.exi.main.generatedgrammar
    f.setGrammars(g.ISO15118_20_V2G_CI_CommonMessages() if grammar == "cm20" else g.XMLDSIG_Core_Schema_Grammar())
    f.setValuePartitionCapacity(0)
    f.setFragment(fragment)
    return f


def _exi_to_xml(exi: bytes, fragment: bool, grammar: str) -> str:
    jvm = _jvm()
    out = jvm.java.io.StringWriter()
    source = jvm.com.siemens.ct.exi.main.api.sax.EXISource(_factory(fragment, grammar))
    jvm.javax.xml.transform.TransformerFactory.newInstance().newTransformer().transform(
        jvm.javax.xml.transform.sax.SAXSource(source.getXMLReader(),
                                              jvm.org.xml.sax.InputSource(jvm.java.io.ByteArrayInputStream(exi))),
        jvm.javax.xml.transform.stream.StreamResult(out))
    return str(out.toString())


def _xml_to_exi(xml: str, fragment: bool, grammar: str) -> bytes:
    jvm = _jvm()
    result = jvm.com.siemens.ct.exi.main.api.sax.EXIResult(_factory(fragment, grammar))
    out = jvm.java.io.ByteArrayOutputStream()
    result.setOutputStream(out)
    parsers = jvm.javax.xml.parsers.SAXParserFactory.newInstance()
    parsers.setNamespaceAware(True)
    reader = parsers.newSAXParser().getXMLReader()
    reader.setContentHandler(result.getHandler())
    reader.parse(jvm.org.xml.sax.InputSource(jvm.java.io.StringReader(xml)))
    return bytes(out.toByteArray())


def roundtrip(a: dict[str, Any]) -> dict[str, Any]:
    xml = _exi_to_xml(base64.b64decode(a["exi"]), a["fragment"], a["grammar"])
    if a["fragment"]:  # EXIficient writes a fragment's elements without a root: wrap them to parse them back
        xml = xml.split("?>", 1)[1] if xml.startswith("<?xml") else xml
    exi = _xml_to_exi(xml, a["fragment"], a["grammar"])
    return {"exi": base64.b64encode(exi).decode(), "xml": xml}


def _load_key(path: str) -> Any:
    return serialization.load_pem_private_key(Path(path).read_bytes(), None)


def _der(path: str) -> bytes:
    return Path(path).read_bytes()


def _issuer_serial(der: bytes) -> X509IssuerSerial:
    cert = x509.load_der_x509_certificate(der)
    return X509IssuerSerial(x509_issuer_name=cert.issuer.rfc4514_string(), x509_serial_number=cert.serial_number)


def _raw_ecdsa(key: ec.EllipticCurvePrivateKey, data: bytes, h: hashes.HashAlgorithm) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
    n = (key.curve.key_size + 7) // 8
    return r.to_bytes(n, "big") + s.to_bytes(n, "big")


_TIME = int(time.time())


def _request(a: dict[str, Any], oem: SignedCertificateChain, signature: Signature | None) -> Any:
    emaids = a.get("emaids")
    return CertificateInstallationReq(
        header=MessageHeader(session_id=a["session_id"].upper(), timestamp=_TIME, signature=signature),
        oem_prov_cert_chain=oem,
        root_cert_id_list=RootCertificateIDList(root_cert_ids=[_issuer_serial(_der(p)) for p in a["roots"]]),
        max_contract_cert_chains=a.get("max_chains", 1),
        prioritized_emaids=EMAIDList(emaids=emaids) if emaids else None,
    )


def _signed_info_fragment(message_exi: bytes) -> bytes:
    """The header's SignedInfo as EXIficient encodes it alone (fragment, xmldsig grammar)."""
    root = ET.fromstring(_exi_to_xml(message_exi, False, "cm20"))
    element = root.find(".//{http://www.w3.org/2000/09/xmldsig#}SignedInfo")
    if element is None:
        raise ValueError("no SignedInfo")
    return _xml_to_exi(ET.tostring(element, encoding="unicode"), True, "xmldsig")


def install_request(a: dict[str, Any]) -> dict[str, Any]:
    chain = [_der(p) for p in a["oem_chain"]]
    oem = SignedCertificateChain(id="id1", certificate=chain[0],
                                 sub_certificates=SubCertificates(certificates=chain[1:]) if chain[1:] else None)
    fragment = EXI().to_exi(oem, NS20)  # Josev's codec encodes OEMProvisioningCertificateChain as a fragment
    sign = a.get("sign", "ecdsa-sha512")
    signature = None
    signed_info_exi = b""
    if sign != "none":
        sha512 = sign != "ecdsa-sha256"
        digest = hashlib.sha512(fragment).digest() if sha512 else hashlib.sha256(fragment).digest()
        method = ED448_URI if sign == "ed448" else ECDSA_SHA512 if sha512 else ECDSA_SHA256
        si = SignedInfo(
            canonicalization_method=CanonicalizationMethod(algorithm=CANONICAL_EXI),
            signature_method=SignatureMethod(algorithm=method),
            reference=[Reference(uri="#id1", transforms=Transforms(transform=[Transform(algorithm=CANONICAL_EXI)]),
                                 digest_method=DigestMethod(algorithm=SHA512_URI if sha512 else SHA256_URI),
                                 digest_value=digest)])
        # Josev's to_exi(SignedInfo) goes through its jar's SecurityPayloads, which writes ecdsa-sha256 whatever
        # the model says: the SignedInfo is cut out of the message as EXIficient decodes it, and encoded by
        # EXIficient directly (xmldsig grammar, fragment) — what a -20 EV signs.
        placeholder = Signature(signed_info=si, signature_value=SignatureValue(value=bytes(132)))
        draft = _request(a, oem, placeholder)
        signed_info_exi = _signed_info_fragment(EXI().to_exi(draft, NS20))
        key = _load_key(a["oem_key"])
        if isinstance(key, ed448.Ed448PrivateKey):
            value = key.sign(signed_info_exi)  # RFC 8032 Ed448, 114 octets
        else:
            value = _raw_ecdsa(key, signed_info_exi, hashes.SHA512() if sha512 else hashes.SHA256())
        if a.get("corrupt_signature"):
            value = bytes([value[0] ^ 1]) + value[1:]
        signature = Signature(signed_info=si, signature_value=SignatureValue(value=value))
    exi = EXI().to_exi(_request(a, oem, signature), NS20)
    return {"exi": base64.b64encode(exi).decode(), "fragment": fragment.hex(), "signed_info": signed_info_exi.hex()}


# --- the EV's check of a -20 CertificateInstallationRes ----------------------------------------------------


def _openssl_verify(leaf: bytes, subs: list[bytes], root: bytes) -> str:
    def pem(der: bytes) -> bytes:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "root.pem").write_bytes(pem(root))
        (Path(d) / "subs.pem").write_bytes(b"".join(pem(c) for c in subs))
        (Path(d) / "leaf.pem").write_bytes(pem(leaf))
        args = ["openssl", "verify", "-x509_strict", "-CAfile", f"{d}/root.pem", f"{d}/leaf.pem"]
        if subs:
            args[-1:-1] = ["-untrusted", f"{d}/subs.pem"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return "ok" if r.returncode == 0 else (r.stdout + r.stderr).strip()


def _concat_kdf_sha512(z: bytes) -> bytes:
    # NIST SP 800-56A §5.8.1 single-step KDF, one round of SHA-512 (512 ≥ 256 bits), keydatalen 256,
    # OtherInfo = AlgorithmID 0x01 ‖ PartyUInfo 'U' ‖ PartyVInfo 'V' [V2G20-2535]
    return hashlib.sha512((1).to_bytes(4, "big") + z + b"\x01UV").digest()[:32]


def _ski_hex(cert: x509.Certificate) -> bytes:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    return ski.hex().upper().encode()


# --- Ed448 (RFC 8032 §5.2), written out: the EV must use a bare scalar, which `cryptography` cannot --------------

_ED448_P = 2**448 - 2**224 - 1
_ED448_D = -39081 % _ED448_P
_ED448_L = 2**446 - 13818066809895115352007386748515426880336692474882178609894547503885
_ED448_B = (int("2245800402959243001876043340998960362467896416325641342461254616869504"
                "15467406032909029192869357953282578032075146446173674602635247710"),
            int("2988192100784814926760179304439306734375440401540802420959282413723315"
                "06189835876003536878655418784733982303233503462500531545062832660"))


def _ed448_add(p: tuple[int, int], q: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2), m = p, q, _ED448_P
    t = _ED448_D * x1 * x2 * y1 * y2 % m
    return ((x1 * y2 + y1 * x2) * pow(1 + t, -1, m) % m, (y1 * y2 - x1 * x2) * pow(1 - t, -1, m) % m)


def _ed448_mul(k: int, p: tuple[int, int]) -> tuple[int, int]:
    acc = (0, 1)  # the neutral element
    while k:
        if k & 1:
            acc = _ed448_add(acc, p)
        p, k = _ed448_add(p, p), k >> 1
    return acc


def _ed448_encode(p: tuple[int, int]) -> bytes:
    x, y = p
    return (y | (x & 1) << 455).to_bytes(57, "little")


def _ed448_sign_with_scalar(s: int, public: bytes, message: bytes) -> bytes:
    """Ed448 with the scalar alone (random nonce): R = r·B, k = SHAKE256(dom4(0, "") ‖ R ‖ A ‖ M) mod L,
    S = r + k·s mod L; any verifier accepts it if s·B is the public key."""
    r = secrets.randbelow(_ED448_L - 1) + 1
    big_r = _ed448_encode(_ed448_mul(r, _ED448_B))
    dom4 = b"SigEd448" + bytes([0, 0])
    k = int.from_bytes(hashlib.shake_256(dom4 + big_r + public + message).digest(114), "little") % _ED448_L
    return big_r + ((r + k * s) % _ED448_L).to_bytes(57, "little")


def check_response(a: dict[str, Any]) -> dict[str, Any]:
    exi = base64.b64decode(a["exi"])
    res = EXI().from_exi(exi, NS20)
    if not isinstance(res, CertificateInstallationRes):
        return {"ok": False, "error": f"expected CertificateInstallationRes, got {type(res).__name__}"}
    v: dict[str, Any] = {"response_code": str(res.response_code.value),
                         "session_id_matches": res.header.session_id.lower() == a["session_id"].lower(),
                         "remaining": res.remaining_contract_cert_chains}
    sid = res.signed_installation_data
    # the signed fragment as EXIficient encodes it, from the XML EXIficient decodes the message to
    xml = _exi_to_xml(exi, False, "cm20")
    element = ET.fromstring(xml).find(f"{{{NS20.value}}}SignedInstallationData")
    if element is None:
        return {"ok": False, "error": "no SignedInstallationData"}
    fragment = _xml_to_exi(ET.tostring(element, encoding="unicode"), True, "cm20")
    v["fragment"] = fragment.hex()
    sig = res.header.signature
    if sig is None:
        return {**v, "ok": False, "error": "response not signed"}
    refs = sig.signed_info.reference
    v["references"] = [r.uri for r in refs]
    digest_ok = len(refs) == 1 and refs[0].uri == "#" + sid.id and refs[0].digest_method.algorithm == SHA512_URI \
        and refs[0].digest_value == hashlib.sha512(fragment).digest()
    v["digest_matches"] = digest_ok
    si_exi = _signed_info_fragment(exi)  # not Josev's to_exi(SignedInfo): see _request
    cps = res.cps_certificate_chain
    cps_subs = list(cps.sub_certificates.certificates) if cps.sub_certificates else []
    cps_key = x509.load_der_x509_certificate(cps.certificate).public_key()
    value = sig.signature_value.value
    method = sig.signed_info.signature_method.algorithm
    v["signature_method"] = method
    try:
        if isinstance(cps_key, ec.EllipticCurvePublicKey) and method == ECDSA_SHA512:
            n = (cps_key.curve.key_size + 7) // 8
            if len(value) != 2 * n:
                raise InvalidSignature
            der = encode_dss_signature(int.from_bytes(value[:n], "big"), int.from_bytes(value[n:], "big"))
            cps_key.verify(der, si_exi, ec.ECDSA(hashes.SHA512()))
        elif isinstance(cps_key, ed448.Ed448PublicKey) and method == ED448_URI:
            cps_key.verify(value, si_exi)
        else:
            raise InvalidSignature
        v["signature_valid"] = True
    except InvalidSignature:
        v["signature_valid"] = False
    v2g_root, mo_root = _der(a["v2g_root"]), _der(a["mo_root"])
    v["cps_chain"] = _openssl_verify(cps.certificate, cps_subs, v2g_root)
    cc = sid.contract_cert_chain
    contract = x509.load_der_x509_certificate(cc.certificate)
    v["contract_chain"] = _openssl_verify(cc.certificate, list(cc.sub_certificates.certificates), mo_root)
    v["emaid"] = contract.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    v["key_matches_certificate"] = False
    try:
        oem_key = _load_key(a["oem_key"])
        aad = a["pcid"].upper().encode() + _ski_hex(contract)  # [V2G20-2492]: 18 + 16 octets
        if sid.ecdh_curve.value == "SECP521":
            blob = sid.secp521_encrypted_private_key
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP521R1(), sid.dh_public_key)
            z = oem_key.exchange(ec.ECDH(), peer)
            plain = AESGCM(_concat_kdf_sha512(z)).decrypt(blob[:12], blob[12:], aad)
            if len(plain) != 66 or plain[0] & 0xFE:  # [V2G20-2678]: 7 leading zero bits
                raise ValueError("not a 521-bit key")
            key = ec.derive_private_key(int.from_bytes(plain, "big"), ec.SECP521R1())
            cert_pub = contract.public_key()
            v["key_matches_certificate"] = key.public_key().public_numbers() == cert_pub.public_numbers()
        else:
            # [V2G20-2534]: ECDH with the private key of the OEM provisioning certificate's Alternate Subject
            # Public Key (the X448 key the test gave the vehicle); DHPublicKey 0x04 ‖ 56 octets [V2G20-2489]
            blob = sid.x448_encrypted_private_key
            dh = sid.dh_public_key
            v["dh_public_key_octets"] = len(dh)
            if len(dh) != 57 or dh[0] != 0x04:
                raise ValueError(f"DHPublicKey for X448 is not 0x04 ‖ 56 octets ({len(dh)} octets)")
            if sid.ecdh_curve.value != "X448" or blob is None or len(blob) != 84:
                raise ValueError("X448 needs X448_EncryptedPrivateKey of 84 octets")
            vehicle_x448 = _load_key(a["oem_x448"])
            z = vehicle_x448.exchange(x448.X448PublicKey.from_public_bytes(dh[1:]))
            plain = AESGCM(_concat_kdf_sha512(z)).decrypt(blob[:12], blob[12:], aad)
            v["decrypted_octets"] = len(plain)
            # [V2G20-2509/2510]: the 448-bit key is < L and its multiple of the base point is the certificate's
            # Ed448 public key; then a signature made with it must verify under that key (RFC 8032)
            scalar = int.from_bytes(plain, "big")
            cert_pub = contract.public_key()
            if len(plain) != 56 or not 0 < scalar < _ED448_L or not isinstance(cert_pub, ed448.Ed448PublicKey):
                raise ValueError("not a 448-bit Ed448 scalar")
            raw = cert_pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            v["key_matches_certificate"] = _ed448_encode(_ed448_mul(scalar, _ED448_B)) == raw
            message = b"AuthorizationReq " + secrets.token_bytes(16)
            try:
                cert_pub.verify(_ed448_sign_with_scalar(scalar, raw, message), message)
                v["signs"] = True
            except InvalidSignature:
                v["signs"] = False
            v["key_matches_certificate"] = v["key_matches_certificate"] and v["signs"]
        v["decrypted"] = True
    except (InvalidTag, ValueError) as exc:
        v["decrypt_error"] = f"{type(exc).__name__}: {exc}"
        v["decrypted"] = False
    v["ok"] = bool(v["session_id_matches"] and v["response_code"] == "OK" and v["digest_matches"]
                   and v["signature_valid"] and v["cps_chain"] == "ok" and v["contract_chain"] == "ok"
                   and v["key_matches_certificate"])
    return v


def decode(a: dict[str, Any]) -> dict[str, Any]:
    msg = EXI().from_exi(base64.b64decode(a["exi"]), NS20)
    code = getattr(msg, "response_code", None)
    return {"name": type(msg).__name__, "response_code": str(code.value) if code is not None else None,
            "remaining": getattr(msg, "remaining_contract_cert_chains", None)}


def hello(_: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {"ok": True, "codec": EXI().get_exi_codec().get_version(), "iso15118": version("iso15118")}


COMMANDS = {"hello": hello, "roundtrip": roundtrip, "install-request": install_request,
            "check-response": check_response, "decode": decode}


def main() -> int:
    load_shared_settings(str(_ENV))
    EXI().set_exi_codec(ExificientEXICodec())
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
