"""CRLs (RFC 5280 §5): one full CRL per issuing CA, streamed into DER and signed in the HSM.

Why not cryptography's CertificateRevocationListBuilder: it holds a Python object per entry and copies
the list on every ``add_revoked_certificate`` (quadratic); a CA with a million revoked certificates
would take hours and gigabytes. Here the entries are read from the database in batches (server-side
cursor on PostgreSQL), DER-encoded row by row into a temporary file, and the TBSCertList is assembled
around them once the total length is known. For ECDSA the TBS is hashed while it is read back and the
HSM signs the digest (Prehashed); Ed448 (pure EdDSA, RFC 8032) needs the whole message, so it is read
into memory once. Memory is bounded by the size of the finished CRL (which is stored), not by the
number of Python objects.

Contents (RFC 5280 §5.1): v2; signature = the CA's algorithm (ecdsa-with-SHA256 for P-256 [V2G2-006],
ecdsa-with-SHA512 for P-521, Ed448); issuer = the CA's subject; thisUpdate/nextUpdate (UTCTime through
2049, §5.1.2.4/5); entries with revocationDate and reasonCode (left out for 'unspecified', §5.3.1;
certificateHold for certificates on hold); crlExtensions AKI (keyIdentifier = the CA's SKI, §5.2.1)
and cRLNumber (§5.2.3, strictly increasing: ``ca.crl_number`` is bumped with a guarded UPDATE in the
transaction that stores the CRL, so two generators can never publish the same number).

An entry stays until it has appeared on one regularly scheduled CRL issued after the certificate
expired (§3.3); after that it is dropped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from hsm.algorithms import ALGORITHMS, KeyAlg
from pki.der import REASON_CODES, bit_string, der_header, der_int, der_oid, seq, tlv
from pki.errors import Conflict, CRLUnavailable
from pki.store import crl as store
from pki.store.db import Database, utcnow

if TYPE_CHECKING:
    from pki.config import Settings
    from pki.issuance import Engine


class CrlContext(Protocol):
    """What CRL generation reads of pki.context.Context (a Protocol, so that the Context can hold this
    module's cache and scheduler without an import cycle)."""

    @property
    def engine(self) -> Engine: ...
    @property
    def db(self) -> Database: ...
    @property
    def settings(self) -> Settings: ...

log = logging.getLogger("v2gpki.crl")


_V2 = der_int(1)
_OID_AKI = der_oid("2.5.29.35")
_OID_CRL_NUMBER = der_oid("2.5.29.20")
_OID_REASON = der_oid("2.5.29.21")
# crlEntryExtensions with a reasonCode (non-critical, RFC 5280 §5.3.1), precomputed per code.
_REASON_EXT: dict[int, bytes] = {
    code: seq(seq(_OID_REASON, tlv(0x04, tlv(0x0A, bytes((code,)))))) for code in REASON_CODES.values()
}


def crl_time(dt: datetime) -> bytes:
    # RFC 5280 §5.1.2.4: UTCTime for dates through 2049, GeneralizedTime from 2050.
    dt = dt.astimezone(UTC)
    if dt.year < 2050:
        return tlv(0x17, dt.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode())


def _entry_reason(status: str, reason: str | None) -> int:
    if status == "hold":
        return REASON_CODES["certificateHold"]
    return REASON_CODES.get(reason or "unspecified", 0)


@dataclass(frozen=True)
class CrlInfo:
    issuer: str
    number: int
    this_update: datetime
    next_update: datetime
    entries: int
    size: int
    seconds: float


def generate_crl(ctx: CrlContext, ca_name: str, *, now: datetime | None = None, attempts: int = 5) -> CrlInfo:
    """Build, sign and store a new CRL for ``ca_name``. Returns its metadata (the DER is in ``crl``)."""
    engine = ctx.engine
    h = engine.ca(ca_name)
    signer = engine.ca_signer(h)
    validity = timedelta(hours=ctx.settings.crl_validity_hours)
    for _ in range(attempts):
        t0 = time.perf_counter()
        this_update = (now or utcnow()).replace(microsecond=0)
        next_update = this_update + validity
        n0 = store.crl_number(ctx.db, ca_name)
        number = n0 + 1
        with tempfile.TemporaryFile(prefix="v2gpki-crl-") as spool:
            count, entries_len = _write_entries(ctx.db, ca_name, this_update - validity, spool)
            sigalg = ALGORITHMS[h.alg].sig_alg_der
            prefix = b"".join((_V2, sigalg, h.cert.subject.public_bytes(), crl_time(this_update),
                               crl_time(next_update)))
            # RFC 5280 §5.1.2.6: with no revoked certificates the list is absent, not empty.
            rev_header = der_header(0x30, entries_len) if count else b""
            exts = tlv(0xA0, seq(
                seq(_OID_AKI, tlv(0x04, seq(tlv(0x80, h.ski)))),
                seq(_OID_CRL_NUMBER, tlv(0x04, der_int(number))),
            ))
            tbs_len = len(prefix) + len(rev_header) + entries_len + len(exts)
            tbs_head = der_header(0x30, tbs_len) + prefix + rev_header
            sig = _sign_spooled(signer, h.alg, tbs_head, spool, exts)
            tail = sigalg + bit_string(sig)
            total_inner = len(tbs_head) + entries_len + len(exts) + len(tail)
            out = bytearray(der_header(0x30, total_inner))
            out += tbs_head
            spool.seek(0)
            while chunk := spool.read(1 << 20):
                out += chunk
            out += exts
            out += tail
        if not store.publish(ctx.db, ca_name, previous=n0, number=number, this_update=this_update,
                             next_update=next_update, der=out):
            continue  # another generator published n0+1 meanwhile: rebuild with a fresh number
        size = len(out)
        del out
        info = CrlInfo(ca_name, number, this_update, next_update, count, size, time.perf_counter() - t0)
        log.info("CRL %s #%d: %d entries, %d bytes, %.2fs", ca_name, number, count, size, info.seconds)
        return info
    raise Conflict(f"could not publish a CRL for {ca_name!r}: the CRL number kept moving")


def _write_entries(db: Database, ca_name: str, expired_before: datetime, spool: Any) -> tuple[int, int]:
    """Stream revoked entries into ``spool``; return (count, bytes).

    The hot loop touches no datetime objects: the database renders revocationDate as YYYYMMDDHHMMSS
    (UTC) and each row becomes bytes with a handful of operations (a million rows in seconds)."""
    times: dict[str, bytes] = {}
    exts: dict[tuple[str, str | None], bytes] = {}
    count = 0
    written = 0
    # RFC 5280 §3.3: an entry stays until one scheduled CRL after expiry has carried it
    for part in store.revoked_entries(db, ca_name, expired_before):
        buf: list[bytes] = []
        for serial_hex, ts, status, reason in part:
            raw = bytes.fromhex(serial_hex if len(serial_hex) % 2 == 0 else "0" + serial_hex)
            if raw[0] & 0x80:
                raw = b"\x00" + raw  # positive INTEGER (RFC 5280 §4.1.2.2)
            t = times.get(ts)
            if t is None:
                if len(times) > 200_000:
                    times.clear()
                # RFC 5280 §5.1.2.4 / §5.1.2.6: UTCTime through 2049, GeneralizedTime after
                t = times[ts] = (b"\x17\x0d" + ts[2:].encode() + b"Z" if ts < "2050"
                                 else b"\x18\x0f" + ts.encode() + b"Z")
            ext = exts.get((status, reason))
            if ext is None:
                code = _entry_reason(status, reason)
                ext = exts[(status, reason)] = _REASON_EXT[code] if code else b""
            n = len(raw) + 2 + len(t) + len(ext)  # < 128: serial ≤ 17 octets, time 17, reason 12
            buf.append(bytes((0x30, n, 0x02, len(raw))) + raw + t + ext)
        chunk = b"".join(buf)
        spool.write(chunk)
        written += len(chunk)
        count += len(buf)
    return count, written


def _sign_spooled(signer: Any, alg: KeyAlg, head: bytes, spool: Any, tail: bytes) -> bytes:
    """The signature over head + spooled entries + tail, as the CA's row of the algorithm table
    (hsm/algorithms.py) signs: the digest made while reading back (ECDSA), or the whole message (EdDSA)."""
    spool.seek(0)
    row = ALGORITHMS[alg]
    if row.hashlib_new is None:
        msg = bytearray(head)
        while chunk := spool.read(1 << 20):
            msg += chunk
        msg += tail
        return row.sign(signer, bytes(msg))
    h = row.hashlib_new()
    h.update(head)
    while chunk := spool.read(1 << 20):
        h.update(chunk)
    h.update(tail)
    return row.sign_digest(signer, h.digest())


# ---------------------------------------------------------------------------------------------------
# Reading and serving
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredCrl:
    issuer: str
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes


def latest_meta(db: Database, ca_name: str) -> tuple[int, datetime, datetime] | None:
    return store.latest_meta(db, ca_name)


def load_crl(db: Database, ca_name: str, number: int | None = None) -> StoredCrl | None:
    row = store.load(db, ca_name, number)
    return None if row is None else StoredCrl(ca_name, *row)


class CrlCache:
    """The latest CRL per CA, kept in memory and checked against the database on each request (one
    indexed query), so a CRL published by another process is served at once. One per Context
    (ctx.crl_cache, built in pki/wiring.py)."""

    def __init__(self, context: Callable[[], CrlContext], *, may_generate: bool) -> None:
        self._context = context  # the finished Context (pki/wiring.py hands its Deferred's get)
        self.may_generate = may_generate
        self._cached: dict[str, StoredCrl] = {}
        self._lock = threading.Lock()
        ref = weakref.ref(self)

        def reset_in_child() -> None:  # a lock held by another thread at fork stays held in the child
            me = ref()
            if me is not None:
                me._lock = threading.Lock()

        os.register_at_fork(after_in_child=reset_in_child)

    def get(self, ca_name: str) -> StoredCrl:
        ctx = self._context()
        ctx.engine.ca(ca_name)  # UnknownCA → 404
        meta = latest_meta(ctx.db, ca_name)
        now = utcnow()
        if self.may_generate and (meta is None or meta[2] <= now):
            # None yet, or past nextUpdate (a missed refresh): make one now rather than serve nothing.
            generate_crl(ctx, ca_name)
            meta = latest_meta(ctx.db, ca_name)
        if meta is None:
            raise CRLUnavailable(f"no CRL has been published for {ca_name!r} yet")
        hit = self._cached.get(ca_name)
        if hit is not None and hit.number == meta[0]:
            return hit
        crl = load_crl(ctx.db, ca_name, meta[0]) or load_crl(ctx.db, ca_name)
        if crl is None:
            raise CRLUnavailable(f"no CRL has been published for {ca_name!r} yet")
        with self._lock:
            self._cached[ca_name] = crl
        return crl


class CrlScheduler:
    """Regenerates CRLs after revocations in one background thread, coalescing bursts: a CA marked ten
    times while its CRL is being built gets one more CRL, not ten. The revocation call itself returns
    as soon as its OCSP response is re-signed (a million-entry CRL takes seconds). One per Context
    (ctx.crl_scheduler, marked by the CrlOnRevocation observer of pki/wiring.py).

    The rate is bounded: a CA's next CRL starts no sooner than ``min_interval`` seconds, and no sooner than
    ``DUTY`` times its last generation's duration, after that generation ended. A steady stream of
    revocations (every contract installation supersedes the vehicle's previous certificate, #21 item 2)
    otherwise kept this thread rebuilding and re-signing the same CRL back to back: about a third of the
    CPU of each installation (bench/results/2026-12-08-contract-supersede.md). Revocations stay immediate
    where they are real-time, in OCSP; RFC 5280 §5 CRLs are periodic by design, and one issued up to
    ``min_interval`` later changes nothing for a relying party that fetches it hours apart. The first
    mark after a quiet period still starts at once; :meth:`flush` skips the wait."""

    DUTY = 9.0  # wait 9× the last generation's duration: at most ~10 % of one core on CRLs, whatever their size

    def __init__(self, context: Callable[[], CrlContext], *, min_interval: float = 1.0) -> None:
        self._context = context
        self.min_interval = min_interval
        self._dirty: dict[str, int] = {}  # CA → failed attempts so far
        self._not_before: dict[str, float] = {}  # CA → monotonic time its next generation may start
        self._busy = False
        self._hurry = False  # flush(): generate what is marked now
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self.generations = 0  # CRLs made by this scheduler (tests read it)
        ref = weakref.ref(self)

        def reset_in_child() -> None:  # the parent's thread and condition (and its lock state) stay behind
            me = ref()
            if me is not None:
                me._dirty, me._not_before, me._busy, me._hurry = {}, {}, False, False
                me._cv, me._thread = threading.Condition(), None

        os.register_at_fork(after_in_child=reset_in_child)

    def mark(self, ca_name: str) -> None:
        with self._cv:
            self._dirty.setdefault(ca_name, 0)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="v2gpki-crl", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _next_due(self) -> tuple[str | None, float]:
        """The marked CA whose turn comes first, and how long until then (0: now). Holds ``_cv``."""
        now = time.monotonic()
        best, wait = None, float("inf")
        for ca_name in self._dirty:
            left = 0.0 if self._hurry else max(0.0, self._not_before.get(ca_name, 0.0) - now)
            if left < wait:
                best, wait = ca_name, left
        return best, wait

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    ca_name, wait = self._next_due()
                    if ca_name is not None and wait <= 0:
                        break
                    self._cv.wait(None if ca_name is None else wait)
                failures = self._dirty.pop(ca_name)
                self._busy = True
            started = time.monotonic()
            try:
                generate_crl(self._context(), ca_name)
                self.generations += 1
            except Exception:  # noqa: BLE001 - retried a few times; the periodic refresh catches the rest
                log.warning("CRL generation for %s failed (attempt %d)", ca_name, failures + 1, exc_info=True)
                if failures < 3:
                    time.sleep(min(0.5 * 2**failures, 5.0))
                    with self._cv:
                        self._dirty.setdefault(ca_name, failures + 1)
            finally:
                ended = time.monotonic()
                with self._cv:
                    self._not_before[ca_name] = ended + max(self.min_interval, self.DUTY * (ended - started))
                    self._busy = False
                    if not self._dirty:
                        self._hurry = False
                    self._cv.notify_all()

    def flush(self, timeout: float = 60.0) -> bool:
        """Generate every marked CA's CRL now, without the rate bound's wait, and wait until it is stored
        (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            if self._dirty:
                self._hurry = True
                self._cv.notify_all()
            while self._dirty or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True


class _HasCrls(Protocol):
    @property
    def crl_cache(self) -> CrlCache: ...
    @property
    def crl_scheduler(self) -> CrlScheduler: ...


def cache_for(ctx: _HasCrls) -> CrlCache:
    """The Context's CRL cache (kept for callers; it is ctx.crl_cache)."""
    return ctx.crl_cache


def scheduler_for(ctx: _HasCrls) -> CrlScheduler:
    """The Context's CRL scheduler (kept for callers; it is ctx.crl_scheduler)."""
    return ctx.crl_scheduler


def refresh_crls(ctx: CrlContext, *, margin: timedelta | None = None) -> list[CrlInfo]:
    """Worker entry point: a new CRL for every CA whose latest one is missing or has less than
    ``margin`` (default: half the validity) left before nextUpdate (RFC 5280 §5.1.2.5)."""
    margin = margin if margin is not None else timedelta(hours=ctx.settings.crl_validity_hours) / 2
    horizon = utcnow() + margin
    out = []
    for h in ctx.engine.cas():
        meta = latest_meta(ctx.db, h.name)
        if meta is None or meta[2] <= horizon:
            out.append(generate_crl(ctx, h.name))
    return out


__all__ = ["CrlCache", "CrlInfo", "CrlScheduler", "StoredCrl", "cache_for", "generate_crl", "latest_meta",
           "load_crl", "refresh_crls", "scheduler_for"]
