"""PKCS#11 key store on python-pkcs11 (SoftHSM2 by default).

Facts this module is built around (measured on SoftHSM 2.6.1 + python-pkcs11 0.10, see
docs/architecture.md of the shared docs):

* python-pkcs11 calls C_Initialize without CKF_OS_LOCKING_OK, so SoftHSM runs without its own locking
  and two threads inside the library crash the process. Every PKCS#11 call of this process therefore
  goes through one process-wide lock. A second thread adds little throughput anyway; a second
  *process* (own library instance) adds a core.
* ``Session.close()`` logs the token out for every session of the process, invalidating key handles:
  we keep one long-lived logged-in session per process and never close it casually.
* SoftHSM does not notice fork(): a child re-initialises the library (C_Finalize + C_Initialize) and
  opens its own session before its first call (uvicorn workers, Celery prefork).
* SoftHSM has no CKM_ECDSA_SHA256: we hash in software and sign the digest with CKM_ECDSA, then turn
  the raw r||s (PKCS#11 v2.40 §2.3.1) into the DER ECDSA-Sig-Value X.509 wants (RFC 5480 / RFC 3279).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from hsm.algorithms import ALGORITHMS, Algorithm, algorithm_of
from hsm.errors import (
    HSMConfigError,
    HSMError,
    HSMUnavailable,
    KeyExistsError,
    KeyNotFoundError,
    KeyUriError,
    SignatureCheckFailed,
)
from hsm.keystore import KeyAlg, PrivateKey, PublicKey, SignObserver
from hsm.uri import Pkcs11Uri, parse_key_uri

log = logging.getLogger(__name__)

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _mechanism(name: str) -> Mechanism:
    """python-pkcs11's Mechanism for a CKM_* name of the algorithm table (hsm/algorithms.py)."""
    return Mechanism[name.removeprefix("CKM_")]

T = TypeVar("T")

# One lock for every PKCS#11 call of this process (see module docstring).
_LOCK = threading.RLock()
_FORK_GENERATION = 0
_LIB_GENERATION: dict[str, int] = {}  # module path -> fork generation it was initialised in
# Bumped on every C_Finalize + C_Initialize this module performs. Session and object handles die with a
# finalize, and SoftHSM hands the same numbers out again afterwards: a handle cached before can then name
# another store's session and another key (seen: a stale key handle resolving to a public key of another
# token, CKR_KEY_FUNCTION_NOT_PERMITTED). Every store whose handles predate the current epoch reopens.
_LIB_EPOCH = 0


def _after_fork_in_child() -> None:
    global _LOCK, _FORK_GENERATION
    # A lock held by another thread at fork time would never be released in the child.
    _LOCK = threading.RLock()
    _FORK_GENERATION += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

# Errors after which a fresh session (and, if needed, a re-initialised library) may succeed:
# CKR_DEVICE_ERROR, CKR_SESSION_HANDLE_INVALID, CKR_CRYPTOKI_NOT_INITIALIZED, token removed, ...
_TRANSIENT: tuple[type[BaseException], ...] = (
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.DeviceMemory,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.UserNotLoggedIn,
    p11e.GeneralError,
    p11e.FunctionFailed,
    p11e.NoSuchToken,
)


# Attempts when the failure happens while a session is being opened (see _run): up to ≈ 1–2 s of jittered
# back-off, enough for eight processes logging in at once (test_processes_starting_at_once_...).
OPEN_ATTEMPTS = 8
# Attempts of the breaker's half-open trial: the token was just found gone; one re-initialisation and one
# more look, then the breaker opens again for its cool-down (requests meanwhile fail in milliseconds).
HALF_OPEN_ATTEMPTS = 2

# What a token that went away looks like once every attempt failed: SoftHSM2's directory moved, a network
# HSM (or p11-kit's remoting socket, or the vendor client's connection) gone — the slot or its token
# disappears (p11-kit's client: CKR_DEVICE_ERROR once, then no slot at all). For a store that has reached its
# token before, that is an outage: the breaker opens at once, not after `threshold` more slow requests.
# (CKR_DEVICE_ERROR alone is not in the list: SoftHSM2 also answers it transiently, see _TRANSIENT.)
_GONE: tuple[type[BaseException], ...] = (
    p11e.NoSuchToken,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceRemoved,
)


@contextlib.contextmanager
def _open_lock(module: str) -> Iterator[None]:
    """Serialise, across the processes of this host, what reads the token's files: C_Initialize and
    C_Login (which makes SoftHSM rewrite token.object). Without it, processes starting together read a
    token.object another is rewriting and see CKR_GENERAL_ERROR, no token, or CKR_USER_PIN_NOT_INITIALIZED —
    and a re-initialisation that read such a file keeps that view for the next attempts. An advisory
    flock(2) next to SoftHSM's configuration (the temporary directory for another module); the kernel
    drops it when its holder exits, and a holder stuck for 10 s is not waited for."""
    # env: SoftHSM2's own variable: the lock lives beside the configuration the library reads
    conf = os.environ.get("SOFTHSM2_CONF")
    base = os.path.dirname(os.path.abspath(conf)) if conf else tempfile.gettempdir()
    name = hashlib.sha256(module.encode()).hexdigest()[:12]
    try:
        fd = os.open(os.path.join(base, f".v2gpki-pkcs11-{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield  # a read-only directory: no lock, the retries still apply
        return
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        yield
    finally:
        os.close(fd)  # releases the lock


def _reinitialize(lib: Any) -> None:
    """C_Finalize + C_Initialize, marking every handle of this process stale (see _LIB_EPOCH)."""
    global _LIB_EPOCH
    _LIB_EPOCH += 1
    lib.reinitialize()


class _KeyVanished(Exception):
    """A key this store found before is not visible any more (or the token shows no private key at all
    after it showed some): the token's files were moved away and brought back, or are being restored
    (SoftHSM2 keeps the view of the token it read at C_Initialize; a session opened on a half-restored
    directory sees no keys until the library is re-initialised). Transient: re-initialise and look again;
    still missing after the retries, an outage (HSMUnavailable, the breaker), never KeyNotFoundError."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (*_TRANSIENT, _KeyVanished)):
        return True
    # python-pkcs11 maps CKR_CRYPTOKI_NOT_INITIALIZED to a bare PKCS11Error with this text.
    return type(exc) is p11e.PKCS11Error and "not initialized" in str(exc)


class _CircuitBreaker:
    """Opens after ``threshold`` consecutive failed operations; half-opens after ``cooldown`` s."""

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None

    def check(self) -> bool:
        """Raise HSMUnavailable while open; True when the cool-down is over and this call is the half-open
        trial (let through with few attempts: a failure opens the breaker again at once)."""
        if self.opened_at is None:
            return False
        if time.monotonic() - self.opened_at < self.cooldown:
            raise HSMUnavailable("HSM unavailable: circuit breaker open after repeated token failures")
        self.opened_at = None  # half-open: let one attempt through
        return True

    def trip(self) -> None:
        """Open now (the token is known to be gone, or the half-open trial failed)."""
        self.failures = max(self.failures + 1, self.threshold)
        self.opened_at = time.monotonic()

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


def _decode_ec_point(raw: bytes) -> bytes:
    """SoftHSM returns CKA_EC_POINT wrapped in a DER OCTET STRING (PKCS#11 v2.40 §2.3.3)."""
    if raw and raw[0] == 0x04 and len(raw) > 2:
        # Either an uncompressed point (0x04 || X || Y) or an OCTET STRING (tag 0x04).
        length = raw[1]
        if length & 0x80:
            n = length & 0x7F
            body_len = int.from_bytes(raw[2 : 2 + n], "big")
            if 2 + n + body_len == len(raw):
                return raw[2 + n :]
        elif 2 + length == len(raw):
            return raw[2:]
    return raw


class Pkcs11KeyStore:
    """KeyStore over one PKCS#11 token. Safe to share between threads; re-initialised after fork."""

    def __init__(
        self,
        module: str = DEFAULT_MODULE,
        token_label: str = "v2gpki",
        pin: str | None = None,
        *,
        retries: int = 3,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        sign_observer: SignObserver | None = None,
    ) -> None:
        if not pin:
            raise HSMConfigError("no user PIN configured for the PKCS#11 token (set V2GPKI_HSM_PIN or _FILE)")
        self.module = module
        self.token_label = token_label
        self._pin = pin
        self.retries = retries
        self._breaker = _CircuitBreaker(breaker_threshold, breaker_cooldown)
        self.sign_observer = sign_observer  # told each signature's latency or failure (metrics)
        self._lib: Any = None
        self._session: Any = None
        self._generation = -1
        self._epoch = -1
        self._keys: dict[str, tuple[Any, PublicKey, KeyAlg]] = {}
        # Labels found in this token by this store: a later "no such key" for one of them is the token
        # going away or coming back (_KeyVanished), not a missing key.
        self._seen: set[str] = set()
        self._opened_once = False  # the token was there: "no such token" later is an outage
        self._refreshed_at = -1e9  # last re-initialisation caused by a key never seen here being missing

    REFRESH_SECONDS = 5.0  # a missing key never seen here re-initialises the library at most this often

    def __repr__(self) -> str:  # never show the PIN
        return f"Pkcs11KeyStore(module={self.module!r}, token={self.token_label!r})"

    # -- session management -------------------------------------------------------------------------

    def _open(self) -> None:
        with _open_lock(self.module):
            self._open_locked()

    def _open_locked(self) -> None:
        try:
            lib = pkcs11.lib(self.module)
        except p11e.PKCS11Error as exc:
            if _is_transient(exc):
                # C_Initialize can fail with CKR_GENERAL_ERROR while another process rewrites a token file
                # (SoftHSM rewrites token.object at every C_Login): an outage for _run to retry, not a bad
                # module path. A persistently bad SOFTHSM2_CONF ends as HSMUnavailable after the retries.
                raise
            raise HSMConfigError(f"cannot load PKCS#11 module {self.module}") from exc
        if _LIB_GENERATION.get(self.module, _FORK_GENERATION) != _FORK_GENERATION:
            # Loaded before a fork: SoftHSM's state is the parent's, so C_Finalize + C_Initialize.
            try:
                _reinitialize(lib)
            except p11e.PKCS11Error:
                pass
        _LIB_GENERATION[self.module] = _FORK_GENERATION
        try:
            try:
                token = lib.get_token(token_label=self.token_label)
            except p11e.NoSuchToken:
                # SoftHSM reads its token directory at C_Initialize: a token created since (by
                # `v2gpki hsm init` in another process) appears only after re-initialisation.
                # Still missing: raised as it is (transient), because SoftHSM also reports a token that
                # exists as missing while another process rewrites its token.object; _run retries with
                # back-off and calls it a configuration error only when every attempt said so.
                _reinitialize(lib)
                token = lib.get_token(token_label=self.token_label)
        except p11e.MultipleTokensReturned as exc:
            raise HSMConfigError(f"PKCS#11 token label {self.token_label!r} is ambiguous") from exc
        try:
            self._session = token.open(user_pin=self._pin, rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as exc:
            raise HSMConfigError(f"wrong user PIN for PKCS#11 token {self.token_label!r}") from exc
        except p11e.PinLocked as exc:
            raise HSMConfigError(f"user PIN of PKCS#11 token {self.token_label!r} is locked") from exc
        except p11e.UserAlreadyLoggedIn:
            self._session = token.open(rw=True)
        self._lib = lib
        self._generation = _FORK_GENERATION
        self._epoch = _LIB_EPOCH
        self._keys.clear()
        self._opened_once = True

    def _drop_session(self) -> None:
        self._session = None
        self._keys.clear()

    def _run(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(session)`` under the process lock with bounded retries and the circuit breaker."""
        with _LOCK:
            half_open = self._breaker.check()
            last: BaseException | None = None
            attempts = HALF_OPEN_ATTEMPTS if half_open else self.retries + 1
            attempt = 0
            while attempt < attempts:
                opening = False
                try:
                    if (self._session is None or self._generation != _FORK_GENERATION
                            or self._epoch != _LIB_EPOCH):
                        # Handles from before a fork or a re-initialisation are dead or, worse, reused.
                        self._drop_session()
                        opening = True
                        self._open()
                        opening = False
                    result = fn(self._session)
                    self._breaker.success()
                    return result
                except HSMError:
                    raise
                except p11e.MechanismInvalid as exc:
                    # The token does not offer what this call needs (a network HSM or PKCS#11 remoting with
                    # fewer mechanisms than SoftHSM2): a configuration error, never retried.
                    raise HSMConfigError(
                        f"PKCS#11 token {self.token_label!r} does not offer a mechanism this operation needs "
                        f"(`v2gpki init` lists what the token lacks)") from exc
                except BaseException as exc:
                    # While a session is being opened, any PKCS#11 error is retried: SoftHSM reads its
                    # token files at C_Initialize/C_GetTokenInfo/C_Login while other processes rewrite
                    # them (every C_Login rewrites token.object), and answers with assorted codes. The
                    # configuration errors (wrong or locked PIN, ambiguous label) are HSMConfigError by
                    # then and are never retried.
                    if not (_is_transient(exc) or (opening and isinstance(exc, p11e.PKCS11Error))):
                        raise
                    if opening and not half_open:  # processes starting together: let the token files settle
                        attempts = max(attempts, OPEN_ATTEMPTS)
                    last = exc
                    log.warning("transient PKCS#11 error (%s), attempt %d", type(exc).__name__, attempt + 1)
                    self._drop_session()
                    if self._lib is not None:
                        try:
                            with _open_lock(self.module):
                                _reinitialize(self._lib)
                        except Exception:  # noqa: BLE001 - the next attempt opens afresh or fails clearly
                            pass
                    # Jittered: processes that collided at C_Login would otherwise retry in step.
                    time.sleep(random.uniform(0.5, 1.0) * min(0.05 * (2**attempt), 0.5))
                attempt += 1
            if half_open or (self._opened_once and isinstance(last, _GONE)):
                # The token this store reached before is gone (its files moved away, a network HSM or its
                # client's connection down): open the breaker now, so that the requests that follow fail
                # in milliseconds with HSMUnavailable (503 + Retry-After) instead of each paying the retries.
                self._breaker.trip()
            else:
                self._breaker.failure()  # also for a missing token: later calls fail fast, not after the retries
            if isinstance(last, p11e.NoSuchToken) and not self._opened_once:
                # every attempt, and this store never saw the token: a configuration error (a wrong label or
                # module, or an HSM not reachable at start-up; later calls look again). A token that was
                # there and is gone (its files moved away, a network HSM partition offline) is an outage:
                # HSMUnavailable, and the store finds it again when it is back.
                raise HSMConfigError(
                    f"PKCS#11 token {self.token_label!r} not found (never reached by this process: check "
                    f"V2GPKI_TOKEN_LABEL and V2GPKI_PKCS11_MODULE, or that the HSM is reachable)") from last
            raise HSMUnavailable(
                f"HSM unavailable: token {self.token_label!r} failed {attempts} times "
                f"({type(last).__name__})"
            ) from last

    # -- key lookup ----------------------------------------------------------------------------------

    def _find(self, session: Any, label: str, cls: ObjectClass) -> Any:
        try:
            return session.get_key(object_class=cls, label=label)
        except p11e.NoSuchKey as exc:
            if label in self._seen:
                raise _KeyVanished(label) from exc
            raise KeyNotFoundError(f"no key {label!r} in token {self.token_label!r}") from exc

    def _refresh(self) -> bool:
        """Re-initialise the library so that the next call reads the token afresh — at most every
        REFRESH_SECONDS (a key asked for but never seen here may exist in a token whose files changed
        under this process). True if it did."""
        with _LOCK:
            now = time.monotonic()
            if now - self._refreshed_at < self.REFRESH_SECONDS or self._lib is None:
                return False
            self._refreshed_at = now
            self._drop_session()
            try:
                with _open_lock(self.module):
                    _reinitialize(self._lib)
            except Exception:  # noqa: BLE001 - the next call opens afresh or fails clearly
                pass
            return True

    def _load(self, label: str) -> tuple[Any, PublicKey, KeyAlg]:
        cached = self._keys.get(label)
        if cached is not None:
            return cached

        def go(session: Any) -> tuple[Any, PublicKey, KeyAlg]:
            priv = self._find(session, label, ObjectClass.PRIVATE_KEY)
            pub = self._find(session, label, ObjectClass.PUBLIC_KEY)
            point = _decode_ec_point(bytes(pub[Attribute.EC_POINT]))
            pk: PublicKey
            if priv.key_type == KeyType.EC_EDWARDS:
                pk = ed448.Ed448PublicKey.from_public_bytes(point)
                alg = KeyAlg.ED448
            else:
                # An uncompressed point is 0x04 || X || Y: its length names the curve of the table.
                row = next((r for r in ALGORITHMS.values()
                            if r.curve is not None and len(point) == 1 + 2 * r.field_octets), None)
                if row is None or row.curve is None:
                    raise HSMConfigError(f"key {label!r} of token {self.token_label!r} is on a curve this PKI "
                                         f"does not use ({len(point)}-octet point)")
                pk = ec.EllipticCurvePublicKey.from_encoded_point(row.curve, point)
                alg = row.key_alg
            entry = (priv, pk, alg)
            self._keys[label] = entry
            self._seen.add(label)
            return entry

        try:
            return self._run(go)
        except KeyNotFoundError:
            if not self._refresh():
                raise
            return self._run(go)

    def probe(self) -> bool:
        """A logged-in session that sees at least one private key (readiness): C_FindObjects stopped at
        the first hit, so it does not stall signing on a large token. A token that showed keys to this
        store and shows none now is treated like a vanished key (re-initialised, retried, then
        HSMUnavailable); otherwise an empty view is refreshed once (rate-limited) before False."""

        def go(session: Any) -> bool:
            for _obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                return True
            if self._seen:
                raise _KeyVanished("*")
            return False

        return self._run(go) or (self._refresh() and self._run(go))

    def mechanisms(self) -> frozenset[str]:
        """The mechanisms the token's slot offers (C_GetMechanismList) as CKM_* names (a vendor code
        python-pkcs11 does not know as CKM_0x...): what `v2gpki init` checks a hierarchy against before
        creating anything (pki/hierarchy.py token_plan)."""

        def go(session: Any) -> frozenset[str]:
            out = set()
            for m in session.token.slot.get_mechanisms():
                name = getattr(m, "name", None)
                out.add(f"CKM_{name.lstrip('_')}" if name else f"CKM_0x{int(m):08x}")
            return frozenset(out)

        return self._run(go)

    # -- KeyStore protocol ---------------------------------------------------------------------------

    def create_key(self, label: str, alg: KeyAlg) -> PublicKey:
        def go(session: Any) -> None:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                if list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})):
                    raise KeyExistsError(f"key {label!r} already exists in token {self.token_label!r}")
            # Generated inside the token; never extractable (ISO 15118 / our key policy).
            priv_tmpl = {
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.PRIVATE: True,
                Attribute.TOKEN: True,
                Attribute.SIGN: True,
                Attribute.DERIVE: False,
            }
            pub_tmpl = {Attribute.TOKEN: True, Attribute.VERIFY: True}
            row = ALGORITHMS[alg]
            params = session.create_domain_parameters(
                KeyType.EC_EDWARDS if row.curve is None else KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters(row.pkcs11_curve)},
                local=True,
            )
            params.generate_keypair(
                store=True,
                label=label,
                id=label.encode(),
                mechanism=_mechanism(row.keygen_mechanism),
                private_template=priv_tmpl,
                public_template=pub_tmpl,
            )

        self._run(go)
        return self._load(label)[1]

    def public_key(self, label: str) -> PublicKey:
        return self._load(label)[1]

    def key_alg(self, label: str) -> KeyAlg:
        return self._load(label)[2]

    def signer(self, uri: str) -> PrivateKey:
        label = self._label_in_token(uri)
        _, pub, alg = self._load(label)
        row = ALGORITHMS[alg]
        if row.curve is None:
            assert isinstance(pub, ed448.Ed448PublicKey)
            return Pkcs11Ed448Key(self, label, pub, row)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        return Pkcs11ECKey(self, label, pub, row)

    def _label_in_token(self, uri: str) -> str:
        """The label of the private key ``uri`` names in this store's token; KeyUriError when it names no
        private key of this token (the message names the token and object, never a PIN: see hsm/uri.py)."""
        u = parse_key_uri(uri)
        if not isinstance(u, Pkcs11Uri):
            raise KeyUriError(f"the PKCS#11 key store of token {self.token_label!r} holds pkcs11: keys, "
                              f"not soft: ones")
        if u.token != self.token_label:
            raise KeyUriError(f"key URI names token {u.token!r}, but this key store is token {self.token_label!r}")
        if u.type != "private":
            raise KeyUriError(f"key URI names a {u.type!r} object; a signer needs type=private")
        return u.object

    def sign_raw(self, label: str, data: bytes, mechanism: Mechanism) -> bytes:
        """The one signing entry point of this store (every key object signs through it)."""
        def go(session: Any) -> bytes:
            priv = self._load_in(session, label)
            return bytes(priv.sign(data, mechanism=mechanism))

        observer = self.sign_observer
        if observer is None:
            return self._run(go)
        start = time.perf_counter()
        try:
            out = self._run(go)
        except Exception as exc:
            observer.failed("sign", exc)
            raise
        observer.signed(str(getattr(mechanism, "name", mechanism)).lower(), time.perf_counter() - start)
        return out

    def signature_failed(self, label: str) -> SignatureCheckFailed:
        """A signature made with ``label`` did not verify with the public key read at lookup: forget the
        cached handles (a stale handle naming another key is what this project once met after a token
        re-initialisation), log it, and return the error for the signer to raise."""
        with _LOCK:
            self._keys.pop(label, None)
        log.error("HSM signature with key %r of token %r does not verify with the key's public key: refused, "
                  "nothing stored", label, self.token_label)
        return SignatureCheckFailed(
            f"the HSM returned a signature that does not verify (key {label!r} of token {self.token_label!r}); "
            f"nothing was stored", label=label)

    def _load_in(self, session: Any, label: str) -> Any:
        cached = self._keys.get(label)
        if cached is not None:
            return cached[0]
        return self._find(session, label, ObjectClass.PRIVATE_KEY)

    def destroy(self, label: str) -> None:
        def go(session: Any) -> None:
            found = False
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})):
                    obj.destroy()
                    found = True
            if not found:
                raise KeyNotFoundError(f"no key {label!r} in token {self.token_label!r}")

        self._seen.discard(label)
        self._run(go)
        self._keys.pop(label, None)

    def discard_torn_keys(self) -> int:
        """Destroy public-key objects without a label: what a process killed inside C_GenerateKeyPair
        leaves in SoftHSM2, which writes a new object's attributes one by one (seen in
        tests/test_init_resume.py: SIGKILL during `v2gpki init`). This key store never creates an unlabeled
        object, a public key holds no secret, and its private half was never written (the pair is
        generated again under its label on resume). Returns how many were destroyed."""

        def go(session: Any) -> int:
            n = 0
            for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})):
                try:
                    label = obj[Attribute.LABEL]
                except Exception:  # noqa: BLE001 - an attribute that was never written reads as an error
                    label = ""
                if not label:
                    obj.destroy()
                    n += 1
            return n

        n = self._run(go)
        if n:
            log.warning("destroyed %d unlabeled public key object(s) left by an interrupted key generation", n)
        return n

    def list(self) -> list[str]:
        def go(session: Any) -> list[str]:
            return sorted(
                {str(o.label) for o in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})}
            )

        return self._run(go)

    def has_key(self, label: str) -> bool:
        try:
            self._load(label)
            return True
        except KeyNotFoundError:
            return False

    def uri(self, label: str) -> str:
        return str(Pkcs11Uri(self.token_label, label))

    def private_attribute(self, label: str, attr: Attribute) -> Any:
        """Read an attribute of the private key (used by tests to prove CKA_VALUE is refused)."""

        def go(session: Any) -> Any:
            return self._find(session, label, ObjectClass.PRIVATE_KEY)[attr]

        return self._run(go)

    def session_call(self, fn: Callable[[Any], T]) -> T:
        """Run arbitrary code with the live session under the lock (tests and tooling only)."""
        return self._run(fn)


# The hashes a caller may ask an EC key to sign with, from the algorithm table (hsm/algorithms.py): each
# with its hashlib constructor and the Prehashed ECDSA object the signature is verified with (built once:
# cryptography's ECDSA(...) constructor runs ABC checks that show per certificate).
_BY_HASH: dict[type[hashes.HashAlgorithm], Algorithm] = {
    type(r.hash): r for r in ALGORITHMS.values() if r.hash is not None}


class Pkcs11ECKey(ec.EllipticCurvePrivateKey):
    """A cryptography EC private key whose sign() runs CKM_ECDSA inside the token.

    cryptography's builders hand us the whole TBS and the signature algorithm; we hash here (SoftHSM has
    no CKM_ECDSA_SHA256) and encode r||s as DER (RFC 3279 §2.2.3 Ecdsa-Sig-Value). Every signature is
    verified with the public key read at lookup before it is returned (SignatureCheckFailed otherwise), as
    Boulder checks each signature of its signer: whatever a caller stores or sends has verified.
    """

    def __init__(self, store: Pkcs11KeyStore, label: str, pub: ec.EllipticCurvePublicKey, row: Algorithm | None = None
                 ) -> None:
        self._store = store
        self._label = label
        self._pub = pub
        self._row = row if row is not None else algorithm_of(pub)
        self._mechanism = _mechanism(self._row.sign_mechanism)

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._pub.curve

    @property
    def key_size(self) -> int:
        return self._pub.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._pub

    def sign(self, data: bytes | bytearray | memoryview, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
             ) -> bytes:
        data = bytes(data)
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA is supported")
        algo = signature_algorithm.algorithm
        if isinstance(algo, Prehashed):
            digest = data
            check: ec.ECDSA = signature_algorithm
        else:
            by_hash = _BY_HASH.get(type(algo))
            if by_hash is None or by_hash.hashlib_new is None or by_hash.ecdsa_prehashed is None:
                raise ValueError(f"unsupported hash {algo.name}")
            digest = by_hash.hashlib_new(data).digest()
            check = by_hash.ecdsa_prehashed
        raw = self._store.sign_raw(self._label, digest, self._mechanism)
        der = self._row.encode_signature(raw)
        try:
            self._pub.verify(der, digest, check)
        except InvalidSignature:
            raise self._store.signature_failed(self._label) from None
        return der

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise HSMError("ECDH with token CA keys is not offered")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise HSMError("private key is not extractable from the token")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise HSMError("private key is not extractable from the token")

    def __copy__(self) -> Pkcs11ECKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11ECKey:
        return self


class Pkcs11Ed448Key(ed448.Ed448PrivateKey):
    """Ed448 (pure EdDSA, RFC 8032) inside the token: CKM_EDDSA with no parameters. Every signature is
    verified with the public key read at lookup before it is returned (see Pkcs11ECKey)."""

    def __init__(self, store: Pkcs11KeyStore, label: str, pub: ed448.Ed448PublicKey, row: Algorithm | None = None
                 ) -> None:
        self._store = store
        self._label = label
        self._pub = pub
        self._row = row if row is not None else algorithm_of(pub)
        self._mechanism = _mechanism(self._row.sign_mechanism)

    def public_key(self) -> ed448.Ed448PublicKey:
        return self._pub

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        data = bytes(data)
        sig = self._row.encode_signature(self._store.sign_raw(self._label, data, self._mechanism))
        try:
            self._pub.verify(sig, data)
        except InvalidSignature:
            raise self._store.signature_failed(self._label) from None
        return sig

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise HSMError("private key is not extractable from the token")

    def private_bytes_raw(self) -> bytes:
        raise HSMError("private key is not extractable from the token")

    def __copy__(self) -> Pkcs11Ed448Key:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11Ed448Key:
        return self
