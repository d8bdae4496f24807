"""V2GPKI_ENV=production refuses insecure defaults with a message saying what to set (pki/config.py),
before anything is created; `v2gpki config check` lists the same problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki.config import Settings
from pki.errors import ConfigError
from pki.wiring import build_context
from tests.conftest import V2GPKI_EXE, run

PG = "postgresql://v2gpki:secret@db.internal:5432/v2gpki"


def good(tmp_path: Path, **over: object) -> Settings:
    pin = tmp_path / "secrets" / "hsm_pin"
    pin.parent.mkdir(exist_ok=True)
    pin.write_text("1234\n")
    kw: dict[str, object] = dict(
        env="production", home=tmp_path / "data", database_url=PG, keystore="pkcs11", hsm_pin_file=pin,
        public_url="http://pki.example.com", tls_termination="proxy", broker_url="redis://redis:6379/0",
    )
    kw.update(over)
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg, arg-type]


def test_a_complete_production_configuration_passes(tmp_path: Path) -> None:
    s = good(tmp_path)
    assert s.production_problems() == []
    s.validate_production()
    # https public URL implies TLS: no termination declaration needed
    assert good(tmp_path, public_url="https://pki.example.com", tls_termination="none").production_problems() == []


@pytest.mark.parametrize(("override", "must_name"), [
    ({"database_url": None}, "V2GPKI_DATABASE_URL=postgresql://"),
    ({"database_url": "sqlite:////var/lib/v2gpki/x.db"}, "V2GPKI_DATABASE_URL=postgresql://"),
    ({"keystore": "soft"}, "V2GPKI_KEYSTORE=pkcs11"),
    ({"hsm_pin": "1234"}, "V2GPKI_HSM_PIN_FILE"),
    ({"hsm_pin_file": None}, "V2GPKI_HSM_PIN_FILE"),
    ({"public_url": "http://127.0.0.1:8000"}, "V2GPKI_PUBLIC_URL"),
    ({"public_url": "http://localhost"}, "V2GPKI_PUBLIC_URL"),
    ({"public_url": "http://[::1]:8000"}, "V2GPKI_PUBLIC_URL"),
    ({"public_url": "http://0.0.0.0"}, "V2GPKI_PUBLIC_URL"),
    ({"public_url": "ftp://pki.example.com"}, "V2GPKI_PUBLIC_URL"),
    ({"tls_termination": "none"}, "V2GPKI_TLS_TERMINATION=proxy"),
    ({"broker_url": None}, "V2GPKI_BROKER_URL=redis://"),
])
def test_each_insecure_default_is_refused_with_what_to_set(tmp_path: Path, override: dict[str, object],
                                                           must_name: str) -> None:
    s = good(tmp_path, **override)
    problems = s.production_problems()
    assert len(problems) == 1, problems
    with pytest.raises(ConfigError) as ei:
        s.validate_production()
    assert must_name in ei.value.message
    assert "refusing to start with V2GPKI_ENV=production" in ei.value.message


def test_pin_file_inside_the_data_directory_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "data"
    (home / "softhsm").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)  # as the service creates it (#21 item 11): only the PIN's location is at issue here
    (home / "softhsm" / "user.pin").write_text("1234\n")
    (home / "softhsm" / "user.pin").chmod(0o600)
    s = good(tmp_path, hsm_pin_file=home / "softhsm" / "user.pin")
    [problem] = s.production_problems()
    assert "lies under V2GPKI_HOME" in problem and "/run/secrets" in problem


def test_message_never_echoes_secrets(tmp_path: Path) -> None:
    s = good(tmp_path, hsm_pin="pin-value-4321", database_url=None, broker_url=None)
    with pytest.raises(ConfigError) as ei:
        s.validate_production()
    assert "pin-value-4321" not in ei.value.message
    assert len(s.production_problems()) == 3


def test_development_accepts_the_defaults(tmp_path: Path) -> None:
    s = Settings(_env_file=None, home=tmp_path)  # type: ignore[call-arg]
    assert s.env == "development"
    s.validate_production()  # no-op
    assert len(s.production_problems()) >= 3  # sqlite, loopback URL, no broker: listed, not enforced


def test_build_context_refuses_before_creating_anything(tmp_path: Path) -> None:
    home = tmp_path / "never-created"
    s = Settings(_env_file=None, env="production", home=home)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="V2GPKI_DATABASE_URL"):
        build_context(s)
    assert not home.exists()


def _env(tmp_path: Path, **kv: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_HOME=str(tmp_path / "data"), **kv)
    return env


def test_cli_refuses_in_production_with_exit_6(tmp_path: Path) -> None:
    res = run([V2GPKI_EXE, "list"], env=_env(tmp_path, V2GPKI_ENV="production", V2GPKI_HSM_PIN="pin-7777"))
    assert res.returncode == 6, res.stderr
    assert "V2GPKI_DATABASE_URL" in res.stderr and "V2GPKI_HSM_PIN_FILE" in res.stderr
    assert "pin-7777" not in res.stderr + res.stdout


def test_config_check_lists_problems_and_config_show_masks_secrets(tmp_path: Path) -> None:
    env = _env(tmp_path, V2GPKI_HSM_PIN="pin-8888", V2GPKI_DATABASE_URL=PG)
    res = run([V2GPKI_EXE, "config", "check"], env=env)
    assert res.returncode == 6
    assert "would be refused" in res.stderr
    assert "V2GPKI_BROKER_URL" in res.stdout
    shown = run([V2GPKI_EXE, "config", "show"], env=env)
    assert shown.returncode == 0, shown.stderr
    assert "pin-8888" not in shown.stdout and "secret@" not in shown.stdout
    assert '"V2GPKI_HSM_PIN": "[set]"' in shown.stdout
    pin = tmp_path / "pin"
    pin.write_text("x\n")
    ok = run([V2GPKI_EXE, "config", "check"], env=_env(
        tmp_path, V2GPKI_ENV="production", V2GPKI_DATABASE_URL=PG, V2GPKI_HSM_PIN_FILE=str(pin),
        V2GPKI_PUBLIC_URL="http://pki.example.com", V2GPKI_TLS_TERMINATION="proxy",
        V2GPKI_BROKER_URL="redis://redis:6379/0"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "fit for production" in ok.stdout
