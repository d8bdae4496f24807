"""Service configuration from the environment (pydantic-settings).

Names are a contract with operators' scripts: V2GPKI_HOME (data directory, default ./var) and
V2GPKI_PUBLIC_URL (base of the AIA/CRLDP URLs, default http://127.0.0.1:8000) in particular.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pki.errors import ConfigError

REPO_POLICIES = Path(__file__).resolve().parent.parent / "policies"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="V2GPKI_", extra="ignore")

    env: Literal["development", "production"] = "development"
    home: Path = Path("./var")
    public_url: str = "http://127.0.0.1:8000"
    database_url: str | None = None
    policies_dir: Path = REPO_POLICIES
    hierarchy_file: Path | None = None

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

    @cached_property
    def home_dir(self) -> Path:
        return self.home.resolve()

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
        candidates = [self.hsm_pin_file] if self.hsm_pin_file else []
        candidates.append(self.softhsm_dir / "user.pin")
        for path in candidates:
            if path and path.exists():
                return path.read_text().strip()
        raise ConfigError("no HSM PIN: set V2GPKI_HSM_PIN or V2GPKI_HSM_PIN_FILE, or run `v2gpki hsm init`")

    def apply_softhsm_env(self) -> None:
        """Point SoftHSM2 at the token under the data directory unless the operator chose another."""
        conf = self.softhsm_dir / "softhsm2.conf"
        if "SOFTHSM2_CONF" not in os.environ and conf.exists():
            os.environ["SOFTHSM2_CONF"] = str(conf)

    def public_base(self) -> str:
        return self.public_url.rstrip("/")


def load_settings() -> Settings:
    return Settings()
