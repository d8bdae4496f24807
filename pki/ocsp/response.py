"""OCSP responses (RFC 6960 §4.2): answers, error responses, SingleResponse and BasicOCSPResponse DER."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from hsm.algorithms import ALGORITHMS
from hsm.keystore import KeyAlg, PrivateKey
from pki.der import REASON_CODES, SIG_ALGID, bit_string, der_oid, generalized_time, seq, tlv
from pki.ocsp.request import OID_NONCE

OID_BASIC = "1.3.6.1.5.5.7.48.1.1"  # id-pkix-ocsp-basic
_BASIC_OID = der_oid(OID_BASIC)


# OCSPResponseStatus (RFC 6960 §4.2.1)
SUCCESSFUL, MALFORMED, INTERNAL_ERROR, TRY_LATER, SIG_REQUIRED, UNAUTHORIZED = 0, 1, 2, 3, 5, 6
STATUS_NAMES = {0: "successful", 1: "malformedRequest", 2: "internalError", 3: "tryLater",
                5: "sigRequired", 6: "unauthorized"}


def sign_bytes(key: PrivateKey, alg: KeyAlg, data: bytes) -> bytes:
    """``data`` signed as the signer's key type signs (hsm/algorithms.py: hash, ECDSA or pure EdDSA)."""
    return ALGORITHMS[alg].sign(key, data)



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


def basic_response(key: PrivateKey, alg: KeyAlg, responder_key_hash: bytes, signer_cert_der: bytes,
                   singles: Sequence[bytes], produced_at: datetime, nonce_ext_value: bytes | None = None) -> bytes:
    """A successful OCSPResponse around a BasicOCSPResponse signed with ``key`` (RFC 6960 §4.2.1)."""
    parts = [tlv(0xA2, tlv(0x04, responder_key_hash)),  # responderID byKey [2] EXPLICIT KeyHash
             generalized_time(produced_at), seq(*singles)]
    if nonce_ext_value is not None:
        # RFC 8954 §2.1: the response carries the request's nonce extension, value unchanged.
        parts.append(tlv(0xA1, seq(seq(der_oid(OID_NONCE), tlv(0x04, nonce_ext_value)))))
    tbs = seq(*parts)  # version v1 is DEFAULT: omitted
    sig = sign_bytes(key, alg, tbs)
    basic = seq(tbs, SIG_ALGID[alg], bit_string(sig), tlv(0xA0, seq(signer_cert_der)))
    return seq(b"\x0a\x01\x00", tlv(0xA0, seq(_BASIC_OID, tlv(0x04, basic))))
