"""OCSP requests (RFC 6960 §4.1.1): parsed by asn1crypto, plus the checks it leaves to us; CertID encoding.

asn1crypto parses the structure, several CertIDs included (cryptography's ``load_der_ocsp_request``
refuses more than one, which §4.1.1 allows). It also accepts BER (indefinite and non-minimal lengths), so
:func:`check_der` first walks the encoding with pki/der.py's strict reader (X.690 §10.1: definite, minimal
lengths; single-octet tags; nothing after the last element). What this module adds to asn1crypto: a
nonce of 1..32 octets (RFC 8954 §2.1), unknown critical extensions refused (§4.4), hash parameters NULL or
absent (RFC 5754 §2), hash lengths matching the algorithm, at most MAX_CERT_IDS CertIDs, and a padded
serial re-encoded minimally in the CertID we echo. tests/test_ocsp_request.py compares this parser with
the reader it replaced and with cryptography's on real and fuzzed requests."""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import core as asn1_core
from asn1crypto import ocsp as asn1_ocsp

from pki.der import DerError, der_int, der_oid, elements, read_tlv, seq, tlv
from pki.errors import MalformedOCSPRequest

HASH_OIDS: dict[str, str] = {
    "sha1": "1.3.14.3.2.26",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
_HASH_BY_OID: dict[str, str] = {o: n for n, o in HASH_OIDS.items()}
HASH_LEN = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# AlgorithmIdentifier with NULL parameters, as OpenSSL and cryptography put it in CertIDs.
_HASH_ALGID: dict[str, bytes] = {n: seq(der_oid(o), b"\x05\x00") for n, o in HASH_OIDS.items()}

OID_NONCE = "1.3.6.1.5.5.7.48.1.2"  # id-pkix-ocsp-nonce (RFC 6960 §4.4.1, RFC 8954)

MAX_CERT_IDS = 32  # bounded work per request; far beyond what any client sends


@dataclass(frozen=True)
class CertIdReq:
    raw: bytes  # the CertID DER as received (echoed in live responses)
    hash_alg: str | None  # None: a hash algorithm we do not know
    name_hash: bytes
    key_hash: bytes
    serial: int


@dataclass(frozen=True)
class OcspRequest:
    cert_ids: list[CertIdReq]
    nonce_ext_value: bytes | None  # the extnValue OCTET STRING contents, echoed verbatim (RFC 8954 §2.1)


def check_der(der: bytes) -> None:
    """Strict DER framing of every element (X.690 §10.1), iteratively (a request nests at most a few
    levels, but a hostile one could nest thousands): definite minimal lengths, single-octet tags, and each
    constructed element exactly filled by its children. BOOLEANs are 0x00 or 0xFF. Raises DerError."""
    stack = [(0, len(der), True)]
    while stack:
        pos, end, top = stack.pop()
        if top:
            tag, s, e = read_tlv(der, pos, end)
            if e != end:
                raise DerError("trailing data")
        while pos < end:
            tag, s, e = read_tlv(der, pos, end)
            if tag & 0x20:
                stack.append((s, e, False))
            elif tag == 0x01 and (e - s != 1 or der[s] not in (0x00, 0xFF)):
                raise DerError("bad BOOLEAN")
            elif tag == 0x06 and (s == e or der[e - 1] & 0x80 or any(
                    der[i] == 0x80 and (i == s or not der[i - 1] & 0x80) for i in range(s, e))):
                # X.690 §8.19.2: each arc in base 128, minimal, its last octet without bit 8 (asn1crypto
                # reads a truncated arc and re-encodes the OID without it).
                raise DerError("bad OBJECT IDENTIFIER")
            pos = e


def parse_request(der: bytes) -> OcspRequest:
    """Parse a DER OCSPRequest (RFC 6960 §4.1.1). Raises MalformedOCSPRequest."""
    plain = _canonical_single(der)
    if plain is not None:
        return plain
    try:
        check_der(der)
        _check_layout(der)
        req = asn1_ocsp.OCSPRequest.load(der, strict=True)
        req.native  # noqa: B018 - asn1crypto parses lazily: this reads (and so checks) every field once
        return _parse_request(req)
    except Exception as exc:  # noqa: BLE001 - asn1crypto raises several kinds (ValueError, TypeError,
        # AttributeError, ...) on hostile input: every one means the bytes are not an OCSPRequest.
        raise MalformedOCSPRequest(f"not a DER OCSPRequest: {type(exc).__name__}") from None


def _canonical_single(der: bytes) -> OcspRequest | None:
    """The request of the RFC 5019 shape (:func:`rfc5019_certid`) whose CertID is exactly what
    :func:`certid_der` builds — a known hash algorithm with NULL parameters, hashes of its length, a minimal
    serial — read by offsets; None for anything else (then asn1crypto parses it). What the API's /ocsp and
    ocsp-serve's misses receive from every RFC 5019 client: asn1crypto took ≈ 200 µs for it (tens of µs
    under no load), this a few. Re-encoding the fields and comparing makes it exact; tests/test_ocsp_request.py
    compares it with asn1crypto and the former reader on real and fuzzed requests."""
    key = rfc5019_certid(der)
    if key is None or len(key) < 4 or key[0] != 0x30 or key[1] != len(key) - 2:
        return None
    for alg, algid in _HASH_ALGID.items():
        if key.startswith(algid, 2):
            h = HASH_LEN[alg]
            p = 2 + len(algid)
            nh, kh = key[p + 2 : p + 2 + h], key[p + 4 + h : p + 4 + 2 * h]
            q = p + 4 + 2 * h
            if len(key) < q + 3:
                return None
            serial = int.from_bytes(key[q + 2 :], "big", signed=True)
            if certid_der(alg, nh, kh, serial) != key:
                return None
            return OcspRequest([CertIdReq(key, alg, nh, kh, serial)], None)
    return None


def _tags(der: bytes, start: int, end: int) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    parts = elements(der, start, end)
    return [t for t, _, _, _ in parts], parts


def _fits(tags: list[int], grammar: tuple[tuple[int, bool], ...]) -> bool:
    """``tags`` in the order of ``grammar`` ((tag, optional), ...), nothing else."""
    i = 0
    for tag, optional in grammar:
        if i < len(tags) and tags[i] == tag:
            i += 1
        elif not optional:
            return False
    return i == len(tags)


def _check_layout(der: bytes) -> None:
    """The order of the SEQUENCE members down to each Request (RFC 6960 §4.1.1): asn1crypto matches
    members to fields by tag, and let a member out of place through (an [1] after requestList)."""
    tags, parts = _tags(der, 0, len(der))
    if tags != [0x30]:
        raise DerError("not one SEQUENCE")
    tags, parts = _tags(der, parts[0][2], parts[0][3])
    if not _fits(tags, ((0x30, False), (0xA0, True))):  # tbsRequest, optionalSignature
        raise DerError("bad OCSPRequest")
    tbs = parts[0]
    tags, parts = _tags(der, tbs[2], tbs[3])
    if not _fits(tags, ((0xA0, True), (0xA1, True), (0x30, False), (0xA2, True))):
        raise DerError("bad TBSRequest")
    (_, _, ls, le), = [p for p in parts if p[0] == 0x30]
    for tag, _, rs, re_ in elements(der, ls, le):
        if tag != 0x30 or not _fits(_tags(der, rs, re_)[0], ((0x30, False), (0xA0, True))):
            raise DerError("bad Request")


def _extensions(exts: asn1_core.Asn1Value) -> list[tuple[str, bool, bytes]]:
    """(extnID, critical, extnValue contents) of each extension; a repeated extension is refused (RFC 5280
    §4.2 applies to Extensions)."""
    out: list[tuple[str, bool, bytes]] = []
    seen: set[str] = set()
    for ext in exts:
        oid = ext["extn_id"].dotted
        if oid in seen:
            raise DerError("duplicate extension")
        seen.add(oid)
        # extnValue is an OCTET STRING wrapping the extension's own DER: its contents, as received.
        out.append((oid, bool(ext["critical"].native), bytes(ext["extn_value"].contents)))
    return out


def _parse_request(req: asn1_ocsp.OCSPRequest) -> OcspRequest:
    # optionalSignature [0] EXPLICIT: accepted and ignored — RFC 5019 §2.1.1 (we never require one).
    tbs = req["tbs_request"]
    if tbs["version"].native != "v1":  # [0] EXPLICIT DEFAULT v1 (DER omits it; an explicit v1 is tolerated)
        raise DerError("unsupported version")
    # requestorName [1] EXPLICIT GeneralName: informational, ignored.
    requests = tbs["request_list"]
    if len(requests) > MAX_CERT_IDS:
        raise DerError(f"more than {MAX_CERT_IDS} CertIDs")
    if len(requests) == 0:
        raise DerError("empty requestList")
    cert_ids = [_certid(r) for r in requests]
    nonce: bytes | None = None
    exts = tbs["request_extensions"]
    if exts.native is not None:
        if len(exts) == 0:
            raise DerError("bad Extensions")  # SIZE (1..MAX)
        for oid, critical, value in _extensions(exts):
            if oid == OID_NONCE:
                # RFC 8954 §2.1: Nonce ::= OCTET STRING (SIZE(1..32)), DER inside extnValue.
                tag, ns, ne = read_tlv(value, 0, len(value))
                if tag != 0x04 or ne != len(value) or not 1 <= ne - ns <= 32:
                    raise DerError("nonce must be an OCTET STRING of 1..32 octets (RFC 8954)")
                nonce = value
            elif critical:
                raise DerError("unsupported critical request extension")
    return OcspRequest(cert_ids, nonce)


def _certid(request: asn1_ocsp.Request) -> CertIdReq:
    exts = request["single_request_extensions"]
    if exts.native is not None:
        if len(exts) == 0:
            raise DerError("bad Extensions")
        if any(critical for _oid, critical, _v in _extensions(exts)):
            raise DerError("unsupported critical single request extension")
    cid = request["req_cert"]
    algid = cid["hash_algorithm"]
    if algid["parameters"].dump() not in (b"", b"\x05\x00"):  # NULL or absent (RFC 5754 §2 accepts both)
        raise DerError("unexpected hash parameters")
    alg = _HASH_BY_OID.get(algid["algorithm"].dotted)
    name_hash, key_hash = bytes(cid["issuer_name_hash"].native), bytes(cid["issuer_key_hash"].native)
    serial_der = cid["serial_number"].contents
    if not serial_der:
        raise DerError("bad serialNumber")
    if alg is not None and (len(name_hash) != HASH_LEN[alg] or len(key_hash) != HASH_LEN[alg]):
        raise DerError("hash length does not match hashAlgorithm")
    serial = int.from_bytes(serial_der, "big", signed=True)
    raw = cid.dump()
    # X.690 §8.3.2: an INTEGER's first nine bits are never all zeros or all ones. The CertID goes back
    # in the response (RFC 6960 §4.2.1); echoing a padded serial would make our answer undecodable to
    # the client's DER parser, so answer for the same CertID with the serial re-encoded minimally.
    if len(serial_der) > 1 and ((serial_der[0] == 0 and serial_der[1] < 0x80)
                                or (serial_der[0] == 0xFF and serial_der[1] >= 0x80)):
        raw = seq(algid.dump(), tlv(0x04, name_hash), tlv(0x04, key_hash), der_int(serial))
    return CertIdReq(raw, alg, name_hash, key_hash, serial)


def certid_der(alg: str, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    return seq(_HASH_ALGID[alg], tlv(0x04, name_hash), tlv(0x04, key_hash), der_int(serial))


def rfc5019_certid(der: bytes) -> bytes | None:
    """The CertID bytes of a request of the RFC 5019 §2.1.1 shape — OCSPRequest{TBSRequest{requestList{
    Request{CertID}}}}, short lengths, nothing else — read from its first eight octets without parsing; None
    for any other request. ocsp-serve's hot path (api/ocsp_fast.py) looks them up as they are: a hit is
    byte-identical to a canonical CertID it stored, so the request was valid (bench/ocsp.py: no ASN.1 parse
    per request). tests/test_ocsp_request.py checks it against asn1crypto's parse on real and fuzzed
    requests."""
    n = len(der)
    if (9 < n < 130 and der[0] == 0x30 and der[1] == n - 2 and der[2] == 0x30 and der[3] == n - 4
            and der[4] == 0x30 and der[5] == n - 6 and der[6] == 0x30 and der[7] == n - 8):
        return der[8:]
    return None
