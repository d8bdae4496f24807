"""OPCP 1.0 webhooks (``../shared/specs/opcp/webhooks.v1.json``) on the lifecycle subscriptions — no second
implementation: an endpoint is a `pki.lifecycle` webhook subscription (the same table, HMAC secret sealed in
the token, deliveries, retries with backoff, dead-lettering, SSRF guard) whose events are OPCP's event types.

  POST   /v1/webhook/endpoints        create-webhook-endpoint: 201 EndpointResponse, ``secret`` shown once
  GET    /v1/webhook/endpoints        get-webhook-endpoints: the caller's organization's endpoints
  GET    /v1/webhook/endpoints/{id}   get-webhook-endpoint
  PUT    /v1/webhook/endpoints/{id}   update-webhook-endpoint: url, enabledEvents, status, description, metadata
  DELETE /v1/webhook/endpoints/{id}   delete-webhook-endpoint

Deliveries have webhook.payload.v1.json's shape (``{timestamp, eventId, eventType, xsdMsgDefNamespace,
payload}``) and carry ``payload-signature`` (HMAC-SHA256 of the body with the endpoint's secret, hex),
``X-Hubject-Signature: sha256=<hex>`` and X-V2GPKI-Signature (timestamped). What fires them: pki/pools.py
(contract and provisioning events, root.cert.added / root.cert.revoked). ``status: disabled`` keeps the
endpoint and stops its deliveries. Another organization's endpoint is 404 (existence not revealed); admins see
every organization's. Errors are the OPCP ``{errorMessages, traceId}`` shape (400 for a bad body, nothing
stored).
"""

from __future__ import annotations

import calendar
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.opcp.pool_shapes import ErrorShapeRoute, empty
from pki import lifecycle
from pki.errors import Forbidden, NotFound, PKIError
from pki.orgs import Principal
from pki.store.models_lifecycle import Subscription

router = APIRouter(prefix="/v1/webhook", tags=["opcp-webhooks"], route_class=ErrorShapeRoute,
                   include_in_schema=False)

Event = Literal[
    "root.cert.added", "root.cert.expired", "root.cert.revoked",
    "mo.prov.cert.updated", "mo.prov.cert.deleted", "mo.prov.cert.updated.factory.reset",
    "mo.contract.delivered.to.oem", "mo.contract.created.sent.to.oem", "mo.contract.updated.sent.to.oem",
    "mo.contract.deleted.sent.to.oem", "mo.contract.rejected.by.oem", "mo.contract.queued.to.oem",
    "oem.contract.created", "oem.contract.updated", "oem.contract.deleted",
]
assert set(Event.__args__) == set(lifecycle.OPCP_EVENTS)  # type: ignore[attr-defined]
Status = Literal["enabled", "disabled"]
API = "opcp"
METADATA_MAX = 4096  # characters of the metadata object as JSON
USER_ROLE = {"emsp": "MO", "oem": "OEM", "cpo": "CPO", "admin": "ADMIN", "auditor": "AUDITOR"}


def _metadata(v: dict[str, Any] | None) -> dict[str, Any] | None:
    if v is not None and len(json.dumps(v, separators=(",", ":"))) > METADATA_MAX:
        raise ValueError(f"metadata is larger than {METADATA_MAX} characters of JSON")
    return v


class EndpointRequest(BaseModel):
    apiVersion: str | None = Field(default=None, max_length=16)  # noqa: N815
    description: str | None = Field(default=None, max_length=500)
    enabledEvents: list[Event] = Field(min_length=1, max_length=len(lifecycle.OPCP_EVENTS))  # noqa: N815
    metadata: dict[str, Any] | None = None
    status: Status = "enabled"
    url: str = Field(min_length=1, max_length=512)

    _m = field_validator("metadata")(_metadata)


class EndpointUpdateRequest(BaseModel):
    apiVersion: str | None = Field(default=None, max_length=16)  # noqa: N815
    description: str | None = Field(default=None, max_length=500)
    enabledEvents: list[Event] | None = Field(default=None, min_length=1,  # noqa: N815
                                              max_length=len(lifecycle.OPCP_EVENTS))
    metadata: dict[str, Any] | None = None
    status: Status | None = None
    url: str = Field(min_length=1, max_length=512)

    _m = field_validator("metadata")(_metadata)


EndpointId = Annotated[str, Path(max_length=32)]


def _writer(p: Principal) -> None:
    if p.role == "auditor":
        raise Forbidden("auditors have read-only access")


def endpoint_response(row: Subscription, owner: Principal | None, secret: str | None = None) -> dict[str, Any]:
    """EndpointResponse: the subscription in the document's shape (``owner``: the caller when it owns it)."""
    attrs = row.attributes or {}
    out: dict[str, Any] = {
        "id": row.sub_id, "apiVersion": attrs.get("apiVersion") or "v1",
        "created": calendar.timegm(row.created_at.utctimetuple()),
        "enabledEvents": [e for e in row.events if e in lifecycle.OPCP_EVENTS],
        "metadata": attrs.get("metadata") or {}, "status": attrs.get("status", "enabled"), "url": row.target,
        "userName": row.org,
    }
    if attrs.get("description") is not None:
        out["description"] = attrs["description"]
    if secret is not None:
        out["secret"] = secret
    if owner is not None and owner.org == row.org:
        out["userRole"] = USER_ROLE.get(owner.role, owner.role.upper())
        if owner.role == "emsp":
            out["providerIds"] = list(owner.prefixes)
        elif owner.role == "oem":
            out["wmis"] = list(owner.prefixes)
    return out


def _mine(ctx: Any, p: Principal, sub_id: str) -> Subscription:
    """An endpoint of the caller's organization (admins: any); a /v1 subscription or a one-shot one is not
    an endpoint of this API: 404 like another tenant's."""
    row = lifecycle.get_subscription(ctx, sub_id, None if p.role in ("admin", "auditor") else p.org)
    attrs = row.attributes or {}
    if attrs.get("api") != API or attrs.get("oneShot"):
        raise NotFound(f"no webhook endpoint {sub_id!r}")
    return row


@router.post("/endpoints", status_code=201, response_model=None)
def create_webhook_endpoint(body: EndpointRequest, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    _writer(p)
    attrs = {"api": API, "status": body.status, "description": body.description, "metadata": body.metadata or {},
             "apiVersion": body.apiVersion or "v1"}
    new = lifecycle.add_subscription(ctx, str(p.org), "webhook", body.url, list(dict.fromkeys(body.enabledEvents)),
                                     actor=p.credential, attributes=attrs)
    return JSONResponse(endpoint_response(new.row, p, new.secret), status_code=201)


@router.get("/endpoints")
def get_webhook_endpoints(ctx: CtxDep, p: PrincipalDep) -> list[dict[str, Any]]:
    rows = lifecycle.list_subscriptions(ctx, p.tenant_filter)
    return [endpoint_response(r, p) for r in rows
            if (r.attributes or {}).get("api") == API and not (r.attributes or {}).get("oneShot")]


@router.get("/endpoints/{id}")
def get_webhook_endpoint(id: EndpointId, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:  # noqa: A002
    return endpoint_response(_mine(ctx, p, id), p)


@router.put("/endpoints/{id}")
def update_webhook_endpoint(id: EndpointId, body: EndpointUpdateRequest, ctx: CtxDep,  # noqa: A002
                            p: PrincipalDep) -> dict[str, Any]:
    _writer(p)
    row = _mine(ctx, p, id)
    attrs = dict(row.attributes or {})
    for key, value in (("status", body.status), ("description", body.description), ("metadata", body.metadata),
                       ("apiVersion", body.apiVersion)):
        if value is not None:
            attrs[key] = value
    events = list(dict.fromkeys(body.enabledEvents)) if body.enabledEvents is not None else None
    updated = lifecycle.update_subscription(ctx, row.sub_id, None if p.role == "admin" else p.org,
                                            target=body.url, events=events, attributes=attrs, actor=p.credential)
    return endpoint_response(updated, p)


@router.delete("/endpoints/{id}", response_model=None)
def delete_webhook_endpoint(id: EndpointId, ctx: CtxDep, p: PrincipalDep) -> Response:  # noqa: A002
    _writer(p)
    row = _mine(ctx, p, id)
    lifecycle.remove_subscription(ctx, row.sub_id, None if p.role == "admin" else p.org, actor=p.credential)
    return empty()


def one_shot(ctx: Any, p: Principal, url: str, emaid: str) -> lifecycle.NewSubscription:
    """OPCP CPS ``subscriptionUrl``: a one-shot subscription of the caller's organization to its contract
    ``emaid``: the first event of that contract (contract data created in the pool for the OEM, or delivered
    to it) is delivered there once, in the OPCP payload shape, signed with the secret returned here."""
    if not url:
        raise PKIError("subscriptionUrl is empty")
    return lifecycle.add_subscription(
        ctx, str(p.org), "webhook", url, ["mo.contract.created.sent.to.oem", "mo.contract.delivered.to.oem"],
        actor=p.credential, attributes={"api": API, "oneShot": True, "emaid": emaid})


def setup(app: FastAPI) -> None:
    app.include_router(router)
