"""The OCPP certificate messages, once for every OCPP version.

A CSMS hands this service the payload a charging station sent and forwards what comes back, unchanged, to
the station. So every answer here is exactly an OCPP message of the caller's version, valid against that
version's JSON schema (the schemas have `additionalProperties: false`; libocpp validates what it
receives): anything else the service has to say travels in `customData` (OCPP CustomDataType, with our
`vendorId`) or in response headers.

The table of every OCPP message per version and the endpoint that serves it is in docs/api.md.

Request models forbid fields their version does not define (a 2.1 field in a 2.0.1 message is a wrong
version, refused), and allow `customData` everywhere, as the schemas do.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.x509 import ocsp as x509_ocsp
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.ocpp.shapes import LIMITS, VENDOR_ID, Version, iso_time, rejection, status_info
from api.problems import status_of
from pki.context import Context
from pki.contracts import authorize as authorize_contract
from pki.contracts import find_by_hash_data
from pki.cps.errors import CPSError, ResponseTooLarge
from pki.cps.exi.messages import ResponseCode
from pki.cps.service import deliver
from pki.crl import latest_meta
from pki.enrollment import StationCertType, enroll_station
from pki.errors import BadCSR, BadKey, BadSignature, BadSubject, CertificateTooLarge, Forbidden, PKIError
from pki.issuance import CAHandle
from pki.ocsp import ocpp_lookup
from pki.orgs import Principal
from pki.roots import CertHashData, UnknownRoot

ISO2 = "urn:iso:15118:2:2013:MsgDef"
ISO20 = ("urn:iso:std:iso:15118:-20:CommonMessages", "urn:iso:15118:20:2020:MsgDef")  # OCPP/Josev, OPCP/OPNC


@dataclass(frozen=True)
class Reply:
    """One OCPP payload to forward, the HTTP status that says whether it was a success, extra headers."""

    payload: dict[str, Any]
    http_status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload, status_code=self.http_status, headers=self.headers)


def http_status_of(exc: PKIError) -> int:
    """The HTTP status of an OCPP rejection: the problem status (api/problems.py) when it is a 4xx, else 400."""
    status = status_of(exc) or 500
    return status if 400 <= status < 500 else 400


def _server_side(exc: PKIError) -> bool:
    """A failure of this service (configuration, clock, HSM), not of the request: raised, never rejected."""
    return (status_of(exc) or 500) >= 500


# -- request models -------------------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customData: dict[str, Any] | None = None  # noqa: N815 - OCPP field names throughout


class CertificateHashData(_Msg):
    hashAlgorithm: Literal["SHA256", "SHA384", "SHA512"]  # noqa: N815
    issuerNameHash: str = Field(min_length=1, max_length=128)  # noqa: N815
    issuerKeyHash: str = Field(min_length=1, max_length=128)  # noqa: N815
    serialNumber: str = Field(min_length=1, max_length=40)  # noqa: N815

    def data(self) -> CertHashData:
        return CertHashData(self.hashAlgorithm, self.issuerNameHash, self.issuerKeyHash, self.serialNumber)


class SignCertificate201(_Msg):
    csr: str = Field(max_length=5500)
    certificateType: Literal["V2GCertificate", "ChargingStationCertificate"] | None = None  # noqa: N815


class SignCertificate21(_Msg):
    csr: str = Field(max_length=5500)
    certificateType: Literal["V2GCertificate", "ChargingStationCertificate", "V2G20Certificate"] | None = None  # noqa: N815
    hashRootCertificate: CertificateHashData | None = None  # noqa: N815
    requestId: int | None = None  # noqa: N815


class Get15118EVCertificate201(_Msg):
    iso15118SchemaVersion: str = Field(max_length=50)  # noqa: N815
    action: Literal["Install", "Update"]
    exiRequest: str = Field(max_length=5600)  # noqa: N815


class Get15118EVCertificate21(_Msg):
    iso15118SchemaVersion: str = Field(max_length=50)  # noqa: N815
    action: Literal["Install", "Update"]
    exiRequest: str = Field(max_length=11000)  # noqa: N815
    maximumContractCertificateChains: int | None = Field(default=None, ge=0)  # noqa: N815
    prioritizedEMAIDs: list[str] | None = Field(default=None, min_length=1, max_length=8)  # noqa: N815


class OCSPRequestData(_Msg):
    # Lenient where chargers differ (any case; validated by pki.ocsp with a clear answer) and where a
    # missing value harms nobody (responderURL, never fetched anyway).
    hashAlgorithm: str = Field(max_length=16)  # noqa: N815
    issuerNameHash: str = Field(min_length=1, max_length=128)  # noqa: N815
    issuerKeyHash: str = Field(min_length=1, max_length=128)  # noqa: N815
    serialNumber: str = Field(min_length=1, max_length=40)  # noqa: N815
    responderURL: str = Field(default="", max_length=2000)  # noqa: N815 - never fetched (no SSRF)


class GetCertificateStatus(_Msg):
    ocspRequestData: OCSPRequestData  # noqa: N815


class IdToken201(_Msg):
    idToken: str = Field(max_length=36)  # noqa: N815
    type: str = Field(default="eMAID", max_length=20)
    additionalInfo: list[dict[str, Any]] | None = None  # noqa: N815


class IdToken21(IdToken201):
    idToken: str = Field(max_length=255)  # noqa: N815


class Authorize201(_Msg):
    idToken: IdToken201  # noqa: N815
    certificate: str | None = Field(default=None, max_length=5500)
    iso15118CertificateHashData: list[OCSPRequestData] | None = Field(default=None, min_length=1,  # noqa: N815
                                                                      max_length=4)


class Authorize21(_Msg):
    idToken: IdToken21  # noqa: N815
    certificate: str | None = Field(default=None, max_length=10000)
    iso15118CertificateHashData: list[OCSPRequestData] | None = Field(default=None, min_length=1,  # noqa: N815
                                                                      max_length=4)


class CertificateStatusRequestInfo(_Msg):
    certificateHashData: CertificateHashData  # noqa: N815
    source: Literal["CRL", "OCSP"]
    urls: list[str] = Field(min_length=1, max_length=5)


class GetCertificateChainStatus21(_Msg):
    certificateStatusRequests: list[CertificateStatusRequestInfo] = Field(min_length=1, max_length=4)  # noqa: N815


# GetInstalledCertificateIdsResponse as a station sends it (OCPP 2.0.1 Part 2 M03; 2.1 adds OEMRootCertificate),
# inside the trust-store plan request (pki/truststore_plan.py, #27 item 1).
_IdUse201 = Literal["V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate", "V2GCertificateChain",
                    "ManufacturerRootCertificate"]
_IdUse21 = Literal["V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate", "V2GCertificateChain",
                   "ManufacturerRootCertificate", "OEMRootCertificate"]


class StatusInfo(_Msg):
    reasonCode: str = Field(max_length=20)  # noqa: N815
    additionalInfo: str | None = Field(default=None, max_length=1024)  # noqa: N815


class CertificateHashDataChain201(_Msg):
    certificateType: _IdUse201  # noqa: N815
    certificateHashData: CertificateHashData  # noqa: N815
    childCertificateHashData: list[CertificateHashData] | None = Field(default=None, min_length=1,  # noqa: N815
                                                                       max_length=4)


class CertificateHashDataChain21(CertificateHashDataChain201):
    certificateType: _IdUse21  # type: ignore[assignment]  # noqa: N815


class GetInstalledCertificateIds201(_Msg):
    status: Literal["Accepted", "NotFound"]
    statusInfo: StatusInfo | None = None  # noqa: N815
    # the schema sets no upper bound; 256 entries is far beyond any station's store
    certificateHashDataChain: list[CertificateHashDataChain201] | None = Field(  # noqa: N815
        default=None, min_length=1, max_length=256)


class GetInstalledCertificateIds21(GetInstalledCertificateIds201):
    certificateHashDataChain: list[CertificateHashDataChain21] | None = Field(  # type: ignore[assignment]  # noqa: N815
        default=None, min_length=1, max_length=256)


class TrustStorePlan201(BaseModel):
    """POST /ocpp/v201/trust-store-plan: the station and what it reported (OCPP 2.0.1)."""

    model_config = ConfigDict(extra="forbid")
    stationId: str = Field(min_length=1, max_length=64)  # noqa: N815 - the identity registered via /v1/stations
    installed: GetInstalledCertificateIds201


class TrustStorePlan21(TrustStorePlan201):
    installed: GetInstalledCertificateIds21  # type: ignore[assignment]


# -- SignCertificate -------------------------------------------------------------------------------------

CertType = StationCertType  # OCPP CertificateSigningUseEnumType (pki/enrollment.py)


def _sign_reason(exc: PKIError) -> str:
    if isinstance(exc, BadSignature | BadCSR | BadKey | BadSubject | CertificateTooLarge):
        return "InvalidCSR"
    if isinstance(exc, Forbidden):
        return "NotAuthorized"  # reasonCode is free text (CiString20); OCPP names no code for this
    if isinstance(exc, UnknownRoot):
        return "UnknownRoot"
    return "InvalidRequest"


@dataclass(frozen=True)
class SignOutcome:
    """SignCertificateResponse for the station, and, when accepted, the CertificateSignedRequest the CSMS
    sends it next."""

    response: Reply
    certificate_signed: dict[str, Any] | None


def sign_certificate(ctx: Context, p: Principal, csr: str, cert_type: CertType | None, version: Version, *,
                     request_id: int | None = None, hash_root: CertHashData | None = None) -> SignOutcome:
    try:
        # The RA chooses the certificate type (when absent) and the profile, and parses the CSR once.
        station = enroll_station(ctx, p, csr, cert_type, hash_root=hash_root)
    except PKIError as exc:
        if _server_side(exc):
            raise
        reject = rejection("SignCertificate", _sign_reason(exc), exc.message, version)
        return SignOutcome(Reply(reject, http_status_of(exc), {"X-V2GPKI-Problem": exc.code}), None)
    res, ctype = station.result, station.cert_type
    chain = res.issued.pem_chain(include_root=False)  # leaf, Sub-CA 2, Sub-CA 1: no root, as stations expect
    if len(chain) > LIMITS[version].chain:
        # Cannot happen with ≤ 800-byte (-2) or ≤ 1600-byte (-20) certificates; the schema's bound anyway.
        reject = rejection("SignCertificate", "InvalidCSR", "certificate chain too long", version)
        return SignOutcome(Reply(reject, 422, {"X-V2GPKI-Problem": "certificate-too-large"}), None)
    signed: dict[str, Any] = {"certificateChain": chain, "certificateType": ctype}
    if request_id is not None:
        signed["requestId"] = request_id  # OCPP 2.1: correlates CertificateSigned with SignCertificate
    signed["customData"] = {"vendorId": VENDOR_ID, "serialNumber": res.issued.serial.upper(),
                            "issuer": res.issued.issuer}
    headers = {"X-V2GPKI-Serial": res.issued.serial.upper(), "X-V2GPKI-Issuer": res.issued.issuer}
    return SignOutcome(Reply({"status": "Accepted"}, 200, headers), signed)


# -- Get15118EVCertificate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EvAnswer:
    """What either CPS path answered, in the terms the OCPP reply needs."""

    exi: bytes
    ok: bool
    code: str  # ISO 15118 ResponseCode
    notes: list[str]
    remaining: int  # RemainingContractCertificateChains (-2: always 0, one contract per exchange)


def _cps_answer(ctx: Context, p: Principal, iso20: bool, action: str | None, exi: bytes, version: Version,
                maximum: int | None, prioritized: list[str] | None) -> _EvAnswer:
    """The one place ISO 15118-2 and -20 differ: which CPS answers, and what the transport's limits ask of
    it. -2 (pki.cps.service, §8.4.3.11/12): Install or Update as the action says, one contract, the 2.0.1
    exiResponse bound; maximumContractCertificateChains/prioritizedEMAIDs are "absent during ISO 15118-2" and
    ignored. -20 (pki.cps.service20, #26): Install only (no CertificateUpdate), the OCPP 2.1 copies of the
    EXI's MaximumContractCertificateChains/PrioritizedEMAIDs must agree with it, bounded by this version's
    exiResponse limit before anything is issued."""
    if not iso20:
        d = deliver(ctx, exi, actor=p.credential,
                    expect=None if action is None else "update" if action == "Update" else "install")
        return _EvAnswer(d.exi, d.response_code == ResponseCode.OK, str(d.response_code), d.notes, 0)
    from pki.cps.service20 import deliver20

    if action == "Update":
        raise CPSError("ISO 15118-20 has no CertificateUpdate; use action Install")
    d20 = deliver20(ctx, exi, actor=p.credential, maximum=maximum, prioritized=prioritized,
                    max_b64=LIMITS[version].exi_response)
    return _EvAnswer(d20.exi, d20.response_code == "OK", d20.response_code, d20.notes, d20.remaining)


def get_15118_ev_certificate(ctx: Context, p: Principal, schema_version: str, action: str | None, exi_b64: str,
                             version: Version, maximum: int | None = None,
                             prioritized: list[str] | None = None) -> Reply:
    """The EXI request in, the EXI answer out, for ISO 15118-2 (§8.4.3.11/12) and ISO 15118-20 (#26) alike:
    the schema decides the CPS (_cps_answer), everything else is shared. ``action`` None: the 1.6 bridge
    variant without one; the EXI body says which."""
    def failed(http: int, reason: str, detail: str, code: str) -> Reply:
        return Reply(rejection("Get15118EVCertificate", reason, detail, version), http, {"X-V2GPKI-Problem": code})

    p.require("cpo", "admin")
    iso20 = schema_version in ISO20
    if not iso20 and schema_version != ISO2:
        return failed(400, "UnsupportedSchema", f"iso15118SchemaVersion {schema_version!r} is not supported "
                      f"(this CPS speaks {ISO2} and {ISO20[0]})", "unsupported-schema")
    try:
        exi = base64.b64decode(exi_b64, validate=True)
    except (binascii.Error, ValueError):
        return failed(400, "InvalidRequest", "exiRequest is not base64", "bad-request")
    try:
        a = _cps_answer(ctx, p, iso20, action, exi, version, maximum, prioritized)
    except ResponseTooLarge as exc:
        return failed(422, "ResponseTooLarge", exc.message, exc.code)
    except Forbidden:
        raise
    except PKIError as exc:
        if _server_side(exc):
            raise
        return failed(400, "InvalidRequest", exc.message, exc.code)
    b64 = base64.b64encode(a.exi).decode()
    if len(b64) > LIMITS[version].exi_response:
        return failed(422, "ResponseTooLarge", f"exiResponse would be {len(b64)} characters", "response-too-large")
    out: dict[str, Any] = {"status": "Accepted" if a.ok else "Failed", "exiResponse": b64}
    if not a.ok:
        out["statusInfo"] = status_info(a.code, "; ".join(a.notes), version)
    if version == "2.1":
        out["remainingContracts"] = a.remaining
    return Reply(out)


# -- GetCertificateStatus, Authorize, GetCertificateChainStatus -------------------------------------------

_OCSP_REASONS = {"unauthorized": "UnknownIssuer", "tryLater": "TryLater", "internalError": "InternalError",
                 "malformedRequest": "InvalidRequest"}


def get_certificate_status(ctx: Context, data: OCSPRequestData, version: Version) -> Reply:
    """An OCSP answer for a certificate of the station's own chain, from our records; responderURL is
    never fetched (server-side request forgery)."""
    try:
        ans = ocpp_lookup(ctx, data.hashAlgorithm, data.issuerNameHash, data.issuerKeyHash, data.serialNumber)
    except PKIError as exc:
        return Reply(rejection("GetCertificateStatus", "InvalidRequest", exc.message, version), 400,
                     {"X-V2GPKI-Problem": exc.code})
    if not ans.successful:
        return Reply(rejection("GetCertificateStatus", _OCSP_REASONS.get(ans.status, "InternalError"),
                               f"OCSP responder answered {ans.status}", version))
    result = base64.b64encode(ans.der).decode()
    if len(result) > LIMITS[version].ocsp_result:
        return Reply(rejection("GetCertificateStatus", "ResponseTooLarge", "", version))
    return Reply({"status": "Accepted", "ocspResult": result})


def authorize(ctx: Context, p: Principal, body: Authorize201 | Authorize21) -> Reply:
    """AuthorizeRequest for a contract (idToken type eMAID) → idTokenInfo + certificateStatus (OCPP 2.0.1
    §C07). cpo and admin only: any other role would get an oracle on every eMSP's contracts."""
    p.require("cpo", "admin")
    hd = [h.model_dump(exclude={"customData"}) for h in body.iso15118CertificateHashData or []] or None
    res = authorize_contract(ctx, body.idToken.idToken, hd, body.certificate)
    out: dict[str, Any] = {"idTokenInfo": {"status": res.id_token_status}}
    if res.certificate_status is not None:
        out["certificateStatus"] = res.certificate_status
    return Reply(out)


def _ca_matching(ctx: Context, hd: CertificateHashData) -> CAHandle | None:
    """The CA certificate the hash data names (a station's chain holds its Sub-CAs too), or None."""
    from pki.roots import cert_id_matches

    for h in ctx.engine.cas():
        issuer = ctx.engine.ca(h.row.parent).cert if h.row.parent else h.cert
        if cert_id_matches(h.cert, issuer, hd.data()):
            return h
    return None


def get_certificate_chain_status(ctx: Context, body: GetCertificateChainStatus21, *,
                                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Reply:
    """OCPP 2.1 GetCertificateChainStatus: Good / Revoked / Unknown / Failed with nextUpdate for up to four
    certificates (a station's leaf and Sub-CAs), answered from this service's own records — its OCSP
    responses for a leaf, its CA records for a Sub-CA, its published CRLs' nextUpdate for source CRL. The
    URLs the station supplies are never fetched (no server-side request forgery). A certificate this PKI
    did not issue is Unknown, to be asked again at any time (nextUpdate now)."""
    out = []
    for r in body.certificateStatusRequests:
        hd = r.certificateHashData
        status, next_update = "Unknown", now()
        try:
            row = find_by_hash_data(ctx, hd.hashAlgorithm, hd.issuerNameHash, hd.issuerKeyHash, hd.serialNumber)
            ca = None if row is not None else _ca_matching(ctx, hd)
        except PKIError:  # hashes or serial in no encoding we read: nothing of ours, ask again any time
            row, ca = None, None
        if row is not None and r.source == "OCSP":
            try:
                ans = ocpp_lookup(ctx, hd.hashAlgorithm, hd.issuerNameHash, hd.issuerKeyHash, hd.serialNumber)
            except PKIError:
                ans = None
            if ans is None or not ans.successful:
                status = "Failed"
            else:
                single = x509_ocsp.load_der_ocsp_response(ans.der)
                status = {x509_ocsp.OCSPCertStatus.GOOD: "Good",
                          x509_ocsp.OCSPCertStatus.REVOKED: "Revoked"}.get(single.certificate_status, "Unknown")
                next_update = single.next_update_utc or next_update
        elif row is not None or ca is not None:
            # CRL source, or a CA: the status our records hold (what the next CRL of its issuer carries),
            # good until that issuer's current CRL's nextUpdate (RFC 5280 §5.1.2.5)
            if row is not None:
                issuer, good = row.issuer, row.status == "valid"
            else:
                assert ca is not None
                issuer, good = ca.row.parent or ca.name, ca.row.status != "revoked"
            meta = latest_meta(ctx.db, issuer)
            if meta is None:
                status = "Failed"  # no CRL published yet for that issuer
            else:
                status = "Good" if good else "Revoked"
                next_update = meta[2]
        out.append({"certificateHashData": hd.model_dump(exclude_none=True), "source": r.source,
                    "status": status, "nextUpdate": iso_time(next_update)})
    return Reply({"certificateStatus": out})


# -- trust-store plans (#27 item 1) ------------------------------------------------------------------------


def trust_store_plan(ctx: Context, p: Principal, station_id: str,
                     installed: GetInstalledCertificateIds201, version: Version) -> Reply:
    """What a station reported in GetInstalledCertificateIdsResponse (OCPP 2.0.1 Part 2 M03) in; out, the
    InstallCertificateRequests (M05) and DeleteCertificateRequests (M04) that bring it to its CPO's trust
    store, each a valid message of ``version`` for the CSMS to send as they are: installs first, then
    deletions. cpo and admin only; the station must be the CPO's (pki/truststore_plan.py)."""
    from pki.truststore_plan import Reported, plan_for_station

    p.require("cpo", "admin")
    reported = [Reported(e.certificateType, e.certificateHashData.model_dump(exclude={"customData"}))
                for e in installed.certificateHashDataChain or []] if installed.status == "Accepted" else []
    plan = plan_for_station(ctx, p, station_id, reported, version)
    return Reply(plan.payload(), 200, {"X-V2GPKI-Station": plan.station})
