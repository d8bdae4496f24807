#!/usr/bin/env bash
# Installs what the service and its tests need on a fresh Debian machine (run as root), idempotently:
# system packages (SoftHSM2, PostgreSQL, Redis, OpenSSL, ...) and a virtual environment in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v softhsm2-util >/dev/null || need_apt+=(softhsm2)
command -v openssl >/dev/null || need_apt+=(openssl)
# a C compiler for the EXI codec's C half (pki/cps/exi/_native.c; without one the Python codec runs alone)
command -v cc >/dev/null || need_apt+=(gcc)
[ -n "${V2GPKI_SKIP_SERVERS:-}" ] || {
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
  command -v cfssl >/dev/null || need_apt+=(golang-cfssl)
  command -v ab >/dev/null || need_apt+=(apache2-utils)
  command -v chromium >/dev/null || need_apt+=(chromium)
  # the container image test (tests/test_image.py): Podman with runc, and debootstrap for its base image
  for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || need_apt+=("$tool"); done
  # p11-kit's PKCS#11 remoting, the stand-in network HSM (tests/test_network_hsm.py): the server and the
  # client module (p11-kit-client.so, in p11-kit-modules)
  command -v p11-kit >/dev/null || need_apt+=(p11-kit)
  dpkg -s p11-kit-modules >/dev/null 2>&1 || need_apt+=(p11-kit-modules)
  bash scripts/peers.sh  # ISO 15118 peers for the interoperability tests (.peers/, Java)
}
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
"$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
  || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q python3-dev >/dev/null 2>&1 || true; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import pki, hsm, pkcs11, pkilint, fastapi, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ] \
   || [ pki/cps/exi/_native.c -nt .venv/.installed ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.installed
fi
