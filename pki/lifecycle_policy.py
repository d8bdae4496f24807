"""The lifecycle policy (policies/lifecycle.yaml) and the worker-side settings, validated at start-up.

Below pki/lifecycle.py (which acts on it) and pki/context.py (which holds the :class:`Lifecycle`), so the
Context can name it without importing the lifecycle's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from pki.config import Settings
from pki.errors import PolicyError
from pki.profiles import Profile, ProfileSet

if TYPE_CHECKING:
    from pki.issuance import Engine

# -- settings and policy ---------------------------------------------------------------------------------


class LifecycleSettings(BaseModel):
    """The lifecycle's and the workers' part of pki.config.Settings (read once, there, from the environment:
    V2GPKI_QUEUE, V2GPKI_WEBHOOK_*, V2GPKI_SMTP_*, …), with bool webhook_allow_private. Built by
    from_settings; it reads no environment itself."""

    model_config = ConfigDict(extra="ignore")

    env: str = "development"
    broker_url: str | None = None  # unset: the embedded filesystem broker under $V2GPKI_HOME/broker
    queue: str = "v2gpki"
    lifecycle_file: Path | None = None  # default: <policies_dir>/lifecycle.yaml
    expiry_windows: str | None = None  # e.g. "60,30,14,7,1": replaces the policy's default windows
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_backoff_seconds: float = Field(default=30.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_allow_private: bool | None = None  # default: allowed in development only (SSRF guard)
    delivery_lease_seconds: float = Field(default=60.0, gt=0)
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "v2gpki@localhost"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> LifecycleSettings:
        return cls.model_validate({name: getattr(s, name) for name in cls.model_fields})

    def allow_private_targets(self) -> bool:
        if self.webhook_allow_private is not None:
            return self.webhook_allow_private
        return self.env != "production"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_windows(v: list[int]) -> list[int]:
    if not v:
        raise ValueError("at least one window")
    if any(w <= 0 or w > 40 * 366 for w in v):
        raise ValueError("windows are days, between 1 and 14640")
    if len(set(v)) != len(v):
        raise ValueError("duplicate window")
    return sorted(v, reverse=True)


class ExpiryPolicy(_Strict):
    default_windows: list[int] = [60, 30, 14, 7, 1]
    sub_ca_windows: list[int] = [365, 180, 90, 60, 30]
    # Roots: plan the rollover well ahead — new root, cross-signature, trust-store distribution to every
    # EV and charger — so the first alert comes 2 years before expiry.
    root_windows: list[int] = [1095, 730, 365, 180, 90]
    profiles: dict[str, list[int]] = Field(default_factory=dict)
    exclude_profiles: list[str] = Field(default_factory=list)
    max_alerts_per_message: int = Field(default=500, ge=1, le=10000)
    # The incremental scan (#28 item 3; not part of the window policy: changing these needs no full scan).
    # Certificates created or revoked up to this long before the last scan began are read again: longer than
    # any transaction that stores one (created_at and revoked_at are set before the commit) plus the clocks'
    # skew between hosts.
    change_overlap_seconds: int = Field(default=300, ge=0, le=86400)
    # Past this many certificates created or revoked (or holds released) since the last scan — a bulk
    # import, a compromise drill — a full scan is cheaper than looking each one up.
    incremental_max_changes: int = Field(default=50000, ge=0)

    @field_validator("default_windows", "sub_ca_windows", "root_windows")
    @classmethod
    def _w(cls, v: list[int]) -> list[int]:
        return _check_windows(v)

    @field_validator("profiles")
    @classmethod
    def _pw(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        return {k: _check_windows(w) for k, w in v.items()}


class RenewalPolicy(_Strict):
    fraction: float = Field(default=0.67, gt=0.0, lt=1.0)  # renew after this fraction of the lifetime
    identifiers: list[str] = ["ocsp-*", "cps-leaf*", "truststore-signer"]


class TrustStorePolicy(_Strict):
    validity_days: int = Field(default=30, ge=1, le=400)  # nextUpdate = issue time + this
    republish_before_days: int = Field(default=7, ge=0)
    signer_issuer: str = "csms-root"  # not a V2G root: a V2G root never issues a leaf [V2G2-867]
    signer_profile: str = "truststore-signer"
    cross_profile: str = "root-cross"


class LifecyclePolicy(_Strict):
    expiry: ExpiryPolicy = ExpiryPolicy()
    renewal: RenewalPolicy = RenewalPolicy()
    truststore: TrustStorePolicy = TrustStorePolicy()
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)  # extra profiles (signer, cross)


@dataclass(frozen=True)
class Lifecycle:
    """Validated policy plus the engine that knows the lifecycle profiles (one per Context, built in
    pki/wiring.py: that engine has the same observers as the Context's)."""

    policy: LifecyclePolicy
    settings: LifecycleSettings
    engine: Engine
    extra_profiles: dict[str, Profile]

    def default_windows(self) -> list[int]:
        if self.settings.expiry_windows:
            return _check_windows([int(x) for x in self.settings.expiry_windows.split(",") if x.strip()])
        return self.policy.expiry.default_windows

    def windows_for(self, profile: Profile) -> list[int]:
        e = self.policy.expiry
        if profile.name in e.profiles:
            return e.profiles[profile.name]
        if profile.ca:
            return e.root_windows if profile.self_signed else e.sub_ca_windows
        return self.default_windows()


def load_policy(path: Path, profiles: ProfileSet) -> tuple[LifecyclePolicy, dict[str, Profile]]:
    """Read and validate policies/lifecycle.yaml (absent file: built-in defaults). Fails fast."""
    data: object = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    try:
        pol = LifecyclePolicy.model_validate(data)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise PolicyError(f"{path}: " + "; ".join(parts)) from None
    extra: dict[str, Profile] = {}
    for name, body in pol.profiles.items():
        if name in profiles.profiles:
            raise PolicyError(f"{path}: profile {name!r} already defined in profiles-*.yaml")
        try:
            extra[name] = Profile.model_validate({**body, "name": name})
        except ValidationError as exc:
            parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise PolicyError(f"{path}: profile {name!r}: " + "; ".join(parts)) from None
        for issuer in extra[name].issuers:
            if issuer not in profiles.profiles or not profiles.profiles[issuer].ca:
                raise PolicyError(f"{path}: profile {name!r}: issuer {issuer!r} is not a CA profile")
    for pname in [*pol.expiry.profiles, *pol.expiry.exclude_profiles]:
        if pname not in profiles.profiles and pname not in extra:
            raise PolicyError(f"{path}: expiry: unknown profile {pname!r}")
    for key, pname in (("signer_profile", pol.truststore.signer_profile),
                       ("cross_profile", pol.truststore.cross_profile)):
        if pname not in extra and pname not in profiles.profiles:
            raise PolicyError(f"{path}: truststore.{key}: unknown profile {pname!r}")
    return pol, extra


__all__ = ["ExpiryPolicy", "Lifecycle", "LifecyclePolicy", "LifecycleSettings", "RenewalPolicy", "TrustStorePolicy",
           "load_policy"]
