"""Service configuration from the environment (pydantic-settings).

Names are a contract with operators' scripts: V2GPKI_HOME (data directory, default ./var) and
V2GPKI_PUBLIC_URL (base of the AIA/CRLDP URLs, default http://127.0.0.1:8000) in particular.
"""

from __future__ import annotations

import os
from functools import cached_property, lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pki.errors import ConfigError


def packaged_policies() -> Traversable:
    """The default profiles, hierarchy and lifecycle policy: package data of ``pki`` (pki/policies/*.yaml)."""
    return resources.files("pki").joinpath("policies")


@lru_cache(maxsize=1)
def default_policies_dir() -> Path:
    """The packaged defaults as a directory. An ordinary install (wheel or checkout) keeps them as files;
    a package imported from a zip gets them exported once into a temporary directory."""
    pkg = packaged_policies()
    if isinstance(pkg, Path):
        return pkg
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="v2gpki-policies-"))
    export_policies(out)
    return out


def export_policies(dest: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the packaged default policies into ``dest`` (created if absent) for an operator to edit.
    Raises FileExistsError rather than replace an existing file unless ``overwrite``; returns the files written."""
    files = sorted((f for f in packaged_policies().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    if not files:
        raise ConfigError("the installed package carries no default policies (pki/policies/*.yaml)")
    existing = [f.name for f in files if (dest / f.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{dest} already holds {', '.join(existing)}: choose another directory or pass "
                              "--force to overwrite them")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        (dest / f.name).write_bytes(f.read_bytes())
        written.append(dest / f.name)
    return written


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="V2GPKI_", extra="ignore")

    env: Literal["development", "production"] = "development"
    home: Path = Path("./var")
    public_url: str = "http://127.0.0.1:8000"
    database_url: str | None = None
    # profiles-*.yaml, hierarchy.yaml and lifecycle.yaml; default: the copies shipped in the package
    policies_dir: Path = Field(default_factory=default_policies_dir)
    hierarchy_file: Path | None = None
    # Root transitions (pki/root_campaign.py, #27 item 2): `v2gpki root switch` refuses to move issuance to a
    # new root that fewer than this fraction of the registered stations report installed, unless forced.
    root_switch_min_coverage: float = Field(default=0.95, ge=0.0, le=1.0)

    keystore: Literal["pkcs11", "soft"] = "pkcs11"
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "v2gpki"
    hsm_pin: SecretStr | None = None
    hsm_pin_file: Path | None = None

    # pkilint on the throwaway twin: "every" certificate, or "shape" (every CA certificate and the first
    # leaf of each distinct shape per process; the profile linter still runs on every certificate).
    pkilint: Literal["every", "shape", "off"] = "shape"

    ocsp_validity_hours: int = Field(default=24 * 9, ge=1)  # chargers refresh weekly: 9 days of margin
    crl_validity_hours: int = Field(default=24 * 7, ge=1)
    # After a revocation a CA's CRL is rebuilt in the background at most this often (pki/crl.py CrlScheduler;
    # also never more than ~10 % of one core): OCSP carries a revocation at once, the CRL within this.
    crl_min_interval_seconds: float = Field(default=1.0, ge=0)

    # Clock agreement with the database server (pki/clock.py, #27 item 4): signing is refused while this
    # host's clock and PostgreSQL's differ by more than this many seconds (0: never compared); compared at
    # start and at most every V2GPKI_CLOCK_CHECK_SECONDS after that.
    max_clock_skew_seconds: float = Field(default=60.0, ge=0)
    clock_check_seconds: float = Field(default=60.0, gt=0)

    # Celery broker (workers: OCSP pre-signing, CRL refresh, expiry alerts, renewals); required in production.
    broker_url: str | None = None
    # Where TLS for the API ends: "proxy" (load balancer / nginx in front), "uvicorn" (`serve --tls-cert`),
    # or "none". Production refuses a plain-http public URL with "none" (docs/operations.md).
    tls_termination: Literal["none", "proxy", "uvicorn"] = "none"

    # Availability bounds (docs/operations.md, docs/responders.md). Live OCSP signatures an unauthenticated client can
    # cause (nonces, unknown serials, several CertIDs), per client address and process: rate per second and
    # burst; and per process in all (0 = no process-wide bound).
    ocsp_live_sign_rate: float = Field(default=10.0, ge=0)
    ocsp_live_sign_burst: int = Field(default=50, ge=1)
    ocsp_live_sign_total_rate: float = Field(default=500.0, ge=0)
    # `v2gpki ocsp-serve`: open connections per client address and worker process (0 = no cap).
    ocsp_max_connections_per_client: int = Field(default=64, ge=0)
    # `v2gpki ocsp-serve` (#28): pre-signed responses live in the database (ocsp_response); each worker keeps
    # at most this many in a bounded LRU cache in front of it (≈ 1.7 KB each as measured: 60,000 ≈ 97 MiB on
    # a worker of ≈ 123 MB without it, ≈ 235 MB after a drill, within 256 MB whatever the number of
    # certificates; 75,000 measured 243 MB, 258 MB after a drill — bench/fleet.py), a
    # miss reads one row by its unique key; and fills
    # up to V2GPKI_OCSP_CACHE_WARM_ENTRIES of the newest responses at start (0: start empty).
    ocsp_cache_entries: int = Field(default=60_000, ge=0)
    ocsp_cache_warm_entries: int = Field(default=20_000, ge=0)
    # `v2gpki serve`: request line + headers at most this many bytes (431 beyond), and complete within
    # this many seconds of their first byte (connection closed otherwise); idle keep-alive seconds.
    http_max_head_bytes: int = Field(default=64 * 1024, ge=1024)
    http_head_timeout: float = Field(default=10.0, gt=0)
    http_keepalive_timeout: int = Field(default=5, ge=1)
    # OAuth 2.0 client credentials (/oauth/token, pki/oauth.py): lifetime of an access token in seconds
    # (never beyond the API key's own expiry; revoking the key voids its tokens at once).
    oauth_token_seconds: int = Field(default=3600, ge=60, le=86400)
    # API worker processes (api/blocking.py): threads per process for the hot routes' blocking calls (HSM,
    # database; the name predates #23's single API path), and how contract installations run: N ≥ 1 a pool
    # of N threads, 0 on the event loop, unset: on the loop with SQLite, the shared pool with PostgreSQL.
    # OCPP SignCertificate without certificateType (pki/enrollment.py): "infer" from the CSR (an EVSEID/SECCID
    # CN or DC=CPO: V2GCertificate), or always "V2GCertificate" | "ChargingStationCertificate".
    ocpp_default_cert_type: str = "infer"
    fastlane_threads: int = Field(default=40, ge=1)
    cps_threads: int | None = Field(default=None, ge=0)
    # `v2gpki serve --workers` default (uvicorn worker processes)
    workers: int = Field(default=2, ge=1)
    # API rate limits (api/auth.py, per process): requests per second and organization (burst: twice that);
    # failed sign-ins per second and client address, and their burst; the console's sign-in form likewise.
    rate_limit: float = Field(default=2000.0, gt=0)
    auth_fail_rate: float = Field(default=5.0, gt=0)
    auth_fail_burst: float = Field(default=20.0, gt=0)
    console_signin_rate: float = Field(default=0.5, gt=0)
    console_signin_burst: float = Field(default=10.0, gt=0)
    # Seconds a verified API key stays in the per-process cache (pki/orgs.py)
    auth_cache_ttl: float = 5.0
    # Addresses whose X-SSL-Client-Cert header is trusted (comma-separated; api/auth.py)
    trusted_proxies: str = ""
    # Operator console (api/console/session.py): session lifetime, and the HMAC key file (default under HOME)
    console_session_seconds: int = Field(default=8 * 3600, ge=60)
    console_session_key_file: Path | None = None
    # Logging (api/observability.py): "json" or "text" (default: json in production), and the level
    log_format: str | None = None
    log_level: str = "INFO"
    # `v2gpki ocsp-serve`'s server: "fast" (api/ocsp_fast.py) or "uvicorn" (api/ocsp_app.py)
    ocsp_server: str = "fast"
    # OCSP pre-signer (pki/ocsp/presign.py): milliseconds between collections
    ocsp_presign_period_ms: float = Field(default=100.0, gt=0)
    # Issuance group commit (pki/issuance.py IssueBatcher): on/off, batch bound, linger in milliseconds
    issue_batch: bool = True
    issue_batch_max: int = Field(default=64, ge=1)
    issue_batch_linger_ms: float = Field(default=0.0, ge=0)
    # Server-side prepared statements on PostgreSQL (pki/store/fast.py); off behind a transaction pooler
    pg_prepare: bool = True
    # The native EXI codec (pki/cps/exi/native.py) when it is built; off: the pure-Python codec
    exi_native: bool = True
    # The p11-kit client module (hsm/p11kit.py); default: found beside libp11-kit.so.0
    p11kit_client: str | None = None
    # Celery (workers/app.py): result backend (default: the broker, or files under HOME), Redis transport
    # bounds, and the beat's periods in seconds
    result_backend: str | None = None
    broker_visibility_timeout: int = 3600
    broker_restore_interval: int = 10
    broker_restore_throttle: int = 10
    outbox_drain_seconds: int = 15
    delivery_sweep_seconds: int = 30
    expiry_scan_seconds: int = 3600
    renewal_seconds: int = 6 * 3600
    truststore_check_seconds: int = 6 * 3600
    crl_refresh_seconds: int = 900
    ocsp_refresh_seconds: int = 900
    task_time_limit: int = 1800
    # Lifecycle events and deliveries (pki/lifecycle.py, pki/lifecycle_policy.LifecycleSettings): Celery queue,
    # policy file (default <policies_dir>/lifecycle.yaml), expiry windows in days ("60,30,14,7,1"),
    # webhook timeouts and retries, delivery lease, and the SMTP relay for e-mail subscriptions
    queue: str = "v2gpki"
    lifecycle_file: Path | None = None
    expiry_windows: str | None = None
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_backoff_seconds: float = Field(default=30.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    delivery_lease_seconds: float = Field(default=60.0, gt=0)
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "v2gpki@localhost"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    task_soft_time_limit: int = 1700

    def trusted_proxy_set(self) -> set[str]:
        return {x.strip() for x in self.trusted_proxies.split(",") if x.strip()}

    # Audit checkpoints (pki/audit_sign.py, #21 item 7): the chain head signed by the HSM audit key every
    # this many seconds by the beat (0: only `v2gpki audit checkpoint` and `v2gpki serve`'s clean shutdown),
    # each one also appended to <dir>/audit-checkpoints.jsonl outside the database (default dir:
    # V2GPKI_HOME) and, when set, POSTed to a webhook (an append-only store elsewhere).
    audit_checkpoint_seconds: int = Field(default=300, ge=0)
    audit_checkpoint_dir: Path | None = None
    audit_checkpoint_webhook: str | None = None
    # Development switches production refuses (pki/hardening.py); the console and the workers read them too.
    console_insecure_cookies: str | None = None
    webhook_allow_private: str | None = None

    @field_validator("cps_threads", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @cached_property
    def home_dir(self) -> Path:
        return self.home.resolve()

    @property
    def audit_checkpoint_file(self) -> Path:
        """The checkpoint record outside the database (append-only JSON lines)."""
        return (self.audit_checkpoint_dir.resolve() if self.audit_checkpoint_dir else self.home_dir) / \
            "audit-checkpoints.jsonl"

    @property
    def softhsm_dir(self) -> Path:
        return self.home_dir / "softhsm"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_dir / 'v2gpki.db'}"

    def pin(self) -> str:
        """The token user PIN: env var, then a file, then the embedded default's generated PIN file."""
        if self.hsm_pin is not None:
            return self.hsm_pin.get_secret_value()
        if self.hsm_pin_file is not None:
            # the operator's secret: missing, unreadable or empty is an error, with no fallback (#22 item 3)
            try:
                pin = self.hsm_pin_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"V2GPKI_HSM_PIN_FILE={self.hsm_pin_file} cannot be read "
                                  f"({exc.strerror or exc}): the PIN secret must exist and be readable by "
                                  f"this process (uid {os.getuid()})") from None
            if not pin:
                raise ConfigError(f"V2GPKI_HSM_PIN_FILE={self.hsm_pin_file} is empty")
            return pin
        path = self.softhsm_dir / "user.pin"
        if path.exists():
            return path.read_text().strip()
        raise ConfigError("no HSM PIN: set V2GPKI_HSM_PIN or V2GPKI_HSM_PIN_FILE, or run `v2gpki hsm init`")

    def apply_softhsm_env(self) -> None:
        """Point SoftHSM2 at the token under the data directory unless the operator chose another."""
        conf = self.softhsm_dir / "softhsm2.conf"
        # env: SoftHSM2's own variable, read by the PKCS#11 library this process loads: written, never a
        # setting of ours
        if "SOFTHSM2_CONF" not in os.environ and conf.exists():
            os.environ["SOFTHSM2_CONF"] = str(conf)

    def public_base(self) -> str:
        return self.public_url.rstrip("/")

    def production_problems(self) -> list[str]:
        """Insecure defaults that V2GPKI_ENV=production refuses, each saying what to set instead."""
        return production_problems(self)

    def validate_production(self) -> None:
        """Raise ConfigError listing every problem when V2GPKI_ENV=production (no-op in development)."""
        if self.env != "production":
            return
        problems = self.production_problems()
        if problems:
            raise ConfigError("refusing to start with V2GPKI_ENV=production: " + "; ".join(problems))


_LOOPBACK_HOSTS = {"localhost", "0.0.0.0", "::", "::1", ""}


def production_problems(s: Settings) -> list[str]:
    from urllib.parse import urlsplit

    out: list[str] = []
    if s.db_url.startswith("sqlite"):
        out.append("the database is SQLite (single host, single writer, no online dump for the other hosts): "
                   "set V2GPKI_DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DB")
    if s.keystore == "soft":
        out.append("V2GPKI_KEYSTORE=soft keeps CA keys in process memory: set V2GPKI_KEYSTORE=pkcs11 and "
                   "V2GPKI_PKCS11_MODULE to your HSM's PKCS#11 library")
    else:
        if s.hsm_pin is not None:
            out.append("V2GPKI_HSM_PIN puts the token PIN in the process environment (readable in /proc, "
                       "`docker inspect`, crash reports, child processes): unset it and set V2GPKI_HSM_PIN_FILE "
                       "to a secret file (Docker/Kubernetes secret, systemd credential)")
        if s.hsm_pin_file is None:
            if s.hsm_pin is None:
                out.append(f"no V2GPKI_HSM_PIN_FILE: the PIN would come from {s.softhsm_dir / 'user.pin'}, "
                           "stored beside the token it unlocks; set V2GPKI_HSM_PIN_FILE to a secret file "
                           "outside V2GPKI_HOME")
        else:
            pin_file = s.hsm_pin_file.resolve()
            if pin_file.is_relative_to(s.home_dir):
                out.append(f"V2GPKI_HSM_PIN_FILE={s.hsm_pin_file} lies under V2GPKI_HOME ({s.home_dir}), "
                           "beside the token and in its backups: mount the PIN as a secret outside the data "
                           "directory (e.g. /run/secrets/v2gpki_hsm_pin)")
    url = urlsplit(s.public_url)
    host = (url.hostname or "").lower()
    if url.scheme not in ("http", "https"):
        out.append(f"V2GPKI_PUBLIC_URL={s.public_url!r} is not an http(s) URL: set the base URL chargers "
                   "and vehicles reach (it is written into AIA/CRLDP of every certificate)")
    elif host in _LOOPBACK_HOSTS or host.startswith("127."):
        out.append(f"V2GPKI_PUBLIC_URL={s.public_url} is a loopback address, yet it is written into the "
                   "AIA/CRLDP of every certificate: set the externally reachable base URL, e.g. "
                   "http://pki.example.com")
    elif url.scheme == "http" and s.tls_termination == "none":
        out.append("V2GPKI_PUBLIC_URL is plain http and no TLS termination is declared, so API keys and "
                   "enrollments would cross the network in clear: terminate TLS at a proxy and set "
                   "V2GPKI_TLS_TERMINATION=proxy, or run `v2gpki serve --tls-cert ... --tls-key ...` and set "
                   "V2GPKI_TLS_TERMINATION=uvicorn (the AIA/CRL URLs themselves may stay http)")
    if not s.broker_url:
        out.append("no V2GPKI_BROKER_URL: OCSP pre-signing, CRL refresh, expiry alerts and renewals run in "
                   "Celery workers; set V2GPKI_BROKER_URL=redis://HOST:6379/0")
    from pki.hardening import hardening_problems

    out.extend(hardening_problems(s))
    out.extend(placeholder_problems(s))
    return out


# Secret values committed in the repository's examples (deploy/k8s/examples/secret.yaml, deploy/compose/
# env.example): anyone can read them, so production refuses any setting or secret file that contains one
# (tests/test_image.py keeps this list in step with the files).
KNOWN_PLACEHOLDERS = ("REPLACE_ME", "change-me-to-a-long-random-string")


def placeholder_problems(s: Settings) -> list[str]:
    """Settings and secret files that still hold an example's placeholder (#22 item 3). Never echoes a value."""
    candidates: list[tuple[str, str]] = [("V2GPKI_DATABASE_URL", s.database_url or ""),
                                         ("V2GPKI_BROKER_URL", s.broker_url or "")]
    if s.hsm_pin is not None:
        candidates.append(("V2GPKI_HSM_PIN", s.hsm_pin.get_secret_value()))
    files = [("V2GPKI_HSM_PIN_FILE", s.hsm_pin_file),
             ("V2GPKI_CONSOLE_SESSION_KEY_FILE", s.console_session_key_file)]
    for name, path in files:
        if path:
            try:
                candidates.append((name, Path(path).read_bytes().decode("utf-8", "replace")))
            except OSError:
                continue  # reported where the file is used
    return [f"{name} holds a placeholder published in the repository's examples: set a secret of your own"
            for name, value in candidates if any(p in value for p in KNOWN_PLACEHOLDERS)]


def load_settings() -> Settings:
    return Settings()


@lru_cache(maxsize=1)
def current() -> Settings:
    """This process's settings, read from the environment once, for code that has no Context at hand
    (module-level rate limiters, the EXI codec switch, the issuance batcher, logging set-up). Code with a
    Context reads ctx.settings. A test that changes the environment calls ``current.cache_clear()``."""
    return Settings()
