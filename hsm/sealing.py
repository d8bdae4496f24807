"""Secrets the service must be able to use but that a database read alone must not reveal (webhook HMAC
keys): sealed with AES-256-GCM under a key generated in the token (sensitive, non-extractable).

Stored form: ``v2s1:`` + base64url(key id (8) | nonce (12) | ciphertext | tag (16)), the caller's context
(e.g. the subscription id) as additional authenticated data, so a sealed value copied into another row
does not open. PKCS#11 has no atomic "create if absent": two processes creating the key at once leave two
keys under one label, told apart by their random CKA_ID; sealing uses the lowest id, opening the one the
stored value names.
"""

from __future__ import annotations

import base64
import os
import threading
from typing import Any

from hsm.errors import HSMError, KeyNotFoundError

SECRETS_KEY = "svc-secrets"
PREFIX = "v2s1:"
_ID_LEN = 8
_NONCE_LEN = 12


class SealError(HSMError):
    """A sealed value that does not open (wrong key, edited or moved to another row). Never holds it."""


def is_sealed(stored: str | None) -> bool:
    return bool(stored) and str(stored).startswith(PREFIX)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _is_pkcs11(keystore: object) -> bool:
    from hsm.pkcs11 import Pkcs11KeyStore

    return isinstance(keystore, Pkcs11KeyStore)


# -- PKCS#11 -------------------------------------------------------------------------------------------


def _p11_keys(session: Any) -> list[Any]:
    from pkcs11 import Attribute, ObjectClass

    keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: SECRETS_KEY}))
    return sorted(keys, key=lambda k: bytes(k[Attribute.ID]))


def _p11_generate(session: Any) -> Any:
    from pkcs11 import Attribute, KeyType

    return session.generate_key(
        KeyType.AES, 256, label=SECRETS_KEY, id=os.urandom(_ID_LEN), store=True,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                  Attribute.TOKEN: True, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                  Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False,
                  Attribute.VERIFY: False, Attribute.DERIVE: False})


def _gcm(nonce: bytes, aad: bytes) -> Any:
    from pkcs11.mechanisms import GCMParams

    return GCMParams(nonce, aad, 128)


# -- software twin (V2GPKI_KEYSTORE=soft, unit tests only) -----------------------------------------------

_SOFT_LOCK = threading.Lock()


def _soft_key(keystore: Any, create: bool) -> tuple[bytes, bytes] | None:
    with _SOFT_LOCK:
        entry: tuple[bytes, bytes] | None = getattr(keystore, "_v2gpki_secrets_key", None)
        if entry is None and create:
            entry = (os.urandom(_ID_LEN), os.urandom(32))
            keystore._v2gpki_secrets_key = entry
        return entry


# -- public ----------------------------------------------------------------------------------------------


def ensure_key(keystore: Any) -> None:
    """Create the sealing key in the token if it has none (``v2gpki init`` does it once)."""
    if _is_pkcs11(keystore):
        def go(session: Any) -> None:
            if not _p11_keys(session):
                _p11_generate(session)

        keystore.session_call(go)
    else:
        _soft_key(keystore, True)


def seal(keystore: Any, plaintext: str, context: str) -> str:
    """Encrypt ``plaintext`` in the token, bound to ``context`` (AAD)."""
    nonce = os.urandom(_NONCE_LEN)
    aad = context.encode()
    if _is_pkcs11(keystore):
        from pkcs11 import Attribute, Mechanism

        def go(session: Any) -> tuple[bytes, bytes]:
            keys = _p11_keys(session) or [_p11_generate(session)]
            key = keys[0]
            ct = key.encrypt(plaintext.encode(), mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(nonce, aad))
            return bytes(key[Attribute.ID]), bytes(ct)

        key_id, ct = keystore.session_call(go)
    else:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        entry = _soft_key(keystore, True)
        assert entry is not None
        key_id, ct = entry[0], AESGCM(entry[1]).encrypt(nonce, plaintext.encode(), aad)
    if len(key_id) != _ID_LEN:
        raise SealError("the token's sealing key has an unexpected CKA_ID")
    return PREFIX + _b64e(key_id + nonce + ct)


def unseal(keystore: Any, stored: str, context: str) -> str:
    """The plaintext of a value made by :func:`seal` with the same ``context``. A value stored before
    sealing existed (no prefix) is returned as it is: ``v2gpki init`` seals those."""
    if not is_sealed(stored):
        return stored
    try:
        raw = _b64d(stored[len(PREFIX):])
    except ValueError:
        raise SealError("sealed value is malformed") from None
    if len(raw) < _ID_LEN + _NONCE_LEN + 16:
        raise SealError("sealed value is malformed")
    key_id, nonce, ct = raw[:_ID_LEN], raw[_ID_LEN:_ID_LEN + _NONCE_LEN], raw[_ID_LEN + _NONCE_LEN:]
    aad = context.encode()
    if _is_pkcs11(keystore):
        from pkcs11 import Attribute, Mechanism
        from pkcs11 import exceptions as p11e

        def go(session: Any) -> bytes:
            for key in _p11_keys(session):
                if bytes(key[Attribute.ID]) == key_id:
                    try:
                        return bytes(key.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(nonce, aad)))
                    except (p11e.EncryptedDataInvalid, p11e.GeneralError, p11e.ArgumentsBad):
                        raise SealError("sealed value does not open (edited, or moved to another row)") from None
            raise KeyNotFoundError(f"the sealing key {SECRETS_KEY!r} that sealed this value is not in the token")

        return keystore.session_call(go).decode()
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    entry = _soft_key(keystore, False)
    if entry is None or entry[0] != key_id:
        raise KeyNotFoundError(f"the sealing key {SECRETS_KEY!r} that sealed this value is not in the key store")
    try:
        return AESGCM(entry[1]).decrypt(nonce, ct, aad).decode()
    except InvalidTag:
        raise SealError("sealed value does not open (edited, or moved to another row)") from None
