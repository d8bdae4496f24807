"""/v1 root transitions and roots of other PKIs (issue #27 items 1 and 2).

GET  /v1/roots/{id}/coverage      how many of each CPO's stations report the root (cpo: its own; admin,
                                  auditor: every CPO), the campaign's state and the switch threshold
POST /v1/roots/{id}/switch        {"force": false}: switch issuance to the new root of a campaign (admin)
POST /v1/roots/{id}/withdraw      withdraw the old root once nothing valid depends on it (admin)
GET  /v1/roots/campaigns          every root transition (admin, auditor)
POST /v1/trusted-roots            {"certificateType", "certificate" (PEM), "org"?}: import a root of another
                                  PKI that CPOs trust, for every CPO or for one (admin)
GET  /v1/trusted-roots            imports (cpo: global ones and its own)
POST /v1/trusted-roots/{id}/withdraw  stations are then told to delete it (admin)

``{id}`` is a CA's id as /v1/cas lists it, or its name. The domain is pki/root_campaign.py and
pki/truststore_plan.py; refusals are their typed errors (409 coverage-too-low, root-in-use, campaign-state).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path
from pydantic import BaseModel, ConfigDict, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from pki import root_campaign
from pki.truststore_plan import import_json, import_root, list_imports, withdraw_import

router = APIRouter(prefix="/v1", tags=["roots"])

RootRef = Annotated[str, Path(min_length=1, max_length=64)]


class SwitchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False  # switch below the coverage threshold (V2GPKI_ROOT_SWITCH_MIN_COVERAGE)


class TrustedRootIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    certificateType: Literal["V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate",  # noqa: N815
                             "ManufacturerRootCertificate", "OEMRootCertificate"]
    certificate: str = Field(min_length=1, max_length=10000)  # PEM
    org: str | None = Field(default=None, max_length=128)  # None: every CPO


def _campaign_json(c: Any) -> dict[str, Any]:
    return {"id": c.id, "old_root": c.old_root, "new_root": c.new_root, "state": c.state,
            "successors": c.successors, "created_at": c.created_at.isoformat(),
            "switched_at": c.switched_at.isoformat() if c.switched_at else None,
            "switch_coverage": c.switch_coverage, "forced": c.forced,
            "withdrawn_at": c.withdrawn_at.isoformat() if c.withdrawn_at else None}


@router.get("/roots/campaigns")
def campaigns(ctx: CtxDep, p: PrincipalDep) -> list[dict[str, Any]]:
    p.require("admin", "auditor")
    return [_campaign_json(c) for c in root_campaign.list_campaigns(ctx)]


@router.get("/roots/{ref}/coverage")
def coverage(ref: RootRef, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    p.require("cpo", "admin", "auditor")
    return root_campaign.coverage(ctx, ref, org=p.tenant_filter).as_json()


@router.post("/roots/{ref}/switch")
def switch(ref: RootRef, body: SwitchIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    p.require("admin")
    res = root_campaign.switch(ctx, ref, force=body.force, actor=p.credential)
    return {"campaign": _campaign_json(res.campaign), "coverage": res.coverage, "created": res.created}


@router.post("/roots/{ref}/withdraw")
def withdraw(ref: RootRef, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    p.require("admin")
    res = root_campaign.withdraw(ctx, ref, actor=p.credential)
    return {"campaign": _campaign_json(res.campaign), "retired": res.retired}


@router.post("/trusted-roots", status_code=201)
def post_trusted_root(body: TrustedRootIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    p.require("admin")
    return import_json(import_root(ctx, body.certificateType, body.certificate, org=body.org, actor=p.credential))


@router.get("/trusted-roots")
def get_trusted_roots(ctx: CtxDep, p: PrincipalDep) -> list[dict[str, Any]]:
    p.require("cpo", "admin", "auditor")
    return [import_json(r) for r in list_imports(ctx, p.tenant_filter)]


@router.post("/trusted-roots/{import_id}/withdraw")
def withdraw_trusted_root(import_id: Annotated[int, Path(ge=1, le=2**31 - 1)], ctx: CtxDep,
                          p: PrincipalDep) -> dict[str, Any]:
    p.require("admin")
    return import_json(withdraw_import(ctx, import_id, actor=p.credential))


def setup(app: FastAPI) -> None:
    app.include_router(router)


__all__ = ["router", "setup"]
