"""OCPP 2.0.1 GetCertificateStatus: OCSPRequestData decoding and lookup."""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING

from pki.errors import BadStatusRequest
from pki.ocsp.request import HASH_LEN
from pki.ocsp.response import Answer

if TYPE_CHECKING:
    from pki.context import Context


_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
OCPP_HASH_ALGS = {"SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


def decode_ocpp_hash(text: str, alg: str, field: str) -> bytes:
    """Hex (any case; EVerest, OCPP 2.1 text) or base64 / URL-safe base64 (Josev). The digest length
    decides: hex of n octets has 2n characters, base64 about 4n/3, so the readings never collide."""
    t = text.strip()
    n = HASH_LEN[alg]
    if _HEX_RE.match(t) and len(t) == 2 * n:
        return bytes.fromhex(t)
    if _B64_RE.match(t):
        s = t.replace("-", "+").replace("_", "/").rstrip("=")
        try:
            raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == n:
            return raw
    raise BadStatusRequest(f"{field} is neither hex nor base64 of a {alg.upper()} digest ({n} octets)")


def decode_ocpp_serial(text: str) -> list[int]:
    """Hex without leading zeros (EVerest, OCPP 2.1) or decimal (Josev): an all-digit serial is tried
    both ways — hex first (what the OCPP 2.1 text says), then decimal."""
    t = text.strip().replace(":", "").replace(" ", "")
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t or not _HEX_RE.match(t) or len(t) > 40:
        raise BadStatusRequest("serialNumber must be hexadecimal or decimal digits (at most 40)")
    readings = [int(t, 16)]
    if t.isdigit() and int(t, 10) != readings[0]:
        readings.append(int(t, 10))
    return readings


def ocpp_lookup(ctx: Context, hash_algorithm: str, issuer_name_hash: str, issuer_key_hash: str,
                serial_number: str) -> Answer:
    alg = OCPP_HASH_ALGS.get(hash_algorithm.strip().upper())
    if alg is None:
        raise BadStatusRequest("hashAlgorithm must be SHA256, SHA384 or SHA512 (OCPP 2.0.1 HashAlgorithmEnumType)")
    nh = decode_ocpp_hash(issuer_name_hash, alg, "issuerNameHash")
    kh = decode_ocpp_hash(issuer_key_hash, alg, "issuerKeyHash")
    from pki.ocsp.responder import responder_for

    return responder_for(ctx).ocpp_status(alg, nh, kh, decode_ocpp_serial(serial_number))
