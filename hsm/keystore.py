"""The KeyStore protocol (after smallstep's KeyManager: create, public key, signer, destroy, list)."""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec, ed448

PublicKey = ec.EllipticCurvePublicKey | ed448.Ed448PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey


class KeyAlg(str, enum.Enum):
    """Key algorithms of ISO 15118-2 (P-256) and ISO 15118-20 (P-521, Ed448)."""

    P256 = "p256"
    P521 = "p521"
    ED448 = "ed448"


@runtime_checkable
class KeyStore(Protocol):
    """A place where private keys are generated and used, never exported."""

    def create_key(self, label: str, alg: KeyAlg) -> PublicKey:
        """Generate a key pair inside the store under ``label``; raise KeyExistsError if taken."""
        ...

    def public_key(self, label: str) -> PublicKey: ...

    def signer(self, label: str) -> PrivateKey:
        """A cryptography private-key object whose sign() runs inside the store."""
        ...

    def destroy(self, label: str) -> None: ...

    def list(self) -> list[str]: ...

    def has_key(self, label: str) -> bool: ...

    def uri(self, label: str) -> str:
        """Where the key lives, e.g. an RFC 7512 pkcs11: URI (never a secret)."""
        ...
