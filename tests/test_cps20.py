"""ISO 15118-20 contract certificate installation (#26): the -20 EXI grammar against an independent codec.

The independent side is Josev (PyPI `iso15118`) with the EXIficient in its jar, run in its own virtual
environment as tests/peers/josev_ev20.py (it imports nothing from this repository). Every stream our codec
writes — whole CertificateInstallationReq/Res documents, the signed fragments (OEMProvisioningCertificateChain,
SignedInstallationData with each of its three key elements) and SignedInfo — is decoded by EXIficient and
re-encoded by it: the octets must be ours. Without the peer the module is skipped, unless CI or
V2GPKI_TEST_REQUIRE_PEERS is set: then it fails.
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pki.cps.exi import native
from pki.cps.exi.messages import Reference, Signature, SignedInfo, X509IssuerSerial, encode_signed_info
from pki.cps.exi.messages20 import (
    CertificateInstallationReq20,
    CertificateInstallationRes20,
    Chain20,
    Header20,
    SignedInstallationData,
    decode_message20,
    encode_fragment20,
    encode_message20,
)
from pki.cps.exi.schema20 import CM20, RESPONSE_CODES_20
from tests.conftest import REPO
from tests.test_cps_josev import PEER_PYTHON, Peer, _need_peer

PEER20 = Path(__file__).resolve().parent / "peers" / "josev_ev20.py"
SHA512 = "http://www.w3.org/2001/04/xmlenc#sha512"
ECDSA_SHA512 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512"
ED448 = "http://www.w3.org/2021/04/xmldsig-more#eddsa-ed448"


class Peer20(Peer):
    """tests/peers/josev_ev20.py as a long-lived subprocess (the -2 peer's protocol and plumbing)."""

    def __init__(self) -> None:  # noqa: D107 - Peer.__init__ with the -20 script
        self.proc = subprocess.Popen([str(PEER_PYTHON), str(PEER20)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=PEER20.parent)
        import queue

        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()


@pytest.fixture(scope="module")
def josev20() -> Iterator[Peer20]:
    if not PEER_PYTHON.exists():
        _need_peer(f"no {PEER_PYTHON}")
    probe = subprocess.run([str(PEER_PYTHON), "-c", "import iso15118.shared.messages.iso15118_20.common_messages"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        _need_peer(f"iso15118 does not import in {PEER_PYTHON}: {probe.stderr.strip()[-300:]}")
    if subprocess.run(["java", "-version"], capture_output=True).returncode != 0:
        _need_peer("no Java runtime for EXIficient")
    peer = Peer20()
    try:
        assert peer("hello")["ok"]
        yield peer
    finally:
        peer.close()


def exificient_roundtrip(peer: Peer20, data: bytes, *, fragment: bool, grammar: str = "cm20") -> bytes:
    out = peer("roundtrip", exi=base64.b64encode(data).decode(), fragment=fragment, grammar=grammar)
    return base64.b64decode(out["exi"])


# -- generated messages ---------------------------------------------------------------------------------------


def _signature(rnd: random.Random, ed448: bool = False) -> Signature:
    si = SignedInfo((Reference("#" + rnd.choice(["id1", "ID2", "sid"]), rnd.randbytes(64), SHA512),),
                    signature_method=ED448 if ed448 else ECDSA_SHA512)
    return Signature(si, rnd.randbytes(114 if ed448 else 132))


def _chain(rnd: random.Random, ident: str | None = None, subs_min: int = 0) -> Chain20:
    return Chain20(rnd.randbytes(rnd.randint(1, 1600)),
                   tuple(rnd.randbytes(rnd.randint(1, 1600)) for _ in range(rnd.randint(subs_min, 3))), ident)


def random_request(rnd: random.Random) -> CertificateInstallationReq20:
    roots = tuple(X509IssuerSerial(rnd.choice(["CN=V2G Root CA 20,O=V2G PKI Demo,C=DE", "", "<Name(CN=é)>"]),
                                   rnd.choice([0, 1, 2**159 + rnd.randint(0, 99)]))
                  for _ in range(rnd.randint(1, 20)))
    emaids = tuple(rnd.choice(["DEABC123456789", "", "X" * 255]) for _ in range(rnd.randint(1, 8)))
    return CertificateInstallationReq20(
        Header20(rnd.randbytes(8), rnd.choice([0, 1_700_000_000, 2**63 - 1, 2**64 - 1]),
                 _signature(rnd) if rnd.random() < 0.8 else None),
        _chain(rnd, "id1"), roots, rnd.randint(0, 255), emaids if rnd.random() < 0.5 else None)


def random_installation_data(rnd: random.Random) -> SignedInstallationData:
    kind = rnd.choice(["SECP521", "X448", "TPM"])
    size = {"SECP521": 94, "X448": 84, "TPM": 206}[kind]
    return SignedInstallationData(rnd.choice(["id1", "SID"]), _chain(rnd, subs_min=1),
                                  rnd.choice(["SECP521", "X448"]), rnd.randbytes(133), rnd.randbytes(size), kind)


def random_response(rnd: random.Random) -> CertificateInstallationRes20:
    return CertificateInstallationRes20(
        Header20(rnd.randbytes(8), rnd.randint(0, 2**40), _signature(rnd, rnd.random() < 0.3)),
        rnd.choice(RESPONSE_CODES_20), rnd.choice(["Finished", "Ongoing", "Ongoing_WaitingForCustomerInteraction"]),
        _chain(rnd), random_installation_data(rnd), rnd.randint(0, 255))


def test_committed_names20_match_the_xsds() -> None:
    xsd = Path(os.environ.get("V2G20_XSD_DIR", "")) if os.environ.get("V2G20_XSD_DIR") else None
    if xsd is None:
        found = sorted((REPO / ".peers" / "josev").glob("lib/python3*/site-packages/iso15118/shared/schemas/iso15118_20"))
        if not found:
            _need_peer("no -20 XSDs (set V2G20_XSD_DIR or install the Josev peer)")
        xsd = found[0]
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "pki/cps/exi/derive_names.py"), "--iso20",
                          str(xsd)], capture_output=True, text=True, check=True)
    assert out.stdout == (REPO / "pki/cps/exi/_names20.py").read_text()


def test_cm20_grammar_is_compiled_for_the_c_half() -> None:
    if not native.available():
        if os.environ.get("V2GPKI_TEST_REQUIRE_NATIVE"):
            pytest.fail("the C half of the EXI codec is not built")
        pytest.skip("no C half")
    assert native._program(CM20) is not None  # the -20 grammar runs in C, not a Python fallback


def test_messages_and_fragments_byte_exact_with_exificient(josev20: Peer20) -> None:
    rnd = random.Random(26)
    for _ in range(12):
        for message in (random_request(rnd), random_response(rnd)):
            exi = encode_message20(message)
            assert decode_message20(exi) == message
            assert exificient_roundtrip(josev20, exi, fragment=False) == exi, type(message).__name__
        req = random_request(rnd)
        oem = encode_fragment20([req.oem_provisioning_chain.to_node("OEMProvisioningCertificateChain")])
        assert exificient_roundtrip(josev20, oem, fragment=True) == oem
        sid = encode_fragment20([random_installation_data(rnd).to_node()])
        assert exificient_roundtrip(josev20, sid, fragment=True) == sid
        if req.header.signature is not None:
            si = encode_signed_info(req.header.signature.signed_info)
            assert exificient_roundtrip(josev20, si, fragment=True, grammar="xmldsig") == si


def _python_only(fn: Any, *args: Any) -> Any:
    saved = native.ENABLED
    native.ENABLED = False
    try:
        return fn(*args)
    finally:
        native.ENABLED = saved


def test_c_and_python_agree_on_the_20_grammar() -> None:
    rnd = random.Random(2026)
    for _ in range(40):
        for message in (random_request(rnd), random_response(rnd)):
            exi = encode_message20(message)
            assert _python_only(encode_message20, message) == exi
            assert _python_only(decode_message20, exi) == decode_message20(exi)
