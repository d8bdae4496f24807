#!/usr/bin/env bash
# The whole test suite: installs what is missing, starts PostgreSQL and Redis on loopback, runs pytest
# against SoftHSM2, SQLite and PostgreSQL. Exits non-zero when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
eval "$(bash scripts/services.sh)"
export V2GPKI_TEST_REQUIRE_PG=1
exec .venv/bin/python -m pytest -q "$@"
