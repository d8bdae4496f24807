"""EST (RFC 7030) in the shape the hosted Plug & Charge platforms publish, so a CSMS integrated with a
hosted V2G PKI switches by changing a URL:

  GET  /.well-known/est/{ca}/cacerts                      (RFC 7030 §4.1)
  POST /.well-known/est/{ca}/simpleenroll/{iso-version}   (§4.2.1)
  POST /.well-known/est/{ca}/simplereenroll/{iso-version} (§4.2.2: renewal, supersedes the old one)

{ca} is a CA label (cpo, oem, mo/emsp, csms) or a CA name (cpo-sub2, ...); {iso-version} is ISO15118-2
or ISO15118-20. Requests are base64 PKCS#10 (application/pkcs10); responses are base64 certs-only
PKCS#7 (application/pkcs7-mime; smime-type=certs-only), Content-Transfer-Encoding: base64.

{ca} also takes OPCP's and OPNC's forms (est.v1.json, pki.api.v1.*): `(\\w+-)?(cpo|mo|emsp|oem|veh|cps)`
— an optional platform prefix (`x-cpo`, `hubject-mo`) is ignored, this service is one PKI —, and the
{iso-version} segment may be left out (ISO15118-2, OPCP's default). api/opcp/est.py and api/opnc/pki.py
add the other URL shapes of those documents on top of these functions.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, FastAPI, Request, Response

from api import blocking
from api.auth import authenticate
from api.deps import CtxDep
from hsm.keystore import KeyAlg
from pki.context import Context
from pki.enrollment import enroll
from pki.errors import BadCSR, NotFound, UnknownCA
from pki.orgs import Principal

router = APIRouter(prefix="/.well-known/est", tags=["est"])

LABELS = {"cpo": ("cpo-sub2", "secc"), "oem": ("oem-sub2", "oem-prov"), "mo": ("mo-sub2", "contract"),
          "emsp": ("mo-sub2", "contract"), "csms": ("csms-root", "cs-client"),
          # OPCP: the CPS signing certificate (admins only: no tenant role enrolls it) and ISO 15118-20's
          # vehicle certificate, issued here as the OEM -20 provisioning certificate from OEM Sub-CA 2 -20.
          "cps": ("cps-sub2", "cps-leaf"), "veh": ("oem-sub2", "oem-prov")}
# OPCP / OPNC {ca}: an optional platform prefix and the role's CA (est.v1.json, caDomainParam.json)
OPCP_CA = re.compile(r"^(?:\w+-)?(mo|emsp|cpo|oem|veh|cps)$", re.IGNORECASE)
# OPCP's {algorithm}: the curve of the hierarchy (ISO 15118-2: P-256; -20: P-521 or Ed448)
ALGORITHMS = {"secp256r1": KeyAlg.P256, "secp521r1": KeyAlg.P521, "ed448": KeyAlg.ED448}
MAX_BODY = 16384


@dataclass(frozen=True)
class Target:
    ca: str  # the issuing CA (its chain is what cacerts answers)
    profile: str
    pick_by_key: bool  # enroll under whichever CA of the profile matches the CSR's key (-20: P-521 / Ed448)


def is_v20(version: str | None) -> bool:
    if version is None:
        return False
    v = version.lower().replace("_", "-").replace(":", "-")
    if v in ("iso15118-20", "15118-20", "-20", "20"):
        return True
    if v in ("iso15118-2", "15118-2", "-2", "2"):
        return False
    raise NotFound(f"unknown ISO 15118 version {version!r} (ISO15118-2 or ISO15118-20)")


def resolve(ctx: Context, ca: str, version: str | None, algorithm: str | None = None) -> Target:
    """{ca} (a label, an OPCP/OPNC form or a CA name), the ISO version and OPCP's algorithm → the CA and
    leaf profile. Unknown names, versions and algorithms, and combinations this service has no hierarchy
    for (ISO 15118-2 with P-521, an Ed448 OEM chain), are NotFound / UnknownCA: 404."""
    v20 = is_v20(version)
    m = OPCP_CA.match(ca)
    label = m.group(1).lower() if m else ca.lower()
    if label == "veh":
        if version is not None and not v20:
            raise NotFound("veh (the vehicle certificate) is ISO 15118-20 only")
        v20 = True
    if label in LABELS:
        ca_name, profile = LABELS[label]
        if v20 and label != "csms":
            ca_name, profile = ca_name + "-20", profile + "-20"
        if algorithm is not None:
            if algorithm not in ALGORITHMS:
                raise NotFound(f"unknown algorithm {algorithm!r} (secp256r1, secp521r1 or ed448)")
            ca_name = _ca_for_alg(ctx, ctx.engine.ca(ca_name).row.profile, ALGORITHMS[algorithm])
        return Target(ca_name, profile, v20 and algorithm is None)
    if algorithm is not None:
        raise NotFound("an algorithm segment goes with a role's CA (cpo, mo, oem, veh, cps)")
    h = ctx.engine.ca(ca)  # raises UnknownCA
    for p in ctx.profiles.profiles.values():
        if not p.ca and h.row.profile in p.issuers and not p.name.startswith("ocsp") and p.name not in (
                "cps-leaf", "cps-leaf-20", "api-client", "csms-server"):
            return Target(h.name, p.name, False)
    raise UnknownCA(f"CA {ca!r} issues no enrollable profile")


def _ca_for_alg(ctx: Context, ca_profile: str, alg: KeyAlg) -> str:
    """The active CA of this CA profile with this key algorithm (the newest first)."""
    found = sorted((h for h in ctx.engine.cas() if h.row.profile == ca_profile and h.alg == alg
                    and h.row.status == "active"), key=lambda h: -h.row.not_after.timestamp())
    if not found:
        raise UnknownCA(f"no {alg.value} hierarchy for {ca_profile!r} here")
    return found[0].name


def _resolve(ctx: CtxDep, ca: str, version: str | None) -> tuple[str, str]:
    t = resolve(ctx, ca, version)
    return t.ca, t.profile


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # OID 1.2.840.113549.1.7.2
_DATA = bytes.fromhex("06092a864886f70d010701")  # OID 1.2.840.113549.1.7.1


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData (RFC 7030 §4.1.3, RFC 5652 §5) with the certificates **in the order
    given**: leaf or issuing CA first, root last. A DER encoder sorts the SET OF certificates by their bytes
    (what cryptography's pkcs7.serialize_certificates does), and clients read the order: CitrineOS takes the
    last certificate of cacerts as the root. BER allows any order; every PKCS#7 parser reads it."""
    body = b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)
    signed = _der(0x30, b"\x02\x01\x01" + b"\x31\x00" + _der(0x30, _DATA) + _der(0xA0, body) + b"\x31\x00")
    return _der(0x30, _SIGNED_DATA + _der(0xA0, signed))


def _p7(certs: list[x509.Certificate]) -> Response:
    der = certs_only(certs)
    return Response(base64.encodebytes(der), media_type="application/pkcs7-mime; smime-type=certs-only",
                    headers={"Content-Transfer-Encoding": "base64"})


async def _body(request: Request) -> bytes:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadCSR("EST request too large")
    text = b"".join(raw.split())
    if text.startswith(b"-----BEGIN"):
        return raw
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise BadCSR("EST request body must be base64-encoded PKCS#10 (RFC 7030 §4.2.1)") from None


@router.get("/{ca}/cacerts")
def cacerts(ca: str, ctx: CtxDep) -> Response:
    ca_name, _ = _resolve(ctx, ca, None)
    return _p7(ctx.engine.chain(ca_name))


@router.get("/{ca}/cacerts/{version}")
def cacerts_versioned(ca: str, version: str, ctx: CtxDep) -> Response:
    ca_name, _ = _resolve(ctx, ca, version)
    return _p7(ctx.engine.chain(ca_name))


def enroll_p7(ctx: Context, p: Principal, target: Target, csr: bytes, renew: bool) -> Response:
    """Issue through the engine (tenancy, profile and CSR checks as /v1/enrollments) and answer the leaf
    as RFC 7030 §4.2.3 does."""
    res = enroll(ctx, p, target.profile, csr, ca=None if target.pick_by_key else target.ca, supersede=renew)
    return _p7([res.issued.cert])


def cacerts_p7(ctx: Context, target: Target) -> Response:
    """RFC 7030 §4.1.3: the issuing CA's chain, root last (CitrineOS drops the last one, MaEVe the
    self-signed one)."""
    return _p7(ctx.engine.chain(target.ca))


def _enroll(ctx: Context, p: Principal, ca: str, version: str | None, csr: bytes, renew: bool) -> Response:
    return enroll_p7(ctx, p, resolve(ctx, ca, version), csr, renew)


Enroll = Callable[[Context, Principal, str, str | None, bytes, bool], Response]


async def enroll_route(request: Request, enroll_fn: Enroll, ca: str, version: str | None, renew: bool) -> Response:
    """A simpleenroll/simplereenroll POST: the caller authenticated first (401/429 before anything about
    the body, as the PrincipalDep dependency did), then the body read, then the issuance in api/blocking.py's
    bounded pool. No dependency is declared: FastAPI's per-request solving of one is a visible share of an
    enrollment's event-loop CPU (api/hot.py)."""
    p = await authenticate(request)
    csr = await _body(request)
    ctx = blocking.context(request)
    return await blocking.run(ctx, enroll_fn, ctx, p, ca, version, csr, renew)


@router.post("/{ca}/simpleenroll/{version}")
async def simpleenroll(ca: str, version: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, version, False)


@router.post("/{ca}/simpleenroll", summary="simpleenroll without the ISO version (ISO15118-2)")
async def simpleenroll_default(ca: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, None, False)


@router.post("/{ca}/simplereenroll/{version}")
async def simplereenroll(ca: str, version: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, version, True)


def setup(app: FastAPI) -> None:
    app.include_router(router)
