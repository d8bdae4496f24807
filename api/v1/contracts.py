"""/v1/contracts (eMSP), /v1/provisioning-certificates and lookupvehicle (OEM pool), and OCPP
Plug & Charge authorization (/ocpp/v201/authorize)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.ocpp import core
from pki import contracts as c
from pki.issuance import pem
from pki.store.models import Contract

router = APIRouter(prefix="/v1", tags=["contracts"])
ocpp = APIRouter(prefix="/ocpp/v201", tags=["ocpp"])


class ContractIn(BaseModel):
    emaid: str = Field(max_length=40)
    pcid: str = Field(max_length=18)
    valid_until: datetime
    is_default: bool = True


class ProvisioningIn(BaseModel):
    certificate: str = Field(max_length=6000, description="OEM provisioning certificate, PEM")


def _out(k: Contract) -> dict[str, Any]:
    return {"emaid": k.emaid, "pcid": k.pcid, "emsp": k.emsp, "valid_until": k.valid_until,
            "is_default": k.is_default, "status": k.status, "created_at": k.created_at,
            "terminated_at": k.terminated_at}


@router.post("/contracts", status_code=201)
def post_contract(body: ContractIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    return _out(c.create_contract(ctx, p, body.emaid, body.pcid, body.valid_until, is_default=body.is_default))


@router.get("/contracts")
def get_contracts(ctx: CtxDep, p: PrincipalDep, pcid: Annotated[str | None, Query(max_length=18)] = None
                  ) -> list[dict[str, Any]]:
    return [_out(k) for k in c.list_contracts(ctx, p, pcid)]


@router.get("/contracts/{emaid}")
def get_contract(emaid: str, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    return _out(c.get_contract(ctx, p, emaid))


@router.post("/contracts/{emaid}/terminate")
def terminate(emaid: str, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    k, revoked = c.terminate_contract(ctx, p, emaid)
    return {**_out(k), "revoked_certificates": revoked}


@router.post("/provisioning-certificates", status_code=201)
def post_provisioning(body: ProvisioningIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    row = c.register_provisioning_certificate(ctx, p, body.certificate.encode())
    return {"pcid": row.pcid, "oem": row.oem, "sha256": row.fingerprint, "not_after": row.not_after}


@router.get("/lookupvehicle/{pcid}")
def lookupvehicle(pcid: str, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    from cryptography import x509

    rows = c.lookup_vehicle(ctx, p, pcid)
    return {"pcid": pcid.upper(), "provisioning_certificates": [
        {"sha256": r.fingerprint, "not_after": r.not_after, "oem": r.oem,
         "certificate": pem(x509.load_der_x509_certificate(r.der))} for r in rows]}


AuthorizeIn = core.Authorize201


@ocpp.post("/authorize", response_model=None)
def authorize(body: AuthorizeIn, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    """OCPP 2.0.1 AuthorizeRequest for a contract (idToken type eMAID) → AuthorizeResponse {idTokenInfo,
    certificateStatus}, exactly (api/ocpp/core.py).

    The CSMS's call (OCPP 2.0.1 §C07, Authorization using contract certificates): answered for cpo and
    admin keys only. Any other role would get an oracle on every eMSP's contracts (issue #21 item 3)."""
    return core.authorize(ctx, p, body).response()


def setup(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(ocpp)
