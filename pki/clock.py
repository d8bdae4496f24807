"""Clock agreement with the database server (#27 item 4).

Every time the service writes into a certificate (notBefore/notAfter, RFC 5280 §4.1.2.5), an OCSP response
(thisUpdate/nextUpdate, RFC 6960 §4.2.2.1) or a firmware signature record comes from this host's clock. A
host whose clock has drifted signs certificates that are not yet valid, or already expired, for every
relying party with a correct clock. The database server is a second, independent clock that every replica
of the service shares: the guard compares the two at start and at most every ``interval`` seconds after
that (lazily, on the signing path, and on every /metrics scrape), and refuses to sign while they differ by
more than ``max_skew`` seconds (V2GPKI_MAX_CLOCK_SKEW_SECONDS).

PostgreSQL only: ``SELECT now()`` in its own transaction, the round trip's half subtracted from the
difference so a slow network is never mistaken for skew. SQLite is a file on this host and has no clock
of its own: nothing to compare, never refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from pki.errors import ClockSkew
from pki.store.db import Database

log = logging.getLogger("v2gpki.clock")

LocalClock = Callable[[], float]  # seconds since the epoch (time.time)
DbClock = Callable[[], datetime]  # the database server's current time (aware)


@dataclass(frozen=True)
class ClockReading:
    skew: float  # database minus this host, seconds (positive: this host runs behind)
    uncertainty: float  # half the query's round trip
    at: float  # monotonic time of the measurement

    def exceeds(self, bound: float) -> bool:
        return abs(self.skew) - self.uncertainty > bound


class ClockGuard:
    """Compares this host's clock with the database server's; ``require()`` raises ClockSkew when they
    disagree by more than ``max_skew`` seconds. Thread-safe; the query runs at most once per ``interval``."""

    def __init__(self, db: Database, *, max_skew: float = 60.0, interval: float = 60.0,
                 clock: LocalClock = time.time, db_clock: DbClock | None = None,
                 on_measure: Sequence[Callable[[ClockReading], None]] = (),
                 on_refuse: Sequence[Callable[[ClockReading], None]] = ()) -> None:
        self.db = db
        self.max_skew = max_skew
        self.interval = interval
        self.clock = clock
        self.db_clock = db_clock if db_clock is not None else self._query_db_clock
        self.applies = db.engine.dialect.name == "postgresql"
        self.last: ClockReading | None = None
        self._lock = threading.Lock()
        # Told each measurement / refusal (metrics: pki/metrics.py, connected in pki/wiring.py).
        self.on_measure: tuple[Callable[[ClockReading], None], ...] = tuple(on_measure)
        self.on_refuse: tuple[Callable[[ClockReading], None], ...] = tuple(on_refuse)

    def _query_db_clock(self) -> datetime:
        return self.db.server_now()

    def measure(self) -> ClockReading | None:
        """A fresh comparison (None on SQLite, or when the database cannot be asked: the database error
        then surfaces on the signing path itself, with its own status)."""
        if not self.applies:
            return None
        try:
            t0 = self.clock()
            server = self.db_clock()
            t1 = self.clock()
        except Exception as exc:  # noqa: BLE001 - the check must not turn a database outage into a skew error
            log.warning("clock check: could not read the database time (%s)", type(exc).__name__)
            return None
        reading = ClockReading(skew=server.timestamp() - (t0 + t1) / 2, uncertainty=max(0.0, (t1 - t0) / 2),
                               at=time.monotonic())
        self.last = reading
        if reading.exceeds(self.max_skew):
            log.error("clock check: this host's clock differs from the database server's by %.1f s "
                      "(bound %.0f s, V2GPKI_MAX_CLOCK_SKEW_SECONDS): signing refused until they agree",
                      reading.skew, self.max_skew)
        for hook in self.on_measure:
            hook(reading)
        return reading

    def current(self) -> ClockReading | None:
        """The last reading, measured again if older than ``interval``."""
        if not self.applies:
            return None
        r = self.last
        if r is not None and time.monotonic() - r.at < self.interval:
            return r
        with self._lock:
            r = self.last
            if r is not None and time.monotonic() - r.at < self.interval:
                return r
            return self.measure()

    def require(self) -> None:
        """Raise ClockSkew (HTTP 503 with Retry-After, CLI exit 6) while the clocks disagree."""
        r = self.current()
        if r is None or not r.exceeds(self.max_skew):
            return
        for hook in self.on_refuse:
            hook(r)
        behind = "behind" if r.skew > 0 else "ahead of"
        raise ClockSkew(
            f"refusing to sign: this host's clock runs {abs(r.skew):.0f} s {behind} the database server's "
            f"(bound {self.max_skew:.0f} s, V2GPKI_MAX_CLOCK_SKEW_SECONDS); fix time synchronisation (NTP)",
            skew_seconds=round(r.skew, 3), retry_after=max(1, int(self.interval)))


__all__ = ["ClockGuard", "ClockReading"]
