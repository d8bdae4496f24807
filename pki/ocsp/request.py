"""OCSP requests (RFC 6960 §4.1.1): the strict DER reader and CertID encoding."""

from __future__ import annotations

from dataclasses import dataclass

from pki.der import DerError, der_int, der_oid, read_tlv, seq, tlv
from pki.errors import MalformedOCSPRequest

HASH_OIDS: dict[str, str] = {
    "sha1": "1.3.14.3.2.26",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
_HASH_BY_OID_DER: dict[bytes, str] = {der_oid(o)[2:]: n for n, o in HASH_OIDS.items()}
HASH_LEN = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# AlgorithmIdentifier with NULL parameters, as OpenSSL and cryptography put it in CertIDs.
_HASH_ALGID: dict[str, bytes] = {n: seq(der_oid(o), b"\x05\x00") for n, o in HASH_OIDS.items()}

OID_NONCE = "1.3.6.1.5.5.7.48.1.2"  # id-pkix-ocsp-nonce (RFC 6960 §4.4.1, RFC 8954)
_NONCE_OID_DER = der_oid(OID_NONCE)[2:]

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


def _parse_extensions(buf: bytes, s: int, e: int) -> list[tuple[bytes, bool, int, int]]:
    """Extensions ::= SEQUENCE SIZE (1..MAX) OF Extension → [(oid content, critical, value start, end)]."""
    tag, ls, le = read_tlv(buf, s, e)
    if tag != 0x30 or le != e or ls == le:
        raise DerError("bad Extensions")
    out = []
    p = ls
    while p < le:
        tag, xs, xe = read_tlv(buf, p, le)
        if tag != 0x30:
            raise DerError("bad Extension")
        tag, os_, oe = read_tlv(buf, xs, xe)
        if tag != 0x06:
            raise DerError("bad extnID")
        q = oe
        critical = False
        tag, bs, be = read_tlv(buf, q, xe)
        if tag == 0x01:
            if be - bs != 1 or buf[bs] not in (0x00, 0xFF):
                raise DerError("bad BOOLEAN")
            critical = buf[bs] == 0xFF  # an explicit FALSE is not DER, but harmless: tolerated
            q = be
            tag, bs, be = read_tlv(buf, q, xe)
        if tag != 0x04 or be != xe:
            raise DerError("bad extnValue")
        out.append((buf[os_:oe], critical, bs, be))
        p = xe
    return out


def parse_request(der: bytes) -> OcspRequest:
    """Parse a DER OCSPRequest (RFC 6960 §4.1.1). Raises MalformedOCSPRequest."""
    try:
        return _parse_request(der)
    except (DerError, IndexError, ValueError) as exc:
        raise MalformedOCSPRequest(f"not a DER OCSPRequest: {exc}") from None


def _parse_request(der: bytes) -> OcspRequest:
    n = len(der)
    tag, s, e = read_tlv(der, 0, n)
    if tag != 0x30 or e != n:
        raise DerError("OCSPRequest is not one SEQUENCE")
    tag, ts, te = read_tlv(der, s, e)
    if tag != 0x30:
        raise DerError("no tbsRequest")
    if te != e:
        # optionalSignature [0] EXPLICIT: accepted and ignored — RFC 5019 §2.1.1 (we never require one).
        tag, _, se = read_tlv(der, te, e)
        if tag != 0xA0 or se != e:
            raise DerError("trailing data after tbsRequest")
    tag, vs, ve = read_tlv(der, ts, te)
    if tag == 0xA0:  # version [0] EXPLICIT DEFAULT v1 (DER omits it; an explicit v1 is tolerated)
        tag, is_, ie = read_tlv(der, vs, ve)
        if tag != 0x02 or ie != ve or der[is_:ie] != b"\x00":
            raise DerError("unsupported version")
        tag, vs, ve = read_tlv(der, ve, te)
    if tag == 0xA1:  # requestorName [1] EXPLICIT GeneralName: informational, ignored
        tag, vs, ve = read_tlv(der, ve, te)
    if tag != 0x30:
        raise DerError("no requestList")
    list_end = ve
    cert_ids: list[CertIdReq] = []
    q = vs
    while q < list_end:
        tag, rs, re_ = read_tlv(der, q, list_end)
        if tag != 0x30:
            raise DerError("bad Request")
        cert_ids.append(_parse_certid(der, rs, re_))
        if len(cert_ids) > MAX_CERT_IDS:
            raise DerError(f"more than {MAX_CERT_IDS} CertIDs")
        q = re_
    if not cert_ids:
        raise DerError("empty requestList")
    nonce: bytes | None = None
    p = list_end
    if p < te:
        tag, xs, xe = read_tlv(der, p, te)
        if tag != 0xA2 or xe != te:
            raise DerError("unexpected data in tbsRequest")
        seen: set[bytes] = set()
        for oid, critical, bs, be in _parse_extensions(der, xs, xe):
            if oid in seen:
                raise DerError("duplicate extension")  # RFC 5280 §4.2 applies to Extensions
            seen.add(oid)
            if oid == _NONCE_OID_DER:
                # RFC 8954 §2.1: Nonce ::= OCTET STRING (SIZE(1..32)), DER inside extnValue.
                tag, ns, ne = read_tlv(der, bs, be)
                if tag != 0x04 or ne != be or not 1 <= ne - ns <= 32:
                    raise DerError("nonce must be an OCTET STRING of 1..32 octets (RFC 8954)")
                nonce = der[bs:be]
            elif critical:
                raise DerError("unsupported critical request extension")
    return OcspRequest(cert_ids, nonce)


def _parse_certid(der: bytes, rs: int, re_: int) -> CertIdReq:
    tag, cs, ce = read_tlv(der, rs, re_)
    if tag != 0x30:
        raise DerError("bad CertID")
    if ce != re_:
        tag, xs, xe = read_tlv(der, ce, re_)  # singleRequestExtensions [0] EXPLICIT
        if tag != 0xA0 or xe != re_:
            raise DerError("bad Request")
        for _oid, critical, _bs, _be in _parse_extensions(der, xs, xe):
            if critical:
                raise DerError("unsupported critical single request extension")
    tag, as_, ae = read_tlv(der, cs, ce)
    if tag != 0x30:
        raise DerError("bad hashAlgorithm")
    tag, os_, oe = read_tlv(der, as_, ae)
    if tag != 0x06:
        raise DerError("bad hashAlgorithm OID")
    if oe != ae:  # parameters: NULL or absent (RFC 5754 §2 accepts both for SHA-2)
        if der[oe:ae] != b"\x05\x00":
            raise DerError("unexpected hash parameters")
    alg = _HASH_BY_OID_DER.get(der[os_:oe])
    tag, ns, ne = read_tlv(der, ae, ce)
    if tag != 0x04:
        raise DerError("bad issuerNameHash")
    tag, ks, ke = read_tlv(der, ne, ce)
    if tag != 0x04:
        raise DerError("bad issuerKeyHash")
    tag, ss, se = read_tlv(der, ke, ce)
    if tag != 0x02 or se != ce or ss == se:
        raise DerError("bad serialNumber")
    if alg is not None and (ne - ns != HASH_LEN[alg] or ke - ks != HASH_LEN[alg]):
        raise DerError("hash length does not match hashAlgorithm")
    serial = int.from_bytes(der[ss:se], "big", signed=True)
    raw = der[rs:ce]
    # X.690 §8.3.2: an INTEGER's first nine bits are never all zeros or all ones. The CertID goes back
    # in the response (RFC 6960 §4.2.1); echoing a padded serial would make our answer undecodable to
    # the client's DER parser, so answer for the same CertID with the serial re-encoded minimally.
    if se - ss > 1 and ((der[ss] == 0 and der[ss + 1] < 0x80) or (der[ss] == 0xFF and der[ss + 1] >= 0x80)):
        raw = seq(der[cs:ke], der_int(serial))
    return CertIdReq(raw, alg, der[ns:ne], der[ks:ke], serial)


def certid_der(alg: str, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    return seq(_HASH_ALGID[alg], tlv(0x04, name_hash), tlv(0x04, key_hash), der_int(serial))

