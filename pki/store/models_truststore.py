"""Tables of chargers' trust stores and root transitions (migration 0006, issue #27 items 1 and 2).

* ``trusted_root`` — roots of other PKIs an admin imported (`v2gpki root import`, `POST /v1/trusted-roots`),
  global (scope ``*``) or for one CPO (scope = the organization's name); withdrawn, never deleted.
* ``station_trust_report`` — per station (organization, identity): what it last reported in
  GetInstalledCertificateIdsResponse and what its trust-store plan told the CSMS to install and delete.
  One row per station, replaced at every plan (OCPP 2.0.1 Part 2 M03 / M04 / M05).
* ``root_campaign`` — one root transition: the new root from its rollover (state ``distributing``) through
  the switch of issuance (``switched``) to the withdrawal of the old root (``withdrawn``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

GLOBAL_SCOPE = "*"


class TrustedRoot(SQLModel, table=True):
    __tablename__ = "trusted_root"
    __table_args__ = (UniqueConstraint("scope", "certificate_type", "sha256", name="uq_trusted_root_scope_type_sha"),)

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(index=True, max_length=128)  # "*" = every CPO, else one organization's name
    certificate_type: str = Field(max_length=32)  # OCPP InstallCertificateUseEnumType
    subject: str = Field(max_length=512)
    serial: str = Field(max_length=40)  # lower-case hex, no leading zeros
    sha256: str = Field(index=True, max_length=64)  # of the DER
    not_after: datetime
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: str = Field(default="active", max_length=16)  # active | withdrawn
    created_by: str = Field(max_length=128)
    created_at: datetime
    withdrawn_at: datetime | None = None


class StationTrustReport(SQLModel, table=True):
    __tablename__ = "station_trust_report"
    __table_args__ = (UniqueConstraint("org", "station", name="uq_station_trust_report_org_station"),)

    id: int | None = Field(default=None, primary_key=True)
    org: str = Field(index=True, max_length=128)
    station: str = Field(max_length=64)  # the identity as registered (/v1/stations)
    ocpp_version: str = Field(max_length=8)  # 2.0.1 | 2.1
    # certificateHashDataChain entries as the station reported them (OCPP GetInstalledCertificateIdsResponse)
    reported: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # SHA-256 fingerprints of the roots known here (own or imported) that the report names, installed or not
    roots: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    install: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    delete: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    reported_at: datetime
    actor: str = Field(max_length=128)


class RootCampaign(SQLModel, table=True):
    __tablename__ = "root_campaign"
    __table_args__ = (UniqueConstraint("new_root", name="uq_root_campaign_new_root"),)

    id: int | None = Field(default=None, primary_key=True)
    old_root: str = Field(index=True, max_length=64)  # CA names
    new_root: str = Field(max_length=64)
    state: str = Field(default="distributing", max_length=16)  # distributing | switched | withdrawn
    # old CA name -> its successor under the new root, filled by the switch
    successors: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime
    created_by: str = Field(max_length=128)
    switched_at: datetime | None = None
    switched_by: str | None = Field(default=None, max_length=128)
    switch_coverage: float | None = None  # fleet coverage of the new root when issuance switched
    forced: bool = False
    withdrawn_at: datetime | None = None
    withdrawn_by: str | None = Field(default=None, max_length=128)


__all__ = ["GLOBAL_SCOPE", "RootCampaign", "StationTrustReport", "TrustedRoot"]
