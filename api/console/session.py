"""Console sessions: an HMAC-signed cookie that names a session and a credential, never a secret.

The cookie carries {sid, org, credential reference ("apikey:<key id>" or "cert:<issuer>/<serial>"), the
client certificate's fingerprint for certificate sign-ins, issued-at, expiry}, MAC'd with a 256-bit key
kept in $V2GPKI_HOME/console-session.key (0600, created on first use; V2GPKI_CONSOLE_SESSION_KEY_FILE
points elsewhere, e.g. a key shared by several hosts). The API key itself is never stored.

Every request re-validates the session server-side: the MAC, the expiry, the credential (an API key
revoked or expired since sign-in ends the session; a certificate session needs the same certificate on
every request) and the sign-out record — signing out appends a `console.signout` event to the audit
log, which every process checks, so a copied cookie is dead after sign-out on every worker and host.

CSRF: a synchronizer token per session, HMAC(key, "csrf" | sid), in a hidden field of every form that
changes state; the sign-in form gets HMAC(key, "login" | nonce) bound to a short-lived pre-session cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pki.config import Settings

COOKIE = "v2gpki_console"
LOGIN_COOKIE = "v2gpki_console_login"
COOKIE_PATH = "/console"
KEY_FILE = "console-session.key"
_VERSION = "v1"

_keys: dict[Path, bytes] = {}
_keys_lock = threading.Lock()


def session_seconds(settings: Settings) -> int:
    return settings.console_session_seconds


def secure_cookies(settings: Settings) -> bool:
    """Secure is on unless V2GPKI_CONSOLE_INSECURE_COOKIES=1 (plain-http development on a host name that
    the browser does not treat as potentially trustworthy; 127.0.0.1 and localhost need no such switch)."""
    return (settings.console_insecure_cookies or "") not in ("1", "true", "yes")


def key_path(settings: Settings) -> Path:
    override = settings.console_session_key_file
    return override.resolve() if override else settings.home_dir / KEY_FILE


def session_key(settings: Settings) -> bytes:
    """The HMAC key (32 random bytes), created 0600 with O_EXCL on first use so concurrent workers agree."""
    path = key_path(settings)
    with _keys_lock:
        key = _keys.get(path)
        if key is not None:
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        raw = b""
        for _ in range(50):  # another process may be between O_EXCL and write
            raw = path.read_bytes()
            if len(raw) >= 32:
                break
            time.sleep(0.02)
        if len(raw) < 32:
            raise RuntimeError(f"console session key {path} is shorter than 32 bytes")
        _keys[path] = raw
        return raw


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: str, data: str) -> str:
    return _b64(hmac.new(key, f"v2gpki-console|{purpose}|{data}".encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class Session:
    sid: str
    org: str
    credential: str
    cert_fp: str | None
    issued_at: int
    expires_at: int

    @property
    def ref(self) -> str:
        """What the audit log records for this session (a digest, not the session id itself)."""
        return "session:" + hashlib.sha256(self.sid.encode()).hexdigest()[:32]


def new_session(org: str, credential: str, cert_fp: str | None = None, now: float | None = None, *,
                seconds: int = 8 * 3600) -> Session:
    """A session valid for ``seconds`` (the console passes V2GPKI_CONSOLE_SESSION_SECONDS)."""
    t = int(now if now is not None else time.time())
    return Session(secrets.token_urlsafe(24), org, credential, cert_fp, t, t + seconds)


def encode(key: bytes, s: Session) -> str:
    body = _b64(json.dumps({"sid": s.sid, "org": s.org, "cred": s.credential, "fp": s.cert_fp,
                            "iat": s.issued_at, "exp": s.expires_at}, separators=(",", ":")).encode())
    return f"{_VERSION}.{body}.{_mac(key, 'session', body)}"


def decode(key: bytes, token: str | None, now: float | None = None) -> Session | None:
    """The session if the MAC verifies and it has not expired; None otherwise (no reason given)."""
    if not token or len(token) > 2048:
        return None
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        return None
    _, body, mac = parts
    if not hmac.compare_digest(mac, _mac(key, "session", body)):
        return None
    try:
        d: dict[str, Any] = json.loads(_unb64(body))
        s = Session(str(d["sid"]), str(d["org"]), str(d["cred"]), d.get("fp"), int(d["iat"]), int(d["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    if (now if now is not None else time.time()) >= s.expires_at:
        return None
    return s


def csrf_token(key: bytes, s: Session) -> str:
    return _mac(key, "csrf", s.sid)


def check_csrf(key: bytes, s: Session, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(str(presented), csrf_token(key, s))


def login_token(key: bytes, nonce: str) -> str:
    return _mac(key, "login", nonce)


def check_login_token(key: bytes, nonce: str | None, presented: str | None) -> bool:
    return bool(nonce) and bool(presented) and hmac.compare_digest(str(presented), login_token(key, str(nonce)))
