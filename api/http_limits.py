"""Bounds on request heads for `v2gpki serve` (uvicorn): size and time.

uvicorn bounds neither with its default HTTP implementation (httptools): a client can send a header of
megabytes, or keep a head half-sent for ever (its keep-alive timer is cancelled by the first byte and no
other timer runs). These protocol classes, given to uvicorn as ``http=``, add:

* a head size limit — request line and header fields at most ``V2GPKI_HTTP_MAX_HEAD_BYTES``: beyond it,
  431 and the connection is closed, before more is parsed (the h11 variant, used with TLS, gets the same
  bound through h11's ``max_incomplete_event_size``: 400 and closed);
* a head timeout — a head must be complete ``V2GPKI_HTTP_HEAD_TIMEOUT`` seconds after its first byte
  (or after the connection opened): otherwise the connection is closed. Bytes that do not complete the
  head (empty lines, one header byte at a time) do not restart it. Requests whose head is complete are
  not affected (bodies and the application have their own limits: api/limits.py).

uvicorn starts its worker processes from an import string, so the limits are read from the environment
(pki/config.py Settings) in each process, once.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.tls import TLSH11Protocol


@functools.cache
def limits() -> tuple[int, float]:
    """(max head bytes, head timeout seconds) from the environment, once per process."""
    from pki.config import Settings

    s = Settings()
    return s.http_max_head_bytes, s.http_head_timeout


_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 32\r\nconnection: close\r\n\r\nrequest header fields too large\n")


class _HeadTimer:
    """The head timeout, shared by both protocols: ``head_since`` is the loop time the pending head
    started (None: no head pending); one timer per connection re-arms itself for the rest."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    head_since: float | None = None
    head_timer: asyncio.TimerHandle | None = None

    def _head_begin(self) -> None:
        if self.head_since is None:
            self.head_since = self.loop.time()
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(limits()[1], self._head_check)

    def _head_end(self) -> None:
        self.head_since = None

    def _head_cancel(self) -> None:
        self.head_since = None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_check(self) -> None:
        self.head_timer = None
        since = self.head_since
        if since is None or self.transport is None or self.transport.is_closing():
            return
        left = since + limits()[1] - self.loop.time()
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            left = max(left, limits()[1])  # a request in progress: its answer is owed, look again later
        if left > 0.001:
            self.head_timer = self.loop.call_later(left, self._head_check)
            return
        self.head_since = None
        self.transport.close()  # nothing was requested: no answer owed


class BoundedHttpToolsProtocol(_HeadTimer, HttpToolsProtocol):
    """uvicorn's httptools protocol (the default without TLS) with the head size limit and timeout."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.in_head = True  # between the end of a message and the end of the next head
        self.head_left = limits()[0]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_begin()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.in_head:
            super().data_received(data)
            return
        self._head_begin()
        if len(data) <= self.head_left:
            self.head_left -= len(data)
            super().data_received(data)
            return
        # Feed what the limit allows; if that does not complete the head, refuse (the rest is not parsed).
        first, rest = data[: self.head_left], data[self.head_left :]
        self.head_left = 0
        if first:
            super().data_received(first)
        if self.transport is None or self.transport.is_closing():
            return
        if self.in_head:
            self._head_cancel()
            self.transport.write(_431)
            self.transport.close()
            return
        super().data_received(rest)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.in_head:  # a pipelined request right behind a body: its own head allowance
            self.in_head = True
            self.head_left = limits()[0]
            self._head_begin()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._head_cancel()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True
        self.head_left = limits()[0]
        self._head_end()  # the next head's clock starts with its first byte (idle: the keep-alive timeout)


class BoundedTLSH11Protocol(_HeadTimer, TLSH11Protocol):
    """The TLS protocol (h11, peer certificate in the scope) with the head timeout; the size limit is h11's
    ``max_incomplete_event_size`` (uvicorn's ``h11_max_incomplete_event_size``, set by `v2gpki serve`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_begin()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._head_begin()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head_end()


__all__ = ["BoundedHttpToolsProtocol", "BoundedTLSH11Protocol", "H11Protocol", "limits"]
