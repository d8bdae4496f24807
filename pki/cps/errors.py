"""Typed errors of the contract provisioning service (CPS) layer: EXI codec, key wrapping, XML signatures.

Every error here subclasses :class:`pki.errors.PKIError`, so api/ and the CLI map them like the rest.
Messages name the failing element or limit but never carry key material, plaintext or whole streams.
"""

from __future__ import annotations

from pki.errors import PKIError


class CPSError(PKIError):
    """Base class of the ISO 15118 contract provisioning errors."""

    code = "cps-error"


class ExiError(CPSError):
    """Base class of EXI codec errors."""

    code = "exi-error"


class ExiDecodeError(ExiError):
    """The EXI stream is malformed: bad header, truncated, impossible event code or value (EXI 1.0 §5–§7)."""

    code = "exi-malformed"


class ExiUnsupported(ExiDecodeError):
    """Well-formed EXI that this codec deliberately does not handle.

    Schema deviations (second-level event codes of EXI 1.0 §8.5.4.4.1: xsi:type, xsi:nil, AT(*), SE(*),
    untyped CH), wildcard content, and ISO 15118-2 messages other than certificate installation/update.
    """

    code = "exi-unsupported"


class ExiLimitExceeded(ExiDecodeError):
    """A decoding bound (stream size, depth, event count, string or binary length) was exceeded."""

    code = "exi-limit-exceeded"


class ExiEncodeError(ExiError):
    """The value cannot be encoded: it does not fit the ISO 15118-2 schema (missing element, facet, range)."""

    code = "exi-encode-error"


class KeyWrapError(CPSError):
    """Contract private key encryption or decryption failed [V2G2-818..823]."""

    code = "contract-key-wrap-error"


class XmlDsigError(CPSError):
    """An ISO 15118-2 EXI XML signature could not be built, or a received one is malformed."""

    code = "xmldsig-error"


class SignatureVerificationFailed(XmlDsigError):
    """A received signature (digest or ECDSA value) does not verify."""

    code = "xmldsig-verification-failed"


class ActionMismatch(CPSError):
    """OCPP 2.0.1 Get15118EVCertificate's ``action`` (Install | Update), or the endpoint's kind, does not
    match the EXI request's body (CertificateInstallationReq | CertificateUpdateReq). Refused before any
    lookup or issuance."""

    code = "action-mismatch"


class ResponseTooLarge(CPSError):
    """The answer would exceed OCPP 2.0.1's exiResponse limit (7500 base64 characters), judged from the
    chain lengths before the contract certificate is issued."""

    code = "response-too-large"


class CPSFailure(CPSError):
    """A failure the standard reports inside CertificateInstallationRes/UpdateRes: ``response_code`` is an
    ISO 15118-2 responseCodeType value (pki.cps.exi.messages.ResponseCode, a str enum; typed as str so
    this module stays below the EXI codec)."""

    def __init__(self, response_code: str, message: str) -> None:
        super().__init__(message)
        self.response_code = response_code


class CPS20Failure(CPSError):
    """An ISO 15118-20 failure reported inside CertificateInstallationRes (its ResponseCode string)."""

    def __init__(self, response_code: str, message: str) -> None:
        super().__init__(message)
        self.response_code = response_code
