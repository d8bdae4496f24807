"""Operator console routes: server-rendered HTML under /console (see docs/console.md).

Authentication reuses api/auth.py (API key via pki.orgs.authenticate_api_key, client certificate via
peer_certificate_der / _by_certificate, the shared failed-sign-in budget and audit in _fail, the per-
organization request budget). Every query is scoped by Principal.tenant_filter, so a CPO sees only its
own certificates (another tenant's certificate is 404, exactly as in /v1), while admin and auditor see
all. Revocation goes through ctx.engine.revoke with the same arguments as POST /v1/.../revoke (audited).
Routes that touch the database are sync `def` (FastAPI runs them in its thread pool).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote

from cryptography import x509
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

import api.console.data as data  # the submodules, not the package (its setup() imports this module)
import api.console.session as sess
import api.console.trustlists as trustlists
from api.auth import CLIENT_LIMIT, TokenBucket, _by_certificate, _client_ip, _fail, peer_certificate_der
from api.deps import CtxDep
from api.problems import status_of
from pki import audit
from pki.config import Settings, current
from pki.context import Context
from pki.errors import AlreadyRevoked, BadRevocation, NotFound, PKIError
from pki.issuance import REASONS
from pki.orgs import Principal, Unauthenticated, api_key_principal, authenticate_api_key
from pki.serials import parse_serial
from pki.store.audit_log import AuditLog
from pki.store.db import utcnow
from pki.store.inventory import Inventory
from pki.store.models import Certificate

log = logging.getLogger("v2gpki.console")

router = APIRouter(prefix="/console", include_in_schema=False)

HERE = Path(__file__).resolve().parent
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)

# Sign-in attempts per client address (successful or not), on top of api.auth's failed-attempt budget.
SIGNIN_LIMIT = TokenBucket(current().console_signin_rate, current().console_signin_burst)

# Reasons in the order an operator most often needs them (RFC 5280 §5.3.1 names, as the API takes them).
REASON_ORDER = ["keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged", "privilegeWithdrawn",
                "unspecified", "certificateHold", "cACompromise", "aACompromise"]
REASON_LABELS = {
    "keyCompromise": "Key compromise", "superseded": "Superseded (replaced by a new certificate)",
    "cessationOfOperation": "Cessation of operation", "affiliationChanged": "Affiliation changed",
    "privilegeWithdrawn": "Privilege withdrawn", "unspecified": "Unspecified",
    "certificateHold": "Certificate hold (suspend; can be released)", "cACompromise": "CA compromise",
    "aACompromise": "AA compromise",
}
assert set(REASON_ORDER) == set(REASONS)

PAGE_SIZE = 50


def _fmt_dt(v: datetime | None) -> str:
    return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if v else "—"


def _fmt_date(v: datetime | date | None) -> str:
    return v.strftime("%Y-%m-%d") if v else "—"


TEMPLATES.filters["dt"] = _fmt_dt
TEMPLATES.filters["d"] = _fmt_date
TEMPLATES.filters["urlq"] = lambda v: quote(str(v), safe="")
TEMPLATES.globals["REASON_LABELS"] = REASON_LABELS


# -- errors ------------------------------------------------------------------------------------------------


class ConsoleError(Exception):
    """Rendered as an HTML error page (the API's problem+json handler is for /v1)."""

    def __init__(self, status: int, title: str, message: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(title)
        self.status, self.title, self.message, self.headers = status, title, message, headers or {}


class SignInRequired(Exception):
    pass


def error_page(request: Request, exc: ConsoleError) -> HTMLResponse:
    html = TEMPLATES.get_template("error.html").render(status=exc.status, title=exc.title, message=exc.message)
    return HTMLResponse(html, status_code=exc.status, headers={"Cache-Control": "no-store", **exc.headers})


def sign_in_redirect(request: Request, _: SignInRequired) -> RedirectResponse:
    target = "/console/login"
    if request.method == "GET" and request.url.path != "/console/login":
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target += "?next=" + quote(nxt, safe="")
    resp = RedirectResponse(target, status_code=303)
    if sess.COOKIE in request.cookies:  # a stale or refused session; a request without one leaves cookies be
        _clear_cookie(request.app.state.ctx.settings, resp, sess.COOKIE)
    return resp


# -- sessions ----------------------------------------------------------------------------------------------


@dataclass
class Viewer:
    p: Principal
    s: sess.Session
    key: bytes

    @property
    def csrf(self) -> str:
        return sess.csrf_token(self.key, self.s)

    @property
    def can_revoke(self) -> bool:
        return self.p.role != "auditor"

    @property
    def sees_audit(self) -> bool:
        return self.p.role in ("admin", "auditor")


def _set_cookie(settings: Settings, resp: Response, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, max_age=max_age, path=sess.COOKIE_PATH, secure=sess.secure_cookies(settings),
                    httponly=True, samesite="strict")


def _clear_cookie(settings: Settings, resp: Response, name: str) -> None:
    resp.delete_cookie(name, path=sess.COOKIE_PATH, secure=sess.secure_cookies(settings), httponly=True,
                       samesite="strict")


def _signed_out(ctx: Context, s: sess.Session) -> bool:
    return AuditLog(ctx.db).has_event("console.signout", s.ref)


def _principal_of_session(ctx: Context, request: Request, s: sess.Session) -> Principal:
    """Re-check the credential behind the session on every request (revoked or expired → signed out)."""
    if s.credential.startswith("apikey:"):
        return api_key_principal(ctx.db, s.credential.split(":", 1)[1], s.org, s.credential)
    if s.credential.startswith("cert:"):
        der = peer_certificate_der(request)
        if der is None or hashlib.sha256(der).hexdigest() != s.cert_fp:
            raise Unauthenticated("the client certificate of this session is no longer presented")
        p = _by_certificate(ctx, der)
        if p.org != s.org:
            raise Unauthenticated("certificate bound to another organization")
        return p
    raise Unauthenticated("unknown credential")


def viewer(request: Request, ctx: CtxDep) -> Viewer:
    key = sess.session_key(ctx.settings)
    s = sess.decode(key, request.cookies.get(sess.COOKIE))
    if s is None:
        raise SignInRequired()
    try:
        if _signed_out(ctx, s):
            raise SignInRequired()
        p = _principal_of_session(ctx, request, s)
    except (Unauthenticated, NotFound, HTTPException):
        raise SignInRequired() from None
    wait = CLIENT_LIMIT.take(p.org)
    if wait > 0:
        raise ConsoleError(429, "Too many requests", "Slow down and try again in a moment.",
                           {"Retry-After": str(max(1, int(wait + 0.999)))})
    return Viewer(p, s, key)


ViewerDep = Annotated[Viewer, Depends(viewer)]


async def form_fields(request: Request) -> dict[str, str]:
    """application/x-www-form-urlencoded body → fields (the last of a repeated name wins)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise ConsoleError(415, "Unsupported form encoding", "Forms are sent as application/x-www-form-urlencoded.")
    body = await request.body()
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError):
        raise ConsoleError(400, "Malformed form") from None


FormDep = Annotated[dict[str, str], Depends(form_fields)]


def require_csrf(ctx: Context, request: Request, v: Viewer, f: dict[str, str]) -> None:
    if sess.check_csrf(v.key, v.s, f.get("csrf")):
        return
    audit.record(ctx.db, audit.Entry(actor=v.p.credential, org=v.p.org, action="console.csrf_refused",
                                     outcome="denied", details={"path": request.url.path}))
    raise ConsoleError(403, "Form refused", "This form was not sent from your console session (missing or wrong "
                       "CSRF token). Nothing was changed. Reload the page and try again.")


def render(request: Request, name: str, v: Viewer | None, *, status: int = 200, ctx: Context | None = None,
           headers: Mapping[str, str] | None = None, **values: Any) -> HTMLResponse:
    html = TEMPLATES.get_template(name).render(
        v=v, path=request.url.path,
        show_trustlists=bool(ctx is not None and v is not None and trustlists.available(ctx)), **values)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})})


# -- sign-in / sign-out ---------------------------------------------------------------------------------------


def _safe_next(nxt: str | None) -> str:
    if nxt and nxt.startswith("/console") and "//" not in nxt and "\\" not in nxt and not nxt.startswith(
            "/console/login"):
        return nxt
    return "/console"


def _presented_cert(request: Request) -> x509.Certificate | None:
    try:
        der = peer_certificate_der(request)
    except HTTPException:
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _login_page(request: Request, ctx: Context, *, status: int = 200, error: str = "", notice: str = "",
                nxt: str = "/console", headers: Mapping[str, str] | None = None) -> HTMLResponse:
    key = sess.session_key(ctx.settings)
    nonce = secrets.token_urlsafe(18)
    cert = _presented_cert(request)
    cert_subject = cert.subject.rfc4514_string() if cert is not None else ""
    resp = render(request, "login.html", None, status=status, error=error, notice=notice, next=nxt, title="Sign in",
                  csrf=sess.login_token(key, nonce), cert_subject=cert_subject, headers=headers)
    _set_cookie(ctx.settings, resp, sess.LOGIN_COOKIE, nonce, 900)
    return resp


@router.get("/login", response_model=None)
def login_form(request: Request, ctx: CtxDep, next: Annotated[str | None, Query(max_length=512)] = None,
               signed_out: int = 0) -> Response:
    return _login_page(request, ctx, nxt=_safe_next(next), notice="You are signed out." if signed_out else "")


@router.post("/login", response_model=None)
def login(request: Request, ctx: CtxDep, f: FormDep) -> Response:
    key = sess.session_key(ctx.settings)
    nxt = _safe_next(f.get("next"))
    wait = SIGNIN_LIMIT.take(_client_ip(request))
    if wait > 0:
        return _login_page(request, ctx, status=429, nxt=nxt, error="Too many sign-in attempts from your address. "
                           f"Wait {max(1, int(wait + 0.999))} seconds and try again.",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
    if not sess.check_login_token(key, request.cookies.get(sess.LOGIN_COOKIE), f.get("csrf")):
        return _login_page(request, ctx, status=403, nxt=nxt,
                           error="The sign-in form expired or was not sent from this page. Try again.")
    fp: str | None = None
    try:
        if f.get("method") == "certificate":
            der = peer_certificate_der(request)
            if der is None:
                raise Unauthenticated("no client certificate was presented")
            p = _by_certificate(ctx, der)
            fp = hashlib.sha256(der).hexdigest()
        else:
            presented = f.get("api_key", "").strip()
            if not presented:
                raise Unauthenticated("enter an API key")
            p = authenticate_api_key(ctx.db, presented)
    except (Unauthenticated, HTTPException) as exc:
        reason = exc.message if isinstance(exc, Unauthenticated) else str(exc.detail)
        refused = _fail(ctx, request, reason)  # audited; shares the API's failed-attempt budget
        return _login_page(request, ctx, status=refused.status_code, nxt=nxt, headers=refused.headers,
                           error="Too many failed sign-ins. Wait a moment and try again." if refused.status_code == 429
                           else f"Sign-in refused: {reason}.")
    s = sess.new_session(p.org, p.credential, fp, seconds=sess.session_seconds(ctx.settings))
    audit.record(ctx.db, audit.Entry(actor=p.credential, org=p.org, action="console.signin", object=s.ref,
                                     details={"method": "certificate" if fp else "apikey"}))
    resp = RedirectResponse(nxt, status_code=303)
    _set_cookie(ctx.settings, resp, sess.COOKIE, sess.encode(key, s), sess.session_seconds(ctx.settings))
    _clear_cookie(ctx.settings, resp, sess.LOGIN_COOKIE)
    return resp


@router.post("/logout", response_model=None)
def logout(request: Request, ctx: CtxDep, v: ViewerDep, f: FormDep) -> Response:
    require_csrf(ctx, request, v, f)
    audit.record(ctx.db, audit.Entry(actor=v.p.credential, org=v.p.org, action="console.signout", object=v.s.ref))
    resp = RedirectResponse("/console/login?signed_out=1", status_code=303)
    _clear_cookie(ctx.settings, resp, sess.COOKIE)
    return resp


# -- pages ------------------------------------------------------------------------------------------------------


@router.get("", response_model=None)
@router.get("/", response_model=None)
def overview(request: Request, ctx: CtxDep, v: ViewerDep) -> Response:
    now = utcnow()
    tenant = v.p.tenant_filter
    counts = Inventory(ctx.db).status_counts(tenant, now, now + timedelta(days=30))
    by_status, n_soon, n_expired, n_cas = counts.by_status, counts.expiring_soon, counts.expired, counts.cas
    stats = {"valid": by_status.get("valid", 0) - n_expired, "expired": n_expired,
             "revoked": by_status.get("revoked", 0), "hold": by_status.get("hold", 0)}
    soon_before = (now + timedelta(days=30)).date()
    return render(request, "overview.html", v, ctx=ctx, stats=stats, soon=n_soon, soon_before=soon_before,
                  n_cas=n_cas, title="Overview")


@router.get("/hierarchies", response_model=None)
def hierarchies(request: Request, ctx: CtxDep, v: ViewerDep) -> Response:
    tree = data.hierarchy_tree(ctx, v.p.tenant_filter)
    return render(request, "hierarchies.html", v, ctx=ctx, tree=tree, title="Hierarchies")


def _parse_filter(profile: str | None, identifier: str | None, status: str | None, issuer: str | None,
                  expiring_before: str | None) -> tuple[data.CertFilter, list[str]]:
    errors = []
    f = data.CertFilter(profile=(profile or "").strip(), identifier=(identifier or "").strip(),
                        status=(status or "").strip(), issuer=(issuer or "").strip())
    if f.status and f.status not in data.STATUSES:
        errors.append(f"Unknown status {f.status!r}: showing all statuses.")
        f.status = ""
    if expiring_before:
        try:
            f.expiring_before = date.fromisoformat(expiring_before.strip())
        except ValueError:
            errors.append("“Expiring before” must be a date (YYYY-MM-DD): ignored.")
    return f, errors


@router.get("/certificates", response_model=None)
def certificates(
    request: Request, ctx: CtxDep, v: ViewerDep,
    profile: Annotated[str | None, Query(max_length=64)] = None,
    identifier: Annotated[str | None, Query(max_length=255)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    issuer: Annotated[str | None, Query(max_length=64)] = None,
    expiring_before: Annotated[str | None, Query(max_length=32)] = None,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> Response:
    f, errors = _parse_filter(profile, identifier, status, issuer, expiring_before)
    try:
        page = data.list_certificates(ctx, v.p.tenant_filter, f, cursor=cursor, limit=PAGE_SIZE)
    except ValueError:  # a cursor this listing did not write (edited, or the filter changed): the first page
        errors.append("The page link no longer fits these filters: showing the first page.")
        page = data.list_certificates(ctx, v.p.tenant_filter, f, limit=PAGE_SIZE)
        cursor = None
    now = utcnow()
    items = [(r, data.status_of(r, now)) for r in page.rows]
    return render(request, "certificates.html", v, ctx=ctx, f=f, errors=errors, items=items, page=page,
                  count_limit=data.COUNT_LIMIT,
                  next_url=f"/console/certificates?{f.query(cursor=page.next_cursor)}" if page.next_cursor else "",
                  first_url=f"/console/certificates?{f.query()}" if cursor else "",
                  profiles=data.visible_profiles(ctx, v.p.tenant_filter), statuses=data.STATUSES,
                  title="Certificates")


def _scoped(ctx: Context, v: Viewer, issuer: str, serial: str) -> Certificate:
    try:
        return ctx.engine.get_certificate(parse_serial(serial), issuer, v.p.tenant_filter)
    except NotFound:
        # Same answer whether it exists under another tenant or not at all (as /v1 does).
        raise ConsoleError(404, "No such certificate",
                           "There is no certificate with this issuer and serial number in your organization.") from None


@router.get("/certificates/{issuer}/{serial}", response_model=None)
def certificate(issuer: str, serial: str, request: Request, ctx: CtxDep, v: ViewerDep,
                revoked: int = 0) -> Response:
    row = _scoped(ctx, v, issuer, serial)
    dec = data.decode(row)
    ocsp = data.ocsp_status(ctx, row)
    st = data.status_of(row)
    return render(request, "certificate.html", v, ctx=ctx, row=row, dec=dec, ocsp=ocsp, cert_status=st,
                  just_revoked=bool(revoked) and row.status != "valid", reasons=REASON_ORDER,
                  base_url=f"/console/certificates/{quote(row.issuer, safe='')}/{row.serial.upper()}",
                  title=f"Certificate {row.identifier or row.serial.upper()}")


@router.get("/certificates/{issuer}/{serial}/download", response_model=None)
def download(issuer: str, serial: str, ctx: CtxDep, v: ViewerDep, format: str = "pem") -> Response:
    row = _scoped(ctx, v, issuer, serial)
    name = f"{row.issuer}-{row.serial.upper()}"
    if format == "der":
        return Response(row.der, media_type="application/pkix-cert",
                        headers={"Content-Disposition": f'attachment; filename="{name}.cer"',
                                 "Cache-Control": "no-store"})
    if format != "pem":
        raise ConsoleError(400, "Unknown format", "Download as pem or der.")
    return Response(data.decode(row).pem, media_type="application/x-pem-file",
                    headers={"Content-Disposition": f'attachment; filename="{name}.pem"',
                             "Cache-Control": "no-store"})


def _check_revocable(v: Viewer, row: Certificate, reason: str) -> None:
    if not v.can_revoke:
        raise ConsoleError(403, "Not allowed", "Auditors can read everything but cannot revoke.")
    if reason not in REASONS:
        raise ConsoleError(400, "Choose a revocation reason", "The reason must be one of the listed RFC 5280 reasons.")
    if row.status == "revoked" or (row.status == "hold" and reason == "certificateHold"):
        raise ConsoleError(409, "Already revoked", f"This certificate is already {row.status}.")


@router.get("/certificates/{issuer}/{serial}/revoke", response_model=None)
def revoke_confirm(issuer: str, serial: str, request: Request, ctx: CtxDep, v: ViewerDep,
                   reason: Annotated[str, Query(max_length=32)] = "") -> Response:
    row = _scoped(ctx, v, issuer, serial)
    _check_revocable(v, row, reason)
    return render(request, "revoke_confirm.html", v, ctx=ctx, row=row, reason=reason,
                  base_url=f"/console/certificates/{quote(row.issuer, safe='')}/{row.serial.upper()}",
                  title=f"Revoke {row.identifier or row.serial.upper()}?")


@router.post("/certificates/{issuer}/{serial}/revoke", response_model=None)
def revoke(issuer: str, serial: str, request: Request, ctx: CtxDep, v: ViewerDep, f: FormDep) -> Response:
    require_csrf(ctx, request, v, f)
    row = _scoped(ctx, v, issuer, serial)
    reason = f.get("reason", "")
    _check_revocable(v, row, reason)
    try:
        # The same call as POST /v1/certificates/{issuer}/{serial}/revoke: one guarded UPDATE + audit event.
        ctx.engine.revoke(row.serial, reason, issuer=row.issuer, tenant=v.p.tenant_filter, actor=v.p.credential,
                          org=v.p.org)
    except AlreadyRevoked:
        raise ConsoleError(409, "Already revoked", "Someone revoked this certificate a moment ago.") from None
    except (BadRevocation, NotFound) as exc:
        raise ConsoleError(status_of(exc) or 400, "Revocation refused", exc.message) from None
    return RedirectResponse(f"/console/certificates/{quote(row.issuer, safe='')}/{row.serial.upper()}?revoked=1",
                            status_code=303)


def _expiry(ctx: Context, v: Viewer) -> data.Expiry:
    return data.expiry(ctx, v.p.tenant_filter)


@router.get("/expiry", response_model=None)
def expiry(request: Request, ctx: CtxDep, v: ViewerDep) -> Response:
    e = _expiry(ctx, v)
    chart = data.expiry_chart(e)
    return render(request, "expiry.html", v, ctx=ctx, e=e, chart=chart,
                  chart_json=json.dumps(e.as_json(), separators=(",", ":")), title="Expiry")


@router.get("/expiry.csv", response_model=None)
def expiry_csv(ctx: CtxDep, v: ViewerDep) -> Response:
    e = _expiry(ctx, v)
    return Response(data.expiry_csv(e), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="expiry-{e.start.date().isoformat()}.csv"',
                             "Cache-Control": "no-store"})


@router.get("/audit", response_model=None)
def audit_log(request: Request, ctx: CtxDep, v: ViewerDep,
              before: Annotated[int | None, Query(ge=1, le=2**62)] = None) -> Response:
    if not v.sees_audit:
        raise ConsoleError(403, "Not allowed", "The audit log is for the admin and auditor roles.")
    from pki.audit_sign import verify_all

    try:
        res = verify_all(ctx)
        verification: dict[str, Any] = {"ok": res.ok, "events": res.events, "checkpoints": res.checkpoints,
                                        "problems": res.problems[:50], "error": "", "from_seq": res.from_seq}
    except PKIError as exc:
        verification = {"ok": False, "events": 0, "checkpoints": 0, "problems": [], "error": exc.message,
                        "from_seq": 0}
    rows = AuditLog(ctx.db).newest_first(before=before, limit=PAGE_SIZE + 1)
    older = rows[PAGE_SIZE - 1].seq if len(rows) > PAGE_SIZE else None
    events = [(r, json.dumps(r.details, sort_keys=True, default=str)[:400]) for r in rows[:PAGE_SIZE]]
    return render(request, "audit.html", v, ctx=ctx, verification=verification, events=events,
                  older_url=f"/console/audit?before={older}" if older else "",
                  newest_url="/console/audit" if before else "", title="Audit log")


@router.get("/trust-lists", response_model=None)
def trust_lists(request: Request, ctx: CtxDep, v: ViewerDep) -> Response:
    if not trustlists.available(ctx):
        raise ConsoleError(404, "Trust lists are not set up",
                           "This installation has no trust-list workers (their tables do not exist).")
    return render(request, "trustlists.html", v, ctx=ctx, tl=trustlists.overview(ctx, v.p),
                  transitions=_root_transitions(ctx, v), title="Trust lists")


def _root_transitions(ctx: Context, v: Viewer) -> list[dict[str, object]]:
    """Root transitions under way (#27 item 2): each new root's coverage, per CPO (a CPO sees its own)."""
    from pki.root_campaign import coverage, list_campaigns

    try:
        return [coverage(ctx, c.new_root, org=v.p.tenant_filter).as_json()
                for c in list_campaigns(ctx) if c.state != "withdrawn"]
    except Exception:  # noqa: BLE001 - an installation without the tables (migration 0006): no section
        return []
