"""Delegated OCSP signers (RFC 6960 §4.2.2.2) and the issuers they answer for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from hsm.keystore import KeyAlg, PrivateKey


@dataclass
class _Signer:
    label: str
    alg: KeyAlg
    cert_der: bytes
    key_hash: bytes  # SHA-1 of the signer's public key: responderID byKey (RFC 6960 §4.2.1)
    not_before: datetime
    not_after: datetime
    key: PrivateKey | None = None


@dataclass
class _Issuer:
    name: str
    hashes: dict[str, tuple[bytes, bytes]]  # alg → (issuerNameHash, issuerKeyHash)
    signer: _Signer | None


def _label_of(key_uri: str) -> str | None:
    """The key label inside a key URI (RFC 7512 pkcs11: URI, or the software twin's soft:LABEL)."""
    from hsm.uri import Pkcs11Uri

    try:
        if key_uri.startswith("pkcs11:"):
            return Pkcs11Uri.parse(key_uri).object
    except ValueError:
        return None
    if key_uri.startswith("soft:"):
        return key_uri[len("soft:"):]
    return None

