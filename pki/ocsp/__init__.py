"""OCSP responder core: RFC 6960, the RFC 5019 lightweight profile, and RFC 8954 nonces.

The package: :mod:`~pki.ocsp.request` (parsing, CertID), :mod:`~pki.ocsp.response` (answers, DER),
:mod:`~pki.ocsp.signers` (delegated signers and issuers), :mod:`~pki.ocsp.sources` (where answers come
from), :mod:`~pki.ocsp.presign` (pre-signing), :mod:`~pki.ocsp.budget` (live-signing budget),
:mod:`~pki.ocsp.responder` (the responder), :mod:`~pki.ocsp.ocpp` (OCPP 2.0.1 GetCertificateStatus).
Every public name is importable from ``pki.ocsp``.

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
  :class:`pki.wiring.OcspOnIssuance`). Other hash algorithms are re-signed from it on demand and kept in a bounded
  in-process cache keyed by the stored response, so they follow it when it changes.
* Serving never trusts the cache blindly: the lookup joins the certificate row, and a stored response
  whose status differs from the certificate's, that predates the revocation, the current signer, or has
  less than half its validity left, is re-signed on the spot. A revocation therefore shows on the next
  request even if a hook failed or ran in another process.
* A nonce (RFC 8954) or several CertIDs: signed live, nonce echoed, CertIDs echoed byte for byte.
"""

from __future__ import annotations

from pki.der import (  # re-exported: the tests and benchmarks build DER through pki.ocsp
    REASON_CODES,
    SIG_ALGID,
    DerError,
    bit_string,
    der_header,
    der_int,
    der_oid,
    generalized_time,
    read_tlv,
    seq,
    spki_bits,
    spki_key_bits,
    tlv,
)
from pki.ocsp.budget import SignBudget
from pki.ocsp.ocpp import OCPP_HASH_ALGS, decode_ocpp_hash, decode_ocpp_serial, ocpp_lookup
from pki.ocsp.presign import Presigner
from pki.ocsp.request import (
    HASH_LEN,
    HASH_OIDS,
    MAX_CERT_IDS,
    OID_NONCE,
    CertIdReq,
    OcspRequest,
    certid_der,
    parse_request,
    rfc5019_certid,
)
from pki.ocsp.responder import (
    OcspResponder,
    is_responder_only,
    refresh,
    responder_for,
)
from pki.ocsp.response import (
    INTERNAL_ERROR,
    INTERNAL_ERROR_ANSWER,
    MALFORMED,
    MALFORMED_ANSWER,
    OID_BASIC,
    SIG_REQUIRED,
    STATUS_NAMES,
    SUCCESSFUL,
    TRY_LATER,
    TRY_LATER_ANSWER,
    UNAUTHORIZED,
    UNAUTHORIZED_ANSWER,
    Answer,
    basic_response,
    error_answer,
    sign_bytes,
    single_response,
)
from pki.ocsp.signers import _label_of
from pki.ocsp.sources import (
    Chain,
    LiveSource,
    MemorySource,
    Query,
    Source,
    StoredSource,
    fresh_until,
    is_fresh,
    wanted_status,
)
from pki.store.db import read_engine
from pki.store.ocsp import DatabaseUnavailable

__all__ = [
    "HASH_LEN", "HASH_OIDS", "INTERNAL_ERROR", "INTERNAL_ERROR_ANSWER", "MALFORMED", "MALFORMED_ANSWER",
    "MAX_CERT_IDS", "OCPP_HASH_ALGS", "OID_BASIC", "OID_NONCE", "REASON_CODES", "SIG_ALGID", "SIG_REQUIRED",
    "STATUS_NAMES", "SUCCESSFUL", "TRY_LATER", "TRY_LATER_ANSWER", "UNAUTHORIZED", "UNAUTHORIZED_ANSWER",
    "Answer", "CertIdReq", "Chain", "DatabaseUnavailable", "LiveSource", "MemorySource", "Query", "Source",
    "StoredSource", "fresh_until", "is_fresh", "wanted_status", "DerError", "OcspRequest", "OcspResponder", "Presigner",
    "SignBudget", "_label_of", "basic_response", "bit_string", "certid_der", "decode_ocpp_hash",
    "decode_ocpp_serial", "der_header", "der_int", "der_oid", "error_answer", "generalized_time",
    "is_responder_only", "ocpp_lookup", "parse_request",
    "read_engine", "read_tlv", "rfc5019_certid", "refresh", "responder_for", "seq", "sign_bytes", "single_response",
    "spki_bits", "spki_key_bits", "tlv",
]
