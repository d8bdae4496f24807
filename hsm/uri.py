"""Key URIs: how the database, the configuration and every caller name a key (after smallstep's kms: a key is
a URI, and ``KeyStore.signer(uri)`` is the one way to get a signing key).

Two schemes:

* RFC 7512 ``pkcs11:`` for keys in a PKCS#11 token: ``pkcs11:token=<token label>;object=<key label>;type=private``.
  We only emit and parse the path attributes we use (token, object, id, type); the PIN is never part of a
  URI (RFC 7512 §2.3 allows pin-source/pin-value as query attributes, but a URI ends up in the database and
  in the console, so the PIN stays in the environment or a file, and a URI carrying one is refused).
* ``soft:<key label>`` for the software twin (hsm/soft.py, tests only): the label percent-encoded like a
  pk11-path value (RFC 3986 unreserved characters as they are, so ``soft:ca-cpo-sub2``).

Parsing errors are KeyUriError (hsm/errors.py); their messages never repeat attribute values a caller did not
mean as names (a mistyped URI might hold a PIN).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import quote, unquote

from hsm.errors import KeyUriError

_SAFE = "-._~"  # RFC 3986 unreserved characters need no escaping in pk11-path values
PKCS11_SCHEME = "pkcs11:"
SOFT_SCHEME = "soft:"
_PIN_ATTRS = ("pin-value", "pin-source")


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    token: str
    object: str
    type: str = "private"

    def __str__(self) -> str:
        return (
            f"pkcs11:token={quote(self.token, safe=_SAFE)};object={quote(self.object, safe=_SAFE)}"
            f";type={self.type}"
        )

    @property
    def label(self) -> str:
        """The key's label in its token (CKA_LABEL)."""
        return self.object

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith(PKCS11_SCHEME):
            raise KeyUriError("not a pkcs11: URI")
        path, _, query = uri[len(PKCS11_SCHEME):].partition("?")
        attrs: dict[str, str] = {}
        for part in path.split(";"):
            if not part:
                continue
            if "=" not in part:
                raise KeyUriError("malformed pkcs11 URI: a path attribute without '='")
            k, v = part.split("=", 1)
            if k in _PIN_ATTRS:
                raise KeyUriError("a key URI must not carry a PIN (pin-value / pin-source)")
            attrs[k] = unquote(v)
        if any(q.split("=", 1)[0] in _PIN_ATTRS for q in query.split("&")):
            raise KeyUriError("a key URI must not carry a PIN (pin-value / pin-source)")
        if not attrs.get("token") or not attrs.get("object"):
            raise KeyUriError("pkcs11 URI needs token= and object=")
        return cls(token=attrs["token"], object=attrs["object"], type=attrs.get("type", "private"))


@dataclass(frozen=True, slots=True)
class SoftUri:
    """A key of the software twin (hsm/soft.py)."""

    label: str

    def __str__(self) -> str:
        return f"{SOFT_SCHEME}{quote(self.label, safe=_SAFE)}"

    @classmethod
    def parse(cls, uri: str) -> SoftUri:
        if not uri.startswith(SOFT_SCHEME):
            raise KeyUriError("not a soft: URI")
        label = unquote(uri[len(SOFT_SCHEME):])
        if not label or "?" in label or ";" in label:
            raise KeyUriError("malformed soft: URI: soft:<key label> expected")
        return cls(label)


KeyUri = Pkcs11Uri | SoftUri


@functools.lru_cache(maxsize=256)  # pure; a CPS or OCSP request looks its signer up by URI
def parse_key_uri(uri: str) -> KeyUri:
    """A key URI of either scheme; KeyUriError for anything else (the scheme is named, the rest never)."""
    if not isinstance(uri, str):
        raise KeyUriError(f"a key URI is a string, not {type(uri).__name__}")
    if uri.startswith(PKCS11_SCHEME):
        return Pkcs11Uri.parse(uri)
    if uri.startswith(SOFT_SCHEME):
        return SoftUri.parse(uri)
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    what = f"scheme {scheme!r}" if scheme.isalnum() and len(scheme) <= 16 else "no known scheme"
    raise KeyUriError(f"unknown key URI ({what}): expected pkcs11: (RFC 7512) or soft:")


def key_label(uri: str) -> str:
    """The label a key URI names inside its store (where hsm/ creates and finds the key object)."""
    return parse_key_uri(uri).label


# The name pki/ used before key_label (kept for callers of either).
label_of = key_label

__all__ = ["KeyUri", "Pkcs11Uri", "SoftUri", "key_label", "label_of", "parse_key_uri"]
