"""CSR parsing and the registration-authority checks (RFC 2986 PKCS#10).

We accept PEM, DER, or base64 DER (as OCPP's SignCertificateRequest carries it), check the
proof-of-possession signature, the key algorithm/curve against the profile, and the subject rules.
Nothing from the CSR's extensions is copied — the CA applies its own profile — except the one a profile
names: an ISO 15118-20 Ed448 vehicle's X448 key (``x448_alt_key_for_ed448``, see :func:`alt_x448_key`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x448
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from hsm.algorithms import key_alg_of as table_key_alg_of
from hsm.keystore import KeyAlg, PublicKey
from pki import names
from pki.errors import BadCSR, BadKey, BadSignature, BadSubject
from pki.names import SubjectFields  # re-exported: pki.csr is where callers have always found it
from pki.profiles import Profile
from pki.tbs import csr_subject_fields

# subjectAltPublicKeyInfo, ITU-T X.509 (10/2019) §9.8.2: the "Alternate Subject Public Key" of ISO 15118-20
# [V2G20-2534] (the X448 key of an Ed448 OEM provisioning certificate)
ALT_PUBLIC_KEY_OID = x509.ObjectIdentifier("2.5.29.72")
MAX_CSR_BYTES = 8192  # OCPP caps csr at 5500 characters; 8 KiB of DER/PEM leaves room for -20 keys

_SINGLE_ATTRS = {
    NameOID.COMMON_NAME: "CN",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.COUNTRY_NAME: "C",
    NameOID.DOMAIN_COMPONENT: "DC",
}


@dataclass(frozen=True)
class CheckedRequest:
    """What the CA needs after the RA checks: the key and the normalised subject."""

    public_key: PublicKey
    key_alg: KeyAlg
    subject: SubjectFields
    identifier: str
    identifier_kind: str
    alt_spki: bytes | None = None  # the X448 SubjectPublicKeyInfo to carry in 2.5.29.72 (profile permitting)


def parse_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """PEM, base64 DER (with or without line breaks) or raw DER.

    The encoding is decided on the raw bytes: a DER CertificationRequest always starts with a SEQUENCE
    tag (0x30; a base64 or PEM text never does, its first character is 'M' or '-'). Only text is
    stripped: raw DER ends in the signature's last octet, which is 0x09-0x0d or 0x20 for about one CSR
    in forty, and stripping it made those CSRs undecodable (issue #30).
    """
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_CSR_BYTES:
        raise BadCSR(f"CSR is too large ({len(raw)} bytes; at most {MAX_CSR_BYTES})")
    try:
        if raw[:1] == b"\x30":
            return x509.load_der_x509_csr(raw)
        text = raw.strip()
        if text.startswith(b"-----BEGIN"):
            if b"CERTIFICATE REQUEST" not in text.split(b"\n", 1)[0]:
                raise BadCSR("PEM block is not a CERTIFICATE REQUEST")
            return x509.load_pem_x509_csr(text)
        try:
            der = base64.b64decode(b"".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadCSR("CSR is neither PEM, DER nor base64 DER") from None
        return x509.load_der_x509_csr(der)
    except BadCSR:
        raise
    except ValueError as exc:
        raise BadCSR(f"CSR could not be decoded: {exc}") from None


def key_alg_of(key: object) -> KeyAlg:
    """The key type of a CSR's public key, from the algorithm table (hsm/algorithms.py); BadKey otherwise."""
    if isinstance(key, ec.EllipticCurvePublicKey | ed448.Ed448PublicKey):
        try:
            return table_key_alg_of(key)
        except ValueError:
            pass
    if isinstance(key, ec.EllipticCurvePublicKey):
        raise BadKey(f"EC curve {key.curve.name} is not allowed (ISO 15118: secp256r1, or secp521r1 for -20)")
    raise BadKey(f"{type(key).__name__.replace('_', '')} keys are not allowed (EC P-256 / P-521 or Ed448 only)")


def subject_fields(name: x509.Name) -> SubjectFields:
    values: dict[str, str] = {}
    for rdn in name.rdns:
        if len(rdn) != 1:
            raise BadSubject("multi-valued RDNs are not allowed (each RDN single-valued)")
        (attr,) = tuple(rdn)
        key = _SINGLE_ATTRS.get(attr.oid)
        if key is None:
            continue  # other attributes (OU, L, ...) are ignored: the CA builds the subject itself
        if key in values:
            raise BadSubject(f"subject has more than one {key}")
        if not isinstance(attr.value, str):
            raise BadSubject(f"subject {key} is not a string")
        values[key] = attr.value
    if "CN" not in values or not values["CN"].strip():
        raise BadSubject("subject has no CN")
    return SubjectFields(values["CN"], values.get("O"), values.get("C"), values.get("DC"))


def normalise_identifier(profile: Profile, cn: str) -> tuple[str, str]:
    """Check the CN against the profile's rule; return (normalised CN, identifier kind)."""
    kind = profile.subject.cn
    if kind == "evseid":
        return names.normalise_evseid(cn), "evseid"
    if kind == "seccid":
        return names.normalise_seccid(cn), "seccid"
    if kind == "evseid_or_seccid":
        try:
            return names.normalise_evseid(cn), "evseid"
        except BadSubject:
            try:
                return names.normalise_seccid(cn), "seccid"
            except BadSubject:
                raise BadSubject(f"CN {cn!r} is neither a valid EVSEID nor a SECCID") from None
    if kind == "emaid":
        return names.normalise_emaid(cn), "emaid"
    if kind == "pcid":
        return names.normalise_pcid(cn), "pcid"
    if kind == "station":
        return names.check_station_id(cn), "station"
    if kind == "fqdn":
        return names.check_fqdn(cn), "fqdn"
    if len(cn.encode()) > 64 or not cn.strip():
        # RFC 5280 ub-common-name is 64 characters; the X.509 builder counts UTF-8 octets, the stricter reading.
        raise BadSubject("CN must be 1–64 characters, at most 64 UTF-8 octets (RFC 5280 ub-common-name)")
    return cn.strip(), "name"


# C0 controls, DEL and C1 controls (U+0000–U+001F, U+007F–U+009F)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_no_control_chars(fields: SubjectFields) -> None:
    """Refuse control characters in every subject attribute the CA could sign (CN, O, C, DC).

    None of the V2G / OCPP name forms contains one (ISO 15118-2 Annex H identifiers, OCPP CiString
    identities, organization names, ISO 3166 codes); RFC 5280 §4.1.2.6 / §7.1 leaves DirectoryString
    content to the CA, and a NUL or LF in O or CN is how a forged name hides from a log line or a C
    string comparison. Checked on the value as sent, before any stripping: 'CPO Alpha\n' is refused, not
    quietly trimmed into 'CPO Alpha'."""
    for key, value in (("CN", fields.cn), ("O", fields.o), ("C", fields.c), ("DC", fields.dc)):
        if value is None:
            continue
        m = _CONTROL_RE.search(value)
        if m is not None:
            raise BadSubject(f"subject {key} contains the control character U+{ord(m.group()):04X}")


def check_subject(profile: Profile, fields: SubjectFields) -> tuple[SubjectFields, str, str]:
    rule = profile.subject
    check_no_control_chars(fields)
    cn, kind = normalise_identifier(profile, fields.cn)
    # DC is the profile's, set by the CA. A CSR that asks for another DC than the profile sets contradicts
    # it (e.g. DC=MO in a SECC request) and is refused rather than silently "corrected". A DC in a request
    # for a profile that sets none is ignored like OU or L (the certificate carries no DC): EVerest's
    # evse_security puts DC=CPO into every CSR it makes, the OCPP ChargingStationCertificate ones too
    # (issue #21 item 14; OCPP 2.0.1 Part 2 A00 "Certificate Properties" names no DC for that certificate).
    if fields.dc is not None and rule.dc is not None and fields.dc.upper() != rule.dc.upper():
        raise BadSubject(f"subject DC={fields.dc} contradicts profile {profile.name!r} (DC={rule.dc})")
    o = fields.o.strip() if fields.o else None
    if rule.o == "required" and not o:
        raise BadSubject(f"profile {profile.name!r} requires an O (organization) in the subject")
    if rule.o == "forbidden":
        o = None
    if o is not None and len(o.encode()) > 64:
        raise BadSubject("O must be at most 64 characters / UTF-8 octets (RFC 5280 ub-organization-name)")
    c = fields.c.strip().upper() if fields.c else None
    if rule.c == "required" and not c:
        raise BadSubject(f"profile {profile.name!r} requires a C (country) in the subject")
    if c is not None and (len(c) != 2 or not c.isalpha() or not c.isascii()):
        raise BadSubject(f"C={fields.c!r} is not an ISO 3166 two-letter country code")
    return SubjectFields(cn=cn, o=o, c=c, dc=rule.dc), cn, kind


def proof_of_possession(csr: x509.CertificateSigningRequest, key: object) -> bool:
    """True when the CSR is signed by the key it carries (RFC 2986 §3) — what ``csr.is_signature_valid``
    answers, with the key check_csr already loaded: that property loads the key again and cost 140 µs
    against 95 µs here, a tenth of an issuance (bench/issuance.py). The signature algorithm comes from
    cryptography's own identification of the CSR's AlgorithmIdentifier (which refuses unknown OIDs and
    unexpected parameters) and must match the key type: ECDSA with SHA-2 for EC keys, Ed448 for Ed448."""
    try:
        params = csr.signature_algorithm_parameters
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, params)
            return True
        if isinstance(key, ed448.Ed448PublicKey):
            if params is not None or csr.signature_algorithm_oid != SignatureAlgorithmOID.ED448:
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes)
            return True
    except Exception:  # noqa: BLE001 - InvalidSignature, and unsupported algorithms raise various errors
        return False
    return False


def check_csr(profile: Profile, csr: x509.CertificateSigningRequest) -> CheckedRequest:
    # Proof of possession (RFC 2986 §3): the CSR must be signed by the key it carries.
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise BadKey(f"CSR public key is not supported: {exc}") from None
    alg = key_alg_of(key)
    if alg not in profile.key_algs:
        allowed = ", ".join(a.value for a in profile.key_algs)
        raise BadKey(f"{alg.value} key not allowed by profile {profile.name!r} (allowed: {allowed})")
    if not proof_of_possession(csr, key):
        raise BadSignature("CSR signature does not verify (bad proof of possession)")
    # The subject is read straight from the request's DER when it has the usual shape (building
    # cryptography Name objects cost as much as the rest of the checks); anything unusual takes the full path.
    raw = csr_subject_fields(csr.tbs_certrequest_bytes)
    fields, ident, kind = check_subject(
        profile, SubjectFields(*raw) if raw is not None else subject_fields(csr.subject))
    assert isinstance(key, ec.EllipticCurvePublicKey | ed448.Ed448PublicKey)
    return CheckedRequest(public_key=key, key_alg=alg, subject=fields, identifier=ident, identifier_kind=kind,
                          alt_spki=alt_x448_key(profile, alg, csr))


def alt_x448_key(profile: Profile, alg: KeyAlg, csr: x509.CertificateSigningRequest) -> bytes | None:
    """The X448 SubjectPublicKeyInfo an Ed448 CSR of an ``x448_alt_key_for_ed448`` profile requests in its
    extensionRequest (RFC 2986 §4.1, PKCS#9 extensionRequest) as subjectAltPublicKeyInfo; None elsewhere.

    ISO 15118-20 [V2G20-2534]: an X448 installation encrypts the contract key to that key, so an Ed448
    provisioning certificate without it could never receive a contract: refused here, before anything is
    issued. The key cannot prove possession (X448 does not sign); the Ed448 signature over the request
    binds it to the vehicle that made the request. A P-521 key of the same profile asking for it is refused
    (its own key does the ECDH); other profiles ignore it, as they ignore every CSR extension."""
    if not profile.x448_alt_key_for_ed448:
        return None
    try:
        requested = csr.extensions.get_extension_for_oid(ALT_PUBLIC_KEY_OID)
    except x509.ExtensionNotFound:
        requested = None
    except ValueError as exc:  # a malformed extensionRequest
        raise BadCSR(f"CSR extensionRequest could not be decoded: {exc}") from None
    wanted = alg is KeyAlg.ED448
    if requested is None:
        if wanted:
            raise BadKey(f"an Ed448 {profile.name!r} CSR must request subjectAltPublicKeyInfo (2.5.29.72) with "
                         "the vehicle's X448 key: the contract key is encrypted to it (ISO 15118-20 [V2G20-2534])")
        return None
    if not wanted:
        raise BadCSR(f"subjectAltPublicKeyInfo (2.5.29.72) is not part of profile {profile.name!r} for "
                     f"{alg.value} keys")
    value = requested.value.value if isinstance(requested.value, x509.UnrecognizedExtension) else b""
    try:
        key = serialization.load_der_public_key(value)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadKey("subjectAltPublicKeyInfo is not a SubjectPublicKeyInfo") from None
    if not isinstance(key, x448.X448PublicKey):
        raise BadKey("subjectAltPublicKeyInfo must be an X448 key (RFC 8410 id-X448) [V2G20-2534]")
    # re-encoded, so the certificate carries the canonical DER whatever the request's encoding was
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
