"""The CA: build a certificate from a profile and a checked request, lint, record intent, sign, store.

Order of operations (after Boulder's issuance cycle):
  1. prepare — TBS from the *profile* (never from CSR extensions), serial, validity capped at the issuer's;
  2. lint    — the same TBS signed with a throwaway key of the issuer's algorithm is checked by the
               profile linter, the size limit and pkilint;
  3. intent  — what the HSM is about to sign is committed (issuer, serial, TBS digest);
  4. sign    — through hsm/ (the private key never leaves the token); the key store's signer verifies the
               signature with the public key the CA certificate names before returning it;
  5. store   — certificate row, intent marked issued, audit event: one transaction.
A crash between 3 and 5 leaves a 'pending' intent: detectable, and the serial is never reused.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsm.algorithms import ALGORITHMS, key_alg_of
from hsm.keystore import KeyAlg, KeyStore, PrivateKey, PublicKey, certified_signer
from pki import audit
from pki.clock import ClockGuard
from pki.config import current
from pki.csr import (
    ALT_PUBLIC_KEY_OID,
    CheckedRequest,
    SubjectFields,
    check_csr,
    check_no_control_chars,
    parse_csr,
)
from pki.der import bit_string, elements, tbs_field, tlv
from pki.errors import (
    AlreadyRevoked,
    BadKey,
    BadRevocation,
    CertificateTooLarge,
    ConfigError,
    LintError,
    NotFound,
    UnknownCA,
)
from pki.lint import lint_profile, pkilinter, shape_key, size_bound
from pki.observers import IssuanceObserver, Issued, RevocationObserver
from pki.profiles import Profile, ProfileSet
from pki.serials import new_serial, to_hex
from pki.store import certificates as store
from pki.store.db import Database, Session, utcnow
from pki.store.models import Certificate, CertificateAuthority
from pki.tbs import TbsTemplate, TemplateInputs, rfc4514

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}  # RFC 5280 §5.3.1 (removeFromCRL is a release of a hold, not a revocation reason)

_TWIN_KEYS: dict[KeyAlg, PrivateKey] = {}
_TWIN_LOCK = threading.Lock()


def twin_key(alg: KeyAlg) -> PrivateKey:
    """A throwaway software key of the issuer's algorithm, only ever used to sign lint twins."""
    with _TWIN_LOCK:
        k = _TWIN_KEYS.get(alg)
        if k is None:
            k = _TWIN_KEYS[alg] = ALGORITHMS[alg].generate()
        return k


def sig_hash(alg: KeyAlg) -> hashes.HashAlgorithm | None:
    """The hash the issuer's key type signs with (hsm/algorithms.py); None for pure EdDSA."""
    return ALGORITHMS[alg].hash


def key_alg_of_public(key: PublicKey) -> KeyAlg:
    return key_alg_of(key)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def build_name(s: SubjectFields) -> x509.Name:
    # RDN order CN, O, C, DC as in the public ISO 15118 test PKIs; each RDN single-valued.
    # cryptography encodes CN/O as UTF8String, C as PrintableString and DC as IA5String.
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, s.cn)]
    if s.o:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, s.o))
    if s.c:
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, s.c))
    if s.dc:
        attrs.append(x509.NameAttribute(NameOID.DOMAIN_COMPONENT, s.dc))
    return x509.Name([x509.RelativeDistinguishedName([a]) for a in attrs])


# Value objects are frozen (#23 item 5): a CA handle, a request, a prepared TBS and an issued certificate are
# replaced, never changed in place, so a thread holding one never sees it change under it.
@dataclass(frozen=True, slots=True)
class CAHandle:
    """A CA as the engine caches it: its row and parsed certificate. Replaced by reload_cas, never changed;
    the CA's signer is cached by the engine (Engine.ca_signer), keyed by name and certificate serial."""

    row: CertificateAuthority
    cert: x509.Certificate
    alg: KeyAlg
    ski: bytes
    subject_der: bytes | None = None  # the certificate's subject Name as encoded (issuer matching)

    @property
    def name(self) -> str:
        return self.row.name


@dataclass(frozen=True, slots=True)
class IssueRequest:
    profile: str
    public_key: PublicKey
    subject: SubjectFields
    identifier: str | None = None
    ca: str | None = None  # issuing CA name; default: picked by profile and key algorithm
    tenant: str | None = None
    not_after: datetime | None = None  # cap (e.g. the contract's end)
    key_uri: str | None = None  # service-held keys, CAs (hsm/uri.py); a root's is the key that signs it
    actor: str = "system"
    alt_spki: bytes | None = None  # ISO 15118-20 X448 "Alternate Subject Public Key" (pki.csr.alt_x448_key)


@dataclass(frozen=True, slots=True)
class _Prepared:
    req: IssueRequest
    profile: Profile
    issuer_name: str
    serial: int
    tbs_sha256: str
    subject: str
    alg: KeyAlg
    signer_uri: str | None  # self-signed: the subject's own key (hsm/uri.py); None: the issuing CA's
    tbs: bytes  # the linted twin's TBSCertificate: exactly what the HSM signs
    sig_alg_der: bytes  # its AlgorithmIdentifier (same for twin and real certificate)


@dataclass(frozen=True)
class _Template:
    tbs: TbsTemplate
    sig_alg_der: bytes


def _spki_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _outer_parts(cert_der: bytes) -> tuple[bytes, bytes]:
    """(tbsCertificate, signatureAlgorithm) of an X.509 Certificate (RFC 5280 §4.1)."""
    (_, _, c0, c1), = elements(cert_der)
    tbs, alg = elements(cert_der, c0, c1)[:2]
    return cert_der[tbs[1]:tbs[3]], cert_der[alg[1]:alg[3]]


def assemble_certificate(tbs: bytes, sig_alg_der: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }."""
    return tlv(0x30, tbs + sig_alg_der + bit_string(signature))


def _batching_enabled() -> bool:
    return current().issue_batch


class _Waiter:
    __slots__ = ("prep", "done", "result", "error", "lead")

    def __init__(self, prep: _Prepared) -> None:
        self.prep = prep
        self.done = threading.Event()
        self.result: Issued | None = None
        self.error: BaseException | None = None
        self.lead = False  # woken to issue the next batch itself, not with its result


class IssueBatcher:
    """Group commit for single issuances: concurrent `Engine.issue` calls in one process share one intent
    transaction and one certificate transaction.

    Callers (the API's request threads) prepare and lint their own request, then queue it. Leader and
    followers, as databases do group commit: a caller that finds no batch being issued issues the queue
    itself, in its own thread — `_issue_prepared` on the lot: intents committed, then every HSM signature,
    then certificates + intents marked issued + audit events committed, the same order and crash
    guarantees as `issue_many` — and wakes each follower with its own certificate. Callers arriving
    meanwhile wait; when the batch is done its leader hands the queue to the first of them, which leads
    the next batch. So a lone request costs no thread hand-off at all and a follower exactly one wake-up
    (a dedicated issuing thread cost two per request and one per batch, which under HTTP load showed up
    as GIL hand-offs). Under load the batch is whatever arrived while the previous batch was being issued
    (no timer); V2GPKI_ISSUE_BATCH_LINGER_MS > 0 also lets a leader wait that long for company when the
    queue holds fewer than V2GPKI_ISSUE_BATCH_MAX (64). A failure of the batch (database, HSM) is raised
    in every caller of the batch; per-request errors (CSR, profile, lint) never reach the batch: they are
    raised in `_prepare`, in the caller's thread. V2GPKI_ISSUE_BATCH=0 turns batching off.
    """

    def __init__(self, engine: Engine, *, max_batch: int | None = None, linger: float | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch or current().issue_batch_max
        if linger is None:
            linger = current().issue_batch_linger_ms / 1000
        self.linger = linger
        self._queue: list[_Waiter] = []
        self._lock = threading.Lock()
        self._leading = False  # a batch is being issued by some caller's thread
        self._local = threading.local()
        self.batches = 0  # statistics (tests, the benchmark)
        self.issued = 0
        ref = weakref.ref(self)

        def reset_in_child() -> None:  # the parent's leader (and maybe its lock) does not survive fork
            b = ref()
            if b is not None:
                b._queue, b._lock, b._leading, b._local = [], threading.Lock(), False, threading.local()

        os.register_at_fork(after_in_child=reset_in_child)

    def submit(self, prep: _Prepared) -> Issued:
        if getattr(self._local, "leading", False):  # a hook of a batch we are issuing: never wait for ourselves
            return self.engine._issue_prepared([prep])[0]
        w = _Waiter(prep)
        with self._lock:
            self._queue.append(w)
            lead = not self._leading
            self._leading = True
        if not lead:
            w.done.wait()
            lead = w.lead
        if lead:
            self._lead()
        if w.error is not None:
            raise w.error
        assert w.result is not None
        return w.result

    def _lead(self) -> None:
        """Issue the queue's head (this caller's own request first in it), then pass the lead on."""
        if self.linger > 0 and len(self._queue) < self.max_batch:
            time.sleep(self.linger)
        with self._lock:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
        self._local.leading = True
        try:
            results = self.engine._issue_prepared([w.prep for w in batch])
            for w, r in zip(batch, results, strict=True):
                w.result = r
            self.batches += 1
            self.issued += len(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for w in batch:
                w.error = exc
        finally:
            self._local.leading = False
            with self._lock:
                nxt = self._queue[0] if self._queue else None
                self._leading = nxt is not None
            if nxt is not None:
                nxt.lead = True
                nxt.done.set()
            for w in batch[1:]:
                w.done.set()


class Engine:
    """Issues and revokes. Thread-safe; one per process (see hsm/pkcs11.py for fork handling)."""

    def __init__(
        self,
        db: Database,
        keystore: KeyStore,
        profiles: ProfileSet,
        public_url: str,
        *,
        pkilint_mode: str = "shape",
        issuance_observers: Sequence[IssuanceObserver] = (),
        revocation_observers: Sequence[RevocationObserver] = (),
        clock_guard: ClockGuard | None = None,
        ca_keys: bool = True,
    ) -> None:
        self.db = db
        self.keystore = keystore
        self.profiles = profiles
        self.public_url = public_url.rstrip("/")
        self.pkilint_mode = pkilint_mode
        self._cas: dict[str, CAHandle] = {}
        self._cas_lock = threading.Lock()
        self._cas_loaded_at = float("-inf")  # time.monotonic() of the last reload_cas()
        # Each CA's key store signer once certified_signer checked it, by (CA name, certificate serial).
        self._ca_signers: dict[tuple[str, str], PrivateKey] = {}
        self._linted_shapes: set[tuple[object, ...]] = set()
        self._templates: dict[tuple[object, ...], _Template] = {}  # leaf shapes already linted (pki/tbs.py)
        # Told, in this order, inside and after each issuing / revoking transaction (pki/observers.py).
        # Fixed here: pki/wiring.py lists them; nothing appends to them later.
        self.issuance_observers: tuple[IssuanceObserver, ...] = tuple(issuance_observers)
        self.revocation_observers: tuple[RevocationObserver, ...] = tuple(revocation_observers)
        self.batcher: IssueBatcher | None = IssueBatcher(self) if _batching_enabled() else None
        # Compares this host's clock with the database server's (pki/clock.py); None: not checked.
        self.clock_guard: ClockGuard | None = clock_guard
        # False in the standalone OCSP responder: it never loads a CA key (RFC 6960 §4.2.2.2's delegated
        # signers exist so that the responder needs none).
        self.ca_keys = ca_keys

    # -- CA cache --------------------------------------------------------------------------------------

    def reload_cas(self) -> None:
        # The query runs under the lock: two reloads racing (a request thread and an after-commit hook)
        # could otherwise let the one that read the table first assign its older snapshot last, and a CA
        # created in between (a root switch's new Sub-CAs) vanish from the cache until the next reload.
        with self._cas_lock:
            rows = store.all_cas(self.db)
            fresh: dict[str, CAHandle] = {}
            for row in rows:
                old = self._cas.get(row.name)
                if old is not None and old.row.serial == row.serial:
                    fresh[row.name] = replace(old, row=row)  # same certificate: parsed once, row refreshed
                    continue
                cert = x509.load_der_x509_certificate(row.der)
                ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
                fresh[row.name] = CAHandle(row=row, cert=cert, alg=KeyAlg(row.key_alg), ski=ski,
                                           subject_der=tbs_field(cert.tbs_certificate_bytes, 4))
            self._cas = fresh
            current = {(h.name, h.row.serial) for h in fresh.values()}
            for k in [k for k in self._ca_signers if k not in current]:
                self._ca_signers.pop(k, None)  # a CA gone or re-keyed (new certificate): its signer too
            self._cas_loaded_at = time.monotonic()

    def reload_cas_if_older(self, seconds: float) -> None:
        """reload_cas() unless the CA cache was loaded less than ``seconds`` ago (a CA revoked by another
        process is seen within that bound, without a query per lookup)."""
        if time.monotonic() - self._cas_loaded_at > seconds:
            self.reload_cas()

    def ca(self, name: str) -> CAHandle:
        h = self._cas.get(name)
        if h is None:
            self.reload_cas()
            h = self._cas.get(name)
        if h is None:
            raise UnknownCA(f"unknown CA {name!r}", ca=name)
        return h

    def cas(self) -> list[CAHandle]:
        if not self._cas:
            self.reload_cas()
        return list(self._cas.values())

    def _ocsp_signer_for(self, p: _Prepared) -> int | None:
        """The CA a delegated OCSP signer answers for (RFC 6960 §4.2.2.2: the CA that issues it, with
        id-kp-OCSPSigning, its key held by us): the responder finds signers by this column."""
        if p.req.key_uri is None or "OCSPSigning" not in p.profile.extended_key_usage:
            return None
        return self.ca(p.issuer_name).row.id

    def ca_signer(self, h: CAHandle) -> PrivateKey:
        """The CA's token key, once checked to be the key its certificate names (hsm.keystore.certified_signer:
        each signature the signer returns has verified with that key, so with the CA's)."""
        if not self.ca_keys:
            raise ConfigError("CA keys are not available in the standalone OCSP responder")
        k = (h.name, h.row.serial)
        signer = self._ca_signers.get(k)
        if signer is None:
            signer = self._ca_signers[k] = certified_signer(
                self.keystore, h.row.key_uri, h.cert.public_key(),  # type: ignore[arg-type]
                f"CA {h.name!r}'s certificate")
        return signer

    def cached_ca_signer(self, h: CAHandle) -> PrivateKey | None:
        """The CA's signer if ca_signer has looked it up (and nothing made it forget it), else None."""
        return self._ca_signers.get((h.name, h.row.serial))

    def forget_ca_signer(self, h: CAHandle) -> None:
        """Drop the cached signer: the next ca_signer looks the key up and checks it again."""
        self._ca_signers.pop((h.name, h.row.serial), None)

    def chain(self, name: str) -> list[x509.Certificate]:
        """The CA's certificate up to its root (inclusive)."""
        out = []
        cur: str | None = name
        seen = set()
        while cur is not None and cur not in seen:
            seen.add(cur)
            h = self.ca(cur)
            out.append(h.cert)
            cur = h.row.parent
        return out

    def pick_issuer(self, profile: Profile, key_alg: KeyAlg, requested: str | None) -> CAHandle:
        if requested is not None:
            h = self.ca(requested)
            if h.row.profile not in profile.issuers:
                raise UnknownCA(f"CA {requested!r} does not issue profile {profile.name!r}", ca=requested)
            if h.row.status != "active":
                raise UnknownCA(f"CA {requested!r} is {h.row.status}", ca=requested)
            return h
        candidates = [
            h for h in self.cas() if h.row.profile in profile.issuers and h.row.status == "active"
        ]
        if not candidates:
            raise UnknownCA(f"no active CA issues profile {profile.name!r}: run `v2gpki init`")
        # Prefer a CA whose key algorithm matches the subject key (-20 Ed448 chains stay Ed448), then the
        # issuer listed first in the profile (e.g. cpo-sub2 rather than the root), then the newest.
        order = {p: i for i, p in enumerate(profile.issuers)}
        # ties on notAfter (a new hierarchy whose CAs end when the old ones do) go to the newest CA row:
        # the order the database returns rows in is no order (PostgreSQL's changes after an UPDATE)
        candidates.sort(key=lambda h: (h.alg != key_alg, order[h.row.profile], -h.row.not_after.timestamp(),
                                       -(h.row.id or 0)))
        return candidates[0]

    # -- building --------------------------------------------------------------------------------------

    def _prepare(self, req: IssueRequest) -> _Prepared:
        profile = self.profiles.get(req.profile)
        subj_alg = key_alg_of_public(req.public_key)
        if subj_alg not in profile.key_algs:
            raise BadKey(f"{subj_alg.value} key not allowed by profile {profile.name!r}")
        # Every subject the engine signs, CA or leaf, whatever path built it (CSR, renewal, CPS, init):
        # no control characters in any DN attribute (issue #21 item 6).
        check_no_control_chars(req.subject)
        now = utcnow()
        issuer_handle: CAHandle | None = None
        if profile.self_signed:
            issuer_name_str = req.ca or ""
            issuer_x509 = build_name(req.subject)
            alg = subj_alg
            issuer_ski = x509.SubjectKeyIdentifier.from_public_key(req.public_key).digest
            not_after_cap = None
            signer_uri = req.key_uri
            if signer_uri is None:
                raise BadKey(f"a self-signed {profile.name!r} certificate needs the URI of its own key (key_uri)")
        else:
            issuer_handle = self.pick_issuer(profile, subj_alg, req.ca)
            issuer_name_str = issuer_handle.name
            issuer_x509 = issuer_handle.cert.subject
            alg = issuer_handle.alg
            issuer_ski = issuer_handle.ski
            not_after_cap = issuer_handle.cert.not_valid_after_utc
            signer_uri = None
        # Clock tolerance (#27 item 4): notBefore is backdated by the profile's margin (default one hour, as
        # large public CAs do) so a charger or vehicle whose clock runs behind does not reject a fresh
        # certificate as not yet valid (RFC 5280 §4.1.2.5 validity; §6.1.3 (a)(2) checks the current time
        # against it). Never before the issuer's own notBefore: the path would not validate at that instant.
        not_before = now - timedelta(seconds=profile.not_before_margin_seconds)
        if issuer_handle is not None:
            not_before = max(not_before, issuer_handle.cert.not_valid_before_utc)
        not_before = not_before.replace(microsecond=0)  # what the certificate encodes (seconds precision)
        # The validity period (notBefore to notAfter) is the profile's, the backdated hour included.
        not_after = not_before + timedelta(days=profile.validity_days)
        # A certificate never outlives its issuer (nor the contract it carries).
        for cap in (not_after_cap, req.not_after):
            if cap is not None and cap < not_after:
                not_after = cap.replace(microsecond=0)
        if not_after <= now:
            raise BadKey("requested validity ends before it starts")
        if self.clock_guard is not None:
            self.clock_guard.require()  # refuse to sign with a clock the database disagrees with (#27 item 4)
        serial = new_serial()
        if req.alt_spki is not None and not (profile.x448_alt_key_for_ed448 and subj_alg is KeyAlg.ED448):
            raise BadKey(f"profile {profile.name!r} carries no Alternate Subject Public Key for {subj_alg.value} keys")
        tkey: tuple[object, ...] | None = None
        # a request-specific extension has no template (its bytes differ per certificate)
        if self.pkilint_mode != "every" and not profile.ca and issuer_handle is not None and req.alt_spki is None:
            # What fixes every byte of a leaf's TBS but the variable fields (pki/tbs.py), plus pkilint's
            # shape buckets, so a template is only ever used for a shape pkilint has passed.
            subj = req.subject
            tkey = (profile.name, issuer_name_str, issuer_handle.row.serial, subj_alg, bool(subj.o),
                    bool(subj.c), subj.dc, len(subj.cn) > 32, len(subj.o or "") > 32,
                    not_before.year >= 2050, not_after.year >= 2050)
            tmpl = self._templates.get(tkey)
            # ub-common-name / ub-organization-name as cryptography's builder counts them (UTF-8 octets):
            # longer values take the builder path, which refuses them exactly as before.
            if tmpl is not None and len(subj.cn.encode()) <= 64 and len((subj.o or "").encode()) <= 64:
                return self._prepare_from_template(req, profile, issuer_name_str, alg, tmpl, serial, not_before,
                                                   not_after)
        name = build_name(req.subject)
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_x509)
            .public_key(req.public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=profile.ca, path_length=profile.path_len), critical=True)
            .add_extension(_key_usage(profile, subj_alg), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(req.public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier(issuer_ski, None, None), critical=False
            )  # RFC 5280 §4.2.1.1: keyIdentifier only
        )
        if profile.extended_key_usage:
            eku = {
                "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
                "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
                "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
                "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,  # firmware signing (OCPP 2.0.1 L01)
            }
            b = b.add_extension(
                x509.ExtendedKeyUsage([eku[e] for e in profile.extended_key_usage]), critical=profile.eku_critical
            )
        if profile.ocsp_nocheck:
            b = b.add_extension(x509.OCSPNoCheck(), critical=False)  # RFC 6960 §4.2.2.2.1
        if profile.san_dns_from_cn:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(req.subject.cn)]), critical=False)
        if req.alt_spki is not None:
            # ITU-T X.509 (10/2019) §9.8.2 subjectAltPublicKeyInfo, non-critical: relying parties that do not know
            # it still validate the certificate; the ISO 15118-20 vehicle and CPS read it [V2G20-2534]
            b = b.add_extension(x509.UnrecognizedExtension(ALT_PUBLIC_KEY_OID, req.alt_spki), critical=False)
        if profile.aia_ocsp:
            b = b.add_extension(
                x509.AuthorityInformationAccess(
                    [x509.AccessDescription(x509.oid.AuthorityInformationAccessOID.OCSP,
                                            x509.UniformResourceIdentifier(f"{self.public_url}/ocsp"))]
                ),
                critical=False,
            )
        if profile.crldp and not profile.self_signed:
            b = b.add_extension(
                x509.CRLDistributionPoints(
                    [x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(f"{self.public_url}/crl/{issuer_name_str}.crl")],
                        None, None, None)]
                ),
                critical=False,
            )
        # Lint the twin (same TBS, throwaway key).
        twin = b.sign(twin_key(alg), sig_hash(alg))  # type: ignore[arg-type]
        twin_der = der(twin)
        tbs, sig_alg_der = _outer_parts(twin_der)
        bound = size_bound(twin, len(twin_der), alg.value)
        lint_profile(twin, bound, profile, subj_alg)
        self._pkilint(profile, twin_der, shape_key(profile, issuer_name_str, name, subj_alg))
        if tkey is not None and tkey not in self._templates:
            self._learn_template(tkey, tbs, sig_alg_der, req, serial, not_before, not_after)
        return _Prepared(
            req=req,
            profile=profile,
            issuer_name=issuer_name_str,
            serial=serial,
            tbs_sha256=hashlib.sha256(tbs).hexdigest(),
            subject=name.rfc4514_string(),
            alg=alg,
            signer_uri=signer_uri,
            tbs=tbs,
            sig_alg_der=sig_alg_der,
        )

    def _learn_template(self, tkey: tuple[object, ...], tbs: bytes, sig_alg_der: bytes, req: IssueRequest,
                        serial: int, not_before: datetime, not_after: datetime) -> None:
        """Keep a template for this shape only if it rebuilds the linted reference TBS byte for byte."""
        try:
            tmpl = TbsTemplate(tbs)
            again = tmpl.build(TemplateInputs(serial, not_before, not_after, req.subject,
                                              _spki_der(req.public_key)))
        except (ValueError, UnicodeError):
            again = None
        if again != tbs:
            return  # this shape stays on the builder (e.g. subjectAltName profiles)
        self._templates[tkey] = _Template(tmpl, sig_alg_der)

    def _prepare_from_template(self, req: IssueRequest, profile: Profile, issuer_name: str, alg: KeyAlg,
                               t: _Template, serial: int, not_before: datetime, not_after: datetime) -> _Prepared:
        tbs = t.tbs.build(TemplateInputs(serial, not_before, not_after, req.subject, _spki_der(req.public_key)))
        # The size limit (ISO 15118-2 [V2G2-010]) with the longest signature the issuer's algorithm can give;
        # every other profile rule holds by construction (the extensions are the linted reference's bytes).
        bound = len(assemble_certificate(tbs, t.sig_alg_der, bytes(ALGORITHMS[alg].max_sig_len)))
        if bound > profile.max_der_size:
            raise CertificateTooLarge(
                f"certificate would be up to {bound} bytes; profile {profile.name!r} allows "
                f"{profile.max_der_size} (ISO 15118-2 [V2G2-010]) — shorten names or URLs",
                size=bound,
            )
        return _Prepared(
            req=req, profile=profile, issuer_name=issuer_name, serial=serial,
            tbs_sha256=hashlib.sha256(tbs).hexdigest(), subject=rfc4514(req.subject), alg=alg,
            signer_uri=None, tbs=tbs, sig_alg_der=t.sig_alg_der,
        )

    def _pkilint(self, profile: Profile, twin_der: bytes, shape: tuple[object, ...]) -> None:
        if self.pkilint_mode == "off":
            return
        key: tuple[object, ...] | None = None
        if self.pkilint_mode == "shape" and not profile.ca:  # every CA certificate is linted
            if shape in self._linted_shapes:
                return
            key = shape
        allow = {"pkix.key_usage_value_prohibited_for_ec"} if profile.legacy_key_encipherment else set()
        findings = pkilinter().findings(twin_der, allow)
        if findings:
            raise LintError(f"pkilint refused the {profile.name!r} certificate: " + "; ".join(findings))
        if key is not None:
            self._linted_shapes.add(key)

    # -- issuing ---------------------------------------------------------------------------------------

    def issue(self, req: IssueRequest) -> Issued:
        """Issue one certificate. The request is built and linted in the caller's thread; with batching on
        (the default, V2GPKI_ISSUE_BATCH) concurrent callers in this process then share the intent and
        certificate transactions (see IssueBatcher)."""
        prep = self._prepare(req)
        if self.batcher is not None:
            return self.batcher.submit(prep)
        return self._issue_prepared([prep])[0]

    def issue_many(self, reqs: Sequence[IssueRequest], *, extra: Callable[[Session, list[Issued]], None] | None = None
                   ) -> list[Issued]:
        """Issue a batch: one transaction for the intents, HSM signatures, one for the certificates."""
        return self._issue_prepared([self._prepare(r) for r in reqs], extra=extra)

    def _issue_prepared(self, preps: list[_Prepared], *,
                        extra: Callable[[Session, list[Issued]], None] | None = None) -> list[Issued]:
        now = utcnow()
        # Rows go in as Core multi-row INSERTs: building SQLModel objects and running the ORM unit of work
        # for them cost more than the token signature (bench/issuance.py). Intents are found again by
        # (issuer, serial), unique by uq_intent_issuer_serial.
        intents: list[dict[str, object]] = [
            {"issuer": p.issuer_name, "serial": to_hex(p.serial), "profile": p.profile.name, "subject": p.subject,
             "tbs_sha256": p.tbs_sha256, "state": "pending", "error": None, "created_at": now,
             "completed_at": None}
            for p in preps
        ]
        # The intents go in as ONE multi-row INSERT in autocommit: atomic by itself (all rows or none), and
        # committed in one round trip instead of BEGIN, INSERT, COMMIT (a batch is often one request under
        # HTTP load, where those round trips were most of its database time).
        store.record_intents(self.db, intents)
        issued: list[Issued] = []
        chains: dict[str, list[x509.Certificate]] = {}
        try:
            for p in preps:
                if p.profile.self_signed:
                    assert p.signer_uri is not None  # checked in _prepare
                    signer = certified_signer(self.keystore, p.signer_uri, p.req.public_key,
                                              f"the {p.profile.name!r} certificate being issued")
                else:
                    signer = self.ca_signer(self.ca(p.issuer_name))
                # The HSM signs exactly the TBS that was linted and whose digest the intent recorded
                # (p.tbs_sha256 is computed from these bytes); we only wrap it (RFC 5280 §4.1.1).
                signature = ALGORITHMS[p.alg].sign(signer, p.tbs)
                cert_der = assemble_certificate(p.tbs, p.sig_alg_der, signature)
                cert = x509.load_der_x509_certificate(cert_der)
                if len(cert_der) > p.profile.max_der_size:  # cannot happen given the bound; keep the guard
                    raise LintError(f"signed certificate is {len(cert_der)} bytes")
                chain: list[x509.Certificate] = []
                if not p.profile.self_signed:
                    if p.issuer_name not in chains:
                        chains[p.issuer_name] = self.chain(p.issuer_name)
                    chain = list(chains[p.issuer_name])
                issued.append(Issued(cert, cert_der, to_hex(p.serial), p.issuer_name, p.profile.name, chain))
        except BaseException as exc:
            self._fail_intents(intents[len(issued):], exc)
            raise
        done = utcnow()
        # The certificate transaction runs on an ORM session's connection: its transactional hooks write
        # ORM rows (outbox) and register after-commit callbacks (metrics), which need the session's commit.
        with self.db.session() as s:
            # Every write of the batch goes together, the audit chain's last: one round trip on PostgreSQL
            # (pki/store/certificates.py), where the server extends the chain.
            writes = store.IssuedWrites(s, [
                {"issuer": i.issuer, "serial": i.serial, "profile": i.profile, "subject": p.subject,
                 "identifier": p.req.identifier, "tenant": p.req.tenant,
                 "not_before": i.cert.not_valid_before_utc, "not_after": i.cert.not_valid_after_utc,
                 "status": "valid", "revoked_at": None, "revocation_reason": None, "key_uri": p.req.key_uri,
                 "ocsp_signer_for_ca_id": self._ocsp_signer_for(p),
                 "fingerprint": hashlib.sha256(i.der).hexdigest(), "der": i.der, "created_at": done}
                for p, i in zip(preps, issued, strict=True)
            ], intents, done, [
                audit.Entry(actor=p.req.actor, org=p.req.tenant, action="certificate.issue",
                            object=f"{i.issuer}/{i.serial}",
                            details={"profile": i.profile, "identifier": p.req.identifier})
                for p, i in zip(preps, issued, strict=True)
            ])
            if extra is None:
                # The observers write first (an outbox row is a Core INSERT sent at once; an ORM row they
                # add is flushed at commit, after these writes). When they left no ORM row pending, COMMIT
                # travels with the writes: one round trip fewer on PostgreSQL, and the session's commit
                # finds the transaction closed.
                for observer in self.issuance_observers:
                    observer.in_transaction(s, issued)
                writes.send(commit_if_nothing_else=True)
            else:
                writes.send()
                extra(s, issued)
                for observer in self.issuance_observers:
                    observer.in_transaction(s, issued)
            s.commit()
        for observer in self.issuance_observers:
            observer.after_commit(issued)
        return issued

    def _fail_intents(self, intents: list[dict[str, object]], exc: BaseException) -> None:
        store.fail_intents(self.db, intents, type(exc).__name__)

    def issue_from_csr(self, profile_name: str, csr_data: bytes | str, *, ca: str | None = None,
                       tenant: str | None = None, actor: str = "cli", not_after: datetime | None = None,
                       check: Callable[[CheckedRequest], None] | None = None) -> Issued:
        profile = self.profiles.get(profile_name)
        if profile.ca:
            raise BadKey(f"profile {profile_name!r} is a CA profile: CAs are created by `v2gpki init`")
        checked = check_csr(profile, parse_csr(csr_data))
        if check is not None:
            check(checked)
        return self.issue(IssueRequest(
            profile=profile_name, public_key=checked.public_key, subject=checked.subject,
            identifier=checked.identifier, ca=ca, tenant=tenant, actor=actor, not_after=not_after,
            alt_spki=checked.alt_spki,
        ))

    # -- lookups ---------------------------------------------------------------------------------------

    def get_certificate(self, serial: str, issuer: str | None = None, tenant: str | None = None) -> Certificate:
        rows = store.find_certificates(self.db, serial, issuer, tenant)
        if not rows:
            raise NotFound(f"no certificate with serial {serial}")
        if len(rows) > 1:
            raise NotFound(f"serial {serial} is ambiguous: name the issuer")
        return rows[0]

    # -- revocation ------------------------------------------------------------------------------------

    def revoke(self, serial: str, reason: str, *, issuer: str | None = None, tenant: str | None = None,
               actor: str = "cli", org: str | None = None) -> Certificate:
        """RFC 5280 §5.3.1 revocation as one guarded UPDATE (Boulder): a second revocation of the same
        certificate changes nothing and raises AlreadyRevoked. certificateHold puts it on hold."""
        if reason not in REASONS:
            raise BadRevocation(f"unknown revocation reason {reason!r} (use one of: {', '.join(REASONS)})")
        return self.revoke_row(self.get_certificate(serial, issuer, tenant), reason, actor=actor, org=org)

    def revoke_row(self, cert: Certificate, reason: str, *, actor: str = "cli", org: str | None = None) -> Certificate:
        """:meth:`revoke` of a certificate row the caller has just read (its id, issuer, serial, status,
        profile), without reading it again: the guarded UPDATE still decides, so a row read before a
        concurrent revocation raises AlreadyRevoked here as it would there."""
        if reason not in REASONS:
            raise BadRevocation(f"unknown revocation reason {reason!r} (use one of: {', '.join(REASONS)})")
        serial = cert.serial
        now = utcnow()
        new_status = "hold" if reason == "certificateHold" else "revoked"
        allowed_from = ["valid"] if new_status == "hold" else ["valid", "hold"]
        with self.db.session() as s:
            if not store.set_revoked(s, cert.id, status=new_status, allowed_from=allowed_from, at=now, reason=reason):
                s.rollback()
                raise AlreadyRevoked(f"certificate {cert.issuer}/{serial} is already {cert.status}")
            audit.append(s, audit.Entry(actor=actor, org=org, action="certificate.revoke",
                                        object=f"{cert.issuer}/{serial}",
                                        details={"reason": reason, "identifier": cert.identifier}))
            cert.status, cert.revoked_at, cert.revocation_reason = new_status, now, reason
            if new_status == "revoked" and self.profiles.get(cert.profile).ca:
                # A revoked CA certificate takes its CA out of service: it must not issue again.
                store.retire_ca(s, cert.serial, cert.issuer)
            for observer in self.revocation_observers:
                observer.in_transaction(s, cert)
            s.commit()
        if new_status == "revoked" and self.profiles.get(cert.profile).ca:
            self.reload_cas()
        for observer in self.revocation_observers:
            observer.after_commit(cert)
        return cert

    def release_hold(self, serial: str, *, issuer: str | None = None, tenant: str | None = None,
                     actor: str = "cli", org: str | None = None) -> Certificate:
        """removeFromCRL (RFC 5280 §5.3.1): a certificate on hold becomes valid again."""
        cert = self.get_certificate(serial, issuer, tenant)
        with self.db.session() as s:
            if not store.release_hold(s, cert.id):
                s.rollback()
                raise BadRevocation(f"certificate {cert.issuer}/{serial} is not on hold")
            audit.append(s, audit.Entry(actor=actor, org=org, action="certificate.release_hold",
                                        object=f"{cert.issuer}/{serial}"))
            s.commit()
        cert.status, cert.revoked_at, cert.revocation_reason = "valid", None, None
        for observer in self.revocation_observers:
            observer.after_commit(cert)
        return cert


def _key_usage(p: Profile, subject_alg: KeyAlg) -> x509.KeyUsage:
    ku = set(p.key_usage_for(subject_alg))
    return x509.KeyUsage(
        digital_signature="digital_signature" in ku,
        content_commitment="content_commitment" in ku,
        key_encipherment="key_encipherment" in ku,
        data_encipherment="data_encipherment" in ku,
        key_agreement="key_agreement" in ku,
        key_cert_sign="key_cert_sign" in ku,
        crl_sign="crl_sign" in ku,
        encipher_only=False,
        decipher_only=False,
    )


__all__ = ["REASONS", "CAHandle", "Engine", "IssueRequest", "Issued"]
