"""FastAPI application factory.

The Context (database engine, PKCS#11 key store, engine) is created in the lifespan, so each uvicorn
worker process opens its own PKCS#11 library instance and login after fork (SoftHSM does not notice
fork). Routes that touch the HSM or the database are sync `def`, so FastAPI runs them in its thread
pool and never blocks the event loop; the hot POSTs are `async def`, read their request without per-request
dependency solving (api/hot.py) and hand their blocking part to api/blocking.py's bounded pool. Every
request goes through FastAPI's routing: there is one API path.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from fastapi import FastAPI

from api import hot, problems
from pki.context import Context
from pki.wiring import build_context

log = logging.getLogger("v2gpki.api")

# Routers, each optional so a lean process (the standalone OCSP responder) can mount only some.
ROUTERS = [
    "api.responders",      # OCSP (RFC 6960/5019) and CRL distribution
    "api.v1.routes",       # /v1 enrollment, certificates, CAs, trust stores, orgs, audit
    "api.v1.contracts",    # /v1 contracts, provisioning pool; OCPP authorize
    "api.v1.subscriptions",  # /v1 lifecycle subscriptions, trust-store versions (+ outbox dispatcher)
    "api.v1.firmware",     # /v1/firmware/signatures: signed charging-station firmware (OCPP 2.0.1 L01)
    "api.v1.roots",        # /v1 root transitions (coverage, switch, withdraw) and imported roots (#27)
    "api.ocpp.v201",       # OCPP 2.0.1-shaped endpoints
    "api.ocpp.ev_certificate",  # ISO 15118-2 CPS: Get15118EVCertificate, contract installations
    "api.ocpp.status",     # OCPP 2.0.1 GetCertificateStatus (OCSP for the station's own chain)
    "api.ocpp.v21",        # OCPP 2.1 certificate messages (api/ocpp/core.py shapes every version)
    "api.ocpp.v16",        # OCPP 1.6 Plug & Charge over DataTransfer
    "api.est",             # RFC 7030 EST
    "api.oauth",           # OAuth 2.0 client credentials: /oauth/token (OPCP accessToken)
    "api.opcp.est",        # OPCP EST shapes beyond api.est: cacerts per curve, CitrineOS' /.well-known/{ca}/
    "api.opcp.rcp",        # OPCP root certificate pool and CTL: /v1/root/…
    "api.opnc.pki",        # OPNC PKI: /opnc/v1/pki/…
    "api.opcp.ccp",        # OPCP contract certificate pool: /v1/ccp/… (pki/pools.py)
    "api.opcp.pcp",        # OPCP provisioning certificate pool: /v1/oem/provCerts/…
    "api.opcp.cps",        # OPCP CPS for eMSPs: /cps/signer, /v1/cps/…
    "api.opcp.webhooks",   # OPCP webhook endpoints /v1/webhook/endpoints, OPNC /opnc/v1/event/endpoints (subscriptions)
    "api.opnc.pools",      # OPNC CCP and PCP: /opnc/v1/ccp/…, /opnc/v1/pcp/…
    "api.opnc.cps",        # OPNC CPS: /opnc/v1/cps/…
    "api.opnc.rcp",        # OPNC root certificate pool: /opnc/v1/rcp/… (api/opcp/rcp.py's pool)
    "api.console",         # operator console
]


def router_setup(name: str) -> Callable[[FastAPI], None]:
    """The setup(app) of router module ``name`` (one of ROUTERS), imported by name in code — not by a
    string handed to importlib — and only when mounted, so a lean process loads only its routers."""
    module: ModuleType
    if name == "api.responders":
        from api import responders as module
    elif name == "api.v1.routes":
        from api.v1 import routes as module
    elif name == "api.v1.contracts":
        from api.v1 import contracts as module
    elif name == "api.v1.subscriptions":
        from api.v1 import subscriptions as module
    elif name == "api.v1.firmware":
        from api.v1 import firmware as module
    elif name == "api.v1.roots":
        from api.v1 import roots as module
    elif name == "api.ocpp.v201":
        from api.ocpp import v201 as module
    elif name == "api.ocpp.ev_certificate":
        from api.ocpp import ev_certificate as module
    elif name == "api.ocpp.status":
        from api.ocpp import status as module
    elif name == "api.ocpp.v21":
        from api.ocpp import v21 as module
    elif name == "api.ocpp.v16":
        from api.ocpp import v16 as module
    elif name == "api.est":
        from api import est as module
    elif name == "api.oauth":
        from api import oauth as module
    elif name == "api.opcp.est":
        from api.opcp import est as module
    elif name == "api.opcp.rcp":
        from api.opcp import rcp as module
    elif name == "api.opnc.pki":
        from api.opnc import pki as module
    elif name == "api.opcp.ccp":
        from api.opcp import ccp as module
    elif name == "api.opcp.pcp":
        from api.opcp import pcp as module
    elif name == "api.opcp.cps":
        from api.opcp import cps as module
    elif name == "api.opcp.webhooks":
        from api.opcp import webhooks as module
    elif name == "api.opnc.pools":
        from api.opnc import pools as module
    elif name == "api.opnc.cps":
        from api.opnc import cps as module
    elif name == "api.opnc.rcp":
        from api.opnc import rcp as module
    elif name == "api.console":
        from api import console as module
    else:
        raise ValueError(f"unknown router module {name!r}")
    setup: Callable[[FastAPI], None] = module.setup
    return setup


class App(FastAPI):
    """FastAPI, whose OpenAPI document also holds the request schemas of the hot routes: they read their
    body themselves and refer to its schema through `openapi_extra` (api/hot.py)."""

    def openapi(self) -> dict[str, Any]:
        document = super().openapi()  # built once and cached by FastAPI (again when routes change)
        hot.add_schemas(document)  # idempotent: adds only what the cached document lacks
        return document


def create_app(ctx: Context | None = None, *, routers: list[str] | None = None,
               ctx_factory: Callable[[], Context] | None = None, dispatch_outbox: bool = True,
               freeze_gc: bool = False) -> FastAPI:
    """The API (``routers``: the ROUTERS to mount, default all). ``dispatch_outbox``: an app that serves
    /v1/subscriptions also sends outbox events to the broker right after commit (pki/outbox.py's
    dispatcher, started with workers/outbox.py's Celery sender); a lean app (the OCSP responder) leaves
    them to the workers' periodic drain. ``freeze_gc``: a server process's app (api/main.py), whose start-up
    objects then leave the garbage collector's generations (``gc.freeze``); not an app built in a test."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "ctx", None) is None:
            app.state.ctx = (ctx_factory or build_context)()
        if dispatch_outbox and "api.v1.subscriptions" in mounted:
            from workers.outbox import install

            install(app.state.ctx)
        if freeze_gc:
            # What start-up built (modules, routes, the Context, profiles, the OCSP issuer table) lives as long
            # as the worker: moved out of the collector's generations, a full collection no longer re-scans it.
            # py-spy put a large share of a contract installation's Python time in collections set off by one
            # request's allocations (bench/results/2026-12-08-contract-supersede.md).
            gc.collect()
            gc.freeze()
        yield

    app = App(
        title="v2gpki — Plug & Charge PKI",
        version="0.1.0",
        description="ISO 15118 / OCPP 2.0.1 certificate enrollment, revocation, OCSP and CRL.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    problems.install(app)
    from api.limits import BodyLimit

    app.add_middleware(BodyLimit)
    from api import observability

    observability.setup(app)  # request IDs, JSON logs, /metrics, /readyz — on lean apps (OCSP) too

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}
    mounted = list(routers if routers is not None else ROUTERS)
    for modname in mounted:
        router_setup(modname)(app)
    return app
