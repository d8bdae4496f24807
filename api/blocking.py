"""Where the hot API routes run their blocking work (HSM signatures, database round trips).

The hot POSTs (`/v1/enrollments`, `/ocpp/v201/sign-certificate`, `/ocpp/v201/get-15118-ev-certificate`, EST
simpleenroll/simplereenroll) are `async def` FastAPI routes that hand only the blocking call to a bounded pool
of this process (the first two and EST read their request through api/hot.py): a plain
`def` route would also go through anyio's thread pool, but with its per-call limiter and a thread hop for
FastAPI's own work around it (bench/enrollment.py measured that as a visible share of an enrollment's CPU).
The pool is sized by V2GPKI_FASTLANE_THREADS (the name predates #23 and is kept: operators set it).

Contract installations on SQLite run on the event loop itself, one at a time per worker process. An
installation is ≈ 6 ms of Python (EXI, XML signature, key wrap, chain checks) and SQLite never makes it
wait (an in-process library): several installations interleaving on one GIL only added switching, and even
one pool thread cost a hand-off per request (future, self-pipe wake-up, GIL transfer). bench/contract.py at
c=8, 2 workers (2026-11-23): 4 threads ≈ 170/s at 9.6 ms CPU each; one thread ≈ 215–250/s at 6.9–8.2 ms; on
the loop 266–332/s at 5.3–6.6 ms. The price: while one runs, that worker's other requests wait for it
(≈ 6 ms each), and a write lock held by another process (SQLite's busy timeout) stalls the worker, not just
its installations — the embedded default's trade. On PostgreSQL an installation waits for its round trips
and the shared pool overlaps them, so it keeps the shared pool. Enrollments keep the shared pool everywhere:
their batches of concurrent issuances (pki.issuance.IssueBatcher) need concurrent callers.
V2GPKI_CPS_THREADS=N forces a pool of N threads for installations, 0 the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from starlette.requests import Request

from pki.context import Context

P = ParamSpec("P")
T = TypeVar("T")

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_CPS_POOL: ThreadPoolExecutor | None = None


def _shared(ctx: Context) -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=ctx.settings.fastlane_threads, thread_name_prefix="v2gpki-api")
        return _POOL


def _installations(ctx: Context) -> ThreadPoolExecutor | None:
    """The pool installations run in; None: on the event loop."""
    global _CPS_POOL
    forced = ctx.settings.cps_threads
    if forced == 0 or (forced is None and ctx.db.is_sqlite):
        return None
    if forced is None:
        return _shared(ctx)
    with _LOCK:
        if _CPS_POOL is None:
            _CPS_POOL = ThreadPoolExecutor(max_workers=forced, thread_name_prefix="v2gpki-cps")
        return _CPS_POOL


def context(request: Request) -> Context:
    """The process's Context for a hot route. Read from the app directly rather than through a `Depends`:
    each dependency FastAPI solves per request costs more than this attribute read (see the docstring)."""
    ctx: Context = request.app.state.ctx
    return ctx


async def _call(pool: ThreadPoolExecutor | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    # copy_context: the request ID and log context follow the call into the pool thread, as they do through
    # Starlette's run_in_threadpool.
    call = contextvars.copy_context()
    if pool is None:
        return call.run(fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(call.run, fn, *args, **kwargs))


async def run(ctx: Context, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in this process's bounded pool."""
    return await _call(_shared(ctx), fn, *args, **kwargs)


async def run_installation(ctx: Context, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """A contract installation: on the event loop (SQLite) or in a pool (see the module docstring)."""
    return await _call(_installations(ctx), fn, *args, **kwargs)


__all__ = ["context", "run", "run_installation"]
