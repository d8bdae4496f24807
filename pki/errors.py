"""Typed domain errors: every PKIError of pki/ lives here (the CPS layer's in pki/cps/errors.py, the
storage layer's in pki/store/errors.py).

They carry no HTTP knowledge: api/problems.py maps each class to an HTTP status and a problem document
(RFC 9457), the CLI to a message + exit code. Messages are safe to show to the caller: they never carry
PINs, keys or internal paths.
"""

from __future__ import annotations


class PKIError(Exception):
    """Base class. ``code`` is a stable machine-readable slug used in problem types and CLI output."""

    code = "pki-error"

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context


class ConfigError(PKIError):
    code = "configuration-error"


class PolicyError(ConfigError):
    """A policies/ file is invalid (names file and field)."""

    code = "policy-error"


class UnknownProfile(PKIError):
    code = "unknown-profile"


class UnknownCA(PKIError):
    code = "unknown-ca"


class BadCSR(PKIError):
    """Malformed, oversized, or not decodable CSR."""

    code = "bad-csr"


class BadSignature(BadCSR):
    """The CSR's proof-of-possession signature does not verify (RFC 2986 §3)."""

    code = "bad-csr-signature"


class BadKey(PKIError):
    """Key algorithm or curve not allowed by the profile."""

    code = "bad-key"


class BadSubject(PKIError):
    """Identifier, O/C or DC does not satisfy the profile's subject rules."""

    code = "bad-subject"


class CertificateTooLarge(PKIError):
    """ISO 15118-2 [V2G2-010]: a certificate must not exceed 800 bytes (1600 for -20)."""

    code = "certificate-too-large"


class LintError(PKIError):
    code = "lint-failed"


class NotFound(PKIError):
    code = "not-found"


class AlreadyRevoked(PKIError):
    code = "already-revoked"


class BadRevocation(PKIError):
    code = "bad-revocation"


class Forbidden(PKIError):
    code = "forbidden"


class Conflict(PKIError):
    code = "conflict"


class MalformedOCSPRequest(PKIError):
    """Not a DER OCSPRequest (RFC 6960 §4.1.1). The OCSP routes answer it with the OCSP
    ``malformedRequest`` response (RFC 6960 §2.3), never with a problem document."""

    code = "malformed-ocsp-request"


class BadStatusRequest(PKIError):
    """An OCPP GetCertificateStatus OCSPRequestData that cannot be decoded (hash or serial encoding)."""

    code = "bad-status-request"


class CRLUnavailable(PKIError):
    """No CRL has been generated for this CA yet, and this process may not generate one."""

    code = "crl-unavailable"


class ClockSkew(ConfigError):
    """This host's clock disagrees with the database server's by more than V2GPKI_MAX_CLOCK_SKEW_SECONDS
    (pki/clock.py): nothing is signed until they agree (#27 item 4). A temporary refusal (the API says when
    to come back: ``retry_after`` in the context); CLI exit 6."""

    code = "clock-skew"


class BackupError(PKIError):
    code = "backup-error"


class BadOrganization(PKIError):
    code = "bad-organization"


class Unauthenticated(PKIError):
    code = "unauthenticated"


class BadCertificate(PKIError):
    code = "bad-certificate"


class UnknownRoot(PKIError):
    """hashRootCertificate names no root of this PKI (or none that issues the requested profile)."""

    code = "unknown-root"


class UnknownStation(NotFound):
    """The station is not one of the caller's (not registered for the organization, /v1/stations)."""

    code = "unknown-station"


class BadRootImport(PKIError):
    code = "bad-root-import"


class TrustListError(PKIError):
    code = "trustlist-invalid"


class FirmwareRefused(PKIError):
    """A signature the service will not make: rollback, a product of another manufacturer, bad input."""

    code = "firmware-refused"


class RollbackRefused(FirmwareRefused):
    code = "firmware-rollback"


class FirmwareVerificationFailed(PKIError):
    """`v2gpki firmware verify`: what a charger would refuse (signature, chain, revocation)."""

    code = "firmware-verification-failed"


class OAuthError(PKIError):
    """An RFC 6749 §5.2 error: ``error`` is the registered code, ``message`` its description."""

    code = "oauth-error"

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class UnsupportedNamespace(PKIError):
    code = "unsupported-namespace"


class BadContractData(PKIError):
    code = "bad-contract-data"


class CoverageTooLow(Conflict):
    """Switching issuance to a new root that too few stations hold would strand the others."""

    code = "coverage-too-low"


class RootInUse(Conflict):
    """The old root still anchors valid certificates that were not replaced."""

    code = "root-in-use"


class CampaignState(Conflict):
    code = "campaign-state"
