"""DER (X.690 §8/§10: definite lengths, minimal forms): the few primitives the service encodes and reads
by hand — OCSP responses and CRLs (pki/ocsp/, pki/crl.py), TBS templates and CSR subjects (pki/tbs.py),
certificate assembly around an HSM signature (pki/issuance.py), issuer-name matching (pki/contracts.py)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from hsm.algorithms import ALGORITHMS, KeyAlg

if TYPE_CHECKING:
    from cryptography import x509


def der_header(tag: int, length: int) -> bytes:
    if length < 0x80:
        return bytes((tag, length))
    lb = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(lb))) + lb


def tlv(tag: int, content: bytes) -> bytes:
    return der_header(tag, len(content)) + content


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def der_int(n: int) -> bytes:
    # X.690 §8.3.2 minimal two's complement: room for the sign bit (~n for negatives, so -128 is 0x80)
    size = ((n if n >= 0 else ~n).bit_length() + 8) // 8
    return tlv(0x02, n.to_bytes(size, "big", signed=True))


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def generalized_time(dt: datetime) -> bytes:
    # RFC 6960 §4.2.2.1 / RFC 5280 §4.1.2.5.2: GeneralizedTime in UTC, seconds, no fractions.
    return tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode())


class DerError(ValueError):
    pass


def read_tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at ``pos``; strict DER (X.690 §10.1)."""
    if pos + 2 > end:
        raise DerError("truncated")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte tags are not used here (X.509, OCSP)")
    length = buf[pos + 1]
    p = pos + 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or p + n > end:
            raise DerError("indefinite or oversized length")
        if buf[p] == 0:
            raise DerError("non-minimal length")
        length = int.from_bytes(buf[p : p + n], "big")
        if length < 0x80:
            raise DerError("non-minimal length")
        p += n
    if p + length > end:
        raise DerError("truncated")
    return tag, p, p + length


def elements(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each element in buf[start:end], strict DER
    (:func:`read_tlv`); ``buf[element start:content end]`` is the element's whole encoding."""
    end = len(buf) if end is None else end
    out = []
    pos = start
    while pos < end:
        tag, c0, c1 = read_tlv(buf, pos, end)
        out.append((tag, pos, c0, c1))
        pos = c1
    return out


def bit_string(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)  # no unused bits


def spki_bits(spki: bytes) -> bytes:
    """subjectPublicKey BIT STRING contents without the unused-bits octet, from a SubjectPublicKeyInfo: the
    input of RFC 6960 §4.1.1 issuerKeyHash and of RFC 5280 §4.2.1.2 method (1) key identifiers."""
    (_, _, s, e), = elements(spki)
    parts = elements(spki, s, e)
    if len(parts) != 2 or parts[1][0] != 0x03:
        raise DerError("not a SubjectPublicKeyInfo")
    return spki[parts[1][2] + 1 : parts[1][3]]


def tbs_field(tbs: bytes, index: int) -> bytes | None:
    """The whole DER of the index-th field of a TBSCertificate, counted after the optional [0] version
    (RFC 5280 §4.1: 0 serialNumber, 1 signature, 2 issuer, 3 validity, 4 subject, 5 SPKI); None if the
    bytes do not parse."""
    try:
        (_, _, t0, t1), = elements(tbs)
        fields = elements(tbs, t0, t1)
        if fields and fields[0][0] == 0xA0:
            fields = fields[1:]
        _, start, _, end = fields[index]
    except (ValueError, IndexError):
        return None
    return tbs[start:end]


def spki_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING value without the unused-bits octet (RFC 6960 §4.1.1 KeyHash)."""
    from cryptography.hazmat.primitives import serialization

    return spki_bits(cert.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))


# Signature AlgorithmIdentifiers of OCSP responses and CRLs signed in the HSM: the algorithm table's
# (hsm/algorithms.py), by key type.
SIG_ALGID: dict[KeyAlg, bytes] = {a: row.sig_alg_der for a, row in ALGORITHMS.items()}

# RFC 5280 §5.3.1 CRLReason codes (OCSP RevokedInfo and CRL entries).
REASON_CODES: dict[str, int] = {
    "unspecified": 0, "keyCompromise": 1, "cACompromise": 2, "affiliationChanged": 3, "superseded": 4,
    "cessationOfOperation": 5, "certificateHold": 6, "removeFromCRL": 8, "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
