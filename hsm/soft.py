"""Software key store twin — for fast unit tests ONLY, never the default.

Keys live in process memory, so this backend violates the key policy by design; the service refuses
it unless V2GPKI_KEYSTORE=soft is set explicitly, and production mode refuses it outright.
"""

from __future__ import annotations

import threading

from hsm.algorithms import ALGORITHMS, KeyAlg, PrivateKey, PublicKey
from hsm.errors import KeyExistsError, KeyNotFoundError, KeyUriError
from hsm.uri import SoftUri, parse_key_uri


class SoftKeyStore:
    def __init__(self) -> None:
        self._keys: dict[str, PrivateKey] = {}
        self._lock = threading.Lock()

    def create_key(self, label: str, alg: KeyAlg) -> PublicKey:
        with self._lock:
            if label in self._keys:
                raise KeyExistsError(f"key {label!r} already exists")
            key = ALGORITHMS[alg].generate()
            self._keys[label] = key
            return key.public_key()

    def _get(self, label: str) -> PrivateKey:
        try:
            return self._keys[label]
        except KeyError:
            raise KeyNotFoundError(f"no key {label!r}") from None

    def public_key(self, label: str) -> PublicKey:
        return self._get(label).public_key()

    def signer(self, uri: str) -> PrivateKey:
        u = parse_key_uri(uri)
        if not isinstance(u, SoftUri):
            raise KeyUriError("the software key store holds soft: keys only, not pkcs11: ones")
        return self._get(u.label)

    def destroy(self, label: str) -> None:
        with self._lock:
            self._get(label)
            del self._keys[label]

    def list(self) -> list[str]:
        return sorted(self._keys)

    def has_key(self, label: str) -> bool:
        return label in self._keys

    def uri(self, label: str) -> str:
        return str(SoftUri(label))
