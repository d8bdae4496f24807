"""Wiring: settings → database, key store, profiles, engine. One Context per process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hsm.keystore import KeyStore
from pki.config import Settings
from pki.errors import ConfigError
from pki.issuance import Engine
from pki.profiles import Hierarchy, ProfileSet, load_hierarchy, load_profiles
from pki.store.db import Database


def open_keystore(settings: Settings) -> KeyStore:
    if settings.keystore == "soft":
        if settings.env == "production":
            raise ConfigError("V2GPKI_KEYSTORE=soft keeps keys in memory: refused in production")
        from hsm.soft import SoftKeyStore

        return SoftKeyStore()
    settings.apply_softhsm_env()
    from hsm.pkcs11 import Pkcs11KeyStore

    return Pkcs11KeyStore(settings.pkcs11_module, settings.token_label, settings.pin())


@dataclass
class Context:
    settings: Settings
    db: Database
    keystore: KeyStore
    profiles: ProfileSet
    engine: Engine

    def hierarchy(self, path: Path | None = None) -> Hierarchy:
        p = path or self.settings.hierarchy_file or (self.settings.policies_dir / "hierarchy.yaml")
        return load_hierarchy(p, self.profiles)


def build_context(settings: Settings | None = None, *, keystore: KeyStore | None = None,
                  migrate: bool = True) -> Context:
    settings = settings or Settings()
    settings.validate_production()  # V2GPKI_ENV=production refuses insecure defaults, before touching anything
    from pki.hardening import ensure_private_dir

    ensure_private_dir(settings.home_dir)  # 0700 (#21 item 11)
    profiles = load_profiles(settings.policies_dir)  # fail fast on bad policies
    db = Database(settings.db_url)
    if migrate:
        db.migrate()
    ks = keystore if keystore is not None else open_keystore(settings)
    engine = Engine(db, ks, profiles, settings.public_base(), pkilint_mode=settings.pkilint)
    if settings.max_clock_skew_seconds > 0:
        from pki.clock import ClockGuard

        # Compared with the database server's clock now (a skewed host is logged at start) and then at
        # most every V2GPKI_CLOCK_CHECK_SECONDS on the signing path (#27 item 4). SQLite: nothing to compare.
        engine.clock_guard = ClockGuard(db, max_skew=settings.max_clock_skew_seconds,
                                        interval=settings.clock_check_seconds)
        engine.clock_guard.current()
    ctx = Context(settings, db, ks, profiles, engine)
    from pki.ocsp import install_hooks  # OCSP pre-signing and CRL regeneration, after commit

    install_hooks(ctx)
    from pki.lifecycle import install_hooks as lifecycle_hooks  # outbox rows in the issuing transaction

    lifecycle_hooks(ctx)  # also validates policies/lifecycle.yaml (fail fast)
    return ctx
