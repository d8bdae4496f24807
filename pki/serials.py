"""Certificate serial numbers (RFC 5280 §4.1.2.2, CA/B-style entropy, ISO 15118 / OCPP length).

Positive, ≥ 64 bits from a CSPRNG, at most 16 octets in DER (so the decimal form, ≤ 39 digits, fits
OCPP's 40-character serialNumber). We draw 127 bits: 16 octets with the top bit clear, never needing a
leading zero octet.
"""

from __future__ import annotations

import re
import secrets

from pki.errors import NotFound

_HEX = re.compile(r"^[0-9a-f]+$")


def new_serial() -> int:
    while True:
        n = secrets.randbits(127)
        if n >= 1 << 64:  # at least 64 bits of entropy-bearing magnitude
            return n


def to_hex(serial: int) -> str:
    return format(serial, "x")


def parse_serial(text: str) -> str:
    """Operator input → canonical hex (lower case, no leading zeros).

    Accepts what `openssl x509 -serial` prints (upper-case hex, maybe 'serial=' prefix), colons, '0x'.
    """
    t = text.strip().lower()
    if t.startswith("serial="):
        t = t[len("serial=") :]
    t = t.replace(":", "").replace(" ", "")
    if t.startswith("0x"):
        t = t[2:]
    if not t or not _HEX.match(t) or len(t) > 42:
        raise NotFound(f"{text!r} is not a hexadecimal serial number")
    return format(int(t, 16), "x")
