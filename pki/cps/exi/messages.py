"""Data model of the ISO 15118-2 messages the CPS handles, and its EXI (de)serialisation.

``V2GMessage`` (Header + Body) with one of CertificateInstallationReq/Res or CertificateUpdateReq/Res in the
body, plus the xmldsig ``Signature`` of the header. Each dataclass maps to and from a :class:`Node` tree that
:mod:`.codec` encodes with the grammars of :mod:`.grammar`; schema rules (required elements, lengths,
enumerations, occurrence counts) are enforced by that encoder, never silently fixed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ..errors import ExiDecodeError, ExiUnsupported
from ._names import NS_BODY, NS_DEF, NS_DSIG, NS_HEADER, NS_NONE, NS_TYPES
from .codec import decode_document, decode_fragment, encode_document, encode_fragment
from .datatypes import DEFAULT_LIMITS, DecodeLimits
from .schema import MSGDEF, XMLDSIG, QName, SchemaSet
from .tree import Node, Value

CANONICAL_EXI = "http://www.w3.org/TR/canonical-exi/"
DIGEST_SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
ECDSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"

_ID_TYPES: QName = ("Id", NS_TYPES)
_ID_BODY: QName = ("Id", NS_BODY)
_ID_NONE: QName = ("Id", NS_NONE)


class ResponseCode(StrEnum):
    """responseCodeType of V2G_CI_MsgDataTypes.xsd, in schema order (the order is the EXI encoding)."""

    OK = "OK"
    OK_NewSessionEstablished = "OK_NewSessionEstablished"
    OK_OldSessionJoined = "OK_OldSessionJoined"
    OK_CertificateExpiresSoon = "OK_CertificateExpiresSoon"
    FAILED = "FAILED"
    FAILED_SequenceError = "FAILED_SequenceError"
    FAILED_ServiceIDInvalid = "FAILED_ServiceIDInvalid"
    FAILED_UnknownSession = "FAILED_UnknownSession"
    FAILED_ServiceSelectionInvalid = "FAILED_ServiceSelectionInvalid"
    FAILED_PaymentSelectionInvalid = "FAILED_PaymentSelectionInvalid"
    FAILED_CertificateExpired = "FAILED_CertificateExpired"
    FAILED_SignatureError = "FAILED_SignatureError"
    FAILED_NoCertificateAvailable = "FAILED_NoCertificateAvailable"
    FAILED_CertChainError = "FAILED_CertChainError"
    FAILED_ChallengeInvalid = "FAILED_ChallengeInvalid"
    FAILED_ContractCanceled = "FAILED_ContractCanceled"
    FAILED_WrongChargeParameter = "FAILED_WrongChargeParameter"
    FAILED_PowerDeliveryNotApplied = "FAILED_PowerDeliveryNotApplied"
    FAILED_TariffSelectionInvalid = "FAILED_TariffSelectionInvalid"
    FAILED_ChargingProfileInvalid = "FAILED_ChargingProfileInvalid"
    FAILED_MeteringSignatureNotValid = "FAILED_MeteringSignatureNotValid"
    FAILED_NoChargeServiceSelected = "FAILED_NoChargeServiceSelected"
    FAILED_WrongEnergyTransferMode = "FAILED_WrongEnergyTransferMode"
    FAILED_ContactorError = "FAILED_ContactorError"
    FAILED_CertificateNotAllowedAtThisEVSE = "FAILED_CertificateNotAllowedAtThisEVSE"
    FAILED_CertificateRevoked = "FAILED_CertificateRevoked"


# --- tree helpers --------------------------------------------------------------------------------------------


def _chars(value: Value) -> list[Node | Value]:
    """Character content of a simple-content element: an empty value is no CH event (as EXIficient does)."""
    return [] if value in ("", b"") else [value]


def _leaf(local: str, uri: str, value: Value) -> Node:
    return Node((local, uri), content=_chars(value))


def _req(node: Node, local: str) -> Node:
    child = node.child(local)
    if child is None:  # cannot happen for a tree the decoder accepted; kept as a typed guard
        raise ExiDecodeError(f"{node.local}: missing {local}")
    return child


def _value(node: Node) -> Value | None:
    """The single value of a simple-content element; None when it is empty (no CH event)."""
    if any(isinstance(item, Node) for item in node.content) or len(node.content) > 1:
        raise ExiDecodeError(f"{node.local}: expected a single value")
    return node.content[0] if node.content else None  # type: ignore[return-value]


def _str(node: Node) -> str:
    value = _value(node)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ExiDecodeError(f"{node.local}: expected a string")
    return value


def _bytes(node: Node) -> bytes:
    value = _value(node)
    if value is None:
        return b""
    if not isinstance(value, bytes):
        raise ExiDecodeError(f"{node.local}: expected binary content")
    return value


def _int(node: Node) -> int:
    value = _value(node)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ExiDecodeError(f"{node.local}: expected an integer")
    return value


def _opt_attr(node: Node, qname: QName) -> str | None:
    value = node.attributes.get(qname)
    if value is not None and not isinstance(value, str):
        raise ExiDecodeError(f"{node.local}: attribute {qname[0]} is not a string")
    return value


def _attr(node: Node, qname: QName) -> str:
    value = _opt_attr(node, qname)
    if value is None:
        raise ExiDecodeError(f"{node.local}: attribute {qname[0]} missing")
    return value


def _algorithm_only(node: Node) -> str:
    """Algorithm of CanonicalizationMethod/SignatureMethod/DigestMethod/Transform; nothing else is used."""
    for item in node.content:
        if isinstance(item, Node):
            raise ExiUnsupported(f"{node.local}: child element {item.local} not supported")
        if not isinstance(item, str) or item.strip():
            raise ExiUnsupported(f"{node.local}: mixed text content not supported")
    return _attr(node, ("Algorithm", NS_NONE))


# --- data types ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class X509IssuerSerial:
    """xmldsig X509IssuerSerialType: one entry of ListOfRootCertificateIDs (at most 20)."""

    issuer_name: str
    serial_number: int

    def to_node(self, local: str, uri: str) -> Node:
        return Node(
            (local, uri),
            content=[
                _leaf("X509IssuerName", NS_DSIG, self.issuer_name),
                _leaf("X509SerialNumber", NS_DSIG, self.serial_number),
            ],
        )

    @classmethod
    def from_node(cls, node: Node) -> X509IssuerSerial:
        return cls(_str(_req(node, "X509IssuerName")), _int(_req(node, "X509SerialNumber")))


def _roots_node(roots: Sequence[X509IssuerSerial]) -> Node:
    return Node(
        ("ListOfRootCertificateIDs", NS_BODY), content=[r.to_node("RootCertificateID", NS_TYPES) for r in roots]
    )


def _roots(node: Node) -> tuple[X509IssuerSerial, ...]:
    return tuple(X509IssuerSerial.from_node(n) for n in _req(node, "ListOfRootCertificateIDs").children())


def _shared(owner: object, key: str, build: Callable[[], Node]) -> Node:
    """``owner``'s Node, built once per instance and memoising its own EXI encodings (codec.Node.memo): a
    response's signed elements and its SignedInfo are encoded as fragments for the digests and again inside
    the document. The instances are frozen, so the Node never goes stale; callers only read it."""
    nodes: dict[str, Node] = owner.__dict__.setdefault("_exi_nodes", {})  # frozen: bypass __setattr__
    node = nodes.get(key)
    if node is None:
        node = build()
        node.memo = {}
        nodes[key] = node
    return node


# SubCertificates nodes by their certificates. A CA's chain is the same in every response it issues for,
# so its node, and with it its memoised EXI bits (codec.Node.memo), is shared by all of them: the
# contract chain's sub-CAs (in the signed fragment and the document) are encoded once per process, not
# twice per response. Nodes are only read once built; the memo is filled idempotently.
_SUBS: dict[tuple[bytes, ...], Node] = {}
_SUBS_MAX = 32


def _sub_certificates(certs: tuple[bytes, ...]) -> Node:
    node = _SUBS.get(certs)
    if node is None:
        node = Node(("SubCertificates", NS_TYPES), content=[_leaf("Certificate", NS_TYPES, c) for c in certs])
        node.memo = {}
        if len(_SUBS) >= _SUBS_MAX:
            _SUBS.clear()
        _SUBS[certs] = node
    return node


@dataclass(frozen=True)
class CertificateChain:
    """CertificateChainType: leaf certificate (DER) and up to four sub-CA certificates, Sub-CA 2 first."""

    certificate: bytes
    sub_certificates: tuple[bytes, ...] = ()
    id: str | None = None

    def to_node(self, local: str) -> Node:
        return _shared(self, local, lambda: self._node(local))

    def _node(self, local: str) -> Node:
        node = Node((local, NS_BODY), content=[_leaf("Certificate", NS_TYPES, self.certificate)])
        if self.id is not None:
            node.attributes[_ID_TYPES] = self.id
        if self.sub_certificates:
            node.content.append(_sub_certificates(self.sub_certificates))
        return node

    @classmethod
    def from_node(cls, node: Node) -> CertificateChain:
        subs = node.child("SubCertificates")
        return cls(
            certificate=_bytes(_req(node, "Certificate")),
            sub_certificates=tuple(_bytes(c) for c in subs.children()) if subs is not None else (),
            id=_opt_attr(node, _ID_TYPES),
        )


@dataclass(frozen=True)
class EncryptedPrivateKey:
    """ContractSignatureEncryptedPrivateKeyType: IV ‖ AES-128-CBC ciphertext of the contract key (48 octets)."""

    value: bytes
    id: str

    def to_node(self) -> Node:
        return _shared(self, "", lambda: Node(("ContractSignatureEncryptedPrivateKey", NS_BODY), {_ID_TYPES: self.id},
                                              _chars(self.value)))

    @classmethod
    def from_node(cls, node: Node) -> EncryptedPrivateKey:
        return cls(_bytes(node), _attr(node, _ID_TYPES))


@dataclass(frozen=True)
class DHPublicKey:
    """DiffieHellmanPublickeyType: the ephemeral ECDH public key, 0x04 ‖ X ‖ Y (65 octets)."""

    value: bytes
    id: str

    def to_node(self) -> Node:
        return _shared(self, "", lambda: Node(("DHpublickey", NS_BODY), {_ID_TYPES: self.id}, _chars(self.value)))

    @classmethod
    def from_node(cls, node: Node) -> DHPublicKey:
        return cls(_bytes(node), _attr(node, _ID_TYPES))


@dataclass(frozen=True)
class EMAID:
    """EMAIDType: the eMAID with an Id, as CertificateInstallationRes/CertificateUpdateRes carry it."""

    value: str
    id: str

    def to_node(self) -> Node:
        return _shared(self, "", lambda: Node(("eMAID", NS_BODY), {_ID_TYPES: self.id}, _chars(self.value)))

    @classmethod
    def from_node(cls, node: Node) -> EMAID:
        return cls(_str(node), _attr(node, _ID_TYPES))


@dataclass(frozen=True)
class CertificateInstallationReq:
    """Signed by the vehicle with its OEM provisioning key over this element (Id, e.g. ``id1``)."""

    id: str
    oem_provisioning_cert: bytes
    root_certificate_ids: tuple[X509IssuerSerial, ...]

    QNAME = ("CertificateInstallationReq", NS_BODY)

    def to_node(self) -> Node:
        return Node(
            self.QNAME,
            {_ID_BODY: self.id},
            [_leaf("OEMProvisioningCert", NS_BODY, self.oem_provisioning_cert), _roots_node(self.root_certificate_ids)],
        )

    @classmethod
    def from_node(cls, node: Node) -> CertificateInstallationReq:
        return cls(_attr(node, _ID_BODY), _bytes(_req(node, "OEMProvisioningCert")), _roots(node))


@dataclass(frozen=True)
class CertificateUpdateReq:
    """Signed by the vehicle with its current contract key."""

    id: str
    contract_signature_cert_chain: CertificateChain
    emaid: str
    root_certificate_ids: tuple[X509IssuerSerial, ...]

    QNAME = ("CertificateUpdateReq", NS_BODY)

    def to_node(self) -> Node:
        return Node(
            self.QNAME,
            {_ID_BODY: self.id},
            [
                self.contract_signature_cert_chain.to_node("ContractSignatureCertChain"),
                _leaf("eMAID", NS_BODY, self.emaid),
                _roots_node(self.root_certificate_ids),
            ],
        )

    @classmethod
    def from_node(cls, node: Node) -> CertificateUpdateReq:
        return cls(
            _attr(node, _ID_BODY),
            CertificateChain.from_node(_req(node, "ContractSignatureCertChain")),
            _str(_req(node, "eMAID")),
            _roots(node),
        )


@dataclass(frozen=True)
class _ContractDelivery:
    """The six elements CertificateInstallationRes and CertificateUpdateRes share."""

    response_code: ResponseCode
    sa_provisioning_certificate_chain: CertificateChain
    contract_signature_cert_chain: CertificateChain
    contract_signature_encrypted_private_key: EncryptedPrivateKey
    dh_public_key: DHPublicKey
    emaid: EMAID

    def _content(self) -> list[Node | Value]:
        return [
            _leaf("ResponseCode", NS_BODY, str(self.response_code)),
            self.sa_provisioning_certificate_chain.to_node("SAProvisioningCertificateChain"),
            self.contract_signature_cert_chain.to_node("ContractSignatureCertChain"),
            self.contract_signature_encrypted_private_key.to_node(),
            self.dh_public_key.to_node(),
            self.emaid.to_node(),
        ]

    @staticmethod
    def _fields(node: Node) -> dict[str, object]:
        return {
            "response_code": ResponseCode(_str(_req(node, "ResponseCode"))),
            "sa_provisioning_certificate_chain": CertificateChain.from_node(
                _req(node, "SAProvisioningCertificateChain")
            ),
            "contract_signature_cert_chain": CertificateChain.from_node(_req(node, "ContractSignatureCertChain")),
            "contract_signature_encrypted_private_key": EncryptedPrivateKey.from_node(
                _req(node, "ContractSignatureEncryptedPrivateKey")
            ),
            "dh_public_key": DHPublicKey.from_node(_req(node, "DHpublickey")),
            "emaid": EMAID.from_node(_req(node, "eMAID")),
        }


@dataclass(frozen=True)
class CertificateInstallationRes(_ContractDelivery):
    """Signed by the CPS over ContractSignatureCertChain, ContractSignatureEncryptedPrivateKey, DHpublickey
    and eMAID (the SAProvisioningCertificateChain is not signed)."""

    QNAME = ("CertificateInstallationRes", NS_BODY)

    def to_node(self) -> Node:
        return Node(self.QNAME, content=self._content())

    @classmethod
    def from_node(cls, node: Node) -> CertificateInstallationRes:
        return cls(**cls._fields(node))  # type: ignore[arg-type]


@dataclass(frozen=True)
class CertificateUpdateRes(_ContractDelivery):
    retry_counter: int | None = None  # xs:short

    QNAME = ("CertificateUpdateRes", NS_BODY)

    def to_node(self) -> Node:
        content = self._content()
        if self.retry_counter is not None:
            content.append(_leaf("RetryCounter", NS_BODY, self.retry_counter))
        return Node(self.QNAME, content=content)

    @classmethod
    def from_node(cls, node: Node) -> CertificateUpdateRes:
        counter = node.child("RetryCounter")
        retry = _int(counter) if counter is not None else None
        return cls(**cls._fields(node), retry_counter=retry)  # type: ignore[arg-type]


BodyMessage = CertificateInstallationReq | CertificateInstallationRes | CertificateUpdateReq | CertificateUpdateRes
_BODY_TYPES: dict[str, type[BodyMessage]] = {
    "CertificateInstallationReq": CertificateInstallationReq,
    "CertificateInstallationRes": CertificateInstallationRes,
    "CertificateUpdateReq": CertificateUpdateReq,
    "CertificateUpdateRes": CertificateUpdateRes,
}


# --- xmldsig -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """ds:Reference to an element by ``#Id``, with the canonical EXI transform and a SHA-256 digest."""

    uri: str | None
    digest_value: bytes
    digest_method: str = DIGEST_SHA256
    transforms: tuple[str, ...] = (CANONICAL_EXI,)
    id: str | None = None
    type: str | None = None

    def to_node(self) -> Node:
        node = Node(("Reference", NS_DSIG))
        for local, value in (("Id", self.id), ("URI", self.uri), ("Type", self.type)):
            if value is not None:
                node.attributes[(local, NS_NONE)] = value
        if self.transforms:
            node.content.append(
                Node(
                    ("Transforms", NS_DSIG),
                    content=[Node(("Transform", NS_DSIG), {("Algorithm", NS_NONE): t}) for t in self.transforms],
                )
            )
        node.content.append(Node(("DigestMethod", NS_DSIG), {("Algorithm", NS_NONE): self.digest_method}))
        node.content.append(_leaf("DigestValue", NS_DSIG, self.digest_value))
        return node

    @classmethod
    def from_node(cls, node: Node) -> Reference:
        transforms = node.child("Transforms")
        return cls(
            uri=_opt_attr(node, ("URI", NS_NONE)),
            digest_value=_bytes(_req(node, "DigestValue")),
            digest_method=_algorithm_only(_req(node, "DigestMethod")),
            transforms=tuple(_algorithm_only(t) for t in transforms.children()) if transforms is not None else (),
            id=_opt_attr(node, ("Id", NS_NONE)),
            type=_opt_attr(node, ("Type", NS_NONE)),
        )


@dataclass(frozen=True)
class SignedInfo:
    references: tuple[Reference, ...]
    canonicalization_method: str = CANONICAL_EXI
    signature_method: str = ECDSA_SHA256
    id: str | None = None

    QNAME = ("SignedInfo", NS_DSIG)

    def to_node(self) -> Node:
        return _shared(self, "", self._node)

    def _node(self) -> Node:
        node = Node(
            self.QNAME,
            content=[
                Node(("CanonicalizationMethod", NS_DSIG), {("Algorithm", NS_NONE): self.canonicalization_method}),
                Node(("SignatureMethod", NS_DSIG), {("Algorithm", NS_NONE): self.signature_method}),
                *(r.to_node() for r in self.references),
            ],
        )
        if self.id is not None:
            node.attributes[_ID_NONE] = self.id
        return node

    @classmethod
    def from_node(cls, node: Node) -> SignedInfo:
        return cls(
            references=tuple(Reference.from_node(r) for r in node.children("Reference")),
            canonicalization_method=_algorithm_only(_req(node, "CanonicalizationMethod")),
            signature_method=_algorithm_only(_req(node, "SignatureMethod")),
            id=_opt_attr(node, _ID_NONE),
        )


@dataclass(frozen=True)
class Signature:
    """ds:Signature in the message header; SignatureValue is the raw ECDSA r ‖ s (64 octets for P-256)."""

    signed_info: SignedInfo
    signature_value: bytes
    id: str | None = None
    signature_value_id: str | None = None

    def to_node(self) -> Node:
        value = Node(("SignatureValue", NS_DSIG), content=_chars(self.signature_value))
        if self.signature_value_id is not None:
            value.attributes[_ID_NONE] = self.signature_value_id
        node = Node(("Signature", NS_DSIG), content=[self.signed_info.to_node(), value])
        if self.id is not None:
            node.attributes[_ID_NONE] = self.id
        return node

    @classmethod
    def from_node(cls, node: Node) -> Signature:
        value = _req(node, "SignatureValue")
        return cls(
            SignedInfo.from_node(_req(node, "SignedInfo")),
            _bytes(value),
            _opt_attr(node, _ID_NONE),
            _opt_attr(value, _ID_NONE),
        )


# --- header and message --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    fault_code: str  # faultCodeType: ParsingError, NoTLSRootCertificatAvailable (sic), UnknownError
    fault_msg: str | None = None

    def to_node(self) -> Node:
        node = Node(("Notification", NS_HEADER), content=[_leaf("FaultCode", NS_TYPES, self.fault_code)])
        if self.fault_msg is not None:
            node.content.append(_leaf("FaultMsg", NS_TYPES, self.fault_msg))
        return node

    @classmethod
    def from_node(cls, node: Node) -> Notification:
        msg = node.child("FaultMsg")
        return cls(_str(_req(node, "FaultCode")), _str(msg) if msg is not None else None)


@dataclass(frozen=True)
class MessageHeader:
    session_id: bytes  # hexBinary, at most 8 octets; a response copies the request's
    notification: Notification | None = None
    signature: Signature | None = None

    def to_node(self) -> Node:
        node = Node(("Header", NS_DEF), content=[_leaf("SessionID", NS_HEADER, self.session_id)])
        if self.notification is not None:
            node.content.append(self.notification.to_node())
        if self.signature is not None:
            node.content.append(self.signature.to_node())
        return node

    @classmethod
    def from_node(cls, node: Node) -> MessageHeader:
        notification = node.child("Notification")
        signature = node.child("Signature")
        return cls(
            _bytes(_req(node, "SessionID")),
            Notification.from_node(notification) if notification is not None else None,
            Signature.from_node(signature) if signature is not None else None,
        )


V2G_MESSAGE: QName = ("V2G_Message", NS_DEF)


@dataclass(frozen=True)
class V2GMessage:
    header: MessageHeader
    body: BodyMessage | None

    def to_node(self) -> Node:
        body = Node(("Body", NS_DEF))
        if self.body is not None:
            body.content.append(self.body.to_node())
        return Node(V2G_MESSAGE, content=[self.header.to_node(), body])

    @classmethod
    def from_node(cls, node: Node) -> V2GMessage:
        if node.qname != V2G_MESSAGE:
            raise ExiUnsupported(f"document element {node.local} is not V2G_Message")
        body = _req(node, "Body")
        element = next(body.children(), None)
        message: BodyMessage | None = None
        if element is not None:
            kind = _BODY_TYPES.get(element.local)
            if kind is None:  # the decoder already refuses other messages; kept as a typed guard
                raise ExiUnsupported(f"body message {element.local} not supported")
            message = kind.from_node(element)
        return cls(MessageHeader.from_node(_req(node, "Header")), message)


# --- public encode / decode ----------------------------------------------------------------------------------


def encode_message(message: V2GMessage) -> bytes:
    """The whole V2G_Message as an EXI document (what OCPP's exiRequest/exiResponse carry, base64'd)."""
    return encode_document(message.to_node(), MSGDEF)


def decode_message_tree(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, for_verify: bool = False) -> Node:
    """Decode a V2G_Message EXI document to its element tree (what signature checks re-encode from).

    ``for_verify``: the request bodies keep their encoded bits (codec ``keep_bits``), so the signature
    check's re-encoding of the body copies them; the tree must then not be modified."""
    root = decode_document(data, MSGDEF, limits, keep_bits=_SIGNED_BODIES if for_verify else frozenset())
    if root.qname != V2G_MESSAGE:
        raise ExiUnsupported(f"document element {root.local} is not V2G_Message")
    return root


_SIGNED_BODIES = frozenset({("CertificateInstallationReq", NS_BODY), ("CertificateUpdateReq", NS_BODY)})


def decode_message(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> V2GMessage:
    return V2GMessage.from_node(decode_message_tree(data, limits))


SignedElement = (
    CertificateInstallationReq | CertificateUpdateReq | CertificateChain | EncryptedPrivateKey | DHPublicKey | EMAID
)


def fragment_node(element: SignedElement) -> Node:
    """The element as it is signed; a CertificateChain is signed as ContractSignatureCertChain."""
    if isinstance(element, CertificateChain):
        return element.to_node("ContractSignatureCertChain")
    return element.to_node()


def encode_body_fragment(element: SignedElement | Node, *, emaid_libcbv2g_compat: bool = False) -> bytes:
    """A signed element as an EXI fragment of the V2G_CI_MsgDef schema (namespace urn:iso:15118:2:2013:MsgBody).

    The eMAID of CertificateInstallationRes/UpdateRes is declared with two types (EMAIDType and eMAIDType),
    so EXI 1.0 §8.5.2 evaluates it with the relaxed element fragment grammar (§8.5.3), as EXIficient does.
    ``emaid_libcbv2g_compat`` reproduces libcbv2g's deviating encoding instead (EVerest/cbexigen issue #60).
    """
    node = element if isinstance(element, Node) else fragment_node(element)
    return encode_fragment([node], MSGDEF, relaxed_ambiguous=not emaid_libcbv2g_compat)


def encode_signed_info(signed_info: SignedInfo | Node, schema: SchemaSet = XMLDSIG) -> bytes:
    """SignedInfo as an EXI fragment; by default with the xmldsig schema alone, as RISE-V2G and Josev sign it."""
    if isinstance(signed_info, Node):
        return encode_fragment([signed_info], schema)
    template = _signed_info_template(signed_info, schema)
    if template is not None:
        return template.fill([r.digest_value for r in signed_info.references])
    return encode_fragment([signed_info.to_node()], schema)


@dataclass(frozen=True)
class _Template:
    """The EXI bits of a SignedInfo fragment with its DigestValues cut out. Every SignedInfo a CPS signs
    has the same shape (algorithms, URIs #id1..#id4, 32-octet SHA-256 digests); only the digests differ,
    and with bit-packed EXI and no string tables (ISO 15118-2's options) each digest's octets sit at a
    fixed bit offset. Filling the template writes them there instead of encoding ≈ 30 elements again (the
    SignedInfo was ≈ 4 % of a worker's time). Built by the codec itself and only kept if it reproduces the
    codec's output for a second, independent set of digests."""

    value: int  # the fragment's bits with zero digests, as a big-endian integer of `octets` octets
    octets: int
    shifts: tuple[int, ...]  # per reference: left shift of its digest's bits (digest_octets × 8 wide)
    digest_octets: int

    def fill(self, digests: Sequence[bytes]) -> bytes:
        v = self.value
        for d, shift in zip(digests, self.shifts, strict=True):
            if len(d) != self.digest_octets:
                raise ValueError("digest length differs from the template's")
            v |= int.from_bytes(d, "big") << shift
        return v.to_bytes(self.octets, "big")


_TEMPLATES: dict[tuple[object, ...], _Template | None] = {}


def _signed_info_template(si: SignedInfo, schema: SchemaSet) -> _Template | None:
    refs = si.references
    if not refs:
        return None
    n = len(refs[0].digest_value)
    if n < 16 or any(len(r.digest_value) != n for r in refs):
        return None
    key = (id(schema), si.canonicalization_method, si.signature_method, si.id, n,
           tuple((r.uri, r.digest_method, r.transforms, r.id, r.type) for r in refs))
    if key in _TEMPLATES:  # the digest length is part of the key
        return _TEMPLATES[key]
    t = _derive_template(si, schema, n)
    if len(_TEMPLATES) < 64:
        _TEMPLATES[key] = t
    return t


def _derive_template(si: SignedInfo, schema: SchemaSet, n: int) -> _Template | None:
    def generic(digests: Sequence[bytes]) -> bytes:
        refs = tuple(dataclasses.replace(r, digest_value=d) for r, d in zip(si.references, digests, strict=True))
        return encode_fragment([dataclasses.replace(si, references=refs).to_node()], schema)

    # Where the digests go: encode with all-zero and with all-one digests; the bits that differ are the
    # digests' (nothing else in the encoding depends on their values once their length is fixed).
    k = len(si.references)
    zeros, ones = generic([b"\0" * n] * k), generic([b"\xff" * n] * k)
    if len(zeros) != len(ones):
        return None
    diff = int.from_bytes(zeros, "big") ^ int.from_bytes(ones, "big")
    width = 8 * n
    shifts: list[int] = []
    while diff:
        low = (diff & -diff).bit_length() - 1  # lowest differing bit: the end of the last unplaced digest
        field = ((1 << width) - 1) << low
        if diff & field != field:
            return None  # not a contiguous run of one digest's width
        shifts.append(low)
        diff &= ~field
    if len(shifts) != k:
        return None
    shifts.reverse()  # the first reference's digest comes first in the stream, i.e. in the high bits
    t = _Template(int.from_bytes(zeros, "big"), len(zeros), tuple(shifts), n)
    probe = [os.urandom(n) for _ in range(k)]
    return t if t.fill(probe) == generic(probe) else None


def decode_body_fragment(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Node]:
    return decode_fragment(data, MSGDEF, limits)
