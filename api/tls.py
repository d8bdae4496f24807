"""uvicorn protocol that exposes the TLS peer certificate to the app (ASGI TLS extension shape).

uvicorn does not put the client certificate into the ASGI scope. This h11 protocol subclass reads it
from the connection's SSL object and adds scope["extensions"]["tls"]["client_cert_der"] before the
request cycle runs (the cycle's task is created by handle_events but not yet started).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class TLSH11Protocol(H11Protocol):
    _peer_der: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: Any = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            try:
                self._peer_der = ssl_object.getpeercert(binary_form=True)
            except ValueError:
                self._peer_der = None

    def handle_events(self) -> None:
        super().handle_events()
        cycle = getattr(self, "cycle", None)
        if cycle is not None and self._peer_der is not None:
            ext = cycle.scope.setdefault("extensions", {})
            ext.setdefault("tls", {"client_cert_der": self._peer_der})
