"""Organizations (tenants), their identifier prefixes, and API keys.

Tenancy rides on identifiers (shared profiles doc §3): a CPO owns EVSEIDs/SECCIDs under its operator
IDs ('DE*ABC'), an eMSP owns EMAIDs under its provider IDs ('DE-8AA'), an OEM owns PCIDs under its
WMIs. API keys are shown once, stored as SHA-256 hashes, scoped to one organization, expiring and
revocable.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from pki import audit
from pki.errors import BadOrganization, Conflict, Forbidden, NotFound, Unauthenticated
from pki.store import orgs as store
from pki.store.db import Database, Session, utcnow
from pki.store.models import ApiKey, Organization

# manufacturer: a charging-station manufacturer signing firmware (OCPP 2.0.1 L01, pki/firmware.py), distinct
# from the OEM (a carmaker: provisioning certificates by PCID) — see docs/profiles.md.
ROLES = ("cpo", "oem", "emsp", "admin", "auditor", "manufacturer")

# Which leaf profiles each role may enroll (admins: all). -20 variants follow their -2 profile.
ROLE_PROFILES: dict[str, set[str]] = {
    "cpo": {"secc", "secc-20", "cs-client"},
    "oem": {"oem-prov", "oem-prov-20"},
    "emsp": {"contract", "contract-20"},
}

_PREFIX_RE = {
    "cpo": re.compile(r"^[A-Za-z]{2}[*-]?[A-Za-z0-9]{3}$"),
    "emsp": re.compile(r"^[A-Za-z]{2}-?[A-Za-z0-9]{3}$"),
    "oem": re.compile(r"^[A-Za-z0-9]{3}$"),
}

KEY_PREFIX = "v2k"


@dataclass(frozen=True)
class Principal:
    """Who is calling: an organization (and the credential used)."""

    org: str
    role: str
    prefixes: tuple[str, ...]
    settings: dict[str, object]
    credential: str  # "apikey:<id>" or "cert:<issuer>/<serial>"

    @property
    def sees_all(self) -> bool:
        return self.role in ("admin", "auditor")

    @property
    def tenant_filter(self) -> str | None:
        return None if self.sees_all else self.org

    def require(self, *roles: str) -> None:
        if self.role not in roles:
            raise Forbidden(f"role {self.role!r} may not do this (needs {' or '.join(roles)})")


def principal_of(org: Organization, credential: str) -> Principal:
    return Principal(org.name, org.role, tuple(org.prefixes), dict(org.settings), credential)


def create_org(db: Database, name: str, role: str, prefixes: list[str], *, actor: str = "cli",
               settings: dict[str, object] | None = None) -> Organization:
    if role not in ROLES:
        raise BadOrganization(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9 ._&()-]{0,63}$", name):
        raise BadOrganization("organization name must be 1–64 characters (letters, digits, space . _ & ( ) -)")
    norm: list[str] = []
    for p in prefixes:
        rx = _PREFIX_RE.get(role)
        if rx is None:
            raise BadOrganization(f"role {role!r} takes no identifier prefixes")
        if not rx.match(p):
            raise BadOrganization(f"prefix {p!r} is not a valid {role} prefix "
                                  f"(cpo: DE*ABC, emsp: DE-8AA, oem: a 3-character WMI)")
        for q in norm:
            if _overlaps(p, q):
                raise BadOrganization(f"prefixes {q!r} and {p!r} overlap (the same identifiers)")
        norm.append(p.upper())
    with db.session() as s:
        _serialise_org_creation(s)
        if store.org_named(s, name) is not None:
            raise Conflict(f"organization {name!r} already exists")
        _check_prefixes_free(s, role, norm)
        org = Organization(name=name, role=role, prefixes=norm, settings=settings or {}, created_at=utcnow())
        s.add(org)
        audit.append(s, audit.Entry(actor=actor, action="org.create", object=name,
                                    details={"role": role, "prefixes": norm}))
        s.commit()
        s.refresh(org)
        return org


def flat_prefix(prefix: str) -> str:
    """A prefix as identifiers are compared with it (pki.names.owns_identifier): separators '*' and '-'
    dropped, letters upper-cased — 'de-aaa', 'DE*AAA' and 'DEAAA' are one operator ID."""
    return prefix.replace("*", "").replace("-", "").upper()


def _overlaps(a: str, b: str) -> bool:
    """Would some identifier fall under both prefixes? Onto (equal), inside or around (one a prefix of
    the other) once normalised."""
    fa, fb = flat_prefix(a), flat_prefix(b)
    return fa.startswith(fb) or fb.startswith(fa)


def _serialise_org_creation(s: Session) -> None:
    """On PostgreSQL, one organization creation at a time (a transaction-scoped advisory lock), so two
    concurrent creations cannot both pass the overlap check. SQLite has one writer at a time anyway; the
    window between its check and its write is left to the operator running one CLI at a time."""
    store.lock_org_creation(s)


def _check_prefixes_free(s: Session, role: str, prefixes: list[str]) -> None:
    """Identifier prefixes are exclusive per kind (issue #21 item 4): a CPO's operator ID, an eMSP's
    provider ID, an OEM's WMI belongs to one organization. A prefix that normalises onto, inside or around
    another organization's prefix of the same role would let two tenants enroll the same EVSEIDs / EMAIDs /
    PCIDs (ISO 15118-2 Annex H: the operator / provider ID identifies one party)."""
    if not prefixes:
        return
    for other in store.orgs_with_role(s, role):
        for theirs in other.prefixes or []:
            for mine in prefixes:
                if _overlaps(mine, theirs):
                    raise Conflict(f"prefix {mine!r} overlaps {theirs!r} of organization {other.name!r} "
                                   f"({role} prefixes are exclusive)")


def get_org(session: Session, name: str) -> Organization:
    org = store.org_named(session, name)
    if org is None:
        raise NotFound(f"no organization {name!r}")
    return org


def org_principal(db: Database, name: str, credential: str) -> Principal:
    """The principal of organization ``name`` acting through ``credential`` (NotFound if it is gone)."""
    with db.session() as s:
        return principal_of(get_org(s, name), credential)


def api_key_principal(db: Database, key_id: str, org: str, credential: str) -> Principal:
    """Re-check an API key already verified once (a console session holds its id, not its secret): it must
    still exist for the same organization, unrevoked and unexpired."""
    with db.session() as s:
        row = store.api_key(s, key_id)
        if row is None or row.org != org or row.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        if row.expires_at is not None and row.expires_at <= utcnow():
            raise Unauthenticated("API key expired")
        return principal_of(get_org(s, row.org), credential)


def list_orgs(db: Database) -> list[Organization]:
    return store.all_orgs(db)


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(db: Database, org_name: str, *, days: int | None = 365, actor: str = "cli") -> tuple[str, ApiKey]:
    """Return (the full key — shown once, never stored — , the stored row)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    full = f"{KEY_PREFIX}_{key_id}_{secret}"
    with db.session() as s:
        get_org(s, org_name)
        row = ApiKey(key_id=key_id, org=org_name, hash=_hash_secret(secret), created_at=utcnow(),
                     expires_at=utcnow() + timedelta(days=days) if days else None)
        s.add(row)
        audit.append(s, audit.Entry(actor=actor, org=org_name, action="apikey.create", object=key_id))
        s.commit()
        s.refresh(row)
    return full, row


def revoke_api_key(db: Database, key_id: str, *, actor: str = "cli") -> None:
    with db.session() as s:
        row = store.api_key(s, key_id)
        if row is None:
            raise NotFound(f"no API key {key_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            s.add(row)
            audit.append(s, audit.Entry(actor=actor, org=row.org, action="apikey.revoke", object=key_id))
            s.commit()


# -- API key cache -------------------------------------------------------------------------------------
#
# A valid key's principal is kept for V2GPKI_AUTH_CACHE_TTL seconds (default 5; 0 turns the cache off), so
# a busy client does not cost two queries per request. Revocation and expiry stay honest:
#   * a change to any API key or organization row made through this process (revoke_api_key, the API, a
#     test editing the row) empties the cache at once (SQLAlchemy mapper events below);
#   * a revocation made by another process (`v2gpki apikey revoke`, another uvicorn worker) takes effect
#     here within the TTL;
#   * the key's own expiry time is checked on every hit; failures are never cached.

_CACHE: dict[str, tuple[float, datetime | None, Principal]] = {}
_CACHE_MAX = 10_000
_GENERATION = [0]  # bumped by every invalidation: a lookup that raced one does not cache its answer


def _cache_ttl() -> float:
    from pki.config import current

    return current().auth_cache_ttl


def clear_auth_cache(*_: object) -> None:
    _GENERATION[0] += 1
    _CACHE.clear()


store.on_change(clear_auth_cache)


def cached_api_key_principal(db: Database, presented: str) -> Principal | None:
    """The principal of a key verified within the cache TTL, without touching the database; None when the
    key must be checked (:func:`authenticate_api_key`)."""
    ttl = _cache_ttl()
    if ttl <= 0 or not presented.startswith(KEY_PREFIX + "_"):
        return None
    hit = _CACHE.get(_hash_secret(f"{db.url}\0{presented}"))
    if hit is None:
        return None
    until, expires_at, principal = hit
    if time.monotonic() < until and (expires_at is None or utcnow() < expires_at):
        return principal
    return None


def authenticate_api_key(db: Database, presented: str, now: datetime | None = None) -> Principal:
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise Unauthenticated("malformed API key")
    _, key_id, secret = parts
    now = now or utcnow()
    ttl = _cache_ttl()
    ck = _hash_secret(f"{db.url}\0{presented}") if ttl > 0 else ""  # one process may open several databases
    hit = _CACHE.get(ck) if ttl > 0 else None
    if hit is not None:
        until, expires_at, principal = hit
        if time.monotonic() < until and (expires_at is None or now < expires_at):
            return principal
        _CACHE.pop(ck, None)
    gen = _GENERATION[0]
    p = _authenticate_api_key_db(db, key_id, secret, now)
    if ttl > 0 and gen == _GENERATION[0]:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[ck] = (time.monotonic() + ttl, p[1], p[0])
    return p[0]


def _authenticate_api_key_db(db: Database, key_id: str, secret: str,
                             now: datetime) -> tuple[Principal, datetime | None]:
    with db.session() as s:
        row = store.api_key(s, key_id)
        # Compare in constant time even when the key id is unknown, so timing does not reveal ids.
        expected = row.hash if row is not None else _hash_secret("x" + secret)
        if not hmac.compare_digest(expected, _hash_secret(secret)) or row is None:
            raise Unauthenticated("invalid API key")
        if row.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise Unauthenticated("API key expired")
        org = get_org(s, row.org)
        return principal_of(org, f"apikey:{key_id}"), row.expires_at


def check_owns(p: Principal, kind: str, identifier: str) -> None:
    """Raise Forbidden unless the caller's prefixes cover this identifier (admins own everything)."""
    from pki.names import owns_identifier

    if p.role == "admin":
        return
    if not owns_identifier(list(p.prefixes), kind, identifier):
        raise Forbidden(f"identifier {identifier!r} is outside organization {p.org!r}'s prefixes")
