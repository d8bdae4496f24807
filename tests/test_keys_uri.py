"""#23 item 5: keys by URI. ``KeyStore.signer(uri)`` is the one way to get a signing key: an RFC 7512
``pkcs11:`` URI for the PKCS#11 store (SoftHSM2 here), ``soft:<label>`` for the software twin (hsm/uri.py).
A malformed URI, one of an unknown scheme, or one naming another store's key is a typed KeyUriError whose
message never carries a PIN; every CA row names its key by URI and the engine signs through it.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed448

from hsm.algorithms import ALGORITHMS, KeyAlg, key_alg_of
from hsm.errors import HSMError, KeyNotFoundError, KeyUriError
from hsm.keystore import KeyStore, certified_signer
from hsm.pkcs11 import DEFAULT_MODULE, Pkcs11KeyStore
from hsm.soft import SoftKeyStore
from hsm.uri import Pkcs11Uri, SoftUri, key_label, parse_key_uri
from pki.context import Context
from tests.conftest import TEST_PIN, make_token

TOKEN = "t-keys-uri"
PIN_LIKE = "123456-secret-pin"


@pytest.fixture(scope="module")
def p11(token_root: Any) -> Pkcs11KeyStore:
    make_token(token_root, TOKEN)
    return Pkcs11KeyStore(DEFAULT_MODULE, TOKEN, TEST_PIN)


@pytest.fixture(params=["pkcs11", "soft"])
def store(request: pytest.FixtureRequest, p11: Pkcs11KeyStore) -> KeyStore:
    return p11 if request.param == "pkcs11" else SoftKeyStore()


@pytest.mark.parametrize("alg", list(KeyAlg))
def test_signer_by_uri_signs_with_the_key_the_uri_names(store: KeyStore, alg: KeyAlg) -> None:
    label = f"u-{alg.value}-{uuid.uuid4().hex[:8]}"
    pub = store.create_key(label, alg)
    uri = store.uri(label)
    assert parse_key_uri(uri).label == key_label(uri) == label
    signer = store.signer(uri)
    assert signer.public_key() == pub and key_alg_of(signer) is alg
    row = ALGORITHMS[alg]
    sig = row.sign(signer, b"by uri")
    if row.ecdsa is None:
        assert isinstance(pub, ed448.Ed448PublicKey)
        pub.verify(sig, b"by uri")
    else:
        pub.verify(sig, b"by uri", row.ecdsa)  # type: ignore[call-arg, union-attr]
    assert certified_signer(store, uri, pub, "the test certificate").public_key() == pub


def test_uri_schemes(p11: Pkcs11KeyStore) -> None:
    uri = p11.uri("ca-cpo sub/2")
    assert uri == f"pkcs11:token={TOKEN};object=ca-cpo%20sub%2F2;type=private"
    assert Pkcs11Uri.parse(uri) == Pkcs11Uri(TOKEN, "ca-cpo sub/2")
    assert SoftKeyStore().uri("ca-cpo-sub2") == "soft:ca-cpo-sub2" == str(SoftUri("ca-cpo-sub2"))
    assert parse_key_uri("soft:a%20b") == SoftUri("a b")


@pytest.mark.parametrize("uri", [
    "",
    "ca-cpo-sub2",  # a bare label: keys are named by URI now
    "file:///etc/key.pem",
    "pkcs11:",
    "pkcs11:token=t-keys-uri",  # no object
    f"pkcs11:token=t-keys-uri;{PIN_LIKE}",  # an attribute without '='
    f"pkcs11:token=t-keys-uri;object=k?pin-value={PIN_LIKE}",  # RFC 7512 §2.3: a PIN in the URI
    f"pkcs11:token=t-keys-uri;object=k;pin-value={PIN_LIKE}",
    f"pkcs11:token=t-keys-uri;object=k?module-name=x&pin-source=file:/{PIN_LIKE}",
    "soft:",
    f"{PIN_LIKE}:object",
])
def test_malformed_or_unknown_uri_is_a_typed_error_without_the_pin(store: KeyStore, uri: str) -> None:
    with pytest.raises(KeyUriError) as err:
        store.signer(uri)
    assert isinstance(err.value, HSMError) and isinstance(err.value, ValueError)
    assert PIN_LIKE not in str(err.value) and TEST_PIN not in str(err.value)


def test_uri_of_another_store_is_refused(p11: Pkcs11KeyStore) -> None:
    soft = SoftKeyStore()
    soft.create_key("k", KeyAlg.P256)
    p11_label = f"o-{uuid.uuid4().hex[:8]}"
    p11.create_key(p11_label, KeyAlg.P256)
    with pytest.raises(KeyUriError, match="soft: keys only"):
        soft.signer(p11.uri(p11_label))
    with pytest.raises(KeyUriError, match="not soft: ones"):
        p11.signer(soft.uri("k"))
    with pytest.raises(KeyUriError, match="names token 'other-token'"):
        p11.signer(str(Pkcs11Uri("other-token", p11_label)))
    with pytest.raises(KeyUriError, match="type=private"):
        p11.signer(str(Pkcs11Uri(TOKEN, p11_label, type="public")))
    assert TEST_PIN not in repr(p11)


def test_missing_key_is_key_not_found(store: KeyStore) -> None:
    with pytest.raises(KeyNotFoundError):
        store.signer(store.uri(f"absent-{uuid.uuid4().hex[:8]}"))


def test_engine_signs_every_ca_through_its_rows_uri(ctx: Context) -> None:
    """Every CA row names its key by URI; the engine's signer for it is the key store's signer(uri)."""
    ks = ctx.keystore
    for h in ctx.engine.cas():
        assert h.row.key_uri == ks.uri(key_label(h.row.key_uri))
        assert isinstance(parse_key_uri(h.row.key_uri), Pkcs11Uri)
        assert ks.signer(h.row.key_uri).public_key() == h.cert.public_key()
        assert ctx.engine.ca_signer(h).public_key() == h.cert.public_key()


def test_value_objects_are_frozen_and_replaced_not_mutated(sqlite_ctx: Context) -> None:
    """CAHandle, IssueRequest, the prepared TBS, Issued, the algorithm rows and key URIs raise on assignment;
    reload_cas replaces a CA's handle (same parsed certificate, fresh row) and keeps its checked signer."""
    from pki.csr import check_csr, parse_csr
    from pki.issuance import IssueRequest
    from pki.trustlist import Signer as TrustListSigner
    from tests.conftest import csr_pem

    eng = sqlite_ctx.engine
    h = eng.ca("cpo-sub2")
    checked = check_csr(sqlite_ctx.profiles.get("secc"),
                        parse_csr(csr_pem("DE*FRZ*E0000001*1", dc="CPO")))
    req = IssueRequest(profile="secc", public_key=checked.public_key, subject=checked.subject, ca="cpo-sub2")
    prep = eng._prepare(req)
    issued = eng.issue(req)
    objs: list[tuple[object, str, object]] = [
        (h, "alg", KeyAlg.P521), (h, "row", h.row), (req, "ca", "other"), (prep, "tbs", b""),
        (prep, "signer_uri", "soft:x"), (issued, "der", b""), (ALGORITHMS[KeyAlg.P256], "hash", None),
        (Pkcs11Uri("t", "o"), "object", "p"), (SoftUri("a"), "label", "b"),
        (TrustListSigner("soft:x", issued.cert, []), "key_uri", "soft:y"),
    ]
    from pki.ocsp import responder_for

    iss = responder_for(sqlite_ctx).issuer("cpo-sub2")
    assert iss is not None and iss.signer is not None
    objs += [(iss, "signer", None), (iss.signer, "key_uri", "soft:x")]  # the OCSP responder's signers too
    for obj, attr, value in objs:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    signer = eng.ca_signer(h)
    eng.reload_cas()
    h2 = eng.ca("cpo-sub2")
    assert h2 is not h and h2.cert is h.cert and h2.row.serial == h.row.serial
    assert eng.cached_ca_signer(h2) is signer and eng.ca_signer(h2) is signer
    eng.forget_ca_signer(h2)
    assert eng.cached_ca_signer(h2) is None and eng.ca_signer(h2).public_key() == h.cert.public_key()
