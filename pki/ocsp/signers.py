"""Delegated OCSP signers (RFC 6960 §4.2.2.2) and the issuers they answer for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from hsm.keystore import KeyAlg


@dataclass(frozen=True, slots=True)
class _Signer:
    """A delegated signer as the responder found it (replaced at each reload, never changed); its key store
    signer is cached by the responder, by certificate (OcspResponder._key)."""

    key_uri: str  # hsm/uri.py: what the key store's signer() is asked for
    alg: KeyAlg
    cert_der: bytes
    key_hash: bytes  # SHA-1 of the signer's public key: responderID byKey (RFC 6960 §4.2.1)
    not_before: datetime
    not_after: datetime

    @property
    def label(self) -> str:
        """The key's label in its store (hsm/uri.py parses the URI)."""
        from hsm.uri import key_label

        return key_label(self.key_uri)


@dataclass(frozen=True, slots=True)
class _Issuer:
    name: str
    hashes: dict[str, tuple[bytes, bytes]]  # alg → (issuerNameHash, issuerKeyHash)
    signer: _Signer | None


def _label_of(key_uri: str) -> str | None:
    """The key label inside a key URI (hsm/uri.py parses both schemes), or None for a URI of no known scheme."""
    from hsm.errors import KeyUriError
    from hsm.uri import key_label

    try:
        return key_label(key_uri)
    except KeyUriError:
        return None
