"""Typed key-store errors. Messages never carry PINs or key material."""


class HSMError(Exception):
    """Base class for key-store failures."""


class HSMConfigError(HSMError):
    """Misconfiguration: wrong PIN, missing module, unknown token. Never retried (an unknown token is
    reported after the bounded retries: SoftHSM hides a token while another process rewrites its files)."""


class HSMUnavailable(HSMError):
    """The token failed repeatedly; the circuit breaker is open."""


class KeyNotFoundError(HSMError):
    """No key with that label in the token."""


class KeyExistsError(HSMError):
    """A key with that label already exists (labels are unique names)."""
