"""Transactional outbox dispatcher: pending `outbox` rows → Celery tasks → marked dispatched.

The rows are written by pki.lifecycle's hooks in the same transaction as the change they announce, so
an event exists if and only if its cause committed. Sending happens after commit, in three places:
right away (a background thread kicked by the engine's after-commit hooks, so an API request never
waits on the broker), every few seconds from beat (`v2gpki.outbox.drain`), and at worker start-up.

If the broker is down, sending fails, the failure is logged and swallowed, and the rows stay pending:
issuance and revocation go on, and the outbox drains when the broker is back. A row is marked
dispatched only after the broker accepted its message; a crash in between re-sends it, which is
harmless because every task is idempotent.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from pki.store.db import Database, utcnow
from pki.store.models import OutboxEvent

if TYPE_CHECKING:
    from pki.context import Context

log = logging.getLogger("v2gpki.outbox")

# Outbox kind → task name (payload passed as keyword arguments).
ROUTES = {
    "revocation": "v2gpki.events.revocation",
    "ca.changed": "v2gpki.truststore.publish",
}

Sender = Callable[[str, dict[str, Any], str], None]  # (task name, kwargs, task id)


def celery_sender(name: str, kwargs: dict[str, Any], task_id: str) -> None:
    from workers.app import app

    _send(app, name, kwargs, task_id)


def _send(app: Any, name: str, kwargs: dict[str, Any], task_id: str) -> None:
    from workers.app import prepare_local_broker

    prepare_local_broker(app)
    # No publish retries here: with the broker down we want to fail fast, keep the row, and move on.
    # ignore_result: no result-backend subscription per message (the API would leak one per event).
    app.send_task(name, kwargs=kwargs, task_id=task_id, retry=False, ignore_result=True)


_APPS: dict[str, Any] = {}
_APPS_LOCK = threading.Lock()


def sender_for(ctx: Context) -> Sender:
    """A sender bound to the broker of this Context's data directory (the embedded broker lives under
    ctx.settings.home, which need not be $V2GPKI_HOME of the process, e.g. in tests)."""
    from workers.app import make_app

    key = str(ctx.settings.home_dir)
    with _APPS_LOCK:
        app = _APPS.get(key)
        if app is None:
            app = _APPS[key] = make_app(ctx.settings.home_dir)

    def send(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        _send(app, name, kwargs, task_id)

    return send


def dispatch_pending(db: Database, send: Sender | None = None, *, limit: int = 500) -> int:
    """Send up to ``limit`` pending rows, oldest first; return how many were dispatched.

    Reads and marks in short transactions and sends in between, so a slow or dead broker never holds a
    database lock (SQLite takes the write lock at BEGIN)."""
    send = send or celery_sender
    o = OutboxEvent.__table__  # type: ignore[attr-defined]
    with db.engine.connect() as conn:
        rows = conn.execute(select(o.c.id, o.c.kind, o.c.payload).where(o.c.dispatched_at.is_(None))
                            .order_by(o.c.id).limit(limit)).all()
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
        with db.session() as s:
            s.execute(update(o).where(o.c.id.in_(sent), o.c.dispatched_at.is_(None)).values(dispatched_at=utcnow()))
            s.commit()
    return len(sent)


def drain(db: Database, send: Sender | None = None, *, limit: int = 500) -> int:
    total = 0
    while True:
        n = dispatch_pending(db, send, limit=limit)
        total += n
        if n < limit:
            return total


class Dispatcher:
    """A background thread that drains the outbox when kicked (after each commit that wrote a row) and
    every ``interval`` seconds while rows are pending. One per process and database."""

    def __init__(self, db: Database, send: Sender | None = None, interval: float = 30.0) -> None:
        self.db, self.send, self.interval = db, send, interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="v2gpki-outbox", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                drain(self.db, self.send)
            except Exception:  # noqa: BLE001 - e.g. database briefly unavailable; next kick retries
                log.warning("outbox drain failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


_DISPATCHERS: weakref.WeakKeyDictionary[Any, Dispatcher] = weakref.WeakKeyDictionary()


def install(ctx: Context, send: Sender | None = None) -> Dispatcher:
    """Dispatch outbox rows right after the engine commits them (API and worker processes)."""
    from pki.lifecycle import lifecycle_of

    d = _DISPATCHERS.get(ctx.engine)
    if d is None:
        d = Dispatcher(ctx.db, send or sender_for(ctx))
        _DISPATCHERS[ctx.engine] = d
        lifecycle_of(ctx).after_commit.append(d.kick)
    return d


__all__ = ["ROUTES", "Dispatcher", "celery_sender", "dispatch_pending", "drain", "install", "sender_for"]
