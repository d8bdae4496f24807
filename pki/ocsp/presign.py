"""Pre-signing (RFC 5019 §4: responses produced ahead of requests): the background pre-signer of newly issued
certificates (its rows are written through pki/store/ocsp.py)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Protocol

from hsm.errors import HSMError
from pki.config import current


class PresignsNew(Protocol):
    """What the presigner calls (pki/ocsp/responder.py's OcspResponder; a Protocol, not an import of it,
    because the responder builds its presigner)."""

    def presign_new(self, issuer: str, serials: Sequence[str]) -> int: ...

log = logging.getLogger("v2gpki.ocsp")


class Presigner:
    """Pre-signs the responses of newly issued certificates in a background thread (RFC 5019 §4:
    responses produced ahead of requests), so an enrollment or a contract installation answers without
    waiting for a second HSM signature and another transaction. Requests arriving first are signed live
    by the responder's fallback.

    Submitting only appends to a list: the thread is not woken per issuance batch (a wake-up per batch,
    under HTTP load several per request, cost more GIL hand-offs and SQLite write transactions than the
    signing itself) but collects what accumulated every PERIOD seconds; :meth:`flush` wakes it at once."""

    PERIOD = current().ocsp_presign_period_ms / 1000

    def __init__(self, responder: PresignsNew) -> None:
        self.responder = responder
        self._cv = threading.Condition()
        self._queue: list[tuple[str, str]] = []
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        ref = weakref.ref(self)

        def reset_in_child() -> None:  # threads do not survive fork
            me = ref()
            if me is not None:
                me._cv, me._queue, me._busy, me._thread, me._pid = threading.Condition(), [], False, None, 0

        os.register_at_fork(after_in_child=reset_in_child)

    def submit(self, items: Iterable[tuple[str, str]]) -> None:
        with self._cv:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="v2gpki-ocsp-presign", daemon=True)
                self._thread.start()
            self._queue.extend(items)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is stored (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._cv.wait(self.PERIOD)  # woken early only by flush()
                    if not self._queue:
                        continue
                batch, self._queue = self._queue[:2000], self._queue[2000:]
                self._busy = True
            try:
                by_issuer: dict[str, list[str]] = {}
                for issuer, serial in batch:
                    by_issuer.setdefault(issuer, []).append(serial)
                for issuer, serials in by_issuer.items():
                    self.responder.presign_new(issuer, serials)
            except HSMError as exc:  # an outage, already logged by the key store: no traceback
                log.warning("pre-signing OCSP responses after issuance failed: %s", type(exc).__name__)
            except Exception:  # noqa: BLE001 - the live fallback or refresh() signs what is missing
                log.warning("pre-signing OCSP responses after issuance failed", exc_info=True)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

