"""ocsp-serve's requests are framed by llhttp (httptools, api/ocsp_fast.RequestParser): the limits and
refusals it adds on top, head by head (``parse_head``), and the framing of bodies and pipelined requests
across reads (the whole server is exercised in tests/test_ocsp_fast.py)."""

from __future__ import annotations

import gc

import pytest

from api.ocsp_fast import MAX_HEAD, MAX_HEADER_LINES, MAX_OCSP_REQUEST, HttpError, RequestParser, parse_head


def status(head: bytes) -> int:
    try:
        parse_head(head)
    except HttpError as exc:
        return exc.status
    return 200


@pytest.mark.parametrize("head, want", [
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 75", 200),
    (b"GET /ocsp/MEIw HTTP/1.0", 200),
    # RFC 9112 §3: the grammar is method SP request-target SP version, but "recipients MAY instead parse on
    # whitespace-delimited word boundaries": llhttp takes runs of SP (the hand-written framing refused them
    # with 400); other whitespace, or whitespace after the version, is still refused.
    (b"GET  /healthz HTTP/1.1\r\nHost: x", 200),
    (b"GET /healthz  HTTP/1.1\r\nHost: x", 200),
    (b"GET\t/healthz HTTP/1.1\r\nHost: x", 400),
    (b"GET /healthz HTTP/1.1 \r\nHost: x", 400),
    (b"post /ocsp HTTP/1.1\r\nHost: x", 400),
    (b"GET /ocsp HTTP/2.0\r\nHost: x", 505),
    (b"GET /ocsp HTTP/1.2\r\nHost: x", 505),
    (b"GET /ocsp HTTP/0.9", 505),
    (b"GET /healthz HTTP/1.1", 400),  # no Host
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4", 400),
    # RFC 9110 §8.6: Content-Length is any 1*DIGIT ("anticipate potentially large decimal numerals"), so a
    # large one is valid and refused as too large (§15.5.14), not as malformed (the hand-written framing
    # answered 400 beyond 9 digits); past 64 bits llhttp refuses it as malformed.
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999999", 413),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999", 400),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: %d" % (MAX_OCSP_REQUEST + 1), 413),
    (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: %d" % MAX_OCSP_REQUEST, 200),
    (b"POST /ocsp HTTP/1.1\r\nHost: x", 411),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d" % (MAX_OCSP_REQUEST + 1), 413),
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


# -- bodies and pipelining, framed by llhttp across reads ------------------------------------------------

POST = b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def framed(reads: list[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    rp = RequestParser()
    for data in reads:
        rp.feed(data)
    return [(r.method, r.target, body) for r, body in rp.done]


def test_bodies_and_pipelined_requests_whatever_the_reads() -> None:
    stream = b"\r\n" + POST + GET + b"POST /ocsp HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n" + POST
    want = [(b"POST", b"/ocsp", b"hello"), (b"GET", b"/healthz", b""), (b"POST", b"/ocsp", b""),
            (b"POST", b"/ocsp", b"hello")]
    assert framed([stream]) == want
    assert framed([stream[i : i + 1] for i in range(len(stream))]) == want  # one byte per read
    assert framed([stream[:40], stream[40:41], stream[41:]]) == want
    rp = RequestParser()
    rp.feed(POST[:-2])  # a body not all here: the head is complete, the request is not
    assert not rp.done and rp.current is not None and rp.current.length == 5 and not rp.in_head
    rp.feed(POST[-2:] + GET[:10])
    assert [b for _r, b in rp.done] == [b"hello"] and rp.in_head and rp.completed == 1


def test_requests_before_an_error_are_kept_and_the_error_raised() -> None:
    rp = RequestParser()
    with pytest.raises(HttpError) as exc:
        rp.feed(POST + GET + b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert exc.value.status == 400 and rp.completed == 2
    rp = RequestParser()
    with pytest.raises(HttpError) as exc:  # refused from its head: the body is never read
        rp.feed(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_OCSP_REQUEST + 1))
    assert exc.value.status == 413 and exc.value.body[:1] == b"\x30"  # a malformedRequest OCSPResponse
    assert rp.current is None and not rp.done
    # RFC 9112 §9.6: nothing is read after a request that ends the connection (the server answers it and
    # closes; the refusal of what follows is never sent, as the connection is closing).
    rp = RequestParser()
    with pytest.raises(HttpError):
        rp.feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET)
    assert rp.completed == 1 and rp.done[0][0].keep_alive is False


def test_a_head_without_end_is_refused_after_the_limit() -> None:
    rp = RequestParser()
    rp.feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    with pytest.raises(HttpError) as exc:  # llhttp keeps the unfinished field: counted read by read
        for _ in range(MAX_HEAD // 1000 + 2):
            rp.feed(b"a" * 1000)
    assert exc.value.status == 431
    rp = RequestParser()
    rp.feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(MAX_HEAD // 1000 - 1):
        rp.feed(b"a" * 1000)
    rp.feed(b"\r\n\r\n")  # within the limit
    assert rp.completed == 1
    with pytest.raises(HttpError) as exc:  # one read, one field
        RequestParser().feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n")
    assert exc.value.status == 431


def test_upgrade_is_answered_then_the_connection_closes() -> None:
    # RFC 9110 §7.8: a server may ignore Upgrade; llhttp frames nothing after such a request, so it is the
    # connection's last (keep_alive False), and one with a body is refused.
    rp = RequestParser()
    rp.feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n" + GET)
    assert rp.upgrade and rp.completed == 1 and rp.done[0][0].keep_alive is False
    with pytest.raises(HttpError) as exc:
        RequestParser().feed(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                             b"Content-Length: 5\r\n\r\nhello")
    assert exc.value.status == 400


def test_a_closed_connection_leaves_no_cycle_for_the_collector() -> None:
    # The parser holds its protocol's callbacks and the protocol the parser: unbroken, every connection left
    # a cycle for the cyclic collector, whose collections over the worker's heap cost bench/ocsp.py ≈ 70 µs
    # per new connection (#23 item 4).
    from types import SimpleNamespace

    from api.ocsp_fast import HttpConnection

    server = SimpleNamespace(responder=None, clock=1.0, conns=set(), max_per_client=0, per_client={})
    gc.collect()
    gc.disable()
    try:
        conn = HttpConnection(server)  # type: ignore[arg-type]
        conn.rp.feed(POST + GET[:20])
        conn.connection_lost(None)
        del conn
        rp = RequestParser()
        with pytest.raises(HttpError):
            rp.feed(b"\x16\x03\x01")
        rp.close()
        del rp
        parse_head(b"GET /healthz HTTP/1.1\r\nHost: x")
        assert gc.collect() == 0
    finally:
        gc.enable()
