"""File modes of the data directory and the switches production mode refuses (#21 items 11 and 12).

Every `v2gpki` process runs with umask 077 (``private_umask``), so whatever it creates under
``$V2GPKI_HOME`` — the SQLite database and its -wal/-shm files, the SoftHSM2 token, PIN files, the
embedded broker, the beat schedule, the console session key, the audit checkpoint record — is readable by
the service user only; ``$V2GPKI_HOME`` itself is created 0700. ``v2gpki config check`` and
V2GPKI_ENV=production list (refuse) a data directory or file others can read, and the unsafe switches
below, one line per problem.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

TRUTHY = frozenset({"1", "true", "yes", "on", "t", "y"})
_INSECURE_SSLMODES = frozenset({"disable", "allow"})
_WALK_LIMIT = 20000  # entries looked at under V2GPKI_HOME (the embedded broker can hold many small files)
_SHOWN = 5


def truthy(value: object) -> bool:
    return value is not None and str(value).strip().lower() in TRUTHY


def private_umask() -> None:
    """Files and directories this process creates are the service user's only (0600 / 0700)."""
    os.umask(0o077)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) 0700; an existing directory's mode is left to the operator
    (``config check`` and production mode report a loose one)."""
    if path.is_dir():
        return
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def _loose(mode: int) -> bool:
    return bool(mode & 0o077)


def data_dir_problems(home: Path) -> list[str]:
    """A data directory that exists and that, or anything in it, group or others may access."""
    out: list[str] = []
    try:
        st = home.stat()
    except FileNotFoundError:
        return out
    if _loose(st.st_mode):
        out.append(f"V2GPKI_HOME {home} has mode {stat.S_IMODE(st.st_mode):04o}, so other users can reach the "
                   f"database, the token and the PIN files: chmod 700 {home}")
    loose: list[str] = []
    seen = 0
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            seen += 1
            if seen > _WALK_LIMIT:
                break
            p = Path(root) / name
            try:
                m = p.lstat().st_mode
            except OSError:
                continue
            if stat.S_ISLNK(m):
                continue
            if _loose(m):
                loose.append(f"{p.relative_to(home)} ({stat.S_IMODE(m):04o})")
        if seen > _WALK_LIMIT:
            break
    if loose:
        more = f" and {len(loose) - _SHOWN} more" if len(loose) > _SHOWN else ""
        out.append(f"{len(loose)} files or directories under V2GPKI_HOME are readable by group or others: "
                   f"{', '.join(loose[:_SHOWN])}{more}: chmod -R go-rwx {home}")
    return out


def sslmode_of(url: str | None) -> str | None:
    if not url or not url.startswith(("postgresql", "postgres")):
        return None
    query = urlsplit(url).query
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == "sslmode":
            return v.strip().lower()
    return None


class HardenedSettings(Protocol):
    """What these checks read of pki.config.Settings (which calls them: a Protocol, not an import of
    pki.config, keeps this module below it)."""

    @property
    def console_insecure_cookies(self) -> str | None: ...
    @property
    def webhook_allow_private(self) -> str | None: ...
    @property
    def pkilint(self) -> str: ...
    @property
    def database_url(self) -> str | None: ...
    @property
    def home_dir(self) -> Path: ...


def switch_problems(s: HardenedSettings) -> list[str]:
    """Development switches that production refuses. Never echoes a URL (it may carry a password)."""
    out: list[str] = []
    if truthy(s.console_insecure_cookies):
        out.append("V2GPKI_CONSOLE_INSECURE_COOKIES is set: console session cookies would travel without the "
                   "Secure flag, over plain http; unset it (serve the console over https)")
    if truthy(s.webhook_allow_private):
        out.append("V2GPKI_WEBHOOK_ALLOW_PRIVATE is set: webhooks may target loopback and private addresses "
                   "(the SSRF guard is off); unset it")
    if s.pkilint == "off":
        out.append("V2GPKI_PKILINT=off signs certificates whose lint twin pkilint never checked: set "
                   "V2GPKI_PKILINT=shape (or every)")
    mode = sslmode_of(s.database_url)
    if mode in _INSECURE_SSLMODES:
        out.append(f"V2GPKI_DATABASE_URL has sslmode={mode}: the database password and every row would cross "
                   "the network in clear; use sslmode=verify-full (or require on a private network)")
    return out


def hardening_problems(s: HardenedSettings) -> list[str]:
    return switch_problems(s) + data_dir_problems(s.home_dir)
