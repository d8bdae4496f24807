"""OCSP responder core: RFC 6960, the RFC 5019 lightweight profile, and RFC 8954 nonces.

How a request is answered (api/responders.py only moves bytes; everything OCSP happens here):

* The request is parsed by a small strict DER reader (cryptography's ``load_der_ocsp_request`` refuses
  requests with more than one CertID, which RFC 6960 §4.1.1 allows). Anything that is not a DER
  OCSPRequest — garbage, truncated, trailing bytes, a nonce outside 1..32 octets (RFC 8954 §2.1), an
  unknown critical extension (RFC 6960 §4.4) — gets the ``malformedRequest`` response (§2.3).
* Each CertID is matched on (hash algorithm, issuerNameHash, issuerKeyHash) against every CA we hold,
  with the hashes precomputed for SHA-1/256/384/512 (§4.1.1 lets the client choose; OpenSSL asks SHA-1
  unless ``-sha256`` comes first, OCPP 2.0.1 chargers ask SHA-256/384/512). An issuer we do not serve,
  or serve without a delegated OCSP signer, gets ``unauthorized`` (§2.3, RFC 5019 §2.2.3).
* Responses are signed by the CA's delegated OCSP signer (§4.2.2.2: EKU id-kp-OCSPSigning, issued by
  the CA itself; key ``ocsp-<ca>`` in the HSM), carry that certificate in ``certs`` and name it by key
  hash (responderID byKey, §4.2.1 — RFC 5019 §2.2.2 recommends byKey).
* One CertID and no nonce (RFC 5019 §2.1.1's shape, and what chargers send): the pre-signed response is
  served. The table ``ocsp_response`` holds one current SHA-1-CertID response per certificate; it is
  produced at issuance and re-signed at once on revocation (Engine hooks, installed by
  :func:`install_hooks`). Other hash algorithms are re-signed from it on demand and kept in a bounded
  in-process cache keyed by the stored response, so they follow it when it changes.
* Serving never trusts the cache blindly: the lookup joins the certificate row, and a stored response
  whose status differs from the certificate's, that predates the revocation, the current signer, or has
  less than half its validity left, is re-signed on the spot. A revocation therefore shows on the next
  request even if a hook failed or ran in another process.
* A nonce (RFC 8954) or several CertIDs: signed live, nonce echoed, CertIDs echoed byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from sqlalchemy import and_, bindparam, delete, or_, select
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import SQLAlchemyError

from hsm.errors import HSMError
from hsm.keystore import KeyAlg, PrivateKey, certified_signer
from pki.der import (  # noqa: F401 - re-exported: pki.crl and the tests build DER through pki.ocsp
    DerError,
    bit_string,
    der_header,
    der_int,
    der_oid,
    generalized_time,
    read_tlv,
    seq,
    spki_bits,
    tlv,
)
from pki.errors import BadStatusRequest, MalformedOCSPRequest
from pki.store.db import Database, utcnow
from pki.store.fast import Prepared, run_together
from pki.store.models import Certificate, CertificateAuthority, OcspResponseCache

if TYPE_CHECKING:
    from pki.context import Context
    from pki.issuance import Issued

log = logging.getLogger("v2gpki.ocsp")

def spki_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING value without the unused-bits octet (RFC 6960 §4.1.1 KeyHash)."""
    return spki_bits(cert.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))


# ---------------------------------------------------------------------------------------------------
# OIDs and fixed encodings
# ---------------------------------------------------------------------------------------------------

HASH_OIDS: dict[str, str] = {
    "sha1": "1.3.14.3.2.26",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
_HASH_BY_OID_DER: dict[bytes, str] = {der_oid(o)[2:]: n for n, o in HASH_OIDS.items()}
HASH_LEN = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# AlgorithmIdentifier with NULL parameters, as OpenSSL and cryptography put it in CertIDs.
_HASH_ALGID: dict[str, bytes] = {n: seq(der_oid(o), b"\x05\x00") for n, o in HASH_OIDS.items()}

OID_NONCE = "1.3.6.1.5.5.7.48.1.2"  # id-pkix-ocsp-nonce (RFC 6960 §4.4.1, RFC 8954)
_NONCE_OID_DER = der_oid(OID_NONCE)[2:]
OID_BASIC = "1.3.6.1.5.5.7.48.1.1"  # id-pkix-ocsp-basic
_BASIC_OID = der_oid(OID_BASIC)

SIG_ALGID: dict[KeyAlg, bytes] = {
    KeyAlg.P256: seq(der_oid("1.2.840.10045.4.3.2")),  # ecdsa-with-SHA256 [V2G2-006]; RFC 5758: no params
    KeyAlg.P521: seq(der_oid("1.2.840.10045.4.3.4")),  # ecdsa-with-SHA512 (ISO 15118-20)
    KeyAlg.ED448: seq(der_oid("1.3.101.113")),  # id-Ed448, pure EdDSA (RFC 8410)
}

# RFC 5280 §5.3.1 CRLReason codes (shared with the CRL builder).
REASON_CODES: dict[str, int] = {
    "unspecified": 0, "keyCompromise": 1, "cACompromise": 2, "affiliationChanged": 3, "superseded": 4,
    "cessationOfOperation": 5, "certificateHold": 6, "removeFromCRL": 8, "privilegeWithdrawn": 9,
    "aACompromise": 10,
}

# OCSPResponseStatus (RFC 6960 §4.2.1)
SUCCESSFUL, MALFORMED, INTERNAL_ERROR, TRY_LATER, SIG_REQUIRED, UNAUTHORIZED = 0, 1, 2, 3, 5, 6
STATUS_NAMES = {0: "successful", 1: "malformedRequest", 2: "internalError", 3: "tryLater",
                5: "sigRequired", 6: "unauthorized"}

MAX_CERT_IDS = 32  # bounded work per request; far beyond what any client sends


def sign_bytes(key: PrivateKey, alg: KeyAlg, data: bytes) -> bytes:
    if isinstance(key, ed448.Ed448PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA512() if alg is KeyAlg.P521 else hashes.SHA256()))


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertIdReq:
    raw: bytes  # the CertID DER as received (echoed in live responses)
    hash_alg: str | None  # None: a hash algorithm we do not know
    name_hash: bytes
    key_hash: bytes
    serial: int


@dataclass(frozen=True)
class OcspRequest:
    cert_ids: list[CertIdReq]
    nonce_ext_value: bytes | None  # the extnValue OCTET STRING contents, echoed verbatim (RFC 8954 §2.1)


def _parse_extensions(buf: bytes, s: int, e: int) -> list[tuple[bytes, bool, int, int]]:
    """Extensions ::= SEQUENCE SIZE (1..MAX) OF Extension → [(oid content, critical, value start, end)]."""
    tag, ls, le = read_tlv(buf, s, e)
    if tag != 0x30 or le != e or ls == le:
        raise DerError("bad Extensions")
    out = []
    p = ls
    while p < le:
        tag, xs, xe = read_tlv(buf, p, le)
        if tag != 0x30:
            raise DerError("bad Extension")
        tag, os_, oe = read_tlv(buf, xs, xe)
        if tag != 0x06:
            raise DerError("bad extnID")
        q = oe
        critical = False
        tag, bs, be = read_tlv(buf, q, xe)
        if tag == 0x01:
            if be - bs != 1 or buf[bs] not in (0x00, 0xFF):
                raise DerError("bad BOOLEAN")
            critical = buf[bs] == 0xFF  # an explicit FALSE is not DER, but harmless: tolerated
            q = be
            tag, bs, be = read_tlv(buf, q, xe)
        if tag != 0x04 or be != xe:
            raise DerError("bad extnValue")
        out.append((buf[os_:oe], critical, bs, be))
        p = xe
    return out


def parse_request(der: bytes) -> OcspRequest:
    """Parse a DER OCSPRequest (RFC 6960 §4.1.1). Raises MalformedOCSPRequest."""
    try:
        return _parse_request(der)
    except (DerError, IndexError, ValueError) as exc:
        raise MalformedOCSPRequest(f"not a DER OCSPRequest: {exc}") from None


def _parse_request(der: bytes) -> OcspRequest:
    n = len(der)
    tag, s, e = read_tlv(der, 0, n)
    if tag != 0x30 or e != n:
        raise DerError("OCSPRequest is not one SEQUENCE")
    tag, ts, te = read_tlv(der, s, e)
    if tag != 0x30:
        raise DerError("no tbsRequest")
    if te != e:
        # optionalSignature [0] EXPLICIT: accepted and ignored — RFC 5019 §2.1.1 (we never require one).
        tag, _, se = read_tlv(der, te, e)
        if tag != 0xA0 or se != e:
            raise DerError("trailing data after tbsRequest")
    tag, vs, ve = read_tlv(der, ts, te)
    if tag == 0xA0:  # version [0] EXPLICIT DEFAULT v1 (DER omits it; an explicit v1 is tolerated)
        tag, is_, ie = read_tlv(der, vs, ve)
        if tag != 0x02 or ie != ve or der[is_:ie] != b"\x00":
            raise DerError("unsupported version")
        tag, vs, ve = read_tlv(der, ve, te)
    if tag == 0xA1:  # requestorName [1] EXPLICIT GeneralName: informational, ignored
        tag, vs, ve = read_tlv(der, ve, te)
    if tag != 0x30:
        raise DerError("no requestList")
    list_end = ve
    cert_ids: list[CertIdReq] = []
    q = vs
    while q < list_end:
        tag, rs, re_ = read_tlv(der, q, list_end)
        if tag != 0x30:
            raise DerError("bad Request")
        cert_ids.append(_parse_certid(der, rs, re_))
        if len(cert_ids) > MAX_CERT_IDS:
            raise DerError(f"more than {MAX_CERT_IDS} CertIDs")
        q = re_
    if not cert_ids:
        raise DerError("empty requestList")
    nonce: bytes | None = None
    p = list_end
    if p < te:
        tag, xs, xe = read_tlv(der, p, te)
        if tag != 0xA2 or xe != te:
            raise DerError("unexpected data in tbsRequest")
        seen: set[bytes] = set()
        for oid, critical, bs, be in _parse_extensions(der, xs, xe):
            if oid in seen:
                raise DerError("duplicate extension")  # RFC 5280 §4.2 applies to Extensions
            seen.add(oid)
            if oid == _NONCE_OID_DER:
                # RFC 8954 §2.1: Nonce ::= OCTET STRING (SIZE(1..32)), DER inside extnValue.
                tag, ns, ne = read_tlv(der, bs, be)
                if tag != 0x04 or ne != be or not 1 <= ne - ns <= 32:
                    raise DerError("nonce must be an OCTET STRING of 1..32 octets (RFC 8954)")
                nonce = der[bs:be]
            elif critical:
                raise DerError("unsupported critical request extension")
    return OcspRequest(cert_ids, nonce)


def _parse_certid(der: bytes, rs: int, re_: int) -> CertIdReq:
    tag, cs, ce = read_tlv(der, rs, re_)
    if tag != 0x30:
        raise DerError("bad CertID")
    if ce != re_:
        tag, xs, xe = read_tlv(der, ce, re_)  # singleRequestExtensions [0] EXPLICIT
        if tag != 0xA0 or xe != re_:
            raise DerError("bad Request")
        for _oid, critical, _bs, _be in _parse_extensions(der, xs, xe):
            if critical:
                raise DerError("unsupported critical single request extension")
    tag, as_, ae = read_tlv(der, cs, ce)
    if tag != 0x30:
        raise DerError("bad hashAlgorithm")
    tag, os_, oe = read_tlv(der, as_, ae)
    if tag != 0x06:
        raise DerError("bad hashAlgorithm OID")
    if oe != ae:  # parameters: NULL or absent (RFC 5754 §2 accepts both for SHA-2)
        if der[oe:ae] != b"\x05\x00":
            raise DerError("unexpected hash parameters")
    alg = _HASH_BY_OID_DER.get(der[os_:oe])
    tag, ns, ne = read_tlv(der, ae, ce)
    if tag != 0x04:
        raise DerError("bad issuerNameHash")
    tag, ks, ke = read_tlv(der, ne, ce)
    if tag != 0x04:
        raise DerError("bad issuerKeyHash")
    tag, ss, se = read_tlv(der, ke, ce)
    if tag != 0x02 or se != ce or ss == se:
        raise DerError("bad serialNumber")
    if alg is not None and (ne - ns != HASH_LEN[alg] or ke - ks != HASH_LEN[alg]):
        raise DerError("hash length does not match hashAlgorithm")
    serial = int.from_bytes(der[ss:se], "big", signed=True)
    raw = der[rs:ce]
    # X.690 §8.3.2: an INTEGER's first nine bits are never all zeros or all ones. The CertID goes back
    # in the response (RFC 6960 §4.2.1); echoing a padded serial would make our answer undecodable to
    # the client's DER parser, so answer for the same CertID with the serial re-encoded minimally.
    if se - ss > 1 and ((der[ss] == 0 and der[ss + 1] < 0x80) or (der[ss] == 0xFF and der[ss + 1] >= 0x80)):
        raw = seq(der[cs:ke], der_int(serial))
    return CertIdReq(raw, alg, der[ns:ne], der[ks:ke], serial)


def certid_der(alg: str, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    return seq(_HASH_ALGID[alg], tlv(0x04, name_hash), tlv(0x04, key_hash), der_int(serial))


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    der: bytes
    status: str  # OCSPResponseStatus name
    cert_status: str | None = None  # good | revoked | unknown (single-CertID answers)
    this_update: datetime | None = None
    next_update: datetime | None = None
    cacheable: bool = False  # RFC 5019 §6.2: no nonce, successful → HTTP caching allowed

    @property
    def successful(self) -> bool:
        return self.status == "successful"


def error_answer(code: int) -> Answer:
    # OCSPResponse with no responseBytes (RFC 6960 §4.2.1): unsigned by design.
    return Answer(seq(b"\x0a\x01" + bytes((code,))), STATUS_NAMES[code])


MALFORMED_ANSWER = error_answer(MALFORMED)
UNAUTHORIZED_ANSWER = error_answer(UNAUTHORIZED)
TRY_LATER_ANSWER = error_answer(TRY_LATER)
INTERNAL_ERROR_ANSWER = error_answer(INTERNAL_ERROR)


def _cert_status(status: str, revoked_at: datetime | None, reason: str | None) -> bytes:
    if status == "good":
        return b"\x80\x00"  # good [0] IMPLICIT NULL
    if status == "unknown":
        return b"\x82\x00"  # unknown [2] IMPLICIT UnknownInfo (NULL)
    assert revoked_at is not None
    info = generalized_time(revoked_at)
    code = REASON_CODES.get(reason or "unspecified", 0)
    if status == "hold":
        code = REASON_CODES["certificateHold"]  # RFC 6960 §2.2: on hold = revoked, reason certificateHold
    if code:  # RFC 5280 §5.3.1: leave the reason out rather than say 'unspecified'
        info += tlv(0xA0, tlv(0x0A, bytes((code,))))
    return tlv(0xA1, info)  # revoked [1] IMPLICIT RevokedInfo


def single_response(certid: bytes, status: str, revoked_at: datetime | None, reason: str | None,
                    this_update: datetime, next_update: datetime) -> bytes:
    return seq(certid, _cert_status(status, revoked_at, reason), generalized_time(this_update),
               tlv(0xA0, generalized_time(next_update)))


@dataclass
class _Signer:
    label: str
    alg: KeyAlg
    cert_der: bytes
    key_hash: bytes  # SHA-1 of the signer's public key: responderID byKey (RFC 6960 §4.2.1)
    not_before: datetime
    not_after: datetime
    key: PrivateKey | None = None


@dataclass
class _Issuer:
    name: str
    hashes: dict[str, tuple[bytes, bytes]]  # alg → (issuerNameHash, issuerKeyHash)
    signer: _Signer | None


K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


_CERT = Certificate.__table__  # type: ignore[attr-defined]
_RESP = OcspResponseCache.__table__  # type: ignore[attr-defined]
_CA = CertificateAuthority.__table__  # type: ignore[attr-defined]

_STATUS_OF = {"valid": "good", "revoked": "revoked", "hold": "hold"}

def read_engine(db: Database) -> SAEngine:
    """An engine for read-only statements. On SQLite the service's engine opens every transaction with
    BEGIN IMMEDIATE (one writer at a time); reads need no write lock under WAL, so they go through the
    database's autocommit twin (each SELECT its own snapshot)."""
    return db.autocommit if db.is_sqlite else db.engine


class DatabaseUnavailable(Exception):
    """A driver error on the hot path (mapped to tryLater like SQLAlchemy's errors)."""


def _as_utc(v: Any) -> Any:
    if isinstance(v, str):  # SQLite stores DATETIME as text
        v = datetime.fromisoformat(v)
    if isinstance(v, datetime) and v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return v


class _FastLookup:
    """The hot-path query (status + pre-signed response) on raw DB-API connections: SQLAlchemy's own
    per-execute work (compile cache, result metadata, pool reset) costs several times the query itself.
    A few dedicated autocommit connections per process; at most ``size`` lookups run at once."""

    def __init__(self, reader: SAEngine, size: int = 8) -> None:
        self._engine = reader
        self._sqlite = reader.dialect.name == "sqlite"
        ph = "?" if self._sqlite else "%s"
        self._sql = (
            "SELECT c.status, c.revoked_at, c.revocation_reason, o.status, o.this_update, o.next_update, o.der "
            "FROM certificate c LEFT JOIN ocsp_response o ON o.issuer = c.issuer AND o.serial = c.serial "
            f"WHERE c.issuer = {ph} AND c.serial = {ph}"
        )
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(size)
        self._pid = os.getpid()

    def _connect(self) -> Any:
        fairy = self._engine.raw_connection()  # pool events (SQLite pragmas) apply
        if not self._sqlite:
            fairy.driver_connection.autocommit = True  # type: ignore[union-attr]  # no idle transactions
        fairy.detach()  # ours from now on: kept open, outside SQLAlchemy's pool accounting
        return fairy

    def lookup(self, issuer: str, serial: str) -> tuple[Any, ...] | None:
        if os.getpid() != self._pid:  # never share a socket with a parent process
            self._free, self._pid = [], os.getpid()
        with self._sem:
            with self._lock:
                conn = self._free.pop() if self._free else None
            try:
                if conn is None:
                    conn = self._connect()
                cur = conn.cursor()
                cur.execute(self._sql, (issuer, serial))
                row = cur.fetchone()
                cur.close()
            except Exception as exc:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001, S110 - already broken
                        pass
                raise DatabaseUnavailable(type(exc).__name__) from exc
            with self._lock:
                self._free.append(conn)
        if row is None:
            return None
        st, rev, reason, ost, oth, onx, oder = row
        return st, _as_utc(rev), reason, ost, _as_utc(oth), _as_utc(onx), oder


_RESP_WRITE_COLS = ("issuer", "serial", "hash_alg", "status", "this_update", "next_update", "der")


def _resp_insert(db: Database) -> Any:
    """INSERT of a stored response with named bindparams, so it can be compiled once (pki/store/fast.py):
    the pre-signer writes after every issuance batch, and Core's per-call compilation and parameter
    processing showed in the contract-installation profile."""
    if db.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        ins: Any = sqlite_insert(_RESP)
    else:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        ins = pg_insert(_RESP)
    return ins.values({c: bindparam(c, type_=_RESP.c[c].type) for c in _RESP_WRITE_COLS})


def _upsert_stmt(db: Database) -> Prepared:
    ins = _resp_insert(db)
    key = ("issuer", "serial")
    return Prepared(ins.on_conflict_do_update(index_elements=list(key),
                                              set_={c: ins.excluded[c] for c in _RESP_WRITE_COLS if c not in key}))


def _insert_new_stmt(db: Database) -> Prepared:
    """INSERT … ON CONFLICT DO NOTHING: the first response of a certificate just issued. If a row already
    exists, a revocation (or a live request) wrote it after the issuance, so it is at least as current
    as 'good' — a late pre-sign must never overwrite it."""
    return Prepared(_resp_insert(db).on_conflict_do_nothing(index_elements=["issuer", "serial"]))


class Presigner:
    """Pre-signs the responses of newly issued certificates in a background thread (RFC 5019 §4:
    responses produced ahead of requests), so an enrollment or a contract installation answers without
    waiting for a second HSM signature and another transaction. Requests arriving first are signed live
    by the responder's fallback.

    Submitting only appends to a list: the thread is not woken per issuance batch (a wake-up per batch,
    under HTTP load several per request, cost more GIL hand-offs and SQLite write transactions than the
    signing itself) but collects what accumulated every PERIOD seconds; :meth:`flush` wakes it at once."""

    PERIOD = float(os.environ.get("V2GPKI_OCSP_PRESIGN_PERIOD_MS", "100")) / 1000

    def __init__(self, responder: OcspResponder) -> None:
        self.responder = responder
        self._cv = threading.Condition()
        self._queue: list[tuple[str, str]] = []
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        ref = weakref.ref(self)

        def reset_in_child() -> None:  # threads do not survive fork
            me = ref()
            if me is not None:
                me._cv, me._queue, me._busy, me._thread, me._pid = threading.Condition(), [], False, None, 0

        os.register_at_fork(after_in_child=reset_in_child)

    def submit(self, items: Iterable[tuple[str, str]]) -> None:
        with self._cv:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="v2gpki-ocsp-presign", daemon=True)
                self._thread.start()
            self._queue.extend(items)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is stored (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._cv.wait(self.PERIOD)  # woken early only by flush()
                    if not self._queue:
                        continue
                batch, self._queue = self._queue[:2000], self._queue[2000:]
                self._busy = True
            try:
                by_issuer: dict[str, list[str]] = {}
                for issuer, serial in batch:
                    by_issuer.setdefault(issuer, []).append(serial)
                for issuer, serials in by_issuer.items():
                    self.responder.presign_new(issuer, serials)
            except HSMError as exc:  # an outage, already logged by the key store: no traceback
                log.warning("pre-signing OCSP responses after issuance failed: %s", type(exc).__name__)
            except Exception:  # noqa: BLE001 - the live fallback or refresh() signs what is missing
                log.warning("pre-signing OCSP responses after issuance failed", exc_info=True)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


class SignBudget:
    """How many live OCSP signatures requests may cause: a token bucket per client address (``rate`` per
    second, ``burst``) and one for the whole process (``total_rate``, burst one second's worth; 0 = no
    process-wide bound). Requests with a nonce, several CertIDs, an unknown serial or a CertID hash
    algorithm not signed yet draw on it; re-signing a stored response that went stale does not (bounded by
    the number of certificates: it is stored and served afterwards). Thread-safe; bounded memory."""

    MAX_CLIENTS = 20_000  # buckets kept; beyond that the full ones (idle clients) are dropped first

    def __init__(self, rate: float, burst: int, total_rate: float) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self.total_rate = total_rate
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._total = (max(1.0, total_rate), time.monotonic())
        self.refused = 0

    def take(self, client: str | None) -> bool:
        """One live signature for ``client`` (None: an internal or authenticated caller, never limited)."""
        if client is None or self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            t_tokens, t_at = self._total
            if self.total_rate > 0:
                t_tokens = min(max(1.0, self.total_rate), t_tokens + (now - t_at) * self.total_rate)
            if tokens < 1.0 or (self.total_rate > 0 and t_tokens < 1.0):
                self._buckets[client] = (tokens, now)
                self._total = (t_tokens, now)
                self.refused += 1
                return False
            if len(self._buckets) >= self.MAX_CLIENTS and client not in self._buckets:
                self._prune(now)
            self._buckets[client] = (tokens - 1.0, now)
            self._total = (t_tokens - 1.0, now)
            return True

    def _prune(self, now: float) -> None:
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) >= self.MAX_CLIENTS:
            self._buckets.clear()  # a flood of addresses: forget them all (the process-wide bound stays)


class _OverBudget(Exception):
    """A live signature the client's budget does not allow (SignBudget)."""


class OcspResponder:
    """One per process and Context (see :func:`responder_for`). Thread-safe."""

    RELOAD_SECONDS = 60.0  # pick up new CAs / renewed signers from other processes
    MISS_RELOAD_SECONDS = 5.0  # an unknown issuer may be a new CA, but never reload per garbage request

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.keystore = ctx.keystore
        self.validity = timedelta(hours=ctx.settings.ocsp_validity_hours)
        # A pre-signed response is served while at least half its validity is left, then re-signed
        # (CA/B BR §4.9.10 style: refresh well before nextUpdate; chargers refresh about weekly).
        self.margin = self.validity / 2
        self._lock = threading.Lock()
        self._by_hash: dict[tuple[str, bytes, bytes], _Issuer] = {}
        self._by_name: dict[str, _Issuer] = {}
        self._loaded_at = -1e9
        self._miss_at = -1e9
        self._alt: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]] = _LRU(20_000)
        self._unknown: _LRU[tuple[str, bytes], tuple[bytes, datetime, datetime]] = _LRU(10_000)
        self._upsert = _upsert_stmt(self.db)
        self._insert_new = _insert_new_stmt(self.db)
        self.presigner = Presigner(self)
        self._reader = read_engine(self.db)
        self._fast = _FastLookup(self._reader)
        st = ctx.settings
        self.budget = SignBudget(st.ocsp_live_sign_rate, st.ocsp_live_sign_burst, st.ocsp_live_sign_total_rate)
        self._client = threading.local()  # the address the current request's live signatures are charged to

    # -- issuers -----------------------------------------------------------------------------------

    def reload(self) -> None:
        with self._reader.connect() as conn:
            cas = conn.execute(select(_CA.c.name, _CA.c.der)).all()
            now = utcnow()
            signers = conn.execute(
                select(_CERT.c.issuer, _CERT.c.der, _CERT.c.key_uri, _CERT.c.created_at)
                .where(_CERT.c.key_uri.is_not(None), _CERT.c.status == "valid",
                       _CERT.c.not_before <= now, _CERT.c.not_after > now)
                # Issuance order, not notBefore: notBefore is backdated by the profile's margin and clamped
                # to the CA's own (#27 item 4), so two signers issued within an hour can share it.
                .order_by(_CERT.c.created_at, _CERT.c.id)
            ).all()
        from pki.hierarchy import ocsp_key_label

        by_ca: dict[str, _Signer] = {}
        for issuer, der, key_uri, created_at in signers:
            base = ocsp_key_label(issuer)
            label = _label_of(key_uri)
            # The init-time signer key, or one renewed by the workers (pki/lifecycle.py: "<base>-r<time>").
            if label is None or not (label == base or label.startswith(base + "-r")):
                continue
            if key_uri != self.keystore.uri(label):
                continue
            cert = x509.load_der_x509_certificate(der)
            try:
                eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                continue
            if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                continue
            pub = cert.public_key()
            alg = (KeyAlg.ED448 if isinstance(pub, ed448.Ed448PublicKey)
                   else KeyAlg.P521 if isinstance(pub, ec.EllipticCurvePublicKey) and pub.key_size == 521
                   else KeyAlg.P256)
            old = self._by_name.get(issuer)
            key = old.signer.key if old and old.signer and old.signer.cert_der == der else None
            # ordered by issuance: the newest valid signer wins. Its `not_before` here is when it began to
            # sign (issuance, whole seconds): a response older than that was made by an earlier signer. The
            # certificate's notBefore is backdated (#27 item 4) and would keep those responses current.
            since = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
            by_ca[issuer] = _Signer(label, alg, der, hashlib.sha1(spki_key_bits(cert)).digest(),  # noqa: S324
                                    max(cert.not_valid_before_utc, since.replace(microsecond=0)),
                                    cert.not_valid_after_utc, key)
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
        if signer.key is None:
            # The token key must be the one the delegated signer's certificate names; its signer then verifies
            # every response signature with it before the response is stored or sent (hsm/pkcs11.py).
            certified = x509.load_der_x509_certificate(signer.cert_der).public_key()
            signer.key = certified_signer(self.keystore, signer.label, certified,  # type: ignore[arg-type]
                                          "its OCSP signer certificate")
        return signer.key

    def _times(self, signer: _Signer, now: datetime) -> tuple[datetime, datetime]:
        # A response must not outlive the certificate that signs it.
        return now, min(now + self.validity, signer.not_after)

    def _sign(self, signer: _Signer, singles: Sequence[bytes], produced_at: datetime,
              nonce_ext_value: bytes | None = None) -> bytes:
        parts = [tlv(0xA2, tlv(0x04, signer.key_hash)),  # responderID byKey [2] EXPLICIT KeyHash
                 generalized_time(produced_at), seq(*singles)]
        if nonce_ext_value is not None:
            # RFC 8954 §2.1: the response carries the request's nonce extension, value unchanged.
            parts.append(tlv(0xA1, seq(seq(der_oid(OID_NONCE), tlv(0x04, nonce_ext_value)))))
        tbs = seq(*parts)  # version v1 is DEFAULT: omitted
        sig = sign_bytes(self._key(signer), signer.alg, tbs)
        basic = seq(tbs, SIG_ALGID[signer.alg], bit_string(sig), tlv(0xA0, seq(signer.cert_der)))
        return seq(b"\x0a\x01\x00", tlv(0xA0, seq(_BASIC_OID, tlv(0x04, basic))))

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
            chunk = todo[i : i + 500]
            with self._reader.connect() as conn:
                rows = conn.execute(
                    select(_CERT.c.serial, _CERT.c.status, _CERT.c.revoked_at, _CERT.c.revocation_reason)
                    .where(_CERT.c.issuer == issuer, _CERT.c.serial.in_(chunk))
                ).all()
            done += self._store(iss, [(r[0], _STATUS_OF.get(r[1], "revoked"), r[2], r[3]) for r in rows])
        return done

    def presign_new(self, issuer: str, serials: Sequence[str]) -> int:
        """Sign 'good' for certificates just issued (no status query: they were issued valid) and store
        them insert-only, so a revocation that got there first is never overwritten (see Presigner)."""
        iss = self.issuer(issuer)
        if iss is None or iss.signer is None:
            return 0
        return self._store(iss, [(s, "good", None, None) for s in serials], stmt=self._insert_new)

    def _store(self, iss: _Issuer, rows: Sequence[tuple[str, str, datetime | None, str | None]], *,
               stmt: Prepared | None = None) -> int:
        nh, kh = iss.hashes["sha1"]
        values = []
        for serial_hex, status, revoked_at, reason in rows:
            der, this, nxt = self._sign_one(iss, certid_der("sha1", nh, kh, int(serial_hex, 16)),
                                            status, revoked_at, reason)
            values.append({"issuer": iss.name, "serial": serial_hex, "hash_alg": "sha1", "status": status,
                           "this_update": this, "next_update": nxt, "der": der})
        if values:
            # One query with COMMIT on PostgreSQL (run_together): the pre-signer's batch after every
            # issuance cost ≈ 0.24 ms per response through SQLAlchemy's executemany.
            with self.db.engine.begin() as conn:
                run_together(conn, [(self._upsert if stmt is None else stmt, values)], commit=True)
        return len(values)

    # Certificates issued within this window are checked for a missing stored response by refresh() (index
    # on certificate.created_at); an older one without a response is signed on its first request (and by
    # refresh(full=True), which reads every certificate of each CA).
    MISSING_LOOKBACK = timedelta(days=2)

    def refresh(self, *, margin: timedelta | None = None, batch: int = 500, full: bool = False) -> int:
        """Re-sign stored responses that are missing, stale (less than ``margin`` left; default half
        the validity), out of step with the certificate's status, or made by a replaced signer. For a
        periodic worker (RFC 5019 §4: responses are produced ahead of requests).

        Every candidate is found by index (#28, migration 0008), so the work grows with what is due, not
        with the number of certificates: responses due (next_update), made before the current signer
        (this_update), not 'good' for a valid certificate (issuer, status), revoked / on-hold certificates
        whose response does not say so (certificate issuer, status), and certificates issued in the last
        MISSING_LOOKBACK without one (created_at). ``full=True``: also every other certificate without a
        response (reads each CA's certificates)."""
        self.reload()
        now = utcnow()
        horizon = now + (self.margin if margin is None else margin)
        total = 0
        c, o = _CERT, _RESP
        joined = c.outerjoin(o, and_(o.c.issuer == c.c.issuer, o.c.serial == c.c.serial))
        issuers = {name: iss for name, iss in self._by_name.items() if iss.signer is not None}
        if not issuers:
            return 0
        oldest_signer = max(iss.signer.not_before for iss in issuers.values() if iss.signer is not None)
        # Across issuers, each query with the one predicate its index serves (a per-issuer filter would let
        # the planner prefer (issuer, …) indexes, which read every certificate of the CA).
        candidates: dict[str, dict[str, None]] = {name: {} for name in issuers}
        global_queries = [
            select(o.c.issuer, o.c.serial, o.c.this_update).where(o.c.next_update < horizon),
            select(o.c.issuer, o.c.serial, o.c.this_update).where(o.c.this_update < oldest_signer),
            select(c.c.issuer, c.c.serial, c.c.created_at).select_from(joined)
            .where(c.c.created_at >= now - self.MISSING_LOOKBACK, o.c.id.is_(None)),
        ]
        with self._reader.connect() as conn:
            for q in global_queries:
                for issuer, serial, _t in conn.execute(q):
                    if issuer in candidates:
                        candidates[issuer][serial] = None
            for name in issuers:
                per_issuer = [
                    # responses not 'good' (a valid certificate whose response says otherwise: a release)
                    select(o.c.serial).where(o.c.issuer == name, o.c.status.in_(("revoked", "hold"))),
                    # revoked / on-hold certificates whose response does not say so
                    select(c.c.serial).select_from(joined)
                    .where(c.c.issuer == name, c.c.status.in_(("revoked", "hold")))
                    .where(or_(o.c.id.is_(None), o.c.status != c.c.status, o.c.this_update < c.c.revoked_at)),
                ]
                if full:
                    per_issuer.append(select(c.c.serial).select_from(joined)
                                      .where(c.c.issuer == name, c.c.not_after > now, o.c.id.is_(None)))
                for q in per_issuer:
                    candidates[name].update((r[0], None) for r in conn.execute(q))
        for name, iss in issuers.items():
            assert iss.signer is not None
            live = and_(c.c.issuer == name, c.c.not_after > now)
            wanted = list(candidates[name])
            for i in range(0, len(wanted), batch):
                part = wanted[i : i + batch]
                with self._reader.connect() as conn:
                    rows = conn.execute(
                        select(c.c.serial, c.c.status, c.c.revoked_at, c.c.revocation_reason, o.c.status,
                               o.c.this_update, o.c.next_update)
                        .select_from(joined).where(live, c.c.serial.in_(part))).all()
                due = []
                for serial, st, rev_at, reason, o_st, o_this, o_next in rows:
                    want = _STATUS_OF.get(st, "revoked")
                    o_this, o_next, rev_at = _as_utc(o_this), _as_utc(o_next), _as_utc(rev_at)
                    if (o_st is None or o_st != want or o_next < horizon or o_this < iss.signer.not_before
                            or (want != "good" and rev_at is not None and o_this < rev_at)):
                        due.append((serial, want, rev_at, reason))
                if due:
                    total += self._store(iss, due)
        # Responses of expired certificates are not renewed; once past their nextUpdate they are dead
        # weight (a late request for such a certificate is signed live). By index on next_update.
        with self.db.engine.begin() as conn:
            conn.execute(delete(_RESP).where(_RESP.c.next_update < now))
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
        except (HSMError, SQLAlchemyError, DatabaseUnavailable) as exc:
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
        with self._reader.connect() as conn:
            row = conn.execute(
                select(_CERT.c.status, _CERT.c.revoked_at, _CERT.c.revocation_reason)
                .where(_CERT.c.issuer == issuer, _CERT.c.serial == format(serial, "x"))
            ).first()
        if row is None:
            return None
        return _STATUS_OF.get(row[0], "revoked"), row[1], row[2]

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
        """One CertID, no nonce. With ``sign=False``, None instead of signing anything."""
        assert iss.signer is not None
        signer = iss.signer
        now = utcnow()
        row = None
        serial_hex = format(serial, "x") if serial > 0 else ""
        if serial > 0:
            row = self._fast.lookup(iss.name, serial_hex)
        if row is None:
            hit = self._unknown.get((iss.name, raw_certid))
            if hit is None or hit[2] - now < self.margin:
                if not sign:
                    return None
                self._spend()  # any serial can be asked for: each new one is a signature
                hit = self._sign_one(iss, raw_certid, "unknown", None, None)
                self._unknown.put((iss.name, raw_certid), hit)
            return Answer(hit[0], "successful", "unknown", hit[1], hit[2], cacheable=True)
        c_status, revoked_at, reason, o_status, o_this, o_next, o_der = row
        want = _STATUS_OF.get(c_status, "revoked")
        fresh = (o_der is not None and o_status == want and o_next - now >= self.margin
                 and o_this >= signer.not_before and (want == "good" or o_this >= revoked_at))
        if fresh:
            der1, this, nxt = bytes(o_der), o_this, o_next
        elif not sign:
            return None
        else:
            nh, kh = iss.hashes["sha1"]
            der1, this, nxt = self._sign_one(iss, certid_der("sha1", nh, kh, serial), want, revoked_at, reason)
            try:
                with self.db.engine.begin() as conn:
                    self._upsert.execute(conn, {"issuer": iss.name, "serial": serial_hex, "hash_alg": "sha1",
                                                "status": want, "this_update": this, "next_update": nxt,
                                                "der": der1})
            except SQLAlchemyError as exc:  # the answer is right; storing it is an optimisation
                log.warning("could not store a pre-signed OCSP response: %s", type(exc).__name__)
        cert_status = "good" if want == "good" else "revoked"
        if alg == "sha1":
            return Answer(der1, "successful", cert_status, this, nxt, cacheable=True)
        # Other CertID hash algorithms: re-signed from the stored response, cached under it, so a new
        # stored response (revocation, refresh) makes a new one.
        key = (alg, der1)
        hit = self._alt.get(key)
        if hit is None or hit[2] - now < self.margin:
            if not sign:
                return None
            self._spend()
            nh, kh = iss.hashes[alg]
            hit = self._sign_one(iss, certid_der(alg, nh, kh, serial), want, revoked_at, reason)
            self._alt.put(key, hit)
        return Answer(hit[0], "successful", cert_status, hit[1], hit[2], cacheable=True)

    # -- OCPP 2.0.1 GetCertificateStatus -----------------------------------------------------------

    def ocpp_status(self, hash_alg: str, name_hash: bytes, key_hash: bytes, serials: Sequence[int]) -> Answer:
        """Answer one OCPP OCSPRequestData. ``serials``: the readings of the serial to try, in order."""

        def go() -> Answer:
            iss = self._issuer_for(hash_alg, name_hash, key_hash)
            if iss is None or iss.signer is None:
                return UNAUTHORIZED_ANSWER
            serial = serials[0]
            if len(serials) > 1:
                hexes = [format(s, "x") for s in serials if s > 0]
                with self._reader.connect() as conn:
                    found = {r[0] for r in conn.execute(
                        select(_CERT.c.serial).where(_CERT.c.issuer == iss.name, _CERT.c.serial.in_(hexes)))}
                serial = next((s for s in serials if s > 0 and format(s, "x") in found), serials[0])
            nh, kh = iss.hashes[hash_alg]
            ans = self._cached(iss, hash_alg, certid_der(hash_alg, nh, kh, serial), serial)
            assert ans is not None
            return ans

        return self._guarded(go)


# ---------------------------------------------------------------------------------------------------
# OCPP 2.0.1 OCSPRequestData decoding (shared profiles doc §5: encodings differ between chargers)
# ---------------------------------------------------------------------------------------------------

_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
OCPP_HASH_ALGS = {"SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


def decode_ocpp_hash(text: str, alg: str, field: str) -> bytes:
    """Hex (any case; EVerest, OCPP 2.1 text) or base64 / URL-safe base64 (Josev). The digest length
    decides: hex of n octets has 2n characters, base64 about 4n/3, so the readings never collide."""
    t = text.strip()
    n = HASH_LEN[alg]
    if _HEX_RE.match(t) and len(t) == 2 * n:
        return bytes.fromhex(t)
    if _B64_RE.match(t):
        s = t.replace("-", "+").replace("_", "/").rstrip("=")
        try:
            raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == n:
            return raw
    raise BadStatusRequest(f"{field} is neither hex nor base64 of a {alg.upper()} digest ({n} octets)")


def decode_ocpp_serial(text: str) -> list[int]:
    """Hex without leading zeros (EVerest, OCPP 2.1) or decimal (Josev): an all-digit serial is tried
    both ways — hex first (what the OCPP 2.1 text says), then decimal."""
    t = text.strip().replace(":", "").replace(" ", "")
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t or not _HEX_RE.match(t) or len(t) > 40:
        raise BadStatusRequest("serialNumber must be hexadecimal or decimal digits (at most 40)")
    readings = [int(t, 16)]
    if t.isdigit() and int(t, 10) != readings[0]:
        readings.append(int(t, 10))
    return readings


def ocpp_lookup(ctx: Context, hash_algorithm: str, issuer_name_hash: str, issuer_key_hash: str,
                serial_number: str) -> Answer:
    alg = OCPP_HASH_ALGS.get(hash_algorithm.strip().upper())
    if alg is None:
        raise BadStatusRequest("hashAlgorithm must be SHA256, SHA384 or SHA512 (OCPP 2.0.1 HashAlgorithmEnumType)")
    nh = decode_ocpp_hash(issuer_name_hash, alg, "issuerNameHash")
    kh = decode_ocpp_hash(issuer_key_hash, alg, "issuerKeyHash")
    return responder_for(ctx).ocpp_status(alg, nh, kh, decode_ocpp_serial(serial_number))


# ---------------------------------------------------------------------------------------------------
# Per-Context registry and Engine hooks
# ---------------------------------------------------------------------------------------------------

_RESPONDERS: weakref.WeakKeyDictionary[Any, OcspResponder] = weakref.WeakKeyDictionary()
_RESPONDER_ONLY: weakref.WeakSet[Any] = weakref.WeakSet()
_REG_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # Never share possibly-held locks with the parent (Celery prefork, multiprocessing): the child builds
    # its own responder on first use (pki/store/db.py drops the read engine's pooled connections).
    _RESPONDERS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def responder_for(ctx: Context) -> OcspResponder:
    """The OcspResponder of this Context (keyed by its Engine; built on first use)."""
    r = _RESPONDERS.get(ctx.engine)
    if r is None:
        with _REG_LOCK:
            r = _RESPONDERS.get(ctx.engine)
            if r is None:
                r = OcspResponder(ctx)
                _RESPONDERS[ctx.engine] = r
    return r


def mark_responder_only(ctx: Context) -> None:
    """This process answers OCSP/CRL requests only: it never loads a CA key (RFC 6960 §4.2.2.2's
    delegated signers exist so that the responder needs none), so it generates no CRLs either."""
    _RESPONDER_ONLY.add(ctx.engine)

    def refuse(_h: object) -> PrivateKey:
        from pki.errors import ConfigError

        raise ConfigError("CA keys are not available in the standalone OCSP responder")

    setattr(ctx.engine, "ca_signer", refuse)  # noqa: B010 - a guard on this instance only


def is_responder_only(ctx: Context) -> bool:
    return ctx.engine in _RESPONDER_ONLY


def install_hooks(ctx: Context) -> None:
    """Pre-sign at issuance, re-sign and regenerate the CRL at once on revocation (after commit)."""
    engine = ctx.engine

    def on_issued(issued: list[Issued]) -> None:
        try:
            r = responder_for(ctx)
            if any(i.profile.startswith("ocsp-signer") or i.cert.extensions.get_extension_for_class(
                    x509.BasicConstraints).value.ca for i in issued):
                r.invalidate()  # a new CA or OCSP signer: the issuer table changes
            r.presigner.submit((i.issuer, i.serial) for i in issued)
        except Exception:  # noqa: BLE001 - issuance stands; refresh() or the next request re-signs
            log.warning("pre-signing OCSP responses after issuance failed", exc_info=True)

    def on_revoked(issuer: str, serial: str) -> None:
        try:
            responder_for(ctx).presign(issuer, [serial])
        except Exception:  # noqa: BLE001 - the responder re-signs on the next request (status check)
            log.warning("re-signing the OCSP response of %s/%s failed", issuer, serial, exc_info=True)
        if not is_responder_only(ctx):
            try:
                from pki.crl import scheduler_for

                scheduler_for(ctx).mark(issuer)
            except Exception:  # noqa: BLE001
                log.warning("scheduling the CRL of %s failed", issuer, exc_info=True)

    engine.on_issued.append(on_issued)
    engine.on_revoked.append(on_revoked)


def refresh(ctx: Context, *, margin: timedelta | None = None, full: bool = False) -> int:
    """Worker entry point: re-sign what is missing or due (see OcspResponder.refresh)."""
    return responder_for(ctx).refresh(margin=margin, full=full)


__all__ = [
    "Answer", "CertIdReq", "OcspRequest", "OcspResponder", "install_hooks", "mark_responder_only",
    "ocpp_lookup", "parse_request", "refresh", "responder_for",
]


def _label_of(key_uri: str) -> str | None:
    """The key label inside a key URI (RFC 7512 pkcs11: URI, or the software twin's soft:LABEL)."""
    from hsm.uri import Pkcs11Uri

    try:
        if key_uri.startswith("pkcs11:"):
            return Pkcs11Uri.parse(key_uri).object
    except ValueError:
        return None
    if key_uri.startswith("soft:"):
        return key_uri[len("soft:"):]
    return None
