"""TBSCertificate templates: the fast path of issuance for leaves of a shape that was already linted.

RFC 5280 §4.1: every leaf a CA issues under one profile differs from the next only in serialNumber,
validity, subject, subjectPublicKeyInfo and the extensions computed from those (subjectKeyIdentifier,
RFC 5280 §4.2.1.2 method 1; subjectAltName for profiles that carry the CN as a dNSName). The version, the
signature AlgorithmIdentifier, the issuer Name and every other extension are byte-for-byte the same.

So the engine builds the first certificate of a *shape* (profile, issuing CA certificate, subject key
algorithm, which subject attributes are present, validity time encodings) with cryptography's
CertificateBuilder, lints it in full (profile rules, size bound, pkilint), and derives a template from
that reference TBS. The template is kept only if it reproduces the reference TBS **exactly** from the
same inputs (a self-check at every process start, so an encoder difference can never reach the HSM);
later leaves of the shape are encoded by the template in a few microseconds instead of building and
software-signing a twin.

Encodings follow what cryptography's builder writes (and the self-check enforces): CN and O as
UTF8String, C as PrintableString, DC as IA5String (RFC 4519 / RFC 5280 Appendix A); times as UTCTime
through 2049 and GeneralizedTime from 2050 (RFC 5280 §4.1.2.5), seconds precision; serial as a minimal
positive INTEGER (X.690 §8.3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pki.csr imports this module
    from pki.csr import SubjectFields

# AttributeType OIDs (DER contents) for the subject attributes the V2G profiles use.
OID_CN = bytes.fromhex("550403")  # 2.5.4.3
OID_O = bytes.fromhex("55040a")  # 2.5.4.10
OID_C = bytes.fromhex("550406")  # 2.5.4.6
OID_DC = bytes.fromhex("0992268993f22c640119")  # 0.9.2342.19200300.100.1.25
OID_SKI = bytes.fromhex("551d0e")  # 2.5.29.14
OID_SAN = bytes.fromhex("551d11")  # 2.5.29.17

_UTF8, _PRINTABLE, _IA5 = 0x0C, 0x13, 0x16
_PRINTABLE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + der_len(len(content)) + content


def children(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """(tag, content start, end) of each DER TLV in data[start:end] (definite lengths, one-byte tags).

    Raises ValueError on anything truncated or malformed, so callers can fall back to a full parser."""
    end = len(data) if end is None else end
    out = []
    off = start
    while off < end:
        if off + 2 > end:
            raise ValueError("truncated TLV")
        tag = data[off]
        if tag & 0x1F == 0x1F:
            raise ValueError("multi-byte tag")
        first = data[off + 1]
        if first < 0x80:
            c0, n = off + 2, first
        else:
            k = first & 0x7F
            if k == 0 or k > 4 or off + 2 + k > end:
                raise ValueError("bad length")
            c0, n = off + 2 + k, int.from_bytes(data[off + 2 : off + 2 + k], "big")
        if c0 + n > end:
            raise ValueError("truncated value")
        out.append((tag, c0, c0 + n))
        off = c0 + n
    return out


def encode_integer(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 8) // 8, "big")  # +8: room for the sign bit (X.690 §8.3.2)
    return tlv(0x02, body)


def encode_time(t: datetime) -> bytes:
    # RFC 5280 §4.1.2.5: UTCTime for dates through 2049, GeneralizedTime from 2050; always Zulu seconds.
    if 1950 <= t.year < 2050:
        return tlv(0x17, t.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, t.strftime("%Y%m%d%H%M%SZ").encode())


def _atv(oid: bytes, tag: int, value: str) -> bytes:
    enc = value.encode("ascii") if tag != _UTF8 else value.encode("utf-8")
    return tlv(0x31, tlv(0x30, tlv(0x06, oid) + tlv(tag, enc)))


def encode_subject(s: SubjectFields) -> bytes:
    """Name in the engine's RDN order CN, O, C, DC (each RDN single-valued), as pki.issuance.build_name."""
    rdns = _atv(OID_CN, _UTF8, s.cn)
    if s.o:
        rdns += _atv(OID_O, _UTF8, s.o)
    if s.c:
        rdns += _atv(OID_C, _PRINTABLE, s.c)
    if s.dc:
        rdns += _atv(OID_DC, _IA5, s.dc)
    return tlv(0x30, rdns)


def _escape(val: str) -> str:
    # RFC 4514 §2.4, with the same choices as cryptography's Name.rfc4514_string (the subject column must
    # not depend on which path built the certificate).
    if not val:
        return ""
    for a, b in (("\\", "\\\\"), ('"', '\\"'), ("+", "\\+"), (",", "\\,"), (";", "\\;"), ("<", "\\<"),
                 (">", "\\>"), ("\0", "\\00")):
        val = val.replace(a, b)
    if val[0] == "#" or (val[0] == " " and len(val) > 1):
        val = "\\" + val
    if val[-1] == " ":
        val = val[:-1] + "\\ "
    return val


def rfc4514(s: SubjectFields) -> str:
    parts = [f"CN={_escape(s.cn)}"]
    if s.o:
        parts.append(f"O={_escape(s.o)}")
    if s.c:
        parts.append(f"C={_escape(s.c)}")
    if s.dc:
        parts.append(f"DC={_escape(s.dc)}")
    return ",".join(reversed(parts))  # RFC 4514 §2.1: the last RDN first


def spki_key_bits(spki: bytes) -> bytes:
    """subjectPublicKey BIT STRING contents without the unused-bits octet (RFC 5280 §4.2.1.2 (1))."""
    (_, s0, s1), = children(spki)
    parts = children(spki, s0, s1)
    tag, b0, b1 = parts[1]
    if tag != 0x03:
        raise ValueError("no BIT STRING in SubjectPublicKeyInfo")
    return spki[b0 + 1 : b1]


def subject_key_id(spki: bytes) -> bytes:
    return hashlib.sha1(spki_key_bits(spki)).digest()  # noqa: S324 - RFC 5280 §4.2.1.2 method (1)


@dataclass(frozen=True)
class TemplateInputs:
    serial: int
    not_before: datetime
    not_after: datetime
    subject: SubjectFields
    spki: bytes


class TbsTemplate:
    """The fixed parts of a reference TBSCertificate and where the variable parts go."""

    __slots__ = ("_head", "_issuer_sigalg", "_ext_parts")

    def __init__(self, reference_tbs: bytes) -> None:
        (_, t0, t1), = children(reference_tbs)
        top = children(reference_tbs, t0, t1)
        tags = [t for t, _, _ in top]
        # version [0], serial, signature, issuer, validity, subject, spki, extensions [3]
        if tags != [0xA0, 0x02, 0x30, 0x30, 0x30, 0x30, 0x30, 0xA3]:
            raise ValueError(f"unexpected TBSCertificate layout {tags}")

        def whole(i: int) -> bytes:
            _, c0, c1 = top[i]
            hdr = len(der_len(c1 - c0)) + 1
            return reference_tbs[c0 - hdr : c1]

        self._head = whole(0)
        self._issuer_sigalg = whole(2) + whole(3)
        _, e0, e1 = top[7]
        (_, s0, s1), = children(reference_tbs, e0, e1)
        parts: list[bytes | str] = []
        for _tag, x0, x1 in children(reference_tbs, s0, s1):
            ext_children = children(reference_tbs, x0, x1)
            _, o0, o1 = ext_children[0]
            oid = reference_tbs[o0:o1]
            if oid == OID_SKI:
                parts.append("ski")
            elif oid == OID_SAN:
                raise ValueError("subjectAltName from the CN: no template (rare profile, kept on the builder)")
            else:
                hdr = len(der_len(x1 - x0)) + 1
                parts.append(reference_tbs[x0 - hdr : x1])
        self._ext_parts = tuple(parts)

    def build(self, i: TemplateInputs) -> bytes:
        exts = b""
        for p in self._ext_parts:
            if p == "ski":  # extnID, extnValue OCTET STRING { KeyIdentifier OCTET STRING }
                exts += tlv(0x30, tlv(0x06, OID_SKI) + tlv(0x04, tlv(0x04, subject_key_id(i.spki))))
            else:
                assert isinstance(p, bytes)
                exts += p
        body = (
            self._head
            + encode_integer(i.serial)
            + self._issuer_sigalg
            + tlv(0x30, encode_time(i.not_before) + encode_time(i.not_after))
            + encode_subject(i.subject)
            + i.spki
            + tlv(0xA3, tlv(0x30, exts))
        )
        return tlv(0x30, body)


def csr_subject_fields(tbs_request: bytes) -> tuple[str, str | None, str | None, str | None] | None:
    """(CN, O, C, DC) from a CertificationRequestInfo (RFC 2986 §4.1) without building cryptography Name objects.

    Returns None for anything this fast reader does not handle (multi-valued RDNs, string types other than
    UTF8String/PrintableString/IA5String, repeated attributes, no CN, undecodable text): the caller then
    takes cryptography's full path, which decides and words the error exactly as before."""
    try:
        (_, r0, r1), = children(tbs_request)
        info = children(tbs_request, r0, r1)
        if len(info) < 2 or info[1][0] != 0x30:
            return None
        _, n0, n1 = info[1]
        vals: dict[bytes, str] = {}
        for tag, a0, a1 in children(tbs_request, n0, n1):
            if tag != 0x31:
                return None
            atvs = children(tbs_request, a0, a1)
            if len(atvs) != 1:
                return None
            _, v0, v1 = atvs[0]
            (otag, o0, o1), (stag, s0, s1) = children(tbs_request, v0, v1)
            if otag != 0x06:
                return None
            oid = tbs_request[o0:o1]
            if oid not in (OID_CN, OID_O, OID_C, OID_DC):
                continue  # other attributes are ignored, as in pki.csr.subject_fields
            if oid in vals or stag not in (_UTF8, _PRINTABLE, _IA5):
                return None
            text = tbs_request[s0:s1].decode("utf-8" if stag == _UTF8 else "ascii")
            if stag == _PRINTABLE and not _PRINTABLE_CHARS.issuperset(text):
                return None  # X.680 §41.4 PrintableString alphabet; anything else: the full parser decides
            vals[oid] = text
    except (ValueError, UnicodeDecodeError):
        return None
    cn = vals.get(OID_CN)
    if cn is None or not cn.strip():
        return None
    return cn, vals.get(OID_O), vals.get(OID_C), vals.get(OID_DC)
