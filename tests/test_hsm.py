"""The PKCS#11 key store (SoftHSM2) under load and under failure, and the KeyStore conformance suite.

Facts behind these tests (shared architecture notes): python-pkcs11 initialises the library without
CKF_OS_LOCKING_OK, so SoftHSM does no locking of its own and two threads inside it crash the process;
SoftHSM does not notice fork(). hsm/pkcs11.py answers with one process-wide lock and a re-initialisation
in a forked child. Both are exercised here for real: a crash would take the test process down.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from pkcs11 import Attribute
from pkcs11 import exceptions as p11e

import hsm.pkcs11 as hp
from hsm.errors import HSMConfigError, HSMUnavailable, KeyExistsError, KeyNotFoundError
from hsm.keystore import KeyAlg, KeyStore, PrivateKey, PublicKey
from hsm.pkcs11 import DEFAULT_MODULE, Pkcs11KeyStore
from hsm.soft import SoftKeyStore
from tests.conftest import TEST_PIN, make_token

TOKEN = "t-hsm"


@pytest.fixture(scope="module")
def token(token_root: Any) -> str:
    make_token(token_root, TOKEN)
    return TOKEN


@pytest.fixture(scope="module")
def store(token: str) -> Pkcs11KeyStore:
    return Pkcs11KeyStore(DEFAULT_MODULE, token, TEST_PIN)


@pytest.fixture(scope="module")
def keys(store: Pkcs11KeyStore) -> dict[KeyAlg, str]:
    """One key per algorithm in the test token, created once."""
    out = {}
    for alg in KeyAlg:
        label = f"k-{alg.value}-{uuid.uuid4().hex[:8]}"
        store.create_key(label, alg)
        out[alg] = label
    return out


def _sign(key: PrivateKey, msg: bytes) -> bytes:
    if isinstance(key, ed448.Ed448PrivateKey):
        return key.sign(msg)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    # ISO 15118-2 [V2G2-006] ECDSA-SHA256 with P-256; -20 pairs P-521 with SHA-512.
    h = hashes.SHA512() if key.curve.key_size == 521 else hashes.SHA256()
    return key.sign(msg, ec.ECDSA(h))


def _verify(pub: PublicKey, msg: bytes, sig: bytes) -> None:
    if isinstance(pub, ed448.Ed448PublicKey):
        pub.verify(sig, msg)
    else:
        h = hashes.SHA512() if pub.curve.key_size == 521 else hashes.SHA256()
        pub.verify(sig, msg, ec.ECDSA(h))


# -- signatures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", list(KeyAlg))
def test_token_signatures_verify_with_cryptography(store: Pkcs11KeyStore, keys: dict[KeyAlg, str],
                                                   alg: KeyAlg) -> None:
    label = keys[alg]
    pub = store.public_key(label)
    expected = {KeyAlg.P256: "secp256r1", KeyAlg.P521: "secp521r1"}
    if alg is KeyAlg.ED448:
        assert isinstance(pub, ed448.Ed448PublicKey)
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == expected[alg]
    signer = store.signer(store.uri(label))
    assert signer.public_key() == pub
    for msg in (b"", b"tbs", os.urandom(5000)):
        sig = _sign(signer, msg)
        _verify(pub, msg, sig)
        with pytest.raises(InvalidSignature):
            _verify(pub, msg + b"x", sig)
    if alg is not KeyAlg.ED448:  # a prehashed digest signs the same way (CKM_ECDSA over the digest)
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        assert isinstance(signer, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
        h = hashes.SHA512() if alg is KeyAlg.P521 else hashes.SHA256()
        digest = hashes.Hash(h)
        digest.update(b"prehashed")
        pub.verify(signer.sign(digest.finalize(), ec.ECDSA(Prehashed(h))), b"prehashed", ec.ECDSA(h))


# -- threads and processes -------------------------------------------------------------------------------


def test_threads_sign_at_once_through_one_store(store: Pkcs11KeyStore, keys: dict[KeyAlg, str]) -> None:
    """Eight threads: signing with every algorithm, beside attribute reads and object searches — the mix
    that crashed SoftHSM without the process-wide lock."""
    n_threads, per_thread = 8, 30
    barrier = threading.Barrier(n_threads)
    results: list[tuple[KeyAlg, bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            barrier.wait()
            algs = list(KeyAlg)
            for j in range(per_thread):
                alg = algs[(i + j) % len(algs)]
                msg = f"thread {i} message {j}".encode()
                sig = _sign(store.signer(store.uri(keys[alg])), msg)
                with lock:
                    results.append((alg, msg, sig))
                if j % 5 == i % 5:
                    assert set(keys.values()) <= set(store.list())
                    assert store.private_attribute(keys[alg], Attribute.SENSITIVE) is True
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n_threads * per_thread
    pubs = {alg: store.public_key(label) for alg, label in keys.items()}
    for alg, msg, sig in results:
        _verify(pubs[alg], msg, sig)


def _child(store_or_params: Pkcs11KeyStore | tuple[str, str, str], labels: dict[str, str], barrier: Any,
           queue: Any, idx: int) -> None:
    """Sign in a child process: with fork, through the store object inherited from the parent (which has
    a live session there); with spawn, through a store built from its parameters."""
    try:
        if isinstance(store_or_params, Pkcs11KeyStore):
            store = store_or_params
        else:
            store = Pkcs11KeyStore(*store_or_params)
        barrier.wait(timeout=60)
        out = []
        for j in range(40):
            for alg, label in labels.items():
                msg = f"process {idx} message {j}".encode()
                out.append((alg, msg, _sign(store.signer(store.uri(label)), msg)))
        queue.put((idx, os.getpid(), hp._FORK_GENERATION, store._generation, out, None))
    except BaseException as exc:  # noqa: BLE001 - sent to the parent
        queue.put((idx, os.getpid(), -1, -1, [], repr(exc)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_processes_use_the_token_at_once(store: Pkcs11KeyStore, keys: dict[KeyAlg, str], method: str) -> None:
    # The parent uses the token first, so a forked child inherits a live library, session and key handles.
    labels = {alg.value: label for alg, label in keys.items()}
    for label in labels.values():
        _sign(store.signer(store.uri(label)), b"parent before")
    mpctx: Any = mp.get_context(method)
    barrier = mpctx.Barrier(2)
    queue = mpctx.Queue()
    arg: Pkcs11KeyStore | tuple[str, str, str] = (
        store if method == "fork" else (store.module, store.token_label, TEST_PIN))
    procs = [mpctx.Process(target=_child, args=(arg, labels, barrier, queue, i)) for i in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    pubs = {alg.value: store.public_key(label) for alg, label in keys.items()}
    for idx, pid, fork_gen, store_gen, sigs, err in got:
        assert err is None, f"child {idx}: {err}"
        assert pid != os.getpid()
        assert len(sigs) == 40 * len(labels)
        for alg, msg, sig in sigs:
            _verify(pubs[alg], msg, sig)
        if method == "fork":
            # The child saw the fork and rebuilt its library state instead of using the parent's session.
            assert fork_gen == hp._FORK_GENERATION + 1 and store_gen == fork_gen
    # The children did not disturb the parent's own session.
    for label in keys.values():
        _verify(store.public_key(label), b"parent after", _sign(store.signer(store.uri(label)), b"parent after"))


def _open_child(params: tuple[str, str, str], barrier: Any, queue: Any, idx: int) -> None:
    try:
        barrier.wait(timeout=60)
        ks = Pkcs11KeyStore(*params)
        for _ in range(6):
            ks.list()
            ks._drop_session()  # the next call opens again: C_GetTokenInfo and C_Login once more
        queue.put((idx, None))
    except BaseException as exc:  # noqa: BLE001 - sent to the parent
        queue.put((idx, f"{type(exc).__name__}: {exc}"))


def test_processes_starting_at_once_all_open_the_token(store: Pkcs11KeyStore, keys: dict[KeyAlg, str]) -> None:
    """`bash scripts/run.sh` and deploy's stack start the API and its workers, the OCSP responder and the
    Celery worker at the same moment, each loading SoftHSM and logging in. SoftHSM rewrites token.object
    at every C_Login; a process reading it meanwhile got CKR_GENERAL_ERROR, no token, or
    CKR_USER_PIN_NOT_INITIALIZED (a stack start once failed with "the HSM token cannot be used"), and
    retrying alone did not settle it. hsm/pkcs11.py now serialises opening across processes (a lock file)
    and retries what is left. Eight fresh processes open the token at once, six times each: every open
    must succeed."""
    mpctx: Any = mp.get_context("spawn")
    n = 8
    barrier = mpctx.Barrier(n)
    queue = mpctx.Queue()
    params = (store.module, store.token_label, TEST_PIN)
    procs = [mpctx.Process(target=_open_child, args=(params, barrier, queue, i)) for i in range(n)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, err in got if err is not None] == []
    assert [p.exitcode for p in procs] == [0] * n


def test_reinitialisation_by_another_store_makes_this_one_reopen(
        store: Pkcs11KeyStore, keys: dict[KeyAlg, str], token_root: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A token created after the library was loaded makes the next store that opens it re-initialise the
    library (SoftHSM reads its token directory at C_Initialize). Session and key handles cached by every
    other store die with that, and SoftHSM reuses the numbers: a store that kept them once signed with a
    key of another token. Each store must notice and reopen before touching a handle."""
    label = keys[KeyAlg.P256]
    _sign(store.signer(store.uri(label)), b"cache the handles")
    old_session = store._session
    fresh = f"t-hsm-new-{uuid.uuid4().hex[:6]}"
    make_token(token_root, fresh)
    other = Pkcs11KeyStore(DEFAULT_MODULE, fresh, TEST_PIN)
    other.create_key("intruder", KeyAlg.P256)
    _sign(other.signer(other.uri("intruder")), b"busy")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hsm.pkcs11"):
        sig = _sign(store.signer(store.uri(label)), b"after")
    _verify(store.public_key(label), b"after", sig)
    assert store._session is not old_session
    assert not caplog.records  # reopened up front, not after an error on a dead (or reused) handle


# -- retries, circuit breaker, configuration errors --------------------------------------------------------


class _FlakySession:
    """A python-pkcs11 Session whose key lookups raise DeviceError (CKR_DEVICE_ERROR) while ``left`` > 0."""

    def __init__(self, real: Any, counter: dict[str, int]) -> None:
        self._real = real
        self._counter = counter

    def _maybe_fail(self) -> None:
        if self._counter["left"] > 0:
            self._counter["left"] -= 1
            self._counter["raised"] += 1
            raise p11e.DeviceError()

    def get_key(self, *a: Any, **kw: Any) -> Any:
        self._maybe_fail()
        return self._real.get_key(*a, **kw)

    def get_objects(self, *a: Any, **kw: Any) -> Any:
        self._maybe_fail()
        return self._real.get_objects(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture()
def flaky(token: str, keys: dict[KeyAlg, str], monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[tuple[Pkcs11KeyStore, dict[str, int]]]:
    """A store (3 retries, breaker after 2 failed operations, long cool-down) whose every new session is
    flaky, with the back-off sleeps recorded instead of slept."""
    ks = Pkcs11KeyStore(DEFAULT_MODULE, token, TEST_PIN, retries=3, breaker_threshold=2, breaker_cooldown=3600)
    counter = {"left": 0, "raised": 0, "opens": 0, "slept_ms": 0}
    real_open = ks._open

    def open_flaky() -> None:
        counter["opens"] += 1
        real_open()
        ks._session = _FlakySession(ks._session, counter)

    monkeypatch.setattr(ks, "_open", open_flaky)
    monkeypatch.setattr(hp.time, "sleep", lambda s: counter.__setitem__("slept_ms", counter["slept_ms"] + int(s * 1000)))
    yield ks, counter


def test_transient_failures_recover_within_the_retry_bound(flaky: tuple[Pkcs11KeyStore, dict[str, int]],
                                                           keys: dict[KeyAlg, str]) -> None:
    ks, counter = flaky
    label = keys[KeyAlg.P256]
    counter["left"] = ks.retries  # fail 3 times; the 4th attempt (retries + 1) succeeds
    pub = ks.public_key(label)
    assert counter["raised"] == ks.retries and counter["left"] == 0
    assert counter["opens"] == ks.retries + 1  # each retry on a fresh session
    assert 0 < counter["slept_ms"] <= 50 + 100 + 200  # bounded exponential back-off
    _verify(pub, b"m", _sign(ks.signer(ks.uri(label)), b"m"))
    assert ks._breaker.failures == 0


def test_persistent_failure_opens_the_breaker_and_fails_fast(flaky: tuple[Pkcs11KeyStore, dict[str, int]],
                                                             keys: dict[KeyAlg, str]) -> None:
    ks, counter = flaky
    label = keys[KeyAlg.P256]
    counter["left"] = 10**6  # the token keeps failing
    for _ in range(ks._breaker.threshold):
        with pytest.raises(HSMUnavailable, match="HSM unavailable") as exc_info:
            ks.public_key(label)
        assert isinstance(exc_info.value.__cause__, p11e.DeviceError)
    assert counter["raised"] == ks._breaker.threshold * (ks.retries + 1)  # every attempt reached the token
    # Open: refused at once, without touching the token.
    raised, opens = counter["raised"], counter["opens"]
    for _ in range(5):
        with pytest.raises(HSMUnavailable, match="HSM unavailable"):
            ks.list()
    assert (counter["raised"], counter["opens"]) == (raised, opens)
    # After the cool-down (moved back rather than waited for) one attempt goes through and closes it.
    counter["left"] = 0
    assert ks._breaker.opened_at is not None
    ks._breaker.opened_at -= ks._breaker.cooldown + 1
    assert label in ks.list()
    assert ks._breaker.opened_at is None and ks._breaker.failures == 0


def test_failed_reinitialisation_is_retried_not_a_config_error(token: str, keys: dict[KeyAlg, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """C_Initialize failing with CKR_GENERAL_ERROR (seen when another process rewrites a token file at the
    same moment: SoftHSM rewrites token.object at each C_Login, e.g. in the spawn test above) is part of
    an outage — retried, then HSMUnavailable — not a "cannot load module" configuration error that would
    skip the retries and the breaker."""
    ks = Pkcs11KeyStore(DEFAULT_MODULE, token, TEST_PIN, retries=3, breaker_threshold=5)
    label = keys[KeyAlg.P256]
    pub = ks.public_key(label)
    real_lib = hp.pkcs11.lib
    fail = {"left": 2, "calls": 0}

    def flaky_lib(module: str) -> Any:
        fail["calls"] += 1
        if fail["left"] > 0:
            fail["left"] -= 1
            raise p11e.GeneralError()
        return real_lib(module)

    monkeypatch.setattr(hp.pkcs11, "lib", flaky_lib)
    monkeypatch.setattr(hp.time, "sleep", lambda s: None)
    ks._drop_session()  # the next call opens again, through the failing C_Initialize
    _verify(pub, b"m", _sign(ks.signer(ks.uri(label)), b"m"))
    assert fail == {"left": 0, "calls": 3}
    fail["left"] = 10
    ks._drop_session()
    with pytest.raises(HSMUnavailable, match="HSM unavailable"):
        ks.list()
    assert fail["calls"] == 3 + max(ks.retries + 1, hp.OPEN_ATTEMPTS)  # failing while opening: the open bound


def test_wrong_pin_is_a_config_error_and_not_retried(token_root: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its own token: SoftHSM reports CKR_USER_ALREADY_LOGGED_IN before checking the PIN when another
    # session of this process is logged in, so a token some other store uses would not test the PIN.
    label = "t-hsm-pin"
    make_token(token_root, label)
    ks = Pkcs11KeyStore(DEFAULT_MODULE, label, "not-the-pin", retries=3, breaker_threshold=1)
    opens = {"n": 0}
    real_open = ks._open

    def counting_open() -> None:
        opens["n"] += 1
        real_open()

    monkeypatch.setattr(ks, "_open", counting_open)
    for n in (1, 2):
        with pytest.raises(HSMConfigError, match="wrong user PIN") as exc_info:
            ks.list()
        assert opens["n"] == n  # one attempt per call: no retries
        assert "not-the-pin" not in str(exc_info.value)
    assert ks._breaker.opened_at is None  # a configuration error is not an outage


def test_missing_pin_and_unknown_token_are_config_errors(token: str) -> None:
    with pytest.raises(HSMConfigError, match="no user PIN"):
        Pkcs11KeyStore(DEFAULT_MODULE, token, "")
    ks = Pkcs11KeyStore(DEFAULT_MODULE, "no-such-token", TEST_PIN)
    with pytest.raises(HSMConfigError, match="not found"):
        ks.list()
    assert TEST_PIN not in repr(ks)


# -- KeyStore conformance: the software twin and SoftHSM2 behave alike --------------------------------------


@pytest.fixture(params=["soft", "pkcs11"])
def any_store(request: pytest.FixtureRequest) -> KeyStore:
    if request.param == "soft":
        return SoftKeyStore()
    ks = request.getfixturevalue("store")
    assert isinstance(ks, KeyStore)
    return ks


@pytest.mark.parametrize("alg", list(KeyAlg))
def test_conformance_lifecycle(any_store: KeyStore, alg: KeyAlg) -> None:
    label = f"conf-{alg.value}-{uuid.uuid4().hex[:8]}"
    assert not any_store.has_key(label) and label not in any_store.list()
    pub = any_store.create_key(label, alg)
    try:
        assert isinstance(pub, ed448.Ed448PublicKey if alg is KeyAlg.ED448 else ec.EllipticCurvePublicKey)
        assert any_store.public_key(label) == pub
        assert any_store.has_key(label) and label in any_store.list()
        signer = any_store.signer(any_store.uri(label))
        assert signer.public_key() == pub
        _verify(pub, b"conformance", _sign(signer, b"conformance"))
        with pytest.raises(KeyExistsError):
            any_store.create_key(label, alg)
        with pytest.raises(KeyExistsError):  # another algorithm does not make the label free
            any_store.create_key(label, KeyAlg.P256 if alg is not KeyAlg.P256 else KeyAlg.P521)
        assert any_store.public_key(label) == pub  # the failed creates changed nothing
        assert label in any_store.uri(label)
    finally:
        any_store.destroy(label)
    assert not any_store.has_key(label) and label not in any_store.list()
    for op in (any_store.public_key, any_store.destroy):
        with pytest.raises(KeyNotFoundError):
            op(label)
    with pytest.raises(KeyNotFoundError):  # the signer is asked for by URI (hsm/uri.py)
        any_store.signer(any_store.uri(label))


def test_conformance_labels_are_independent(any_store: KeyStore) -> None:
    a, b = (f"conf-ind-{uuid.uuid4().hex[:8]}" for _ in range(2))
    pa = any_store.create_key(a, KeyAlg.P256)
    pb = any_store.create_key(b, KeyAlg.P256)
    try:
        assert pa != pb
        any_store.destroy(a)
        assert any_store.public_key(b) == pb and not any_store.has_key(a)
    finally:
        any_store.destroy(b)


def test_torn_unlabeled_public_key_is_discarded_and_labeled_keys_kept(store: Pkcs11KeyStore,
                                                                      keys: dict[KeyAlg, str]) -> None:
    """What SIGKILL inside C_GenerateKeyPair leaves in SoftHSM2 (attributes are written one by one): a
    public-key object without a label and no private half. `v2gpki init` removes it on resume
    (pki/hierarchy.py); every labeled key stays."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    def torn(session: Any) -> None:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        pub, priv = params.generate_keypair(store=True, public_template={Attribute.TOKEN: True},
                                            private_template={Attribute.TOKEN: True})
        priv.destroy()  # the private half was never written

    def unlabeled(session: Any) -> int:
        return sum(1 for o in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}) if not o.label)

    before = store.list()
    store.session_call(torn)
    assert store.session_call(unlabeled) == 1
    assert store.discard_torn_keys() == 1
    assert store.session_call(unlabeled) == 0 and store.discard_torn_keys() == 0
    assert store.list() == before
    for label in keys.values():
        store.public_key(label)  # still there, public and private


def test_half_a_pair_under_our_label_is_replaced_on_resume(store: Pkcs11KeyStore) -> None:
    """The other torn shape: the public half written under the label, the private half not. Resuming
    `v2gpki init` (pki.hierarchy._ensure_key) replaces it with a whole pair instead of failing on
    'key exists' or leaving an orphan."""
    from pkcs11 import ObjectClass

    from pki.hierarchy import _ensure_key

    label = f"torn-{uuid.uuid4().hex[:8]}"
    store.create_key(label, KeyAlg.P256)
    store.session_call(lambda s: [o.destroy() for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                                                      Attribute.LABEL: label})])
    # the store's cache of loaded keys and the labels it has seen (a fresh process would have neither;
    # in this one, a seen key that disappears counts as the token going away: HSMUnavailable)
    store._keys.pop(label, None)
    store._seen.discard(label)
    with pytest.raises(KeyNotFoundError):
        store.public_key(label)
    pub = _ensure_key(store, label, KeyAlg.P256)
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert store.public_key(label).public_bytes(*spki) == pub.public_bytes(*spki)
    count = store.session_call(lambda s: sum(1 for _ in s.get_objects({Attribute.LABEL: label})))
    assert count == 2  # one public, one private
    store.destroy(label)


def test_token_exists_matches_the_whole_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token labelled "t-audit-ext" is no token "t-audit": the prefix match made init_softhsm_token skip
    creating "t-audit" whenever the longer label came first, and the CLI then found no token."""
    from hsm.token import TokenPaths, init_softhsm_token, token_exists

    monkeypatch.setenv("SOFTHSM2_CONF", os.environ.get("SOFTHSM2_CONF", ""))  # restored after the test

    init_softhsm_token(tmp_path, "lab-ext", pin="pin-1234-5678")
    assert token_exists(TokenPaths(tmp_path), "lab-ext")
    assert not token_exists(TokenPaths(tmp_path), "lab")
    init_softhsm_token(tmp_path, "lab", pin="pin-1234-5678")
    assert token_exists(TokenPaths(tmp_path), "lab")
