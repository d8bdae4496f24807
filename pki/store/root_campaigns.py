"""Root-transition campaigns' storage (pki/root_campaign.py): campaign rows, CA status changes, and the
certificates that still block withdrawing an old root. Functions taking a Session run in the caller's
transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import exists, update
from sqlmodel import Session, col, select

from pki.store.db import Database
from pki.store.models import Certificate, CertificateAuthority
from pki.store.models_truststore import RootCampaign


def campaign_for_new_root(s: Session, new_root: str) -> RootCampaign | None:
    return s.exec(select(RootCampaign).where(RootCampaign.new_root == new_root)).first()


def campaign(s: Session, campaign_id: int | None) -> RootCampaign | None:
    return s.get(RootCampaign, campaign_id)


def set_ca_status(s: Session, names: Iterable[str], *, from_status: str, to_status: str) -> None:
    """CAs named ``names`` in ``from_status`` move to ``to_status`` (others are left alone)."""
    s.execute(update(CertificateAuthority).where(col(CertificateAuthority.name).in_(list(names)),
                                                 col(CertificateAuthority.status) == from_status)
              .values(status=to_status))


def open_campaign_from(db: Database, old_root: str) -> RootCampaign | None:
    """The newest transition away from ``old_root`` that is not withdrawn."""
    with db.session() as s:
        return s.exec(select(RootCampaign).where(RootCampaign.old_root == old_root,
                                                 RootCampaign.state != "withdrawn")
                      .order_by(col(RootCampaign.id).desc())).first()


def campaign_of(db: Database, root: str) -> RootCampaign | None:
    """The campaign a root takes part in: as the new root, else the latest one as the old root."""
    with db.session() as s:
        row = campaign_for_new_root(s, root)
        if row is None:
            row = s.exec(select(RootCampaign).where(RootCampaign.old_root == root)
                         .order_by(col(RootCampaign.id).desc())).first()
        return row


def campaigns(db: Database, states: Iterable[str] | None = None) -> list[RootCampaign]:
    """Every campaign (in ``states`` when given), oldest first."""
    with db.session() as s:
        stmt = select(RootCampaign).order_by(col(RootCampaign.id))
        if states is not None:
            stmt = stmt.where(col(RootCampaign.state).in_(list(states)))
        return list(s.exec(stmt))


def ca_by_ref(db: Database, ref: str) -> CertificateAuthority | None:
    """A CA by numeric id (as /v1/cas lists them) or by name."""
    with db.session() as s:
        row = None
        if ref.isascii() and ref.isdigit() and len(ref) < 10:
            row = s.get(CertificateAuthority, int(ref))
        if row is None:
            row = s.exec(select(CertificateAuthority).where(CertificateAuthority.name == ref)).first()
        return row


def has_certificate_of(db: Database, identifier: str) -> bool:
    """Any certificate (any status) was issued with this identifier."""
    with db.session() as s:
        return s.exec(select(Certificate.id).where(Certificate.identifier == identifier)).first() is not None


def unreplaced_certificates(db: Database, tree: list[str], skip_profiles: Iterable[str],
                            now: datetime) -> list[Certificate]:
    """Live (valid or on hold), unexpired certificates issued by a CA in ``tree`` whose profile is not
    skipped and that no newer valid certificate of the same identifier and profile from outside the tree
    replaces; the latest-expiring first."""
    c = Certificate.__table__  # type: ignore[attr-defined]
    n = c.alias("newer")
    with db.session() as s:
        return list(s.exec(select(Certificate).where(
            col(Certificate.issuer).in_(tree), col(Certificate.status).in_(["valid", "hold"]),
            Certificate.not_after > now, col(Certificate.profile).not_in(sorted(skip_profiles)),
            ~exists().where(n.c.identifier == c.c.identifier, n.c.profile == c.c.profile,
                            n.c.status == "valid", n.c.not_after > now, n.c.issuer.not_in(tree),
                            n.c.created_at >= c.c.created_at),
        ).order_by(col(Certificate.not_after).desc())))


__all__ = ["ca_by_ref", "campaign", "campaign_for_new_root", "campaign_of", "campaigns", "has_certificate_of",
           "open_campaign_from", "set_ca_status", "unreplaced_certificates"]
