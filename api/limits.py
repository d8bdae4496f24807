"""Request size limit as pure ASGI middleware: 413 before the body is buffered (no framework cost)."""

from __future__ import annotations

from typing import Any

from api.problems import payload_too_large

MAX_BODY = 64 * 1024  # CSRs are ≤ 5500 chars (OCPP); EXI requests ≤ 5600; 64 KiB covers every API call
# Routes whose body is a stream the route consumes chunk by chunk, never buffered: exempt from MAX_BODY for
# this content type only (a firmware image of any size, hashed as it arrives: api/v1/firmware.py).
STREAMING: dict[tuple[str, str], bytes] = {("POST", "/v1/firmware/signatures"): b"application/octet-stream"}


class BodyLimit:
    def __init__(self, app: Any, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stream_type = STREAMING.get((scope.get("method", ""), scope.get("path", "")))
        if stream_type is not None:
            for k, v in scope.get("headers", []):
                if k == b"content-type" and v.split(b";")[0].strip().lower() == stream_type:
                    await self.app(scope, receive, send)
                    return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    await self._reject(send)
                    return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        headers, body = payload_too_large(self.max_body)
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
