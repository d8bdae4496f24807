"""The OCSP source chain (pki/ocsp/sources.py): order, fall-through, and the one freshness rule that both
responders (the API's /ocsp and `v2gpki ocsp-serve`) and the refresh worker use."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as x509_ocsp

from pki.context import Context
from pki.ocsp import (
    Answer,
    Chain,
    MemorySource,
    Query,
    certid_der,
    fresh_until,
    is_fresh,
    responder_for,
)
from pki.ocsp.signers import _Issuer
from tests.conftest import csr_pem

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MARGIN = timedelta(hours=108)
NH, KH = b"\x01" * 20, b"\x02" * 20


def _rule(**kw: object) -> datetime | None:
    args: dict[str, object] = dict(stored_status="good", this_update=T0, next_update=T0 + 2 * MARGIN, want="good",
                                   revoked_at=None, signer_since=T0 - timedelta(days=1), margin=MARGIN)
    args.update(kw)
    return fresh_until(**args)  # type: ignore[arg-type]


def test_freshness_rule() -> None:
    assert _rule() == T0 + MARGIN  # served until half the validity is left (RFC 5019 §4)
    assert is_fresh(_rule(), T0 + MARGIN) and not is_fresh(_rule(), T0 + MARGIN + timedelta(seconds=1))
    assert _rule(want="revoked") is None  # says good, the certificate is revoked now
    assert _rule(stored_status="hold", want="good") is None  # a released hold
    assert _rule(signer_since=T0 + timedelta(seconds=1)) is None  # made by a replaced signer
    revoked = dict(stored_status="revoked", want="revoked")
    assert _rule(**revoked, revoked_at=T0 - timedelta(seconds=1)) == T0 + MARGIN
    assert _rule(**revoked, revoked_at=T0 + timedelta(seconds=1)) is None  # made before the revocation
    assert _rule(**revoked, revoked_at=None) is None
    assert _rule(stored_status=None) is None and _rule(next_update=None) is None
    assert not is_fresh(None, T0)


def _answer(tag: bytes) -> Answer:
    return Answer(tag, "successful", "good", T0, T0 + 2 * MARGIN, cacheable=True)


class _Fixed:
    def __init__(self, ans: Answer | None) -> None:
        self.ans, self.asked = ans, 0

    def response(self, q: Query) -> Answer | None:
        self.asked += 1
        return self.ans


def _query(now: datetime = T0) -> Query:
    iss = _Issuer("ca", {"sha1": (NH, KH)}, None)
    return Query(iss, "sha1", certid_der("sha1", NH, KH, 7), 7, now, lambda _i, _s: None, MARGIN)


def test_chain_first_source_with_an_answer_wins() -> None:
    a, b, c = _Fixed(None), _Fixed(_answer(b"B")), _Fixed(_answer(b"C"))
    assert Chain([a, b, c]).response(_query()) == _answer(b"B")
    assert (a.asked, b.asked, c.asked) == (1, 1, 0)  # never past the first answer
    assert Chain([a]).response(_query()) is None


def test_stale_memory_falls_through() -> None:
    memory = MemorySource()
    key = certid_der("sha1", NH, KH, 7)
    memory.entries[key] = (_answer(b"M"), (T0 + MARGIN).timestamp())
    nxt = _Fixed(_answer(b"N"))
    chain = Chain([memory, nxt])
    assert chain.response(_query(T0)) == _answer(b"M") and nxt.asked == 0
    assert chain.response(_query(T0 + MARGIN + timedelta(seconds=1))) == _answer(b"N") and nxt.asked == 1
    # other hash algorithms are never in memory (its keys are canonical SHA-1 CertIDs)
    q = _query()
    q.alg = "sha256"
    assert memory.response(q) is None


def _certid_request(ctx: Context, serial: int) -> bytes:
    iss = responder_for(ctx).issuer("cpo-sub2")
    assert iss is not None
    nh, kh = iss.hashes["sha1"]
    return (x509_ocsp.OCSPRequestBuilder().add_certificate_by_hash(nh, kh, serial, hashes.SHA1())
            .build().public_bytes(serialization.Encoding.DER))


def test_responder_chain_stored_then_live(ctx: Context) -> None:
    """The API responder's chain: a fresh stored response is served as it is; a stale one falls through to
    the live source, which re-signs and stores it; the next request gets the stored one again."""
    issued = ctx.engine.issue_from_csr("secc", csr_pem(f"DE*ICE*E{secrets.token_hex(4).upper()}", dc="CPO"))
    r = responder_for(ctx)
    assert r.presigner.flush()
    serial = int(issued.serial, 16)
    iss = r.issuer(issued.issuer)
    assert iss is not None and iss.signer is not None
    raw = certid_der("sha1", *iss.hashes["sha1"], serial)
    row = r._lookup.lookup(issued.issuer, issued.serial)
    assert row is not None and row.der is not None
    now = datetime.now(UTC)

    def q(at: datetime) -> Query:
        return Query(iss, "sha1", raw, serial, at, r._lookup.lookup, r.margin)

    assert r.stored.response(q(now)) is not None
    assert r.stored.response(q(now)).der == row.der  # type: ignore[union-attr]
    assert r.chain.response(q(now)).der == row.der  # type: ignore[union-attr]
    # Past half its validity, the stored response is not fresh: the stored source has nothing, the chain
    # without the live source answers None (respond_presigned), the full chain signs a new one.
    late = row.next_update - r.margin + timedelta(seconds=1)  # type: ignore[operator]
    assert r.stored.response(q(late)) is None
    assert r.presigned_chain.response(q(late)) is None
    fresh = r.chain.response(q(late))
    assert fresh is not None and fresh.der != row.der and fresh.cert_status == "good"
    stored = r._lookup.lookup(issued.issuer, issued.serial)
    assert stored is not None and stored.der == fresh.der  # the live source stored it


@pytest.mark.parametrize("serial", [1, 2**64 + 3])
def test_unknown_serial_is_answered_live_then_from_the_unknown_cache(ctx: Context, serial: int) -> None:
    r = responder_for(ctx)
    der = _certid_request(ctx, serial + secrets.randbelow(2**32))
    assert r.respond_presigned(der) is None  # never signed yet: only the live source can answer
    first = r.respond(der)
    assert first.cert_status == "unknown"
    again = r.respond_presigned(der)  # now the stored source answers from its cache of unknown answers
    assert again is not None and again.der == first.der
