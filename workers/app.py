"""The Celery application (``workers.app:app`` — also what Flower and ``celery -A workers.app`` load).

Broker and result backend come from ``V2GPKI_BROKER_URL`` (Redis in production). Unset, the embedded
single-machine broker is kombu's *filesystem* transport under ``$V2GPKI_HOME/broker`` — no server to
install, works with one worker and one beat on the same machine (tests/test_workers.py runs it).

Reliability choices (after warehouse's Celery setup):
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its task
  returns, so a worker killed mid-task (SIGKILL, OOM) leaves it to be redelivered; every task is
  idempotent, keyed by what it produces (unique constraints in the database).
* The database, not the broker, is the source of truth: outbox rows, alerts, deliveries with their
  retry schedule. Beat re-drives all of it periodically, so a broker that lost its data loses nothing.
* The Context (database pool, PKCS#11 library, session, login) is built in each worker *process*
  (``worker_process_init``) and rebuilt if the PID changes: SoftHSM does not notice fork, so PKCS#11
  state must never be inherited (shared architecture notes, "Fork").
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import import_modules, worker_init, worker_process_init, worker_process_shutdown, worker_ready

from pki.config import Settings
from pki.lifecycle_policy import LifecycleSettings

if TYPE_CHECKING:
    from pki.context import Context

log = logging.getLogger("v2gpki.workers")


def broker_config(home: Path | None = None) -> dict[str, Any]:
    ls = LifecycleSettings.from_settings(Settings())
    s = Settings()
    home = home or s.home_dir
    url = ls.broker_url
    conf: dict[str, Any] = {}
    if url:
        conf["broker_url"] = url
        conf["result_backend"] = s.result_backend or url
        if url.startswith(("redis://", "rediss://")):
            # Redis redelivers an unacknowledged message after the visibility timeout: keep it above the
            # longest task. Retries are scheduled in the database, never as long broker countdowns.
            conf["broker_transport_options"] = {
                "visibility_timeout": s.broker_visibility_timeout,
                # How often an idle worker looks for messages a dead worker left unacknowledged.
                "unacked_restore_interval": s.broker_restore_interval,
                "unacked_restore_throttle": s.broker_restore_throttle,
                "socket_connect_timeout": 5, "socket_timeout": 30,
            }
            conf["result_backend_transport_options"] = {"socket_connect_timeout": 5}
            conf["redis_socket_connect_timeout"] = 5
    else:
        base = home / "broker"  # folders created by prepare_local_broker() when a process uses them
        conf["broker_url"] = "filesystem://"
        conf["broker_transport_options"] = {
            "data_folder_in": str(base / "queue"), "data_folder_out": str(base / "queue"),
            "processed_folder": str(base / "processed"), "store_processed": False,
            "control_folder": str(base / "control"),
        }
        conf["result_backend"] = s.result_backend or f"file://{base / 'results'}"
    return conf


def beat_schedule() -> dict[str, dict[str, Any]]:
    s = Settings()
    out: dict[str, dict[str, Any]] = {
        "outbox-drain": {"task": "v2gpki.outbox.drain", "schedule": timedelta(seconds=s.outbox_drain_seconds)},
        "deliveries-sweep": {"task": "v2gpki.deliveries.sweep",
                             "schedule": timedelta(seconds=s.delivery_sweep_seconds)},
        "expiry-scan": {"task": "v2gpki.expiry.scan", "schedule": timedelta(seconds=s.expiry_scan_seconds)},
        "renewal": {"task": "v2gpki.renewal.run", "schedule": timedelta(seconds=s.renewal_seconds)},
        "truststore-check": {"task": "v2gpki.truststore.publish",
                             "schedule": timedelta(seconds=s.truststore_check_seconds),
                             "kwargs": {"reason": "scheduled check"}},
        "crl-refresh": {"task": "v2gpki.crl.refresh", "schedule": timedelta(seconds=s.crl_refresh_seconds)},
        "ocsp-refresh": {"task": "v2gpki.ocsp.refresh", "schedule": timedelta(seconds=s.ocsp_refresh_seconds)},
    }
    # #21 item 7: the audit chain head signed by the HSM and recorded outside the database periodically
    cp = s.audit_checkpoint_seconds
    if cp > 0:
        out["audit-checkpoint"] = {"task": "v2gpki.audit.checkpoint", "schedule": timedelta(seconds=cp)}
    return out


def make_app(home: Path | None = None) -> Celery:
    """The Celery app; ``home`` places the embedded broker (default: $V2GPKI_HOME)."""
    ls = LifecycleSettings.from_settings(Settings())
    home = home or Settings().home_dir
    a = Celery("v2gpki", include=["workers.tasks"])
    a.conf.update(
        broker_config(home),
        task_default_queue=ls.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,  # state lives in the database tables, not in results
        task_track_started=False,
        worker_prefetch_multiplier=1,  # with acks_late: a dying worker strands at most one message
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(),
        beat_schedule_filename=str(home / "celerybeat-schedule"),
        task_time_limit=Settings().task_time_limit,
        task_soft_time_limit=Settings().task_soft_time_limit,
    )
    return a


def prepare_local_broker(a: Celery) -> None:
    """The embedded filesystem broker needs its folders (kombu does not create them)."""
    if str(a.conf.broker_url).startswith("filesystem"):
        opts = a.conf.broker_transport_options or {}
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            if opts.get(key):
                Path(opts[key]).mkdir(parents=True, exist_ok=True)
        backend = str(a.conf.result_backend or "")
        if backend.startswith("file://"):
            Path(backend[len("file://"):]).mkdir(parents=True, exist_ok=True)


app = make_app()


# -- sending outbox events (pki/outbox.py's Dispatcher and drain call these through workers/outbox.py) ------


def send_task(app: Celery, name: str, kwargs: dict[str, Any], task_id: str) -> None:
    prepare_local_broker(app)
    # No publish retries here: with the broker down we want to fail fast, keep the row, and move on.
    # ignore_result: no result-backend subscription per message (the API would leak one per event).
    app.send_task(name, kwargs=kwargs, task_id=task_id, retry=False, ignore_result=True)


_APPS: dict[str, Celery] = {}
_APPS_LOCK = threading.Lock()


def sender_for(home: Path) -> Callable[[str, dict[str, Any], str], None]:
    """A sender bound to the broker of this data directory (the embedded broker lives under it, which need
    not be $V2GPKI_HOME of the process, e.g. in tests)."""
    key = str(home)
    with _APPS_LOCK:
        bound = _APPS.get(key)
        if bound is None:
            bound = _APPS[key] = make_app(home)

    def send(name: str, kwargs: dict[str, Any], task_id: str) -> None:
        send_task(bound, name, kwargs, task_id)

    return send

# -- one Context per worker process -------------------------------------------------------------------------

_CTX: Context | None = None
_CTX_PID: int | None = None
_CTX_LOCK = threading.Lock()


def ctx() -> Context:
    """This process's Context: built on first use, rebuilt after a fork (never inherited)."""
    global _CTX, _CTX_PID
    with _CTX_LOCK:
        if _CTX is None or _CTX_PID != os.getpid():
            from pki.wiring import build_context

            _CTX = build_context(Settings(), migrate=False)
            _CTX_PID = os.getpid()
            _CTX.outbox.start(sender_for(_CTX.settings.home_dir))  # events this worker's tasks cause
        return _CTX


@import_modules.connect
def _broker_folders(sender: Any = None, **_: Any) -> None:
    """Beat and worker, `v2gpki` or `celery` (both start the loader, ``loader.init_worker``, before they
    touch the broker or the result backend): the embedded broker's folders.
    ``beat_init`` was too late — beat builds its scheduler, and with it the file:// result backend, which
    refuses a missing folder, *before* sending beat_init — so on a fresh data directory beat died unless
    the worker happened to create the folders first (found by tests/test_readme_run.py).
    Also `celery -A workers.app` started without `v2gpki`: files it creates are 0600 (#21 item 11)."""
    from pki.hardening import private_umask

    private_umask()
    prepare_local_broker(sender if isinstance(sender, Celery) else app)


@worker_init.connect
def _migrate_once(sender: Any = None, **_: Any) -> None:
    """Main worker process, before the pool forks: bring the schema to head (database only, no HSM)."""
    from pki.store.db import Database

    db = Database(Settings().db_url)
    try:
        db.migrate()
    finally:
        db.dispose()


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    global _CTX
    _CTX = None  # anything seen before the fork belongs to the parent
    try:
        ctx()
    except Exception:  # noqa: BLE001 - logged; the first task retries building it and reports the cause
        log.exception("building the worker Context failed")


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    if _CTX is not None and _CTX_PID == os.getpid():
        _CTX.db.dispose()


@worker_ready.connect
def _drain_on_start(**_: Any) -> None:
    # Whatever the API committed while no worker ran (or the broker was down) goes out now.
    try:
        app.send_task("v2gpki.outbox.drain")
    except Exception:  # noqa: BLE001 - beat sends it again within seconds
        log.warning("could not enqueue the start-up outbox drain", exc_info=True)


class LifecycleTask(Task):  # type: ignore[misc]
    """Base task: late ack, re-queued if the worker process dies, retried on transient errors only."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    max_retries = 8
    retry_backoff = True
    retry_backoff_max = 600
    retry_jitter = True

    @property
    def ctx(self) -> Context:
        return ctx()


def transient_errors() -> tuple[type[BaseException], ...]:
    from hsm.errors import HSMUnavailable
    from pki.store.errors import TRANSIENT

    return (*TRANSIENT, HSMUnavailable, ConnectionError, TimeoutError)


__all__ = ["LifecycleTask", "app", "broker_config", "beat_schedule", "ctx", "transient_errors"]
