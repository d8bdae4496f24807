"""OPNC v1 (CharIN's Open Plug & Charge Network Communication, `../shared/specs/opnc/specification/apis/*`)
under `/opnc/v1/{pki,ccp,pcp,rcp,cps,event}`, served on the existing engine, CPS, pools and subscriptions.
Every OPNC request may carry `OPNC-from/to-party-*` headers; :func:`check_parties` (the one check, used by
every OPNC route through :func:`opnc_party`) holds them against the caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Header

from api.auth import PrincipalDep
from api.deps import CtxDep
from pki.context import Context
from pki.errors import Forbidden
from pki.orgs import Principal

# OPNC party types (opncFromPartyType.v1.json) of the tenant roles; the others are services.
ROLE_PARTY = {"cpo": "cpo", "emsp": "emsp", "oem": "oem"}
SERVICE_PARTIES = ("pki", "cps", "pcp", "ccp")
# The addressee types each OPNC API answers as. The party-type enum has no "rcp": the root pool is the
# PKI operator's, so /opnc/v1/rcp answers to "pki" (and to "rcp").
ANSWERS_AS = {"rcp": ("rcp", "pki"), "event": ("event", "pki", "ccp", "pcp", "cps")}
# The addressees whose id is the SHA-256 fingerprint of one of this service's roots (opncToPartyId.v1.json).
FINGERPRINT_PARTIES = ("pki", "cps")


def _flat(identifier: str) -> str:
    """An identifier as prefixes are compared (pki.orgs.flat_prefix and more): separators of any kind
    dropped, letters upper-cased — 'de-aaa', 'DE*AAA' and 'DEAAA' are one provider ID."""
    return "".join(ch for ch in identifier.upper() if ch.isalnum())


def _root_fingerprints(ctx: Context) -> set[str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return {x509.load_der_x509_certificate(h.row.der).fingerprint(hashes.SHA256()).hex()
            for h in ctx.engine.cas() if h.row.parent is None}


def check_parties(ctx: Context, p: Principal, service: str, from_type: str | None, from_id: str | None,
                  to_type: str | None, to_id: str | None) -> None:
    """The `OPNC-from/to-party-*` headers, when sent, must describe this call: the sender is the caller's
    organization (type = its role, id = one of its identifier prefixes: OperatorID, ProviderID or WMI,
    compared without separators and case), the addressee is this service (``service``: pki, ccp, pcp, rcp,
    cps or event; see ANSWERS_AS), and when the addressee is a pki or cps its id is the SHA-256 fingerprint
    of one of this service's roots. Admins may speak for any party. Anything else is Forbidden (403): a
    request relayed for someone else, or meant for another party — this service forwards to none."""
    if p.role != "admin":
        own = ROLE_PARTY.get(p.role)
        if from_type is not None and from_type.strip().lower() != own:
            raise Forbidden(f"OPNC-from-party-type {from_type!r} is not the caller's party type ({own or p.role})")
        if from_id is not None and _flat(from_id) not in {_flat(x) for x in p.prefixes}:
            raise Forbidden(f"OPNC-from-party-id {from_id!r} is not one of organization {p.org!r}'s identifiers")
    to = to_type.strip().lower() if to_type is not None else None
    if to is not None and to not in ANSWERS_AS.get(service, (service,)):
        raise Forbidden(f"OPNC-to-party-type {to_type!r}: this is the {service} and forwards to no other party")
    if to_id is not None and (to or service) in FINGERPRINT_PARTIES:
        fp = to_id.strip().replace(":", "").lower()
        if fp not in _root_fingerprints(ctx):
            raise Forbidden("OPNC-to-party-id is not the SHA-256 fingerprint of a root of this PKI")


def opnc_party(service: str) -> Callable[..., Principal]:
    """A dependency: the authenticated caller, its OPNC party headers checked (403 on a mismatch); use as
    ``Annotated[Principal, Depends(opnc_party("ccp"))]``. Sync: FastAPI runs it in the thread pool (the
    fingerprint check reads the CAs)."""

    def dep(ctx: CtxDep, p: PrincipalDep,
            from_type: Annotated[str | None, Header(alias="OPNC-from-party-type")] = None,
            from_id: Annotated[str | None, Header(alias="OPNC-from-party-id")] = None,
            to_type: Annotated[str | None, Header(alias="OPNC-to-party-type")] = None,
            to_id: Annotated[str | None, Header(alias="OPNC-to-party-id")] = None) -> Principal:
        check_parties(ctx, p, service, from_type, from_id, to_type, to_id)
        return p

    return dep


__all__ = ["ROLE_PARTY", "SERVICE_PARTIES", "check_parties", "opnc_party"]
