"""Key storage seam: every CA, OCSP, CPS and audit private key lives behind :class:`KeyStore`, named by a
key URI (hsm/uri.py) and used through ``KeyStore.signer(uri)``; hsm/algorithms.py is the key-algorithm table.

The default backend is PKCS#11 (SoftHSM2); :mod:`hsm.soft` is a software twin for fast unit tests.
"""

from hsm.errors import (
    HSMConfigError,
    HSMError,
    HSMUnavailable,
    KeyExistsError,
    KeyNotFoundError,
    KeyUriError,
    SignatureCheckFailed,
)
from hsm.keystore import KeyAlg, KeyStore, Signer

__all__ = [
    "HSMConfigError",
    "HSMError",
    "HSMUnavailable",
    "KeyAlg",
    "KeyExistsError",
    "KeyNotFoundError",
    "KeyUriError",
    "KeyStore",
    "SignatureCheckFailed",
    "Signer",
]
