"""Native schema-informed EXI 1.0 codec for the ISO 15118-2 messages of contract certificate installation.

Options are those ISO 15118-2 uses (as configured in RISE-V2G and Josev's EXIficient): schema-informed
with the V2G_CI_MsgDef schema set, bit-packed, no compression, strict false, no preserved comments,
PIs, DTDs, prefixes or lexical values, no selfContained, valuePartitionCapacity 0, no EXI options in the
header (``0x80``). See docs/exi.md for what is covered and how it was verified.
"""

from .codec import decode_document, decode_fragment, encode_document, encode_fragment
from .datatypes import DEFAULT_LIMITS, DecodeLimits
from .messages import (
    CANONICAL_EXI,
    DIGEST_SHA256,
    ECDSA_SHA256,
    EMAID,
    CertificateChain,
    CertificateInstallationReq,
    CertificateInstallationRes,
    CertificateUpdateReq,
    CertificateUpdateRes,
    DHPublicKey,
    EncryptedPrivateKey,
    MessageHeader,
    Notification,
    Reference,
    ResponseCode,
    Signature,
    SignedElement,
    SignedInfo,
    V2GMessage,
    X509IssuerSerial,
    decode_body_fragment,
    decode_message,
    decode_message_tree,
    encode_body_fragment,
    encode_message,
    encode_signed_info,
)
from .schema import MSGDEF, XMLDSIG, SchemaSet
from .tree import Node

__all__ = [
    "CANONICAL_EXI",
    "DEFAULT_LIMITS",
    "DIGEST_SHA256",
    "ECDSA_SHA256",
    "EMAID",
    "MSGDEF",
    "XMLDSIG",
    "CertificateChain",
    "CertificateInstallationReq",
    "CertificateInstallationRes",
    "CertificateUpdateReq",
    "CertificateUpdateRes",
    "DHPublicKey",
    "DecodeLimits",
    "EncryptedPrivateKey",
    "MessageHeader",
    "Node",
    "Notification",
    "Reference",
    "ResponseCode",
    "SchemaSet",
    "Signature",
    "SignedElement",
    "SignedInfo",
    "V2GMessage",
    "X509IssuerSerial",
    "decode_body_fragment",
    "decode_document",
    "decode_fragment",
    "decode_message",
    "decode_message_tree",
    "encode_body_fragment",
    "encode_document",
    "encode_fragment",
    "encode_message",
    "encode_signed_info",
]
