"""The shipped artifact, installed the way an operator installs it (#22 item 2).

The rest of the suite imports the checkout from a virtual environment that also holds every dev extra, so
a file missing from the wheel or a dependency only an extra brings in goes unnoticed there. This test:

1. builds the wheel from a copy of what the image's build stage copies (deploy/image/Containerfile), so
   the checkout gets no build/ directory;
2. installs it, without extras, into a fresh virtual environment with deploy/constraints.txt (the pinned
   runtime dependency set, scripts/runtime_constraints.py) and checks that everything installed is pinned
   there, at that version, and that pip finds the set consistent;
3. from a directory outside the source tree, runs the production-shaped stack with that environment's
   `v2gpki`: PostgreSQL and Redis (scripts/services.sh), `hsm init`, `init`, then `serve`, `ocsp-serve`,
   `worker` and `beat` as separate processes (scripts/stack.sh, the systemd units' command lines);
4. drives it as tests/test_deploy_stack.py does: enroll → expiry alert at a webhook → revoke → `openssl
   ocsp` revoked → `openssl crl` lists the serial.

The installation takes about half a minute (wheels come from pip's cache or the configured local index).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_deploy_stack import Stack, round_trip, running_stack

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
CONTAINERFILE = REPO / "deploy" / "image" / "Containerfile"

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """No setting of the suite's, and nothing that would put the checkout on the import path."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("V2GPKI_", "CELERY_", "PYTHON", "VIRTUAL_ENV")) and k != "SOFTHSM2_CONF"}


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build_sources() -> list[str]:
    """What the image's build stage copies into /src before `pip wheel .`."""
    srcs: list[str] = []
    for m in re.finditer(r"^COPY (?!--from)(.+?) (\S+)$", CONTAINERFILE.read_text(), flags=re.M):
        srcs.extend(m.group(1).split())
    return srcs


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[_canonical(name)] = version
    return out


def _runtime_constraints() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runtime_constraints", REPO / "scripts" / "runtime_constraints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("wheel-src")
    for rel in build_sources():
        path = REPO / rel
        if path.is_dir():
            shutil.copytree(path, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel)
    out = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)],
         cwd=out)
    (whl,) = out.glob("v2gpki-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh virtual environment holding the wheel and its pinned runtime dependencies, nothing else."""
    d = tmp_path_factory.mktemp("operator-venv")
    _run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(d)], cwd=d)
    py = str(d / "bin" / "python")
    # this pip installs into the fresh interpreter (--python): no second pip to bootstrap
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "-c", str(CONSTRAINTS), str(wheel)], cwd=d)
    return d


def installed(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    done = _run([str(venv / "bin" / "python"), "-c", code], cwd=venv)
    return {_canonical(k): v for k, v in json.loads(done.stdout).items()}


def test_constraints_pin_exactly_what_the_wheel_installs(venv: Path) -> None:
    have = installed(venv)
    assert have.pop("v2gpki", None), have
    want = pins()
    unpinned = {n: v for n, v in have.items() if n not in want}
    assert not unpinned, f"installed but not pinned in deploy/constraints.txt (scripts/runtime_constraints.py): {unpinned}"
    moved = {n: (v, want[n]) for n, v in have.items() if want[n] != v}
    assert not moved, moved
    # a pin only another interpreter needs (async-timeout below Python 3.11.3, for Debian bookworm's 3.11.2)
    # is never installed on this one: CI's interpreter may be either
    unused = sorted(set(want) - set(have) - _runtime_constraints().other_interpreters_only())
    assert not unused, f"pinned in deploy/constraints.txt but not a runtime dependency any more: {unused}"
    assert "packaging" in have  # kombu's Redis transport needs it: celery[redis] (#22)
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "check"], cwd=venv)


def test_installed_package_carries_its_policies(venv: Path, tmp_path: Path) -> None:
    """Imported from the venv, not the checkout; the default policies are package data there."""
    code = ("import pki, json; from pki.config import Settings; "
            "print(json.dumps([pki.__file__, str(Settings().policies_dir)]))")
    pkg, policies = json.loads(_run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path).stdout)
    assert Path(pkg).is_relative_to(venv) and Path(policies).is_relative_to(venv), (pkg, policies)
    assert not Path(policies).is_relative_to(REPO)
    v2gpki = str(venv / "bin" / "v2gpki")
    _run([v2gpki, "policies", "export", "exported"], cwd=tmp_path)
    shipped = {f.name: f.read_bytes() for f in (REPO / "pki" / "policies").glob("*.yaml")}
    assert {f.name: f.read_bytes() for f in (tmp_path / "exported").iterdir()} == shipped
    listed = _run([v2gpki, "profiles"], cwd=tmp_path).stdout
    assert "secc" in listed and "contract-20" in listed


@pytest.fixture(scope="module")
def installed_stack(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    operator = tmp_path_factory.mktemp("operator")  # outside the source tree: hsm init, init, the services
    assert not operator.resolve().is_relative_to(REPO)
    with running_stack(operator / "stack", venv=venv, cwd=operator) as s:
        yield s


def test_installed_stack_round_trip(installed_stack: Stack, venv: Path, tmp_path: Path) -> None:
    s = installed_stack
    assert s.exe == str(venv / "bin" / "v2gpki")
    # every service runs the installed `v2gpki`, from the stack's directory outside the checkout
    for name in ("api", "ocsp", "worker", "beat"):
        pid = int((s.dir / "run" / f"{name}.pid").read_text())
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert s.exe in argv, (name, argv)
        assert not Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(REPO), name
    round_trip(s, tmp_path)
    # the worker consumed from Redis without crashing (the missing `packaging` killed it before #22)
    log = (s.dir / "log" / "worker.log").read_text()
    assert "ModuleNotFoundError" not in log and "Traceback" not in log, log[-3000:]
