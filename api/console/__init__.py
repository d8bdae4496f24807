"""Operator console: server-rendered pages under /console (docs/console.md).

No external resources (it runs air-gapped): CSS and the one small script are served from
/console/static. Every response under /console carries a strict Content-Security-Policy (no inline
script or style), frame-ancestors 'none' / X-Frame-Options DENY, nosniff and a same-origin referrer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

PREFIX = "/console"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
]


class ConsoleHeaders:
    """Pure ASGI middleware: adds the security headers to every /console response (pages, static files,
    error pages, redirects); other paths pass through untouched (no cost on the OCSP hot path)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path: str = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def setup(app: FastAPI) -> None:
    from api.console import views

    async def on_console_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, views.ConsoleError)
        return views.error_page(request, exc)

    async def on_sign_in_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, views.SignInRequired)
        return views.sign_in_redirect(request, exc)

    app.add_exception_handler(views.ConsoleError, on_console_error)
    app.add_exception_handler(views.SignInRequired, on_sign_in_required)
    app.include_router(views.router)
    app.mount(PREFIX + "/static", StaticFiles(directory=views.HERE / "static"), name="console-static")
    app.add_middleware(ConsoleHeaders)


__all__ = ["CSP", "ConsoleHeaders", "setup"]
