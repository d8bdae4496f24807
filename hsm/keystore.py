"""The KeyStore protocol (after smallstep's KeyManager: create, public key, signer, destroy, list).

A key is named by a URI (hsm/uri.py: RFC 7512 ``pkcs11:`` or the software twin's ``soft:``): ``uri(label)``
gives the URI of a key the store created under ``label``, the database stores that URI, and
``signer(uri)`` is the one way to get a signing key. Labels only name new key objects inside hsm/ and
the hierarchy set-up (``create_key``, ``public_key``, ``has_key``, ``destroy``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from hsm.algorithms import KeyAlg, PrivateKey, PublicKey
from hsm.errors import SignatureCheckFailed
from hsm.uri import key_label

# What signer() returns: a cryptography private key whose private half stays in the store.
Signer = PrivateKey


class SignObserver(Protocol):
    """Told about each HSM signature (metrics: pki/metrics.py's HsmSignTimer, given in pki/wiring.py)."""

    def signed(self, mechanism: str, seconds: float) -> None: ...

    def failed(self, operation: str, exc: BaseException) -> None: ...


@runtime_checkable
class KeyStore(Protocol):
    """A place where private keys are generated and used, never exported."""

    def create_key(self, label: str, alg: KeyAlg) -> PublicKey:
        """Generate a key pair inside the store under ``label``; raise KeyExistsError if taken."""
        ...

    def public_key(self, label: str) -> PublicKey: ...

    def signer(self, uri: str) -> Signer:
        """The key named by ``uri`` (one of ``self.uri(...)``) as a cryptography private-key object whose
        sign() runs inside the store. KeyUriError for a malformed URI or one naming another store's key,
        KeyNotFoundError for a key the store does not hold. A store whose keys are not in process memory
        verifies every signature its signer returns with the public key it read at lookup and raises
        SignatureCheckFailed instead of returning one that does not verify (hsm/pkcs11.py)."""
        ...

    def destroy(self, label: str) -> None: ...

    def list(self) -> list[str]: ...

    def has_key(self, label: str) -> bool: ...

    def uri(self, label: str) -> str:
        """Where the key lives, e.g. an RFC 7512 pkcs11: URI (never a secret)."""
        ...


def certified_signer(keystore: KeyStore, uri: str, certified: PublicKey, what: str) -> Signer:
    """``keystore.signer(uri)`` after checking that its public key is ``certified`` (the key the CA, OCSP
    signer or service certificate names). The signer verifies each signature with the public key it read
    from the token; this links that key to the certificate once per lookup, so a token re-initialised with
    another key under the same label is refused before its first signature is used, not found by a vehicle."""
    signer = keystore.signer(uri)
    if signer.public_key() != certified:
        label = key_label(uri)
        raise SignatureCheckFailed(
            f"the HSM key {label!r} is not the key of {what}: the token holds another key under that label "
            f"(re-initialised or restored from another backup?); nothing was signed", label=label)
    return signer
