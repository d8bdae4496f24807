"""Coverage-guided differential fuzzing of the EXI codec (atheris, i.e. libFuzzer), C half against Python.

    .venv/bin/pip install atheris
    .venv/bin/python scripts/fuzz_exi_cov.py [libFuzzer options] [CORPUS_DIR ...]

scripts/fuzz_exi.py mutates the published streams blindly. Here libFuzzer keeps every input that reaches
code no earlier input reached, so it works its way into the grammars rather than staying near the seeds.
The Python codec (pki/cps/exi) is always instrumented. To let coverage of the C half guide it too, and to
catch memory errors there, build the extension with clang's instrumentation and AddressSanitizer, and
preload atheris' sanitizer runtime:

    apt-get install -y clang
    CC=clang CFLAGS="-fsanitize=fuzzer-no-link,address,undefined -g" LDSHARED="clang -shared" \\
        LDFLAGS="-fsanitize=address,undefined" .venv/bin/python setup.py build_ext --inplace --force
    LD_PRELOAD="$(.venv/bin/python -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so" \\
        ASAN_OPTIONS=detect_leaks=0 .venv/bin/python scripts/fuzz_exi_cov.py -max_total_time=600 /tmp/exi-corpus
    .venv/bin/python setup.py build_ext --inplace --force      # the normal build again

An input is one selector byte (which decoder: V2G_Message with or without kept bits, body fragments,
SignedInfo) and the EXI stream. The check is the one scripts/fuzz_exi.py makes: whatever C decodes, Python
decodes to the same tree and C re-encodes to the same octets; and neither codec may raise anything but
its typed ExiError (an uncaught exception is a finding: libFuzzer stops and writes the input to
``crash-*``). The published test streams are always read as seeds; new inputs go to the first corpus
directory given (none: kept in memory only).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["pki.cps.exi"]):
    from fuzz_exi import compare  # noqa: E402

    from pki.cps.exi import native  # noqa: E402
    from tests.test_exi_fuzz import SEEDS  # noqa: E402
    from tests.test_exi_native import BODY_KEEP  # noqa: E402

# selector byte % 4 -> (seed kind, keep bits)
MODES: list[tuple[str, frozenset[str]]] = [("doc", frozenset()), ("doc", BODY_KEEP), ("frag", frozenset()),
                                            ("dsig", frozenset())]


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, keep = MODES[data[0] % len(MODES)]
    _, differs = compare(kind, data[1:], keep)
    if differs:
        raise AssertionError(f"C and Python disagree ({kind}): {data[1:].hex()}")


def seed_corpus() -> str:
    d = Path(tempfile.mkdtemp(prefix="exi-corpus-"))
    for i, (kind, stream) in enumerate(SEEDS):
        for m, (mode_kind, _) in enumerate(MODES):
            if mode_kind == kind:
                (d / f"seed-{i}-{m}").write_bytes(bytes([m]) + stream)
    return str(d)


def main() -> None:
    if not native.available():
        raise SystemExit("the C half is not built or is turned off (pip install -e . with a C compiler)")
    # libFuzzer writes what it finds to the first directory given and reads the others: the seeds go last.
    atheris.Setup([*sys.argv, seed_corpus()], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
