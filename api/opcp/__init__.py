"""OPCP 1.0 (Hubject's Open Plug & Charge Protocol, `../shared/specs/opcp/*.json`) served on the existing
engine: each module is one of the published documents (est, rcp, ccp, pcp, cps, webhooks), mounted through
api/app.py's ROUTERS. docs/api.md ("Integrating a CSMS") lists every operation and what serves it. Their
error shape (and OPNC's) is built in one place, api/opcp/pool_shapes.py."""
