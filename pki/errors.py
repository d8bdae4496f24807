"""Typed domain errors. api/ maps each to an HTTP problem (RFC 9457); the CLI to a message + exit code.

Messages are safe to show to the caller: they never carry PINs, keys or internal paths.
"""

from __future__ import annotations


class PKIError(Exception):
    """Base class. ``code`` is a stable machine-readable slug used in problem types and CLI output."""

    code = "pki-error"
    status = 400

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context


class ConfigError(PKIError):
    code = "configuration-error"
    status = 500


class PolicyError(ConfigError):
    """A policies/ file is invalid (names file and field)."""

    code = "policy-error"


class UnknownProfile(PKIError):
    code = "unknown-profile"
    status = 400


class UnknownCA(PKIError):
    code = "unknown-ca"
    status = 404


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
    status = 500


class NotFound(PKIError):
    code = "not-found"
    status = 404


class AlreadyRevoked(PKIError):
    code = "already-revoked"
    status = 409


class BadRevocation(PKIError):
    code = "bad-revocation"


class Forbidden(PKIError):
    code = "forbidden"
    status = 403


class Conflict(PKIError):
    code = "conflict"
    status = 409


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
    status = 503


class ClockSkew(ConfigError):
    """This host's clock disagrees with the database server's by more than V2GPKI_MAX_CLOCK_SKEW_SECONDS
    (pki/clock.py): nothing is signed until they agree (#27 item 4). HTTP 503 with Retry-After; CLI exit 6."""

    code = "clock-skew"
    status = 503
