#!/usr/bin/env bash
# One command, embedded defaults: installs SoftHSM2 and the package, creates the SoftHSM2 token under
# $V2GPKI_HOME (default ./var), builds the hierarchies (`v2gpki init`, idempotent), then serves the API
# with its OCSP and CRL responders — and the Celery worker and beat on the embedded broker when present.
set -euo pipefail
cd "$(dirname "$0")/.."
V2GPKI_SKIP_SERVERS=1 bash scripts/setup.sh
export V2GPKI_HOME="${V2GPKI_HOME:-$PWD/var}"
V=.venv/bin/v2gpki
$V hsm init
$V init
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
if $V worker --help >/dev/null 2>&1; then
  $V worker & pids+=($!)
  $V beat & pids+=($!)
fi
$V serve --host "${V2GPKI_HOST:-127.0.0.1}" --port "${V2GPKI_PORT:-8000}" --workers "${V2GPKI_WORKERS:-2}"
