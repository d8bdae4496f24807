"""Byte-exact EXI test vectors: published ones (RISE-V2G) and EXIficient-produced ones.

Sources
-------
* RISE-V2G, ``RISE-V2G-Certificates/signature-creation-testdata/README.md`` (MIT licence; repository
  V2GClarity/RISE-V2G, commit 055806d22c591f843186579b9945255793d0800f): "Test data to verify your
  CertificateInstallationRes signature" — the EXI fragments of ContractSignatureCertChain (id1),
  ContractSignatureEncryptedPrivateKey (id2), DHpublickey (id3) and eMAID (id4) in namespace
  urn:iso:15118:2:2013:MsgBody with their SHA-256 digests, the EXI-encoded SignedInfo, the CPS Sub-CA 2
  key pair, and (in CertificateInstallationRes-MsgBody-namespace.xml of the same folder) the SignatureValue.
  RISE-V2G encodes with EXIficient. Also the README's "incorrect namespace" variants, which use schema
  deviations and must be refused.
* EXIficient: the EXIficient 1.0.x encoder shipped in Josev's ``EXICodec.jar`` (PyPI package iso15118
  0.31.2), run on the XML form of the messages below with the V2G_CI_MsgDef.xsd schema set and
  valuePartitionCapacity 0, maximumNumberOfBuiltInProductions 0, maximumNumberOfBuiltInElementGrammars 0
  (RISE-V2G's settings), as a document or with -fragment. The inputs are synthetic (fake certificates).
  During development the codec was also compared with it on 1,300 random messages and their fragments.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.cps.errors import ExiUnsupported
from pki.cps.exi import (
    EMAID,
    MSGDEF,
    XMLDSIG,
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
    decode_fragment,
    decode_message,
    encode_body_fragment,
    encode_message,
    encode_signed_info,
)
from pki.cps.exi.messages import CANONICAL_EXI, DIGEST_SHA256, ECDSA_SHA256

# --- RISE-V2G signature-creation-testdata (see module docstring) ------------------------------------------

RISE_CERT_CHAIN = bytes.fromhex(
    "8021015A590C4D703308201D33082017AA00302010202023039300906072A8648CE3D0401304F3111300F06035504030C084"
    "D4F53756243413231193017060355040A0C1052495345205632472050726F6A656374310B300906035504061302444531123"
    "010060A0992268993F22C64011916024D4F301E170D3138303831353132333433355A170D3230303831343132333433355A3"
    "0573119301706035504030C1044452D4142432D43313233414243353631193017060355040A0C10524953452056324720507"
    "26F6A656374310B300906035504061302444531123010060A0992268993F22C64011916024D4F3059301306072A8648CE3D0"
    "20106082A8648CE3D0301070342000473FEBA248E8E0D246F4ECC79D46E57184BF86ACBC01644F7AE453D8C721B8AF944272"
    "3892948A6E48A6E81229363DFBAEF37F4631FC3592E868BEF2E5884185EA33F303D300C0603551D130101FF04023000300E0"
    "603551D0F0101FF0404030203E8301D0603551D0E0416041446EC52B4D9BFC688275F5B0A872DD47D6960448A300906072A8"
    "648CE3D04010348003045022100E97C0514FAE75296B5951D06EAC507922167C725780951869AA5E3DF43E618F5022059F81"
    "CAFEDDA35B5C73DF80EA1522C53951EF2361232E35442B16D6B77909D8A06A81984100E8984100BC50018100810101181C98"
    "048303954324671E82009827988898078301AA8201860426A7A9BAB121A098988C980B8301AA820506082924A9A2902B1923"
    "90283937B532B1BA188598048301AA82030981222298891808030504C91344C9F91632008C8B0126A7980F0B86989C181C18"
    "9A9899199A199AAD0B869919181C189A1899199A199AAD1827988898078301AA8201860426A7A9BAB121A099188C980B8301"
    "AA820506082924A9A2902B192390283937B532B1BA188598048301AA82030981222298891808030504C91344C9F91632008C"
    "8B0126A7982C98098303954324671E81008304154324671E81808381A100024A1FD0FC8C3F56A5E5CFC49A0FDF110400AAD7"
    "E8C8B33AC646EF0B93A4C74CA034FEDAB0900313607E24849385E45905DDB22B5DD9E88A9C1076CEFC266A848F51A2982198"
    "090301AA8E898080FF820418030080FF81008018070301AA8E878080FF8202018100E3180E8301AA8E87020B020A256D0F08"
    "428AADE1FB88C3BF4C1E7E8EE606C1D118048303954324671E820081A40018228110151FDB8466FA92DB3E5AE0AC81B4BC3A"
    "AB7C18FF1CA54DD7CDB4E18C0CAAE8BD8110806ABF339E3F7C85EAD2FAA175F61DDBE6E015876FD8BFE225B0416956337712"
    "8D86B01984100E9184100BC50018100810101181C98048303954324671E82009827988898078301AA8201860426A7A937B7B"
    "A21A0988C980B8301AA820506082924A9A2902B192390283937B532B1BA188598048301AA82030981222298891808030504C"
    "91344C9F91632008C8B0126A7980F0B86989C181C189A9899199A199AAD0B869919181C189A1899199A199AAD18279888980"
    "78301AA8201860426A7A9BAB121A098988C980B8301AA820506082924A9A2902B192390283937B532B1BA188598048301AA8"
    "2030981222298891808030504C91344C9F91632008C8B0126A7982C98098303954324671E81008304154324671E81808381A"
    "1000262BE27D8CCBAA40F456878995C3E34CDE5EF3C4B435FC84C4A57B6F84212FCCFC195290B3B265255BC4CF067A3294E7"
    "3516D54B255838C9C35F67F5F77B64EE6D1A2982198090301AA8E898080FF820418030080FF81008098070301AA8E878080F"
    "F820201810083180E8301AA8E87020B020A6876F21C15AB68AE79919AF9807C85B49B1DD2C718048303954324671E820081A"
    "48018230110806656378B705F6308BDA5749D1CC6AAB30FC93390A01E608C8C99DE16D0DF09430110807B4806A1E2B9B762C"
    "65B7C8783321E83B185CD00FA57EEAC334A27965CF6B9D817A00"
)

RISE_ENCRYPTED_KEY = bytes.fromhex(
    "802202B4B2190C200CD0300FFBEF033D1D84F9435D31983BD1C7484130BAC707AB8E6EB9C03AAC3726BA427388D3FC986774E9C87182A81E80"
)

RISE_DH_PUBLIC_KEY = bytes.fromhex(
    "802D02B4B21990412F909A94D3AF3551111DB02025097E6964E1D6A9E930A8859F228A56CAE41A78152B58600554BEAC7DF1"
    "C436541A240480D531D8E0022476965685867818953A5E80"
)

RISE_EMAID = bytes.fromhex("80EC0202B4B21A40041111505090D0CC4C8CD05090CD4DBD3D00")

RISE_SIGNED_INFO = bytes.fromhex(
    "808112B43A3A381D1797BBBBBB973B999737B93397AA2917B1B0B737B734B1B0B616B2BC3497A1AB43A3A381D1797BBBBBB9"
    "73B999737B933979918181897981A17BC36B63239B4B396B6B7B93291B2B1B239B096B9B430991A9B2206236964320256874"
    "74703A2F2F7777772E77332E6F72672F54522F63616E6F6E6963616C2D6578692F4852D0E8E8E0745E5EEEEEEE5CEE665CDE"
    "E4CE5E646060625E60685EF0DAD8CADCC646E6D0C2646A6C840BE1DDBC88E416D5D3EF49D84FC9391E518BE1463FB5C025FC"
    "9C791F9DD8463E408188DA590C4095A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBD5148BD8D85B9BDB9A58D85B0B595E1A4BD"
    "214B43A3A381D1797BBBBBB973B999737B933979918181897981A17BC36B632B73191B9B430991A9B210477D15C69DEF6B46"
    "7B7A6F816C05D6E6201B5754796A720926534D326DE0C958020623696434025687474703A2F2F7777772E77332E6F72672F5"
    "4522F63616E6F6E6963616C2D6578692F4852D0E8E8E0745E5EEEEEEE5CEE665CDEE4CE5E646060625E60685EF0DAD8CADCC"
    "646E6D0C2646A6C8412735EA9E2872DD81B04FEEA7912D580EC55C3C015956AFC335E2004879BAB4D608188DA590CC095A1D"
    "1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBD5148BD8D85B9BDB9A58D85B0B595E1A4BD214B43A3A381D1797BBBBBB973B999737"
    "B933979918181897981A17BC36B632B73191B9B430991A9B21001001F297C1ABCDABD396A64A8A58A404AB6B8DAE334D31E6"
    "B19D984D820673C0DC"
)

RISE_WRONG_NS_ENCRYPTED_KEY = bytes.fromhex(
    "80F3125436F6E74726163745369676E6174757265456E63727970746564507269766174654B65794C0280060700520569643"
    "2684CE889C82EE885EECEC82F460C8D0A0D888B0A88EB29E729090A68A8AEEEAE6C690E2686AEAEAC6826CE488C6DAEAD694"
    "F4D29CA070DA8EC8606CC6D0F0CEE2CEFA00"
)

RISE_WRONG_NS_DH_PUBLIC_KEY = bytes.fromhex(
    "80F310C44487075626C69636B65794C028006070052056964336B484986A86C2D89C9EEC9CAC8AA490C482CE94A2D856C2AE"
    "A8D062E2DCE09A96D28CDCF29696ACE6E4D68EDCCEAC9662D0CE84ACA656E49066F0F088B4AA8ED2A28ACE9CAAF0649E8286"
    "9490C2AEACDEAE8ECA84D2AC9ED67AFA00"
)

RISE_WRONG_NS_EMAID = bytes.fromhex("80F3106654D4149444C02800607005205696434620888A828486866264668284866A6CFA00")

RISE_DIGESTS = {  # SHA-256 of each fragment, hex as published, and the published base64 form
    "id1": (
        "8EFA2B8D3BDED68CF6F4DF02D80BADCC4036AEA8F2D4E4124CA69A64DBC192B0",
        "jvorjTve1oz29N8C2AutzEA2rqjy1OQSTKaaZNvBkrA=",
    ),
    "id2": (
        "5F0EEDE44720B6AE9F7A4EC27E49C8F28C5F0A31FDAE012FE4E3C8FCEEC231F2",
        "Xw7t5Ecgtq6fek7CfknI8oxfCjH9rgEv5OPI/O7CMfI=",
    ),
    "id3": (
        "02003E52F83579B57A72D4C9514B1480956D71B5C669A63CD633B309B040CE78",
        "AgA+Uvg1ebV6ctTJUUsUgJVtcbXGaaY81jOzCbBAzng=",
    ),
    "id4": (
        "939AF54F14396EC0D827F753C896AC0762AE1E00ACAB57E19AF100243CDD5A6B",
        "k5r1TxQ5bsDYJ/dTyJasB2KuHgCsq1fhmvEAJDzdWms=",
    ),
}
RISE_ENCRYPTED_KEY_VALUE = bytes.fromhex(
    "803340C03FEFBC0CF47613E50D74C660EF471D2104C2EB1C1EAE39BAE700EAB0DC9AE909CE234FF2619DD3A721C60AA0"
)
RISE_DH_VALUE = bytes.fromhex(
    "04BE426A534EBCD5444476C0809425F9A593875AA7A4C2A2167C8A295B2B9069E0"
    "54AD61801552FAB1F7C710D9506890120354C763800891DA595A1619E06254E9"
)
RISE_EMAID_VALUE = "DEABCC123ABC56"
RISE_CPS_PUBLIC_KEY = bytes.fromhex(  # CPS Sub-CA 2 public key (uncompressed point)
    "0491CAA2FE68797277C9FEADEC61DC7AE7DC334DA59DD82D82290327AF105771F7"
    "307B9573870A8DA09CA4CE2F293B23D9F8AEED3AE49A9C177C6F710C55089CE4"
)
RISE_CPS_PRIVATE_SCALAR = 0x169FE1CBCE6CED08391F3235FD530DB84430F165E474117C0AC587D6554F581C
# SignatureValue of CertificateInstallationRes-MsgBody-namespace.xml (r ‖ s over RISE_SIGNED_INFO)
RISE_SIGNATURE_VALUE = base64.b64decode(
    "m/Bbgr1ZUecB5Ft4BIh7aLk3mrPgMg7zghEXnoCE1tnkrtoVGhvUivDkOT+RbIX+n2Yrj5WQINYPD+Z82uWpyQ=="
)


def rise_cps_public_key() -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), RISE_CPS_PUBLIC_KEY)


def rise_elements() -> tuple[CertificateChain, EncryptedPrivateKey, DHPublicKey, EMAID]:
    """The four signed elements, decoded from the published fragments."""
    (chain,) = decode_body_fragment(RISE_CERT_CHAIN)
    return (
        CertificateChain.from_node(chain),
        EncryptedPrivateKey(RISE_ENCRYPTED_KEY_VALUE, "id2"),
        DHPublicKey(RISE_DH_VALUE, "id3"),
        EMAID(RISE_EMAID_VALUE, "id4"),
    )


def rise_response(sa_chain: CertificateChain | None = None) -> V2GMessage:
    """The RISE CertificateInstallationRes as a whole message (its SA provisioning chain is not signed,
    so a stand-in is used), with the published SignedInfo and SignatureValue."""
    chain, key, dh, emaid = rise_elements()
    (signed_info,) = decode_fragment(RISE_SIGNED_INFO, XMLDSIG)
    body = CertificateInstallationRes(ResponseCode.OK, sa_chain or CertificateChain(b"\x30\x00"), chain, key, dh, emaid)
    signature = Signature(SignedInfo.from_node(signed_info), RISE_SIGNATURE_VALUE)
    return V2GMessage(MessageHeader(bytes.fromhex("D3765E2A1842AF1B"), signature=signature), body)


@pytest.mark.parametrize(
    ("name", "stream", "element"),
    [
        ("id2", "RISE_ENCRYPTED_KEY", EncryptedPrivateKey(RISE_ENCRYPTED_KEY_VALUE, "id2")),
        ("id3", "RISE_DH_PUBLIC_KEY", DHPublicKey(RISE_DH_VALUE, "id3")),
        # the eMAID trap: relaxed element fragment grammar of EXI 1.0 §8.5.3, as EXIficient encodes it
        ("id4", "RISE_EMAID", EMAID(RISE_EMAID_VALUE, "id4")),
    ],
)
def test_rise_fragments_encode_byte_exact(name: str, stream: str, element: SignedElement) -> None:
    expected = globals()[stream]
    encoded = encode_body_fragment(element)
    assert encoded == expected
    digest_hex, digest_b64 = RISE_DIGESTS[name]
    assert hashlib.sha256(encoded).hexdigest().upper() == digest_hex
    assert base64.b64encode(hashlib.sha256(encoded).digest()).decode() == digest_b64


def test_rise_cert_chain_fragment_round_trip() -> None:
    chain, *_ = rise_elements()
    assert chain.id == "id1"
    assert len(chain.sub_certificates) == 2  # MO Sub-CA 2 first, then Sub-CA 1
    leaf = x509.load_der_x509_certificate(chain.certificate)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "DE-ABC-C123ABC56"
    for sub in chain.sub_certificates:
        x509.load_der_x509_certificate(sub)
    encoded = encode_body_fragment(chain)
    assert encoded == RISE_CERT_CHAIN
    assert hashlib.sha256(encoded).hexdigest().upper() == RISE_DIGESTS["id1"][0]


def test_rise_fragments_decode_to_the_published_values() -> None:
    (node,) = decode_body_fragment(RISE_EMAID)
    # the Id of EMAIDType is qualified: V2G_CI_MsgDataTypes.xsd has attributeFormDefault="qualified"
    assert node.attributes == {("Id", "urn:iso:15118:2:2013:MsgDataTypes"): "id4"}
    assert EMAID.from_node(node) == EMAID(RISE_EMAID_VALUE, "id4")
    (node,) = decode_body_fragment(RISE_ENCRYPTED_KEY)
    assert EncryptedPrivateKey.from_node(node) == EncryptedPrivateKey(RISE_ENCRYPTED_KEY_VALUE, "id2")
    (node,) = decode_body_fragment(RISE_DH_PUBLIC_KEY)
    assert DHPublicKey.from_node(node) == DHPublicKey(RISE_DH_VALUE, "id3")


def test_rise_signed_info_byte_exact() -> None:
    """SignedInfo built from the four digests, in RISE's reference order, is the published EXI."""
    chain, key, dh, emaid = rise_elements()
    by_id: dict[str, SignedElement] = {"id1": chain, "id2": key, "id3": dh, "id4": emaid}
    references = tuple(
        Reference(f"#{i}", hashlib.sha256(encode_body_fragment(by_id[i])).digest())
        for i in ("id2", "id1", "id4", "id3")
    )
    signed_info = SignedInfo(references)
    assert encode_signed_info(signed_info) == RISE_SIGNED_INFO  # xmldsig schema alone, as RISE/Josev do
    (node,) = decode_fragment(RISE_SIGNED_INFO, XMLDSIG)
    decoded = SignedInfo.from_node(node)
    assert decoded == signed_info
    assert decoded.canonicalization_method == CANONICAL_EXI
    assert decoded.signature_method == ECDSA_SHA256
    assert {r.digest_method for r in decoded.references} == {DIGEST_SHA256}
    assert {r.transforms for r in decoded.references} == {(CANONICAL_EXI,)}
    # the same SignedInfo as a fragment of the whole V2G schema set is another stream (SE code 208 of 8 bits)
    assert encode_signed_info(signed_info, MSGDEF) != RISE_SIGNED_INFO


def test_rise_signature_value_verifies() -> None:
    """The published r ‖ s verifies over the published SignedInfo EXI with the CPS Sub-CA 2 key."""
    from pki.cps.xmldsig import raw_to_der

    rise_cps_public_key().verify(raw_to_der(RISE_SIGNATURE_VALUE), RISE_SIGNED_INFO, ec.ECDSA(hashes.SHA256()))
    private = ec.derive_private_key(RISE_CPS_PRIVATE_SCALAR, ec.SECP256R1())
    assert private.public_key().public_numbers() == rise_cps_public_key().public_numbers()


def test_rise_whole_response_round_trips() -> None:
    message = rise_response()
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "stream", ["RISE_WRONG_NS_ENCRYPTED_KEY", "RISE_WRONG_NS_DH_PUBLIC_KEY", "RISE_WRONG_NS_EMAID"]
)
def test_rise_empty_namespace_variants_are_refused(stream: str) -> None:
    """Elements in no namespace are schema deviations (SE(*), built-in grammars): a typed refusal."""
    with pytest.raises(ExiUnsupported):
        decode_body_fragment(globals()[stream])


# --- EXIficient-produced vectors (see module docstring) ----------------------------------------------------


def _cert(n: int, tag: int) -> bytes:
    return bytes([0x30, 0x82]) + bytes([tag]) * n


ROOTS = (
    X509IssuerSerial("CN=V2G Root CA,O=Example,C=DE,DC=V2G", 0x1234567890ABCDEF1234567890ABCDEF),
    X509IssuerSerial("DC=V2G,C=DE,O=Example,CN=Other Root", 1),
)
SESSION = bytes.fromhex("0A0B0C0D0E0F1011")
INSTALL_REQ_BODY = CertificateInstallationReq("id1", _cert(14, 0xAA), ROOTS)
UPDATE_REQ_BODY = CertificateUpdateReq("req", CertificateChain(_cert(6, 7)), "DEABCC123ABC567", ROOTS[:1])

EXIFICIENT_MESSAGES: dict[str, tuple[V2GMessage, str]] = {
    "install_req": (
        V2GMessage(
            MessageHeader(
                SESSION, signature=Signature(SignedInfo((Reference("#id1", bytes(range(32))),)), bytes(range(64, 128)))
            ),
            INSTALL_REQ_BODY,
        ),
        "8098020282C3034383C4044A895A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBD5148BD8D85B9BDB9A58D85B0B595E1A4BD0D5A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBCC8C0C0C4BCC0D0BDE1B5B191CDA59CB5B5BDC9948D958D91CD84B5CDA184C8D4D910311B4B218812B43A3A381D1797BBBBBB973B999737B93397AA2917B1B0B737B734B1B0B616B2BC3497A429687474703A2F2F7777772E77332E6F72672F323030312F30342F786D6C656E6323736861323536420000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F128080828486888A8C8E90929496989A9C9EA0A2A4A6A8AAACAEB0B2B4B6B8BABCBEC0C2C4C6C8CACCCED0D2D4D6D8DADCDEE0E2E4E6E8EAECEEF0F2F4F6F8FAFCFE8140AD2C862081841555555555555555555555555555500990D38F558C91C8149BDBDD0810D04B13CF515E185B5C1B194B10CF51114B1110CF558C91C3BE6EBE16273E566A4B7ADF7A2A4A7AAED09002544433D5632472C433D44452C4F3D4578616D706C652C434E3D4F7468657220526F6F74001100",
    ),
    "install_res": (
        V2GMessage(
            MessageHeader(
                SESSION,
                signature=Signature(
                    SignedInfo(tuple(Reference(f"#id{i}", bytes([i]) * 32) for i in range(1, 5))), bytes([0x5A]) * 64
                ),
            ),
            CertificateInstallationRes(
                ResponseCode.OK,
                CertificateChain(_cert(6, 1), (_cert(6, 2), _cert(6, 3))),
                CertificateChain(_cert(6, 4), (_cert(6, 5),), "id1"),
                EncryptedPrivateKey(bytes(range(48)), "id2"),
                DHPublicKey(b"\x04" + bytes(range(1, 65)), "id3"),
                EMAID("DEABCC123ABC56", "id4"),
            ),
        ),
        "8098020282C3034383C4044A895A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBD5148BD8D85B9BDB9A58D85B0B595E1A4BD0D5A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBCC8C0C0C4BCC0D0BDE1B5B191CDA59CB5B5BDC9948D958D91CD84B5CDA184C8D4D910311B4B218812B43A3A381D1797BBBBBB973B999737B93397AA2917B1B0B737B734B1B0B616B2BC3497A429687474703A2F2F7777772E77332E6F72672F323030312F30342F786D6C656E63237368613235364200101010101010101010101010101010101010101010101010101010101010101040C46D2C86404AD0E8E8E0745E5EEEEEEE5CEE665CDEE4CE5EA8A45EC6C2DCDEDCD2C6C2D85ACAF0D25E90A5A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBCC8C0C0C4BCC0D0BDE1B5B195B98C8DCDA184C8D4D9080080808080808080808080808080808080808080808080808080808080808080810311B4B219812B43A3A381D1797BBBBBB973B999737B93397AA2917B1B0B737B734B1B0B616B2BC3497A429687474703A2F2F7777772E77332E6F72672F323030312F30342F786D6C656E63237368613235364200303030303030303030303030303030303030303030303030303030303030303040C46D2C86804AD0E8E8E0745E5EEEEEEE5CEE665CDEE4CE5EA8A45EC6C2DCDEDCD2C6C2D85ACAF0D25E90A5A1D1D1C0E8BCBDDDDDDCB9DCCCB9BDC99CBCC8C0C0C4BCC0D0BDE1B5B195B98C8DCDA184C8D4D908010101010101010101010101010101010101010101010101010101010101010104A02D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D2D206002083082010101010101004184101010101010100418410181818181819005696431020C20810101010101001061040A0A0A0A0A0A402B4B2190C00004080C1014181C2024282C3034383C4044484C5054585C6064686C7074787C8084888C9094989CA0A4A8ACB0B4B8BC02B4B2199041004080C1014181C2024282C3034383C4044484C5054585C6064686C7074787C8084888C9094989CA0A4A8ACB0B4B8BCC0C4C8CCD0D4D8DCE0E4E8ECF0F4F8FD0002B4B21A041111505090D0CC4C8CD05090CD4D80",
    ),
    "update_req": (
        V2GMessage(MessageHeader(b"\x01\x02"), UPDATE_REQ_BODY),
        "809800804090702B932B890418410383838383839045111505090D0CC4C8CD05090CD4D8DC04C869C7AAC648E40A4DEDEE8408682589E7A8AF0C2DAE0D8CA58867A888A5888867AAC648E1DF375F0B139F2B3525BD6FBD15253D57684820",
    ),
    "update_res_failed": (
        V2GMessage(
            MessageHeader(b"\x01\x02"),
            CertificateUpdateRes(
                ResponseCode.FAILED_NoCertificateAvailable,
                CertificateChain(b"\x30"),
                CertificateChain(b"\x30", (), "id1"),
                EncryptedPrivateKey(bytes(48), "id2"),
                DHPublicKey(b"\x04" + bytes(64), "id3"),
                EMAID("DEABCC123ABC56", "id4"),
                retry_counter=-1,
            ),
        ),
        "809800804090818201302015A590C40130202B4B2190C000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000002B4B219904100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000002B4B21A041111505090D0CC4C8CD05090CD4D82000",
    ),
    # empty SessionID and FaultMsg: no CH event, EE at the second level (EXI 1.0 §8.5.4.4.1)
    "notification_empty_values": (
        V2GMessage(MessageHeader(b"", Notification("ParsingError", "")), None),
        "809840020A30",
    ),
}

EXIFICIENT_FRAGMENTS = {
    # what the vehicle signs (Id id1): SE code 15 of 8 bits, then the CertificateInstallationReqType grammar
    "install_req": (
        INSTALL_REQ_BODY,
        "800F02B4B21882061055555555555555555555555555554026434E3D56324720526F6F742043412C4F3D4578616D706C652C433D44452C44433D5632470EF9BAF8589CF959A92DEB7DE8A929EABB4240095110CF558C91CB10CF51114B13CF515E185B5C1B194B10D38F53DD1A195C88149BDBDD00045E80",
        "3A12F3DBDA6860794FAEEF463CE29153825410BFC812CF047FF5A42F4134DFB3",
    ),
    "update_req": (
        UPDATE_REQ_BODY,
        "801102B932B890418410383838383839045111505090D0CC4C8CD05090CD4D8DC04C869C7AAC648E40A4DEDEE8408682589E7A8AF0C2DAE0D8CA58867A888A5888867AAC648E1DF375F0B139F2B3525BD6FBD15253D5768482F4",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(EXIFICIENT_MESSAGES))
def test_exificient_messages_byte_exact(name: str) -> None:
    message, expected_hex = EXIFICIENT_MESSAGES[name]
    encoded = encode_message(message)
    assert encoded.hex().upper() == expected_hex
    assert decode_message(encoded) == message


@pytest.mark.parametrize("name", sorted(EXIFICIENT_FRAGMENTS))
def test_exificient_fragments_byte_exact(name: str) -> None:
    element, expected_hex, digest = EXIFICIENT_FRAGMENTS[name]
    encoded = encode_body_fragment(element)  # type: ignore[arg-type]
    assert encoded.hex().upper() == expected_hex
    if digest:
        assert hashlib.sha256(encoded).hexdigest().upper() == digest
    (node,) = decode_body_fragment(encoded)
    assert type(element).from_node(node) == element  # type: ignore[attr-defined]


def test_ocpp_exi_response_size() -> None:
    """Six 800-octet certificates come to about 7470 base64 characters (OCPP 2.0.1 allows 7500)."""
    cert = bytes(800)
    chain = CertificateChain(cert, (cert, cert))
    signature = Signature(SignedInfo(tuple(Reference(f"#id{i}", bytes(32)) for i in range(1, 5))), bytes(64))
    body = CertificateInstallationRes(
        ResponseCode.OK,
        chain,
        CertificateChain(cert, (cert, cert), "id1"),
        EncryptedPrivateKey(bytes(48), "id2"),
        DHPublicKey(b"\x04" + bytes(64), "id3"),
        EMAID("DEABCC123ABC56", "id4"),
    )
    encoded = encode_message(V2GMessage(MessageHeader(bytes(8), signature=signature), body))
    assert 7400 < len(base64.b64encode(encoded)) <= 7500
