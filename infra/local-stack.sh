#!/usr/bin/env bash
# A local team stack on 127.0.0.1 only: an S3-protocol server (moto), an MLflow tracking server
# (artifacts in that S3 store) and a Prefect server; their databases are sqlite files, or with
# --postgres databases of a PostgreSQL server the script runs itself. Prints the env vars that
# point charlm at it; the same commands then run against these servers instead of the embedded
# defaults.
#
#   infra/local-stack.sh start [--postgres]  # start them (idempotent), print the env
#                                  (CHARLM_STACK_BACKEND=postgres does what --postgres does)
#   infra/local-stack.sh env       # print the env again:  eval "$(infra/local-stack.sh env)"
#   infra/local-stack.sh status    # each service's pid, and which pid serves each of its ports
#   infra/local-stack.sh stop      # stop them cleanly (SIGTERM, then SIGKILL after 10 s; pg_ctl stop)
#
# Ports: CHARLM_S3_PORT (9000), CHARLM_MLFLOW_PORT (5001), CHARLM_PREFECT_PORT (4200),
# CHARLM_PG_PORT (5433). `start` refuses, before starting anything, when one of them is held by a
# process it did not start (infra/ports.py).
# State (databases, logs, pids, ports): CHARLM_STACK_DIR (default ~/.charlm/stack).
#
# --postgres: Debian's postgresql package (its binaries under /usr/lib/postgresql/<ver>/bin, or
# CHARLM_PG_BIN). A cluster of its own (initdb) in $CHARLM_STACK_DIR/postgres (CHARLM_PG_DATA),
# listening on 127.0.0.1:$CHARLM_PG_PORT only (no unix socket), with trust authentication on
# loopback and no password anywhere; databases `mlflow` and `prefect`, owned by the role
# `charlm`. PostgreSQL refuses to run as root: as root the server runs as the OS user `postgres`
# (CHARLM_PG_OS_USER), and when that user cannot reach the stack folder (~ is private), the data
# folder goes under its home and $CHARLM_STACK_DIR/postgres links to it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CHARLM_BIN:-$PWD/.venv/bin}
DIR=${CHARLM_STACK_DIR:-$HOME/.charlm/stack}
S3_PORT=${CHARLM_S3_PORT:-9000}
MLFLOW_PORT=${CHARLM_MLFLOW_PORT:-5001}
PREFECT_PORT=${CHARLM_PREFECT_PORT:-4200}
PG_PORT=${CHARLM_PG_PORT:-5433}
PG_OS_USER=${CHARLM_PG_OS_USER:-postgres}
PG_ROLE=charlm
BUCKET=${CHARLM_BUCKET:-charlm}
PORTS=(python3 "$PWD/infra/ports.py")
[ -x "$BIN/python" ] && PORTS=("$BIN/python" "$PWD/infra/ports.py")
mkdir -p "$DIR"

die() { echo "local-stack: $*" >&2; exit 1; }

env_lines() {
  cat <<EOV
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=charlm-local AWS_SECRET_ACCESS_KEY=charlm-local AWS_DEFAULT_REGION=us-east-1
export CHARLM_STORE=s3://$BUCKET/store
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
EOV
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

wait_http() {  # url, name
  for _ in $(seq 1 120); do
    if "$BIN/python" - "$1" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1)
PY
    sleep 0.5
  done
  echo "local-stack: $2 did not answer at $1 within 60 s (log: $DIR/$2.log)" >&2
  return 1
}

start_one() {  # name, port, command...
  local name=$1 port=$2; shift 2
  if running "$name"; then return 0; fi
  setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/$name.pid"
  echo "$port" > "$DIR/$name.port"
}

# ---- PostgreSQL (--postgres) ------------------------------------------------------------------

pg_bin() {  # the folder holding initdb, pg_ctl and postgres
  local d
  if [ -n "${CHARLM_PG_BIN:-}" ]; then echo "$CHARLM_PG_BIN"; return; fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return; }
  done
  d=$(command -v pg_ctl 2>/dev/null) && d=$(dirname "$(readlink -f "$d")") && [ -x "$d/initdb" ] && { echo "$d"; return; }
  return 1
}

as_pg() {  # run a server-side command as the OS user the cluster belongs to
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

pg_data() {  # the cluster's folder, real path (created on first use)
  local data=${CHARLM_PG_DATA:-$DIR/postgres} home
  if [ -e "$data" ]; then readlink -f "$data"; return; fi
  if [ "$(id -u)" = 0 ] && [ -z "${CHARLM_PG_DATA:-}" ] && ! runuser -u "$PG_OS_USER" -- test -x "$DIR"; then
    home=$(getent passwd "$PG_OS_USER" | cut -d: -f6)
    mkdir -p "$home/charlm-stacks"
    chown "$PG_OS_USER" "$home/charlm-stacks"
    local real="$home/charlm-stacks/$(readlink -f "$DIR" | sha256sum | cut -c1-12)"
    echo "local-stack: user $PG_OS_USER cannot reach $DIR: the PostgreSQL data goes to $real ($DIR/postgres links to it)" >&2
    mkdir -p "$real"
    ln -sfn "$real" "$DIR/postgres"
    data=$real
  fi
  mkdir -p "$data"
  readlink -f "$data"
}

pg_check() {  # before anything starts: the binaries, and a user to run the server as
  PG_BIN=$(pg_bin) || die "--postgres needs PostgreSQL's server programs (initdb, pg_ctl): none under /usr/lib/postgresql/*/bin or on PATH; install Debian's postgresql package (apt-get install postgresql) or set CHARLM_PG_BIN"
  if [ "$(id -u)" = 0 ] && ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
    die "PostgreSQL refuses to run as root and there is no OS user '$PG_OS_USER' to run it as: create one (Debian's postgresql package does) or set CHARLM_PG_OS_USER"
  fi
}

pg_start() {
  local data
  if running postgres; then return 0; fi
  data=$(pg_data)
  if [ ! -f "$data/PG_VERSION" ]; then
    [ -z "$(ls -A "$data")" ] || die "$data holds files but no PostgreSQL cluster: move it aside or set CHARLM_PG_DATA"
    # the cluster is made in a folder beside it and renamed into place whole: a start stopped
    # half-way leaves no half-made cluster behind
    local init="$data.init"
    rm -rf "$init" && mkdir -m 700 "$init"
    if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER" "$init"; fi
    # trust on loopback only, no unix socket: the stack's other servers are unauthenticated on
    # loopback too; a shared server needs passwords (~/.pgpass) and its own auth (docs/deploy.md)
    as_pg "$PG_BIN/initdb" -D "$init" -U "$PG_ROLE" --auth=trust -E UTF8 --locale=C >"$DIR/postgres-initdb.log" 2>&1 ||
      die "initdb of $init failed (log: $DIR/postgres-initdb.log)"
    printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n" | as_pg tee -a "$init/postgresql.conf" >/dev/null
    rmdir "$data" && mv "$init" "$data"
  fi
  # pg_ctl starts the server in a session of its own; its output goes to our log
  as_pg "$PG_BIN/pg_ctl" start -D "$data" -w -t 60 -o "-p $PG_PORT" >>"$DIR/postgres.log" 2>&1 ||
    die "PostgreSQL did not start on 127.0.0.1:$PG_PORT (log: $DIR/postgres.log)"
  head -1 "$data/postmaster.pid" > "$DIR/postgres.pid"
  echo "$PG_PORT" > "$DIR/postgres.port"
  echo "$data" > "$DIR/postgres.data"
  echo "$PG_BIN" > "$DIR/postgres.bin"
  local db
  for db in mlflow prefect; do
    if [ -z "$("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d postgres -tAc "select 1 from pg_database where datname = '$db'")" ]; then
      "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" "$db" ||
        die "could not create the database $db on 127.0.0.1:$PG_PORT"
    fi
  done
}

pg_stop() {
  running postgres || { rm -f "$DIR/postgres.pid"; return 0; }
  local pid data bin
  pid=$(cat "$DIR/postgres.pid"); data=$(cat "$DIR/postgres.data"); bin=$(cat "$DIR/postgres.bin")
  if ! as_pg "$bin/pg_ctl" stop -D "$data" -m fast -w -t 30 >>"$DIR/postgres.log" 2>&1; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  echo "stopped postgres" >&2
  rm -f "$DIR/postgres.pid"
}

# ---- the stack ----------------------------------------------------------------------------------

services() {  # NAME=PORT for each server of the stack with this backend
  echo "s3=$S3_PORT" "mlflow=$MLFLOW_PORT" "prefect=$PREFECT_PORT"
  if [ "$1" = postgres ]; then echo "postgres=$PG_PORT"; fi
}

start() {
  local backend=${CHARLM_STACK_BACKEND:-sqlite} name
  case "${1:-}" in
    --postgres) backend=postgres ;;
    "") ;;
    *) echo "usage: $0 start [--postgres]" >&2; exit 2 ;;
  esac
  for name in mlflow prefect; do
    if running "$name" && [ "$(cat "$DIR/backend" 2>/dev/null || echo sqlite)" != "$backend" ]; then
      die "$name of the stack in $DIR is running on $(cat "$DIR/backend" 2>/dev/null || echo sqlite), not $backend: run '$0 stop' first to switch"
    fi
  done
  if [ "$backend" = postgres ]; then pg_check; fi
  # every port free or served by this stack, before anything starts
  # shellcheck disable=SC2046
  "${PORTS[@]}" check "$DIR" $(services "$backend") || exit 1  # one line per port, naming its pid

  eval "$(env_lines)"
  local mlflow_db="sqlite:///$DIR/mlflow.db" prefect_db=""
  if [ "$backend" = postgres ]; then
    pg_start
    mlflow_db="postgresql://$PG_ROLE@127.0.0.1:$PG_PORT/mlflow"
    prefect_db="postgresql+asyncpg://$PG_ROLE@127.0.0.1:$PG_PORT/prefect"
  fi
  start_one s3 "$S3_PORT" "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  wait_http "http://127.0.0.1:$S3_PORT/" s3
  "$BIN/python" - "$BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[1])
PY
  if [ "$backend" = sqlite ] && ! running mlflow; then
    # created and migrated under charlm's lock, never left half-migrated (docs/mlflow.md)
    "$BIN/python" -m charlm.tracking prepare-sqlite "$mlflow_db" mlflow-artifacts:/
  fi
  running mlflow || running prefect || echo "$backend" > "$DIR/backend"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_one mlflow "$MLFLOW_PORT" "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1 --backend-store-uri "$mlflow_db" --artifacts-destination "s3://$BUCKET/mlflow"
  if [ -n "$prefect_db" ]; then export PREFECT_API_DATABASE_CONNECTION_URL=$prefect_db; fi
  PREFECT_HOME="$DIR/prefect" start_one prefect "$PREFECT_PORT" "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-ui
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" prefect
  # the answers came from this stack's servers, not from others that took a port meanwhile
  # shellcheck disable=SC2046
  "${PORTS[@]}" check "$DIR" $(services "$backend") || die "a port was taken while the stack started: run '$0 stop'"
  echo "# charlm local stack is up (state in $DIR; MLflow and Prefect on $backend$([ "$backend" = postgres ] && echo " at 127.0.0.1:$PG_PORT")). Use it with:" >&2
  env_lines
}

stop() {
  for name in prefect mlflow s3; do
    if running "$name"; then
      pid=$(cat "$DIR/$name.pid")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "stopped $name" >&2
    fi
    rm -f "$DIR/$name.pid"
  done
  pg_stop
}

status() {
  local backend
  backend=$(cat "$DIR/backend" 2>/dev/null || echo sqlite)
  if running postgres; then backend=postgres; fi
  # shellcheck disable=SC2046
  "${PORTS[@]}" status "$DIR" $(services "$backend")
  if [ "$backend" = postgres ]; then
    echo "databases: MLflow postgresql://$PG_ROLE@127.0.0.1:$(cat "$DIR/postgres.port" 2>/dev/null || echo "$PG_PORT")/mlflow, Prefect .../prefect (data in $(cat "$DIR/postgres.data" 2>/dev/null || echo "$DIR/postgres"))"
  else
    echo "databases: sqlite in $DIR (mlflow.db, prefect/)"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  env) env_lines ;;
  status) status ;;
  *) echo "usage: $0 start [--postgres]|stop|env|status" >&2; exit 2 ;;
esac
