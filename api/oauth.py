"""`POST /oauth/token`: OAuth 2.0 client credentials (RFC 6749 §4.4), as OPCP's accessToken.v1.json
specifies it and hosted Plug & Charge PKIs answer it.

The body is JSON (OPCP; MaEVe's `oauth2_token` service sends `{grant_type, client_id, client_secret}`) or
`application/x-www-form-urlencoded` (RFC 6749 §4.4.2; CitrineOS sends `audience` too). HTTP Basic client
authentication (RFC 6749 §2.3.1) is accepted as well. `client_id` is the API key's id, `client_secret` the
API key. The answer is RFC 6749 §5.1 (`access_token`, `token_type` "Bearer", `expires_in`, `scope`), with
`Cache-Control: no-store`; errors are RFC 6749 §5.2 bodies (`error`, `error_description`) — the shape the
document and every OAuth client expect, not problem documents. Issuing and verifying live in pki/oauth.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.auth import AUTH_FAIL_LIMIT, _client_ip
from api.deps import CtxDep
from api.problems import oauth_error
from pki import audit
from pki.context import Context
from pki.oauth import OAuthError, issue_token

router = APIRouter(tags=["oauth"])
MAX_BODY = 8192
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _fields(content_type: str, raw: bytes) -> dict[str, Any]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (not media and raw.lstrip()[:1] == b"{"):
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise OAuthError("invalid_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OAuthError("invalid_request", "the body must be a JSON object")
        return body
    if media in ("application/x-www-form-urlencoded", ""):
        try:
            text = raw.decode("utf-8")
            form = parse_qs(text, keep_blank_values=True, strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "the form body is not valid UTF-8") from None
        out: dict[str, Any] = {}
        for k, v in form.items():
            if len(v) > 1:  # RFC 6749 §3.2: request parameters MUST NOT be included more than once
                raise OAuthError("invalid_request", f"parameter {k!r} repeated")
            out[k] = v[0]
        return out
    raise OAuthError("invalid_request", "send application/json or application/x-www-form-urlencoded")


def _basic(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        user, sep, pw = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed Basic credentials") from None
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials")
    return unquote_plus(user), unquote_plus(pw)  # RFC 6749 §2.3.1: form-encoded before Basic


def _str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > 512:
        raise OAuthError("invalid_request", f"{name} must be a string of at most 512 characters")
    return v


def _issue(ctx: Context, request: Request, content_type: str, raw: bytes) -> JSONResponse:
    body = _fields(content_type, raw)
    client_id, client_secret = _str(body, "client_id"), _str(body, "client_secret")
    basic = _basic(request)
    if basic is not None:
        if client_secret is not None:  # RFC 6749 §2.3: one authentication method per request
            raise OAuthError("invalid_request", "client credentials both in the body and in Basic")
        if client_id is not None and client_id != basic[0]:
            raise OAuthError("invalid_request", "client_id differs from the Basic user")
        client_id, client_secret = basic
    tok = issue_token(ctx, client_id or "", client_secret or "", grant_type=_str(body, "grant_type"),
                      audience=_str(body, "audience"))
    return JSONResponse({"access_token": tok.access_token, "token_type": tok.token_type,
                         "expires_in": tok.expires_in, "scope": tok.scope}, headers=_NO_STORE)


def _record_failure(ctx: Context, request: Request, exc: OAuthError) -> dict[str, str] | None:
    """A failed client authentication counts against the address like any failed sign-in (api/auth.py)."""
    ip = _client_ip(request)
    if AUTH_FAIL_LIMIT.take(ip) > 0:
        return {"Retry-After": "10"}
    try:
        with ctx.db.session() as s:
            audit.append(s, audit.Entry(actor=f"ip:{ip}", action="auth.failure", outcome="failure",
                                        details={"reason": exc.message, "path": request.url.path}))
            s.commit()
    except Exception:  # noqa: BLE001 - never turn an auth failure into a 500
        pass
    return None


@router.post("/oauth/token", summary="OAuth 2.0 client credentials: an API key for a bearer token",
             responses={200: {"description": "RFC 6749 §5.1 token"}, 400: {"description": "RFC 6749 §5.2"},
                        401: {"description": "RFC 6749 §5.2 invalid_client"}})
async def token(request: Request, ctx: CtxDep) -> JSONResponse:
    raw = await request.body()
    try:
        if len(raw) > MAX_BODY:
            raise OAuthError("invalid_request", "request too large")
        return await run_in_threadpool(_issue, ctx, request, request.headers.get("content-type", ""), raw)
    except OAuthError as exc:
        if exc.error != "invalid_client":
            return oauth_error(exc)
        retry = await run_in_threadpool(_record_failure, ctx, request, exc)
        if retry is not None:
            return oauth_error(OAuthError("invalid_client", "too many failed sign-ins"), status=429, headers=retry)
        return oauth_error(exc)


def setup(app: FastAPI) -> None:
    app.include_router(router)
