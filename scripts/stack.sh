#!/usr/bin/env bash
# The whole v2gpki stack on this machine, as separate processes started with the very commands of the
# systemd units (the ExecStart= lines of deploy/systemd/v2gpki-{api,ocsp,worker,beat}.service, with the
# binary path and ports adjusted): PostgreSQL and Redis on loopback (scripts/services.sh), the SoftHSM2
# token and hierarchies (as v2gpki-init.service does), then the API, the standalone OCSP/CRL responder,
# a Celery worker and beat.
#
#   bash scripts/stack.sh start      # idempotent set-up, then start what is not running; waits for /readyz
#   bash scripts/stack.sh status
#   eval "$(bash scripts/stack.sh env)"; .venv/bin/v2gpki cas      # the CLI against the stack
#   bash scripts/stack.sh stop       # the four processes (PostgreSQL and Redis stay up, as services.sh left them)
#   bash scripts/stack.sh clean      # stop, drop the stack's database, delete its directory
#
# Knobs (environment): STACK_DIR (default ./var/stack), STACK_API_PORT (8100), STACK_OCSP_PORT (8101),
# STACK_DB (v2gpki_stack), STACK_REDIS_DB (14), STACK_API_WORKERS (2), STACK_WAIT (seconds, 120).
# Any other V2GPKI_* variable in the caller's environment is passed to the services (e.g. V2GPKI_QUEUE,
# V2GPKI_EXPIRY_SCAN_SECONDS); V2GPKI_HOME, _DATABASE_URL, _BROKER_URL, _PUBLIC_URL and the PIN are the
# stack's own. Logs (JSON lines): $STACK_DIR/log/<service>.log.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STACK_VENV:-$REPO/.venv}
V=$VENV/bin/v2gpki
DIR=${STACK_DIR:-$REPO/var/stack}
API_PORT=${STACK_API_PORT:-8100}
OCSP_PORT=${STACK_OCSP_PORT:-8101}
DB=${STACK_DB:-v2gpki_stack}
REDIS_DB=${STACK_REDIS_DB:-14}
WAIT=${STACK_WAIT:-120}
SERVICES=(api ocsp worker beat)
OWN="V2GPKI_HOME V2GPKI_DATABASE_URL V2GPKI_BROKER_URL V2GPKI_PUBLIC_URL V2GPKI_HSM_PIN V2GPKI_HSM_PIN_FILE"
unset SOFTHSM2_CONF  # the stack's token lives under its own V2GPKI_HOME

say() { echo "stack: $*" >&2; }
die() { say "error: $*"; exit 1; }

unit_cmd() {  # the ExecStart= of a unit, pointed at this checkout's virtual environment
  local line
  line=$(sed -n 's/^ExecStart=//p' "$REPO/deploy/systemd/v2gpki-$1.service")
  [ -n "$line" ] || die "no ExecStart in deploy/systemd/v2gpki-$1.service"
  echo "${line//\/opt\/v2gpki\/.venv\/bin\/v2gpki/$V}"
}

overrides() {  # argparse keeps the last value: these follow the unit's own flags
  case $1 in
    api) echo "--port $API_PORT --workers ${STACK_API_WORKERS:-2}" ;;
    ocsp) echo "--port $OCSP_PORT --workers 1" ;;
    worker) echo "--concurrency 1 --hostname stack-$DB@%h" ;;
    beat) echo "" ;;
  esac
}

pid_of() { [ -f "$DIR/run/$1.pid" ] && cat "$DIR/run/$1.pid" || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

load_env() { set -a; . "$DIR/v2gpki.env"; set +a; }

setup() {
  mkdir -p "$DIR/log" "$DIR/run" "$DIR/secrets" "$DIR/home"
  chmod 700 "$DIR/secrets" "$DIR/home"
  local services
  services=$(bash "$REPO/scripts/services.sh")
  eval "$services"
  [ -n "${V2GPKI_TEST_PG_ADMIN_URL:-}" ] || die "PostgreSQL did not start (scripts/services.sh)"
  [ -n "${V2GPKI_TEST_REDIS_URL:-}" ] || die "Redis did not start (scripts/services.sh)"
  "$VENV/bin/python" - "$V2GPKI_TEST_PG_ADMIN_URL" "$DB" <<'EOF'
import sys

import psycopg

admin, name = sys.argv[1:]
with psycopg.connect(admin, autocommit=True) as conn:
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
        conn.execute(f'CREATE DATABASE "{name}"')
EOF
  if [ ! -s "$DIR/secrets/hsm-pin" ]; then
    (umask 077; od -An -tx1 -N12 /dev/urandom | tr -d ' \n' > "$DIR/secrets/hsm-pin")
  fi
  {
    printf '%s=%q\n' V2GPKI_HOME "$DIR/home"
    printf '%s=%q\n' V2GPKI_DATABASE_URL "${V2GPKI_TEST_PG_ADMIN_URL%/*}/$DB"
    printf '%s=%q\n' V2GPKI_BROKER_URL "redis://127.0.0.1:6379/$REDIS_DB"
    printf '%s=%q\n' V2GPKI_PUBLIC_URL "http://127.0.0.1:$API_PORT"
    printf '%s=%q\n' V2GPKI_HSM_PIN_FILE "$DIR/secrets/hsm-pin"
    printf '%s=%q\n' V2GPKI_LOG_FORMAT json
    local name
    for name in $(compgen -e | grep '^V2GPKI_' | grep -v '^V2GPKI_TEST_' || true); do
      case " $OWN " in *" $name "*) continue ;; esac
      printf '%s=%q\n' "$name" "${!name}"
    done
  } > "$DIR/v2gpki.env"
  chmod 600 "$DIR/v2gpki.env"
  # What v2gpki-init.service does: the token (its user PIN = the secret file), then schema + hierarchies.
  (
    load_env
    unset V2GPKI_HSM_PIN
    if [ ! -f "$V2GPKI_HOME/softhsm/softhsm2.conf" ]; then
      "$V" hsm init >/dev/null  # reads V2GPKI_HSM_PIN_FILE (an unreadable one is an error)
    fi
    "$V" init >"$DIR/log/init.log" 2>&1 || { cat "$DIR/log/init.log" >&2; exit 1; }
  ) || die "init failed (see $DIR/log/init.log)"
}

start_one() {
  local name=$1 cmd mp
  if alive "$name"; then say "$name already running (pid $(pid_of "$name"))"; return; fi
  cmd="$(unit_cmd "$name") $(overrides "$name")"
  mp="$DIR/run/metrics-$name"
  rm -rf "$mp"; mkdir -p "$mp"  # prometheus multiprocess files start empty, as RuntimeDirectory= does
  (
    load_env
    unset V2GPKI_HSM_PIN
    export PROMETHEUS_MULTIPROC_DIR="$mp"
    cd "$DIR"
    # shellcheck disable=SC2086 # the unit's command line is meant to be split into words
    exec setsid $cmd
  ) >"$DIR/log/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/run/$name.pid"
  say "$name: $cmd (pid $!)"
}

wait_ready() {  # name, then either a URL that must answer 2xx or a line the log must show
  local name=$1 what=$2 i
  for ((i = 0; i < WAIT * 4; i++)); do
    alive "$name" || { tail -n 30 "$DIR/log/$name.log" >&2; die "$name exited"; }
    if [[ $what == http* ]]; then
      curl -fsS -o /dev/null --max-time 5 "$what" 2>/dev/null && return 0
    elif grep -qF -- "$what" "$DIR/log/$name.log" 2>/dev/null; then
      return 0
    fi
    sleep 0.25
  done
  tail -n 30 "$DIR/log/$name.log" >&2
  die "$name not ready after ${WAIT}s"
}

stop_all() {
  local name p i
  for name in "${SERVICES[@]}"; do
    p=$(pid_of "$name")
    [ -n "$p" ] || continue
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
      for ((i = 0; i < 80; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$p" 2>/dev/null && { kill -KILL -- "-$p" 2>/dev/null || true; }
      say "$name stopped"
    fi
    rm -f "$DIR/run/$name.pid"
  done
}

cmd=${1:-status}
case $cmd in
  start)
    [ -x "$V" ] || die "$V not found: run scripts/setup.sh first"
    setup
    trap 'say "start failed: stopping"; stop_all' EXIT
    for name in "${SERVICES[@]}"; do start_one "$name"; done
    wait_ready api "http://127.0.0.1:$API_PORT/readyz"
    wait_ready ocsp "http://127.0.0.1:$OCSP_PORT/readyz"
    wait_ready worker " ready."
    wait_ready beat "beat: Starting"
    trap - EXIT
    say "up: API http://127.0.0.1:$API_PORT  OCSP/CRL http://127.0.0.1:$OCSP_PORT  env: $DIR/v2gpki.env"
    ;;
  stop) stop_all ;;
  status)
    rc=0
    for name in "${SERVICES[@]}"; do
      if alive "$name"; then echo "$name running (pid $(pid_of "$name"))"; else echo "$name stopped"; rc=3; fi
    done
    exit $rc
    ;;
  env)
    [ -f "$DIR/v2gpki.env" ] || die "no stack in $DIR (run: bash scripts/stack.sh start)"
    sed 's/^/export /' "$DIR/v2gpki.env"
    echo "unset SOFTHSM2_CONF V2GPKI_HSM_PIN"
    ;;
  clean)
    stop_all
    if [ -f "$DIR/v2gpki.env" ]; then
      services=$(bash "$REPO/scripts/services.sh")
      eval "$services"
      "$VENV/bin/python" - "$V2GPKI_TEST_PG_ADMIN_URL" "$DB" <<'EOF'
import sys

import psycopg

admin, name = sys.argv[1:]
with psycopg.connect(admin, autocommit=True) as conn:
    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
EOF
    fi
    rm -rf "$DIR"
    say "cleaned $DIR and database $DB"
    ;;
  *) die "usage: $0 start|stop|status|env|clean" ;;
esac
