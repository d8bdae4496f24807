"""Observability: Prometheus `/metrics`, request IDs, structured JSON logs and `/readyz`.

Mounted on every app built by api.app.create_app (the full API and the lean standalone OCSP responder).

* Request IDs: an incoming ``X-Request-ID`` (1-128 characters of ``[A-Za-z0-9._:-]``, anything else is
  replaced so it cannot inject into logs) or a fresh one; echoed in the response, put in a context
  variable that every log record of the request carries (sync routes run in a thread pool that copies
  the context).
* Logs: ``V2GPKI_LOG_FORMAT=json`` (the default with V2GPKI_ENV=production) writes one JSON object per
  line on stderr; ``text`` leaves uvicorn's own format. Secrets never reach a log line: API keys, bearer
  tokens, URL passwords and fields named like pin/password/secret/authorization are redacted by the
  formatter, and the access log carries method, route, status, duration and request ID — no query string,
  no headers.
* Metrics: uvicorn runs several worker processes. With ``PROMETHEUS_MULTIPROC_DIR`` set (every deploy/
  file and scripts/stack.sh set it, to a directory wiped at service start) prometheus_client's
  multiprocess mode sums all workers, so one scrape shows the whole service; without it each scrape shows
  the one worker that answered (docs/operations.md). Database-derived gauges (expiring certificates,
  outbox depth) and broker queue depths are computed on scrape with cheap indexed COUNTs, so every
  replica reports the same service-wide value (aggregate with max(), not sum()).
* ``/readyz``: HSM login (``keystore.list()``), database ``SELECT 1``, broker ping when a broker is
  configured; 503 with the failing check's name (never its error text, which may hold a URL) otherwise.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pki.config import current

# The CA's own metrics (issuances, revocations, HSM signatures, clock agreement) are pki/metrics.py's, fed
# by the observers pki/wiring.py connects; re-exported here, where /metrics renders them.
from pki.metrics import CLOCK_REFUSALS, CLOCK_SKEW, HSM_ERRORS, HSM_SIGN_LATENCY, ISSUED, REVOKED
from pki.store import outbox as store_outbox
from pki.store.inventory import Inventory

log = logging.getLogger("v2gpki.observability")
access_log = logging.getLogger("v2gpki.access")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("v2gpki_request_id", default=None)
_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# -- metrics (process-local objects; summed across workers in multiprocess mode) --------------------------

HTTP_REQUESTS = Counter("v2gpki_http_requests", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram("v2gpki_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                         buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
OCSP_REQUESTS = Counter("v2gpki_ocsp_requests", "OCSP requests by response status and certificate status",
                        ["method", "response_status", "cert_status"])
OCSP_LATENCY = Histogram("v2gpki_ocsp_request_duration_seconds", "OCSP request latency",
                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
EXPIRY_WINDOWS: tuple[tuple[str, int], ...] = (("7d", 7), ("30d", 30), ("90d", 90))

# -- request IDs and JSON logs ----------------------------------------------------------------------------

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(v2k_[0-9A-Za-z]+_)[A-Za-z0-9_\-]+"), r"\1[redacted]"),  # API keys: keep the public id
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+"), r"\1[redacted]"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s]+@"), r"\1[redacted]@"),  # URL passwords
    (re.compile(r"(?i)\b((?:user_|so_)?pin|password|passwd|secret)(\s*[=:]\s*)\S+"), r"\1\2[redacted]"),
)
_SECRET_KEYS = re.compile(r"(?i)pin|password|passwd|secret|authorization|api_?key|cookie|token")
_STD_ATTRS = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return text


def _clean(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return "[redacted]"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, extra fields; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = _clean(key, value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class _StderrHandler(logging.Handler):
    """Writes to the *current* sys.stderr (survives pytest's capture swapping streams)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break a request
            self.handleError(record)


def log_format() -> str:
    fmt = current().log_format
    if fmt in ("json", "text"):
        return fmt
    return "json" if current().env == "production" else "text"


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """Install the JSON handler on the root logger (idempotent) and route uvicorn's loggers through it.

    Also usable by other processes (Celery workers) that want the same log lines."""
    fmt = fmt or log_format()
    if fmt != "json":
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StderrHandler):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel((level or current().log_level or "INFO").upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        if name == "uvicorn.access" and not lg.handlers and not lg.propagate:
            # `serve` without --access-log: uvicorn switched its access log off (no handlers, no propagation).
            # Propagating it to the root would turn it back on — uvicorn logs a request whenever that logger
            # has any handler up the tree — and every request, /readyz and /ocsp included, would be logged a
            # second time beside v2gpki.access, which already logs each request once (#22).
            continue
        lg.handlers.clear()
        lg.propagate = True


# Successful probes, scrapes and the high-volume OCSP/CRL answers are counted in metrics, not logged.
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


class ObservabilityMiddleware:
    """Pure ASGI: request ID in and out, HTTP and OCSP metrics, one access-log record per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope) or _new_request_id()
        token = REQUEST_ID.set(rid)
        path: str = scope.get("path", "")
        is_ocsp = path == "/ocsp" or path.startswith("/ocsp/")
        body = bytearray() if is_ocsp else None
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and body is not None and len(body) < 65536:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            method = scope.get("method", "GET")
            route = _route_label(scope, is_ocsp)
            counter, latency = _http_metrics(method, route, status)
            counter.inc()
            latency.observe(elapsed)
            if body is not None:
                resp_status, cert_status = _ocsp_outcome(status, bytes(body))
                OCSP_REQUESTS.labels(method, resp_status, cert_status).inc()
                OCSP_LATENCY.observe(elapsed)
            if not (status < 400 and (path in _QUIET or is_ocsp or path.startswith("/crl/"))) \
                    and access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %d", method, route, status, extra={
                    "method": method, "route": route, "status": status,
                    "duration_ms": round(elapsed * 1000, 2), "client": _client(scope)})
            REQUEST_ID.reset(token)


# The labelled series of each (method, route, status): prometheus_client's labels() takes a lock and builds
# its key on every call, a few µs on the event loop per request. Bounded: routes are templates.
_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _http_metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    found = _SERIES.get(key)
    if found is None:
        found = (HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route))
        if len(_SERIES) < 4096:
            _SERIES[key] = found
    return found


def _new_request_id() -> str:
    """32 hex digits, unique per request. Not uuid4: os.urandom releases the GIL, and on a busy worker the
    event loop then waits for a pool thread to give it back (up to the 5 ms switch interval) — the one
    syscall per request on the loop's own path that bench/enrollment.py's profile at 32 connections showed
    (≈ 0.5 ms of waiting each). A request ID is a correlation handle (clients may send their own), not a
    secret: Python's generator, reseeded in each forked worker, is enough."""
    return f"{random.getrandbits(128):032x}"


_ROUTE_CACHE: dict[tuple[int, frozenset[str]], str] = {}


def _route_label(scope: Any, is_ocsp: bool) -> str:
    """The matched route's path template (bounded label cardinality), never the raw path."""
    route = scope.get("route")  # FastAPI routes put themselves here
    if route is not None and getattr(route, "path", None):
        return str(route.path)
    endpoint = scope.get("endpoint")  # plain Starlette routes (the OCSP/CRL responders) only leave this
    if endpoint is not None:
        keys = frozenset(scope.get("path_params") or {})
        key = (id(endpoint), keys)
        hit = _ROUTE_CACHE.get(key)
        if hit is None:
            app = scope.get("app")
            for r in getattr(getattr(app, "router", None), "routes", []):
                if getattr(r, "endpoint", None) is endpoint and frozenset(getattr(r, "param_convertors", {})) == keys:
                    hit = str(r.path)
                    break
            if hit is not None and len(_ROUTE_CACHE) < 1024:
                _ROUTE_CACHE[key] = hit
        if hit is not None:
            return hit
    return "/ocsp" if is_ocsp else "unmatched"


def _incoming_request_id(scope: Any) -> str | None:
    for k, v in scope.get("headers", []):
        if k == b"x-request-id":
            try:
                rid = v.decode("ascii")
            except UnicodeDecodeError:
                return None
            return rid if _RID_OK.match(rid) else None
    return None


def _client(scope: Any) -> str | None:
    c = scope.get("client")
    return str(c[0]) if c else None


def _ocsp_outcome(http_status: int, der: bytes) -> tuple[str, str]:
    """(responseStatus, certStatus of the first SingleResponse) of an OCSP response body (RFC 6960 §4.2.1)."""
    if http_status >= 400 or not der:
        return f"http_{http_status}", "none"
    try:
        from cryptography.x509 import ocsp

        resp = ocsp.load_der_ocsp_response(der)
        rs = resp.response_status.name.lower()
        if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return rs, "none"
        return rs, resp.certificate_status.name.lower()
    except Exception:  # noqa: BLE001 - a CRL or an unparsable body is not an OCSP outcome
        return "unparsed", "none"


# -- collectors computed on scrape ------------------------------------------------------------------------


class StateCollector(Collector):
    """Service-wide gauges read from the database and the broker at scrape time."""

    def __init__(self, ctx: Any, broker_url: str | None, queues: Iterable[str]) -> None:
        self.ctx = ctx
        self.broker_url = broker_url
        self.queues = sorted(set(queues))

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("v2gpki_collector_up", "1 if the on-scrape collector could read its source",
                               labels=["source"])
        try:
            yield from self._database()
            up.add_metric(["database"], 1)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is down
            log.warning("metrics: database collector failed (%s)", type(exc).__name__)
            up.add_metric(["database"], 0)
        if self.broker_url:
            try:
                yield from self._broker()
                up.add_metric(["broker"], 1)
            except Exception as exc:  # noqa: BLE001
                log.warning("metrics: broker collector failed (%s)", type(exc).__name__)
                up.add_metric(["broker"], 0)
        yield up

    def _database(self) -> Iterator[Any]:
        guard = getattr(getattr(self.ctx, "engine", None), "clock_guard", None)
        if guard is not None:
            guard.current()  # a scrape also re-compares the clocks once the last reading is stale (#27 item 4)
        now = datetime.now(UTC).replace(microsecond=0)  # UTCDateTime columns compare aware UTC values
        row = Inventory(self.ctx.db).valid_expiring_within(now, [d for _, d in EXPIRY_WINDOWS])
        pending, oldest = store_outbox.backlog(self.ctx.db)
        exp = GaugeMetricFamily("v2gpki_certificates_expiring",
                                "Valid certificates whose notAfter lies within the window from now", labels=["window"])
        for (name, _), value in zip(EXPIRY_WINDOWS, row, strict=True):
            exp.add_metric([name], value)
        yield exp
        yield GaugeMetricFamily("v2gpki_outbox_pending", "Outbox events not yet dispatched to the broker",
                                value=pending)
        age = 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        yield GaugeMetricFamily("v2gpki_outbox_oldest_pending_seconds",
                                "Age of the oldest undispatched outbox event (0 if none)", value=age)

    def _broker(self) -> Iterator[Any]:
        g = GaugeMetricFamily("v2gpki_queue_depth", "Messages waiting in the broker queue", labels=["queue"])
        for name, depth in queue_depths(self.broker_url or "", self.queues).items():
            g.add_metric([name], depth)
        yield g


def queue_depths(broker_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Celery queue lengths: LLEN on Redis (Celery's list per queue); a passive declare on AMQP."""
    names = list(queues)
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        r = redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return {n: int(r.llen(n)) for n in names}
        finally:
            r.close()
    from kombu import Connection

    out = {}
    with Connection(broker_url, connect_timeout=2) as conn:
        ch = conn.default_channel
        for n in names:
            out[n] = int(ch.queue_declare(queue=n, passive=True).message_count)
    return out


def celery_queue_names() -> list[str]:
    """The queues the workers consume (workers.app if present), else Celery's default queue."""
    names = {"celery"}
    try:
        from workers.app import app as celery_app  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # noqa: BLE001 - workers are optional in a lean process
        return sorted(names)
    conf = celery_app.conf
    names.add(str(conf.task_default_queue or "celery"))
    for q in conf.task_queues or []:
        names.add(str(getattr(q, "name", q)))
    return sorted(names)


def multiprocess_dir() -> str | None:
    # env: prometheus_client's own variable (it reads it itself to switch to multi-process mode), not ours
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    return d or None


def render_metrics(ctx: Any, broker_url: str | None = None) -> bytes:
    registry = CollectorRegistry()
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    if ctx is not None:
        registry.register(StateCollector(ctx, broker_url, celery_queue_names() if broker_url else []))
        registry.register(RootCoverageCollector(ctx))
    return generate_latest(registry)


class RootCoverageCollector(Collector):
    """Coverage of the new root of every root transition not yet finished (pki/root_campaign.py, #27 item 2):
    stations whose last trust-store report names it, per CPO, and the fleet-wide ratio the switch compares
    with V2GPKI_ROOT_SWITCH_MIN_COVERAGE. Grouped COUNTs on scrape, like StateCollector; nothing while no
    transition runs."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Any]:
        try:
            from pki.root_campaign import coverage, list_campaigns

            covs = [(c, coverage(self.ctx, c.new_root)) for c in list_campaigns(self.ctx) if c.state != "withdrawn"]
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is down
            log.warning("metrics: root coverage collector failed (%s)", type(exc).__name__)
            return
        ratio = GaugeMetricFamily("v2gpki_root_coverage_ratio", "Registered stations whose last trust-store report "
                                  "names the new root of a transition, over all CPOs", labels=["root", "state"])
        stations = GaugeMetricFamily("v2gpki_root_coverage_stations", "Stations per CPO of a transition's new root: "
                                     "registered, with a report, reporting the root", labels=["root", "org", "kind"])
        threshold = GaugeMetricFamily("v2gpki_root_switch_min_coverage",
                                      "Coverage below which `v2gpki root switch` refuses (unless forced)")
        threshold.add_metric([], float(self.ctx.settings.root_switch_min_coverage))
        for camp, cov in covs:
            if cov.ratio is not None:
                ratio.add_metric([camp.new_root, camp.state], cov.ratio)
            for o in cov.per_org:
                stations.add_metric([camp.new_root, o.org, "registered"], o.stations)
                stations.add_metric([camp.new_root, o.org, "reporting"], o.reported)
                stations.add_metric([camp.new_root, o.org, "with_root"], o.with_root)
        yield ratio
        yield stations
        yield threshold


class _Forward(Collector):
    def __init__(self, reg: CollectorRegistry) -> None:
        self.reg = reg

    def collect(self) -> Iterator[Any]:
        yield from self.reg.collect()


# -- readiness --------------------------------------------------------------------------------------------


def broker_ping(url: str) -> None:
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        r = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            r.ping()
        finally:
            r.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1)


class NoPrivateKeyVisible(Exception):
    """The token session sees no private key: not logged in (CKA_PRIVATE objects hide) or an empty token."""


def hsm_check(ks: Any) -> None:
    """Prove a logged-in session: find the first private key (C_FindObjects stopped at one hit).

    Pkcs11KeyStore.list() would read the label of every key under the process-wide PKCS#11 lock — tens of
    milliseconds with the default hierarchy, far more on a production token — and every probe would
    stall signing that long; the same search stopped at the first private key proves the same login."""
    probe = getattr(ks, "probe", None)
    if probe is not None:  # Pkcs11KeyStore: the same search, and it re-reads a token that came back
        if not probe():
            raise NoPrivateKeyVisible()
        return
    call = getattr(ks, "session_call", None)
    if call is None:
        ks.list()
        return
    from pkcs11 import Attribute, ObjectClass

    def first_private(session: Any) -> bool:
        for _obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            return True
        return False

    if not call(first_private):
        raise NoPrivateKeyVisible()


def _responder_only(ctx: Any) -> bool:
    try:
        from pki.ocsp import is_responder_only
    except ImportError:
        return False
    return bool(getattr(ctx, "engine", None) is not None and is_responder_only(ctx))


def readiness(ctx: Any, broker_url: str | None) -> dict[str, str]:
    """name -> "ok" | "failed: ErrorType" for the database, the HSM (login) and the broker.

    The standalone OCSP responder never talks to the broker, so its readiness does not depend on it."""
    checks: dict[str, str] = {}
    if ctx is None:
        return {"context": "failed: not initialised"}
    try:
        ctx.db.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"failed: {type(exc).__name__}"
    ks = getattr(ctx, "keystore", None)
    if ks is not None:
        try:
            hsm_check(ks)
            checks["hsm"] = "ok"
        except Exception as exc:  # noqa: BLE001
            HSM_ERRORS.labels("login", type(exc).__name__).inc()
            checks["hsm"] = f"failed: {type(exc).__name__}"
    if broker_url and not _responder_only(ctx):
        try:
            broker_ping(broker_url)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"failed: {type(exc).__name__}"
    return checks


def broker_url_of(ctx: Any) -> str | None:
    """The broker a process's readiness and queue-depth gauges look at (its settings, else the env)."""
    settings = getattr(ctx, "settings", None)
    url = getattr(settings, "broker_url", None) if settings is not None else None
    return url or current().broker_url or None


_broker_url = broker_url_of  # the name api/ocsp_fast.py first used


# -- mounting ---------------------------------------------------------------------------------------------


def setup(app: FastAPI) -> None:
    configure_logging()
    app.add_middleware(ObservabilityMiddleware)
    @app.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> JSONResponse:
        ctx = getattr(request.app.state, "ctx", None)
        checks = readiness(ctx, _broker_url(ctx))
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        ctx = getattr(request.app.state, "ctx", None)
        return Response(render_metrics(ctx, _broker_url(ctx)), media_type=CONTENT_TYPE_LATEST)


__all__ = ["CLOCK_REFUSALS", "CLOCK_SKEW", "HSM_ERRORS", "HSM_SIGN_LATENCY", "ISSUED", "REVOKED", "JsonFormatter",
           "ObservabilityMiddleware", "broker_url_of", "configure_logging", "readiness", "redact", "render_metrics",
           "setup"]
