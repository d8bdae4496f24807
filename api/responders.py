"""HTTP transport of the OCSP and CRL responders (no crypto here: pki/ocsp/ and pki/crl.py answer).

Routes (the AIA OCSP URL of issued certificates is ``{V2GPKI_PUBLIC_URL}/ocsp``, the CRLDP
``{V2GPKI_PUBLIC_URL}/crl/{ca}.crl``):

* ``POST /ocsp`` — body: DER OCSPRequest (RFC 6960 Appendix A.1; the Content-Type is not enforced:
  some clients omit it, and the body either parses or gets ``malformedRequest``).
* ``GET /ocsp/{base64}`` — the request base64-encoded in the path, URL-encoded or not (RFC 6960 A.1,
  RFC 5019 §5); the URL-safe alphabet, missing padding and '+' turned into ' ' by a proxy are tolerated.
* ``GET /crl/{ca}.crl`` — the CA's latest DER CRL, ``application/pkix-crl`` (RFC 5280 §4.2.1.13).

OCSP answers are always HTTP 200 ``application/ocsp-response``: errors are OCSP error responses
(malformedRequest, unauthorized, tryLater, internalError — RFC 6960 §2.3), never a 500. A body over
10 KiB is refused unread with 413 and a malformedRequest body (the largest sensible request, 32 CertIDs
with a nonce, is under 4 KiB).

GET answers carry RFC 5019 §6.2 caching headers (max-age until nextUpdate, public, no-transform,
must-revalidate; ETag; Last-Modified = thisUpdate; Expires = nextUpdate) and honour If-None-Match.
Answers with a nonce are unique and marked no-store.

The OCSP endpoint is a raw ASGI app on a Starlette route (no FastAPI dependency injection, validation,
Request or Response objects); the pre-signed path (parse CertID → one indexed lookup → bytes) runs on
the event loop, and only answers that must be signed go to the thread pool. The standalone responder
(api/ocsp_app.py) reaches the same endpoint without FastAPI's routing at all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pki.context import Context
from pki.crl import cache_for
from pki.errors import NotFound
from pki.ocsp import MALFORMED_ANSWER, Answer, responder_for

OCSP_RESPONSE = "application/ocsp-response"
PKIX_CRL = "application/pkix-crl"
MAX_OCSP_REQUEST = 10 * 1024
TRY_LATER_RETRY_AFTER = b"5"  # seconds, on tryLater answers (the key store's breaker cool-down)
_MAX_GET_PATH = (MAX_OCSP_REQUEST * 4) // 3 + 8
_B64_PATH = re.compile(r"^[A-Za-z0-9+/ _-]*={0,2}$")
_CRL_NAME = re.compile(r"^([a-z0-9][a-z0-9-]{1,62})\.crl$")


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def decode_get_path(text: str) -> bytes | None:
    """RFC 6960 A.1: ``{url}/{url-encoding of base-64 encoding of the DER encoding of the OCSPRequest}``.
    Starlette has already undone the URL encoding (%2F, %2B, %3D)."""
    if not text or len(text) > _MAX_GET_PATH or not _B64_PATH.match(text):
        return None
    s = text.replace(" ", "+").replace("-", "+").replace("_", "/").rstrip("=")
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _http_date(dt: datetime) -> str:
    return format_datetime(dt.astimezone(UTC), usegmt=True)


def cache_headers(this_update: datetime, next_update: datetime, etag: str) -> dict[str, str]:
    # RFC 5019 §6.2: max-age no later than nextUpdate; public; no-transform; must-revalidate.
    max_age = max(0, int((next_update - datetime.now(UTC)).total_seconds()))
    return {
        "Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate",
        "Last-Modified": _http_date(this_update),
        "Expires": _http_date(next_update),
        "ETag": etag,
    }


def _ocsp_headers(ans: Answer, req_headers: dict[bytes, bytes], *, get: bool) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(status override or 0, headers) for an OCSP answer; 304 when the GET's If-None-Match matches."""
    headers: dict[str, str] = {}
    if get:
        if ans.cacheable and ans.this_update is not None and ans.next_update is not None:
            etag = '"' + hashlib.blake2b(ans.der, digest_size=16).hexdigest() + '"'
            headers = cache_headers(ans.this_update, ans.next_update, etag)
            inm = req_headers.get(b"if-none-match")
            if inm is not None and _etag_matches(inm.decode("latin-1"), etag):
                return 304, [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        else:
            headers = {"Cache-Control": "no-store"}  # errors and nonce-bearing answers are one-offs
    return 0, [(k.lower().encode(), v.encode()) for k, v in headers.items()]


def _etag_matches(header: str, etag: str) -> bool:
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


class OcspEndpoint:
    """A raw ASGI endpoint (Starlette treats a non-function endpoint as an ASGI app): no Request or
    Response objects on the hot path."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        method = scope["method"]
        req_headers = dict(scope["headers"])
        get = method != "POST"
        if method not in ("GET", "HEAD", "POST"):
            await _send(send, 405, b"", [(b"allow", b"GET, POST")])
            return
        der: bytes | None
        if not get:
            cl = req_headers.get(b"content-length")
            if cl is not None and (not cl.isdigit() or int(cl) > MAX_OCSP_REQUEST):
                await self._answer(send, scope, MALFORMED_ANSWER, req_headers, get=False, status=413)
                return
            body = bytearray()
            more = True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # client went away
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > MAX_OCSP_REQUEST:
                    await self._answer(send, scope, MALFORMED_ANSWER, req_headers, get=False, status=413)
                    return
            der = bytes(body)
        else:
            text = scope.get("path_params", {}).get("b64", "")
            if len(text) > _MAX_GET_PATH:
                await self._answer(send, scope, MALFORMED_ANSWER, req_headers, get=True, status=414)
                return
            der = decode_get_path(text)
        if not der:
            await self._answer(send, scope, MALFORMED_ANSWER, req_headers, get=get)
            return
        responder = responder_for(scope["app"].state.ctx)
        # Pre-signed bytes need no HSM: answered on the event loop (one indexed lookup); anything that
        # must be signed (nonce, several CertIDs, a stale or missing response) goes to the thread pool.
        ans = responder.respond_presigned(der)
        if ans is None:
            # Live signing is charged to the peer address (pki/ocsp/ SignBudget).
            peer = scope.get("client")
            ans = await run_in_threadpool(responder.respond, der, peer[0] if peer else "?")
        await self._answer(send, scope, ans, req_headers, get=get)

    @staticmethod
    async def _answer(send: Any, scope: Any, ans: Answer, req_headers: dict[bytes, bytes], *, get: bool,
                      status: int = 200) -> None:
        # For metrics (api/observability.py): the outcome without re-parsing the DER.
        scope.setdefault("state", {})["ocsp_outcome"] = (ans.status, ans.cert_status or "none")
        override, headers = _ocsp_headers(ans, req_headers, get=get)
        if override == 304:
            await _send(send, 304, b"", headers)
            return
        if ans.status == "tryLater":  # HSM or database away, or the client's live-signing budget spent
            headers.append((b"retry-after", TRY_LATER_RETRY_AFTER))
        headers.append((b"content-type", OCSP_RESPONSE.encode()))
        await _send(send, status, ans.der, headers)


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    if status != 304:  # RFC 9110 §8.6: a 304 carries no Content-Length unless it is the 200's
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _not_modified(request: Request, etag: str) -> bool:
    inm = request.headers.get("if-none-match")
    return inm is not None and _etag_matches(inm, etag)


async def crl_endpoint(request: Request) -> Response:
    m = _CRL_NAME.match(request.path_params.get("name", ""))
    if m is None:
        raise NotFound("no such CRL (expected /crl/<ca-name>.crl)")
    crl = await run_in_threadpool(cache_for(_ctx(request)).get, m.group(1))
    etag = f'"{crl.issuer}-{crl.number}"'
    headers = cache_headers(crl.this_update, crl.next_update, etag)
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(crl.der, media_type=PKIX_CRL, headers=headers)


def setup(app: FastAPI) -> None:
    endpoint = OcspEndpoint()
    for path in ("/ocsp", "/ocsp/{b64:path}"):
        app.router.routes.append(Route(path, endpoint, methods=["GET", "POST"], include_in_schema=False))
    app.router.add_route("/crl/{name}", crl_endpoint, methods=["GET"], include_in_schema=False)
