"""ISO 15118-2 XML signatures in EXI form: signing the CPS's responses, verifying the vehicle's requests.

An ISO 15118-2 signature is an ordinary ``ds:Signature`` in the message header whose digests and signature
are computed over EXI instead of canonical XML:

* each ``ds:Reference`` points at a body element by its Id (``URI="#id1"``), with the transform and
  canonicalisation ``http://www.w3.org/TR/canonical-exi/`` and digest ``http://www.w3.org/2001/04/xmlenc#sha256``;
  its DigestValue is SHA-256 of that element encoded alone as an EXI fragment with the V2G_CI_MsgDef schema
  (see :func:`pki.cps.exi.encode_body_fragment`, which also handles the eMAID element-fragment trap);
* ``ds:SignedInfo`` is encoded as an EXI fragment with the xmldsig schema and signed with ECDSA over
  SHA-256 (``http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256``); the SignatureValue is r ‖ s, each
  32 octets (not DER).

The CertificateInstallationRes/UpdateRes is signed over ContractSignatureCertChain,
ContractSignatureEncryptedPrivateKey, DHpublickey and eMAID (the SAProvisioningCertificateChain is not
signed); a CertificateInstallationReq is signed by the vehicle over the CertificateInstallationReq
element with its OEM provisioning key, a CertificateUpdateReq with its current contract key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from hsm.algorithms import ALGORITHMS, KeyAlg

from .errors import ExiError, SignatureVerificationFailed, XmlDsigError
from .exi import (
    CANONICAL_EXI,
    DIGEST_SHA256,
    ECDSA_SHA256,
    MSGDEF,
    XMLDSIG,
    CertificateChain,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    CertificateUpdateRes,
    DecodeLimits,
    MessageHeader,
    Node,
    Reference,
    Signature,
    SignedElement,
    SignedInfo,
    V2GMessage,
    encode_body_fragment,
    encode_signed_info,
)
from .exi.codec import encode_fragment
from .exi.datatypes import DEFAULT_LIMITS
from .exi.messages import decode_message_tree

P256_COORDINATE_OCTETS = 32


class EcdsaSigner(Protocol):
    """What signing needs: ``cryptography``'s EllipticCurvePrivateKey, or an HSM-backed object like it.

    ``sign`` returns a DER-encoded ECDSA signature, as ``cryptography`` and PKCS#11 wrappers do.
    """

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes: ...


def der_to_raw(der: bytes, octets: int = P256_COORDINATE_OCTETS) -> bytes:
    """DER ECDSA-Sig-Value → r ‖ s, each left-padded to ``octets``."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise XmlDsigError("signer returned a signature that is not DER ECDSA-Sig-Value") from None
    if not (0 < r < 1 << (8 * octets) and 0 < s < 1 << (8 * octets)):
        raise XmlDsigError("ECDSA signature values out of range for the curve")
    return r.to_bytes(octets, "big") + s.to_bytes(octets, "big")


def raw_to_der(raw: bytes, octets: int = P256_COORDINATE_OCTETS) -> bytes:
    """r ‖ s (SignatureValue) → DER, for verification with ``cryptography``."""
    if len(raw) != 2 * octets:
        raise SignatureVerificationFailed(f"SignatureValue must be {2 * octets} octets (r ‖ s)")
    return encode_dss_signature(int.from_bytes(raw[:octets], "big"), int.from_bytes(raw[octets:], "big"))


def digest_fragment(fragment_exi: bytes) -> bytes:
    return hashlib.sha256(fragment_exi).digest()


def _element_id(element: SignedElement) -> str:
    element_id = element.id
    if not element_id:
        raise XmlDsigError(f"{type(element).__name__} needs an Id to be referenced by the signature")
    return element_id


def reference_for(element: SignedElement, *, emaid_libcbv2g_compat: bool = False) -> Reference:
    """ds:Reference with the SHA-256 digest of ``element``'s EXI fragment."""
    fragment = encode_body_fragment(element, emaid_libcbv2g_compat=emaid_libcbv2g_compat)
    return Reference(uri=f"#{_element_id(element)}", digest_value=digest_fragment(fragment))


def sign_elements(
    elements: Sequence[SignedElement],
    signer: EcdsaSigner,
    *,
    emaid_libcbv2g_compat: bool = False,
) -> Signature:
    """Build and sign a SignedInfo referencing ``elements`` (in the given order)."""
    if not elements:
        raise XmlDsigError("nothing to sign")
    ids = [_element_id(e) for e in elements]
    if len(set(ids)) != len(ids):
        raise XmlDsigError("signed elements must have distinct Ids")
    signed_info = SignedInfo(tuple(reference_for(e, emaid_libcbv2g_compat=emaid_libcbv2g_compat) for e in elements))
    data = encode_signed_info(signed_info)
    der = signer.sign(data, _ECDSA_SHA256)
    raw = der_to_raw(der)
    public_key = getattr(signer, "public_key", None)
    if callable(public_key):
        _self_check(public_key(), der, data)
    return Signature(signed_info, raw)


# ISO 15118-2 CPS signatures are ecdsa-sha256 with the P-256 CPS key: the P-256 row of the algorithm table
# (hsm/algorithms.py), whose ECDSA object is built once (its constructor's type checks show in profiles).
_ECDSA_SHA256 = _P256.ecdsa if (_P256 := ALGORITHMS[KeyAlg.P256]).ecdsa is not None else ec.ECDSA(hashes.SHA256())
# Public keys whose token key has already produced a signature that verified, by id (the value keeps the
# object alive, so its id is not reused). The key store loads a private key and its public key together and
# reloads both after a token re-initialisation (new objects), so one good signature per loaded pair shows
# they belong together; verifying every response cost ≈ 2 % of an installation's CPU.
_CHECKED: dict[int, object] = {}
_CHECKED_MAX = 64


def _self_check(pub: object, der: bytes, data: bytes) -> None:
    """Catch a misconfigured HSM key (a private key that is not the certificate's) before a vehicle does:
    the first signature of each loaded key pair is verified with its public key."""
    if _CHECKED.get(id(pub)) is pub:
        return
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return
    try:
        pub.verify(der, data, _ECDSA_SHA256)
    except InvalidSignature:
        raise XmlDsigError("the signer's signature does not verify with its own public key") from None
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[id(pub)] = pub


ContractDelivery = CertificateInstallationRes | CertificateUpdateRes


def signed_elements(response: ContractDelivery) -> list[SignedElement]:
    """The four elements the CPS signs, in the order the response carries them."""
    return [
        response.contract_signature_cert_chain,
        response.contract_signature_encrypted_private_key,
        response.dh_public_key,
        response.emaid,
    ]


def with_default_ids(response: ContractDelivery) -> ContractDelivery:
    """Give ContractSignatureCertChain the customary Id ``id1`` when it has none (its Id is optional in the
    schema; EncryptedPrivateKey, DHpublickey and eMAID always carry theirs, customarily id2..id4)."""
    chain = response.contract_signature_cert_chain
    if chain.id is None:
        chain = CertificateChain(chain.certificate, chain.sub_certificates, "id1")
    return replace(response, contract_signature_cert_chain=chain)


def sign_contract_response(
    session_id: bytes,
    response: ContractDelivery,
    signer: EcdsaSigner,
    *,
    emaid_libcbv2g_compat: bool = False,
) -> V2GMessage:
    """The complete V2G_Message for a CertificateInstallationRes/UpdateRes, signed by the CPS leaf key.

    ``session_id`` is copied from the request's header. The ContractSignatureCertChain gets Id ``id1``
    when it has none (EncryptedPrivateKey, DHpublickey and eMAID always carry Ids).
    """
    response = with_default_ids(response)
    signature = sign_elements(signed_elements(response), signer, emaid_libcbv2g_compat=emaid_libcbv2g_compat)
    return V2GMessage(MessageHeader(session_id, signature=signature), response)


# --- verification --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedRequest:
    message: V2GMessage
    body: CertificateInstallationReq | CertificateUpdateReq
    signed_info_schema: str  # which grammar the vehicle encoded SignedInfo with (xmldsig or V2G_CI_MsgDef)


def _path(node: Node, *locals_: str) -> Node:
    for local in locals_:
        child = node.child(local)
        if child is None:  # pragma: no cover - V2GMessage.from_node has already required these
            raise SignatureVerificationFailed(f"malformed request: no {local}")
        node = child
    return node


def _verify_ecdsa(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def signer_public_key(key: ec.EllipticCurvePublicKey | x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise SignatureVerificationFailed("the signer's key must be an EC secp256r1 key")
    return public


def verify_request(
    exi_request: bytes | Node,
    signer_key: ec.EllipticCurvePublicKey | x509.Certificate,
    limits: DecodeLimits = DEFAULT_LIMITS,
    message: V2GMessage | None = None,
) -> VerifiedRequest:
    """Decode a CertificateInstallationReq/UpdateReq V2G_Message and verify its header signature.

    ``exi_request``: the EXI stream, or its tree as ``decode_message_tree`` returned it (a caller that has
    decoded the message already saves a second decode; the checks are the same).

    ``signer_key``: the OEM provisioning certificate (installation) or the current contract certificate
    (update) — validating *that* certificate's chain is the caller's job. Checks that exactly the body
    element is referenced, with the canonical EXI transform and SHA-256, that its digest matches, and the
    ECDSA signature over SignedInfo. SignedInfo is tried as encoded with the xmldsig schema, then with the
    V2G_CI_MsgDef schema (implementations differ; both are EXI fragments of a schema that declares it).
    Raises :class:`SignatureVerificationFailed` (or an EXI error for a malformed stream).
    """
    public_key = signer_public_key(signer_key)
    tree = exi_request if isinstance(exi_request, Node) else decode_message_tree(exi_request, limits)
    if message is None or not isinstance(exi_request, Node):  # ``message``: the caller's from_node(tree)
        message = V2GMessage.from_node(tree)
    body = message.body
    if not isinstance(body, CertificateInstallationReq | CertificateUpdateReq):
        raise XmlDsigError("not a CertificateInstallationReq or CertificateUpdateReq")
    signature = message.header.signature
    if signature is None:
        raise SignatureVerificationFailed("the request carries no signature")
    signed_info = signature.signed_info
    if signed_info.canonicalization_method != CANONICAL_EXI:
        raise SignatureVerificationFailed("unexpected CanonicalizationMethod")
    if signed_info.signature_method != ECDSA_SHA256:
        raise SignatureVerificationFailed("unexpected SignatureMethod")
    if len(signed_info.references) != 1:
        raise SignatureVerificationFailed("the request signature must reference exactly the body element")
    reference = signed_info.references[0]
    if reference.uri != f"#{body.id}":
        raise SignatureVerificationFailed("the signature does not reference the request body element")
    if reference.digest_method != DIGEST_SHA256 or reference.transforms not in ((CANONICAL_EXI,), ()):
        raise SignatureVerificationFailed("unexpected Transform or DigestMethod")

    # Digests and signature are checked against the decoded tree, re-encoded: it keeps everything the
    # stream held, so the vehicle's exact fragments are reproduced (canonical EXI).
    body_node = _path(tree, "Body", body.QNAME[0])
    signed_info_node = _path(tree, "Header", "Signature", "SignedInfo")
    try:
        body_digest = digest_fragment(encode_fragment([body_node], MSGDEF))
    except ExiError as exc:  # pragma: no cover - a decoded tree re-encodes
        raise SignatureVerificationFailed("the body element cannot be re-encoded") from exc
    if not hmac.compare_digest(body_digest, reference.digest_value):
        raise SignatureVerificationFailed("DigestValue does not match the body element")

    der = raw_to_der(signature.signature_value)
    for schema in (XMLDSIG, MSGDEF):
        if _verify_ecdsa(public_key, der, encode_fragment([signed_info_node], schema)):
            return VerifiedRequest(message, body, schema.name)
    raise SignatureVerificationFailed("the ECDSA signature over SignedInfo does not verify")


def verify_response(message: V2GMessage, cps_key: ec.EllipticCurvePublicKey | x509.Certificate) -> None:
    """The vehicle's check of a signed CertificateInstallationRes/UpdateRes (for tests and self-checks)."""
    body = message.body
    signature = message.header.signature
    if not isinstance(body, CertificateInstallationRes | CertificateUpdateRes) or signature is None:
        raise SignatureVerificationFailed("not a signed CertificateInstallationRes/UpdateRes")
    expected = {f"#{_element_id(e)}": e for e in signed_elements(body)}
    seen = {r.uri for r in signature.signed_info.references}
    if seen != set(expected):
        raise SignatureVerificationFailed("the signature does not reference exactly the four signed elements")
    for reference in signature.signed_info.references:
        assert reference.uri is not None
        digest = digest_fragment(encode_body_fragment(expected[reference.uri]))
        if not hmac.compare_digest(digest, reference.digest_value):
            raise SignatureVerificationFailed(f"DigestValue mismatch for {reference.uri}")
    data = encode_signed_info(signature.signed_info)
    if not _verify_ecdsa(signer_public_key(cps_key), raw_to_der(signature.signature_value), data):
        raise SignatureVerificationFailed("the ECDSA signature over SignedInfo does not verify")
