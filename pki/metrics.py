"""Prometheus metrics of the CA itself: issuances, revocations, HSM signatures and clock agreement.

api/observability.py exposes them on ``/metrics`` (with the HTTP and OCSP request metrics it keeps). They
are fed by observers connected in pki/wiring.py — never by patching the engine or the key store:

* :class:`IssuanceCounter` / :class:`RevocationCounter`: engine observers (pki/observers.py) that count
  only what committed (``after_commit``, or a commit callback of the transaction);
* :class:`HsmSignTimer`: the PKCS#11 key store's sign observer (hsm/pkcs11.py), timing every signature;
* :func:`clock_measured` / :func:`clock_refused`: the clock guard's callbacks (pki/clock.py).

Process-local objects; with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client sums the worker processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from pki.store.db import on_commit

if TYPE_CHECKING:
    from pki.clock import ClockReading
    from pki.observers import Issued
    from pki.store.db import Session
    from pki.store.models import Certificate

ISSUED = Counter("v2gpki_certificates_issued", "Certificates issued (after commit)", ["profile", "issuer"])
REVOKED = Counter("v2gpki_certificates_revoked", "Revocations and holds (after commit)", ["reason"])
HSM_SIGN_LATENCY = Histogram("v2gpki_hsm_sign_duration_seconds", "PKCS#11 sign latency (lock wait included)",
                             ["mechanism"],
                             buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5))
HSM_ERRORS = Counter("v2gpki_hsm_errors", "PKCS#11 operations that failed", ["operation", "error"])
# Clock agreement with the database server (pki/clock.py, #27 item 4): the last measured difference
# (database minus this host) and the signatures refused because it exceeded V2GPKI_MAX_CLOCK_SKEW_SECONDS.
CLOCK_SKEW = Gauge("v2gpki_clock_skew_seconds", "This host's clock compared with the database server's "
                   "(database minus host, seconds; last measurement)", multiprocess_mode="mostrecent")
CLOCK_REFUSALS = Counter("v2gpki_clock_skew_refusals", "Signatures refused because the clocks disagree")


class IssuanceCounter:
    """Counts issued certificates per profile and issuer, once their transaction committed."""

    def in_transaction(self, session: Session, issued: list[Issued]) -> None:
        pass

    def after_commit(self, issued: list[Issued]) -> None:
        for i in issued:
            ISSUED.labels(i.profile, i.issuer).inc()


class RevocationCounter:
    """Counts revocations and holds per reason, once their transaction committed. Counted from inside the
    transaction (a commit callback), because bulk revocation (pki/revocation.py) calls only that half."""

    def in_transaction(self, session: Session, cert: Certificate) -> None:
        reason = str(cert.revocation_reason or "unspecified")
        on_commit(session, lambda: REVOKED.labels(reason).inc())

    def after_commit(self, cert: Certificate) -> None:
        pass


class HsmSignTimer:
    """The key store's sign observer: latency per mechanism, failures per error type."""

    def signed(self, mechanism: str, seconds: float) -> None:
        HSM_SIGN_LATENCY.labels(mechanism).observe(seconds)

    def failed(self, operation: str, exc: BaseException) -> None:
        HSM_ERRORS.labels(operation, type(exc).__name__).inc()


def clock_measured(reading: ClockReading) -> None:
    CLOCK_SKEW.set(reading.skew)


def clock_refused(_reading: ClockReading) -> None:
    CLOCK_REFUSALS.inc()


__all__ = ["CLOCK_REFUSALS", "CLOCK_SKEW", "HSM_ERRORS", "HSM_SIGN_LATENCY", "ISSUED", "REVOKED", "HsmSignTimer",
           "IssuanceCounter", "RevocationCounter", "clock_measured", "clock_refused"]
