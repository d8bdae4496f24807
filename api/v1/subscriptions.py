"""/v1/subscriptions (lifecycle event webhooks / e-mail, tenant-scoped) and /v1/truststores/{type}/versions.

Subscriptions: an organization manages its own (admins may name another with ``org``). The HMAC secret is
returned once, in the creation response, and never again. Trust-store versions are public (like the
PEM bundles of /v1/truststores/{type}); the per-subscriber delivery status needs authentication, and a
tenant sees only its own deliveries.

An app that mounts this router also starts the outbox dispatcher of its process (api/app.py's lifespan),
so events committed by API requests reach the broker right after commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from pki.errors import Forbidden, PKIError
from pki.lifecycle import EVENTS, add_subscription, list_subscriptions, remove_subscription
from pki.store.models_lifecycle import Subscription
from pki.store.subscriptions import Subscriptions
from pki.trustlist import version_document

router = APIRouter(prefix="/v1")

Store = Literal["v2g", "mo", "oem", "csms"]
Event = Literal["expiry", "truststore", "revocation", "renewal"]
ALL_EVENTS: tuple[Event, ...] = ("expiry", "truststore", "revocation", "renewal")
assert set(ALL_EVENTS) == set(EVENTS)


class SubscriptionIn(BaseModel):
    url: str | None = Field(default=None, max_length=512, description="webhook URL (https in production)")
    email: str | None = Field(default=None, max_length=320, description="e-mail address instead of a webhook")
    events: list[Event] = Field(default_factory=lambda: list(ALL_EVENTS))
    secret: str | None = Field(default=None, min_length=16, max_length=128,
                               description="HMAC key; generated when omitted (returned once)")
    org: str | None = Field(default=None, max_length=128, description="admins only: the owning organization")


class SubscriptionOut(BaseModel):
    id: str
    org: str
    kind: str
    target: str
    events: list[str]
    created_at: datetime
    secret: str | None = None  # only in the creation response


def _out(r: Subscription, secret: str | None = None) -> SubscriptionOut:
    return SubscriptionOut(id=r.sub_id, org=r.org, kind=r.kind, target=r.target, events=list(r.events),
                           created_at=r.created_at, secret=secret)


def _org_for(p: Any, requested: str | None) -> str:
    if requested is not None and requested != p.org:
        if p.role != "admin":
            raise Forbidden("only admins may manage another organization's subscriptions")
        return requested
    return str(p.org)


@router.post("/subscriptions", status_code=201, response_model=SubscriptionOut, response_model_exclude_none=True)
def post_subscription(body: SubscriptionIn, ctx: CtxDep, p: PrincipalDep) -> SubscriptionOut:
    if p.role == "auditor":
        raise Forbidden("auditors have read-only access")
    if bool(body.url) == bool(body.email):
        raise PKIError("give exactly one of url (webhook) or email")
    org = _org_for(p, body.org)
    kind, target = ("webhook", body.url) if body.url else ("email", body.email)
    assert target is not None
    new = add_subscription(ctx, org, kind, target, body.events, secret=body.secret, actor=f"org:{p.org}")
    return _out(new.row, new.secret)


@router.get("/subscriptions", response_model=list[SubscriptionOut], response_model_exclude_none=True)
def get_subscriptions(ctx: CtxDep, p: PrincipalDep) -> list[SubscriptionOut]:
    return [_out(r) for r in list_subscriptions(ctx, p.tenant_filter)]


@router.delete("/subscriptions/{sub_id}", status_code=204)
def delete_subscription(sub_id: str, ctx: CtxDep, p: PrincipalDep) -> None:
    if p.role == "auditor":
        raise Forbidden("auditors have read-only access")
    # Another tenant's subscription is 404, not 403: existence is not revealed.
    remove_subscription(ctx, sub_id, None if p.role == "admin" else p.org, actor=f"org:{p.org}")


@router.get("/truststores/{store}/versions")
def truststore_versions(store: Store, ctx: CtxDep) -> list[dict[str, Any]]:
    rows = Subscriptions(ctx.db).truststore_versions(store)
    return [{"version": r.version, "issued_at": r.issued_at, "next_update": r.next_update,
             "content_sha256": r.content_sha256, "reason": r.reason} for r in rows]


@router.get("/truststores/{store}/versions/{version}")
def truststore_version(store: Store, version: Annotated[int, Path(ge=1, le=2**31)], ctx: CtxDep) -> dict[str, Any]:
    return version_document(ctx, store, version)


@router.get("/truststores/{store}/versions/{version}/deliveries")
def truststore_deliveries(store: Store, version: Annotated[int, Path(ge=1, le=2**31)], ctx: CtxDep,
                          p: PrincipalDep) -> list[dict[str, Any]]:
    rows = Subscriptions(ctx.db).deliveries_of(f"truststore:{store}:{version}", p.tenant_filter)
    return [{"delivery_id": d.delivery_id, "subscription": sub.sub_id, "org": sub.org, "target": sub.target,
             "state": d.state, "attempts": d.attempts, "next_attempt_at": d.next_attempt_at,
             "delivered_at": d.delivered_at, "last_error": d.last_error} for d, sub in rows]


def setup(app: FastAPI) -> None:
    app.include_router(router)


__all__ = ["router", "setup"]
