"""The OCSP responder: issuer table, signing, pre-signing and answering; one per Context."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from hsm.algorithms import key_alg_of
from hsm.errors import HSMError
from hsm.keystore import PrivateKey, certified_signer
from pki.der import spki_key_bits
from pki.errors import MalformedOCSPRequest
from pki.ocsp.budget import SignBudget, _OverBudget
from pki.ocsp.presign import Presigner
from pki.ocsp.request import HASH_OIDS, CertIdReq, OcspRequest, certid_der, parse_request
from pki.ocsp.response import (
    INTERNAL_ERROR_ANSWER,
    MALFORMED_ANSWER,
    TRY_LATER_ANSWER,
    UNAUTHORIZED_ANSWER,
    Answer,
    basic_response,
    single_response,
)
from pki.ocsp.signers import _Issuer, _label_of, _Signer
from pki.ocsp.sources import _LRU, Chain, LiveSource, Query, StoredSource, fresh_until, is_fresh, wanted_status
from pki.store.db import utcnow
from pki.store.ocsp import DatabaseUnavailable, OcspStore

if TYPE_CHECKING:
    from hsm.keystore import KeyStore
    from pki.config import Settings
    from pki.store.db import Database

log = logging.getLogger("v2gpki.ocsp")



class OcspResponder:
    """One per Context (ctx.ocsp, built in pki/wiring.py; a forked child starts it afresh). Thread-safe."""

    RELOAD_SECONDS = 60.0  # pick up new CAs / renewed signers from other processes
    MISS_RELOAD_SECONDS = 5.0  # an unknown issuer may be a new CA, but never reload per garbage request

    def __init__(self, db: Database, keystore: KeyStore, settings: Settings) -> None:
        self.db = db
        self.keystore = keystore
        self.settings = settings
        self._init_state()
        ref = weakref.ref(self)

        def reset_in_child() -> None:
            # Never share possibly-held locks or connections with the parent (Celery prefork,
            # multiprocessing): the child starts from an empty state, as a new responder would.
            me = ref()
            if me is not None:
                me._init_state()

        os.register_at_fork(after_in_child=reset_in_child)

    def _init_state(self) -> None:
        self.validity = timedelta(hours=self.settings.ocsp_validity_hours)
        # A pre-signed response is served while at least half its validity is left, then re-signed
        # (CA/B BR §4.9.10 style: refresh well before nextUpdate; chargers refresh about weekly).
        self.margin = self.validity / 2
        self._lock = threading.Lock()
        self._by_hash: dict[tuple[str, bytes, bytes], _Issuer] = {}
        self._by_name: dict[str, _Issuer] = {}
        # Each delegated signer's key store signer once certified_signer checked it, by signer certificate.
        self._signer_keys: dict[bytes, PrivateKey] = {}
        self._loaded_at = -1e9
        self._miss_at = -1e9
        self._alt: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]] = _LRU(20_000)
        self._unknown: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]] = _LRU(10_000)
        self.store = OcspStore(self.db)  # pki/store/ocsp.py: every statement the responder runs
        self.presigner = Presigner(self)
        self._lookup = self.store.lookup
        # Where one-CertID answers come from (Boulder's Source chain): the stored pre-signed response, then a
        # live signature. ocsp-serve puts its in-memory source in front (api/ocsp_fast.py).
        self.stored = StoredSource(self._alt, self._unknown)
        self.live = LiveSource(self._sign_one, self._store_resigned, self._spend, certid_der, self._alt,
                               self._unknown)
        self.presigned_chain = Chain([self.stored])
        self.chain = Chain([self.stored, self.live])
        st = self.settings
        self.budget = SignBudget(st.ocsp_live_sign_rate, st.ocsp_live_sign_burst, st.ocsp_live_sign_total_rate)
        self._client = threading.local()  # the address the current request's live signatures are charged to

    # -- issuers -----------------------------------------------------------------------------------

    def reload(self) -> None:
        cas = self.store.issuers()
        signers = self.store.signers(utcnow())
        by_ca: dict[str, _Signer] = {}
        for issuer, der, key_uri, created_at in signers:
            # The signer is the certificate linked to its CA (certificate.ocsp_signer_for_ca_id), not a key
            # label convention; its key URI must name a key of our token.
            label = _label_of(key_uri)
            if label is None or key_uri != self.keystore.uri(label):
                continue
            cert = x509.load_der_x509_certificate(der)
            try:
                eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                continue
            if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                continue
            pub = cert.public_key()
            try:
                alg = key_alg_of(pub)
            except ValueError:
                continue  # not a key type of the algorithm table: never a signer of ours
            # ordered by issuance: the newest valid signer wins. Its `not_before` here is when it began to
            # sign (issuance, whole seconds): a response older than that was made by an earlier signer. The
            # certificate's notBefore is backdated (#27 item 4) and would keep those responses current.
            since = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
            by_ca[issuer] = _Signer(key_uri, alg, der, hashlib.sha1(spki_key_bits(cert)).digest(),  # noqa: S324
                                    max(cert.not_valid_before_utc, since.replace(microsecond=0)),
                                    cert.not_valid_after_utc)
        by_hash: dict[tuple[str, bytes, bytes], _Issuer] = {}
        by_name: dict[str, _Issuer] = {}
        for name, der in cas:
            cert = x509.load_der_x509_certificate(der)
            name_der = cert.subject.public_bytes()
            key_bits = spki_key_bits(cert)
            hs = {h: (hashlib.new(h, name_der).digest(), hashlib.new(h, key_bits).digest()) for h in HASH_OIDS}
            iss = _Issuer(name, hs, by_ca.get(name))
            by_name[name] = iss
            for h, (nh, kh) in hs.items():
                by_hash[(h, nh, kh)] = iss
        with self._lock:
            self._by_hash, self._by_name = by_hash, by_name
            current = {s.cert_der for s in by_ca.values()}
            for der in [d for d in self._signer_keys if d not in current]:
                self._signer_keys.pop(der, None)  # a signer replaced or gone: its key too
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = -1e9

    def _fresh(self) -> None:
        if time.monotonic() - self._loaded_at > self.RELOAD_SECONDS:
            self.reload()

    def issuer(self, name: str) -> _Issuer | None:
        self._fresh()
        iss = self._by_name.get(name)
        if iss is None and time.monotonic() - self._miss_at > self.MISS_RELOAD_SECONDS:
            self._miss_at = time.monotonic()
            self.reload()
            iss = self._by_name.get(name)
        return iss

    def _issuer_for(self, alg: str | None, name_hash: bytes, key_hash: bytes) -> _Issuer | None:
        if alg is None:
            return None
        self._fresh()
        iss = self._by_hash.get((alg, name_hash, key_hash))
        if iss is None and time.monotonic() - self._miss_at > self.MISS_RELOAD_SECONDS:
            self._miss_at = time.monotonic()
            self.reload()
            iss = self._by_hash.get((alg, name_hash, key_hash))
        return iss

    def issuer_names(self) -> list[str]:
        self._fresh()
        return sorted(self._by_name)

    # -- signing -----------------------------------------------------------------------------------

    def _key(self, signer: _Signer) -> PrivateKey:
        key = self._signer_keys.get(signer.cert_der)
        if key is None:
            # The token key must be the one the delegated signer's certificate names; its signer then verifies
            # every response signature with it before the response is stored or sent (hsm/pkcs11.py).
            certified = x509.load_der_x509_certificate(signer.cert_der).public_key()
            key = self._signer_keys[signer.cert_der] = certified_signer(
                self.keystore, signer.key_uri, certified, "its OCSP signer certificate")  # type: ignore[arg-type]
        return key

    def _times(self, signer: _Signer, now: datetime) -> tuple[datetime, datetime]:
        # A response must not outlive the certificate that signs it.
        return now, min(now + self.validity, signer.not_after)

    def _sign(self, signer: _Signer, singles: Sequence[bytes], produced_at: datetime,
              nonce_ext_value: bytes | None = None) -> bytes:
        return basic_response(self._key(signer), signer.alg, signer.key_hash, signer.cert_der, singles,
                              produced_at, nonce_ext_value)

    def _sign_one(self, iss: _Issuer, certid: bytes, status: str, revoked_at: datetime | None,
                  reason: str | None) -> tuple[bytes, datetime, datetime]:
        assert iss.signer is not None
        now = utcnow()
        this, nxt = self._times(iss.signer, now)
        der = self._sign(iss.signer, [single_response(certid, status, revoked_at, reason, this, nxt)], now)
        return der, this, nxt

    # -- pre-signing -------------------------------------------------------------------------------

    def presign(self, issuer: str, serials: Iterable[str]) -> int:
        """(Re-)sign and store the SHA-1-CertID response of each certificate. Returns how many."""
        iss = self.issuer(issuer)
        if iss is None or iss.signer is None:
            return 0
        todo = list(serials)
        done = 0
        for i in range(0, len(todo), 500):
            rows = self.store.statuses(issuer, todo[i : i + 500])
            done += self._store(iss, [(r[0], wanted_status(r[1]), r[2], r[3]) for r in rows])
        return done

    def presign_known(self, issuer: str, rows: Sequence[tuple[str, str, datetime | None, str | None]]) -> int:
        """(Re-)sign and store responses for states the caller has just committed: (serial, OCSP status,
        revoked_at, reason) each. Only for a final state (revoked), which no later change can overtake."""
        iss = self.issuer(issuer)
        if iss is None or iss.signer is None:
            return 0
        return self._store(iss, rows)

    def presign_new(self, issuer: str, serials: Sequence[str]) -> int:
        """Sign 'good' for certificates just issued (no status query: they were issued valid) and store
        them insert-only, so a revocation that got there first is never overwritten (see Presigner)."""
        iss = self.issuer(issuer)
        if iss is None or iss.signer is None:
            return 0
        return self._store(iss, [(s, "good", None, None) for s in serials], insert_only=True)

    def _store(self, iss: _Issuer, rows: Sequence[tuple[str, str, datetime | None, str | None]], *,
               insert_only: bool = False) -> int:
        nh, kh = iss.hashes["sha1"]
        values = []
        for serial_hex, status, revoked_at, reason in rows:
            der, this, nxt = self._sign_one(iss, certid_der("sha1", nh, kh, int(serial_hex, 16)),
                                            status, revoked_at, reason)
            values.append({"issuer": iss.name, "serial": serial_hex, "hash_alg": "sha1", "status": status,
                           "this_update": this, "next_update": nxt, "der": der})
        if values:
            self.store.store(values, insert_only=insert_only)
        return len(values)

    def refresh(self, *, margin: timedelta | None = None, batch: int = 500, full: bool = False) -> int:
        """Re-sign stored responses that are missing, stale (less than ``margin`` left; default half
        the validity), out of step with the certificate's status, or made by a replaced signer. For a
        periodic worker (RFC 5019 §4: responses are produced ahead of requests).

        Every candidate is found by index (#28, migration 0008; pki/store/ocsp.py refresh_candidates), so the
        work grows with what is due, not with the number of certificates; certificates issued more than
        OcspStore.MISSING_LOOKBACK ago without a response are signed on their first request, or here with
        ``full=True`` (reads each CA's certificates). Whether a response is due: :func:`fresh_until`."""
        self.reload()
        now = utcnow()
        horizon = now + (self.margin if margin is None else margin)
        total = 0
        issuers = {name: iss for name, iss in self._by_name.items() if iss.signer is not None}
        if not issuers:
            return 0
        oldest_signer = max(iss.signer.not_before for iss in issuers.values() if iss.signer is not None)
        candidates = self.store.refresh_candidates(list(issuers), horizon=horizon, oldest_signer=oldest_signer,
                                                   now=now, full=full)
        for name, iss in issuers.items():
            assert iss.signer is not None
            wanted = list(candidates[name])
            for i in range(0, len(wanted), batch):
                due = []
                for serial, st, rev_at, reason, o_st, o_this, o_next in self.store.refresh_rows(
                        name, wanted[i : i + batch], now):
                    want = wanted_status(st)
                    until = fresh_until(stored_status=o_st, this_update=o_this, next_update=o_next, want=want,
                                        revoked_at=rev_at, signer_since=iss.signer.not_before,
                                        margin=horizon - now)
                    if not is_fresh(until, now):
                        due.append((serial, want, rev_at, reason))
                if due:
                    total += self._store(iss, due)
        # Responses of expired certificates are not renewed; once past their nextUpdate they are dead
        # weight (a late request for such a certificate is signed live).
        self.store.delete_expired(now)
        return total

    # -- answering ---------------------------------------------------------------------------------

    def respond(self, der: bytes, client: str | None = None) -> Answer:
        """Answer a DER OCSPRequest. Never raises: every failure is an OCSP error response.

        ``client`` (the peer address of an unauthenticated HTTP request) is charged for the live
        signatures the answer needs (:class:`SignBudget`). Over its budget, a request with a nonce gets the
        pre-signed answer without the nonce (RFC 8954 §2.1 / RFC 5019 §2.1 let a responder ignore the
        nonce) and anything else that would need a new signature gets tryLater."""
        try:
            req = parse_request(der)
        except MalformedOCSPRequest:
            return MALFORMED_ANSWER
        self._client.value = client
        try:
            return self._guarded(lambda: self._respond(req))
        finally:
            self._client.value = None

    def _spend(self) -> None:
        """Charge one live signature to the current request's client; _OverBudget when it has none left."""
        if not self.budget.take(getattr(self._client, "value", None)):
            raise _OverBudget()

    def respond_presigned(self, der: bytes) -> Answer | None:
        """The answer when it needs no signature: a pre-signed response (or a cached one), or an error
        answer. None when the HSM is needed (a nonce, several CertIDs, a missing or stale response) or
        the database failed: then call :meth:`respond`, off the event loop.

        This is the hot path of RFC 5019 traffic: parse, one indexed lookup, bytes. It is cheap enough
        (tens of microseconds, no PKCS#11 call) to run on the event loop, which saves the thread-pool
        hop that costs several times as much."""
        try:
            req = parse_request(der)
        except MalformedOCSPRequest:
            return MALFORMED_ANSWER
        if len(req.cert_ids) != 1 or req.nonce_ext_value is not None:
            return None
        cid = req.cert_ids[0]
        try:
            iss = self._issuer_for(cid.hash_alg, cid.name_hash, cid.key_hash)
            if iss is None or iss.signer is None:
                return UNAUTHORIZED_ANSWER
            assert cid.hash_alg is not None
            return self._cached(iss, cid.hash_alg, cid.raw, cid.serial, sign=False)
        except Exception:  # noqa: BLE001 - respond() will try again and map the error (tryLater, ...)
            return None

    def _guarded(self, fn: Any) -> Answer:
        try:
            ans: Answer = fn()
            return ans
        except _OverBudget:
            return TRY_LATER_ANSWER
        except (HSMError, DatabaseUnavailable) as exc:
            # RFC 6960 §2.3 tryLater: the responder is temporarily unable to answer.
            log.warning("OCSP answer deferred: %s", type(exc).__name__)
            return TRY_LATER_ANSWER
        except Exception:
            log.exception("OCSP responder error")
            return INTERNAL_ERROR_ANSWER

    def _respond(self, req: OcspRequest) -> Answer:
        resolved = [(cid, self._issuer_for(cid.hash_alg, cid.name_hash, cid.key_hash)) for cid in req.cert_ids]
        primary = next((iss for _, iss in resolved if iss is not None and iss.signer is not None), None)
        if primary is None:
            return UNAUTHORIZED_ANSWER
        if len(resolved) == 1 and req.nonce_ext_value is None:
            cid = req.cert_ids[0]
            assert cid.hash_alg is not None
            ans = self._cached(primary, cid.hash_alg, cid.raw, cid.serial)
            assert ans is not None
            return ans
        try:
            self._spend()
        except _OverBudget:
            if len(resolved) != 1 or resolved[0][1] is not primary:
                raise
            # One CertID with a nonce, over budget: the answer without the nonce, pre-signed (or a signature
            # the budget would allow anyway: a stale stored response), never a new live signature.
            cid = req.cert_ids[0]
            assert cid.hash_alg is not None
            ans = self._cached(primary, cid.hash_alg, cid.raw, cid.serial)
            assert ans is not None
            return ans
        return self._live(primary, resolved, req.nonce_ext_value)

    def _status(self, issuer: str, serial: int) -> tuple[str, datetime | None, str | None] | None:
        if serial <= 0:
            return None
        row = self.store.status(issuer, format(serial, "x"))
        if row is None:
            return None
        return wanted_status(row[0]), row[1], row[2]

    def _live(self, primary: _Issuer, resolved: list[tuple[CertIdReq, _Issuer | None]],
              nonce: bytes | None) -> Answer:
        assert primary.signer is not None
        now = utcnow()
        this, nxt = self._times(primary.signer, now)
        singles = []
        statuses = []
        for cid, iss in resolved:
            st = None
            if iss is not None and iss.name == primary.name:
                st = self._status(iss.name, cid.serial)
            # One BasicOCSPResponse has one signer, and a delegated signer speaks for its own CA only
            # (RFC 6960 §4.2.2.2): CertIDs of other issuers are 'unknown' to it (§2.2).
            status, revoked_at, reason = st if st is not None else ("unknown", None, None)
            statuses.append("revoked" if status == "hold" else status)
            singles.append(single_response(cid.raw, status, revoked_at, reason, this, nxt))
        der = self._sign(primary.signer, singles, now, nonce)
        return Answer(der, "successful", statuses[0] if len(statuses) == 1 else None, this, nxt,
                      cacheable=nonce is None)

    def _cached(self, iss: _Issuer, alg: str, raw_certid: bytes, serial: int, *, sign: bool = True) -> Answer | None:
        """One CertID, no nonce, through the source chain (pki/ocsp/sources.py). With ``sign=False`` only the
        sources that sign nothing are asked: None when the answer must be signed."""
        assert iss.signer is not None
        q = Query(iss, alg, raw_certid, serial, utcnow(), self._lookup.lookup, self.margin)
        return (self.chain if sign else self.presigned_chain).response(q)

    def _store_resigned(self, q: Query, status: str, der: bytes, this: datetime, nxt: datetime) -> None:
        try:
            self.store.store([{"issuer": q.issuer.name, "serial": q.serial_hex, "hash_alg": "sha1",
                               "status": status, "this_update": this, "next_update": nxt, "der": der}])
        except DatabaseUnavailable as exc:  # the answer is right; storing it is an optimisation
            log.warning("could not store a pre-signed OCSP response: %s", type(exc).__name__)

    # -- OCPP 2.0.1 GetCertificateStatus -----------------------------------------------------------

    def ocpp_status(self, hash_alg: str, name_hash: bytes, key_hash: bytes, serials: Sequence[int]) -> Answer:
        """Answer one OCPP OCSPRequestData. ``serials``: the readings of the serial to try, in order."""

        def go() -> Answer:
            iss = self._issuer_for(hash_alg, name_hash, key_hash)
            if iss is None or iss.signer is None:
                return UNAUTHORIZED_ANSWER
            serial = serials[0]
            if len(serials) > 1:
                found = self.store.existing_serials(iss.name, [format(s, "x") for s in serials if s > 0])
                serial = next((s for s in serials if s > 0 and format(s, "x") in found), serials[0])
            nh, kh = iss.hashes[hash_alg]
            ans = self._cached(iss, hash_alg, certid_der(hash_alg, nh, kh, serial), serial)
            assert ans is not None
            return ans

        return self._guarded(go)

# ---------------------------------------------------------------------------------------------------
# The Context's responder
# ---------------------------------------------------------------------------------------------------

class _OcspContext(Protocol):
    """What these functions read of pki.context.Context (a Protocol: the Context holds this module's
    responder, so this module does not import it)."""

    @property
    def ocsp(self) -> OcspResponder: ...
    @property
    def responder_only(self) -> bool: ...


def responder_for(ctx: _OcspContext) -> OcspResponder:
    """The Context's OCSP responder (kept for callers; it is ctx.ocsp, built in pki/wiring.py)."""
    return ctx.ocsp


def is_responder_only(ctx: _OcspContext) -> bool:
    """The standalone responder's Context (pki.wiring.build_context(responder_only=True)): no CA key."""
    return ctx.responder_only


def refresh(ctx: _OcspContext, *, margin: timedelta | None = None, full: bool = False) -> int:
    """Worker entry point: re-sign what is missing or due (see OcspResponder.refresh)."""
    return responder_for(ctx).refresh(margin=margin, full=full)

