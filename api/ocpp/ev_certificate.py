"""OCPP 2.0.1 Get15118EVCertificate and the JSON contract-installation API (CPS).

POST /ocpp/v201/get-15118-ev-certificate {iso15118SchemaVersion, action: Install|Update, exiRequest}
  → {status: Accepted|Failed, exiResponse}: the whole EXI V2G_Message, base64, SessionID copied from the
  request. exiResponse is present even when the answer is Failed (then a FAILED_* V2G_Message), within
  OCPP's limits (exiRequest ≤ 5600, exiResponse ≤ 7500 characters).
POST /v1/contract-installations, /v1/contract-updates: the same with JSON around it (installations: ISO
  15118-2 or -20, #26; -20 has no update).
POST /v1/contract-data {pcid}: signed contract data prepared ahead of time for a registered vehicle,
  GET /v1/contract-data?pcid=|emaid= to look it up (the pool shape of the hosted platforms).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from cryptography import x509
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api import blocking, hot
from api.auth import PrincipalDep
from api.deps import CtxDep
from api.ocpp import core
from api.problems import status_of
from pki.contracts import default_contract_for, lookup_vehicle
from pki.cps.exi.messages import ResponseCode
from pki.cps.service import EXI_REQUEST_MAX_B64, Delivery, build_delivery, deliver
from pki.errors import NotFound, PKIError
from pki.names import normalise_pcid
from pki.orgs import Principal
from pki.store.contracts import Contracts
from pki.store.db import utcnow
from pki.store.models import SignedContractData

router = APIRouter(tags=["cps"])

ISO2 = core.ISO2


# The OCPP 2.0.1 request model.
EvCertificateIn = core.Get15118EVCertificate201


def _decode(b64: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise PKIError("exiRequest is not base64") from None


@router.post("/ocpp/v201/get-15118-ev-certificate", response_model=None,
             openapi_extra=hot.openapi_extra(EvCertificateIn))
async def get_15118_ev_certificate(request: Request) -> JSONResponse:
    """Get15118EVCertificateResponse {status, exiResponse[, statusInfo]}, exactly (api/ocpp/core.py): the
    action is checked against the EXI body and the answer's size bounded before anything is issued. async:
    on SQLite the installation runs on the event loop, else in a pool (api/blocking.py says why); the
    caller and the body are read by api/hot.py, as for the other hot POSTs."""
    p, body, _ = await hot.read(request, EvCertificateIn)
    ctx = blocking.context(request)
    reply = await blocking.run_installation(ctx, core.get_15118_ev_certificate, ctx, p, body.iso15118SchemaVersion,
                                            body.action, body.exiRequest, "2.0.1")
    return reply.response()


class ContractInstallIn(BaseModel):
    # ISO 15118-2 requests stay within OCPP 2.0.1's 5600 characters (checked below); ISO 15118-20 ones may use
    # OCPP 2.1's 11000 (#26).
    exiRequest: str = Field(max_length=11000)  # noqa: N815
    # optional: ISO 15118-2 or -20 (core.ISO2 / core.ISO20); absent, the EXI body says which
    iso15118SchemaVersion: str | None = Field(default=None, max_length=50)  # noqa: N815


def _elements20(d: Any) -> dict[str, Any]:
    """The JSON of a -20 answer (pki.cps.service20.Delivery20): the EXI and, when OK, its parts."""
    from cryptography.hazmat.primitives import serialization

    from pki.cps.exi.messages20 import CertificateInstallationRes20, decode_message20

    out: dict[str, Any] = {"responseCode": d.response_code, "exiResponse": base64.b64encode(d.exi).decode(),
                           "emaid": d.emaid, "contractSerial": d.contract_serial.upper() if d.contract_serial else None,
                           "remainingContractCertificateChains": d.remaining}
    res = decode_message20(d.exi)
    if d.response_code == "OK" and isinstance(res, CertificateInstallationRes20):
        def pems(chain: Any) -> list[str]:
            return [x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM).decode()
                    for c in (chain.certificate, *chain.sub_certificates)]

        sd = res.signed_installation_data
        out.update(contractCertificateChain=pems(sd.contract_chain), cpsCertificateChain=pems(res.cps_chain),
                   ecdhCurve=sd.ecdh_curve, dhPublicKey=base64.b64encode(sd.dh_public_key).decode(),
                   encryptedPrivateKey=base64.b64encode(sd.encrypted_private_key).decode())
    else:
        out["problems"] = d.notes
    return out


def _elements(d: Delivery) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    body = d.message.body
    out: dict[str, Any] = {"responseCode": str(d.response_code), "exiResponse": base64.b64encode(d.exi).decode(),
                           "emaid": d.emaid, "contractSerial": d.contract_serial.upper() if d.contract_serial else None}
    if d.response_code == ResponseCode.OK and body is not None:
        def pems(chain: Any) -> list[str]:
            return [x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM).decode()
                    for c in (chain.certificate, *chain.sub_certificates)]

        out.update(
            contractSignatureCertChain=pems(body.contract_signature_cert_chain),  # type: ignore[union-attr]
            saProvisioningCertificateChain=pems(body.sa_provisioning_certificate_chain),  # type: ignore[union-attr]
            contractSignatureEncryptedPrivateKey=base64.b64encode(
                body.contract_signature_encrypted_private_key.value).decode(),  # type: ignore[union-attr]
            dhPublicKey=base64.b64encode(body.dh_public_key.value).decode(),  # type: ignore[union-attr]
        )
    else:
        out["problems"] = d.notes
    return out


def _own_scope(p: Principal) -> str | None:
    """An eMSP gets only its own contracts, as from /v1/contract-data (#21 item 2); a CPO forwards for
    any vehicle (the Get15118EVCertificate role), an admin sees all."""
    return p.org if p.role == "emsp" else None


def _is_iso20(exi: bytes) -> bool:
    from pki.cps.exi.messages20 import CERTIFICATE_INSTALLATION_REQ, decode_message20_tree

    try:
        return decode_message20_tree(exi).qname == CERTIFICATE_INSTALLATION_REQ
    except PKIError:
        return False


@router.post("/v1/contract-installations")
def contract_installation(body: ContractInstallIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    """ISO 15118-2 CertificateInstallationReq, or (#26) ISO 15118-20 CertificateInstallationReq: by
    iso15118SchemaVersion, or, absent, by which grammar the EXI body is (tried -2 first: its speed is kept)."""
    from pki.cps.service20 import deliver20

    p.require("cpo", "emsp", "admin")
    schema = body.iso15118SchemaVersion
    if schema is not None and schema != ISO2 and schema not in core.ISO20:
        raise PKIError(f"iso15118SchemaVersion {schema!r} is not supported ({ISO2} or {core.ISO20[0]})")
    exi = _decode(body.exiRequest)
    if schema in core.ISO20 or schema is None and len(body.exiRequest) > EXI_REQUEST_MAX_B64 and _is_iso20(exi):
        return _elements20(deliver20(ctx, exi, actor=p.credential, emsp=_own_scope(p)))
    if len(body.exiRequest) > EXI_REQUEST_MAX_B64:
        raise PKIError(f"an ISO 15118-2 exiRequest has at most {EXI_REQUEST_MAX_B64} characters")
    try:
        return _elements(deliver(ctx, exi, actor=p.credential, expect="install", emsp=_own_scope(p)))
    except PKIError as exc:
        if schema is None and (status_of(exc) or 500) < 500 and _is_iso20(exi):
            return _elements20(deliver20(ctx, exi, actor=p.credential, emsp=_own_scope(p)))
        raise


@router.post("/v1/contract-updates")
def contract_update(body: ContractInstallIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    p.require("cpo", "emsp", "admin")
    return _elements(deliver(ctx, _decode(body.exiRequest), actor=p.credential, expect="update",
                             emsp=_own_scope(p)))


class ContractDataIn(BaseModel):
    pcid: str = Field(max_length=18)


@router.post("/v1/contract-data", status_code=201)
def prepare_contract_data(body: ContractDataIn, ctx: CtxDep, p: PrincipalDep) -> dict[str, Any]:
    """Sign contract data ahead of time for a vehicle whose provisioning certificate is in the pool."""
    p.require("emsp", "admin")
    # An eMSP prepares its own default contract for the PCID (one default per PCID and eMSP, #21 item 1).
    contract = default_contract_for(ctx, body.pcid, _own_scope(p))
    if contract is None or (p.role != "admin" and contract.emsp != p.org):
        raise NotFound(f"no active contract of yours for PCID {normalise_pcid(body.pcid)}")
    pool = lookup_vehicle(ctx, p, body.pcid)
    if not pool:
        raise NotFound("no provisioning certificate registered for this PCID (/v1/provisioning-certificates)")
    vehicle_cert = x509.load_der_x509_certificate(pool[0].der)
    d = build_delivery(ctx, contract, vehicle_cert, None, b"\x00", update=False, actor=p.credential)
    data = _elements(d)
    Contracts(ctx.db).add_signed_data(SignedContractData(
        contract_id=contract.id or 0, pcid=contract.pcid, emaid=contract.emaid, cert_serial=d.contract_serial or "",
        payload=data, created_at=utcnow()))
    return data


@router.get("/v1/contract-data")
def get_contract_data(ctx: CtxDep, p: PrincipalDep, pcid: Annotated[str | None, Query(max_length=18)] = None,
                      emaid: Annotated[str | None, Query(max_length=40)] = None) -> list[dict[str, Any]]:
    from pki.names import normalise_emaid

    if not pcid and not emaid:
        raise PKIError("give pcid or emaid")
    rows = Contracts(ctx.db).signed_data(pcid=normalise_pcid(pcid) if pcid else "",
                                         emaid=normalise_emaid(emaid) if emaid else "",
                                         emsp=None if p.sees_all else p.org)
    return [{**r.payload, "created_at": r.created_at} for r in rows]


def setup(app: FastAPI) -> None:
    app.include_router(router)
