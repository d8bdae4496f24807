#!/usr/bin/env bash
# Installs the independent ISO 15118 implementations the interoperability tests talk to (run as root on
# Debian, idempotently; quick when already installed):
#   .peers/josev  Josev (PyPI `iso15118`, pinned) in a virtual environment of its own, never the service's:
#                 its EXI codec is EXIficient in a jar driven through py4j, so it also needs a Java runtime.
# Used by tests/test_cps_josev.py (through tests/peers/josev_ev.py). Override the pin with JOSEV_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."

JOSEV_VERSION=${JOSEV_VERSION:-0.31.2}
PY=${PYTHON:-python3}
DEST=.peers/josev

if ! java -version >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q default-jre-headless
fi

if [ "$(cat "$DEST/.installed" 2>/dev/null)" != "$JOSEV_VERSION" ] \
   || ! "$DEST/bin/python" -c "import iso15118.shared.security, py4j" 2>/dev/null; then
  rm -rf "$DEST"
  mkdir -p .peers
  "$PY" -m venv "$DEST"
  "$DEST/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  "$DEST/bin/pip" install -q "iso15118==$JOSEV_VERSION"
  "$DEST/bin/python" -c "import iso15118.shared.security, py4j"
  echo "$JOSEV_VERSION" > "$DEST/.installed"
fi
