"""#21 items 11 and 12: a private data directory, sealed webhook secrets, and the switches production refuses.

11. $V2GPKI_HOME is created 0700 and everything the service creates in it 0600 (the SQLite database with
    its -wal/-shm, the SoftHSM2 token and PIN files), whatever the caller's umask; `v2gpki config check`
    and production mode list looser modes. Webhook HMAC secrets are stored sealed by an AES key generated
    in the token, so reading the database does not reveal them (SQLite and PostgreSQL).
12. V2GPKI_ENV=production refuses V2GPKI_CONSOLE_INSECURE_COOKIES, V2GPKI_WEBHOOK_ALLOW_PRIVATE,
    V2GPKI_PKILINT=off and sslmode=disable, one line each; `apikey create --days 0` is refused unless
    --no-expiry is given.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from hsm import sealing
from pki import lifecycle
from pki.config import Settings
from pki.context import Context
from pki.errors import ConfigError
from pki.orgs import create_org
from tests.conftest import TEST_PIN, V2GPKI_EXE, cli_env, run_cli

PG = "postgresql://v2gpki:s3cret-pw@db.internal:5432/v2gpki"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`v2gpki ARGS` under the common umask 022, so a file mode can only come from the service itself."""
    return subprocess.run([V2GPKI_EXE, *args], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o022))


def _modes(home: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(home.stat().st_mode)}
    for p in home.rglob("*"):
        if not p.is_symlink():
            out[str(p.relative_to(home))] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.fixture
def fresh_home(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A data directory the CLI creates from nothing: token (`hsm init`), database, an org and a key."""
    home = tmp_path / "srv" / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_") and k != "SOFTHSM2_CONF"}
    env.update(V2GPKI_HOME=str(home), V2GPKI_TOKEN_LABEL="t-modes", V2GPKI_PKILINT="shape")
    for args in (["hsm", "init"], ["org", "create", "Mode CPO", "--role", "cpo", "--prefix", "DE*MOD"],
                 ["apikey", "create", "--org", "Mode CPO"]):
        r = _run(args, env)
        assert r.returncode == 0, r.stdout + r.stderr
    return home, env


def test_data_directory_and_every_file_in_it_are_private(fresh_home: tuple[Path, dict[str, str]]) -> None:
    home, env = fresh_home
    modes = _modes(home)
    for name in ("v2gpki.db", "softhsm/user.pin", "softhsm/so.pin", "softhsm/softhsm2.conf", "softhsm/tokens"):
        assert name in modes, sorted(modes)
    loose = {k: f"{m:04o}" for k, m in modes.items() if m & 0o077}
    assert not loose, loose
    assert modes["."] == 0o700 and modes["v2gpki.db"] == 0o600
    # -wal and -shm exist while a connection is open: SQLite gives them the database file's mode
    import sqlite3

    conn = sqlite3.connect(home / "v2gpki.db")
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS t_modes (x)")
        conn.commit()
        for suffix in ("-wal", "-shm"):
            assert stat.S_IMODE((home / f"v2gpki.db{suffix}").stat().st_mode) == 0o600
    finally:
        conn.close()
    r = _run(["config", "check"], env)
    assert "has mode" not in r.stdout and "readable by group or others" not in r.stdout, r.stdout


def test_config_check_and_production_refuse_loose_modes(fresh_home: tuple[Path, dict[str, str]],
                                                        tmp_path: Path) -> None:
    home, env = fresh_home
    home.chmod(0o755)
    (home / "v2gpki.db").chmod(0o644)
    (home / "softhsm" / "user.pin").chmod(0o644)
    r = _run(["config", "check"], env)
    assert r.returncode == 6
    lines = [ln for ln in r.stdout.splitlines() if "has mode" in ln or "readable by group or others" in ln]
    assert len(lines) == 2, r.stdout
    assert "has mode 0755" in lines[0] and f"chmod 700 {home}" in lines[0]
    assert "v2gpki.db (0644)" in lines[1] and "softhsm/user.pin (0644)" in lines[1]
    # production mode refuses to start with them (and only them, in an otherwise fit configuration)
    pin = tmp_path / "secrets" / "pin"
    pin.parent.mkdir()
    pin.write_text(TEST_PIN + "\n")
    s = Settings(_env_file=None, env="production", home=home, database_url=PG,  # type: ignore[call-arg]
                 hsm_pin_file=pin, public_url="https://pki.example.com", broker_url="redis://redis:6379/0")
    assert len(s.production_problems()) == 2, s.production_problems()
    with pytest.raises(ConfigError, match="chmod 700"):
        s.validate_production()


# -- webhook secrets sealed in the token -------------------------------------------------------------------


def _raw_secret(ctx: Context, sub_id: str) -> str:
    with ctx.db.engine.connect() as conn:
        return str(conn.execute(text("SELECT secret FROM subscription WHERE sub_id = :s"), {"s": sub_id}).scalar())


def test_webhook_secrets_are_sealed_in_the_token(ctx: Context) -> None:
    org = f"Sealed {secrets.token_hex(3)}"
    create_org(ctx.db, org, "admin", [])
    chosen = "a-receiver-chosen-secret-" + "x" * 103  # the longest the API accepts (128)
    subs = [lifecycle.add_subscription(ctx, org, "webhook", "https://hooks.example.com/a", ["expiry"],
                                       secret=chosen),
            lifecycle.add_subscription(ctx, org, "webhook", "https://hooks.example.com/b", ["expiry"])]
    for new in subs:
        assert new.secret is not None
        raw = _raw_secret(ctx, new.row.sub_id)
        assert raw.startswith(sealing.PREFIX) and new.secret not in raw
        assert sealing.unseal(ctx.keystore, raw, new.row.sub_id) == new.secret
    # bound to its row: a sealed value copied into another subscription does not open there
    with pytest.raises(sealing.SealError):
        sealing.unseal(ctx.keystore, _raw_secret(ctx, subs[0].row.sub_id), subs[1].row.sub_id)
    # the key is the token's: sensitive, never extractable
    from pkcs11 import Attribute, ObjectClass

    def attrs(session: object) -> list[tuple[bool, bool]]:
        keys = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,  # type: ignore[attr-defined]
                                    Attribute.LABEL: sealing.SECRETS_KEY})
        return [(k[Attribute.SENSITIVE], k[Attribute.EXTRACTABLE]) for k in keys]

    found = ctx.keystore.session_call(attrs)  # type: ignore[attr-defined]
    assert found and all(s and not e for s, e in found)


def test_secrets_stored_in_clear_by_an_earlier_version_are_sealed_by_init(ctx: Context) -> None:
    org = f"Legacy {secrets.token_hex(3)}"
    create_org(ctx.db, org, "admin", [])
    new = lifecycle.add_subscription(ctx, org, "webhook", "https://hooks.example.com/l", ["expiry"])
    assert new.secret is not None
    with ctx.db.engine.begin() as conn:
        conn.execute(text("UPDATE subscription SET secret = :v WHERE sub_id = :s"),
                     {"v": new.secret, "s": new.row.sub_id})
    assert sealing.unseal(ctx.keystore, new.secret, new.row.sub_id) == new.secret  # still usable meanwhile
    r = run_cli(["init"], cli_env(ctx))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sealed 1 webhook secret(s)" in r.stderr
    raw = _raw_secret(ctx, new.row.sub_id)
    assert sealing.is_sealed(raw) and new.secret not in raw
    assert sealing.unseal(ctx.keystore, raw, new.row.sub_id) == new.secret


# -- production switches (item 12) ------------------------------------------------------------------------


def _good(tmp_path: Path, **over: object) -> Settings:
    pin = tmp_path / "secrets" / "hsm_pin"
    pin.parent.mkdir(exist_ok=True)
    pin.write_text("1234\n")
    kw: dict[str, object] = dict(
        env="production", home=tmp_path / "data", database_url=PG, keystore="pkcs11", hsm_pin_file=pin,
        public_url="https://pki.example.com", broker_url="redis://redis:6379/0")
    kw.update(over)
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg, arg-type]


@pytest.mark.parametrize(("env", "must_name"), [
    ({"V2GPKI_CONSOLE_INSECURE_COOKIES": "1"}, "V2GPKI_CONSOLE_INSECURE_COOKIES"),
    ({"V2GPKI_CONSOLE_INSECURE_COOKIES": "true"}, "V2GPKI_CONSOLE_INSECURE_COOKIES"),
    ({"V2GPKI_WEBHOOK_ALLOW_PRIVATE": "1"}, "V2GPKI_WEBHOOK_ALLOW_PRIVATE"),
    ({"V2GPKI_PKILINT": "off"}, "V2GPKI_PKILINT=off"),
    ({"V2GPKI_DATABASE_URL": PG + "?sslmode=disable"}, "sslmode=disable"),
    ({"V2GPKI_DATABASE_URL": PG + "?connect_timeout=5&sslmode=allow"}, "sslmode=allow"),
])
def test_production_refuses_unsafe_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            env: dict[str, str], must_name: str) -> None:
    for k in list(os.environ):
        if k.startswith("V2GPKI_"):
            monkeypatch.delenv(k)
    base = _good(tmp_path)
    for k, v in (dict(V2GPKI_ENV="production", V2GPKI_HOME=str(base.home), V2GPKI_DATABASE_URL=PG,
                      V2GPKI_HSM_PIN_FILE=str(base.hsm_pin_file), V2GPKI_PUBLIC_URL=base.public_url,
                      V2GPKI_BROKER_URL=str(base.broker_url)) | env).items():
        monkeypatch.setenv(k, v)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    problems = s.production_problems()
    assert len(problems) == 1 and must_name in problems[0], problems
    with pytest.raises(ConfigError) as ei:
        s.validate_production()
    assert "s3cret-pw" not in ei.value.message
    # "0" and a verifying sslmode are fine in production
    assert _good(tmp_path, console_insecure_cookies="0", webhook_allow_private="0", pkilint="shape",
                 database_url=PG + "?sslmode=verify-full").production_problems() == []


def test_production_cli_refuses_with_one_line_per_switch(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("x\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    env.update(V2GPKI_ENV="production", V2GPKI_HOME=str(tmp_path / "data"), V2GPKI_HSM_PIN_FILE=str(pin),
               V2GPKI_DATABASE_URL=PG + "?sslmode=disable", V2GPKI_PUBLIC_URL="https://pki.example.com",
               V2GPKI_BROKER_URL="redis://redis:6379/0", V2GPKI_CONSOLE_INSECURE_COOKIES="1",
               V2GPKI_WEBHOOK_ALLOW_PRIVATE="1", V2GPKI_PKILINT="off")
    r = _run(["config", "check"], env)
    assert r.returncode == 6
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("- ")]) == 4, r.stdout
    r = _run(["list"], env)
    assert r.returncode == 6 and r.stderr.startswith("v2gpki: error: refusing to start with V2GPKI_ENV=production")
    assert "s3cret-pw" not in r.stderr and not (tmp_path / "data").exists()


def test_apikey_that_never_expires_needs_no_expiry(sqlite_ctx: Context) -> None:
    org = f"Keys {secrets.token_hex(3)}"
    create_org(sqlite_ctx.db, org, "admin", [])
    env = cli_env(sqlite_ctx)
    r = run_cli(["apikey", "create", "--org", org, "--days", "0"], env)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.strip() == "v2gpki: error: --days must be at least 1; a key that never expires needs --no-expiry"
    r = run_cli(["apikey", "create", "--org", org, "--days", "-5"], env)
    assert r.returncode == 3
    r = run_cli(["apikey", "create", "--org", org, "--no-expiry"], env)
    assert r.returncode == 0 and "expires never" in r.stdout, r.stderr
    r = run_cli(["apikey", "create", "--org", org, "--days", "30", "--no-expiry"], env)
    assert r.returncode == 2  # usage: one or the other
    r = run_cli(["apikey", "create", "--org", org, "--days", "30"], env)
    assert r.returncode == 0 and "expires never" not in r.stdout
