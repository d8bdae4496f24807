"""CRLs (RFC 5280 §5): streamed DER signed in the HSM, checked by `openssl crl`, `openssl verify
-crl_check_all`, cryptography's parser and pkilint's CRL linter; served over HTTP with caching headers."""

from __future__ import annotations

import contextlib
import io
import secrets
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from sqlalchemy import delete, insert
from sqlmodel import select

from pki.config import Settings
from pki.context import Context
from pki.crl import CrlScheduler, cache_for, generate_crl, latest_meta, load_crl, scheduler_for
from pki.errors import CRLUnavailable
from pki.issuance import REASONS, Issued, pem
from pki.store.db import utcnow
from pki.store.models import Certificate, CertificateAuthority
from pki.wiring import build_context
from tests.conftest import csr_pem

_CERT = Certificate.__table__  # type: ignore[attr-defined]


def _evseid() -> str:
    return f"DE*ICE*E{secrets.token_hex(4).upper()}"


def _leaf(ctx: Context) -> Issued:
    return ctx.engine.issue_from_csr("secc", csr_pem(_evseid(), dc="CPO"))


def openssl_crl(der: bytes, issuer: x509.Certificate, tmp: Path) -> subprocess.CompletedProcess[str]:
    (tmp / "crl.der").write_bytes(der)
    (tmp / "ca.pem").write_text(pem(issuer))
    return subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp / "crl.der"), "-CAfile",
                           str(tmp / "ca.pem"), "-noout"], capture_output=True, text=True)


def pkilint_crl(der: bytes, tmp: Path, kind: str = "CRL") -> tuple[int, str]:
    """pkilint's own CLI (lint_crl), in-process: (finding count, report)."""
    from pkilint.bin import lint_crl

    f = tmp / f"crl-{secrets.token_hex(4)}.der"
    f.write_bytes(der)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = lint_crl.main(["lint", "-t", kind, "-p", "PKIX", str(f)])
    return rc, out.getvalue()


def test_crl_contents_verify_and_lint(ctx: Context, tmp_path: Path) -> None:
    leaves = {r: _leaf(ctx) for r in ("keyCompromise", "certificateHold", "unspecified", "cessationOfOperation")}
    for reason, i in leaves.items():
        ctx.engine.revoke(i.serial, reason, issuer=i.issuer)
    good = _leaf(ctx)
    info = generate_crl(ctx, "cpo-sub2")
    stored = load_crl(ctx.db, "cpo-sub2")
    assert stored is not None and stored.number == info.number
    ca = ctx.engine.ca("cpo-sub2")
    r = openssl_crl(stored.der, ca.cert, tmp_path)
    assert r.returncode == 0 and "verify OK" in r.stderr, r.stderr
    crl = x509.load_der_x509_crl(stored.der)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.cert.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == info.number
    assert crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca.ski
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(hours=ctx.settings.crl_validity_hours)
    for reason, i in leaves.items():
        entry = crl.get_revoked_certificate_by_serial_number(i.cert.serial_number)
        assert entry is not None, reason
        exts = {e.oid for e in entry.extensions}
        if reason == "unspecified":
            assert x509.oid.CRLEntryExtensionOID.CRL_REASON not in exts  # RFC 5280 §5.3.1: absent instead
        else:
            got = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            assert got == REASONS[reason]
    assert crl.get_revoked_certificate_by_serial_number(good.cert.serial_number) is None
    rc, report = pkilint_crl(stored.der, tmp_path)
    assert rc == 0, report
    # a root's CRL is an ARL (it lists CA certificates)
    generate_crl(ctx, "v2g-root")
    root_crl = load_crl(ctx.db, "v2g-root")
    assert root_crl is not None
    rc, report = pkilint_crl(root_crl.der, tmp_path, "ARL")
    assert rc == 0, report


def test_crl_number_strictly_increasing_under_concurrency(ctx: Context) -> None:
    before = latest_meta(ctx.db, "cpo-sub1")
    numbers: list[int] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            numbers.append(generate_crl(ctx, "cpo-sub1").number)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    start = before[0] if before else 0
    assert sorted(numbers) == list(range(start + 1, start + 5))
    with ctx.db.session() as s:
        ca = s.exec(select(CertificateAuthority).where(CertificateAuthority.name == "cpo-sub1")).one()
    assert ca.crl_number == start + 4
    meta = latest_meta(ctx.db, "cpo-sub1")
    assert meta is not None and meta[0] == start + 4


def test_a_stream_of_revocations_is_one_crl_per_interval_and_flush_publishes_every_one(ctx: Context) -> None:
    """The scheduler's rate bound: a burst of revocations is one CRL now and one more when the interval has
    passed (or on flush), never one per revocation; and flush publishes every revocation (none lost)."""
    slow = CrlScheduler(lambda: ctx, min_interval=3600)  # beside the Context's own; only its count is checked
    first = _leaf(ctx)
    ctx.engine.revoke(first.serial, "keyCompromise", issuer=first.issuer)
    slow.mark(first.issuer)  # quiet so far: starts at once
    for _ in range(600):
        if slow.generations == 1 and not slow._busy:
            break
        threading.Event().wait(0.05)
    assert slow.generations == 1
    later = [_leaf(ctx) for _ in range(5)]
    for leaf in later:
        ctx.engine.revoke(leaf.serial, "superseded", issuer=leaf.issuer)
        slow.mark(leaf.issuer)
    assert slow.generations == 1  # marked five more times inside the interval: nothing generated yet
    assert slow.flush(60)
    assert slow.generations == 2  # the five coalesced into one
    latest = load_crl(ctx.db, first.issuer)
    assert latest is not None
    crl = x509.load_der_x509_crl(latest.der)
    for leaf in [first, *later]:
        assert crl.get_revoked_certificate_by_serial_number(leaf.cert.serial_number) is not None


def test_the_crl_interval_is_a_setting(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ctx.crl_scheduler.min_interval == 1.0  # the documented default (docs/operations.md)
    monkeypatch.setenv("V2GPKI_CRL_MIN_INTERVAL_SECONDS", "30")
    assert Settings().crl_min_interval_seconds == 30.0
    other = build_context(ctx.settings.model_copy(update={"crl_min_interval_seconds": 30.0}),
                          keystore=ctx.keystore, migrate=False)
    assert other.crl_scheduler.min_interval == 30.0


def test_revocation_regenerates_and_http_serves_it(ctx: Context, responder_url: str) -> None:
    first = httpx.get(f"{responder_url}/crl/cpo-sub2.crl", timeout=30)
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/pkix-crl"
    for h in ("etag", "last-modified", "expires"):
        assert h in first.headers
    cc = first.headers["cache-control"]
    assert "public" in cc and "no-transform" in cc and "max-age=" in cc
    n1 = x509.load_der_x509_crl(first.content).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert httpx.get(f"{responder_url}/crl/cpo-sub2.crl",
                     headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    leaf = _leaf(ctx)
    ctx.engine.revoke(leaf.serial, "affiliationChanged", issuer=leaf.issuer)
    assert scheduler_for(ctx).flush(60)  # the hook's background regeneration is done
    second = httpx.get(f"{responder_url}/crl/cpo-sub2.crl", timeout=30)
    crl = x509.load_der_x509_crl(second.content)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > n1
    assert crl.get_revoked_certificate_by_serial_number(leaf.cert.serial_number) is not None
    assert second.headers["etag"] != first.headers["etag"]
    for bad in ("nope.crl", "cpo-sub2", "CPO-SUB2.crl", "..%2Fetc.crl"):
        r = httpx.get(f"{responder_url}/crl/{bad}")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", bad


def test_openssl_verify_crl_check_all(ctx: Context, tmp_path: Path) -> None:
    good, bad = _leaf(ctx), _leaf(ctx)
    ctx.engine.revoke(bad.serial, "keyCompromise", issuer=bad.issuer)
    chain = ctx.engine.chain("cpo-sub2")
    crls = []
    for ca in ("cpo-sub2", "cpo-sub1", "v2g-root"):
        generate_crl(ctx, ca)
        c = load_crl(ctx.db, ca)
        assert c is not None
        crls.append(x509.load_der_x509_crl(c.der).public_bytes(encoding=_pem_enc()).decode())
    (tmp_path / "crls.pem").write_text("".join(crls))
    (tmp_path / "root.pem").write_text(pem(chain[-1]))
    (tmp_path / "chain.pem").write_text("".join(pem(c) for c in chain[:-1]))
    for name, leaf in (("good", good), ("bad", bad)):
        (tmp_path / f"{name}.pem").write_text(pem(leaf.cert))
    base = ["openssl", "verify", "-crl_check_all", "-CRLfile", str(tmp_path / "crls.pem"), "-CAfile",
            str(tmp_path / "root.pem"), "-untrusted", str(tmp_path / "chain.pem")]
    ok = subprocess.run([*base, str(tmp_path / "good.pem")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ko = subprocess.run([*base, str(tmp_path / "bad.pem")], capture_output=True, text=True)
    assert ko.returncode != 0 and "certificate revoked" in ko.stdout + ko.stderr


def _pem_enc():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def _fake_revoked(issuer: str, n: int, tag: str, *, expired_days: float | None = None) -> list[dict[str, object]]:
    now = utcnow()
    reasons = [None, "keyCompromise", "superseded", "unspecified", "cessationOfOperation"]
    rows = []
    for k in range(n):
        not_after = now - timedelta(days=expired_days) if expired_days is not None else now + timedelta(days=30)
        rows.append(dict(
            issuer=issuer, serial=format(secrets.randbits(127) | (1 << 100), "x"), profile="secc",
            subject="CN=crl test", identifier=tag, tenant=None, not_before=now - timedelta(days=400),
            not_after=not_after, status="revoked" if k % 7 else "hold",
            revoked_at=now - timedelta(seconds=k * 37), revocation_reason=reasons[k % len(reasons)] if k % 7 else
            "certificateHold", key_uri=None, fingerprint=secrets.token_hex(32), der=b"\x00", created_at=now))
    return rows


@pytest.mark.parametrize("ca", ["mo-sub2-20-ed448", "cpo-sub2-20"])
def test_streamed_crl_matches_the_database(ctx: Context, ca: str, tmp_path: Path) -> None:
    """A few thousand entries through the streaming encoder (Ed448: whole-message signing; P-521:
    SHA-512 prehash), compared entry by entry with cryptography's parser; expired entries are dropped
    once a scheduled CRL after expiry has carried them (RFC 5280 §3.3)."""
    tag = f"crl-test-{secrets.token_hex(4)}"
    live = _fake_revoked(ca, 3000, tag)
    just_expired = _fake_revoked(ca, 5, tag, expired_days=0.5)  # still inside one CRL period: kept
    long_expired = _fake_revoked(ca, 5, tag, expired_days=30)  # carried long ago: dropped
    with ctx.db.engine.begin() as conn:
        conn.execute(insert(_CERT), live + just_expired + long_expired)
    try:
        info = generate_crl(ctx, ca)
        stored = load_crl(ctx.db, ca)
        assert stored is not None
        h = ctx.engine.ca(ca)
        r = openssl_crl(stored.der, h.cert, tmp_path)
        assert r.returncode == 0 and "verify OK" in r.stderr, r.stderr
        crl = x509.load_der_x509_crl(stored.der)
        assert crl.is_signature_valid(h.cert.public_key())  # type: ignore[arg-type]
        got = {format(e.serial_number, "x"): e for e in crl}
        for row in live + just_expired:
            e = got.get(str(row["serial"]))
            assert e is not None
            assert e.revocation_date_utc == row["revoked_at"]
            reason = row["revocation_reason"]
            if reason in (None, "unspecified"):
                assert len(e.extensions) == 0
            else:
                assert e.extensions.get_extension_for_class(x509.CRLReason).value.reason == REASONS[str(reason)]
        for row in long_expired:
            assert str(row["serial"]) not in got
        assert info.entries == len(got) >= len(live) + len(just_expired)
        print(f"\n[{ctx.db.engine.dialect.name}] CRL {ca}: {info.entries} entries, {info.size} bytes, "
              f"{info.seconds:.2f} s")
        rc, report = pkilint_crl(stored.der, tmp_path)
        assert rc == 0, report
    finally:
        with ctx.db.engine.begin() as conn:
            conn.execute(delete(_CERT).where(_CERT.c.identifier == tag))
        generate_crl(ctx, ca)


def test_empty_crl_has_no_revoked_list(ctx: Context, tmp_path: Path) -> None:
    ca = "oem-root-20"
    with ctx.db.session() as s:
        revoked = s.exec(select(Certificate).where(Certificate.issuer == ca,
                                                   Certificate.status != "valid")).first()
    if revoked is not None:
        pytest.skip("another test revoked a certificate of this CA")
    generate_crl(ctx, ca)
    stored = load_crl(ctx.db, ca)
    assert stored is not None
    assert len(x509.load_der_x509_crl(stored.der)) == 0
    r = openssl_crl(stored.der, ctx.engine.ca(ca).cert, tmp_path)
    assert r.returncode == 0 and "verify OK" in r.stderr, r.stderr
    rc, report = pkilint_crl(stored.der, tmp_path, "ARL")
    assert rc == 0, report


def test_responder_only_process_never_generates(ctx: Context) -> None:
    rctx = build_context(ctx.settings, migrate=False, responder_only=True)
    cache = cache_for(rctx)
    assert cache.may_generate is False
    missing = [h.name for h in rctx.engine.cas() if latest_meta(rctx.db, h.name) is None]
    if missing:
        with pytest.raises(CRLUnavailable):
            cache.get(missing[0])
    generate_crl(ctx, "cpo-sub2")  # published by the CA process …
    assert cache.get("cpo-sub2").number == latest_meta(ctx.db, "cpo-sub2")[0]  # type: ignore[index]
    assert all(rctx.engine.cached_ca_signer(h) is None for h in rctx.engine.cas())  # … served without a CA key
