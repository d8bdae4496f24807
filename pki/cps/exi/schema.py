"""The part of the ISO 15118-2 (2013) schemas that contract certificate installation needs, hand-derived.

The declarations below restate, in this module's own notation, what V2G_CI_MsgDef.xsd, V2G_CI_MsgHeader.xsd,
V2G_CI_MsgBody.xsd, V2G_CI_MsgDataTypes.xsd and the W3C xmldsig-core-schema.xsd declare for:
V2G_Message, MessageHeaderType, NotificationType, BodyType (with the whole BodyElement substitution group
as names), CertificateInstallationReq/Res, CertificateUpdateReq/Res and the xmldsig Signature, SignedInfo,
Reference and X509IssuerSerial types. Elements whose types are outside this subset (the other V2G messages,
KeyInfo, Object, …) are declared by name only: grammars still count them for event codes, and the decoder
rejects them with :class:`~pki.cps.errors.ExiUnsupported`.

All schemas use elementFormDefault="qualified"; the ISO ones also attributeFormDefault="qualified", so e.g.
the ``Id`` of EMAIDType is ``{urn:iso:15118:2:2013:MsgDataTypes}Id`` — which matters for fragments, where
attribute qnames are encoded against the sorted list of all attribute qnames (EXI 1.0 §8.5.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ._names import (
    BODY_ELEMENTS,
    MSGDEF_AMBIGUOUS_ELEMENTS,
    MSGDEF_ATTRIBUTES,
    MSGDEF_ELEMENTS,
    MSGDEF_GLOBAL_ELEMENTS,
    NS_BODY,
    NS_DEF,
    NS_DSIG,
    NS_HEADER,
    NS_NONE,
    NS_TYPES,
    XMLDSIG_AMBIGUOUS_ELEMENTS,
    XMLDSIG_ATTRIBUTES,
    XMLDSIG_ELEMENTS,
    XMLDSIG_GLOBAL_ELEMENTS,
)
from .datatypes import BinaryType, Datatype, EnumType, IntegerType, StringType

QName = tuple[str, str]
"""(local-name, namespace uri): tuples sort the way EXI 1.0 orders qnames (local-name, then uri)."""

ELEMENT_FRAGMENT = "#element-fragment"
"""Pseudo type name: content evaluated by the relaxed element fragment grammar (EXI 1.0 §8.5.3)."""


@dataclass(frozen=True)
class AttributeUse:
    qname: QName
    datatype: Datatype
    required: bool = False


@dataclass(frozen=True)
class ElementDecl:
    """An element declaration; ``type_name`` None means: known by name, content not supported."""

    qname: QName
    type_name: str | None


@dataclass(frozen=True)
class Wildcard:
    """xs:any. Both ##any and ##other become SE(*) (EXI 1.0 §8.5.4.1.7)."""


@dataclass(frozen=True)
class SubstitutionGroup:
    """An element term whose head has a substitution group: SE for each member, sorted (§8.5.4.1.6)."""

    members: tuple[ElementDecl, ...]


@dataclass(frozen=True)
class Particle:
    term: ElementDecl | Wildcard | SubstitutionGroup | ModelGroup
    min_occurs: int = 1
    max_occurs: int | None = 1  # None: unbounded


@dataclass(frozen=True)
class ModelGroup:
    compositor: Literal["sequence", "choice"]
    particles: tuple[Particle, ...]


@dataclass(frozen=True)
class ComplexType:
    """content: a Particle (element content), a Datatype (simple content) or None (empty content)."""

    name: str
    attributes: tuple[AttributeUse, ...] = ()
    content: Particle | Datatype | None = None
    mixed: bool = False


@dataclass(frozen=True)
class SimpleType:
    name: str
    datatype: Datatype


TypeDef = ComplexType | SimpleType


def seq(*particles: Particle, min_occurs: int = 1, max_occurs: int | None = 1) -> Particle:
    return Particle(ModelGroup("sequence", particles), min_occurs, max_occurs)


def choice(*particles: Particle, min_occurs: int = 1, max_occurs: int | None = 1) -> Particle:
    return Particle(ModelGroup("choice", particles), min_occurs, max_occurs)


def el(local: str, uri: str, type_name: str | None, min_occurs: int = 1, max_occurs: int | None = 1) -> Particle:
    return Particle(ElementDecl((local, uri), type_name), min_occurs, max_occurs)


# --- simple types (V2G_CI_MsgDataTypes.xsd unless noted) --------------------------------------------------

XS_STRING = StringType(label="xs:string")
XS_ID = StringType(label="xs:ID")
XS_ANYURI = StringType(label="xs:anyURI")
XS_BASE64 = BinaryType(label="xs:base64Binary")
XS_INTEGER = IntegerType(label="xs:integer")
XS_SHORT = IntegerType(label="xs:short", minimum=-32768, maximum=32767)

RESPONSE_CODES: tuple[str, ...] = (
    "OK",
    "OK_NewSessionEstablished",
    "OK_OldSessionJoined",
    "OK_CertificateExpiresSoon",
    "FAILED",
    "FAILED_SequenceError",
    "FAILED_ServiceIDInvalid",
    "FAILED_UnknownSession",
    "FAILED_ServiceSelectionInvalid",
    "FAILED_PaymentSelectionInvalid",
    "FAILED_CertificateExpired",
    "FAILED_SignatureError",
    "FAILED_NoCertificateAvailable",
    "FAILED_CertChainError",
    "FAILED_ChallengeInvalid",
    "FAILED_ContractCanceled",
    "FAILED_WrongChargeParameter",
    "FAILED_PowerDeliveryNotApplied",
    "FAILED_TariffSelectionInvalid",
    "FAILED_ChargingProfileInvalid",
    "FAILED_MeteringSignatureNotValid",
    "FAILED_NoChargeServiceSelected",
    "FAILED_WrongEnergyTransferMode",
    "FAILED_ContactorError",
    "FAILED_CertificateNotAllowedAtThisEVSE",
    "FAILED_CertificateRevoked",
)
FAULT_CODES: tuple[str, ...] = ("ParsingError", "NoTLSRootCertificatAvailable", "UnknownError")

SESSION_ID = BinaryType(label="sessionIDType", max_length=8)  # xs:hexBinary
FAULT_CODE = EnumType(label="faultCodeType", values=FAULT_CODES)
FAULT_MSG = StringType(label="faultMsgType", max_length=64)
CERTIFICATE = BinaryType(label="certificateType", max_length=800)  # [V2G2-010]
PRIVATE_KEY = BinaryType(label="privateKeyType", max_length=48)
DH_PUBLIC_KEY = BinaryType(label="dHpublickeyType", max_length=65)
EMAID = StringType(label="eMAIDType", min_length=14, max_length=15)
RESPONSE_CODE = EnumType(label="responseCodeType", values=RESPONSE_CODES)
HMAC_OUTPUT_LENGTH = IntegerType(label="HMACOutputLengthType")  # xmldsig: restriction of xs:integer
DIGEST_VALUE = BinaryType(label="DigestValueType")  # xmldsig: restriction of xs:base64Binary

# --- type definitions --------------------------------------------------------------------------------------

_ID_TYPES = AttributeUse(("Id", NS_TYPES), XS_ID, required=True)
_ID_TYPES_OPTIONAL = AttributeUse(("Id", NS_TYPES), XS_ID)
_ID_BODY = AttributeUse(("Id", NS_BODY), XS_ID, required=True)
_ID_DSIG_OPTIONAL = AttributeUse(("Id", NS_NONE), XS_ID)
_ALGORITHM = AttributeUse(("Algorithm", NS_NONE), XS_ANYURI, required=True)

_REQUEST_ROOTS = el("ListOfRootCertificateIDs", NS_BODY, "ListOfRootCertificateIDsType")

BODY_MESSAGES: frozenset[str] = frozenset(
    {"CertificateInstallationReq", "CertificateInstallationRes", "CertificateUpdateReq", "CertificateUpdateRes"}
)


def _body_member(qname: QName) -> ElementDecl:
    local = qname[0]
    return ElementDecl(qname, f"{local}Type" if local in BODY_MESSAGES else None)


TYPES: dict[str, TypeDef] = {
    t.name: t
    for t in (
        # V2G_CI_MsgDef.xsd: the anonymous type of V2G_Message
        ComplexType(
            "#V2G_Message",
            content=seq(el("Header", NS_DEF, "MessageHeaderType"), el("Body", NS_DEF, "BodyType")),
        ),
        # V2G_CI_MsgHeader.xsd
        ComplexType(
            "MessageHeaderType",
            content=seq(
                el("SessionID", NS_HEADER, "sessionIDType"),
                el("Notification", NS_HEADER, "NotificationType", min_occurs=0),
                el("Signature", NS_DSIG, "SignatureType", min_occurs=0),
            ),
        ),
        # V2G_CI_MsgBody.xsd: <xs:element ref="BodyElement" minOccurs="0"/>, BodyElement abstract
        ComplexType(
            "BodyType",
            content=Particle(SubstitutionGroup(tuple(_body_member(q) for q in BODY_ELEMENTS)), min_occurs=0),
        ),
        ComplexType(
            "CertificateInstallationReqType",
            attributes=(_ID_BODY,),
            content=seq(el("OEMProvisioningCert", NS_BODY, "certificateType"), _REQUEST_ROOTS),
        ),
        ComplexType(
            "CertificateInstallationResType",
            content=seq(
                el("ResponseCode", NS_BODY, "responseCodeType"),
                el("SAProvisioningCertificateChain", NS_BODY, "CertificateChainType"),
                el("ContractSignatureCertChain", NS_BODY, "CertificateChainType"),
                el("ContractSignatureEncryptedPrivateKey", NS_BODY, "ContractSignatureEncryptedPrivateKeyType"),
                el("DHpublickey", NS_BODY, "DiffieHellmanPublickeyType"),
                el("eMAID", NS_BODY, "EMAIDType"),
            ),
        ),
        ComplexType(
            "CertificateUpdateReqType",
            attributes=(_ID_BODY,),
            content=seq(
                el("ContractSignatureCertChain", NS_BODY, "CertificateChainType"),
                el("eMAID", NS_BODY, "eMAIDType"),
                _REQUEST_ROOTS,
            ),
        ),
        ComplexType(
            "CertificateUpdateResType",
            content=seq(
                el("ResponseCode", NS_BODY, "responseCodeType"),
                el("SAProvisioningCertificateChain", NS_BODY, "CertificateChainType"),
                el("ContractSignatureCertChain", NS_BODY, "CertificateChainType"),
                el("ContractSignatureEncryptedPrivateKey", NS_BODY, "ContractSignatureEncryptedPrivateKeyType"),
                el("DHpublickey", NS_BODY, "DiffieHellmanPublickeyType"),
                el("eMAID", NS_BODY, "EMAIDType"),
                el("RetryCounter", NS_BODY, "xs:short", min_occurs=0),
            ),
        ),
        # V2G_CI_MsgDataTypes.xsd
        ComplexType(
            "NotificationType",
            content=seq(
                el("FaultCode", NS_TYPES, "faultCodeType"), el("FaultMsg", NS_TYPES, "faultMsgType", min_occurs=0)
            ),
        ),
        ComplexType(
            "CertificateChainType",
            attributes=(_ID_TYPES_OPTIONAL,),
            content=seq(
                el("Certificate", NS_TYPES, "certificateType"),
                el("SubCertificates", NS_TYPES, "SubCertificatesType", min_occurs=0),
            ),
        ),
        ComplexType("SubCertificatesType", content=seq(el("Certificate", NS_TYPES, "certificateType", max_occurs=4))),
        ComplexType(
            "ListOfRootCertificateIDsType",
            content=seq(el("RootCertificateID", NS_TYPES, "X509IssuerSerialType", max_occurs=20)),
        ),
        ComplexType("ContractSignatureEncryptedPrivateKeyType", attributes=(_ID_TYPES,), content=PRIVATE_KEY),
        ComplexType("DiffieHellmanPublickeyType", attributes=(_ID_TYPES,), content=DH_PUBLIC_KEY),
        ComplexType("EMAIDType", attributes=(_ID_TYPES,), content=EMAID),
        SimpleType("sessionIDType", SESSION_ID),
        SimpleType("faultCodeType", FAULT_CODE),
        SimpleType("faultMsgType", FAULT_MSG),
        SimpleType("certificateType", CERTIFICATE),
        SimpleType("eMAIDType", EMAID),
        SimpleType("responseCodeType", RESPONSE_CODE),
        SimpleType("xs:short", XS_SHORT),
        SimpleType("xs:string", XS_STRING),
        SimpleType("xs:integer", XS_INTEGER),
        # xmldsig-core-schema.xsd
        ComplexType(
            "SignatureType",
            attributes=(_ID_DSIG_OPTIONAL,),
            content=seq(
                el("SignedInfo", NS_DSIG, "SignedInfoType"),
                el("SignatureValue", NS_DSIG, "SignatureValueType"),
                el("KeyInfo", NS_DSIG, None, min_occurs=0),
                el("Object", NS_DSIG, None, min_occurs=0, max_occurs=None),
            ),
        ),
        ComplexType("SignatureValueType", attributes=(_ID_DSIG_OPTIONAL,), content=XS_BASE64),
        ComplexType(
            "SignedInfoType",
            attributes=(_ID_DSIG_OPTIONAL,),
            content=seq(
                el("CanonicalizationMethod", NS_DSIG, "CanonicalizationMethodType"),
                el("SignatureMethod", NS_DSIG, "SignatureMethodType"),
                el("Reference", NS_DSIG, "ReferenceType", max_occurs=None),
            ),
        ),
        ComplexType(
            "CanonicalizationMethodType",
            attributes=(_ALGORITHM,),
            content=seq(Particle(Wildcard(), 0, None)),
            mixed=True,
        ),
        ComplexType(
            "SignatureMethodType",
            attributes=(_ALGORITHM,),
            content=seq(
                el("HMACOutputLength", NS_DSIG, "HMACOutputLengthType", min_occurs=0),
                Particle(Wildcard(), 0, None),
            ),
            mixed=True,
        ),
        ComplexType(
            "ReferenceType",
            attributes=(
                _ID_DSIG_OPTIONAL,
                AttributeUse(("URI", NS_NONE), XS_ANYURI),
                AttributeUse(("Type", NS_NONE), XS_ANYURI),
            ),
            content=seq(
                el("Transforms", NS_DSIG, "TransformsType", min_occurs=0),
                el("DigestMethod", NS_DSIG, "DigestMethodType"),
                el("DigestValue", NS_DSIG, "DigestValueType"),
            ),
        ),
        ComplexType("TransformsType", content=seq(el("Transform", NS_DSIG, "TransformType", max_occurs=None))),
        ComplexType(
            "TransformType",
            attributes=(_ALGORITHM,),
            content=choice(Particle(Wildcard()), el("XPath", NS_DSIG, "xs:string"), min_occurs=0, max_occurs=None),
            mixed=True,
        ),
        ComplexType(
            "DigestMethodType", attributes=(_ALGORITHM,), content=seq(Particle(Wildcard(), 0, None)), mixed=True
        ),
        SimpleType("DigestValueType", DIGEST_VALUE),
        SimpleType("HMACOutputLengthType", HMAC_OUTPUT_LENGTH),
        ComplexType(
            "X509IssuerSerialType",
            content=seq(el("X509IssuerName", NS_DSIG, "xs:string"), el("X509SerialNumber", NS_DSIG, "xs:integer")),
        ),
    )
}


def _collect_decls() -> dict[QName, ElementDecl]:
    """Every element declaration of the subset, by qname (one type per qname except the ambiguous ones)."""
    found: dict[QName, ElementDecl] = {}

    def walk(term: object) -> None:
        if isinstance(term, Particle):
            walk(term.term)
        elif isinstance(term, ModelGroup):
            for particle in term.particles:
                walk(particle)
        elif isinstance(term, SubstitutionGroup):
            for member in term.members:
                walk(member)
        elif isinstance(term, ElementDecl) and term.type_name is not None:
            found.setdefault(term.qname, term)

    for typedef in TYPES.values():
        if isinstance(typedef, ComplexType) and isinstance(typedef.content, Particle):
            walk(typedef.content)
    return found


@dataclass(frozen=True)
class SchemaSet:
    """The schema information one EXI grammar set is derived from (EXI 1.0 §8.5)."""

    name: str
    elements: tuple[QName, ...]  # F0..Fn-1: every declared element qname, sorted (§8.5.2)
    attributes: tuple[QName, ...]  # A0..An-1: every declared attribute qname, sorted (§8.5.3)
    global_elements: tuple[QName, ...]  # G0..Gn-1 (§8.5.1)
    ambiguous: frozenset[QName]
    decls: dict[QName, ElementDecl] = field(repr=False, compare=False)

    def __hash__(self) -> int:
        # Grammar and program caches are keyed by the schema set several times per message: the generated
        # hash would hash every qname tuple each time (≈ 7 µs). Equal sets have equal names.
        return hash(self.name)

    def fragment_decl(self, qname: QName) -> ElementDecl:
        """The declaration a fragment's SE(qname) evaluates: relaxed grammar when ambiguous (§8.5.2)."""
        if qname in self.ambiguous:
            return ElementDecl(qname, ELEMENT_FRAGMENT)
        return self.decls.get(qname, ElementDecl(qname, None))


_DECLS = _collect_decls()
_DECLS[("V2G_Message", NS_DEF)] = ElementDecl(("V2G_Message", NS_DEF), "#V2G_Message")

MSGDEF = SchemaSet(
    name="V2G_CI_MsgDef",
    elements=MSGDEF_ELEMENTS,
    attributes=MSGDEF_ATTRIBUTES,
    global_elements=MSGDEF_GLOBAL_ELEMENTS,
    ambiguous=frozenset(MSGDEF_AMBIGUOUS_ELEMENTS),
    decls=_DECLS,
)
"""V2G_CI_MsgDef.xsd with everything it imports: whole messages and the signed body fragments."""

XMLDSIG = SchemaSet(
    name="xmldsig-core-schema",
    elements=XMLDSIG_ELEMENTS,
    attributes=XMLDSIG_ATTRIBUTES,
    global_elements=XMLDSIG_GLOBAL_ELEMENTS,
    ambiguous=frozenset(XMLDSIG_AMBIGUOUS_ELEMENTS),
    decls={q: d for q, d in _DECLS.items() if q[1] == NS_DSIG},
)
"""xmldsig-core-schema.xsd alone: the grammar SignedInfo is encoded with for signing (RISE-V2G, Josev)."""
