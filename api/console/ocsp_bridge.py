"""Ask the OCSP responder (pki/ocsp/) about one certificate, exactly as a relying party would.

A DER OCSPRequest for the certificate (CertID over SHA-1, no nonce: the RFC 5019 shape chargers send)
goes through ``responder_for(ctx).respond`` — the function the /ocsp endpoint calls — and the signed
answer is parsed back with cryptography, so the console shows the responder's word, not the database's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from pki.ocsp import responder_for

if TYPE_CHECKING:
    from pki.context import Context
    from pki.store.models import Certificate

log = logging.getLogger("v2gpki.console")

_REASON_NAMES = {
    x509.ReasonFlags.unspecified: "unspecified", x509.ReasonFlags.key_compromise: "keyCompromise",
    x509.ReasonFlags.ca_compromise: "cACompromise", x509.ReasonFlags.affiliation_changed: "affiliationChanged",
    x509.ReasonFlags.superseded: "superseded", x509.ReasonFlags.cessation_of_operation: "cessationOfOperation",
    x509.ReasonFlags.certificate_hold: "certificateHold", x509.ReasonFlags.privilege_withdrawn: "privilegeWithdrawn",
    x509.ReasonFlags.aa_compromise: "aACompromise", x509.ReasonFlags.remove_from_crl: "removeFromCRL",
}


@dataclass
class OcspView:
    status: str  # good | revoked | unknown
    source: str  # "responder" when the OCSP responder produced it, "database" otherwise
    revocation_reason: str | None = None
    revoked_at: datetime | None = None
    this_update: datetime | None = None
    next_update: datetime | None = None


def responder_status(ctx: Context, row: Certificate) -> OcspView | None:
    try:
        cert = x509.load_der_x509_certificate(row.der)
        issuer = ctx.engine.ca(row.issuer).cert
        req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()  # noqa: S303
        answer = responder_for(ctx).respond(req.public_bytes(serialization.Encoding.DER))
        resp = ocsp.load_der_ocsp_response(answer.der)
    except Exception:  # noqa: BLE001 - the page still renders; the status says why
        log.warning("asking the OCSP responder about %s/%s failed", row.issuer, row.serial, exc_info=True)
        return OcspView("error", "responder")
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return OcspView(resp.response_status.name.lower(), "responder")
    status = {ocsp.OCSPCertStatus.GOOD: "good", ocsp.OCSPCertStatus.REVOKED: "revoked",
              ocsp.OCSPCertStatus.UNKNOWN: "unknown"}[resp.certificate_status]
    reason = resp.revocation_reason
    return OcspView(
        status, "responder",
        revocation_reason=_REASON_NAMES.get(reason) if reason is not None else None,
        revoked_at=resp.revocation_time_utc, this_update=resp.this_update_utc, next_update=resp.next_update_utc,
    )

