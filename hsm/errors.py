"""Typed key-store errors. Messages never carry PINs or key material."""


class HSMError(Exception):
    """Base class for key-store failures."""


class HSMConfigError(HSMError):
    """Misconfiguration: wrong PIN, missing module, unknown token. Never retried (an unknown token is
    reported after the bounded retries: SoftHSM hides a token while another process rewrites its files)."""


class HSMUnavailable(HSMError):
    """The token failed repeatedly; the circuit breaker is open."""


class KeyUriError(HSMError, ValueError):
    """A key URI that is malformed, of an unknown scheme, or names a key another store holds (another token,
    or a pkcs11: URI given to the software store). The message names the scheme and attributes, never their
    values beyond the token and object names, and never a PIN (RFC 7512 §2.3 pin-value is refused)."""


class KeyNotFoundError(HSMError):
    """No key with that label in the token."""


class KeyExistsError(HSMError):
    """A key with that label already exists (labels are unique names)."""


class SignatureCheckFailed(HSMError):
    """The token returned a signature that does not verify with the signer's public key, or the key under a
    label is not the key its certificate names (a faulty token; a token re-initialised with another key under
    the same label; a stale key handle that now names another key). Raised before anything signed is stored
    or sent: nothing is kept, and a later attempt looks the key up again. Never retried here."""

    def __init__(self, message: str, *, label: str | None = None) -> None:
        super().__init__(message)
        self.label = label
