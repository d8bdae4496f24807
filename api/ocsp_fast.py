"""The lean standalone OCSP/CRL responder: a raw asyncio HTTP/1.1 server over an in-memory table of
pre-signed OCSP responses. `v2gpki ocsp-serve` runs it (api/ocsp_app.py ``serve_ocsp``).

The hot path is a lookup of pre-signed bytes, not a framework: the RFC 5019 request (one SHA-1 CertID,
no nonce) is recognised by its DER shape (pki/ocsp/request.py ``rfc5019_certid``), its CertID bytes are
the key of the in-memory source of pki/ocsp/sources.py's chain (``MemorySource``, filled from the
``ocsp_response`` table), and the stored DER goes back byte for byte. Everything else goes down the rest
of the chain — pki/ocsp/'s stored and live sources — in a thread pool: nonces, several CertIDs, hash algorithms that are
not pre-signed, unknown serials, missing or stale responses (see docs/responders.md).

Processes. The parent migrates, loads the table once, binds one listening socket and forks
``workers`` children sharing it (pre-fork accept; ``reuse_port=True`` gives each child its own
SO_REUSEPORT socket instead). Each child inherits the table (copy-on-write) and builds its own Context
and database connections after the fork; the PKCS#11 token is opened lazily, by the first answer that
must be signed (OCSP signer keys only: the Context is responder-only, pki/ocsp/
``build_context(responder_only=True)``). The parent only supervises: it restarts a child that dies, forwards SIGTERM /
SIGINT, and exits when they are gone; children exit when the parent does.

Freshness. Each child polls the database every ``POLL_SECONDS`` (0.15 s) on a dedicated autocommit
connection. The poll is gated by a near-free change probe (SQLite ``PRAGMA data_version``, PostgreSQL
``pg_current_snapshot()``): when nothing committed, nothing is scanned. Otherwise it reads the rows of
``ocsp_response`` whose ``this_update`` (the signing time) is past a watermark, joined with their
certificate, and the certificates whose ``revoked_at`` is past it; a stored response whose status does
not match its certificate's (a revocation whose re-signing hook failed) is dropped, so the fallback
re-signs it. A revocation is therefore served within about one poll interval of ``revoke()`` returning.
The watermark trails the newest row by ``OVERLAP_SECONDS`` (responses are signed before their
transaction commits), and the whole table is re-read every ``RESYNC_SECONDS`` and when an issuer's OCSP
signer changes. A response is served from memory only while at least half its validity is left (as in
pki/ocsp/); after that the fallback re-signs it. If polling fails for ``STALE_AFTER_SECONDS`` the
memory table is not used at all until it works again.

HTTP. Request heads are parsed by llhttp (httptools, the parser uvicorn uses; ``parse_head``) and
memoised; this module frames requests (end of head, Content-Length bodies, pipelining) and bounds them:
request line and headers at most 24 KiB and 64 header lines, CRLF line ends, no obs-fold, no
Transfer-Encoding, Content-Length required for POST, bodies at most
10 KiB (413 otherwise, with a malformedRequest OCSP body, as api/responders.py), one consistent
Content-Length, Host required for HTTP/1.1. Keep-alive per HTTP/1.1 (and HTTP/1.0 ``Connection:
keep-alive``), pipelining with answers in request order, ``Expect: 100-continue``, idle keep-alive and
slow-request timeouts, back-pressure when the client does not read. Framing errors get 400 / 411 /
413 / 414 / 431 / 505 and the connection is closed; unknown paths 404, other methods 405. Routes and
OCSP/CRL HTTP semantics are those of api/responders.py (GET caching headers, ETag / If-None-Match,
``no-store`` for errors and nonce answers, Content-Type of POST not enforced).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import httptools

from pki.errors import MalformedOCSPRequest, PKIError
from pki.ocsp import (
    INTERNAL_ERROR_ANSWER,
    MALFORMED_ANSWER,
    TRY_LATER_ANSWER,
    UNAUTHORIZED_ANSWER,
    Answer,
    MemorySource,
    certid_der,
    fresh_until,
    parse_request,
    read_engine,
    responder_for,
    rfc5019_certid,
    wanted_status,
)
from pki.store.ocsp import PresignedFeed

if TYPE_CHECKING:
    from pki.config import Settings
    from pki.context import Context

log = logging.getLogger("v2gpki.ocsp.fast")

OCSP_RESPONSE = b"application/ocsp-response"
MAX_OCSP_REQUEST = 10 * 1024  # as api/responders.py
MAX_GET_PATH = (MAX_OCSP_REQUEST * 4) // 3 + 8
MAX_HEAD = 24 * 1024  # request line + headers (a GET carries up to ~14 KB of base64)
MAX_HEADER_LINES = 64
MAX_BUFFERED = 64 * 1024  # unprocessed bytes per connection before reading pauses (pipelining)


# ---------------------------------------------------------------------------------------------------
# HTTP/1.1 framing
# ---------------------------------------------------------------------------------------------------

_REASONS = {100: "Continue", 200: "OK", 304: "Not Modified", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
            413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_STATUS_LINE = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()}
_B64_PATH = re.compile(r"^[A-Za-z0-9+/ _-]*={0,2}$")
_CRL_NAME = re.compile(r"^([a-z0-9][a-z0-9-]{1,62})\.crl$")


class HttpError(Exception):
    """A request that cannot be framed or is refused before routing: answered, then the connection closes."""

    def __init__(self, status: int, detail: str = "", body: bytes | None = None,
                 content_type: bytes = b"text/plain; charset=utf-8") -> None:
        super().__init__(detail)
        self.status = status
        self.body = body if body is not None else (detail or _REASONS[status]).encode() + b"\n"
        self.content_type = content_type


class Request:
    __slots__ = ("method", "target", "v11", "length", "keep_alive", "expect_continue", "if_none_match")

    def __init__(self, method: bytes, target: bytes, v11: bool, length: int, keep_alive: bool,
                 expect_continue: bool, if_none_match: bytes | None) -> None:
        self.method = method
        self.target = target
        self.v11 = v11
        self.length = length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.if_none_match = if_none_match


class _HeadCollector:
    """httptools callbacks: the target and the header fields of one request head."""

    __slots__ = ("url", "fields", "done")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


def parse_head(head: bytes) -> Request:
    """Request line and header fields (without the final CRLF CRLF), parsed by llhttp (httptools, uvicorn's
    parser): it refuses bad tokens, control characters, bare CR or LF, obs-fold, whitespace before the colon,
    malformed or duplicate Content-Length (RFC 9112 §2-§6). What it leaves to us: exactly one SP between the
    request-line's parts, HTTP/1.0 or 1.1 only (505), at most MAX_HEADER_LINES fields (431), one Host and
    one for HTTP/1.1 (§3.2), no Transfer-Encoding (§6.3: no chunked bodies, no smuggling), Expect only
    100-continue. Raises HttpError."""
    sink = _HeadCollector()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(head + b"\r\n\r\n")
    except httptools.HttpParserError as exc:
        if "HTTP version" in str(exc):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1") from None
        raise HttpError(400, f"bad request: {exc}") from None
    if not sink.done:
        raise HttpError(400, "bad request head")
    method, version = parser.get_method(), parser.get_http_version()
    if version not in ("1.0", "1.1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1")
    target = sink.url
    if not head.startswith(b"%s %s HTTP/%s\r\n" % (method, target, version.encode())) and \
            head != b"%s %s HTTP/%s" % (method, target, version.encode()):
        raise HttpError(400, "bad request line")  # RFC 9112 §3: method SP request-target SP version
    if len(sink.fields) > MAX_HEADER_LINES:
        raise HttpError(431, "too many header fields")
    length = -1
    host = 0
    conn = b""
    expect = False
    inm: bytes | None = None
    for name, value in sink.fields:
        name = name.lower()
        if name == b"content-length":
            if len(value) > 9:
                raise HttpError(400, "bad Content-Length")
            length = int(value)  # digits only, one value: llhttp checked both
        elif name == b"transfer-encoding":
            # Not needed by any OCSP client; refusing it closes the request-smuggling door (RFC 9112 §6.3).
            raise HttpError(400, "Transfer-Encoding is not supported; send Content-Length")
        elif name == b"host":
            host += 1
        elif name == b"expect":
            if value.strip(b" \t").lower() != b"100-continue":
                raise HttpError(400, "unsupported Expect")
            expect = True
        elif name == b"if-none-match":
            inm = value.strip(b" \t")
        elif name == b"connection":
            conn = conn + b"," + value.lower() if conn else value.lower()
    if host > 1:
        raise HttpError(400, "more than one Host")  # RFC 9112 §3.2
    v11 = version == "1.1"
    if v11 and not host:
        raise HttpError(400, "HTTP/1.1 request without Host")  # RFC 9112 §3.2
    # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive". (llhttp's
    # should_keep_alive() is reset once a message without body is complete, as a GET head is here.)
    if conn:
        tokens = {t.strip() for t in conn.split(b",")}
        keep = b"close" not in tokens if v11 else b"keep-alive" in tokens
    else:
        keep = v11
    return Request(method, target, v11, length, keep, expect, inm)


# Clients repeat themselves: one OCSP client sends the same request head every time (only GET paths
# differ). Parsing is a pure function of the head bytes, so its results are memoised (bounded).
_PARSED: dict[bytes, Request] = {}

_date_cache: list[Any] = [0, b""]


def date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    value: bytes = _date_cache[1]
    return value


def http_response(status: int, headers: list[bytes], body: bytes, *, keep: bool, v11: bool,
                  head: bool = False) -> bytes:
    parts = [_STATUS_LINE[status], date_header(), *headers]
    if status != 304:  # RFC 9110 §8.6: a 304 carries no Content-Length unless it is the 200's
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if not keep:
        parts.append(b"Connection: close\r\n")
    elif not v11:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head and status != 304:
        parts.append(body)
    return b"".join(parts)


def decode_get_path(text: str) -> bytes | None:
    """RFC 6960 A.1 / RFC 5019 §5 (as api/responders.py): base64 of the DER request, already URL-decoded;
    the URL-safe alphabet, missing padding and '+' turned into ' ' by a proxy are tolerated."""
    if not text or len(text) > MAX_GET_PATH or not _B64_PATH.match(text):
        return None
    s = text.replace(" ", "+").replace("-", "+").replace("_", "/").rstrip("=")
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _http_date(dt: datetime) -> bytes:
    return formatdate(dt.timestamp(), usegmt=True).encode()


def _etag_matches(header: bytes, etag: bytes) -> bool:
    tags = {t.strip().removeprefix(b"W/") for t in header.split(b",")}
    return b"*" in tags or etag in tags


def cache_headers(this_update: datetime, next_update: datetime, etag: bytes) -> list[bytes]:
    # RFC 5019 §6.2: max-age no later than nextUpdate; public; no-transform; must-revalidate.
    max_age = max(0, int(next_update.timestamp() - time.time()))
    return [b"Cache-Control: max-age=%d, public, no-transform, must-revalidate\r\n" % max_age,
            b"Last-Modified: " + _http_date(this_update) + b"\r\n",
            b"Expires: " + _http_date(next_update) + b"\r\n",
            b"ETag: " + etag + b"\r\n"]


# ---------------------------------------------------------------------------------------------------
# The in-memory table of pre-signed responses and its poller
# ---------------------------------------------------------------------------------------------------


def _utc(v: Any) -> Any:
    if isinstance(v, str):  # SQLite stores DATETIME as text
        v = datetime.fromisoformat(v)
    if isinstance(v, datetime) and v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return v


@dataclass
class _IssuerInfo:
    hashes: dict[str, tuple[bytes, bytes]]  # alg → (issuerNameHash, issuerKeyHash)
    signer_not_before: datetime
    signer_der: bytes


Entry = tuple[Answer, float]  # (answer, serve until: epoch seconds = nextUpdate - half the validity)

_ANSWER_STATUS = {"good": "good", "revoked": "revoked", "hold": "revoked"}
_HOLD_REASON = b"\xa0\x03\x0a\x01\x06"  # RevokedInfo.revocationReason [0] ENUMERATED certificateHold (6)
_FETCH_BATCH = 500


class PresignedCache:
    """A bounded LRU cache of pre-signed responses in front of the ``ocsp_response`` table (#28).

    ``entries``: canonical SHA-1 CertID DER (hash parameters NULL, minimal serial) → the stored response,
    for at most ``max_entries`` certificates, least recently used evicted first. Filled by answers of the
    fallback (a miss reads one row by its unique key, pki/ocsp/), by the newest rows at start
    (``warm``), and by the poller with changed rows while there is room. ``derived``: answers of other
    shapes (other hash algorithms, non-canonical encodings, unknown serials), bounded too, dropped
    whenever anything changes. Read by the event loop without locks (single dict operations are atomic
    in CPython); the poller thread only replaces or drops single keys.

    Change detection is an indexed watermark: the rows of ``ocsp_response`` signed since it
    (``this_update``, index ix_ocsp_response_this_update) and the certificates revoked or put on hold
    since it (``revoked_at``, ix_certificate_revoked_at); cached responses of certificates on hold are
    checked by unique key (their release clears ``revoked_at``). Nothing ever reads the whole table."""

    POLL_SECONDS = 0.15
    OVERLAP_SECONDS = 6.0  # signing → commit delay tolerated (+1 s: this_update has whole seconds)
    MAX_HELD_CHECKED = 500  # cached certificates on hold whose release each scan looks for (unique index)
    MAX_RECENT_FILLS = 5_000  # fallback answers re-checked by unique key; more → the next poll scans instead
    ISSUER_RELOAD_SECONDS = 60.0
    STALE_AFTER_SECONDS = 10.0
    DERIVED_MAX = 50_000

    def __init__(self, ctx: Context, *, max_entries: int | None = None, warm_entries: int | None = None) -> None:
        self.ctx = ctx
        st = ctx.settings
        self.max_entries = st.ocsp_cache_entries if max_entries is None else max_entries
        self.warm_entries = min(self.max_entries,
                                st.ocsp_cache_warm_entries if warm_entries is None else warm_entries)
        self.derived_max = min(self.DERIVED_MAX, max(1_000, self.max_entries // 5))
        # The first source of ocsp-serve's chain (pki/ocsp/sources.py): the stored and live sources follow
        # in the thread pool (FastResponder._fallback → pki/ocsp/).
        self.memory = MemorySource()
        self.entries: OrderedDict[bytes, Entry] = self.memory.entries
        # Answers the fallback produced for other one-CertID requests (other hash algorithms, unknown serials,
        # non-canonical encodings): dropped whenever the table changes, so they never outlive a revocation.
        self.derived: dict[bytes, Entry] = {}
        self.gen = 0
        self.issuer_hashes: dict[tuple[str, bytes, bytes], bool] = {}  # → has a delegated signer
        self.fresh_until = 0.0  # epoch: memory answers are used only until then (poller alive)
        self._issuers: dict[str, _IssuerInfo] = {}
        self._sha1: dict[tuple[bytes, bytes], str] = {}  # (issuerNameHash, issuerKeyHash) → issuer
        self._margin_td = responder_for(ctx).margin
        self._margin = self._margin_td.total_seconds()
        self.feed = PresignedFeed(ctx.db)  # pki/store/ocsp.py: every read of the poller
        self._gate: Any = None
        epoch = datetime.fromtimestamp(0, UTC)
        self._max_resp = epoch  # newest this_update seen (responses)
        self._max_rev = epoch  # newest revoked_at seen (certificates)
        self._watermarks_read = False
        self._seen: dict[tuple[str, str], datetime] = {}  # rows of the overlap window already taken in
        self._seen_rev: dict[tuple[str, str], datetime] = {}
        self._held: dict[bytes, tuple[str, str]] = {}  # cached answers 'certificateHold': release looked for
        self._rescan_until = 0.0
        # Keys the fallback cached since the last poll (→ (issuer, serial)): what a poll with no new commit
        # re-reads by unique key instead of the whole overlap window (see poll_once).
        self._recent_fills: dict[bytes, tuple[str, str]] = {}
        self._fills_overflow = False
        self._next_issuers = 0.0
        self._issuer_miss_at = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = -1e9
        self.polls = 0
        self.scans = 0
        self.rechecks = 0
        self.loads = 0
        self.fills = 0
        self.evictions = 0

    def close(self) -> None:
        self.feed.close()

    # -- issuers -----------------------------------------------------------------------------------

    def reload_issuers(self) -> bool:
        """Issuer hashes (SHA-1/256/384/512, from pki/ocsp/) and current signers. True if a signer
        changed (then cached responses made by the old one must not be served: the cache is emptied)."""
        r = responder_for(self.ctx)
        r.reload()
        infos: dict[str, _IssuerInfo] = {}
        hashes: dict[tuple[str, bytes, bytes], bool] = {}
        for name in r.issuer_names():
            iss = r.issuer(name)
            if iss is None:
                continue
            for alg, (nh, kh) in iss.hashes.items():
                hashes[(alg, nh, kh)] = iss.signer is not None
            if iss.signer is not None:
                infos[name] = _IssuerInfo(iss.hashes, iss.signer.not_before, iss.signer.cert_der)
        changed = any(name not in infos or infos[name].signer_der != old.signer_der
                      for name, old in self._issuers.items())
        self._issuers, self.issuer_hashes = infos, hashes
        self._sha1 = {info.hashes["sha1"]: name for name, info in infos.items() if "sha1" in info.hashes}
        self._next_issuers = time.time() + self.ISSUER_RELOAD_SECONDS
        if changed:
            self.entries.clear()
            self._held.clear()
            self._changed()
        return changed

    # -- rows → entries ----------------------------------------------------------------------------

    def _key(self, issuer: str, alg: str, serial_hex: str) -> bytes | None:
        info = self._issuers.get(issuer)
        if info is None or alg not in info.hashes:
            return None
        nh, kh = info.hashes[alg]
        return certid_der(alg, nh, kh, int(serial_hex, 16))

    def _entry(self, row: tuple[Any, ...]) -> tuple[bytes | None, Entry | None]:
        """(key, entry); entry None when pki/ocsp/ would not serve the stored response as it is."""
        _oid, issuer, serial_hex, alg, o_status, o_this, o_next, der, c_status, c_rev = row
        key = self._key(issuer, alg or "sha1", serial_hex)
        if key is None:
            return None, None
        info = self._issuers[issuer]
        o_this, o_next, c_rev = _utc(o_this), _utc(o_next), _utc(c_rev)
        want = wanted_status(c_status)
        # The one freshness rule of both responders (pki/ocsp/sources.py).
        until = fresh_until(stored_status=o_status, this_update=o_this, next_update=o_next, want=want,
                            revoked_at=c_rev, signer_since=info.signer_not_before, margin=self._margin_td)
        if der is None or until is None:
            return key, None
        ans = Answer(bytes(der), "successful", "good" if want == "good" else "revoked", o_this, o_next,
                     cacheable=True)
        return key, (ans, until.timestamp())

    def put(self, key: bytes, entry: Entry, *, only_if_room: bool = False) -> bool:
        """Cache ``entry`` under the canonical SHA-1 CertID ``key``; the least recently used go beyond
        ``max_entries``."""
        entries = self.entries
        if key not in entries and len(entries) >= self.max_entries:
            if only_if_room or self.max_entries <= 0:
                return False
            while len(entries) >= self.max_entries:
                try:
                    old, _ = entries.popitem(last=False)
                except KeyError:
                    break
                self._held.pop(old, None)
                self.evictions += 1
        entries[key] = entry
        ans = entry[0]
        if ans.cert_status == "revoked" and _HOLD_REASON in ans.der:
            issuer_serial = self._issuer_serial(key)
            if issuer_serial is not None:
                self._held[key] = issuer_serial
        return True

    def _issuer_serial(self, key: bytes) -> tuple[str, str] | None:
        """(issuer, serial hex) of a canonical SHA-1 CertID key (SEQUENCE{algid(11), OCTET 20, OCTET 20, INT})."""
        if len(key) < 2 + 11 + 44 + 3:
            return None
        nh, kh = key[15:35], key[37:57]
        issuer = self._sha1.get((nh, kh))
        if issuer is None:
            return None
        return issuer, format(int.from_bytes(key[59:], "big"), "x")

    def fill(self, key: bytes, ans: Answer) -> None:
        """A fallback answer for the canonical SHA-1 CertID ``key`` (the stored response, or the one just
        re-signed and stored): cached if it is a good/revoked answer that can be served again."""
        if (ans.successful and ans.cacheable and ans.next_update is not None and ans.this_update is not None
                and ans.cert_status in ("good", "revoked")):
            if self.put(key, (ans, ans.next_update.timestamp() - self._margin)):
                self.fills += 1
                recent = self._recent_fills
                if len(recent) < self.MAX_RECENT_FILLS:
                    issuer_serial = self._issuer_serial(key)
                    if issuer_serial is not None:
                        recent[key] = issuer_serial
                else:
                    self._fills_overflow = True

    def warm(self) -> int:
        """At start: the newest ``warm_entries`` stored responses (index on this_update), never more."""
        if not self._issuers or time.time() >= self._next_issuers:
            self.reload_issuers()
        self._read_watermarks()
        n = 0
        if self.warm_entries > 0:
            rows = self.feed.newest(self.warm_entries)
            for row in reversed(rows):  # oldest first: the newest are the most recently used
                key, entry = self._entry(row)
                if key is not None and entry is not None and self.put(key, entry, only_if_room=True):
                    n += 1
        self.loads += 1
        self._advance(time.time())
        return n

    load = warm  # the name before #28

    def adopt(self, warm: PresignedCache) -> int:
        """Take over a cache warmed by the supervisor before the fork (this process's copy of it): its
        entries, issuers and watermarks. Returns how many entries."""
        for attr in ("entries", "issuer_hashes", "_issuers", "_sha1", "_held", "_max_resp", "_max_rev",
                     "_watermarks_read", "_next_issuers", "fresh_until", "loads"):
            setattr(self, attr, getattr(warm, attr))
        self.memory.entries = self.entries
        return len(self.entries)

    def _read_watermarks(self) -> None:
        """Start the change scans at the newest stamps now in the tables (an index's last entry each)."""
        if self._watermarks_read:
            return
        now = datetime.now(UTC)
        r1, r2 = self.feed.newest_stamps()
        self._max_resp = min(_utc(r1), now) if r1 is not None else now
        self._max_rev = min(_utc(r2), now) if r2 is not None else now
        self._watermarks_read = True

    def _changed(self) -> None:
        # gen first: a thread-pool answer computed before this change is stored only if gen is unchanged
        # after it took its reference to ``derived`` (FastResponder.ocsp), so it can never land in the new dict.
        self.gen += 1
        self.derived = {}

    def _advance(self, t0: float) -> None:
        self.fresh_until = t0 + self.STALE_AFTER_SECONDS

    def _since(self, newest: datetime, t0: float) -> datetime:
        # Rows are stamped by the writer's clock before it commits: trail both our clock and the newest
        # stamp seen (a writer whose clock is behind ours) by OVERLAP_SECONDS.
        return min(datetime.fromtimestamp(t0, UTC), newest) - timedelta(seconds=self.OVERLAP_SECONDS)

    def _fetch(self, wanted: list[tuple[str, str, bytes]]) -> int:
        """Read the rows of ``wanted`` (issuer, serial, key) by unique key and put/replace/drop them."""
        n = 0
        by_issuer: dict[str, list[tuple[str, bytes]]] = {}
        for issuer, serial, key in wanted:
            by_issuer.setdefault(issuer, []).append((serial, key))
        for issuer, items in by_issuer.items():
            for i in range(0, len(items), _FETCH_BATCH):
                part = items[i : i + _FETCH_BATCH]
                rows = self.feed.responses(issuer, [s for s, _ in part])
                got: set[bytes] = set()
                for row in rows:
                    k, entry = self._entry(row)
                    if k is None:
                        continue
                    got.add(k)
                    if entry is None:
                        if self.entries.pop(k, None) is not None:
                            self._held.pop(k, None)
                            n += 1
                    else:
                        cur = self.entries.get(k)
                        if cur is None or cur[0].der != entry[0].der:
                            if cur is not None:
                                self._held.pop(k, None)
                            if self.put(k, entry, only_if_room=cur is None):
                                n += 1
                for _, k2 in part:
                    if k2 not in got and self.entries.pop(k2, None) is not None:
                        n += 1  # the row is gone (expired, deleted)
        return n

    def _scan(self, t0: float) -> int:
        """Apply the rows changed since the watermarks; returns how many cached entries changed (plus
        rows not seen before, which void the derived answers)."""
        entries = self.entries
        n = 0
        fresh = 0
        wanted: list[tuple[str, str, bytes]] = []
        since = self._since(self._max_resp, t0)
        for issuer, serial, alg, status, this in self.feed.changed_responses(since):
            this = _utc(this)
            if this > self._max_resp:
                self._max_resp = this
            ident = (issuer, serial)
            new = self._seen.get(ident) != this
            if new:
                self._seen[ident] = this
                fresh += 1
            key = self._key(issuer, alg or "sha1", serial)
            if key is None:
                continue
            e = entries.get(key)
            if e is None:
                if new and len(entries) < self.max_entries:
                    wanted.append((issuer, serial, key))
            elif (e[0].cert_status != _ANSWER_STATUS.get(status)
                  or e[0].this_update is None or e[0].this_update < this):
                wanted.append((issuer, serial, key))
        self._seen = {k: v for k, v in self._seen.items() if v >= since}
        since_rev = self._since(self._max_rev, t0)
        for issuer, serial, _status, revoked_at in self.feed.changed_certificates(since_rev):
            revoked_at = _utc(revoked_at)
            if revoked_at > self._max_rev:
                self._max_rev = revoked_at
            ident = (issuer, serial)
            if self._seen_rev.get(ident) != revoked_at:
                self._seen_rev[ident] = revoked_at
                fresh += 1
            key = self._key(issuer, "sha1", serial)
            if key is None:
                continue
            e = entries.get(key)
            if e is not None and (e[0].cert_status == "good" or e[0].this_update is None
                                  or e[0].this_update < revoked_at):
                # pki/ocsp/ re-signs it (from the certificate's status) on the next request
                if entries.pop(key, None) is not None:
                    self._held.pop(key, None)
                    n += 1
        self._seen_rev = {k: v for k, v in self._seen_rev.items() if v >= since_rev}
        held = [(k, v) for k, v in list(self._held.items())[: self.MAX_HELD_CHECKED]]
        for issuer in {v[0] for _, v in held}:
            keys = {v[1]: k for k, v in held if v[0] == issuer}
            rows = self.feed.certificate_statuses(issuer, list(keys))
            still = {sn for sn, st in rows if st == "hold"}
            for sn, key in keys.items():
                if sn not in still:
                    self._held.pop(key, None)
                    if entries.pop(key, None) is not None:
                        n += 1
        if wanted:
            n += self._fetch(wanted)
        return n + fresh

    def poll_once(self) -> int:
        """Apply what changed since the last poll. Returns how many entries changed.

        When the probe says something committed: the indexed change scans of :meth:`_scan`. For
        OVERLAP_SECONDS after that, an answer the fallback read just before the commit may reach the cache
        just after the scan that followed it: each poll re-reads by unique key what the fallback cached
        since the previous poll. (While the probe is unchanged nothing committed, so the overlap window
        holds no row the last scan did not see; re-reading the whole window at every poll cost each worker
        ≈ 7 ms per poll per 1,500 rows in it, ≈ 40 % more CPU per request in bench/ocsp.py, #28.)"""
        self.polls += 1
        t0 = time.time()
        self._read_watermarks()
        gate = self.feed.probe()
        moved = gate != self._gate
        if moved:
            self._rescan_until = t0 + self.OVERLAP_SECONDS
        n = 0
        # fills from now on are re-checked at the next poll (the one running now may miss them)
        recent, self._recent_fills = self._recent_fills, {}
        overflow, self._fills_overflow = self._fills_overflow, False
        if t0 < self._rescan_until:
            if moved or overflow:
                self.scans += 1
                n = self._scan(t0)
            elif recent:
                self.rechecks += 1
                n = self._fetch([(issuer, serial, key) for key, (issuer, serial) in recent.items()])
            if n:  # a change also voids derived answers (other hash algorithms, unknown serials)
                self._changed()
        self._gate = gate
        self._advance(t0)
        return n

    # -- the poller thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ocsp-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            try:
                if time.time() >= self._next_issuers:
                    self.reload_issuers()
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - keep polling; memory answers stop at fresh_until
                self.close()
                now = time.monotonic()
                if now - self._last_error_log > 30:
                    self._last_error_log = now
                    log.warning("OCSP cache poll failed (%s); answers come from the database meanwhile",
                                type(exc).__name__)


# ---------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------


_RESPONSE_STATUS_LABEL = {"successful": "successful", "malformedRequest": "malformed_request",
                          "internalError": "internal_error", "tryLater": "try_later", "sigRequired": "sig_required",
                          "unauthorized": "unauthorized"}


class Metrics:
    """The Prometheus series of api/observability.py (v2gpki_ocsp_requests_total, ..._duration_seconds,
    v2gpki_http_requests_total), counted locally per request (a dict increment) and added to the
    prometheus_client objects at most every 50 ms — with PROMETHEUS_MULTIPROC_DIR each of those writes
    goes to a memory-mapped file, too dear for the hot path."""

    FLUSH_SECONDS = 0.05

    def __init__(self) -> None:
        try:
            from api import observability
        except ImportError:  # pragma: no cover - a build without the observability module
            observability = None  # type: ignore[assignment]
        self.obs: Any = observability
        self.bounds: tuple[float, ...] = ()
        if observability is not None:
            self.bounds = tuple(observability.OCSP_LATENCY._upper_bounds)
        self.ocsp: dict[tuple[str, str, str], int] = {}
        self.http: dict[tuple[str, str, str], int] = {}
        self.buckets = [0] * len(self.bounds)
        self.latency_sum = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    def count_ocsp(self, method: str, http_status: int, ans: Answer, elapsed: float) -> None:
        if http_status >= 400:
            key = (method, f"http_{http_status}", "none")
        else:
            key = (method, _RESPONSE_STATUS_LABEL.get(ans.status, ans.status), ans.cert_status or "none")
        self.ocsp[key] = self.ocsp.get(key, 0) + 1
        self.latency_sum += elapsed
        for i, bound in enumerate(self.bounds):
            if elapsed <= bound:
                self.buckets[i] += 1
                break
        self._schedule()

    def count_http(self, method: str, route: str, status: int) -> None:
        key = (method, route, str(status))
        self.http[key] = self.http.get(key, 0) + 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self.loop is not None and self.obs is not None:
            self._scheduled = True
            self.loop.call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        obs = self.obs
        if obs is None:
            return
        ocsp, self.ocsp = self.ocsp, {}
        http, self.http = self.http, {}
        buckets, self.buckets = self.buckets, [0] * len(self.bounds)
        total, self.latency_sum = self.latency_sum, 0.0
        try:
            for key, n in ocsp.items():
                obs.OCSP_REQUESTS.labels(*key).inc(n)
            for key, n in http.items():
                obs.HTTP_REQUESTS.labels(*key).inc(n)
            if any(buckets):
                # Histogram.observe() one value at a time would cost what we save; its two parts, in bulk.
                hist = obs.OCSP_LATENCY
                hist._sum.inc(total)
                for i, n in enumerate(buckets):
                    if n:
                        hist._buckets[i].inc(n)
        except Exception:  # noqa: BLE001 - metrics never break answers
            log.warning("metrics flush failed", exc_info=True)


class _Pending:
    """Work for the thread pool; ``finish`` turns its result into the HTTP response bytes."""

    __slots__ = ("fn", "finish")

    def __init__(self, fn: Callable[[], Any], finish: Callable[[Any], bytes]) -> None:
        self.fn = fn
        self.finish = finish


class FastResponder:
    """One per worker process: routes requests, answers from the table, defers the rest."""

    MISS_FALLBACK_SECONDS = 5.0  # an unknown issuer may be a new CA: ask pki/ocsp/ at most this often

    def __init__(self, cache: PresignedCache, *, threads: int = 4) -> None:
        self.cache = cache
        self.ctx = cache.ctx
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="ocsp-fallback")
        self._miss_at = -1e9
        self.fast = 0
        self.fallback = 0
        self.started = time.time()
        self.metrics = Metrics()

    # -- OCSP --------------------------------------------------------------------------------------

    def lookup(self, der: bytes) -> Answer | bytes | None:
        """The answer from memory; or, when pki/ocsp/ must answer, the key its answer may be cached under
        (``b"L" + canonical SHA-1 CertID`` for the LRU cache, ``b"D" + CertID`` for derived answers) or None."""
        cache = self.cache
        now = time.time()
        if now >= cache.fresh_until:
            return None
        memory = cache.memory
        # RFC 5019 shape: OCSPRequest{TBSRequest{requestList{Request{CertID}}}}, short lengths, nothing
        # else. Its CertID bytes, if they are a key, are byte-identical to a canonical valid CertID.
        key = rfc5019_certid(der)
        if key is not None:
            hit = memory.get(key, now)
            if hit is not None:
                return hit
        try:
            req = parse_request(der)
        except MalformedOCSPRequest:
            return MALFORMED_ANSWER
        if len(req.cert_ids) != 1 or req.nonce_ext_value is not None:
            return None
        cid = req.cert_ids[0]
        if cid.hash_alg is None:
            return UNAUTHORIZED_ANSWER  # pki/ocsp/: no issuer matches an unknown hash algorithm
        canonical = b""
        if cid.serial > 0 and cid.hash_alg == "sha1":
            canonical = certid_der(cid.hash_alg, cid.name_hash, cid.key_hash, cid.serial)
            hit = memory.get(canonical, now)
            if hit is not None:
                return hit
        e = cache.derived.get(cid.raw)
        if e is not None and now < e[1]:
            return e[0]
        signer = cache.issuer_hashes.get((cid.hash_alg, cid.name_hash, cid.key_hash))
        if signer is False:
            return UNAUTHORIZED_ANSWER
        if signer is None:
            if now - self._miss_at < self.MISS_FALLBACK_SECONDS:
                return UNAUTHORIZED_ANSWER
            self._miss_at = now
        return b"L" + canonical if canonical else b"D" + cid.raw

    def _fallback(self, der: bytes, client: str) -> Answer:
        try:
            r = responder_for(self.ctx)
            ans = r.respond_presigned(der)
            # Live signatures are charged to the client's address (pki/ocsp/ SignBudget).
            return ans if ans is not None else r.respond(der, client)
        except Exception:  # noqa: BLE001 - respond() maps its own errors; this is the last line
            log.exception("OCSP fallback failed")
            return INTERNAL_ERROR_ANSWER

    def ocsp(self, der: bytes | None, req: Request, *, get: bool, client: str = "?") -> bytes | _Pending:
        t0 = time.perf_counter()
        if not der:
            return self._ocsp_response(MALFORMED_ANSWER, req, t0, get=get)
        found = self.lookup(der)
        if isinstance(found, Answer):
            self.fast += 1
            return self._ocsp_response(found, req, t0, get=get)
        self.fallback += 1
        key = found
        gen = self.cache.gen

        def finish(ans: Any) -> bytes:
            if not isinstance(ans, Answer):
                ans = INTERNAL_ERROR_ANSWER
            elif key is not None and ans.cacheable and ans.successful and ans.next_update is not None:
                cache = self.cache
                if key[:1] == b"L" and ans.cert_status in ("good", "revoked"):
                    # the stored response (read by unique key, or re-signed and stored): into the LRU cache.
                    # One read just before a commit is caught by the poller's rescan (PresignedCache.poll_once).
                    cache.fill(key[1:], ans)
                else:
                    derived = cache.derived  # the reference first, then the generation (see _changed)
                    if cache.gen == gen:
                        if len(derived) >= cache.derived_max:
                            derived.clear()
                        derived[key[1:]] = (ans, ans.next_update.timestamp() - cache._margin)
            return self._ocsp_response(ans, req, t0, get=get)

        return _Pending(lambda: self._fallback(der, client), finish)

    def _ocsp_response(self, ans: Answer, req: Request, t0: float, *, get: bool, status: int = 200) -> bytes:
        head = req.method == b"HEAD"
        headers = [b"Content-Type: application/ocsp-response\r\n"]
        if ans is TRY_LATER_ANSWER:  # HSM or database away, or the client's live-signing budget spent
            headers.append(b"Retry-After: 5\r\n")
        out: bytes | None = None
        if get:
            if ans.cacheable and ans.this_update is not None and ans.next_update is not None:
                etag = b'"' + hashlib.blake2b(ans.der, digest_size=16).hexdigest().encode() + b'"'
                headers += cache_headers(ans.this_update, ans.next_update, etag)
                if req.if_none_match is not None and _etag_matches(req.if_none_match, etag):
                    status = 304
                    out = http_response(304, headers[1:], b"", keep=req.keep_alive, v11=req.v11)
            else:
                headers.append(b"Cache-Control: no-store\r\n")  # errors and nonce answers are one-offs
        if out is None:
            out = http_response(status, headers, ans.der, keep=req.keep_alive, v11=req.v11, head=head)
        method = "POST" if not get else "HEAD" if head else "GET"
        m = self.metrics
        m.count_ocsp(method, status, ans, time.perf_counter() - t0)
        m.count_http(method, "/ocsp" if req.method == b"POST" else "/ocsp/{b64:path}", status)
        return out

    # -- routing -----------------------------------------------------------------------------------

    def handle(self, req: Request, body: bytes, client: str = "?") -> bytes | _Pending:
        target = req.target
        if target[:1] != b"/":
            if target.startswith((b"http://", b"https://")):  # absolute-form (RFC 9112 §3.2.2)
                slash = target.find(b"/", target.find(b"//") + 2)
                target = target[slash:] if slash > 0 else b"/"
            else:
                raise HttpError(400, "bad request target")
        path = target.split(b"?", 1)[0]
        method = req.method
        if path == b"/ocsp" or path.startswith(b"/ocsp/"):
            if method == b"POST":
                return self.ocsp(body, req, get=False, client=client)
            if method not in (b"GET", b"HEAD"):
                return self._plain(405, req, b"method not allowed\n", [b"Allow: GET, HEAD, POST\r\n"])
            text = unquote(path[6:].decode("ascii"))
            if len(text) > MAX_GET_PATH:
                return self._ocsp_response(MALFORMED_ANSWER, req, time.perf_counter(), get=True, status=414)
            return self.ocsp(decode_get_path(text), req, get=True, client=client)
        if path.startswith(b"/crl/"):
            if method not in (b"GET", b"HEAD"):
                return self._plain(405, req, b"method not allowed\n", [b"Allow: GET, HEAD\r\n"])
            m = _CRL_NAME.match(path[5:].decode("ascii"))
            if m is None:
                return self._problem(404, "not-found", "no such CRL (expected /crl/<ca-name>.crl)", req)
            return self._crl(m.group(1), req)
        if path in (b"/healthz", b"/readyz", b"/metrics"):
            if method not in (b"GET", b"HEAD"):
                return self._plain(405, req, b"method not allowed\n", [b"Allow: GET, HEAD\r\n"])
            if path == b"/healthz":
                return self._plain(200, req, self.health(), [b"Content-Type: application/json\r\n"])
            if self.metrics.obs is not None:
                return self._readyz(req) if path == b"/readyz" else self._metrics(req)
        return self._problem(404, "not-found", "not found", req)

    def _readyz(self, req: Request) -> _Pending:
        obs = self.metrics.obs

        def check() -> dict[str, str]:
            return obs.readiness(self.ctx, obs._broker_url(self.ctx))  # type: ignore[no-any-return]

        def finish(checks: Any) -> bytes:
            if not isinstance(checks, dict):
                checks = {"context": "failed: error"}
            ok = all(v == "ok" for v in checks.values())
            body = json.dumps({"status": "ready" if ok else "not ready", "checks": checks}).encode()
            return self._plain(200 if ok else 503, req, body, [b"Content-Type: application/json\r\n"])

        return _Pending(check, finish)

    def _metrics(self, req: Request) -> _Pending:
        obs = self.metrics.obs
        self.metrics.flush()

        def render() -> bytes:
            return obs.render_metrics(self.ctx, obs._broker_url(self.ctx))  # type: ignore[no-any-return]

        def finish(text: Any) -> bytes:
            if not isinstance(text, bytes):
                return self._plain(503, req, b"metrics unavailable\n")
            return self._plain(200, req, text, [b"Content-Type: " + obs.CONTENT_TYPE_LATEST.encode() + b"\r\n"])

        return _Pending(render, finish)

    def health(self) -> bytes:
        c = self.cache
        return json.dumps({"status": "ok", "pid": os.getpid(), "entries": len(c.entries),
                           "max_entries": c.max_entries, "derived": len(c.derived), "fills": c.fills,
                           "evictions": c.evictions, "fast": self.fast, "fallback": self.fallback,
                           "polls": c.polls, "scans": c.scans, "rechecks": c.rechecks, "loads": c.loads,
                           "table_fresh": time.time() < c.fresh_until}).encode()

    def _plain(self, status: int, req: Request, body: bytes, headers: list[bytes] | None = None) -> bytes:
        hs = headers if headers is not None else [b"Content-Type: text/plain; charset=utf-8\r\n"]
        if headers is not None and not any(h.startswith(b"Content-Type") for h in hs):
            hs = [*hs, b"Content-Type: text/plain; charset=utf-8\r\n"]
        return http_response(status, hs, body, keep=req.keep_alive, v11=req.v11, head=req.method == b"HEAD")

    def _problem(self, status: int, code: str, detail: str, req: Request) -> bytes:
        # Imported on this error path only: api/problems.py brings FastAPI, which this responder never loads.
        from api.problems import PROBLEM, problem_document

        body = json.dumps(problem_document(status, code, _REASONS.get(status, "Error"), detail)).encode()
        return http_response(status, [b"Content-Type: " + PROBLEM.encode() + b"\r\n"], body,
                             keep=req.keep_alive, v11=req.v11, head=req.method == b"HEAD")

    def _crl(self, name: str, req: Request) -> _Pending:
        def fetch() -> Any:
            from pki.crl import cache_for

            try:
                return cache_for(self.ctx).get(name)
            except PKIError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - database or HSM trouble: 503, logged
                log.warning("CRL %s unavailable: %s", name, type(exc).__name__)
                return exc

        def finish(crl: Any) -> bytes:
            status = 200
            if isinstance(crl, PKIError):
                from api.problems import status_of  # error path only (see _problem)

                status = status_of(crl) or 503
                status = status if status in _REASONS else 503
            elif isinstance(crl, BaseException) or crl is None:
                status = 503
            self.metrics.count_http(req.method.decode(), "/crl/{name}", status)
            if isinstance(crl, PKIError):
                return self._problem(status, crl.code, crl.message, req)
            if status != 200:
                return self._problem(503, "crl-unavailable", "the CRL is temporarily unavailable", req)
            etag = f'"{crl.issuer}-{crl.number}"'.encode()
            headers = cache_headers(crl.this_update, crl.next_update, etag)
            if req.if_none_match is not None and _etag_matches(req.if_none_match, etag):
                return http_response(304, headers, b"", keep=req.keep_alive, v11=req.v11)
            return http_response(200, [b"Content-Type: application/pkix-crl\r\n", *headers], crl.der,
                                 keep=req.keep_alive, v11=req.v11, head=req.method == b"HEAD")

        return _Pending(fetch, finish)


# ---------------------------------------------------------------------------------------------------
# The asyncio protocol
# ---------------------------------------------------------------------------------------------------


class Server:
    """Connections of one worker: timeouts swept once a second."""

    KEEPALIVE_SECONDS = 5.0  # idle keep-alive connection (as uvicorn's default)
    REQUEST_SECONDS = 10.0  # a started request must be complete by then (slow clients)
    LINGER_SECONDS = 2.0  # after an error answer, input is discarded this long before closing
    MAX_CONNECTIONS = 8192

    def __init__(self, responder: FastResponder, loop: asyncio.AbstractEventLoop) -> None:
        self.responder = responder
        self.loop = loop
        self.conns: set[HttpConnection] = set()
        # Open connections per client address (V2GPKI_OCSP_MAX_CONNECTIONS_PER_CLIENT; 0 = no cap): one
        # address cannot hold the worker's connection slots (slowloris).
        self.per_client: dict[str, int] = {}
        self.max_per_client = int(getattr(responder.ctx.settings, "ocsp_max_connections_per_client", 0))
        self.refused_per_client = 0
        self.clock = loop.time()
        self.parent_pid = 0  # when set: exit if the parent goes away
        self.closed = asyncio.Event()
        self._sweep_handle: asyncio.TimerHandle | None = loop.call_later(1.0, self._sweep)
        responder.metrics.loop = loop
        self.servers: list[Any] = []  # asyncio or uvloop Server objects

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)

    def _sweep(self) -> None:
        self.clock = now = self.loop.time()
        for c in list(self.conns):
            if c.busy or c.transport is None:
                continue
            if c.draining:
                if now - c.started > self.LINGER_SECONDS:
                    c.transport.close()
            elif c.started and now - c.started > self.REQUEST_SECONDS:
                c.fail(HttpError(408, "request timeout"))
            elif not c.started and now - c.last > self.KEEPALIVE_SECONDS:
                c.transport.close()
        if self.parent_pid and os.getppid() != self.parent_pid:
            log.warning("supervisor gone: worker %d exits", os.getpid())
            self.loop.create_task(self.shutdown())
        self._sweep_handle = self.loop.call_later(1.0, self._sweep)

    async def shutdown(self, grace: float = 5.0) -> None:
        for s in self.servers:
            s.close()
        deadline = self.loop.time() + grace
        while self.loop.time() < deadline:
            for c in list(self.conns):
                if not c.busy and not c.started and c.transport is not None:
                    c.transport.close()  # idle: nothing in flight
            if not self.conns:
                break
            await asyncio.sleep(0.05)
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        self.closed.set()


class HttpConnection(asyncio.Protocol):
    __slots__ = ("server", "responder", "transport", "buf", "busy", "closing", "last", "started",
                 "paused", "write_paused", "continued", "eof", "draining", "client")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.responder = server.responder
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.closing = False
        self.last = server.clock
        self.started = 0.0  # clock when the pending (incomplete) request began; 0: none
        self.paused = False
        self.write_paused = False
        self.continued = False
        self.eof = False
        self.draining = False
        self.client = ""  # peer address, counted in server.per_client while open ("" = not counted)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        server = self.server
        conns = server.conns
        if len(conns) >= server.MAX_CONNECTIONS:
            self.transport.abort()
            return
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if server.max_per_client:
            n = server.per_client.get(client, 0)
            if n >= server.max_per_client:
                server.refused_per_client += 1
                self.transport.abort()
                return
            server.per_client[client] = n + 1
        self.client = client
        conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        if self in server.conns:
            server.conns.discard(self)
            if self.client and server.max_per_client:
                n = server.per_client.get(self.client, 0) - 1
                if n > 0:
                    server.per_client[self.client] = n
                else:
                    server.per_client.pop(self.client, None)
        self.closing = True
        self.transport = None

    def eof_received(self) -> bool:
        self.eof = True
        if self.draining:
            return False
        return self.busy  # keep the socket open for an answer in flight, then close

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if (self.paused and not self.write_paused and not self.busy and len(self.buf) <= MAX_BUFFERED
                and self.transport is not None and not self.closing):
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # draining after an error, or closed
        self.buf = self.buf + data if self.buf else data
        self.last = self.server.clock
        if not self.busy:
            self._process()
        if len(self.buf) > MAX_BUFFERED:
            self._pause()

    def fail(self, err: HttpError) -> None:
        t = self.transport
        if t is None:
            return
        t.write(http_response(err.status, [b"Content-Type: " + err.content_type + b"\r\n"], err.body,
                              keep=False, v11=True))
        self.closing = True
        self.buf = b""
        self._linger(t)

    def _linger(self, t: asyncio.Transport) -> None:
        """Close after an error without losing the answer: closing a socket with unread input (the rest of
        a refused body) sends RST, which can destroy the answer before the client reads it. So: FIN
        after the answer, discard input until the client closes or LINGER_SECONDS pass, then close."""
        if self.eof or not t.can_write_eof():
            t.close()
            return
        self.draining = True
        self.started = self.server.clock or 1e-9
        t.write_eof()
        if self.paused:
            self.paused = False
            t.resume_reading()

    def _process(self) -> None:
        data = self.buf
        n = len(data)
        pos = 0
        out: list[bytes] = []
        responder = self.responder
        client = self.client
        try:
            while pos < n and not self.busy and not self.closing:
                while data.startswith(b"\r\n", pos):  # RFC 9112 §2.2: tolerate empty lines before a request
                    pos += 2
                if pos >= n:
                    # Only empty lines so far: they start the request (its timeout runs from the first one,
                    # and further empty lines do not restart it), but are not kept in the buffer.
                    if not self.started:
                        self.started = self.server.clock or 1e-9
                    self.buf = b""
                    break
                end = data.find(b"\r\n\r\n", pos, pos + MAX_HEAD + 4)
                if end < 0:
                    if n - pos > MAX_HEAD:
                        raise HttpError(431, "request head too large")
                    break
                head = data[pos:end]
                req = _PARSED.get(head)
                if req is None:
                    req = parse_head(head)
                    if len(_PARSED) >= 1024:
                        _PARSED.clear()
                    _PARSED[head] = req
                length = req.length
                if req.method == b"POST":
                    if length < 0:
                        raise HttpError(411, "Content-Length required")
                    if length > MAX_OCSP_REQUEST:
                        # refused unread (as api/responders.py): 413 with a malformedRequest OCSP body
                        raise HttpError(413, "request too large", MALFORMED_ANSWER.der, OCSP_RESPONSE)
                elif length > MAX_OCSP_REQUEST:
                    raise HttpError(413, "request too large")
                start = end + 4
                length = max(length, 0)
                if n - start < length:
                    if req.expect_continue and not self.continued:
                        self.continued = True
                        out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
                    break
                body = data[start : start + length]
                pos = start + length
                self.continued = False
                self.started = 0.0  # a whole request: the next one's timeout starts with its first byte
                result = responder.handle(req, body, client)
                if isinstance(result, bytes):
                    out.append(result)
                    if not req.keep_alive:
                        self.closing = True
                else:
                    self._defer(result, req.keep_alive)
        except HttpError as err:
            self.buf = b""
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
            self.fail(err)
            return
        except Exception:  # noqa: BLE001 - never let a request kill the worker
            log.exception("request handling failed")
            self.buf = b""
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
            self.fail(HttpError(500, "internal error"))
            return
        self.buf = data[pos:] if pos < n else b""
        if self.buf and not self.started:
            self.started = self.server.clock or 1e-9
        t = self.transport
        if t is None:
            return
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])
        if (self.closing or self.eof) and not self.busy:
            self.closing = True
            t.close()

    def _defer(self, pending: _Pending, keep: bool) -> None:
        self.busy = True
        fut = self.server.loop.run_in_executor(self.responder.executor, pending.fn)

        def done(f: asyncio.Future[Any]) -> None:
            self.busy = False
            try:
                result = f.result()
            except Exception:  # noqa: BLE001
                log.exception("deferred request failed")
                result = None
            try:
                payload = pending.finish(result)
            except Exception:  # noqa: BLE001
                log.exception("building the answer failed")
                self.fail(HttpError(500, "internal error"))
                return
            t = self.transport
            if t is None:
                return
            t.write(payload)
            if not keep:
                self.closing = True
                t.close()
                return
            self.last = self.server.clock
            self._process()  # pipelined requests behind it; closes if the client has sent EOF
            self._resume()

        fut.add_done_callback(done)


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


def responder_context(settings: Settings | None = None, *, migrate: bool = False) -> Context:
    """A responder-only Context (no CA keys; api/ocsp_app.py has the same, without importing FastAPI)."""
    from pki.config import Settings
    from pki.wiring import build_context

    return build_context(settings or Settings(), migrate=migrate, responder_only=True)


def _configure_logging(level: str) -> None:
    try:
        from api.observability import configure_logging

        configure_logging()  # JSON lines when V2GPKI_LOG_FORMAT=json (production default)
    except ImportError:  # pragma: no cover
        pass
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        return asyncio.new_event_loop()


def listen_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def _serve_worker(responder: FastResponder, sock: socket.socket, *, parent_pid: int = 0,
                        stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = Server(responder, loop)
    server.parent_pid = parent_pid
    srv = await loop.create_server(server.protocol, sock=sock, backlog=2048)
    server.servers.append(srv)
    stopping = stop or asyncio.Event()
    if stop is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
    waiter = loop.create_task(stopping.wait())
    closed = loop.create_task(server.closed.wait())
    await asyncio.wait([waiter, closed], return_when=asyncio.FIRST_COMPLETED)
    if not server.closed.is_set():
        await server.shutdown()
    waiter.cancel()
    closed.cancel()


def _child_main(sock: socket.socket | None, warm: PresignedCache | None, settings: Settings | None, host: str,
                port: int, parent_pid: int, threads: int) -> None:
    """A forked worker: own Context, own DB connections, own bounded cache of pre-signed responses (the
    supervisor's warm cache, copy-on-write, for the first workers; warmed here for a replacement)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C and tells us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 0
    try:
        if sock is None:  # SO_REUSEPORT: each worker listens on its own socket
            sock = listen_socket(host, port, reuse_port=True)
        ctx = responder_context(settings, migrate=False)  # HSM signatures timed by pki/wiring.py
        fresh = PresignedCache(ctx)
        t0 = time.perf_counter()
        # bounded by V2GPKI_OCSP_CACHE_WARM_ENTRIES, whatever the table holds
        warmed = fresh.adopt(warm) if warm is not None else fresh.warm()
        log.info("OCSP worker %d ready: %d cached responses in %.2f s", os.getpid(), warmed,
                 time.perf_counter() - t0)
        fresh._gate = None  # this process's probe values are its own (PRAGMA data_version is per connection)
        fresh.start()
        responder = FastResponder(fresh, threads=threads)
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(_serve_worker(responder, sock, parent_pid=parent_pid))
        finally:
            fresh.stop()
            responder.executor.shutdown(wait=False, cancel_futures=True)
            loop.close()
    except BaseException:  # noqa: BLE001 - report, then leave without running the parent's atexit
        log.exception("OCSP worker %d failed", os.getpid())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _check_hsm_in_child(ctx: Context) -> None:
    """Open the token and list the keys once — in a throwaway child, so that the parent never loads the
    PKCS#11 module (workers open it lazily, after the fork) — and fail here with one clear message."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ctx.keystore.list()
        except BaseException as exc:  # noqa: BLE001
            print(f"v2gpki ocsp-serve: the HSM token cannot be used: {str(exc) or type(exc).__name__}",
                  file=sys.stderr)
            code = 3
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(3)


def serve(host: str = "127.0.0.1", port: int = 8001, workers: int = 2, *, settings: Settings | None = None,
          reuse_port: bool = False, threads: int = 4, check_hsm: bool = True, log_level: str = "warning") -> None:
    """Supervisor: migrate, bind, fork ``workers`` workers (each warms its own bounded cache), restart those
    that die."""
    t0 = time.perf_counter()
    _configure_logging(log_level)
    workers = max(1, workers)
    ctx = responder_context(settings, migrate=True)
    ctx.db.dispose()
    if check_hsm:
        _check_hsm_in_child(ctx)
    # Warm one bounded cache here, once, and fork the first workers with it (copy-on-write): they answer
    # from memory as soon as they run, instead of each reading the same rows after the fork (#28: on a
    # busy machine the second worker's warm-up overlapped the first seconds of traffic).
    warm: PresignedCache | None = PresignedCache(ctx)
    assert warm is not None
    warmed = warm.warm()
    warm.close()
    read_engine(ctx.db).dispose()
    ctx.db.dispose()
    sock: socket.socket | None = None
    if reuse_port:
        # Reserve the port (bound, not listening: the kernel gives connections to listening sockets only).
        holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
        port = holder.getsockname()[1]
    else:
        sock = listen_socket(host, port)
        port = sock.getsockname()[1]
    st = ctx.settings
    print(f"v2gpki OCSP/CRL responder on http://{host}:{port} ({workers} workers, each caching at most "
          f"{st.ocsp_cache_entries} pre-signed responses, {warmed} at start; ready in "
          f"{time.perf_counter() - t0:.2f} s)", file=sys.stderr, flush=True)
    parent = os.getpid()
    children: dict[int, float] = {}
    stopping: list[int] = []

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            _child_main(sock, warm, settings, host, port, parent, threads)
        children[pid] = time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(workers):
        spawn()
    warm = None  # the workers have their copies; a replacement warms its own
    quick_deaths = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        log.warning("OCSP worker %d exited (%s); starting another", pid, code)
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < 2 else 0
        if quick_deaths > 5:
            print("v2gpki ocsp-serve: workers keep dying at start; giving up", file=sys.stderr)
            on_signal(signal.SIGTERM, None)
            continue
        time.sleep(min(2.0, 0.1 * 2**quick_deaths))
        spawn()
    if sock is not None:
        sock.close()
    if stopping and stopping[0] == signal.SIGINT:
        raise SystemExit(130)


# ---------------------------------------------------------------------------------------------------
# In-process (tests, embedding): one worker on a thread
# ---------------------------------------------------------------------------------------------------


def start_in_thread(ctx: Context, host: str = "127.0.0.1", port: int = 0, *,
                    poll_seconds: float | None = None, cache_entries: int | None = None,
                    warm_entries: int | None = None) -> tuple[str, FastResponder, Callable[[], None]]:
    """Serve ``ctx`` on a loopback port from a daemon thread (one worker, no fork). Returns
    (base URL, the responder — for its counters —, stop)."""
    cache = PresignedCache(ctx, max_entries=cache_entries, warm_entries=warm_entries)
    if poll_seconds is not None:
        cache.POLL_SECONDS = poll_seconds
    cache.warm()
    cache.start()
    responder = FastResponder(cache)
    sock = listen_socket(host, port)
    bound = sock.getsockname()[1]
    loop = _new_loop()
    stop_event: list[asyncio.Event] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            stop_event.append(asyncio.Event())
            ready.set()
            await _serve_worker(responder, sock, stop=stop_event[0])

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, name="ocsp-fast", daemon=True)
    thread.start()
    ready.wait(10)

    def stop() -> None:
        loop.call_soon_threadsafe(stop_event[0].set)
        thread.join(10)
        cache.stop()
        responder.executor.shutdown(wait=False, cancel_futures=True)
        sock.close()

    return f"http://{host}:{bound}", responder, stop


__all__ = ["FastResponder", "HttpError", "PresignedCache", "decode_get_path", "parse_head", "responder_context",
           "serve", "start_in_thread"]
