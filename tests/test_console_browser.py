"""The operator console in a real browser: Debian's headless Chromium driven by Playwright, talking real
HTTP to the service under uvicorn on a free loopback port (SQLite backend; test_console.py covers both
databases at the HTTP level).

A CPO signs in (keyboard only), sees only its certificates, opens one, revokes it with a reason after
the confirmation page, and then sees it revoked in the list and `revoked` as the OCSP responder's answer;
another CPO cannot find it (its URL is 404). The expiry chart is checked against a seeded set through the
data behind it (data attribute, drawn bars, CSV download). A form posted without the CSRF token is 403,
and a cross-site form is not even signed in (SameSite=Strict). Every page is checked for CSP violations,
labels, one h1 and text contrast. Screenshots go to test-artifacts/.

Chromium comes from Debian (`apt-get install chromium`, scripts/setup.sh); Playwright never downloads a
browser here. Without Chromium this module is skipped — except under CI or V2GPKI_TEST_REQUIRE_BROWSER=1,
where that is a failure.
"""

from __future__ import annotations

import csv
import http.server
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn
from sqlmodel import select

from api import auth as api_auth
from api.app import create_app
from api.auth import TokenBucket
from api.console import views
from pki.context import Context
from pki.issuance import Issued
from pki.orgs import create_api_key, create_org
from pki.store.models import Certificate
from tests.test_console import alnum, expected_weeks, ident, issue_secc, seed_expiry, url_of

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("V2GPKI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
except ImportError:  # pragma: no cover - dev extra not installed
    sync_playwright = None  # type: ignore[assignment]


def _require_browser() -> None:
    missing = None
    if sync_playwright is None:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    elif not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        missing = "Debian's chromium is not installed (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") or os.environ.get("V2GPKI_TEST_REQUIRE_BROWSER"):
            pytest.fail(missing)
        pytest.skip(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    base: str
    ctx: Context
    tag: str
    keys: dict[str, str]
    ops: dict[str, str]
    certs: dict[str, Issued]
    expiry_set: dict[str, list[datetime]]
    browser: Browser
    contexts: list[BrowserContext] = field(default_factory=list)

    def org(self, who: str) -> str:
        return f"{who}-{self.tag}"

    def new_page(self) -> tuple[Page, list[str]]:
        bc = self.browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True,
                                      locale="en-GB", timezone_id="UTC")
        bc.set_default_timeout(15_000)
        self.contexts.append(bc)
        page = bc.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                and "Failed to load resource" not in m.text else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        return page, problems

    def sign_in(self, page: Page, who: str) -> None:
        page.goto(self.base + "/console/login")
        page.get_by_role("textbox", name="API key").fill(self.keys[who])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(self.base + "/console")


@pytest.fixture(scope="module")
def live(sqlite_ctx: Context) -> Iterator[Live]:
    _require_browser()
    ctx = sqlite_ctx
    tag = secrets.token_hex(3)
    ops = {w: f"DE*{alnum(3)}" for w in ("cpo1", "cpo2", "cpo3")}
    keys = {}
    for who, op in ops.items():
        create_org(ctx.db, f"{who}-{tag}", "cpo", [op])
        keys[who] = create_api_key(ctx.db, f"{who}-{tag}")[0]
    certs = {"cpo1_a": issue_secc(ctx, f"cpo1-{tag}", ops["cpo1"], days=50),
             "cpo1_b": issue_secc(ctx, f"cpo1-{tag}", ops["cpo1"], days=60),
             "cpo2_a": issue_secc(ctx, f"cpo2-{tag}", ops["cpo2"])}
    expiry_set = seed_expiry(ctx, f"cpo3-{tag}", ops["cpo3"])

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="console-uvicorn", daemon=True)
    saved = views.SIGNIN_LIMIT, api_auth.AUTH_FAIL_LIMIT
    views.SIGNIN_LIMIT, api_auth.AUTH_FAIL_LIMIT = TokenBucket(1000, 1000), TokenBucket(1000, 1000)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    ARTIFACTS.mkdir(exist_ok=True)
    assert sync_playwright is not None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which(
                "chromium"), headless=True, args=CHROMIUM_ARGS)
            lv = Live(f"http://127.0.0.1:{port}", ctx, tag, keys, ops, certs, expiry_set, browser)
            try:
                yield lv
            finally:
                for bc in lv.contexts:
                    bc.close()
                browser.close()
    finally:
        views.SIGNIN_LIMIT, api_auth.AUTH_FAIL_LIMIT = saved
        server.should_exit = True
        thread.join(timeout=10)


# -- page checks ---------------------------------------------------------------------------------------------

_CONTRAST_JS = """() => {
  const parse = c => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(',').map(x => parseFloat(x)); return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lum = ({r, g, b}) => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const bgOf = el => { while (el) { const c = parse(getComputedStyle(el).backgroundColor); if (c && c.a > 0.5) return c;
    el = el.parentElement; } return {r: 255, g: 255, b: 255, a: 1}; };
  const bad = []; const seen = new Set();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const t = walker.currentNode; const el = t.parentElement;
    if (!t.textContent.trim() || seen.has(el) || el.closest('svg')) continue;
    seen.add(el);
    const cs = getComputedStyle(el); const r = el.getBoundingClientRect();
    if (cs.visibility === 'hidden' || r.width === 0 || r.height === 0 || r.right < 0) continue;
    const a = lum(parse(cs.color)), b = lum(bgOf(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(cs.fontSize), bold = parseInt(cs.fontWeight) >= 700;
    if (ratio < ((size >= 24 || (size >= 18.66 && bold)) ? 3 : 4.5))
      bad.push(el.tagName + ' "' + t.textContent.trim().slice(0, 30) + '" ' + ratio.toFixed(2));
  }
  return bad;
}"""

_LABELS_JS = """() => Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea'))
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.name || e.id)"""


def check_page(page: Page, problems: list[str]) -> None:
    """No CSP violation or script error; lang, one h1, every control labelled, WCAG AA text contrast."""
    assert not problems, problems
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("h1").count() == 1
    assert page.evaluate(_LABELS_JS) == []
    assert page.evaluate(_CONTRAST_JS) == []


def serials_on(page: Page) -> list[str]:
    return list(page.locator("table.certs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.serial)"))


def db_status(ctx: Context, i: Issued) -> str:
    with ctx.db.session() as s:
        return s.exec(select(Certificate.status).where(Certificate.issuer == i.issuer,
                                                       Certificate.serial == i.serial)).one()


# -- tests ------------------------------------------------------------------------------------------------------


def test_cpo_signs_in_revokes_and_another_cpo_cannot_see_it(live: Live) -> None:
    page, problems = live.new_page()
    target = live.certs["cpo1_a"]
    # Not signed in: sent to the sign-in page, which is usable with the keyboard alone.
    page.goto(live.base + "/console/certificates")
    assert page.url.startswith(live.base + "/console/login?next=")
    check_page(page, problems)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    for _ in range(10):
        if page.evaluate("document.activeElement.id") == "api_key":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api_key"
    page.keyboard.type(live.keys["cpo1"])
    page.keyboard.press("Enter")
    page.wait_for_url(live.base + "/console/certificates")
    # The session cookie: HttpOnly, Secure (and still sent over http://127.0.0.1), SameSite=Strict.
    cookie = next(c for c in page.context.cookies() if c["name"] == "v2gpki_console")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert "v2gpki_console" not in page.evaluate("document.cookie")
    assert live.keys["cpo1"] not in page.content()
    assert page.get_by_test_id("signed-in-org").inner_text() == live.org("cpo1")

    # Only cpo1's certificates.
    shown = set(serials_on(page))
    assert {live.certs["cpo1_a"].serial.upper(), live.certs["cpo1_b"].serial.upper()} <= shown
    with live.ctx.db.session() as s:
        own = {r.upper() for r in s.exec(select(Certificate.serial).where(Certificate.tenant == live.org("cpo1")))}
    assert shown <= own and live.certs["cpo2_a"].serial.upper() not in shown
    check_page(page, problems)
    page.screenshot(path=str(ARTIFACTS / "console-certificates.png"))

    # Open it: valid, and the OCSP responder says good.
    page.get_by_role("link", name=ident(target)).click()
    page.wait_for_url(live.base + url_of(target))
    assert page.get_by_test_id("status").inner_text() == "valid"
    assert page.get_by_test_id("ocsp-status").inner_text() == "good"
    assert page.get_by_test_id("serial").inner_text() == target.serial.upper()
    check_page(page, problems)
    page.screenshot(path=str(ARTIFACTS / "console-certificate.png"), full_page=True)

    # Revoke with a reason; the confirmation page names the identifier and changes nothing by itself.
    page.get_by_label("Reason").select_option("keyCompromise")
    page.get_by_role("button", name="Revoke…").click()
    assert page.get_by_test_id("confirm-identifier").inner_text() == ident(target)
    assert page.get_by_test_id("confirm-reason").inner_text() == "keyCompromise"
    check_page(page, problems)
    assert db_status(live.ctx, target) == "valid"
    page.get_by_role("button", name=f"Revoke {ident(target)}").click()
    page.wait_for_url(live.base + url_of(target) + "?revoked=1")
    assert page.get_by_test_id("status").inner_text() == "revoked"
    assert page.get_by_test_id("ocsp-status").inner_text() == "revoked"
    assert page.get_by_test_id("ocsp-reason").inner_text() == "keyCompromise"
    assert "as the OCSP responder answers it" in page.locator("p.ocsp").inner_text()
    assert db_status(live.ctx, target) == "revoked"

    # Revoked in the list.
    page.goto(live.base + "/console/certificates?identifier=" + quote(ident(target)))
    row = page.locator(f'tr[data-serial="{target.serial.upper()}"]')
    assert row.get_attribute("data-status") == "revoked"
    assert row.locator(".badge").inner_text() == "revoked"

    # Another CPO: not in its list, and the URL is 404.
    other, other_problems = live.new_page()
    live.sign_in(other, "cpo2")
    other.goto(live.base + "/console/certificates")
    assert target.serial.upper() not in serials_on(other)
    assert live.certs["cpo2_a"].serial.upper() in serials_on(other)
    other.get_by_label("Identifier starts with").fill(ident(target))
    other.get_by_role("button", name="Apply filters").click()
    assert other.get_by_test_id("total").inner_text() == "0"
    resp = other.goto(live.base + url_of(target))
    assert resp is not None and resp.status == 404
    assert other.locator("h1").inner_text() == "No such certificate"
    assert ident(target) not in other.content()
    check_page(other, other_problems)


def test_expiry_chart_matches_the_seeded_set(live: Live) -> None:
    page, problems = live.new_page()
    live.sign_in(page, "cpo3")
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Expiry").click()
    page.wait_for_url(live.base + "/console/expiry")
    chart = json.loads(page.locator("#expiry-chart").get_attribute("data-expiry") or "{}")
    start = datetime.combine(date.fromisoformat(chart["weeks"][0]), dtime(0), tzinfo=UTC)
    want = expected_weeks(live.expiry_set, start)
    assert chart["counts"] == want and sum(chart["totals"]) == 8
    # What is drawn: one rect per (week, profile) with a count, with a visible height.
    bars: list[dict[str, Any]] = page.locator("#expiry-chart rect.bar").evaluate_all(
        "rs => rs.map(r => ({p: r.dataset.profile, w: +r.dataset.week, n: +r.dataset.count,"
        " h: r.getBoundingClientRect().height}))")
    drawn = {p: [0] * 26 for p in want}
    for b in bars:
        drawn[b["p"]][b["w"]] += b["n"]
        assert b["h"] > 1
    assert drawn == want
    tallest = max(bars, key=lambda b: b["n"])
    assert all(b["h"] <= tallest["h"] * b["n"] / tallest["n"] + 1 for b in bars)  # heights scale with counts
    assert page.get_by_test_id("grand-total").inner_text() == "8"
    check_page(page, problems)
    page.screenshot(path=str(ARTIFACTS / "console-expiry.png"), full_page=True)
    # The legend (console.js, loaded under the CSP) hides and shows a profile.
    page.get_by_role("button", name="secc").click()
    assert page.locator("#expiry-chart rect.bar.dim").count() == sum(1 for b in bars if b["p"] == "secc")
    page.get_by_role("button", name="secc").click()
    assert page.locator("#expiry-chart rect.bar.dim").count() == 0
    # The same numbers as CSV, downloaded by the browser.
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download as CSV").click()
    path = dl.value.path()
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == ["week_start", "week_end", "total", "cs-client", "secc"]
    assert [int(r[3]) for r in rows[1:]] == want["cs-client"] and [int(r[4]) for r in rows[1:]] == want["secc"]
    assert rows[1][0] == chart["weeks"][0]


def test_hierarchy_page_in_the_browser(live: Live) -> None:
    page, problems = live.new_page()
    live.sign_in(page, "cpo1")
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Hierarchies").click()
    sub2 = page.locator('li[data-ca="cpo-sub2"]')
    assert sub2.get_attribute("data-kind") == "issuing CA"
    # nested: root → sub-CA 1 → sub-CA 2
    assert page.locator('li[data-ca="v2g-root"] li[data-ca="cpo-sub1"] li[data-ca="cpo-sub2"]').count() == 1
    assert sub2.locator("code.uri").first.inner_text().startswith("pkcs11:")
    assert sub2.locator("svg.validity rect.span").first.bounding_box() is not None
    page.screenshot(path=str(ARTIFACTS / "console-hierarchies.png"), full_page=False)
    # collapsible with the keyboard (details/summary)
    summary = page.locator('li[data-ca="cpo-sub1"] > details > summary')
    summary.focus()
    page.keyboard.press("Enter")
    assert not sub2.is_visible()
    page.keyboard.press("Enter")
    assert sub2.is_visible()
    check_page(page, problems)


class _Attacker(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_csrf_attempts_are_refused(live: Live) -> None:
    page, _ = live.new_page()
    live.sign_in(page, "cpo1")
    target = live.certs["cpo1_b"]
    page.goto(live.base + url_of(target))
    # Same-origin form without the token (as an injected form would be): 403, nothing revoked.
    with page.expect_navigation() as nav:
        page.evaluate("""() => { const f = document.createElement('form'); f.method = 'post';
            f.action = location.pathname + '/revoke';
            const r = document.createElement('input'); r.name = 'reason'; r.value = 'keyCompromise'; f.appendChild(r);
            document.body.appendChild(f); f.submit(); }""")
    response = nav.value
    assert response is not None and response.status == 403
    assert page.locator("h1").inner_text() == "Form refused"
    assert db_status(live.ctx, target) == "valid"

    # Cross-site (http://localhost is another site than http://127.0.0.1): even with a valid token the
    # SameSite=Strict cookie is not sent, so the post is not signed in and changes nothing.
    page.goto(live.base + url_of(target) + "/revoke?reason=keyCompromise")
    token = page.locator('input[name="csrf"]').first.get_attribute("value")
    _Attacker.body = (f'<!doctype html><html lang="en"><title>win a prize</title><form method="post" '
                      f'action="{live.base}{url_of(target)}/revoke"><input type="hidden" name="csrf" value="{token}">'
                      f'<input type="hidden" name="reason" value="keyCompromise"><button>Claim</button></form>').encode()
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    t = threading.Thread(target=evil.serve_forever, daemon=True)
    t.start()
    try:
        page.goto(f"http://localhost:{evil.server_address[1]}/")
        page.get_by_role("button", name="Claim").click()
        page.wait_for_url(lambda u: u.startswith(live.base + "/console/login"))
    finally:
        evil.shutdown()
        evil.server_close()
    assert db_status(live.ctx, target) == "valid"
    # ... and the session itself is intact for same-site navigation.
    page.goto(live.base + url_of(target))
    assert page.get_by_test_id("status").inner_text() == "valid"
