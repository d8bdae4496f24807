"""Where an answer for one CertID comes from: a chain of sources, asked in order, the first answer wins.

Like the ``Source`` interface of Boulder's OCSP responder, each source has one method,
:meth:`Source.response`, which returns an answer or None ("not here, or not fresh: ask the next one"):

1. :class:`MemorySource` — pre-signed responses held in memory (``v2gpki ocsp-serve``'s bounded cache,
   kept current by its poller; api/ocsp_fast.py);
2. :class:`StoredSource` — the stored pre-signed response (table ``ocsp_response``), read with the
   certificate's current status by one indexed join;
3. :class:`LiveSource` — signs now (the CA's delegated OCSP signer in the HSM) and stores the SHA-1 form.

Whether a stored or cached response may be served is decided by ONE rule, :func:`fresh_until`, used by
every source and by ocsp-serve's poller.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from pki.ocsp.response import Answer
from pki.store.ocsp import DatabaseUnavailable, StatusRow

if TYPE_CHECKING:
    from pki.ocsp.signers import _Issuer

__all__ = ["Chain", "DatabaseUnavailable", "LiveSource", "MemorySource", "Query", "Source", "StoredSource",
           "fresh_until", "is_fresh", "wanted_status"]

K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


_STATUS_OF = {"valid": "good", "revoked": "revoked", "hold": "hold"}


def wanted_status(cert_status: str) -> str:
    """The OCSP status a certificate row calls for: good | revoked | hold (anything unknown: revoked)."""
    return _STATUS_OF.get(cert_status, "revoked")


# ---------------------------------------------------------------------------------------------------
# The one freshness rule
# ---------------------------------------------------------------------------------------------------


def fresh_until(*, stored_status: str | None, this_update: datetime | None, next_update: datetime | None,
                want: str, revoked_at: datetime | None, signer_since: datetime,
                margin: timedelta) -> datetime | None:
    """Until when a stored (or cached) response may be served as it is; None: never (re-sign it).

    A response is served only while it says what the certificate's row says now (``want``: good, revoked
    or hold), was made by the current delegated signer (not before ``signer_since``, RFC 6960 §4.2.2.2),
    was made after the revocation it reports, and has at least ``margin`` (half the validity) left before
    its nextUpdate (RFC 5019 §4: refreshed well before it expires; chargers refresh about weekly)."""
    if stored_status is None or this_update is None or next_update is None:
        return None
    if stored_status != want or this_update < signer_since:
        return None
    if want != "good" and (revoked_at is None or this_update < revoked_at):
        return None
    return next_update - margin


def is_fresh(until: datetime | None, now: datetime) -> bool:
    return until is not None and now <= until


# ---------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Query:
    """One CertID to answer (no nonce), for an issuer we serve with a current signer."""

    issuer: _Issuer
    alg: str  # the CertID's hash algorithm: the answer uses it
    certid: bytes  # the CertID DER as asked (echoed)
    serial: int
    now: datetime
    lookup: Callable[[str, str], StatusRow | None]  # (issuer, serial hex) → row (pki/store/ocsp.py)
    margin: timedelta  # half the validity: what a response must have left to be served
    _row: StatusRow | None = field(default=None)
    _looked: bool = False

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x") if self.serial > 0 else ""

    def row(self) -> StatusRow | None:
        """The certificate's status and stored response, read at most once per query."""
        if not self._looked:
            self._row = self.lookup(self.issuer.name, self.serial_hex) if self.serial > 0 else None
            self._looked = True
        return self._row

    def stored_until(self) -> datetime | None:
        """:func:`fresh_until` of the stored response (None: none, or not servable)."""
        row = self.row()
        signer = self.issuer.signer
        if row is None or row.der is None or signer is None:
            return None
        return fresh_until(stored_status=row.stored_status, this_update=row.this_update,
                           next_update=row.next_update, want=wanted_status(row.cert_status),
                           revoked_at=row.revoked_at, signer_since=signer.not_before, margin=self.margin)


class Source(Protocol):
    def response(self, q: Query) -> Answer | None:
        """The answer for ``q``, or None: not here, or not fresh — the next source is asked."""
        ...


class Chain:
    """Sources asked in order; the first answer wins."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = tuple(sources)

    def response(self, q: Query) -> Answer | None:
        for source in self.sources:
            ans = source.response(q)
            if ans is not None:
                return ans
        return None


Entry = tuple[Answer, float]  # an answer and the epoch second until which it may be served


class MemorySource:
    """Pre-signed responses in memory, keyed by the canonical SHA-1 CertID DER (hash parameters NULL,
    minimal serial): ``entries`` maps it to (answer, epoch second until which :func:`fresh_until` allows
    it), least recently used first. Filled, bounded and kept current by its owner (ocsp-serve's
    PresignedCache and its poller, api/ocsp_fast.py); read without locks (single dict operations)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()

    def get(self, key: bytes, now: float) -> Answer | None:
        """The answer cached under ``key`` if it may still be served at epoch ``now``."""
        e = self.entries.get(key)
        if e is None or now >= e[1]:
            return None
        try:
            self.entries.move_to_end(key)  # least recently used goes first
        except KeyError:  # dropped by the poller meanwhile: the answer was current a moment ago
            pass
        return e[0]

    def response(self, q: Query) -> Answer | None:
        if q.alg != "sha1" or q.serial <= 0:
            return None
        nh, kh = q.issuer.hashes["sha1"]
        from pki.ocsp.request import certid_der

        return self.get(certid_der("sha1", nh, kh, q.serial), q.now.timestamp())


SignOne = Callable[["_Issuer", bytes, str, "datetime | None", "str | None"], tuple[bytes, datetime, datetime]]


class StoredSource:
    """The stored pre-signed response, when :func:`fresh_until` allows it. CertIDs with another hash
    algorithm than the stored SHA-1 one are answered from ``derived`` (re-signed from the stored response by
    :class:`LiveSource`, keyed by it, so a new stored response makes a new one); unknown serials from
    ``unknown``."""

    def __init__(self, derived: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]],
                 unknown: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]]) -> None:
        self.derived = derived
        self.unknown = unknown

    def response(self, q: Query) -> Answer | None:
        row = q.row()
        if row is None:
            hit = self.unknown.get((q.issuer.name, q.certid))
            if hit is None or not is_fresh(hit[2] - q.margin, q.now):
                return None
            return Answer(hit[0], "successful", "unknown", hit[1], hit[2], cacheable=True)
        if not is_fresh(q.stored_until(), q.now):
            return None
        assert row.der is not None and row.this_update is not None and row.next_update is not None
        cert_status = "good" if wanted_status(row.cert_status) == "good" else "revoked"
        if q.alg == "sha1":
            return Answer(row.der, "successful", cert_status, row.this_update, row.next_update, cacheable=True)
        hit = self.derived.get((q.alg, row.der))
        if hit is None or not is_fresh(hit[2] - q.margin, q.now):
            return None
        return Answer(hit[0], "successful", cert_status, hit[1], hit[2], cacheable=True)


class LiveSource:
    """Signs now. An unknown serial: 'unknown', kept in ``unknown``. A known one: the SHA-1 response is
    re-signed from the certificate's status and stored unless the stored one is fresh; another hash
    algorithm is then signed from it and kept in ``derived``. ``spend`` charges a live signature to the
    client (pki/ocsp/budget.py); re-signing a stale stored response is not charged (one per certificate,
    then stored)."""

    def __init__(self, sign_one: SignOne, store: Callable[[Query, str, bytes, datetime, datetime], None],
                 spend: Callable[[], None], certid: Callable[[str, bytes, bytes, int], bytes],
                 derived: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]],
                 unknown: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]]) -> None:
        self.sign_one, self.store, self.spend, self.certid = sign_one, store, spend, certid
        self.derived, self.unknown = derived, unknown

    def response(self, q: Query) -> Answer | None:
        iss = q.issuer
        row = q.row()
        if row is None:
            self.spend()  # any serial can be asked for: each new one is a signature
            hit = self.sign_one(iss, q.certid, "unknown", None, None)
            self.unknown.put((iss.name, q.certid), hit)
            return Answer(hit[0], "successful", "unknown", hit[1], hit[2], cacheable=True)
        want = wanted_status(row.cert_status)
        if is_fresh(q.stored_until(), q.now):
            assert row.der is not None and row.this_update is not None and row.next_update is not None
            der1, this, nxt = row.der, row.this_update, row.next_update
        else:
            nh, kh = iss.hashes["sha1"]
            der1, this, nxt = self.sign_one(iss, self.certid("sha1", nh, kh, q.serial), want, row.revoked_at,
                                            row.reason)
            self.store(q, want, der1, this, nxt)
        cert_status = "good" if want == "good" else "revoked"
        if q.alg == "sha1":
            return Answer(der1, "successful", cert_status, this, nxt, cacheable=True)
        key = (q.alg, der1)
        got = self.derived.get(key)
        if got is None or not is_fresh(got[2] - q.margin, q.now):
            self.spend()
            nh, kh = iss.hashes[q.alg]
            got = self.sign_one(iss, self.certid(q.alg, nh, kh, q.serial), want, row.revoked_at, row.reason)
            self.derived.put(key, got)
        return Answer(got[0], "successful", cert_status, got[1], got[2], cacheable=True)
