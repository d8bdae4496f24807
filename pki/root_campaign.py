"""Root transitions as a campaign over the fleet (issue #27 item 2).

`v2gpki root rollover OLD` makes a new root, cross-signed by the old (pki/lifecycle.py). The campaign then
moves the fleet in three steps, each refused until it is safe:

1. **distributing** — the new root is ``staged``: published in the trust lists and pushed to every station
   through the trust-store plans (pki/truststore_plan.py, OCPP 2.0.1 Part 2 M05 InstallCertificate), while
   nothing is issued under it (the engine picks only ``active`` CAs, pki/issuance.py). Stations report what
   they hold (M03 GetInstalledCertificateIds); coverage = stations whose last report names the new root /
   registered stations, per CPO and fleet-wide (`GET /v1/roots/{id}/coverage`, the console, metrics).
2. **switched** — `v2gpki root switch NEW [--force]`: refused below ``V2GPKI_ROOT_SWITCH_MIN_COVERAGE``
   unless forced. The new root becomes ``active`` and the old root's sub-CAs are re-created under it (same
   profiles, key algorithms, names with the new generation's suffix: ``cpo-sub1`` → ``cpo-sub1-g2``), each
   with its OCSP signer. The engine prefers, among active issuers of a profile, the newest (pki/issuance.py
   pick_issuer), so new certificates come from the new hierarchy from then on; certificates already issued
   under the old root stay valid.
3. **withdrawn** — `v2gpki root withdraw OLD`: refused while any certificate under the old root is still
   valid and not replaced (a newer valid certificate of the same identifier and profile from another
   hierarchy) — OCSP signers, the cross-certificate and sub-CA certificates do not count. Then the old root
   and its sub-CAs are ``retired``: the next trust lists list them as distrusted (reason ``withdrawn``) and
   every plan tells stations that still report the old root to delete it (M04 DeleteCertificate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from pki import audit
from pki.errors import CampaignState, CoverageTooLow, RootInUse, UnknownCA
from pki.store import root_campaigns as store
from pki.store.db import utcnow
from pki.store.inventory import Inventory
from pki.store.models import Certificate, CertificateAuthority
from pki.store.models_truststore import RootCampaign
from pki.truststore_plan import OrgCoverage, coverage_by_org, fleet_ratio, sha256_of

if TYPE_CHECKING:
    from pki.context import Context

STATES = ("distributing", "switched", "withdrawn")


def start(ctx: Context, old_root: str, new_root: str, *, actor: str) -> RootCampaign:
    """Called by the rollover: the new root is staged (trusted, published, pushed; not issuing)."""
    now = utcnow()
    with ctx.db.session() as s:
        row = store.campaign_for_new_root(s, new_root)
        if row is None:
            row = RootCampaign(old_root=old_root, new_root=new_root, created_at=now, created_by=actor[:128])
            s.add(row)
        if row.state == "distributing":
            store.set_ca_status(s, [new_root], from_status="active", to_status="staged")
        s.commit()
        s.refresh(row)
    ctx.engine.reload_cas()
    return row


def open_campaign_from(ctx: Context, old_root: str) -> RootCampaign | None:
    """A transition away from ``old_root`` that is not finished."""
    return store.open_campaign_from(ctx.db, old_root)


def campaign_of(ctx: Context, root: str) -> RootCampaign | None:
    """The campaign a root takes part in: as the new root, else the latest one as the old root."""
    return store.campaign_of(ctx.db, root)


def list_campaigns(ctx: Context) -> list[RootCampaign]:
    return store.campaigns(ctx.db)


def root_row(ctx: Context, ref: str) -> CertificateAuthority:
    """A root CA by name or numeric id (as /v1/cas lists them)."""
    row = store.ca_by_ref(ctx.db, ref)
    if row is None:
        raise UnknownCA(f"unknown CA {ref!r}", ca=ref)
    if row.parent is not None:
        raise UnknownCA(f"{row.name!r} is not a root CA (its parent is {row.parent!r})", ca=ref)
    return row


def threshold(ctx: Context) -> float:
    return float(ctx.settings.root_switch_min_coverage)


@dataclass(frozen=True)
class Coverage:
    root: str
    sha256: str
    status: str
    campaign: RootCampaign | None
    per_org: list[OrgCoverage]
    threshold: float

    @property
    def ratio(self) -> float | None:
        return fleet_ratio(self.per_org)

    def as_json(self) -> dict[str, Any]:
        c = self.campaign
        return {
            "root": self.root, "sha256": self.sha256, "status": self.status,
            "campaign": None if c is None else {
                "id": c.id, "old_root": c.old_root, "new_root": c.new_root, "state": c.state,
                "created_at": c.created_at.isoformat(),
                "switched_at": c.switched_at.isoformat() if c.switched_at else None,
                "switch_coverage": c.switch_coverage, "forced": c.forced,
                "withdrawn_at": c.withdrawn_at.isoformat() if c.withdrawn_at else None},
            "threshold": self.threshold,
            "stations": sum(o.stations for o in self.per_org),
            "with_root": sum(min(o.with_root, o.stations) for o in self.per_org),
            "coverage": self.ratio,
            "per_cpo": [{"org": o.org, "stations": o.stations, "reported": o.reported, "with_root": o.with_root,
                         "coverage": o.ratio} for o in self.per_org],
        }


def coverage(ctx: Context, ref: str, *, org: str | None = None) -> Coverage:
    """Stations (per CPO, from their last recorded reports) that hold root ``ref`` (name or id)."""
    row = root_row(ctx, ref)
    sha = sha256_of(x509.load_der_x509_certificate(row.der))
    return Coverage(row.name, sha, row.status, campaign_of(ctx, row.name), coverage_by_org(ctx, sha, org),
                    threshold(ctx))


# -- switch ---------------------------------------------------------------------------------------------


def _generation(new_root: str) -> str:
    m = re.search(r"-g(\d+)$", new_root)
    return m.group(1) if m else "2"


def subtree(ctx: Context, root: str) -> list[CertificateAuthority]:
    """The CAs under ``root`` (root excluded), parents before children."""
    rows = Inventory(ctx.db).cas()  # oldest first: parents before children
    out: list[CertificateAuthority] = []
    frontier = [root]
    while frontier:
        nxt = []
        for r in rows:
            if r.parent in frontier:
                out.append(r)
                nxt.append(r.name)
        frontier = nxt
    return out


@dataclass(frozen=True)
class SwitchResult:
    campaign: RootCampaign
    coverage: float | None
    created: list[str]


def switch(ctx: Context, ref: str, *, force: bool = False, actor: str = "cli") -> SwitchResult:
    """Switch issuance to the new root of a campaign (``ref``: the new root, or the old one). Refused below
    the coverage threshold unless ``force``; resumable (CAs already created are kept)."""
    from pki.hierarchy import create_ca, ensure_ocsp_signer
    from pki.names import subject_fields_of as _subject_fields
    from pki.profiles import CAEntry, Hierarchy

    row = root_row(ctx, ref)
    camp = campaign_of(ctx, row.name)
    if camp is None:
        raise CampaignState(f"root {row.name!r} takes part in no transition: `v2gpki root rollover` starts one")
    if camp.state != "distributing":
        raise CampaignState(f"issuance already switched from {camp.old_root!r} to {camp.new_root!r} "
                            f"({camp.state})")
    cov = coverage(ctx, camp.new_root)
    ratio = cov.ratio
    if ratio is not None and ratio < cov.threshold and not force:
        stations = sum(o.stations for o in cov.per_org)
        have = sum(min(o.with_root, o.stations) for o in cov.per_org)
        raise CoverageTooLow(
            f"only {have} of {stations} stations ({ratio:.1%}) report the new root {camp.new_root!r}, below the "
            f"threshold of {cov.threshold:.1%} (V2GPKI_ROOT_SWITCH_MIN_COVERAGE): push it with the trust-store "
            f"plans (POST /ocpp/v201/trust-store-plan) and let stations report, or force the switch "
            f"(--force / \"force\": true) knowing that stations without it will reject the new certificates")
    lc = ctx.lifecycle
    eng = lc.engine
    now = utcnow()
    with ctx.db.session() as s:  # the new root issues from now on
        store.set_ca_status(s, [camp.new_root], from_status="staged", to_status="active")
        s.commit()
    eng.reload_cas()
    ctx.engine.reload_cas()
    old_root = eng.ca(camp.old_root)
    f = _subject_fields(old_root.cert)
    default_h = ctx.hierarchy()
    h = Hierarchy(organization=f.o or default_h.organization, country=f.c or default_h.country, cas=[],
                  ocsp_signer_profile=default_h.ocsp_signer_profile,
                  ocsp_signer_profile_20=default_h.ocsp_signer_profile_20)
    gen = _generation(camp.new_root)
    names = {r.name for r in subtree(ctx, camp.new_root)} | {camp.new_root}
    successors: dict[str, str] = {camp.old_root: camp.new_root}
    created: list[str] = []
    for ca in subtree(ctx, camp.old_root):
        if ca.status != "active" or ca.parent not in successors:
            continue
        base = re.sub(r"-g\d+$", "", ca.name)
        new_name = f"{base}-g{gen}"
        cert = x509.load_der_x509_certificate(ca.der)
        cn = re.sub(r" G\d+$", "", _subject_fields(cert).cn)
        suffix = f" G{gen}"
        new_cn = (cn[:64 - len(suffix)] + suffix) if len(cn) + len(suffix) > 64 else cn + suffix
        if new_name not in names:
            create_ca(eng, CAEntry(name=new_name, profile=ca.profile, parent=successors[ca.parent], cn=new_cn,
                                   key_alg=eng.ca(ca.name).alg), h)
            created.append(new_name)
        if store.has_certificate_of(ctx.db, f"ocsp-{ca.name}"):
            ensure_ocsp_signer(eng, h, new_name)
        successors[ca.name] = new_name
    with ctx.db.session() as s:
        c = store.campaign(s, camp.id)
        assert c is not None
        c.state, c.switched_at, c.switched_by = "switched", now, actor[:128]
        c.switch_coverage, c.successors = ratio, successors
        c.forced = bool(force and ratio is not None and ratio < cov.threshold)  # the threshold was overridden
        s.add(c)
        audit.append(s, audit.Entry(actor=actor, action="ca.switch", object=camp.new_root, details={
            "old": camp.old_root, "coverage": ratio, "threshold": cov.threshold, "forced": c.forced,
            "created": created}))
        s.commit()
        s.refresh(c)
    ctx.engine.reload_cas()
    return SwitchResult(c, ratio, created)


def successor_of(ctx: Context, ca_name: str) -> str | None:
    """The CA that replaced ``ca_name`` when issuance switched to a new root, or None."""
    for c in store.campaigns(ctx.db, ["switched", "withdrawn"]):
        if ca_name in (c.successors or {}):
            return c.successors[ca_name]
    return None


# -- withdrawal -----------------------------------------------------------------------------------------


def blocking_certificates(ctx: Context, old_root: str, now: datetime | None = None) -> list[Certificate]:
    """Certificates under ``old_root`` still valid and not replaced: a valid, unexpired certificate issued
    by the old root or a CA under it — not a CA certificate, OCSP signer or cross-certificate — with no newer
    valid certificate of the same identifier and profile from outside the old hierarchy."""
    now = now or utcnow()
    tree = [old_root, *[r.name for r in subtree(ctx, old_root)]]
    lc = ctx.lifecycle
    profiles = lc.engine.profiles
    skip = {lc.policy.truststore.cross_profile} | {n for n in profiles.names() if profiles.get(n).ca
                                                   or n.startswith("ocsp-signer")}
    return store.unreplaced_certificates(ctx.db, tree, skip, now)


@dataclass(frozen=True)
class WithdrawResult:
    campaign: RootCampaign
    retired: list[str]


def withdraw(ctx: Context, ref: str, *, actor: str = "cli") -> WithdrawResult:
    """Withdraw the old root of a switched campaign (``ref``: the old root, or the new one)."""
    from pki.outbox import add_outbox

    row = root_row(ctx, ref)
    camp = open_campaign_from(ctx, row.name) or campaign_of(ctx, row.name)  # ref: the old root, or the new
    if camp is None:
        raise CampaignState(f"root {row.name!r} takes part in no transition: only a root replaced through "
                            "`v2gpki root rollover` and `v2gpki root switch` can be withdrawn")
    if camp.state == "withdrawn":
        raise CampaignState(f"root {camp.old_root!r} was already withdrawn")
    if camp.state != "switched":
        raise CampaignState(f"issuance has not switched from {camp.old_root!r} to {camp.new_root!r} yet: "
                            f"`v2gpki root switch {camp.new_root}` first")
    blockers = blocking_certificates(ctx, camp.old_root)
    if blockers:
        sample = ", ".join(f"{b.issuer}/{b.serial.upper()} ({b.profile}, {b.identifier or '-'})" for b in blockers[:3])
        raise RootInUse(
            f"{len(blockers)} certificate(s) under {camp.old_root!r} are still valid and not replaced — the last "
            f"expires {blockers[0].not_after:%Y-%m-%d %H:%M} UTC (e.g. {sample}): withdraw the root once they "
            f"have expired or been replaced by certificates from {camp.new_root!r}")
    tree = [camp.old_root, *[r.name for r in subtree(ctx, camp.old_root)]]
    now = utcnow()
    with ctx.db.session() as s:
        store.set_ca_status(s, tree, from_status="active", to_status="retired")
        c = store.campaign(s, camp.id)
        assert c is not None
        c.state, c.withdrawn_at, c.withdrawn_by = "withdrawn", now, actor[:128]
        s.add(c)
        # the trust lists of this hierarchy change (the old root becomes distrusted): publish a new version
        add_outbox(s, "ca.changed", {"cas": [{"issuer": camp.old_root, "serial": row.serial, "profile": row.profile,
                                              "subject": row.subject}], "change": "withdrawn"})
        audit.append(s, audit.Entry(actor=actor, action="ca.withdraw", object=camp.old_root,
                                    details={"new": camp.new_root, "retired": tree}))
        s.commit()
        s.refresh(c)
    ctx.engine.reload_cas()
    return WithdrawResult(c, tree)


__all__ = ["STATES", "CampaignState", "Coverage", "CoverageTooLow", "RootInUse", "SwitchResult", "WithdrawResult",
           "blocking_certificates", "campaign_of", "coverage", "list_campaigns", "open_campaign_from", "root_row",
           "start", "subtree", "successor_of", "switch", "threshold", "withdraw"]
