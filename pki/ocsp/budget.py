"""The live-signing budget: what unauthenticated clients can make the HSM sign."""

from __future__ import annotations

import threading
import time


class SignBudget:
    """How many live OCSP signatures requests may cause: a token bucket per client address (``rate`` per
    second, ``burst``) and one for the whole process (``total_rate``, burst one second's worth; 0 = no
    process-wide bound). Requests with a nonce, several CertIDs, an unknown serial or a CertID hash
    algorithm not signed yet draw on it; re-signing a stored response that went stale does not (bounded by
    the number of certificates: it is stored and served afterwards). Thread-safe; bounded memory."""

    MAX_CLIENTS = 20_000  # buckets kept; beyond that the full ones (idle clients) are dropped first

    def __init__(self, rate: float, burst: int, total_rate: float) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self.total_rate = total_rate
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._total = (max(1.0, total_rate), time.monotonic())
        self.refused = 0

    def take(self, client: str | None) -> bool:
        """One live signature for ``client`` (None: an internal or authenticated caller, never limited)."""
        if client is None or self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            t_tokens, t_at = self._total
            if self.total_rate > 0:
                t_tokens = min(max(1.0, self.total_rate), t_tokens + (now - t_at) * self.total_rate)
            if tokens < 1.0 or (self.total_rate > 0 and t_tokens < 1.0):
                self._buckets[client] = (tokens, now)
                self._total = (t_tokens, now)
                self.refused += 1
                return False
            if len(self._buckets) >= self.MAX_CLIENTS and client not in self._buckets:
                self._prune(now)
            self._buckets[client] = (tokens - 1.0, now)
            self._total = (t_tokens - 1.0, now)
            return True

    def _prune(self, now: float) -> None:
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) >= self.MAX_CLIENTS:
            self._buckets.clear()  # a flood of addresses: forget them all (the process-wide bound stays)


class _OverBudget(Exception):
    """A live signature the client's budget does not allow (SignBudget)."""

