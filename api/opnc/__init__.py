"""OPNC v1 (CharIN's Open Plug & Charge Network Communication, `../shared/specs/opnc/specification/apis/*`)
under `/opnc/v1/{pki,ccp,pcp,rcp,cps}`, served on the existing engine, CPS and pools. Every OPNC request
may carry `OPNC-from/to-party-*` headers; :func:`check_parties` holds them against the caller."""

from __future__ import annotations

from fastapi import Request

from pki.context import Context
from pki.errors import Forbidden
from pki.orgs import Principal, flat_prefix

# OPNC party types (opncFromPartyType.v1.json) of the tenant roles; the others are services.
ROLE_PARTY = {"cpo": "cpo", "emsp": "emsp", "oem": "oem"}
SERVICE_PARTIES = ("pki", "cps", "pcp", "ccp")


def _root_fingerprints(ctx: Context) -> set[str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return {x509.load_der_x509_certificate(h.row.der).fingerprint(hashes.SHA256()).hex()
            for h in ctx.engine.cas() if h.row.parent is None}


def check_parties(ctx: Context, request: Request, p: Principal, service: str) -> None:
    """The `OPNC-from/to-party-*` headers, when sent, must describe this call: the sender is the caller's
    organization (type = its role, id = one of its identifier prefixes: OperatorID, ProviderID or WMI,
    compared without separators and case), the addressee is this service (``service``: pki, ccp, pcp, rcp or
    cps; for pki and cps the id is the SHA-256 fingerprint of one of this service's roots). Admins may
    speak for any party. Anything else is Forbidden (403): a request relayed for someone else."""
    h = request.headers
    from_type, from_id = h.get("opnc-from-party-type"), h.get("opnc-from-party-id")
    to_type, to_id = h.get("opnc-to-party-type"), h.get("opnc-to-party-id")
    if p.role != "admin":
        if from_type is not None and from_type.strip().lower() != ROLE_PARTY.get(p.role):
            raise Forbidden(f"OPNC-from-party-type {from_type!r} is not the caller's role ({p.role})")
        if from_id is not None:
            mine = {flat_prefix(x) for x in p.prefixes}
            if flat_prefix(from_id.strip()) not in mine:
                raise Forbidden(f"OPNC-from-party-id {from_id!r} is not one of {p.org!r}'s identifiers")
    if to_type is not None and to_type.strip().lower() != service:
        raise Forbidden(f"OPNC-to-party-type {to_type!r}: this is the {service} service")
    if to_id is not None and service in ("pki", "cps"):
        fp = to_id.strip().replace(":", "").lower()
        if fp not in _root_fingerprints(ctx):
            raise Forbidden("OPNC-to-party-id is not the SHA-256 fingerprint of a root of this PKI")
