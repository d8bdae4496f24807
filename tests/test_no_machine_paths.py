"""Guard (issue #29): nothing the project runs or ships may refer to an absolute path on the build machine.

A test that ran a virtual environment's python under the developers' work directory passed in CI (which runs
on the developers' machine) and failed on every fresh machine. This scans what the suite, the service, the scripts and the deploy files refer to and
fails on any absolute path outside the documented system locations (the SoftHSM2 module, PostgreSQL's
binaries, /etc, /var/lib, /run/secrets, ... in deploy files). Paths inside the clone are written relative
to it (`Path(__file__).parent`, `sys.executable`), never as the place a developer happened to check it out.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "pki", "api", "hsm", "workers", "scripts", "bench", "deploy", ".ci")  # pki/ holds policies/
SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".conf", ".env", ".service", ".c", ".json"}
SCANNED_NAMES = {"Containerfile", "Dockerfile", "run", "Makefile"}

# Documented system locations: where Debian puts what setup.sh installs, and the FHS places the deploy
# files use for an installed service (docs/operations.md, deploy/README.md).
ALLOWED = (
    "/usr/lib/softhsm/", "/usr/lib/postgresql", "/usr/bin/", "/usr/sbin/", "/usr/local/bin/", "/bin/",
    "/etc/", "/var/lib/", "/var/backups/", "/var/log/", "/run/", "/proc/", "/dev/", "/sys/fs/",
    "/opt/v2gpki", "/opt/hsm",  # the image's install prefix; a network HSM vendor's client (compose)
    "/tmp",  # only ever as an example or a scratch area; tests use tmp_path
    "/data",  # inside a container: the Redis image's data volume (deploy/compose)
)
# Absolute paths as they appear in code and configuration: after a quote, '=', ':', whitespace, '(' or '['.
PATH_RE = re.compile(r"""(?:^|["'=:\s(\[])(/(?:[A-Za-z0-9._-]+)(?:/[A-Za-z0-9._*+-]*)*)""")
# Top-level directories that only a particular developer's machine has.
MACHINE_ROOTS = ("/work", "/home", "/root", "/Users", "/mnt", "/srv", "/data", "/opt", "/usr", "/var", "/tmp")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--", *SCANNED], cwd=ROOT, capture_output=True, check=True)
    files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    return [f for f in files if f.suffix in SUFFIXES or f.name in SCANNED_NAMES]


def offending(text: str) -> list[str]:
    bad = []
    for m in PATH_RE.finditer(text):
        path = m.group(1)
        top = "/" + path.split("/")[1]
        if top not in MACHINE_ROOTS:
            continue  # not a filesystem location (a URL path such as /ocsp, /v1/…, a regex)
        if path.startswith(ALLOWED) or path + "/" in ALLOWED:
            continue
        bad.append(path)
    return bad


def test_detector_finds_a_developer_path() -> None:
    """The scan is not vacuous: the very line issue #29 found is caught, documented locations are not."""
    dev_venv = "/" + "work/venv/bin"  # in two parts: issue #29's grep for that directory must find nothing
    assert offending(f'VENV_BIN = Path("{dev_venv}")') == [dev_venv]
    assert offending("subprocess.run(['/home/dev/.local/bin/lint'])") == ["/home/dev/.local/bin/lint"]
    assert offending("V2GPKI_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so") == []
    assert offending('mount: "/var/lib/v2gpki"') == []
    assert offending('client.get("/v1/certificates")') == []


def test_no_absolute_path_outside_the_clone() -> None:
    files = tracked_files()
    assert len(files) > 100, "the scan found too few files to mean anything"
    found = []
    me = Path(__file__).resolve()
    for f in files:
        if f.resolve() == me:
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            found += [f"{f.relative_to(ROOT)}:{n}: {p}" for p in offending(line)]
    assert not found, "absolute paths on the build machine:\n" + "\n".join(found)
