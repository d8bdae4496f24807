"""Data model of the ISO 15118-20 CertificateInstallationReq/Res (#26) and their EXI (de)serialisation.

Each message is an EXI document of the V2G_CI_CommonMessages schema set (:data:`.schema20.CM20`); the signed
elements (the request's ``OEMProvisioningCertificateChain``, the response's ``SignedInstallationData``) are
EXI fragments of the same set, and SignedInfo a fragment of the xmldsig schema alone (as Josev signs it, and
as ISO 15118-2 does). The xmldsig parts (Signature, SignedInfo, Reference, X509IssuerSerial) are
:mod:`.messages`' classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ExiUnsupported
from ._names20 import NS20_CM, NS20_CT
from .codec import decode_document, decode_fragment, encode_document, encode_fragment
from .datatypes import DEFAULT_LIMITS, DecodeLimits
from .messages import Signature, X509IssuerSerial, _bytes, _int, _leaf, _req, _str
from .schema import QName
from .schema20 import CM20
from .tree import Node

_ID: QName = ("Id", NS20_CM)
CERTIFICATE_INSTALLATION_REQ: QName = ("CertificateInstallationReq", NS20_CM)
CERTIFICATE_INSTALLATION_RES: QName = ("CertificateInstallationRes", NS20_CM)


@dataclass(frozen=True)
class Header20:
    """MessageHeaderType of V2G_CI_CommonTypes.xsd: SessionID (8 octets), TimeStamp (Unix seconds), Signature."""

    session_id: bytes
    timestamp: int
    signature: Signature | None = None

    def to_node(self) -> Node:
        node = Node(("Header", NS20_CT), content=[_leaf("SessionID", NS20_CT, self.session_id),
                                                   _leaf("TimeStamp", NS20_CT, self.timestamp)])
        if self.signature is not None:
            node.content.append(self.signature.to_node())
        return node

    @classmethod
    def from_node(cls, node: Node) -> Header20:
        signature = node.child("Signature")
        return cls(_bytes(_req(node, "SessionID")), _int(_req(node, "TimeStamp")),
                   Signature.from_node(signature) if signature is not None else None)


@dataclass(frozen=True)
class Chain20:
    """CertificateChainType / SignedCertificateChainType (with Id) / ContractCertificateChainType."""

    certificate: bytes
    sub_certificates: tuple[bytes, ...] = ()
    id: str | None = None

    def to_node(self, local: str) -> Node:
        node = Node((local, NS20_CM), content=[_leaf("Certificate", NS20_CM, self.certificate)])
        if self.sub_certificates or local == "ContractCertificateChain":
            node.content.append(Node(("SubCertificates", NS20_CM),
                                     content=[_leaf("Certificate", NS20_CM, c) for c in self.sub_certificates]))
        if self.id is not None:
            node.attributes[_ID] = self.id
        return node

    @classmethod
    def from_node(cls, node: Node) -> Chain20:
        subs = node.child("SubCertificates")
        certs = tuple(_bytes(c) for c in subs.children("Certificate")) if subs is not None else ()
        ident = node.attributes.get(_ID)
        return cls(_bytes(_req(node, "Certificate")), certs, ident if isinstance(ident, str) else None)


@dataclass(frozen=True)
class CertificateInstallationReq20:
    header: Header20
    oem_provisioning_chain: Chain20  # with an Id: the element the header signature references
    root_certificate_ids: tuple[X509IssuerSerial, ...]
    maximum_contract_certificate_chains: int
    prioritized_emaids: tuple[str, ...] | None = None

    def to_node(self) -> Node:
        node = Node(CERTIFICATE_INSTALLATION_REQ, content=[
            self.header.to_node(),
            self.oem_provisioning_chain.to_node("OEMProvisioningCertificateChain"),
            Node(("ListOfRootCertificateIDs", NS20_CM),
                 content=[r.to_node("RootCertificateID", NS20_CT) for r in self.root_certificate_ids]),
            _leaf("MaximumContractCertificateChains", NS20_CM, self.maximum_contract_certificate_chains),
        ])
        if self.prioritized_emaids is not None:
            node.content.append(Node(("PrioritizedEMAIDs", NS20_CM),
                                     content=[_leaf("EMAID", NS20_CM, e) for e in self.prioritized_emaids]))
        return node

    @classmethod
    def from_node(cls, node: Node) -> CertificateInstallationReq20:
        emaids = node.child("PrioritizedEMAIDs")
        return cls(
            Header20.from_node(_req(node, "Header")),
            Chain20.from_node(_req(node, "OEMProvisioningCertificateChain")),
            tuple(X509IssuerSerial.from_node(n) for n in _req(node, "ListOfRootCertificateIDs").children()),
            _int(_req(node, "MaximumContractCertificateChains")),
            tuple(_str(e) for e in emaids.children("EMAID")) if emaids is not None else None,
        )


ENCRYPTED_KEY_ELEMENTS = {"SECP521": "SECP521_EncryptedPrivateKey", "X448": "X448_EncryptedPrivateKey",
                          "TPM": "TPM_EncryptedPrivateKey"}


@dataclass(frozen=True)
class SignedInstallationData:
    id: str
    contract_chain: Chain20  # ContractCertificateChainType: SubCertificates required
    ecdh_curve: str  # SECP521 | X448
    dh_public_key: bytes  # 133 octets (the schema's length facet)
    encrypted_private_key: bytes  # 94 (SECP521) / 84 (X448) / 206 (TPM) octets
    key_kind: str = "SECP521"  # which of the three choice elements carries it: SECP521 | X448 | TPM

    QNAME = ("SignedInstallationData", NS20_CM)

    def to_node(self) -> Node:
        return Node(self.QNAME, {_ID: self.id}, [
            self.contract_chain.to_node("ContractCertificateChain"),
            _leaf("ECDHCurve", NS20_CM, self.ecdh_curve),
            _leaf("DHPublicKey", NS20_CM, self.dh_public_key),
            _leaf(ENCRYPTED_KEY_ELEMENTS[self.key_kind], NS20_CM, self.encrypted_private_key),
        ])

    @classmethod
    def from_node(cls, node: Node) -> SignedInstallationData:
        kind, key = "SECP521", b""
        for k, local in ENCRYPTED_KEY_ELEMENTS.items():
            child = node.child(local)
            if child is not None:
                kind, key = k, _bytes(child)
        ident = node.attributes.get(_ID)
        return cls(ident if isinstance(ident, str) else "", Chain20.from_node(_req(node, "ContractCertificateChain")),
                   _str(_req(node, "ECDHCurve")), _bytes(_req(node, "DHPublicKey")), key, kind)


@dataclass(frozen=True)
class CertificateInstallationRes20:
    header: Header20
    response_code: str  # responseCodeType of V2G_CI_CommonTypes.xsd
    evse_processing: str  # Finished | Ongoing | Ongoing_WaitingForCustomerInteraction
    cps_chain: Chain20
    signed_installation_data: SignedInstallationData
    remaining_contract_certificate_chains: int

    def to_node(self) -> Node:
        return Node(CERTIFICATE_INSTALLATION_RES, content=[
            self.header.to_node(),
            _leaf("ResponseCode", NS20_CT, self.response_code),
            _leaf("EVSEProcessing", NS20_CM, self.evse_processing),
            self.cps_chain.to_node("CPSCertificateChain"),
            self.signed_installation_data.to_node(),
            _leaf("RemainingContractCertificateChains", NS20_CM, self.remaining_contract_certificate_chains),
        ])

    @classmethod
    def from_node(cls, node: Node) -> CertificateInstallationRes20:
        return cls(
            Header20.from_node(_req(node, "Header")),
            _str(_req(node, "ResponseCode")),
            _str(_req(node, "EVSEProcessing")),
            Chain20.from_node(_req(node, "CPSCertificateChain")),
            SignedInstallationData.from_node(_req(node, "SignedInstallationData")),
            _int(_req(node, "RemainingContractCertificateChains")),
        )


Message20 = CertificateInstallationReq20 | CertificateInstallationRes20


def encode_message20(message: Message20) -> bytes:
    """The -20 message as an EXI document of the CommonMessages schema set (what OCPP 2.1 carries, base64'd)."""
    return encode_document(message.to_node(), CM20)


def decode_message20_tree(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Node:
    root = decode_document(data, CM20, limits)
    if root.qname not in (CERTIFICATE_INSTALLATION_REQ, CERTIFICATE_INSTALLATION_RES):
        raise ExiUnsupported(f"document element {root.local} is not a CertificateInstallationReq/Res")
    return root


def decode_message20(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Message20:
    root = decode_message20_tree(data, limits)
    if root.qname == CERTIFICATE_INSTALLATION_REQ:
        return CertificateInstallationReq20.from_node(root)
    return CertificateInstallationRes20.from_node(root)


def encode_fragment20(elements: Sequence[Node]) -> bytes:
    """Signed elements (OEMProvisioningCertificateChain, SignedInstallationData) as an EXI fragment of CM20."""
    return encode_fragment(elements, CM20)


def decode_fragment20(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Node]:
    return decode_fragment(data, CM20, limits)


__all__ = [
    "CERTIFICATE_INSTALLATION_REQ",
    "CERTIFICATE_INSTALLATION_RES",
    "CertificateInstallationReq20",
    "CertificateInstallationRes20",
    "Chain20",
    "Header20",
    "SignedInstallationData",
    "decode_fragment20",
    "decode_message20",
    "decode_message20_tree",
    "encode_fragment20",
    "encode_message20",
]
