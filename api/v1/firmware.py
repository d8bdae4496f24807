"""POST /v1/firmware/signatures: sign a charging-station firmware image (#27 item 3; pki/firmware.py).

Two ways in, both answering ``{"firmware": <OCPP 2.0.1 FirmwareType>, ...}`` ready for
UpdateFirmwareRequest.firmware:

- ``application/json``: the image's SHA-256 (hex) with product, version, location — the image never
  travels;
- ``application/octet-stream``: the image itself as the request body, product/version/location as query
  parameters. The body is hashed chunk by chunk as it arrives, never held in memory (api/limits.py lets this
  route alone past the 64 KiB body limit). A body that ends before its Content-Length, or a client that
  disconnects, leaves nothing signed and nothing recorded.

Manufacturers sign their own products; admins name the manufacturer (``org``). Refusals: 403 (another
manufacturer's product, another role), 409 ``firmware-rollback`` (a lower version than one already signed,
unless ``force``), 404 (no signing certificate yet: `v2gpki firmware setup`), 503 ``clock-skew``.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.auth import PrincipalDep
from api.deps import CtxDep
from pki.errors import BadSubject, Forbidden
from pki.firmware import MAX_LOCATION, ROLE, FirmwareRefused, sign_digest
from pki.orgs import Principal

router = APIRouter(prefix="/v1")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_THREAD_HASH_AT = 64 * 1024  # larger chunks are hashed off the event loop (hashlib releases the GIL)


class FirmwareSignIn(BaseModel):
    product: str = Field(max_length=64)
    version: str = Field(max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 of the firmware image, hex")
    size: int | None = Field(default=None, ge=0)
    location: str = Field(min_length=1, max_length=MAX_LOCATION, description="URI the stations download from")
    retrieveDateTime: datetime | None = None  # noqa: N815 - OCPP's field names
    installDateTime: datetime | None = None  # noqa: N815
    force: bool = Field(default=False, description="sign below the highest version already signed (rollback)")
    org: str | None = Field(default=None, max_length=128, description="admins only: the manufacturer")


def _tenant(p: Principal, org: str | None) -> str:
    p.require(ROLE, "admin")
    if p.role == "admin":
        if not org:
            raise BadSubject("admins name the manufacturer: `org`")
        return org
    if org not in (None, p.org):
        raise Forbidden("a manufacturer signs its own firmware only")
    return p.org


async def _hash_body(request: Request) -> tuple[bytes, int]:
    h = hashlib.sha256()
    n = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            if len(chunk) >= _THREAD_HASH_AT:
                await anyio.to_thread.run_sync(h.update, chunk)
            else:
                h.update(chunk)
            n += len(chunk)
    except ClientDisconnect:
        raise FirmwareRefused("the upload was interrupted: nothing was signed") from None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != n:
        raise FirmwareRefused(f"the upload ended after {n} of {declared} bytes: nothing was signed")
    if n == 0:
        raise BadSubject("empty firmware image")
    return h.digest(), n


@router.post("/firmware/signatures", status_code=201)
async def post_signature(
    request: Request, ctx: CtxDep, p: PrincipalDep,
    product: Annotated[str | None, Query(max_length=64)] = None,
    version: Annotated[str | None, Query(max_length=64)] = None,
    location: Annotated[str | None, Query(max_length=MAX_LOCATION)] = None,
    retrieveDateTime: Annotated[datetime | None, Query()] = None,  # noqa: N803
    installDateTime: Annotated[datetime | None, Query()] = None,  # noqa: N803
    force: bool = False,
    org: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = FirmwareSignIn.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BadSubject(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        tenant = _tenant(p, body.org)
        product, version, location = body.product, body.version, body.location
        digest, size = bytes.fromhex(body.sha256), body.size
        retrieveDateTime, installDateTime, force = body.retrieveDateTime, body.installDateTime, body.force  # noqa: N806
    elif ctype == "application/octet-stream":
        tenant = _tenant(p, org)
        if not (product and version and location):
            raise BadSubject("a streamed image takes product, version and location as query parameters")
        digest, size = await _hash_body(request)
    else:
        raise BadSubject("send application/json (the image's sha256) or application/octet-stream (the image)")
    signed = await run_in_threadpool(
        sign_digest, ctx, tenant, product=product, version=version, digest=digest, size=size, location=location,
        retrieve_at=retrieveDateTime, install_at=installDateTime, force=force, actor=p.credential)
    return signed.as_json()


def setup(app: FastAPI) -> None:
    app.include_router(router)
