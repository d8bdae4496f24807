"""Finding a hierarchy by its root certificate's hash data (OCPP 2.1 SignCertificateRequest.hashRootCertificate).

OCPP 2.1 lets a station name the root under which it wants its certificate signed: CertificateHashDataType
(hashAlgorithm, issuerNameHash, issuerKeyHash, serialNumber) computed over the root as the *certificate
being checked*: for a self-signed root its issuer is its subject and its issuer key is its own key
(OCPP 2.1 Part 2 §2.5 CertificateHashDataType; RFC 6960 §4.1.1 CertID). The encodings chargers use for the
hashes and the serial are those of GetCertificateStatus (hex or base64; hex or decimal serial), decoded
by pki.ocsp's readers so both paths agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509

from hsm.keystore import KeyAlg
from pki.der import spki_key_bits
from pki.errors import UnknownRoot
from pki.issuance import Engine
from pki.ocsp.ocpp import OCPP_HASH_ALGS, decode_ocpp_hash, decode_ocpp_serial


@dataclass(frozen=True)
class CertHashData:
    """OCPP CertificateHashDataType as received."""

    hash_algorithm: str
    issuer_name_hash: str
    issuer_key_hash: str
    serial_number: str


def cert_id_matches(cert: x509.Certificate, issuer: x509.Certificate, h: CertHashData) -> bool:
    """Whether OCPP hash data names ``cert`` (issued by ``issuer``): RFC 6960 §4.1.1 CertID fields."""
    alg = OCPP_HASH_ALGS.get(h.hash_algorithm.strip().upper())
    if alg is None:
        raise UnknownRoot(f"hashAlgorithm {h.hash_algorithm!r} is not SHA256, SHA384 or SHA512")
    name_hash = decode_ocpp_hash(h.issuer_name_hash, alg, "issuerNameHash")
    key_hash = decode_ocpp_hash(h.issuer_key_hash, alg, "issuerKeyHash")
    return (cert.serial_number in decode_ocpp_serial(h.serial_number)
            and hashlib.new(alg, cert.issuer.public_bytes()).digest() == name_hash
            and hashlib.new(alg, spki_key_bits(issuer)).digest() == key_hash)


def _matches(root: x509.Certificate, h: CertHashData) -> bool:
    return cert_id_matches(root, root, h)  # a root's issuer is itself


def ca_under_root(engine: Engine, profile_name: str, key_alg: KeyAlg, root_hash: CertHashData) -> str:
    """The issuing CA for ``profile_name`` whose chain ends in the root ``root_hash`` names.

    Among several, the same preference as the engine's own choice: the key algorithm of the subject key,
    then the profile's first-listed issuer, then the newest."""
    profile = engine.profiles.get(profile_name)
    candidates = [h for h in engine.cas() if h.row.profile in profile.issuers and h.row.status == "active"
                  and _matches(engine.chain(h.name)[-1], root_hash)]
    if not candidates:
        if any(_matches(h.cert, root_hash) for h in engine.cas() if h.row.parent is None):
            raise UnknownRoot(f"the root named by hashRootCertificate issues no {profile_name!r} certificates")
        raise UnknownRoot("hashRootCertificate matches no root certificate of this PKI")
    order = {p: i for i, p in enumerate(profile.issuers)}
    # ties on notAfter (a new hierarchy whose CAs end when the old ones do) go to the newest CA row:
    # the order the database returns rows in is no order (PostgreSQL's changes after an UPDATE)
    candidates.sort(key=lambda h: (h.alg != key_alg, order[h.row.profile], -h.row.not_after.timestamp(),
                                   -(h.row.id or 0)))
    return candidates[0].name


def root_hash_data(root: x509.Certificate, alg: str = "SHA256") -> CertHashData:
    """The hash data a station computes for ``root`` (hex, as OCPP 2.1 specifies): for tests and docs."""
    h = OCPP_HASH_ALGS[alg]
    return CertHashData(alg, hashlib.new(h, root.issuer.public_bytes()).hexdigest(),
                        hashlib.new(h, spki_key_bits(root)).hexdigest(), format(root.serial_number, "x"))

