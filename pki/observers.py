"""What the engine tells the rest of the system about an issuance or a revocation.

The engine (pki/issuance.py) knows nothing of OCSP, CRLs, the outbox or metrics: it is given, once, at
construction, a tuple of observers and calls each of them, in that order, at two points of every
change:

* ``in_transaction`` — inside the transaction that stores the change, before it commits. What an
  observer writes there (an outbox row) commits or rolls back with the certificate; an exception
  rolls the whole change back (no certificate row, no revocation).
* ``after_commit`` — once the change is durable. An observer must not raise here (the change stands
  whatever it does): it logs and leaves the rest to a periodic job (OCSP refresh, CRL refresh, outbox
  drain).

pki/wiring.py builds the tuples and lists, in order and with a comment each, everything that happens
around an issuance or a revocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

if TYPE_CHECKING:
    from pki.store.db import Session
    from pki.store.models import Certificate


@dataclass(frozen=True, slots=True)
class Issued:
    """One certificate the engine issued (what Engine.issue returns and issuance observers are given).
    Frozen: every observer of a batch sees the same value."""

    cert: x509.Certificate
    der: bytes
    serial: str
    issuer: str
    profile: str
    chain: list[x509.Certificate] = field(default_factory=list)  # issuing CA up to root

    def pem_chain(self, include_root: bool = True) -> str:
        certs = [self.cert, *self.chain]
        if not include_root and self.chain:
            certs = certs[:-1] if certs[-1].issuer == certs[-1].subject else certs
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


class IssuanceObserver(Protocol):
    """Told about every batch of certificates the engine issues."""

    def in_transaction(self, session: Session, issued: list[Issued]) -> None:
        """Inside the issuing transaction, before it commits (ORM rows added here are flushed with the
        certificate rows; on PostgreSQL they travel in the same round trip as the COMMIT)."""

    def after_commit(self, issued: list[Issued]) -> None:
        """After the certificates committed; must not raise."""


class RevocationObserver(Protocol):
    """Told about every status change: a revocation or hold (both calls) and a released hold
    (``after_commit`` only: removeFromCRL writes no event, but OCSP and the CRL must change)."""

    def in_transaction(self, session: Session, cert: Certificate) -> None:
        """Inside the revoking transaction (``cert`` carries its new status, not yet committed)."""

    def after_commit(self, cert: Certificate) -> None:
        """After the new status committed; must not raise."""


T = TypeVar("T")


class Deferred(Generic[T]):
    """A value the composition root sets once, after the observers that need it were built.

    The engine takes its observers at construction, but some observers act through the finished Context
    (the CRL scheduler and cache and the CPS caches, which reach CA keys through ctx.engine):
    pki/wiring.py hands them a Deferred[Context] and sets it before build_context returns. Observers run
    only after an issuance or a revocation, so never before it is set."""

    def __init__(self) -> None:
        self._value: T | None = None

    def set(self, value: T) -> None:
        if self._value is not None:
            raise RuntimeError("already set")
        self._value = value

    def get(self) -> T:
        if self._value is None:
            raise RuntimeError("used before the composition root finished (pki/wiring.py)")
        return self._value


__all__ = ["Deferred", "IssuanceObserver", "Issued", "RevocationObserver"]
