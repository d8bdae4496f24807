"""OPCP 1.0 EST (`est.v1.json`) — the URL shapes the document and its clients use beyond api/est.py's:

  POST /.well-known/est/{ca}/simpleenroll[/{iso-version}]         api/est.py (the document's own path)
  GET  /{ca}/cacerts/{iso-version}/{algorithm}/                    the document's cacerts, per curve
  GET  /.well-known/est/{ca}/cacerts/{iso-version}/{algorithm}[/]  the same under the EST prefix
  POST /.well-known/{ca}/simpleenroll[/{iso-version}]              CitrineOS (hubject.ts, since 2026-02)
  POST /.well-known/{ca}/simplereenroll[/{iso-version}]
  GET  /.well-known/{ca}/cacerts[/{iso-version}]                   CitrineOS

{ca} is `(\\w+-)?(cpo|mo|emsp|oem|veh|cps)`; {iso-version} ISO15118-2 (the default) or ISO15118-20;
{algorithm} secp256r1, secp521r1 or ed448 (404 where this service has no such hierarchy). Every request is
served by api/est.py's functions on the engine: one implementation, the same tenancy (a CPO enrolls only
its EVSEIDs; an eMSP on `cpo` is 403 and nothing is stored).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from api.deps import CtxDep
from api.est import OPCP_CA, cacerts_p7, enroll_p7, enroll_route, resolve
from pki.context import Context
from pki.errors import NotFound
from pki.orgs import Principal

router = APIRouter(tags=["opcp-est"])


def _opcp_ca(ca: str) -> str:
    """Only the OPCP roles answer under /.well-known/{ca}/ (CA names stay under /.well-known/est/)."""
    if not OPCP_CA.match(ca):
        raise NotFound(f"unknown CA {ca!r} (cpo, mo, emsp, oem, veh, cps, optionally prefixed: x-cpo)")
    return ca


def _cacerts(ctx: Context, ca: str, version: str | None, algorithm: str | None) -> Response:
    return cacerts_p7(ctx, resolve(ctx, _opcp_ca(ca), version, algorithm))


def _enroll(ctx: Context, p: Principal, ca: str, version: str | None, csr: bytes, renew: bool) -> Response:
    return enroll_p7(ctx, p, resolve(ctx, _opcp_ca(ca), version), csr, renew)


# -- cacerts per ISO version and algorithm (est.v1.json) -------------------------------------------------


@router.get("/{ca}/cacerts/{iso_version}/{algorithm}/", summary="OPCP cacerts per ISO version and curve")
def cacerts_algorithm(ca: str, iso_version: str, algorithm: str, ctx: CtxDep) -> Response:
    return _cacerts(ctx, ca, iso_version, algorithm)


@router.get("/{ca}/cacerts/{iso_version}/{algorithm}", include_in_schema=False)
def cacerts_algorithm_noslash(ca: str, iso_version: str, algorithm: str, ctx: CtxDep) -> Response:
    return _cacerts(ctx, ca, iso_version, algorithm)


@router.get("/.well-known/est/{ca}/cacerts/{iso_version}/{algorithm}", summary="OPCP cacerts per curve (EST prefix)")
def est_cacerts_algorithm(ca: str, iso_version: str, algorithm: str, ctx: CtxDep) -> Response:
    return _cacerts(ctx, ca, iso_version, algorithm)


@router.get("/.well-known/est/{ca}/cacerts/{iso_version}/{algorithm}/", include_in_schema=False)
def est_cacerts_algorithm_slash(ca: str, iso_version: str, algorithm: str, ctx: CtxDep) -> Response:
    return _cacerts(ctx, ca, iso_version, algorithm)


# -- /.well-known/{ca}/… (CitrineOS) -----------------------------------------------------------------------


@router.get("/.well-known/{ca}/cacerts", summary="cacerts (CitrineOS' path, ISO15118-2)")
def wk_cacerts(ca: str, ctx: CtxDep) -> Response:
    return _cacerts(ctx, ca, None, None)


@router.get("/.well-known/{ca}/cacerts/{iso_version}", summary="cacerts (CitrineOS' path)")
def wk_cacerts_versioned(ca: str, iso_version: str, ctx: CtxDep) -> Response:
    return _cacerts(ctx, ca, iso_version, None)


@router.post("/.well-known/{ca}/simpleenroll", summary="simpleenroll (CitrineOS' path, ISO15118-2)")
async def wk_simpleenroll(ca: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, None, False)


@router.post("/.well-known/{ca}/simpleenroll/{iso_version}", summary="simpleenroll (CitrineOS' path)")
async def wk_simpleenroll_versioned(ca: str, iso_version: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, iso_version, False)


@router.post("/.well-known/{ca}/simplereenroll", summary="simplereenroll (CitrineOS' path, ISO15118-2)")
async def wk_simplereenroll(ca: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, None, True)


@router.post("/.well-known/{ca}/simplereenroll/{iso_version}", summary="simplereenroll (CitrineOS' path)")
async def wk_simplereenroll_versioned(ca: str, iso_version: str, request: Request) -> Response:
    return await enroll_route(request, _enroll, ca, iso_version, True)


def setup(app: FastAPI) -> None:
    app.include_router(router)
