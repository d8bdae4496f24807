"""Lint before sign: the profile's own rules, the size limit, and pkilint's RFC 5280 checks.

Runs on a *twin*: the same TBS signed by a throwaway software key of the issuer's algorithm. The TBS is
byte-identical to what the HSM will sign (we check that after signing), so a certificate that would
break a rule is refused before the HSM is ever asked.
"""

from __future__ import annotations

import threading
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from hsm.algorithms import ALGORITHMS, KeyAlg, key_alg_of
from pki.errors import CertificateTooLarge, LintError
from pki.profiles import Profile

# One single-label domainComponent such as DC=V2G (required by the ISO 15118 profiles) always raises this
# pkilint finding; it is the only one we filter, nothing broader.
ALLOWED_PKILINT_CODES = {"pkix.name_domain_components_invalid_domain_name"}
# RFC 8813 §3: keyEncipherment with EC keys — filtered only for profiles that opted into it.
LEGACY_KE_CODE = "pkix.key_usage_value_prohibited_for_ec"

_KU_ATTR = {
    "digital_signature": "digital_signature",
    "content_commitment": "content_commitment",
    "key_encipherment": "key_encipherment",
    "data_encipherment": "data_encipherment",
    "key_agreement": "key_agreement",
    "key_cert_sign": "key_cert_sign",
    "crl_sign": "crl_sign",
}
_EKU = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
}

# Largest DER signature per issuer algorithm, to bound the final size from the twin's size: ECDSA
# Ecdsa-Sig-Value lengths vary by a few bytes with leading zeros of r and s (RFC 3279 §2.2.3).
MAX_SIG_LEN = {a.value: row.max_sig_len for a, row in ALGORITHMS.items()}  # the table's (hsm/algorithms.py)


def size_bound(twin: x509.Certificate, twin_der_len: int, issuer_alg: str) -> int:
    return twin_der_len - len(twin.signature) + MAX_SIG_LEN[issuer_alg]


def lint_profile(cert: x509.Certificate, der_len_bound: int, profile: Profile,
                 subject_alg: KeyAlg | None = None) -> None:
    """Assert the built certificate has exactly what the profile says (defence against builder bugs).

    ``subject_alg``: the subject key's algorithm when the caller knows it (saves re-parsing the key;
    the ABC isinstance checks on cryptography's key types showed up at ~10 % of issuance time)."""
    problems: list[str] = []
    if der_len_bound > profile.max_der_size:
        raise CertificateTooLarge(
            f"certificate would be up to {der_len_bound} bytes; profile {profile.name!r} allows "
            f"{profile.max_der_size} (ISO 15118-2 [V2G2-010]) — shorten names or URLs",
            size=der_len_bound,
        )
    exts = cert.extensions
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints)
        if not bc.critical or bc.value.ca != profile.ca or bc.value.path_length != profile.path_len:
            problems.append("basicConstraints differs from profile")
    except x509.ExtensionNotFound:
        problems.append("basicConstraints missing")
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage)
        want = set(profile.key_usage_for(subject_alg or _key_alg(cert)))
        have = {n for n, attr in _KU_ATTR.items() if _ku_bit(ku.value, attr)}
        if not ku.critical or want != have:
            problems.append(f"keyUsage {sorted(have)} differs from profile {sorted(want)}")
    except x509.ExtensionNotFound:
        problems.append("keyUsage missing")
    for cls in (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier):
        try:
            if exts.get_extension_for_class(cls).critical:
                problems.append(f"{cls.__name__} must be non-critical")
        except x509.ExtensionNotFound:
            problems.append(f"{cls.__name__} missing")
    if profile.extended_key_usage:
        try:
            eku = exts.get_extension_for_class(x509.ExtendedKeyUsage)
            if set(eku.value) != {_EKU[e] for e in profile.extended_key_usage}:
                problems.append("extendedKeyUsage differs from profile")
        except x509.ExtensionNotFound:
            problems.append("extendedKeyUsage missing")
    dcs = cert.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT)
    if profile.subject.dc is not None and [a.value for a in dcs] != [profile.subject.dc]:
        problems.append(f"subject DC must be {profile.subject.dc}")
    for rdn in cert.subject.rdns:
        if len(rdn) != 1:
            problems.append("multi-valued RDN")
    if cert.serial_number <= 0 or cert.serial_number.bit_length() > 127:
        problems.append("serial out of range (positive, ≤ 16 octets)")
    if profile.aia_ocsp:
        try:
            exts.get_extension_for_oid(ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
        except x509.ExtensionNotFound:
            problems.append("AIA (OCSP) missing")
    if problems:
        raise LintError(f"profile lint failed for {profile.name!r}: " + "; ".join(problems))


def _key_alg(cert: x509.Certificate) -> KeyAlg:
    return key_alg_of(cert.public_key())


def _ku_bit(ku: x509.KeyUsage, attr: str) -> bool:
    try:
        return bool(getattr(ku, attr))
    except ValueError:  # encipher_only/decipher_only undefined unless key_agreement
        return False


class PkiLinter:
    """pkilint's RFC 5280 certificate validator, built once per process (building it costs ~100 ms)."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        from pkilint import loader
        from pkilint.pkix import certificate, extension, name

        self._loader = loader.RFC5280CertificateDocumentLoader()
        self._validator = certificate.create_pkix_certificate_validator_container(
            certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
            [
                certificate.create_issuer_validator_container([]),
                certificate.create_validity_validator_container(),
                certificate.create_subject_validator_container([]),
                certificate.create_extensions_validator_container([]),
                certificate.create_spki_validator_container([]),
            ],
        )

    def findings(self, der: bytes, allow: set[str] | None = None) -> list[str]:
        """ERROR-and-above findings (pkilint `-s ERROR`), minus the documented allowed codes."""
        from pkilint.validation import ValidationFindingSeverity

        allowed = ALLOWED_PKILINT_CODES | (allow or set())
        with self._lock:  # pkilint's validators are not documented as thread-safe
            doc = self._loader.load_der_document(der, "twin")
            results: Any = self._validator.validate(doc.root)
        out = []
        for r in results:
            for fd in r.finding_descriptions:
                sev = fd.finding.severity
                if sev in (ValidationFindingSeverity.ERROR, ValidationFindingSeverity.FATAL) or (
                    getattr(sev, "name", "") in ("ERROR", "FATAL")
                ):
                    if fd.finding.code not in allowed:
                        out.append(f"{fd.finding.code}" + (f" ({fd.message})" if fd.message else ""))
        return out


_LINTER: PkiLinter | None = None


def pkilinter() -> PkiLinter:
    global _LINTER
    if _LINTER is None:
        _LINTER = PkiLinter()
    return _LINTER


def shape_key(profile: Profile, issuer: str, subject: x509.Name, key_alg: KeyAlg) -> tuple[object, ...]:
    """What makes two certificates of a profile structurally alike for pkilint's RFC 5280 checks: subject
    attribute types with string lengths bucketed, and key type. The extension set is a function of the
    profile, the issuer and the key type (the engine builds extensions from those only, never from a
    request), so it needs no parsing here: computed from the request, not from the built twin, this key
    costs nothing next to the twin it saves linting."""
    subj = tuple((a.oid.dotted_string, len(str(a.value)) > 32) for a in subject)
    return (profile.name, issuer, subj, key_alg.value)
