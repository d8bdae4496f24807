"""EST (RFC 7030) in the shape the hosted Plug & Charge platforms publish, so a CSMS integrated with a
hosted V2G PKI switches by changing a URL:

  GET  /.well-known/est/{ca}/cacerts                      (RFC 7030 §4.1)
  POST /.well-known/est/{ca}/simpleenroll/{iso-version}   (§4.2.1)
  POST /.well-known/est/{ca}/simplereenroll/{iso-version} (§4.2.2: renewal, supersedes the old one)

{ca} is a CA label (cpo, oem, mo/emsp, csms) or a CA name (cpo-sub2, ...); {iso-version} is ISO15118-2
or ISO15118-20. Requests are base64 PKCS#10 (application/pkcs10); responses are base64 certs-only
PKCS#7 (application/pkcs7-mime; smime-type=certs-only), Content-Transfer-Encoding: base64.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from fastapi import APIRouter, FastAPI, Request, Response

from api.auth import PrincipalDep
from api.deps import CtxDep
from pki.enrollment import enroll
from pki.errors import BadCSR, NotFound, UnknownCA

router = APIRouter(prefix="/.well-known/est", tags=["est"])

LABELS = {"cpo": ("cpo-sub2", "secc"), "oem": ("oem-sub2", "oem-prov"), "mo": ("mo-sub2", "contract"),
          "emsp": ("mo-sub2", "contract"), "csms": ("csms-root", "cs-client")}
MAX_BODY = 16384


def _resolve(ctx: CtxDep, ca: str, version: str | None) -> tuple[str, str]:
    v20 = version is not None and version.lower().replace("_", "-") in ("iso15118-20", "15118-20", "-20", "20")
    if version is not None and not v20 and version.lower().replace("_", "-") not in ("iso15118-2", "15118-2",
                                                                                      "-2", "2"):
        raise NotFound(f"unknown ISO 15118 version {version!r} (ISO15118-2 or ISO15118-20)")
    if ca.lower() in LABELS:
        ca_name, profile = LABELS[ca.lower()]
        if v20 and ca.lower() != "csms":
            ca_name, profile = ca_name + "-20", profile + "-20"
        return ca_name, profile
    h = ctx.engine.ca(ca)  # raises UnknownCA
    for p in ctx.profiles.profiles.values():
        if not p.ca and h.row.profile in p.issuers and not p.name.startswith("ocsp") and p.name not in (
                "cps-leaf", "cps-leaf-20", "api-client", "csms-server"):
            return h.name, p.name
    raise UnknownCA(f"CA {ca!r} issues no enrollable profile")


def _p7(certs: list) -> Response:  # type: ignore[type-arg]
    der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
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


def _enroll(ctx: CtxDep, p: PrincipalDep, ca: str, version: str, csr: bytes, renew: bool) -> Response:
    ca_name, profile = _resolve(ctx, ca, version)
    res = enroll(ctx, p, profile, csr, ca=ca_name, supersede=renew)
    return _p7([res.issued.cert])


@router.post("/{ca}/simpleenroll/{version}")
async def simpleenroll(ca: str, version: str, request: Request, ctx: CtxDep, p: PrincipalDep) -> Response:
    from starlette.concurrency import run_in_threadpool

    csr = await _body(request)
    return await run_in_threadpool(_enroll, ctx, p, ca, version, csr, False)


@router.post("/{ca}/simplereenroll/{version}")
async def simplereenroll(ca: str, version: str, request: Request, ctx: CtxDep, p: PrincipalDep) -> Response:
    from starlette.concurrency import run_in_threadpool

    csr = await _body(request)
    return await run_in_threadpool(_enroll, ctx, p, ca, version, csr, True)


def setup(app: FastAPI) -> None:
    app.include_router(router)
