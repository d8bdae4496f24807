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

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime

from pki.der import der_int, elements, generalized_time, spki_bits, tlv
from pki.names import SubjectFields

# AttributeType OIDs (DER contents) for the subject attributes the V2G profiles use.
OID_CN = bytes.fromhex("550403")  # 2.5.4.3
OID_O = bytes.fromhex("55040a")  # 2.5.4.10
OID_C = bytes.fromhex("550406")  # 2.5.4.6
OID_DC = bytes.fromhex("0992268993f22c640119")  # 0.9.2342.19200300.100.1.25
OID_SKI = bytes.fromhex("551d0e")  # 2.5.29.14
OID_SAN = bytes.fromhex("551d11")  # 2.5.29.17
OID_ALT_SPKI = bytes.fromhex("551d48")  # 2.5.29.72 subjectAltPublicKeyInfo: per request, never templated

_UTF8, _PRINTABLE, _IA5 = 0x0C, 0x13, 0x16
_PRINTABLE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")


@functools.lru_cache(maxsize=256)  # a batch's certificates share their validity period
def encode_time(t: datetime) -> bytes:
    # RFC 5280 §4.1.2.5: UTCTime for dates through 2049, GeneralizedTime from 2050; always Zulu seconds.
    if 1950 <= t.year < 2050:
        return tlv(0x17, t.strftime("%y%m%d%H%M%SZ").encode())
    return generalized_time(t)


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


def subject_key_id(spki: bytes) -> bytes:
    return hashlib.sha1(spki_bits(spki)).digest()  # noqa: S324 - RFC 5280 §4.2.1.2 method (1)


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
        (_, _, t0, t1), = elements(reference_tbs)
        top = elements(reference_tbs, t0, t1)
        tags = [t for t, _, _, _ in top]
        # version [0], serial, signature, issuer, validity, subject, spki, extensions [3]
        if tags != [0xA0, 0x02, 0x30, 0x30, 0x30, 0x30, 0x30, 0xA3]:
            raise ValueError(f"unexpected TBSCertificate layout {tags}")

        def whole(i: int) -> bytes:
            return reference_tbs[top[i][1] : top[i][3]]

        self._head = whole(0)
        self._issuer_sigalg = whole(2) + whole(3)
        (_, _, s0, s1), = elements(reference_tbs, top[7][2], top[7][3])
        parts: list[bytes | str] = []
        for _tag, x_start, x0, x1 in elements(reference_tbs, s0, s1):
            _, _, o0, o1 = elements(reference_tbs, x0, x1)[0]
            oid = reference_tbs[o0:o1]
            if oid == OID_SKI:
                parts.append("ski")
            elif oid == OID_SAN:
                raise ValueError("subjectAltName from the CN: no template (rare profile, kept on the builder)")
            elif oid == OID_ALT_SPKI:
                raise ValueError("the request's own Alternate Subject Public Key: no template")
            else:
                parts.append(reference_tbs[x_start:x1])
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
            + der_int(i.serial)
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
        (_, _, r0, r1), = elements(tbs_request)
        info = elements(tbs_request, r0, r1)
        if len(info) < 2 or info[1][0] != 0x30:
            return None
        vals: dict[bytes, str] = {}
        for tag, _, a0, a1 in elements(tbs_request, info[1][2], info[1][3]):
            if tag != 0x31:
                return None
            atvs = elements(tbs_request, a0, a1)
            if len(atvs) != 1:
                return None
            (otag, _, o0, o1), (stag, _, s0, s1) = elements(tbs_request, atvs[0][2], atvs[0][3])
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
