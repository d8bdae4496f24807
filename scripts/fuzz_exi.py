"""Differential fuzzing of the EXI codec's C half against its Python reference, for as long as you like.

    .venv/bin/python scripts/fuzz_exi.py [--streams 200000] [--seed 1] [--grammar 2|20|all]

Mutates the published test streams (EXIficient messages, RISE-V2G fragments, SignedInfo) and, for the ISO
15118-20 CommonMessages grammar (#26), CertificateInstallationReq/Res documents and their signed fragments
(those tests/test_cps20.py proves byte-exact with EXIficient): bit flips, random bytes, truncation,
insertion, deletion. Each stream is decoded by both codecs; whatever C decodes,
Python must decode to the same tree (and the same kept bits), and C must re-encode it to the same octets.
The first disagreement stops the run with the stream in hex. tests/test_exi_native.py runs the same
comparison with hypothesis in the suite; this is for long runs, e.g. under AddressSanitizer (docs/exi.md):

    CFLAGS="-fsanitize=address,undefined -g" LDFLAGS="-fsanitize=address,undefined" \\
        .venv/bin/python setup.py build_ext --inplace --force
    ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \\
        .venv/bin/python scripts/fuzz_exi.py --streams 1000000
    .venv/bin/python setup.py build_ext --inplace --force      # the normal build again
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pki.cps.errors import ExiError  # noqa: E402
from pki.cps.exi import MSGDEF, XMLDSIG, codec, native  # noqa: E402
from pki.cps.exi.datatypes import DEFAULT_LIMITS  # noqa: E402
from pki.cps.exi.schema import SchemaSet  # noqa: E402
from pki.cps.exi.schema20 import CM20  # noqa: E402
from tests.test_exi_fuzz import SEEDS  # noqa: E402
from tests.test_exi_native import BODY_KEEP, _memos, _strict  # noqa: E402


def mutate(rnd: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.choice(["flip", "flip", "byte", "truncate", "insert", "delete"])
        if op == "flip" and data:
            bit = rnd.randrange(8 * len(data))
            data[bit // 8] ^= 1 << (bit % 8)
        elif op == "byte" and data:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif op == "truncate":
            del data[rnd.randint(0, len(data)):]
        elif op == "insert":
            at = rnd.randint(0, len(data))
            data[at:at] = os.urandom(rnd.randint(1, 6))
        elif op == "delete" and data:
            at = rnd.randrange(len(data))
            del data[at:at + rnd.randint(1, 4)]
    return bytes(data)


def compare(kind: str, stream: bytes, keep: frozenset[tuple[str, str]]) -> tuple[bool, bool]:
    """Decode ``stream`` with both codecs; (C decoded it, C disagreed with Python). ``kind`` is one of the
    seeds' kinds: "doc" (a V2G_Message), "frag" (body fragments), "dsig" (SignedInfo), "doc20"/"frag20" (ISO
    15118-20 CertificateInstallationReq/Res, OEMProvisioningCertificateChain/SignedInstallationData)."""
    schema: SchemaSet = XMLDSIG if kind == "dsig" else CM20 if kind.endswith("20") else MSGDEF
    fragment = kind not in ("doc", "doc20")
    if fragment:
        keep = frozenset()
    try:
        expected = (codec._decode_fragment(stream, schema) if fragment
                    else codec._decode_document(stream, schema, keep_bits=keep))
    except ExiError:
        expected = None
    got = native.decode(stream, schema, DEFAULT_LIMITS, fragment=fragment, keep_bits=keep)
    if got is None:
        return False, False
    if isinstance(got, list):
        same = isinstance(expected, list) and [_strict(n) for n in got] == [_strict(n) for n in expected]
        again = native.encode_fragment(got, schema, True)
    else:
        same = isinstance(expected, codec.Node) and _strict(got) == _strict(expected) \
            and _memos(got) == _memos(expected)
        again = native.encode_document(got, schema)
    return True, not same or (again is not None and again != stream)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grammar", choices=["2", "20", "all"], default="all")
    args = ap.parse_args()
    from tests.test_exi20_fuzz import seeds20

    seeds = {"2": SEEDS, "20": seeds20(), "all": SEEDS + seeds20()}[args.grammar]
    if not native.available():
        raise SystemExit("the C half is not built or is turned off (pip install -e . with a C compiler)")
    rnd = random.Random(args.seed)
    handled = 0
    started = time.monotonic()
    for _ in range(args.streams):
        kind, seed = rnd.choice(seeds)
        stream = mutate(rnd, seed)
        keep = BODY_KEEP if kind == "doc" and rnd.random() < 0.5 else frozenset()
        decoded, differs = compare(kind, stream, keep)
        handled += decoded
        if differs:
            print(f"disagreement ({kind}): {stream.hex()}")
            return 1
    print(f"{args.streams} streams, {handled} decoded by C, all agreed with Python "
          f"({time.monotonic() - started:.0f} s, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
