"""Transactional outbox: events written in the transaction of the change they announce, sent after commit.

An event row exists if and only if its cause committed (the engine's observers write it inside the
issuing or revoking transaction: :class:`OutboxOnIssuance`, :class:`OutboxOnRevocation`, connected in
pki/wiring.py). Sending happens after commit, in three places: right away (the :class:`Dispatcher`
thread, kicked by the same observers, so an API request never waits on the broker), every few seconds
from beat (``v2gpki.outbox.drain``), and at worker start-up. The Celery sender is workers/outbox.py's.

If the broker is down, sending fails, the failure is logged and swallowed, and the rows stay pending:
issuance and revocation go on, and the outbox drains when the broker is back. A row is marked
dispatched only after the broker accepted its message; a crash in between re-sends it, which is
harmless because every task is idempotent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography import x509

from pki.errors import PKIError
from pki.profiles import ProfileSet
from pki.store import outbox as store_outbox
from pki.store.db import Database, Session

if TYPE_CHECKING:
    from pki.observers import Issued
    from pki.store.models import Certificate

log = logging.getLogger("v2gpki.outbox")

# Outbox kind → task name (payload passed as keyword arguments).
ROUTES = {
    "revocation": "v2gpki.events.revocation",
    "ca.changed": "v2gpki.truststore.publish",
}

Sender = Callable[[str, dict[str, Any], str], None]  # (task name, kwargs, task id)


def add_outbox(s: Session, kind: str, payload: dict[str, Any]) -> None:
    """An event row in the caller's transaction (committed with it, or not at all)."""
    store_outbox.add(s, kind, payload)


# -- the engine's observers --------------------------------------------------------------------------------


class OutboxOnIssuance:
    """A new CA certificate (init, rollover, cross-certificate) writes a ``ca.changed`` event — trust
    lists and station trust stores must change — in the issuing transaction; after commit the dispatcher
    sends it."""

    def __init__(self, profiles: ProfileSet, dispatcher: Dispatcher) -> None:
        self.profiles = profiles  # every profile this process's engines issue, lifecycle ones included
        self.dispatcher = dispatcher

    def in_transaction(self, session: Session, issued: list[Issued]) -> None:
        cas = [i for i in issued if self._is_ca(i)]
        if cas:
            add_outbox(session, "ca.changed", {
                "cas": [{"issuer": i.issuer, "serial": i.serial, "profile": i.profile,
                         "subject": i.cert.subject.rfc4514_string()} for i in cas],
                "change": "added"})

    def after_commit(self, issued: list[Issued]) -> None:
        if any(self._is_ca(i) for i in issued):  # only CA changes wrote an outbox row
            kick(self.dispatcher)

    def _is_ca(self, i: Issued) -> bool:
        """From its profile (the engine built BasicConstraints from it), parsing the extensions only for a
        profile this process does not know."""
        try:
            return self.profiles.get(i.profile).ca
        except PKIError:
            return is_ca_cert(i.cert)


class OutboxOnRevocation:
    """Every revocation or hold writes a ``revocation`` event (webhooks, e-mails), and a revoked CA also
    ``ca.changed``, in the revoking transaction; after commit the dispatcher sends them."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def in_transaction(self, session: Session, cert: Certificate) -> None:
        add_outbox(session, "revocation", {
            "issuer": cert.issuer, "serial": cert.serial, "profile": cert.profile, "tenant": cert.tenant,
            "identifier": cert.identifier, "status": cert.status, "reason": cert.revocation_reason,
            "revoked_at": cert.revoked_at.isoformat() if cert.revoked_at else None})
        if is_ca_cert(x509.load_der_x509_certificate(cert.der)):
            add_outbox(session, "ca.changed", {
                "cas": [{"issuer": cert.issuer, "serial": cert.serial, "profile": cert.profile,
                         "subject": cert.subject}], "change": "revoked"})

    def after_commit(self, cert: Certificate) -> None:
        kick(self.dispatcher)


def kick(dispatcher: Dispatcher) -> None:
    try:
        dispatcher.kick()
    except Exception:  # noqa: BLE001 - the outbox row is committed; beat drains it later
        log.warning("outbox kick failed", exc_info=True)


def is_ca_cert(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# -- sending -----------------------------------------------------------------------------------------------


def dispatch_pending(db: Database, send: Sender, *, limit: int = 500) -> int:
    """Send up to ``limit`` pending rows, oldest first; return how many were dispatched.

    Reads and marks in short transactions and sends in between, so a slow or dead broker never holds a
    database lock (SQLite takes the write lock at BEGIN)."""
    rows = store_outbox.pending(db, limit)
    sent: list[int] = []
    try:
        for rid, kind, payload in rows:
            task = ROUTES.get(kind)
            if task is not None:
                kwargs = {"reason": f"outbox {kind} #{rid}", "event": payload} if kind == "ca.changed" \
                    else {"event": payload}
                send(task, kwargs, f"outbox-{rid}")
            sent.append(rid)  # kinds without a consumer are marked too, or they would clog the backlog
    except Exception as exc:  # noqa: BLE001 - broker down: keep the rest pending, the API keeps working
        log.warning("outbox: broker unavailable (%s: %s); %d event(s) stay pending",
                    type(exc).__name__, exc, len(rows) - len(sent))
    if sent:
        store_outbox.mark_dispatched(db, sent)
    return len(sent)


def drain(db: Database, send: Sender, *, limit: int = 500) -> int:
    total = 0
    while True:
        n = dispatch_pending(db, send, limit=limit)
        total += n
        if n < limit:
            return total


class Dispatcher:
    """A background thread that drains the outbox when kicked (after each commit that wrote a row) and
    every ``interval`` seconds while rows are pending. One per Context (pki/wiring.py builds it), idle
    until a process that can reach the broker starts it with its sender (the API and the workers:
    workers/outbox.py ``install``); beat's periodic drain covers the others."""

    def __init__(self, db: Database, send: Sender | None = None, interval: float = 30.0) -> None:
        self.db, self.send, self.interval = db, send, interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, send: Sender) -> None:
        """Send through ``send`` from now on (kicks before this did nothing: the rows wait for a drain)."""
        with self._lock:
            self.send = send
            self._stop.clear()

    def kick(self) -> None:
        if self.send is None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="v2gpki-outbox", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            send = self.send
            if self._stop.is_set() or send is None:
                return
            try:
                drain(self.db, send)
            except Exception:  # noqa: BLE001 - e.g. database briefly unavailable; next kick retries
                log.warning("outbox drain failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


__all__ = ["ROUTES", "Dispatcher", "OutboxOnIssuance", "OutboxOnRevocation", "Sender", "add_outbox", "dispatch_pending",
           "drain", "is_ca_cert"]
