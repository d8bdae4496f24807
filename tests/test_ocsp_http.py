"""ocsp-serve's request heads are parsed by llhttp (httptools, api/ocsp_fast.parse_head); the limits and
refusals it adds on top, head by head (the whole server is exercised in tests/test_ocsp_fast.py)."""

from __future__ import annotations

import pytest

from api.ocsp_fast import MAX_HEADER_LINES, HttpError, parse_head


def status(head: bytes) -> int:
    try:
        parse_head(head)
    except HttpError as exc:
        return exc.status
    return 200


@pytest.mark.parametrize("head, want", [
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 75", 200),
    (b"GET /ocsp/MEIw HTTP/1.0", 200),
    (b"POST  /ocsp HTTP/1.1\r\nHost: x", 400),  # two spaces: not method SP target SP version
    (b"POST /ocsp  HTTP/1.1\r\nHost: x", 400),
    (b"post /ocsp HTTP/1.1\r\nHost: x", 400),
    (b"GET /ocsp HTTP/2.0\r\nHost: x", 505),
    (b"GET /ocsp HTTP/1.2\r\nHost: x", 505),
    (b"GET /ocsp HTTP/0.9", 505),
    (b"GET /healthz HTTP/1.1", 400),  # no Host
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999999", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued", 400),  # obs-fold
    (b"GET /healthz HTTP/1.1\r\nHost : x", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\nX: y", 400),  # bare LF
    (b"GET /healthz HTTP/1.1\r\nHost: x\rX: y", 400),  # bare CR
    (b"GET /healthz HTTP/1.1\r\nHost: x\x00", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok", 400),
    (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * (MAX_HEADER_LINES - 1) + b"Y: z", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * (MAX_HEADER_LINES - 2) + b"Y: z", 200),
])
def test_head_status(head: bytes, want: int) -> None:
    assert status(head) == want


def test_head_fields() -> None:
    r = parse_head(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 75\r\nExpect: 100-continue\r\n"
                   b"If-None-Match: \"e\"")
    assert (r.method, r.target, r.v11, r.length, r.keep_alive, r.expect_continue, r.if_none_match) == \
        (b"POST", b"/ocsp", True, 75, True, True, b'"e"')
    # RFC 9112 §9.3: persistence
    assert parse_head(b"GET /x HTTP/1.0").keep_alive is False
    assert parse_head(b"GET /x HTTP/1.0\r\nConnection: keep-alive").keep_alive is True
    assert parse_head(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close").keep_alive is False
    assert parse_head(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive, Upgrade").keep_alive is True
