"""The composition root: the one place that builds a process's Context and connects its parts.

settings → database → key store → profiles → lifecycle policy → collaborators → engine(s) → Context.

Everything that happens around an issuance or a revocation is listed here, in the order it happens,
in :func:`issuance_observers` and :func:`revocation_observers` (the protocol is pki/observers.py). The
engine is given those tuples at construction; no module appends to them later, patches the engine or
the key store, or keeps a registry keyed by the engine. Entry points (CLI, API, workers, the OCSP
responder) call :func:`build_context`; nothing under pki/ imports this module, so it may import them all.
"""

from __future__ import annotations

import logging

from cryptography import x509

from hsm.keystore import KeyStore
from pki.clock import ClockGuard
from pki.config import Settings
from pki.context import Context
from pki.cps.service import CpsCacheOnRevocation
from pki.crl import CrlCache, CrlScheduler
from pki.errors import ConfigError
from pki.hardening import ensure_private_dir
from pki.issuance import Engine
from pki.lifecycle_policy import Lifecycle, LifecycleSettings, load_policy
from pki.metrics import HsmSignTimer, IssuanceCounter, RevocationCounter, clock_measured, clock_refused
from pki.observers import Deferred, IssuanceObserver, Issued, RevocationObserver
from pki.ocsp.responder import OcspResponder
from pki.outbox import Dispatcher, OutboxOnIssuance, OutboxOnRevocation
from pki.profiles import ProfileSet, load_profiles
from pki.store.db import Database
from pki.store.models import Certificate

log = logging.getLogger("v2gpki.wiring")


def open_keystore(settings: Settings) -> KeyStore:
    """The key store the settings name; PKCS#11 signatures are timed for /metrics (pki/metrics.py)."""
    if settings.keystore == "soft":
        if settings.env == "production":
            raise ConfigError("V2GPKI_KEYSTORE=soft keeps keys in memory: refused in production")
        from hsm.soft import SoftKeyStore

        return SoftKeyStore()
    settings.apply_softhsm_env()
    from hsm.pkcs11 import Pkcs11KeyStore

    return Pkcs11KeyStore(settings.pkcs11_module, settings.token_label, settings.pin(),
                          sign_observer=HsmSignTimer())


# -- what happens around an issuance and a revocation -------------------------------------------------------


def issuance_observers(ocsp: OcspResponder, outbox: Dispatcher, profiles: ProfileSet
                       ) -> tuple[IssuanceObserver, ...]:
    """Inside the issuing transaction (before its commit, which the certificate rows travel with), then
    after it commits:"""
    return (
        # 1. OCSP (RFC 6960): after commit, queue the new certificates' responses for pre-signing (a
        #    background thread), so the first status request finds one; a new CA or OCSP signer changes
        #    the responder's issuer table, which is reloaded.
        OcspOnIssuance(ocsp),
        # 2. Outbox: a new CA certificate writes a `ca.changed` event in the transaction (trust lists and
        #    station trust stores follow it), and the dispatcher is kicked after commit.
        OutboxOnIssuance(profiles, outbox),
        # 3. Metrics: v2gpki_certificates_issued, counted after commit only.
        IssuanceCounter(),
    )


def revocation_observers(ctx: Deferred[Context], ocsp: OcspResponder, outbox: Dispatcher
                         ) -> tuple[RevocationObserver, ...]:
    """After the status is updated, in the revoking transaction, then after it commits (a released hold
    gets the after-commit calls only):"""
    return (
        # 1. OCSP: re-sign the certificate's response at once, so the responder says revoked (or good
        #    again) before the call returns.
        OcspOnRevocation(ocsp),
        # 2. CRL (RFC 5280 §5): mark the issuer's CRL for regeneration in the background (coalesced);
        #    not in a responder-only process, which holds no CA key.
        CrlOnRevocation(ctx),
        # 3. Outbox: a `revocation` event (webhooks, e-mail) and, for a CA, `ca.changed`, written in the
        #    transaction; the dispatcher is kicked after commit.
        OutboxOnRevocation(outbox),
        # 4. CPS: drop this process's cached CPS leaves and chains (unless an MO CA issued the certificate).
        CpsCacheOnRevocation(ctx),
        # 5. Metrics: v2gpki_certificates_revoked, counted once the transaction committed (a commit
        #    callback, so bulk revocation, which calls only in_transaction, is counted too).
        RevocationCounter(),
    )


class OcspOnIssuance:
    def __init__(self, ocsp: OcspResponder) -> None:
        self.ocsp = ocsp

    def in_transaction(self, session: object, issued: list[Issued]) -> None:
        pass

    def after_commit(self, issued: list[Issued]) -> None:
        try:
            r = self.ocsp
            if any(i.profile.startswith("ocsp-signer") or i.cert.extensions.get_extension_for_class(
                    x509.BasicConstraints).value.ca for i in issued):
                r.invalidate()  # a new CA or OCSP signer: the issuer table changes
            r.presigner.submit((i.issuer, i.serial) for i in issued)
        except Exception:  # noqa: BLE001 - issuance stands; refresh() or the next request re-signs
            log.warning("pre-signing OCSP responses after issuance failed", exc_info=True)


class OcspOnRevocation:
    def __init__(self, ocsp: OcspResponder) -> None:
        self.ocsp = ocsp

    def in_transaction(self, session: object, cert: Certificate) -> None:
        pass

    def after_commit(self, cert: Certificate) -> None:
        try:
            if cert.status == "revoked":
                # Terminal (RFC 5280 §5.3.1: a revoked certificate never becomes valid again): sign the state
                # this transaction committed, without reading it back.
                self.ocsp.presign_known(cert.issuer, [(cert.serial, "revoked", cert.revoked_at,
                                                       cert.revocation_reason)])
            else:  # a hold or its release can change again: sign what the database says now
                self.ocsp.presign(cert.issuer, [cert.serial])
        except Exception:  # noqa: BLE001 - the responder re-signs on the next request (status check)
            log.warning("re-signing the OCSP response of %s/%s failed", cert.issuer, cert.serial, exc_info=True)


class CrlOnRevocation:
    def __init__(self, ctx: Deferred[Context]) -> None:
        self.ctx = ctx

    def in_transaction(self, session: object, cert: Certificate) -> None:
        pass

    def after_commit(self, cert: Certificate) -> None:
        ctx = self.ctx.get()
        if ctx.responder_only:
            return
        try:
            ctx.crl_scheduler.mark(cert.issuer)
        except Exception:  # noqa: BLE001 - the periodic CRL refresh catches up
            log.warning("scheduling the CRL of %s failed", cert.issuer, exc_info=True)


# -- the root -----------------------------------------------------------------------------------------------


def build_context(settings: Settings | None = None, *, keystore: KeyStore | None = None,
                  migrate: bool = True, responder_only: bool = False) -> Context:
    """Build this process's Context. ``keystore``: use this one (tests) instead of opening the
    settings' (it is used as given: no signature timing). ``responder_only``: the standalone OCSP/CRL
    responder's, whose engine refuses to load a CA key."""
    settings = settings or Settings()
    settings.validate_production()  # V2GPKI_ENV=production refuses insecure defaults, before touching anything
    ensure_private_dir(settings.home_dir)  # 0700 (#21 item 11)
    profiles = load_profiles(settings.policies_dir)  # fail fast on bad policies
    lc_settings = LifecycleSettings.from_settings(settings)
    policy, extra = load_policy(lc_settings.lifecycle_file or (settings.policies_dir / "lifecycle.yaml"),
                                profiles)  # fail fast too
    db = Database(settings.db_url)
    if migrate:
        db.migrate()
    ks = keystore if keystore is not None else open_keystore(settings)

    ctx_ref: Deferred[Context] = Deferred()
    outbox = Dispatcher(db)  # idle until the process starts it with a sender (workers/outbox.py install)
    ocsp = OcspResponder(db, ks, settings)  # delegated OCSP signers only (RFC 6960 §4.2.2.2)
    lc_profiles = ProfileSet({**profiles.profiles, **extra})
    on_issue = issuance_observers(ocsp, outbox, lc_profiles)
    on_revoke = revocation_observers(ctx_ref, ocsp, outbox)
    clock_guard = None
    if settings.max_clock_skew_seconds > 0:
        # Compared with the database server's clock now (a skewed host is logged at start) and then at
        # most every V2GPKI_CLOCK_CHECK_SECONDS on the signing path (#27 item 4). SQLite: nothing to compare.
        clock_guard = ClockGuard(db, max_skew=settings.max_clock_skew_seconds, interval=settings.clock_check_seconds,
                                 on_measure=(clock_measured,), on_refuse=(clock_refused,))
        clock_guard.current()
    engine = Engine(db, ks, profiles, settings.public_base(), pkilint_mode=settings.pkilint,
                    issuance_observers=on_issue, revocation_observers=on_revoke, clock_guard=clock_guard,
                    ca_keys=not responder_only)
    # The lifecycle's engine also knows policies/lifecycle.yaml's profiles (trust-list signer, root
    # cross-certificates); what it issues and revokes is observed exactly like the main engine's.
    lc_engine = Engine(db, ks, lc_profiles, settings.public_base(), pkilint_mode=settings.pkilint,
                       issuance_observers=on_issue, revocation_observers=on_revoke, ca_keys=not responder_only)
    ctx = Context(settings, db, ks, profiles, engine, lifecycle=Lifecycle(policy, lc_settings, lc_engine, extra),
                  outbox=outbox, ocsp=ocsp,
                  # The responder-only process serves stored CRLs; it holds no CA key to make one.
                  crl_cache=CrlCache(ctx_ref.get, may_generate=not responder_only),
                  crl_scheduler=CrlScheduler(ctx_ref.get, min_interval=settings.crl_min_interval_seconds),
                  responder_only=responder_only)
    ctx_ref.set(ctx)
    return ctx


__all__ = ["build_context", "issuance_observers", "open_keystore", "revocation_observers"]
