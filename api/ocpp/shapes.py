"""Every OCPP rejection this service answers, in the shape of the message's own response.

A CSMS forwards /ocpp/* answers to the charging station unchanged, so a refusal is that message's response
(valid against the version's JSON schema), never a problem document: a refused CSR, a failed installation,
an OCSP lookup that failed, a request that is not a valid message of its version. api/ocpp/core.py answers
the messages; this module only shapes refusals, so api/problems.py can use it for malformed requests
without depending on the messages' logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi.responses import JSONResponse

Version = Literal["1.6", "2.0.1", "2.1"]
VENDOR_ID = "org.v2gpki"  # our customData.vendorId (OCPP CustomDataType: identifies who added the data)


@dataclass(frozen=True)
class VersionLimits:
    """maxLength of the fields this service reads or writes, per version's JSON schemas."""

    csr: int = 5500
    chain: int = 10000  # CertificateSignedRequest.certificateChain
    exi_request: int = 5600
    exi_response: int = 7500
    ocsp_result: int = 5500
    additional_info: int = 512  # StatusInfoType.additionalInfo
    authorize_certificate: int = 5500
    id_token: int = 36


LIMITS: dict[Version, VersionLimits] = {
    "1.6": VersionLimits(),  # the 2.0.1 payloads, carried as JSON strings
    "2.0.1": VersionLimits(),
    "2.1": VersionLimits(exi_request=11000, exi_response=17000, ocsp_result=18000, additional_info=1024,
                         authorize_certificate=10000, id_token=255),
}


def status_info(reason: str, detail: str, version: Version) -> dict[str, str]:
    """StatusInfoType: reasonCode is a CiString20, additionalInfo 512 (2.0.1) or 1024 (2.1) characters."""
    return {"reasonCode": reason[:20], "additionalInfo": detail[:LIMITS[version].additional_info]}


def iso_time(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- refusing a request that is not a valid message of its version ------------------------------------------


def _reason_data(info: dict[str, str]) -> dict[str, str]:
    return {"vendorId": VENDOR_ID, "reasonCode": info["reasonCode"], "detail": info["additionalInfo"]}


def rejection(message: str, reason: str, detail: str, version: Version) -> dict[str, Any]:
    """The answer of ``message`` that refuses the request, valid against that message's response schema:
    every OCPP rejection of this service is built here (a refused CSR, a failed installation, a malformed
    request a CSMS forwards as it is). Get15118EVCertificate's exiResponse is required even when Failed;
    no EXI message could be answered, so it is empty."""
    info = status_info(reason, detail, version)
    if message == "SignCertificate":
        return {"status": "Rejected", "statusInfo": info}
    if message == "Get15118EVCertificate":
        return {"status": "Failed", "exiResponse": "", "statusInfo": info}
    if message == "GetCertificateStatus":
        return {"status": "Failed", "statusInfo": info}
    if message == "Authorize":  # AuthorizeResponse has no statusInfo: the reason goes in customData
        return {"idTokenInfo": {"status": "Invalid"}, "customData": _reason_data(info)}
    if message == "GetCertificateChainStatus":
        # certificateStatus needs ≥ 1 entry and the request could not be read: one Failed entry with empty
        # hash data (the schema's strings have no minimum length), the reason in customData.
        empty = {"hashAlgorithm": "SHA256", "issuerNameHash": "", "issuerKeyHash": "", "serialNumber": ""}
        return {"certificateStatus": [{"certificateHashData": empty, "source": "OCSP", "status": "Failed",
                                       "nextUpdate": iso_time(datetime.now(UTC))}],
                "customData": _reason_data(info)}
    raise KeyError(message)


# path → (message, version): the OCPP endpoints whose malformed requests get their message's rejection
OCPP_PATHS: dict[str, tuple[str, Version]] = {
    "/ocpp/v201/sign-certificate": ("SignCertificate", "2.0.1"),
    "/ocpp/v201/get-15118-ev-certificate": ("Get15118EVCertificate", "2.0.1"),
    "/ocpp/v201/get-certificate-status": ("GetCertificateStatus", "2.0.1"),
    "/ocpp/v201/authorize": ("Authorize", "2.0.1"),
    "/ocpp/v21/sign-certificate": ("SignCertificate", "2.1"),
    "/ocpp/v21/get-15118-ev-certificate": ("Get15118EVCertificate", "2.1"),
    "/ocpp/v21/get-certificate-status": ("GetCertificateStatus", "2.1"),
    "/ocpp/v21/authorize": ("Authorize", "2.1"),
    "/ocpp/v21/get-certificate-chain-status": ("GetCertificateChainStatus", "2.1"),
}


# trust-store plans: a malformed request gets an empty plan (nothing to send), HTTP 400
PLAN_PATHS = ("/ocpp/v201/trust-store-plan", "/ocpp/v21/trust-store-plan")


def invalid_request(path: str, detail: str) -> JSONResponse | None:
    """A request body that fails its model on an OCPP path: that message's rejection, HTTP 400."""
    if path in PLAN_PATHS:
        return JSONResponse({"install": [], "delete": []}, status_code=400,
                            headers={"X-V2GPKI-Problem": "invalid-request",
                                     "X-V2GPKI-Detail": detail[:200].encode("ascii", "replace").decode()})
    if path == "/ocpp/v16/data-transfer":
        body = {"conf": {"status": "Rejected"}, "next": []}
        return JSONResponse(body, status_code=400, headers={"X-V2GPKI-Problem": "invalid-request"})
    hit = OCPP_PATHS.get(path)
    if hit is None:
        return None
    return JSONResponse(rejection(hit[0], "InvalidRequest", detail, hit[1]), status_code=400,
                        headers={"X-V2GPKI-Problem": "invalid-request"})
