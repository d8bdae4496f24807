#!/usr/bin/env bash
# Starts PostgreSQL and Redis on loopback for the tests (no server runs on a fresh CI machine) and
# prints the URLs as shell exports. PostgreSQL 15 is installed but stopped on these machines.
set -euo pipefail
PGVER=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$PGVER main"; then
  pg_createcluster "$PGVER" main >/dev/null
fi
pg_ctlcluster "$PGVER" main start >/dev/null 2>&1 || true
for _ in $(seq 1 50); do
  pg_isready -h 127.0.0.1 -q && break
  sleep 0.2
done
PGPASS=v2gpki-test
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_roles WHERE rolname='v2gpki'\" | grep -q 1 || psql -q -c \"CREATE ROLE v2gpki LOGIN CREATEDB PASSWORD '$PGPASS'\"" >/dev/null
echo "export V2GPKI_TEST_PG_ADMIN_URL=postgresql://v2gpki:$PGPASS@127.0.0.1:5432/postgres"

if command -v redis-server >/dev/null; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  echo "export V2GPKI_TEST_REDIS_URL=redis://127.0.0.1:6379/15"
fi
