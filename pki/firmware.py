"""Signed firmware for charging stations (#27 item 3).

OCPP 2.0.1 Part 2 L01 "Secure firmware update" (L01.FR.01..04, and the Security whitepaper's firmware
section): the CSMS sends UpdateFirmwareRequest with a ``firmware`` object (FirmwareType: location,
retrieveDateTime, installDateTime?, signingCertificate — PEM, ≤ 5500 characters — and signature — base64,
≤ 800 characters). The station checks that the signing certificate chains to its
ManufacturerRootCertificate, then verifies the signature over the firmware file (SHA-256, RSA-PSS or
ECDSA). What a station actually runs — EVerest's libevse-security, ``EvseSecurity::verify_file_signature``
→ ``OpenSSLSupplier::digest_file_sha256`` then ``x509_verify_signature`` — is ``EVP_PKEY_verify`` with
``EVP_PKEY_CTX_set_signature_md(SHA-256)`` over the file's SHA-256 digest, the signature base64-decoded:
for an EC key the DER Ecdsa-Sig-Value (RFC 3279 §2.2.3) of ECDSA over SHA-256(file). That is exactly
``openssl dgst -sha256 -sign`` / ``-verify`` of the file, and what this module makes: the HSM signs the
32-byte digest with CKM_ECDSA (P-256), so an image of any size is hashed once, in chunks, and never held
in memory.

Tenancy: one Manufacturer root per ``manufacturer`` organization (its own chargers install only it, so
one manufacturer's signature never verifies on another's chargers), and firmware-signing certificates
(EKU codeSigning) under it whose keys are generated in the HSM and never leave it. Products belong to the
manufacturer that first signed them. Rollback protection: a version lower than the highest already signed
for the product (or the same version with a different image) is refused unless forced; every signature is
recorded (table firmware_signature) and in the audit chain (by whom, product, version, digest).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID

from hsm.errors import KeyUriError
from pki import audit
from pki.context import Context
from pki.csr import SubjectFields
from pki.errors import (
    BadSubject,
    FirmwareRefused,
    FirmwareVerificationFailed,
    Forbidden,
    NotFound,
    PKIError,
    RollbackRefused,
)
from pki.issuance import IssueRequest
from pki.profiles import CAEntry, Hierarchy
from pki.store import firmware as store
from pki.store.db import Session, utcnow
from pki.store.models import Certificate, Organization
from pki.store.models_firmware import FirmwareSignature
from pki.store.orgs import org_named

ROLE = "manufacturer"
ROOT_PROFILE = "mfr-root"
SIGNING_PROFILE = "firmware-signing"
CHUNK = 1024 * 1024  # bytes hashed at a time: an image is never held in memory
# OCPP 2.0.1 FirmwareType bounds (UpdateFirmwareRequest.json)
MAX_LOCATION, MAX_CERTIFICATE, MAX_SIGNATURE = 512, 5500, 800
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+~-]{0,63}$")


# -- names ---------------------------------------------------------------------------------------------


def ca_name_for(org: str) -> str:
    """The Manufacturer root CA of an organization: a readable slug plus a hash of the exact name (two
    names that slug alike never share a CA). Fits CAEntry's name pattern."""
    slug = re.sub(r"[^a-z0-9]+", "-", org.lower()).strip("-")[:40] or "x"
    return f"mfr-{slug}-{hashlib.sha256(org.encode()).hexdigest()[:8]}"


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Order of firmware versions: numeric runs compare as numbers, letter runs as text, separators are
    ignored, and a pre-release suffix sorts before its release (1.0.0-rc1 < 1.0.0 < 1.0.0.1 < 1.0.10)."""
    parts: list[tuple[int, int, str]] = []
    for run in re.findall(r"\d+|[A-Za-z]+", version):
        parts.append((2, int(run), "") if run.isdigit() else (0, 0, run.lower()))
    parts.append((1, 0, ""))  # end of version: above any letter run, below any further number
    return tuple(parts)


def _check_name(what: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise BadSubject(f"{what} {value!r}: 1–64 characters, letters, digits and . _ : + ~ - (starting with a "
                         "letter or digit)")
    return value


# -- setup: the manufacturer's root and signing certificate -----------------------------------------------


def _manufacturer(s: Session, org: str) -> Organization:
    row = org_named(s, org)
    if row is None:
        raise NotFound(f"no organization {org!r}")
    if row.role != ROLE:
        raise Forbidden(f"organization {org!r} is a {row.role}, not a {ROLE}: firmware is signed for "
                        f"`--role {ROLE}` organizations only")
    return row


def signing_key_label(ca: str, generation: int) -> str:
    return f"fw-{ca}-{generation}"


@dataclass
class SetupResult:
    ca: str
    root: x509.Certificate
    signing: Certificate
    created: list[str] = field(default_factory=list)


def current_signing_certificate(ctx: Context, org: str) -> Certificate | None:
    """The newest valid firmware-signing certificate of the organization (None: `firmware setup`)."""
    return store.newest_signing_certificate(ctx.db, org=org, profile=SIGNING_PROFILE, issuer=ca_name_for(org),
                                            now=utcnow())


def setup(ctx: Context, org: str, *, country: str | None = None, actor: str = "cli") -> SetupResult:
    """Idempotent (as `v2gpki init`): the organization's Manufacturer root with its OCSP signer and a first
    CRL, and a valid firmware-signing certificate — each made only if missing. A revoked or expired
    signing certificate is replaced by one with a new key (a new label generation), never the old key."""
    from pki.hierarchy import _ensure_key, create_ca, ensure_ocsp_signer

    with ctx.db.session() as s:
        _manufacturer(s, org)
    name = ca_name_for(org)
    try:
        default_country = ctx.hierarchy().country
    except PKIError:
        default_country = "DE"
    h = Hierarchy(organization=org, country=(country or default_country).upper(),
                  cas=[CAEntry(name=name, profile=ROOT_PROFILE, cn=f"{org} Manufacturer Root CA"[:64])])
    created: list[str] = []
    if not store.ca_exists(ctx.db, name):
        create_ca(ctx.engine, h.cas[0], h)
        created.append(f"Manufacturer root {name}")
    if ensure_ocsp_signer(ctx.engine, h, name) is not None:
        created.append(f"OCSP signer of {name}")
    cert = current_signing_certificate(ctx, org)
    if cert is None:
        generation = 1 + store.certificates_issued(ctx.db, issuer=name, profile=SIGNING_PROFILE)
        label = signing_key_label(name, generation)
        pub = _ensure_key(ctx.keystore, label, ctx.engine.ca(name).alg)  # generated in the token
        ctx.engine.issue(IssueRequest(
            profile=SIGNING_PROFILE, public_key=pub, ca=name, tenant=org, actor=actor,
            identifier=f"{name}/firmware-signing-{generation}", key_uri=ctx.keystore.uri(label),
            subject=SubjectFields(cn=f"{org} Firmware Signing {generation}"[:64], o=org, c=h.country, dc=None)))
        cert = current_signing_certificate(ctx, org)
        assert cert is not None
        created.append(f"firmware-signing certificate (key {label})")
    from pki.crl import generate_crl, latest_meta

    if latest_meta(ctx.db, name) is None:
        generate_crl(ctx, name)  # /crl/<ca>.crl answers from the start (the CRLDP of the signing certificate)
    return SetupResult(name, ctx.engine.ca(name).cert, cert, created)


# -- signing ------------------------------------------------------------------------------------------


def sha256_chunks(chunks: Iterable[bytes]) -> tuple[bytes, int]:
    h = hashlib.sha256()
    n = 0
    for c in chunks:
        h.update(c)
        n += len(c)
    return h.digest(), n


def sha256_file(f: BinaryIO) -> tuple[bytes, int]:
    return sha256_chunks(iter(lambda: f.read(CHUNK), b""))


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class SignedFirmware:
    firmware: dict[str, str]  # UpdateFirmwareRequest.firmware (OCPP 2.0.1 FirmwareType)
    product: str
    version: str
    sha256: str
    issuer: str
    serial: str
    forced: bool

    def as_json(self) -> dict[str, Any]:
        return {"firmware": self.firmware, "product": self.product, "version": self.version, "sha256": self.sha256,
                "signingCertificateSerial": self.serial.upper(), "issuer": self.issuer, "forced": self.forced}


def _rollback_check(s: Session, org: str, product: str, version: str, digest_hex: str, force: bool) -> None:
    if store.other_owner(s, product, org) is not None:
        raise Forbidden(f"product {product!r} belongs to another manufacturer")
    if force:
        return
    rows = store.signed_versions(s, org, product)
    if not rows:
        return
    want = version_key(version)
    highest = max(rows, key=lambda r: version_key(r[0]))
    if want < version_key(highest[0]):
        raise RollbackRefused(f"refusing to sign {product} {version}: version {highest[0]} is already signed for "
                              "this product (rollback protection; force to override)",
                              product=product, highest=highest[0])
    for v, d in rows:
        if version_key(v) == want and d != digest_hex:
            raise RollbackRefused(f"refusing to sign {product} {version}: that version was already signed for a "
                                  "different image (force to override)", product=product, highest=highest[0])


def sign_digest(ctx: Context, org: str, *, product: str, version: str, digest: bytes, location: str,
                size: int | None = None, retrieve_at: datetime | None = None, install_at: datetime | None = None,
                force: bool = False, actor: str = "cli") -> SignedFirmware:
    """Sign SHA-256(image) with the organization's current firmware-signing key in the HSM and record it.

    Checks first (no HSM operation for a refused request), signs, then re-checks and records in one
    transaction that holds the organization's row lock: two concurrent signatures of one product are
    serialised, and a signature whose record did not commit is never handed out."""
    _check_name("product", product)
    _check_name("version", version)
    if len(digest) != 32:
        raise BadSubject("sha256 must be the 32-byte SHA-256 digest of the firmware image (64 hex characters)")
    if not location or len(location) > MAX_LOCATION:
        raise BadSubject(f"location: 1–{MAX_LOCATION} characters (OCPP 2.0.1 FirmwareType.location)")
    digest_hex = digest.hex()
    with ctx.db.session() as s:
        _manufacturer(s, org)
        _rollback_check(s, org, product, version, digest_hex, force)
    if ctx.engine.clock_guard is not None:
        ctx.engine.clock_guard.require()  # a record dated by a skewed clock is refused too (#27 item 4)
    row = current_signing_certificate(ctx, org)
    if row is None or row.key_uri is None:
        raise NotFound(f"organization {org!r} has no valid firmware-signing certificate: run "
                       f"`v2gpki firmware setup --org {org!r}`")
    ca = ctx.engine.ca(row.issuer)
    if ca.row.status != "active":
        raise FirmwareRefused(f"the Manufacturer root {row.issuer} is {ca.row.status}")
    cert = x509.load_der_x509_certificate(row.der)
    try:
        key = ctx.keystore.signer(row.key_uri)
    except KeyUriError:
        raise NotFound(f"the firmware-signing key of {org!r} is not a key of this token") from None
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # type: ignore[call-arg]
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # the HSM signed with the certified key
    sig_b64 = base64.b64encode(signature).decode()
    firmware = {"location": location, "retrieveDateTime": _iso(retrieve_at or utcnow())}
    if install_at is not None:
        firmware["installDateTime"] = _iso(install_at)
    firmware["signingCertificate"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    firmware["signature"] = sig_b64
    with ctx.db.session() as s:
        store.lock_organization(s, org)
        _rollback_check(s, org, product, version, digest_hex, force)
        s.add(FirmwareSignature(tenant=org, product=product, version=version, sha256=digest_hex, size=size,
                                issuer=row.issuer, serial=row.serial, signature=sig_b64, forced=force,
                                actor=actor[:256], created_at=utcnow()))
        audit.append(s, audit.Entry(actor=actor, org=org, action="firmware.sign", object=f"{product}/{version}",
                                    details={"product": product, "version": version, "sha256": digest_hex,
                                             "size": size, "signing_certificate": f"{row.issuer}/{row.serial}",
                                             "forced": force}))
        s.commit()
    return SignedFirmware(firmware, product, version, digest_hex, row.issuer, row.serial, force)


def sign_file(ctx: Context, org: str, path: Path, **kw: Any) -> SignedFirmware:
    with path.open("rb") as f:
        digest, size = sha256_file(f)
    return sign_digest(ctx, org, digest=digest, size=size, **kw)


def signatures(ctx: Context, org: str | None, product: str | None = None) -> list[FirmwareSignature]:
    return store.signatures(ctx.db, org, product)


# -- verification: what a charger checks ------------------------------------------------------------------


@dataclass
class Verification:
    ok: bool
    checks: list[str]
    problems: list[str]
    root: str | None = None


def _decode_signature(sig: str) -> bytes:
    try:
        return base64.b64decode("".join(sig.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FirmwareVerificationFailed("signature is not base64") from None


def load_certificate(pem_text: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem_text.encode())
    except ValueError:
        raise FirmwareVerificationFailed("signingCertificate is not a PEM X.509 certificate") from None


def verify_digest(ctx: Context, digest: bytes, signature_b64: str, certificate_pem: str,
                  root: x509.Certificate | None = None) -> Verification:
    """OCPP 2.0.1 L01.FR.02/03 as a station runs them: the signing certificate chains to the Manufacturer
    root (ours, or ``root`` when given, the one a station has installed), is within its validity, carries
    codeSigning, is not revoked (our records, which back our OCSP and CRLs); and the signature verifies over
    SHA-256 of the image. Returns every check, passed or not."""
    checks: list[str] = []
    problems: list[str] = []
    cert = load_certificate(certificate_pem)
    sig = _decode_signature(signature_b64)
    pub = cert.public_key()
    try:
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        pub.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        checks.append("signature verifies over SHA-256 of the image (ECDSA, DER)")
    except (InvalidSignature, ValueError):
        problems.append("signature does not verify over this image with the signing certificate's key")
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        problems.append("signing certificate is outside its validity period")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CODE_SIGNING in eku:
            checks.append("signing certificate has EKU codeSigning")
        else:
            problems.append("signing certificate lacks EKU codeSigning")
    except x509.ExtensionNotFound:
        problems.append("signing certificate has no extendedKeyUsage")
    # The issuing Manufacturer root.
    ca_name: str | None = None
    if root is None:
        for h in ctx.engine.cas():
            if h.row.profile == ROOT_PROFILE and h.cert.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(h.cert)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                root, ca_name = h.cert, h.name
                break
    if root is None:
        problems.append("signing certificate does not chain to a Manufacturer root of this PKI")
    else:
        try:
            cert.verify_directly_issued_by(root)
            checks.append(f"signing certificate chains to the Manufacturer root ({root.subject.rfc4514_string()})")
        except (ValueError, TypeError, InvalidSignature):
            problems.append("signing certificate is not issued by the given Manufacturer root")
        if not root.not_valid_before_utc <= now < root.not_valid_after_utc:
            problems.append("Manufacturer root is outside its validity period")
        if ca_name is None:
            for h in ctx.engine.cas():
                if h.cert == root:
                    ca_name = h.name
    # Revocation of the signing certificate, from our records (what /ocsp and /crl/<ca>.crl publish).
    serial = format(cert.serial_number, "x")
    row: Certificate | None = None
    if ca_name is not None:
        row = store.certificate(ctx.db, ca_name, serial)
        if row is not None and ctx.engine.ca(ca_name).row.status != "active":
            problems.append(f"the Manufacturer root {ca_name} is {ctx.engine.ca(ca_name).row.status}")
    if row is None:
        problems.append("revocation status unknown: the signing certificate is not in this PKI's records")
    elif row.status != "valid":
        problems.append(f"signing certificate is {row.status}"
                        + (f" ({row.revocation_reason})" if row.revocation_reason else ""))
    else:
        checks.append("signing certificate is not revoked")
    return Verification(not problems, checks, problems, ca_name)


__all__ = ["ROLE", "FirmwareRefused", "FirmwareVerificationFailed", "RollbackRefused", "SignedFirmware",
           "Verification", "ca_name_for", "setup", "sign_digest", "sign_file", "verify_digest", "version_key"]
