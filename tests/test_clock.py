"""Clock tolerance and grace (#27 item 4): notBefore backdated by the profile's margin and clamped to the
issuer's notBefore; signing refused (typed error, HTTP 503 with Retry-After, CLI exit 6, a metric) while
this host's clock and the database server's disagree by more than V2GPKI_MAX_CLOCK_SKEW_SECONDS."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from api.problems import status_of
from pki import issuance
from pki.clock import ClockGuard
from pki.context import Context
from pki.csr import SubjectFields
from pki.errors import ClockSkew
from pki.issuance import IssueRequest
from tests.conftest import cli_env, csr_pem, org_with_fresh_prefix, run_cli

PROFILE, ISSUER = "api-client", "csms-root"


def _issue_ocsp_like(ctx: Context) -> x509.Certificate:
    """A leaf of a profile without tenancy checks, straight through the engine (the API and template
    paths are covered below)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return ctx.engine.issue(IssueRequest(
        profile=PROFILE, public_key=key.public_key(), ca=ISSUER,
        subject=SubjectFields(cn="clock test", o="V2G PKI Demo", c="DE", dc=None))).cert


def test_not_before_is_backdated_by_the_profiles_margin(ctx: Context) -> None:
    margin = ctx.profiles.get(PROFILE).not_before_margin_seconds
    assert margin == 3600  # the default: one hour
    before = datetime.now(UTC).replace(microsecond=0)
    cert = _issue_ocsp_like(ctx)
    after = datetime.now(UTC)
    nb = cert.not_valid_before_utc
    issuer_nb = ctx.engine.ca(ISSUER).cert.not_valid_before_utc
    want_low = max(before - timedelta(seconds=margin), issuer_nb)
    assert want_low - timedelta(seconds=1) <= nb <= max(after - timedelta(seconds=margin), issuer_nb)
    # The validity period is the profile's, counted from the backdated notBefore (or the issuer's end).
    days = ctx.profiles.get(PROFILE).validity_days
    assert cert.not_valid_after_utc == min(nb + timedelta(days=days), ctx.engine.ca(ISSUER).cert.not_valid_after_utc)


def test_leaf_through_the_template_path_is_backdated_too(ctx: Context) -> None:
    """The second leaf of a shape comes from the pre-linted TBS template (pki/tbs.py): same margin."""
    org = "Clock CPO " + ctx.db.engine.dialect.name
    prefix = org_with_fresh_prefix(ctx, org, "cpo")
    certs = []
    for n in range(3):
        cn = f"{prefix.replace('-', '*')}*E{n}"
        certs.append(ctx.engine.issue_from_csr("secc", csr_pem(cn, o=org, dc="CPO"), tenant=org).cert)
    now = datetime.now(UTC)
    for c in certs:
        delta = now - c.not_valid_before_utc
        assert timedelta(minutes=59) < delta < timedelta(minutes=62), delta
    assert len(ctx.engine._templates) > 0


def test_not_before_is_clamped_to_the_issuers(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issued a moment after the issuer was created: the margin would reach before the issuer's own
    notBefore, and the certificate starts exactly where its issuer does instead."""
    issuer_nb = ctx.engine.ca(ISSUER).cert.not_valid_before_utc
    monkeypatch.setattr(issuance, "utcnow", lambda: issuer_nb + timedelta(minutes=10))
    cert = _issue_ocsp_like(ctx)
    assert cert.not_valid_before_utc == issuer_nb


def test_margin_is_configurable_per_profile(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    p = ctx.profiles.get(PROFILE)
    monkeypatch.setitem(ctx.profiles.profiles, PROFILE, p.model_copy(update={"not_before_margin_seconds": 0}))
    before = datetime.now(UTC).replace(microsecond=0)
    cert = _issue_ocsp_like(ctx)
    assert before <= cert.not_valid_before_utc <= datetime.now(UTC)


# -- clock agreement with the database server ----------------------------------------------------------


@pytest.fixture
def skewed(pg_ctx: Context) -> Iterator[ClockGuard]:
    """The PostgreSQL context's guard with the database time query replaced by one 300 s ahead."""
    guard = pg_ctx.engine.clock_guard
    assert guard is not None and guard.applies
    real = guard.db_clock
    guard.db_clock = lambda: real() + timedelta(seconds=300)
    guard.last = None
    yield guard
    guard.db_clock = real
    guard.last = None


def test_real_clocks_agree_on_postgresql(pg_ctx: Context) -> None:
    guard = pg_ctx.engine.clock_guard
    assert guard is not None
    r = guard.measure()
    assert r is not None and not r.exceeds(guard.max_skew), r


def test_sqlite_is_never_compared(sqlite_ctx: Context) -> None:
    guard = sqlite_ctx.engine.clock_guard
    assert guard is not None and not guard.applies
    assert guard.current() is None
    guard.require()


def test_signing_refused_under_clock_skew(pg_ctx: Context, skewed: ClockGuard) -> None:
    with pytest.raises(ClockSkew) as err:
        _issue_ocsp_like(pg_ctx)
    assert status_of(err.value) == 503 and int(str(err.value.context["retry_after"])) >= 1  # the API answers 503
    assert "300 s behind" in err.value.message
    # The clocks agree again: signing resumes once the reading is refreshed.
    skewed.db_clock = lambda: datetime.now(UTC)
    skewed.last = None
    _issue_ocsp_like(pg_ctx)


def test_skew_within_the_bound_is_accepted(pg_ctx: Context) -> None:
    guard = pg_ctx.engine.clock_guard
    assert guard is not None
    real = guard.db_clock
    try:
        guard.db_clock = lambda: real() + timedelta(seconds=guard.max_skew / 2)
        guard.last = None
        _issue_ocsp_like(pg_ctx)
    finally:
        guard.db_clock = real
        guard.last = None


def test_local_clock_behind_is_refused_too(pg_ctx: Context) -> None:
    """The host's clock source itself (not the database) runs 10 minutes slow."""
    guard = pg_ctx.engine.clock_guard
    assert guard is not None
    real = guard.clock
    try:
        guard.clock = lambda: real() - 600
        guard.last = None
        with pytest.raises(ClockSkew):
            guard.require()
    finally:
        guard.clock = real
        guard.last = None


def test_api_answers_503_problem_with_retry_after_and_counts_it(pg_ctx: Context, skewed: ClockGuard) -> None:
    from api.app import create_app
    from api.observability import CLOCK_REFUSALS, CLOCK_SKEW, render_metrics
    from pki.orgs import create_api_key

    org = "Clock API CPO"
    prefix = org_with_fresh_prefix(pg_ctx, org, "cpo")
    key, _ = create_api_key(pg_ctx.db, org)
    app = create_app(pg_ctx)
    before = CLOCK_REFUSALS._value.get()
    with TestClient(app) as client:
        csr = csr_pem(f"{prefix}*E1", o=org, dc="CPO").decode()
        r = client.post("/v1/enrollments", json={"profile": "secc", "csr": csr},
                        headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"].endswith("/clock-skew")
        assert int(r.headers["Retry-After"]) >= 1
    assert CLOCK_REFUSALS._value.get() == before + 1
    assert CLOCK_SKEW._value.get() == pytest.approx(300, abs=5)
    assert b"v2gpki_clock_skew_seconds" in render_metrics(pg_ctx)


def test_cli_exits_6_under_clock_skew(pg_ctx: Context, tmp_path: object) -> None:
    """`v2gpki issue` in a process whose clock source runs 15 minutes slow (a sitecustomize skews the
    guard's clock, as the fixtures above do in-process): exit 6, the reason on stderr."""
    from pathlib import Path

    work = Path(str(tmp_path))
    (work / "req.csr").write_bytes(csr_pem("clock cli", o="V2G PKI Demo"))
    # A wrapper that skews the guard's clock source inside the CLI process, as the fixtures do in-process.
    (work / "sitecustomize.py").write_text(
        "import time\n"
        "import pki.clock as c\n"
        "_orig = c.ClockGuard.__init__\n"
        "def _init(self, *a, **k):\n"
        "    _orig(self, *a, **k)\n"
        "    self.clock = lambda: time.time() - 900\n"
        "c.ClockGuard.__init__ = _init\n")
    env = cli_env(pg_ctx, PYTHONPATH=str(work))
    res = run_cli(["issue", "--profile", PROFILE, "--ca", ISSUER, "--csr", str(work / "req.csr")], env)
    assert res.returncode == 6, res.stderr
    assert "clock" in res.stderr and "V2GPKI_MAX_CLOCK_SKEW_SECONDS" in res.stderr
