"""Differential fuzzing of the ISO 15118-20 CommonMessages grammar (#26): mutated CertificateInstallationReq/Res
documents and signed fragments, decoded by the C half and by the Python reference, must agree (tree and
re-encoding), and whatever either accepts re-encodes to the same octets. A short run here; long runs with
``scripts/fuzz_exi.py --grammar 20`` (under AddressSanitizer as docs/exi.md says)."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

from pki.cps.errors import ExiError
from pki.cps.exi import native
from pki.cps.exi.messages import encode_signed_info
from pki.cps.exi.messages20 import decode_message20, encode_fragment20, encode_message20
from pki.cps.exi.schema20 import CM20

from .test_cps20 import random_installation_data, random_request, random_response

STREAMS = int(os.environ.get("V2GPKI_FUZZ20_STREAMS", "3000"))


def seeds20() -> list[tuple[str, bytes]]:
    """Seed streams of the -20 grammar (deterministic): documents, the two signed fragments, SignedInfo."""
    rnd = random.Random(2620)
    out: list[tuple[str, bytes]] = []
    for _ in range(6):
        req, res = random_request(rnd), random_response(rnd)
        out += [("doc20", encode_message20(req)), ("doc20", encode_message20(res)),
                ("frag20", encode_fragment20([req.oem_provisioning_chain.to_node("OEMProvisioningCertificateChain")])),
                ("frag20", encode_fragment20([random_installation_data(rnd).to_node()]))]
        if req.header.signature is not None:
            out.append(("dsig", encode_signed_info(req.header.signature.signed_info)))
    return out


def _fuzz_script() -> object:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import fuzz_exi

    return fuzz_exi


def test_c_and_python_agree_on_mutated_20_streams() -> None:
    if not native.available():
        if os.environ.get("V2GPKI_TEST_REQUIRE_NATIVE"):
            pytest.fail("the C half of the EXI codec is not built")
        pytest.skip("no C half")
    fuzz = _fuzz_script()
    rnd = random.Random(26)
    seeds = seeds20()
    decoded = 0
    for _ in range(STREAMS):
        kind, seed = rnd.choice(seeds)
        stream = fuzz.mutate(rnd, seed)  # type: ignore[attr-defined]
        handled, differs = fuzz.compare(kind, stream, frozenset())  # type: ignore[attr-defined]
        decoded += handled
        assert not differs, f"C and Python disagree ({kind}): {stream.hex()}"
    assert decoded > STREAMS // 20  # the mutations leave enough streams decodable to compare something


def test_mutated_20_documents_raise_typed_errors_or_roundtrip() -> None:
    rnd = random.Random(2026)
    fuzz = _fuzz_script()
    docs = [s for k, s in seeds20() if k == "doc20"]
    for _ in range(STREAMS // 3):
        stream = fuzz.mutate(rnd, rnd.choice(docs))  # type: ignore[attr-defined]
        started = time.perf_counter()
        try:
            message = decode_message20(stream)
        except ExiError:
            continue
        finally:
            assert time.perf_counter() - started < 1.0
        assert encode_message20(message) == stream  # whatever is accepted re-encodes to the same octets
    for _kind, seed in seeds20():
        if _kind == "doc20":
            assert encode_message20(decode_message20(seed)) == seed
    assert CM20.name.endswith("-20")
