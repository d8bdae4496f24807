"""The Celery side of the transactional outbox (pki/outbox.py): send pending rows as Celery tasks.

pki/outbox.py writes the rows (engine observers, in the changing transaction) and owns the dispatcher
thread; this module gives it a sender bound to this process's broker. ``install(ctx)`` starts the
Context's dispatcher (API and worker processes); ``drain`` is what beat runs every few seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pki import outbox
from pki.outbox import ROUTES, Dispatcher, Sender
from pki.store.db import Database

if TYPE_CHECKING:
    from pki.context import Context


def celery_sender(name: str, kwargs: dict[str, object], task_id: str) -> None:
    from workers.app import app, send_task

    send_task(app, name, kwargs, task_id)


def sender_for(ctx: Context) -> Sender:
    """A sender bound to the broker of this Context's data directory (workers/app.py)."""
    from workers.app import sender_for as app_sender_for

    return app_sender_for(ctx.settings.home_dir)


def dispatch_pending(db: Database, send: Sender | None = None, *, limit: int = 500) -> int:
    """pki.outbox.dispatch_pending through the Celery broker unless told otherwise."""
    return outbox.dispatch_pending(db, send or celery_sender, limit=limit)


def drain(db: Database, send: Sender | None = None, *, limit: int = 500) -> int:
    return outbox.drain(db, send or celery_sender, limit=limit)


def install(ctx: Context, send: Sender | None = None) -> Dispatcher:
    """Start the Context's dispatcher (pki/wiring.py built it): rows go to the broker right after the
    engine commits them (API and worker processes)."""
    ctx.outbox.start(send or sender_for(ctx))
    return ctx.outbox


__all__ = ["ROUTES", "Dispatcher", "celery_sender", "dispatch_pending", "drain", "install", "sender_for"]
