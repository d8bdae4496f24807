#!/usr/bin/env bash
# The whole test suite: installs what is missing, starts PostgreSQL and Redis on loopback, runs pytest
# against SoftHSM2, SQLite and PostgreSQL. Exits non-zero when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
eval "$(bash scripts/services.sh)"
export V2GPKI_TEST_REQUIRE_PG=1
export V2GPKI_TEST_REQUIRE_NATIVE=1  # the EXI codec's C half must be built and used (tests/test_exi_native.py)
exec .venv/bin/python -m pytest -q "$@"
