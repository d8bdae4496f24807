"""OCPP 1.6 Plug & Charge: the 2.0.1 certificate messages wrapped in DataTransfer.

The Open Charge Alliance's "Using ISO 15118 Plug & Charge with OCPP 1.6" (and libocpp's 1.6 charge point,
lib/ocpp/v16/charge_point_impl.cpp) carry SignCertificate, Get15118EVCertificate, GetCertificateStatus and
Authorize from the station as DataTransfer.req {vendorId "org.openchargealliance.iso15118pnc", messageId,
data = the 2.0.1 request payload as a JSON string}; the CSMS answers with DataTransfer.conf {status, data =
the 2.0.1 response payload as a JSON string}. In 1.6 the signed chain travels in a second message: the CSMS
sends DataTransfer.req {messageId "CertificateSigned", data = CertificateSignedRequest}.

POST /ocpp/v16/data-transfer takes the DataTransfer.req as the CSMS received it and answers
    {"conf": <DataTransfer.conf to send back>, "next": [<DataTransfer.req the CSMS sends next>, …]}
with "next" holding the CertificateSigned request after an accepted SignCertificate.

Also accepted: the variant some CSMSs bridge from Has2Be stations (MaEVe manager/handlers/has2be,
manager/ocpp/has2be): vendorId "iso15118", the same messageIds, Get15118EVCertificate with
`15118SchemaVersion` and no `action` (the EXI body says install or update), SignCertificate with
`typeOfCertificate`, Authorize with `15118CertificateHashData`.

Unknown vendorId → conf status UnknownVendorId; unknown messageId → UnknownMessageId; `data` that is not
JSON or not a valid payload of that message → Rejected with a reason in data (OCPP 1.6 §7.24
DataTransferStatus: "Rejected: message has been accepted but the contained request is rejected").
The HTTP status says what the conf says: 200 Accepted, 4xx otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.ocpp import core
from pki.context import Context
from pki.orgs import Principal

router = APIRouter(prefix="/ocpp/v16", tags=["ocpp 1.6"])

PNC_VENDOR = "org.openchargealliance.iso15118pnc"
HAS2BE_VENDOR = "iso15118"
DATA_MAX = 16_000  # the largest 2.0.1 payload (Get15118EVCertificate, 5600 characters of EXI) with room


class DataTransferReq(BaseModel):
    """OCPP 1.6 DataTransfer.req (schema DataTransfer.json: vendorId ≤ 255, messageId ≤ 50, data string)."""

    model_config = ConfigDict(extra="forbid")
    vendorId: str = Field(max_length=255)  # noqa: N815
    messageId: str | None = Field(default=None, max_length=50)  # noqa: N815
    data: str | None = Field(default=None, max_length=DATA_MAX)


class _Has2BeSign(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csr: str = Field(max_length=5500)
    typeOfCertificate: str | None = Field(default=None, max_length=40)  # noqa: N815


class _Has2BeGet15118(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_version: str = Field(alias="15118SchemaVersion", max_length=50)
    exiRequest: str = Field(max_length=5600)  # noqa: N815


class _Has2BeAuthorize(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    idToken: core.IdToken201  # noqa: N815
    hash_data: list[core.OCSPRequestData] | None = Field(default=None, alias="15118CertificateHashData",
                                                         max_length=4)


def _conf(status: str, data: dict[str, Any] | None, http: int = 200,
          nxt: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    conf: dict[str, Any] = {"status": status}
    if data is not None:
        conf["data"] = json.dumps(data, separators=(",", ":"))
    return JSONResponse({"conf": conf, "next": nxt or []}, status_code=http, headers=headers)


def _inner(reply: core.Reply) -> JSONResponse:
    ok = reply.http_status < 400
    return _conf("Accepted" if ok else "Rejected", reply.payload, reply.http_status, headers=reply.headers)


def _dispatch(ctx: Context, p: Principal, vendor: str, message: str, payload: Any) -> JSONResponse:
    has2be = vendor == HAS2BE_VENDOR
    if message == "SignCertificate":
        ctype: core.CertType | None
        if has2be:
            hb = _Has2BeSign.model_validate(payload)
            csr = hb.csr
            if hb.typeOfCertificate is None:
                ctype = None
            elif hb.typeOfCertificate == "V2GCertificate":
                ctype = "V2GCertificate"
            elif hb.typeOfCertificate == "ChargingStationCertificate":
                ctype = "ChargingStationCertificate"
            else:
                raise ValueError(f"typeOfCertificate {hb.typeOfCertificate!r} is not a 1.6 certificate type")
        else:
            sc = core.SignCertificate201.model_validate(payload)
            csr, ctype = sc.csr, sc.certificateType
        out = core.sign_certificate(ctx, p, csr, ctype, "1.6")
        if out.certificate_signed is None:
            return _inner(out.response)
        signed = out.certificate_signed
        if has2be:  # the Has2Be shape names the type typeOfCertificate
            signed = {"certificateChain": signed["certificateChain"], "typeOfCertificate": signed["certificateType"]}
        nxt = [{"vendorId": vendor, "messageId": "CertificateSigned",
                "data": json.dumps(signed, separators=(",", ":"))}]
        return _conf("Accepted", out.response.payload, nxt=nxt, headers=out.response.headers)
    if message == "Get15118EVCertificate":
        if has2be:
            g = _Has2BeGet15118.model_validate(payload)
            reply = core.get_15118_ev_certificate(ctx, p, g.schema_version, None, g.exiRequest, "1.6")
        else:
            g2 = core.Get15118EVCertificate201.model_validate(payload)
            reply = core.get_15118_ev_certificate(ctx, p, g2.iso15118SchemaVersion, g2.action, g2.exiRequest, "1.6")
        return _inner(reply)
    if message == "GetCertificateStatus":
        st = core.GetCertificateStatus.model_validate(payload)
        return _inner(core.get_certificate_status(ctx, st.ocspRequestData, "1.6"))
    if message == "Authorize":
        if has2be:
            ha = _Has2BeAuthorize.model_validate(payload)
            body = core.Authorize201(idToken=ha.idToken, iso15118CertificateHashData=ha.hash_data)
        else:
            body = core.Authorize201.model_validate(payload)
        return _inner(core.authorize(ctx, p, body))
    raise LookupError(message)


@router.post("/data-transfer", response_model=None)
def data_transfer(req: DataTransferReq, ctx: CtxDep, p: PrincipalDep) -> JSONResponse:
    p.require("cpo", "admin")
    if req.vendorId not in (PNC_VENDOR, HAS2BE_VENDOR):
        return _conf("UnknownVendorId", None, 400)
    message = req.messageId or ""
    if message not in ("SignCertificate", "Get15118EVCertificate", "GetCertificateStatus", "Authorize"):
        return _conf("UnknownMessageId", None, 400)
    try:
        payload = json.loads(req.data or "")
    except ValueError:
        return _conf("Rejected", core.rejection(message, "InvalidRequest", "data is not a JSON string", "1.6"), 400,
                     headers={"X-V2GPKI-Problem": "bad-request"})
    try:
        return _dispatch(ctx, p, req.vendorId, message, payload)
    except (ValidationError, ValueError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        where = ".".join(str(x) for x in exc.errors()[0]["loc"]) if isinstance(exc, ValidationError) else ""
        return _conf("Rejected", core.rejection(message, "InvalidRequest", f"{where} {detail}".strip(), "1.6"), 400,
                     headers={"X-V2GPKI-Problem": "bad-request"})


def setup(app: FastAPI) -> None:
    app.include_router(router)
