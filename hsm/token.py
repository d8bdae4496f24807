"""SoftHSM2 token set-up for the embedded default (`v2gpki hsm init`).

The token lives under the service's data directory ($V2GPKI_HOME/softhsm/tokens) with its own
softhsm2.conf, so nothing outside the data directory is touched. PINs are generated when not given,
written to files readable by the owner only (0600), and never printed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hsm.errors import HSMConfigError


@dataclass(frozen=True)
class TokenPaths:
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def tokendir(self) -> Path:
        return self.root / "tokens"

    @property
    def pin_file(self) -> Path:
        return self.root / "user.pin"

    @property
    def so_pin_file(self) -> Path:
        return self.root / "so.pin"


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def softhsm_util() -> str:
    exe = shutil.which("softhsm2-util")
    if exe is None:
        raise HSMConfigError("softhsm2-util not found: install SoftHSM2 (apt-get install softhsm2)")
    return exe


def token_exists(paths: TokenPaths, label: str) -> bool:
    if not paths.conf.exists():
        return False
    # env: softhsm2-util's environment, pointed at this token's configuration
    env = dict(os.environ, SOFTHSM2_CONF=str(paths.conf))
    out = subprocess.run([softhsm_util(), "--show-slots"], env=env, capture_output=True, text=True)
    # The whole label: "t-audit" must not be found in "t-audit-ext" (softhsm2-util pads it with spaces).
    return re.search(rf"^\s*Label:\s+{re.escape(label)}\s*$", out.stdout, re.M) is not None


def init_softhsm_token(root: Path, label: str, pin: str | None = None, so_pin: str | None = None) -> TokenPaths:
    """Create (idempotently) a SoftHSM2 token named ``label`` under ``root``."""
    paths = TokenPaths(root)
    paths.tokendir.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    os.chmod(paths.tokendir, 0o700)
    if not paths.conf.exists():
        _write_secret(paths.conf, f"directories.tokendir = {paths.tokendir}\nobjectstore.backend = file\n"
                      "log.level = ERROR\nslots.removable = false")
    # env: a write, for the SoftHSM2 PKCS#11 library this process loads next (it reads SOFTHSM2_CONF)
    os.environ["SOFTHSM2_CONF"] = str(paths.conf)
    if token_exists(paths, label):
        return paths
    pin = pin or (paths.pin_file.read_text().strip() if paths.pin_file.exists() else secrets.token_hex(12))
    so_pin = so_pin or secrets.token_hex(12)
    _write_secret(paths.pin_file, pin)
    _write_secret(paths.so_pin_file, so_pin)
    # The PINs go to softhsm2-util on its command line only inside this process' own child; they are
    # never logged, and the error text below does not echo the command.
    res = subprocess.run(
        [softhsm_util(), "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env=dict(os.environ, SOFTHSM2_CONF=str(paths.conf)),  # env: softhsm2-util's, as in token_exists
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise HSMConfigError(f"softhsm2-util could not initialise token {label!r}: {res.stderr.strip()}")
    return paths
