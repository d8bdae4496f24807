"""`v2gpki backup` / `v2gpki restore`: the database and the SoftHSM2 token in one archive.

Archive (tar + gzip, written 0600, atomically renamed into place)::

    manifest.json                format, versions, schema revision, counts, referenced key labels, sha256 of
                                 every other member
    database/v2gpki.sqlite       SQLite: the online backup API (a consistent snapshot while the service runs)
    database/v2gpki.pgdump       PostgreSQL: pg_dump --format=custom (one snapshot transaction)
    token/...                    SoftHSM2: a copy of the token directory (``directories.tokendir``)

Order matters: the database is dumped *before* the token is copied, so every key the dump refers to is
already in the token (a key generated in between is an unused extra, never a missing one).

The token copy must be taken while no process creates or destroys keys (`v2gpki init`, CA or OCSP-signer
renewals in the workers): stop the API and the workers, or at least the workers, first. The copy is
checked: the token directory is listed (path, size, mtime) before and after copying, and a change means
another attempt, then a refusal. SoftHSM2 encrypts private objects under the user PIN, and no PIN is
ever written to the archive: the PIN (and the SO PIN) live in the secret store and are needed to use a
restored token. For a network HSM nothing of the token is archived; the manifest lists the key labels
the database refers to, and `restore` checks them against the HSM (its own backup/replication procedure,
docs/operations.md, keeps the keys).

Restore is a dry run unless ``--yes``; it refuses a non-empty target database or token directory unless
``--force`` (the old SQLite file and token directory are then moved aside, not deleted), verifies every
checksum before writing anything, migrates the restored schema to the code's head, and verifies that
every key the restored database needs is present and usable in the configured token.

The database side (the SQLite online backup, pg_dump and pg_restore, what the manifest records of a
database) is pki/store/backup.py; the archive, the token and the keys are here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pki.config import Settings
from pki.errors import BackupError, ConfigError
from pki.store import backup as store
from pki.store.db import url_without_password

FORMAT = "v2gpki-backup/1"
MANIFEST = "manifest.json"
SQLITE_MEMBER = "database/v2gpki.sqlite"
PGDUMP_MEMBER = "database/v2gpki.pgdump"
TOKEN_PREFIX = "token/"
DEFAULT_SOFTHSM_CONF = Path("/etc/softhsm/softhsm2.conf")


# -- where things are ---------------------------------------------------------------------------------------


def is_softhsm(settings: Settings) -> bool:
    return settings.keystore == "pkcs11" and "softhsm" in Path(settings.pkcs11_module).name.lower()


def softhsm_conf(settings: Settings) -> Path:
    """The SoftHSM2 configuration this service uses (same rule as Settings.apply_softhsm_env)."""
    # env: SoftHSM2's own variable, the configuration the PKCS#11 library itself reads (not a setting of ours)
    env = os.environ.get("SOFTHSM2_CONF")
    if env:
        return Path(env)
    own = settings.softhsm_dir / "softhsm2.conf"
    return own if own.exists() else DEFAULT_SOFTHSM_CONF


def conf_tokendir(conf: Path) -> Path | None:
    if not conf.exists():
        return None
    for line in conf.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "directories.tokendir" and value.strip():
            return Path(value.strip())
    return None


def sqlite_path(db_url: str) -> Path:
    # sqlite:///relative or sqlite:////absolute (SQLAlchemy URL form)
    if not db_url.startswith("sqlite:///"):
        raise BackupError(f"not a file-backed SQLite URL: {db_url.split(':', 1)[0]}:…")
    return Path(db_url[len("sqlite:///"):].split("?", 1)[0])


def db_kind(db_url: str) -> str:
    if db_url.startswith("sqlite"):
        return "sqlite"
    if db_url.startswith(("postgresql", "postgres")):
        return "postgresql"
    raise BackupError(f"unsupported database {db_url.split(':', 1)[0]!r}")


# -- inventory of the database ------------------------------------------------------------------------------


def db_inventory(db_url: str) -> dict[str, Any]:
    """Schema revision, row counts and the key labels the database refers to (active CAs, valid service certs)."""
    from hsm.uri import key_label

    inv = store.inventory(db_url)
    ca_keys = [key_label(u) for u in inv.ca_key_uris]
    return {"alembic_revision": inv.alembic_revision, "counts": inv.counts,
            "keys": sorted(set(ca_keys) | set(_labels(inv.certificate_key_uris)))}


def _labels(uris: list[str]) -> list[str]:
    from hsm.uri import Pkcs11Uri

    out = []
    for u in uris:
        try:
            out.append(Pkcs11Uri.parse(u).object)
        except ValueError:
            continue  # soft:label (tests) or another scheme: not a token object
    return out


def _token_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_token_dir(src: Path, dst: Path, attempts: int = 3) -> int:
    """Copy SoftHSM2's token directory; retry if it changed while being copied, then refuse."""
    for _ in range(attempts):
        before = _token_snapshot(src)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        if _token_snapshot(src) == before:
            return len(before)
    raise BackupError(f"the token directory {src} kept changing while it was copied: stop the API and the "
                      "workers (key generation, renewals) and run the backup again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- backup -------------------------------------------------------------------------------------------------


@dataclass
class BackupResult:
    path: Path
    manifest: dict[str, Any]


def backup(settings: Settings, out: Path, *, include_token: bool = True,
           progress: Callable[[str], None] = lambda _m: None) -> BackupResult:
    db_url = settings.db_url
    kind = db_kind(db_url)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".v2gpki-backup-", dir=out.parent) as tmp:
        stage = Path(tmp)
        os.chmod(stage, 0o700)
        (stage / "database").mkdir()
        # 1. the database (before the token: see module docstring)
        if kind == "sqlite":
            src = sqlite_path(db_url)
            if not src.exists():
                raise BackupError(f"no database at {src}: nothing to back up")
            member = SQLITE_MEMBER
            progress(f"database: SQLite online backup of {src}")
            store.sqlite_copy(src, stage / member)
        else:
            member = PGDUMP_MEMBER
            progress("database: pg_dump --format=custom")
            store.pg_dump(db_url, stage / member)
        inv = db_inventory(f"sqlite:///{stage / member}" if kind == "sqlite" else db_url)
        # 2. the token
        token: dict[str, Any]
        if settings.keystore == "soft":
            token = {"kind": "none", "note": "software key store (development): keys were in memory"}
        elif is_softhsm(settings) and include_token:
            conf = softhsm_conf(settings)
            tdir = conf_tokendir(conf)
            if tdir is None or not tdir.is_dir():
                raise BackupError(f"cannot find the SoftHSM2 token directory (config {conf}); "
                                  "use --no-token and back the token up by hand")
            progress(f"token: copying {tdir}")
            n = copy_token_dir(tdir, stage / "token")
            token = {"kind": "softhsm2-directory", "label": settings.token_label, "files": n,
                     "module": settings.pkcs11_module}
        else:
            token = {"kind": "external", "label": settings.token_label, "module": settings.pkcs11_module,
                     "note": "keys stay in the HSM: back them up with the HSM's own procedure"}
        members: dict[str, str] = {}
        for p in sorted(stage.rglob("*")):
            if p.is_file():
                os.chmod(p, 0o600)
                members[str(p.relative_to(stage))] = _sha256(p)
        manifest = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "v2gpki_version": _version(),
            "database": {"kind": kind, "member": member, **{k: inv[k] for k in ("alembic_revision", "counts")}},
            "token": token,
            "keys": inv["keys"],
            "members": members,
        }
        part = out.with_name(out.name + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(data), 0o600, int(datetime.now(UTC).timestamp())
            tar.addfile(info, io.BytesIO(data))
            for name in members:
                tar.add(stage / name, arcname=name, recursive=False)
        os.replace(part, out)
    progress(f"wrote {out}")
    return BackupResult(out, manifest)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("v2gpki")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


# -- restore ------------------------------------------------------------------------------------------------


def read_manifest(archive: Path) -> dict[str, Any]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            fh = tar.extractfile(MANIFEST)
            if fh is None:
                raise BackupError(f"{archive} has no {MANIFEST}: not a v2gpki backup")
            manifest: dict[str, Any] = json.loads(fh.read())
    except (tarfile.TarError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise BackupError(f"{archive} is not a readable v2gpki backup ({type(exc).__name__})") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: unknown backup format {manifest.get('format')!r}")
    return manifest


def extract_verified(archive: Path, manifest: dict[str, Any], dest: Path) -> None:
    """Extract every member into dest and check it against the manifest's sha256 (no member outside it)."""
    expected: dict[str, str] = manifest["members"]
    seen: set[str] = set()
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if m.name == MANIFEST:
                continue
            if not m.isfile() or m.name not in expected:
                raise BackupError(f"{archive}: unexpected member {m.name!r} (not in the manifest)")
            # Written by hand rather than tar.extract(filter="data"): that filter exists only from Python
            # 3.11.4, and Debian bookworm ships 3.11.2. Regular files only (checked above), a relative
            # name inside dest, mode 0600 — what the "data" filter would have enforced.
            rel = Path(m.name)
            if rel.is_absolute() or ".." in rel.parts:
                raise BackupError(f"{archive}: member {m.name!r} points outside the archive")
            src = tar.extractfile(m)
            if src is None:
                raise BackupError(f"{archive}: member {m.name!r} has no content")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
                shutil.copyfileobj(src, out)
            seen.add(m.name)
    missing = set(expected) - seen
    if missing:
        raise BackupError(f"{archive}: members missing: {', '.join(sorted(missing))}")
    for name, digest in expected.items():
        if _sha256(dest / name) != digest:
            raise BackupError(f"{archive}: checksum mismatch for {name}: the archive is damaged or altered")


@dataclass
class RestorePlan:
    archive: Path
    manifest: dict[str, Any]
    db_target: str
    token_target: Path | None
    conf_to_write: Path | None
    problems: list[str] = field(default_factory=list)  # refusals (without --force)

    def describe(self) -> list[str]:
        m = self.manifest
        d = m["database"]
        lines = [
            f"archive {self.archive} made {m['created_at']} by v2gpki {m['v2gpki_version']}",
            f"database: {d['kind']} (schema {d['alembic_revision']}; {d['counts']['ca']} CAs, "
            f"{d['counts']['certificate']} certificates, {d['counts']['revoked']} revoked/held) -> {self.db_target}",
        ]
        t = m["token"]
        if t["kind"] == "softhsm2-directory":
            lines.append(f"token: SoftHSM2 directory ({t['files']} files, label {t['label']!r}) -> {self.token_target}")
        else:
            lines.append(f"token: {t['kind']} ({t.get('note', '')}); keys checked in the configured HSM")
        lines.append(f"keys the database needs: {len(m['keys'])}")
        return lines


def _masked(db_url: str) -> str:
    return url_without_password(db_url) if "://" in db_url else db_url


def plan_restore(settings: Settings, archive: Path, *, include_token: bool = True) -> RestorePlan:
    manifest = read_manifest(archive)
    target_kind = db_kind(settings.db_url)
    if manifest["database"]["kind"] != target_kind:
        raise BackupError(f"the archive holds a {manifest['database']['kind']} database but "
                          f"V2GPKI_DATABASE_URL is {target_kind}: restore into the same kind of database")
    _check_revision(manifest["database"]["alembic_revision"])
    problems: list[str] = []
    if target_kind == "sqlite":
        p = sqlite_path(settings.db_url)
        if p.exists() and p.stat().st_size > 0:
            problems.append(f"the database {p} exists")
    elif store.pg_has_tables(settings.db_url):
        problems.append(f"the database {_masked(settings.db_url)} is not empty")
    token_target: Path | None = None
    conf_to_write: Path | None = None
    if manifest["token"]["kind"] == "softhsm2-directory" and include_token:
        if not is_softhsm(settings):
            raise BackupError("the archive holds a SoftHSM2 token but V2GPKI_PKCS11_MODULE is another HSM: "
                              "restore with --no-token and import keys with the HSM's own tools")
        # The operator's SOFTHSM2_CONF, else the data directory's own token (written if absent) — never
        # SoftHSM's system-wide default directory, which other software on the host may share.
        # env: SoftHSM2's own variable (see softhsm_conf)
        env_conf = os.environ.get("SOFTHSM2_CONF")
        conf = Path(env_conf) if env_conf else settings.softhsm_dir / "softhsm2.conf"
        token_target = conf_tokendir(conf)
        if token_target is None:
            if env_conf:
                raise BackupError(f"SOFTHSM2_CONF={conf} has no directories.tokendir")
            conf_to_write = conf
            token_target = settings.softhsm_dir / "tokens"
        if token_target.exists() and any(token_target.iterdir()):
            problems.append(f"the token directory {token_target} is not empty")
    return RestorePlan(archive, manifest, _masked(settings.db_url), token_target, conf_to_write, problems)


def _check_revision(rev: str | None) -> None:
    if rev is not None and rev not in store.known_revisions():
        raise BackupError(f"the backup's schema revision {rev!r} is unknown to this v2gpki: restore with the "
                          "version that made it (or a newer one)")


@dataclass
class RestoreResult:
    moved_aside: list[Path]
    keys_checked: int
    keys_missing: list[str]
    keys_elsewhere: list[str]


def restore(settings: Settings, plan: RestorePlan, *, force: bool = False,
            progress: Callable[[str], None] = lambda _m: None) -> RestoreResult:
    if plan.problems and not force:
        raise BackupError("refusing to overwrite: " + "; ".join(plan.problems) + " (add --force to replace; "
                          "SQLite files and token directories are moved aside, PostgreSQL objects are dropped)")
    if settings.keystore == "pkcs11":
        settings.pin()  # fail before writing anything if the restored token could not be opened
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    moved: list[Path] = []
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".v2gpki-restore-", dir=settings.home_dir) as tmp:
        stage = Path(tmp)
        os.chmod(stage, 0o700)
        extract_verified(plan.archive, plan.manifest, stage)
        progress("archive verified (every checksum matches)")
        member = plan.manifest["database"]["member"]
        if plan.manifest["database"]["kind"] == "sqlite":
            target = sqlite_path(settings.db_url)
            target.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(target) + suffix)
                if p.exists():
                    aside = Path(f"{p}.pre-restore-{stamp}")
                    os.replace(p, aside)
                    moved.append(aside)
            store.sqlite_copy(stage / member, target)
            os.chmod(target, 0o600)
        else:
            store.pg_restore(settings.db_url, stage / member, clean=force)
        progress(f"database restored into {plan.db_target}")
        if plan.token_target is not None:
            tdir = plan.token_target
            if tdir.exists() and any(tdir.iterdir()):
                aside = tdir.with_name(f"{tdir.name}.pre-restore-{stamp}")
                shutil.copytree(tdir, aside)  # keep the directory itself (owner, mode) in place
                for child in list(tdir.iterdir()):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
                moved.append(aside)
            if not tdir.exists():
                tdir.mkdir(parents=True, mode=0o700)
            shutil.copytree(stage / "token", tdir, dirs_exist_ok=True)
            for p in tdir.rglob("*"):
                os.chmod(p, 0o700 if p.is_dir() else 0o600)
            if plan.conf_to_write is not None:
                plan.conf_to_write.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(plan.conf_to_write.parent, 0o700)
                plan.conf_to_write.write_text(
                    f"directories.tokendir = {tdir}\nobjectstore.backend = file\nlog.level = ERROR\n"
                    "slots.removable = false\n")
            progress(f"token restored into {tdir}")
    checked, missing, elsewhere = verify_keys(settings, plan.manifest["keys"])
    return RestoreResult(moved, checked, missing, elsewhere)


def verify_keys(settings: Settings, labels: list[str]) -> tuple[int, list[str], list[str]]:
    """Open the restored instance (migrating it to head) and check every key it needs is in the token."""
    from pki.wiring import build_context

    ctx = build_context(settings, migrate=True)
    if settings.keystore == "soft":
        ctx.db.dispose()
        return 0, [], []  # development only: the software store's keys died with its process
    try:
        missing = [lb for lb in labels if not ctx.keystore.has_key(lb)]
        if missing:
            # Keys of another token (the OCSP responder's own) are reported, not failed, when their URI says so.
            elsewhere = _other_token(ctx, missing)
            missing = [lb for lb in missing if lb not in elsewhere]
        else:
            elsewhere = []
        return len(labels), missing, elsewhere
    finally:
        ctx.db.dispose()


def _other_token(ctx: Any, labels: list[str]) -> list[str]:
    from hsm.uri import Pkcs11Uri

    out = set()
    for uri in store.certificate_key_uris(ctx.db):
        try:
            u = Pkcs11Uri.parse(uri)
        except ValueError:
            continue
        if u.object in labels and u.token != ctx.settings.token_label:
            out.add(u.object)
    return sorted(out)


def raise_if_missing(result: RestoreResult) -> None:
    if result.keys_missing:
        raise ConfigError(f"the restored database needs {len(result.keys_missing)} keys the token does not hold: "
                          + ", ".join(result.keys_missing[:10]) + (" …" if len(result.keys_missing) > 10 else ""))
