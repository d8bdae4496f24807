"""OAuth 2.0 client credentials (RFC 6749 §4.4) on top of API keys: short-lived bearer tokens.

A CSMS written for a hosted Plug & Charge PKI (OPCP's accessToken.v1.json, MaEVe, CitrineOS) trades a
client id and secret for a bearer token. Here the client id is an API key's id (the part between ``v2k_``
and the next ``_``) and the secret is the API key itself; the token is a JWT (RFC 7519) signed ES256
(RFC 7518 §3.4) by the key ``svc-oauth``, generated in the HSM on first use.

A token is worth no more than the key it came from: it names the key (``sub``) and its organization
(``org``), lives at most ``V2GPKI_OAUTH_TOKEN_SECONDS`` (and never past the key's own expiry), and every
use looks the key up again — a revoked or expired key, or a key now in another organization, voids every
token issued with it. Those look-ups are cached per process for ``V2GPKI_AUTH_CACHE_TTL`` seconds like
API keys (pki/orgs.py): emptied at once by a change made in this process, within the TTL otherwise.
Neither secrets nor tokens are ever logged or stored.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from hsm.algorithms import ALGORITHMS, KeyAlg
from pki.errors import OAuthError, PKIError
from pki.orgs import KEY_PREFIX, Principal, Unauthenticated, _cache_ttl, authenticate_api_key, get_org, principal_of
from pki.store import orgs as store_orgs
from pki.store.db import utcnow

if TYPE_CHECKING:
    from pki.context import Context

TOKEN_KEY = "svc-oauth"
GRANT = "client_credentials"
SCOPE = "pkigateway rcpservice"  # OPCP's names for the EST and root certificate pool services


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str
    token_type: str = "Bearer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- the signing key (HSM) ---------------------------------------------------------------------------------

_PUB: dict[int, tuple[object, ec.EllipticCurvePublicKey]] = {}  # id(keystore) → (keystore, public key)
_PUB_LOCK = threading.Lock()


def _public_key(ctx: Context, *, create: bool = True) -> ec.EllipticCurvePublicKey:
    """The token key's public half (cached per key store), the key generated in the HSM on first use
    (on the first token issued: verifying a token never creates it)."""
    from hsm.errors import KeyExistsError, KeyNotFoundError

    hit = _PUB.get(id(ctx.keystore))
    if hit is not None and hit[0] is ctx.keystore:
        return hit[1]
    with _PUB_LOCK:
        try:
            pub = ctx.keystore.public_key(TOKEN_KEY)
        except KeyNotFoundError:
            if not create:
                raise Unauthenticated("invalid access token (no token was ever issued here)") from None
            try:
                pub = ctx.keystore.create_key(TOKEN_KEY, KeyAlg.P256)
            except KeyExistsError:  # another process created it meanwhile
                pub = ctx.keystore.public_key(TOKEN_KEY)
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise PKIError(f"HSM key {TOKEN_KEY!r} is not an EC key")
        _PUB[id(ctx.keystore)] = (ctx.keystore, pub)
        return pub


def _kid(pub: ec.EllipticCurvePublicKey) -> str:
    spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _b64url(_sha256(spki))[:16]


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def _sign(ctx: Context, claims: dict[str, Any]) -> str:
    pub = _public_key(ctx)
    header = {"alg": "ES256", "typ": "JWT", "kid": _kid(pub)}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     _b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()))
    # ES256 (RFC 7518 §3.4): the P-256 row of the algorithm table (hsm/algorithms.py)
    der = ALGORITHMS[KeyAlg.P256].sign(ctx.keystore.signer(ctx.keystore.uri(TOKEN_KEY)), signing_input.encode())
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# -- issuing -----------------------------------------------------------------------------------------------


def issue_token(ctx: Context, client_id: str, client_secret: str, *, grant_type: str | None,
                audience: str | None = None, now: datetime | None = None) -> IssuedToken:
    """RFC 6749 §4.4.2/§4.4.3: check the grant and the client, answer a token for the key's organization."""
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required")
    if grant_type != GRANT:
        raise OAuthError("unsupported_grant_type", f"only grant_type={GRANT} is supported")
    if not client_id or not client_secret:
        raise OAuthError("invalid_request", "client_id and client_secret are required")
    parts = client_secret.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not hmac.compare_digest(parts[1], client_id):
        raise OAuthError("invalid_client", "client authentication failed")
    try:
        principal = authenticate_api_key(ctx.db, client_secret, now)
    except Unauthenticated:
        raise OAuthError("invalid_client", "client authentication failed") from None
    now = now or utcnow()
    with ctx.db.session() as s:
        row = store_orgs.api_key(s, client_id)
    key_expiry = row.expires_at if row is not None else None
    lifetime = int(ctx.settings.oauth_token_seconds)
    if key_expiry is not None:
        lifetime = min(lifetime, int((key_expiry - now).total_seconds()))
    if lifetime <= 0:
        raise OAuthError("invalid_client", "client authentication failed")
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "iss": ctx.settings.public_base(), "sub": client_id, "org": principal.org,
        "aud": audience or ctx.settings.public_base(), "iat": iat, "nbf": iat, "exp": iat + lifetime,
        "jti": secrets.token_urlsafe(12), "scope": SCOPE, "gty": GRANT,
    }
    return IssuedToken(_sign(ctx, claims), lifetime, SCOPE)


# -- verifying ---------------------------------------------------------------------------------------------


def looks_like_token(presented: str) -> bool:
    """A JWS compact serialisation (three base64url parts), not an API key."""
    return presented.count(".") == 2 and not presented.startswith(KEY_PREFIX + "_")


_KEYS: dict[str, tuple[float, datetime | None, Principal]] = {}  # (db url, key id) → principal of a valid key
_GEN = [0]


def _clear(*_: object) -> None:
    _GEN[0] += 1
    _KEYS.clear()


store_orgs.on_change(_clear)


def _key_principal(ctx: Context, key_id: str, now: datetime) -> Principal:
    ck = f"{ctx.db.url}\0{key_id}"
    ttl = _cache_ttl()
    hit = _KEYS.get(ck) if ttl > 0 else None
    if hit is not None:
        until, expires_at, principal = hit
        if time.monotonic() < until and (expires_at is None or now < expires_at):
            return principal
        _KEYS.pop(ck, None)
    gen = _GEN[0]
    with ctx.db.session() as s:
        row = store_orgs.api_key(s, key_id)
        if row is None or row.revoked_at is not None:
            raise Unauthenticated("access token revoked with its API key")
        if row.expires_at is not None and row.expires_at <= now:
            raise Unauthenticated("access token's API key expired")
        principal = principal_of(get_org(s, row.org), f"oauth:{key_id}")
        expires_at = row.expires_at
    if ttl > 0 and gen == _GEN[0]:
        if len(_KEYS) >= 10_000:
            _KEYS.clear()
        _KEYS[ck] = (time.monotonic() + ttl, expires_at, principal)
    return principal


def authenticate_token(ctx: Context, presented: str, now: datetime | None = None) -> Principal:
    """The principal of a token this service issued, still within its lifetime, whose API key is still
    valid; Unauthenticated otherwise (one message per cause, never the token)."""
    now = now or utcnow()
    try:
        h64, c64, s64 = presented.split(".")
        header = json.loads(_unb64url(h64))
        claims = json.loads(_unb64url(c64))
        sig = _unb64url(s64)
    except (ValueError, UnicodeDecodeError):
        raise Unauthenticated("malformed access token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "ES256" \
            or len(sig) != 64:
        raise Unauthenticated("malformed access token")
    pub = _public_key(ctx, create=False)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        pub.verify(der, f"{h64}.{c64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Unauthenticated("invalid access token") from None
    exp, key_id, org = claims.get("exp"), claims.get("sub"), claims.get("org")
    if not isinstance(exp, int) or not isinstance(key_id, str) or not isinstance(org, str):
        raise Unauthenticated("malformed access token")
    if claims.get("iss") != ctx.settings.public_base():
        raise Unauthenticated("access token from another issuer")
    if exp <= now.timestamp():
        raise Unauthenticated("access token expired")
    p = _key_principal(ctx, key_id, now)
    if p.org != org:
        raise Unauthenticated("access token no longer matches its API key's organization")
    return p


__all__ = ["IssuedToken", "OAuthError", "authenticate_token", "issue_token", "looks_like_token"]
