"""RFC 7512 ``pkcs11:`` URIs naming token objects.

We only emit and parse the path attributes we use (token, object, id, type); the PIN is never part of
a URI we write (RFC 7512 §2.3 allows pin-source/pin-value as query attributes, but a URI ends up in
the database and in the console, so the PIN stays in the environment or a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

_SAFE = "-._~"  # RFC 3986 unreserved characters need no escaping in pk11-path values


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    object: str
    type: str = "private"

    def __str__(self) -> str:
        return (
            f"pkcs11:token={quote(self.token, safe=_SAFE)};object={quote(self.object, safe=_SAFE)}"
            f";type={self.type}"
        )

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith("pkcs11:"):
            raise ValueError("not a pkcs11: URI")
        path = uri[len("pkcs11:") :].split("?", 1)[0]
        attrs: dict[str, str] = {}
        for part in path.split(";"):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"malformed pkcs11 URI attribute {part!r}")
            k, v = part.split("=", 1)
            attrs[k] = unquote(v)
        if "token" not in attrs or "object" not in attrs:
            raise ValueError("pkcs11 URI needs token= and object=")
        return cls(token=attrs["token"], object=attrs["object"], type=attrs.get("type", "private"))


def label_of(key_uri: str) -> str:
    """The key label inside a key store URI (RFC 7512 pkcs11: URI, or the software twin's soft:LABEL)."""
    if key_uri.startswith("soft:"):
        return key_uri[len("soft:"):]
    return Pkcs11Uri.parse(key_uri).object
