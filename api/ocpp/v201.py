"""OCPP 2.0.1 SignCertificate → CertificateSigned, as one call for the CSMS.

The CSMS forwards the station's SignCertificateRequest {csr, certificateType}; we answer with what its
CertificateSignedRequest needs: certificateChain (leaf, Sub-CA 2, Sub-CA 1 — no root, as chargers expect)
and certificateType. A rejection carries an OCPP-style reasonCode (OCPP 2.0.1 StatusInfoType).

certificateType may be absent: the OCPP schema says it means both, and after TriggerMessage
SignCombinedCertificate a charger sends none. The rule is V2GPKI_OCPP_DEFAULT_CERT_TYPE:
  infer (default) — V2GCertificate when the CSR's CN is an EVSEID/SECCID or it asks for DC=CPO,
                    otherwise ChargingStationCertificate;
  V2GCertificate | ChargingStationCertificate — always that type.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import CtxDep
from api.problems import PROBLEM, TYPE_BASE
from pki.cps.exi import CertificateUpdateRes
from pki.csr import key_alg_of, parse_csr, subject_fields
from pki.enrollment import enroll
from pki.errors import BadCSR, BadKey, BadSignature, BadSubject, CertificateTooLarge, Forbidden, PKIError
from pki.names import EVSEID_RE, SECCID_RE

router = APIRouter(prefix="/ocpp/v201", tags=["ocpp"])

OCPP_CSR_MAX = 5500  # SignCertificateRequest.csr maxLength
OCPP_CHAIN_MAX = 10000  # CertificateSignedRequest.certificateChain maxLength

CertType = Literal["V2GCertificate", "ChargingStationCertificate"]


class SignCertificateIn(BaseModel):
    csr: str = Field(max_length=OCPP_CSR_MAX)
    certificateType: CertType | None = None  # noqa: N815 - OCPP field name


def _reason(exc: PKIError) -> str:
    if isinstance(exc, BadSignature | BadCSR | BadKey | BadSubject):
        return "InvalidCSR"
    if isinstance(exc, Forbidden):
        return "NotAuthorized"  # not an OCPP-enumerated code; reasonCode is free text (CiString20)
    if isinstance(exc, CertificateTooLarge):
        return "InvalidCSR"
    return "InternalError"


def _rejected(status: int, exc: PKIError) -> JSONResponse:
    body = {"type": TYPE_BASE + exc.code, "title": "Rejected", "status": status, "detail": exc.message,
            "ocppStatus": "Rejected", "statusInfo": {"reasonCode": _reason(exc), "additionalInfo": exc.message[:512]}}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def infer_type(csr_text: str) -> CertType:
    rule = os.environ.get("V2GPKI_OCPP_DEFAULT_CERT_TYPE", "infer")
    if rule in ("V2GCertificate", "ChargingStationCertificate"):
        return rule  # type: ignore[return-value]
    fields = subject_fields(parse_csr(csr_text).subject)
    cn = fields.cn.upper()
    if (fields.dc or "").upper() == "CPO" or EVSEID_RE.match(cn) or SECCID_RE.match(cn):
        return "V2GCertificate"
    return "ChargingStationCertificate"


@router.post("/sign-certificate", response_model=None)
def sign_certificate(body: SignCertificateIn, ctx: CtxDep, p: PrincipalDep) -> Any:
    try:
        ctype = body.certificateType or infer_type(body.csr)
        if ctype == "V2GCertificate":
            alg = key_alg_of(parse_csr(body.csr).public_key())
            profile = "secc" if alg.value == "p256" else "secc-20"
        else:
            profile = "cs-client"
        res = enroll(ctx, p, profile, body.csr)
    except Forbidden as exc:
        return _rejected(403, exc)
    except PKIError as exc:
        if exc.status >= 500:
            raise
        return _rejected(400, exc)
    chain = res.issued.pem_chain(include_root=False)
    if len(chain) > OCPP_CHAIN_MAX:
        # Cannot happen with ≤ 800-byte V2G certificates (3 × ~1.1 kB PEM); guard the schema limit anyway.
        return _rejected(422, CertificateTooLarge(f"certificate chain is {len(chain)} characters (> 10000)"))
    return JSONResponse({"status": "Accepted", "certificateChain": chain, "certificateType": ctype,
                         "serialNumber": res.issued.serial.upper(), "issuer": res.issued.issuer})


def setup(app: FastAPI) -> None:
    app.include_router(router)


def _action_matches(action: str, delivery: object) -> bool:
    """OCPP action Install ↔ CertificateInstallationReq, Update ↔ CertificateUpdateReq."""
    # imported at module level: a function-level `from <package> import` runs importlib's Python
    # _handle_fromlist on every call (≈ 1 % of a worker's samples under bench/contract.py)
    body = getattr(getattr(delivery, "message", None), "body", None)
    return (action == "Update") == isinstance(body, CertificateUpdateRes)
