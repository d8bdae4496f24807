"""Key storage seam: every CA, OCSP, CPS and audit private key lives behind :class:`KeyStore`.

The default backend is PKCS#11 (SoftHSM2); :mod:`hsm.soft` is a software twin for fast unit tests.
"""

from hsm.errors import (
    HSMConfigError,
    HSMError,
    HSMUnavailable,
    KeyExistsError,
    KeyNotFoundError,
    SignatureCheckFailed,
)
from hsm.keystore import KeyAlg, KeyStore

__all__ = [
    "HSMConfigError",
    "HSMError",
    "HSMUnavailable",
    "KeyAlg",
    "KeyExistsError",
    "KeyNotFoundError",
    "KeyStore",
    "SignatureCheckFailed",
]
