"""Certificate profiles and the default hierarchy, loaded from the policies directory (default:
pki/policies/*.yaml, shipped in the package) and validated at start-up.

Profiles are data (Boulder's approach): unknown fields, unknown profile names and bad values fail fast
with a message naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hsm.keystore import KeyAlg
from pki.errors import PolicyError, UnknownProfile

KeyUsageName = Literal[
    "digital_signature",
    "content_commitment",  # a.k.a. nonRepudiation
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
]
# codeSigning: firmware signing certificates (RFC 5280 §4.2.1.12)
EkuName = Literal["clientAuth", "serverAuth", "OCSPSigning", "codeSigning"]
_EDDSA_KEY_USAGE = frozenset({"digital_signature", "content_commitment", "key_cert_sign", "crl_sign"})
CnKind = Literal["fixed", "evseid", "seccid", "evseid_or_seccid", "emaid", "pcid", "station", "fqdn", "any"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubjectRule(_Strict):
    cn: CnKind
    dc: str | None = None  # the CA sets this itself (e.g. DC=CPO, [V2G2-925])
    o: Literal["required", "optional", "forbidden"] = "required"
    c: Literal["required", "optional"] = "required"


class Profile(_Strict):
    name: str = ""
    description: str
    standard: Literal["iso15118-2", "iso15118-20", "ocpp", "service"]
    ca: bool
    path_len: int | None = None
    self_signed: bool = False
    issuers: list[str] = Field(default_factory=list)  # profile names of CAs allowed to issue this
    key_algs: list[KeyAlg]
    key_usage: list[KeyUsageName]
    extended_key_usage: list[EkuName] = Field(default_factory=list)
    eku_critical: bool = False
    ocsp_nocheck: bool = False
    aia_ocsp: bool = True
    crldp: bool = True
    san_dns_from_cn: bool = False
    validity_days: int = Field(gt=0, le=40 * 366)
    # Clock tolerance (#27 item 4): notBefore is this many seconds before the moment of issuance (never
    # before the issuer's notBefore), so a relying party whose clock runs behind accepts a fresh certificate.
    not_before_margin_seconds: int = Field(default=3600, ge=0, le=7 * 86400)
    max_der_size: int = Field(gt=0, le=4096)
    # RFC 8813 §3 forbids keyEncipherment with EC keys; Josev/RISE-V2G set it on contract certificates.
    legacy_key_encipherment: bool = False
    # ISO 15118-20 [V2G20-2534]: with ECDHCurve X448 the vehicle decrypts its contract key with the private
    # key of the OEM provisioning certificate's "Alternate Subject Public Key" — ITU-T X.509 (10/2019) §9.8.2
    # subjectAltPublicKeyInfo (2.5.29.72). An Ed448 key signs only (RFC 8410 §5), so an Ed448 CSR of a profile
    # with this set must request that extension with an RFC 8410 id-X448 key, and the certificate carries it.
    # The one CSR extension the CA ever copies; every other is ignored (the profile decides).
    x448_alt_key_for_ed448: bool = False
    subject: SubjectRule

    @field_validator("key_algs")
    @classmethod
    def _non_empty(cls, v: list[KeyAlg]) -> list[KeyAlg]:
        if not v:
            raise ValueError("at least one key algorithm")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.ca and not ({"key_cert_sign"} <= set(self.key_usage)):
            raise ValueError("a CA profile needs key_cert_sign")
        if not self.ca and {"key_cert_sign", "crl_sign"} & set(self.key_usage):
            raise ValueError("an end-entity profile must not have key_cert_sign/crl_sign")
        if not self.ca and self.path_len is not None:
            raise ValueError("path_len only applies to CA profiles")
        if self.self_signed and self.issuers:
            raise ValueError("a self-signed profile has no issuers")
        if self.x448_alt_key_for_ed448 and (self.ca or KeyAlg.ED448 not in self.key_algs):
            raise ValueError("x448_alt_key_for_ed448 applies to end-entity profiles that allow ed448 keys")
        if "key_encipherment" in self.key_usage and not self.legacy_key_encipherment:
            raise ValueError("key_encipherment with EC keys needs legacy_key_encipherment: true (RFC 8813)")
        return self

    def key_usage_for(self, alg: KeyAlg) -> list[KeyUsageName]:
        """The keyUsage bits for a subject key of ``alg``.

        RFC 8410 §5: a certificate for an Ed448 key may only assert digitalSignature, nonRepudiation,
        keyCertSign and cRLSign. The -2-derived leaf profiles (SECC, OEM provisioning, contract) list
        keyAgreement for their ECDH-capable P-256/P-521 keys; an Ed448 key of the same profile signs only.
        """
        if alg is KeyAlg.ED448:
            return [u for u in self.key_usage if u in _EDDSA_KEY_USAGE]
        return list(self.key_usage)


class CAEntry(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    profile: str
    parent: str | None = None
    cn: str = Field(min_length=1, max_length=64)
    key_alg: KeyAlg | None = None  # default: the profile's first key algorithm
    ocsp_signer: bool = True


class ServiceKeyEntry(_Strict):
    """A service-held leaf (CPS signer, ...) created at init with its key in the HSM."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    profile: str
    issuer: str
    cn: str = Field(min_length=1, max_length=64)


class Hierarchy(_Strict):
    organization: str = Field(min_length=1, max_length=64)
    country: str = Field(pattern=r"^[A-Z]{2}$")
    ocsp_signer_profile: str = "ocsp-signer"
    ocsp_signer_profile_20: str = "ocsp-signer-20"
    cas: list[CAEntry]
    service_keys: list[ServiceKeyEntry] = Field(default_factory=list)


class ProfileSet:
    def __init__(self, profiles: dict[str, Profile]) -> None:
        self.profiles = profiles

    def get(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise UnknownProfile(f"unknown profile {name!r}", profile=name) from None

    def names(self) -> list[str]:
        return sorted(self.profiles)


def _fmt(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc


def load_profiles(policies_dir: Path) -> ProfileSet:
    files = sorted(policies_dir.glob("profiles-*.yaml"))
    if not files:
        raise PolicyError(f"{policies_dir}: no profiles-*.yaml files")
    profiles: dict[str, Profile] = {}
    for path in files:
        data = _read_yaml(path)
        if not isinstance(data, dict) or set(data) - {"profiles", "defaults"} or "profiles" not in data:
            raise PolicyError(f"{path}: top level must have 'profiles' (and optionally 'defaults') only")
        raw = data["profiles"]
        if not isinstance(raw, dict):
            raise PolicyError(f"{path}: 'profiles' must be a mapping of name -> profile")
        for name, body in raw.items():
            if name in profiles:
                raise PolicyError(f"{path}: profile {name!r} defined twice")
            if not isinstance(body, dict):
                raise PolicyError(f"{path}: profile {name!r} must be a mapping")
            try:
                profiles[name] = Profile.model_validate({**body, "name": name})
            except ValidationError as exc:
                raise PolicyError(f"{path}: profile {name!r}: {_fmt(exc)}") from None
    # Cross-references: issuers must name CA profiles.
    for p in profiles.values():
        for issuer in p.issuers:
            if issuer not in profiles:
                raise PolicyError(f"profile {p.name!r}: field 'issuers': unknown profile {issuer!r}")
            if not profiles[issuer].ca:
                raise PolicyError(f"profile {p.name!r}: field 'issuers': {issuer!r} is not a CA profile")
    return ProfileSet(profiles)


def load_hierarchy(path: Path, profiles: ProfileSet) -> Hierarchy:
    data = _read_yaml(path)
    try:
        h = Hierarchy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{path}: {_fmt(exc)}") from None
    seen: dict[str, CAEntry] = {}
    for ca in h.cas:
        where = f"{path}: CA {ca.name!r}"
        if ca.name in seen:
            raise PolicyError(f"{where}: duplicate name")
        if ca.profile not in profiles.profiles:
            raise PolicyError(f"{where}: field 'profile': unknown profile {ca.profile!r}")
        prof = profiles.profiles[ca.profile]
        if not prof.ca:
            raise PolicyError(f"{where}: field 'profile': {ca.profile!r} is not a CA profile")
        if ca.key_alg is not None and ca.key_alg not in prof.key_algs:
            raise PolicyError(f"{where}: field 'key_alg': {ca.key_alg.value} not allowed by {ca.profile!r}")
        if prof.self_signed:
            if ca.parent is not None:
                raise PolicyError(f"{where}: field 'parent': a root has no parent")
        else:
            if ca.parent is None or ca.parent not in seen:
                raise PolicyError(f"{where}: field 'parent': must name a CA listed before it")
            if seen[ca.parent].profile not in prof.issuers:
                raise PolicyError(
                    f"{where}: field 'parent': {seen[ca.parent].profile!r} may not issue {ca.profile!r}"
                )
        seen[ca.name] = ca
    for sk in h.service_keys:
        where = f"{path}: service key {sk.name!r}"
        if sk.profile not in profiles.profiles:
            raise PolicyError(f"{where}: field 'profile': unknown profile {sk.profile!r}")
        if sk.issuer not in seen:
            raise PolicyError(f"{where}: field 'issuer': unknown CA {sk.issuer!r}")
        if seen[sk.issuer].profile not in profiles.profiles[sk.profile].issuers:
            raise PolicyError(f"{where}: field 'issuer': CA {sk.issuer!r} may not issue {sk.profile!r}")
    for pname in (h.ocsp_signer_profile, h.ocsp_signer_profile_20):
        if pname not in profiles.profiles:
            raise PolicyError(f"{path}: field 'ocsp_signer_profile': unknown profile {pname!r}")
    return h
