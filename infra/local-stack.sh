#!/usr/bin/env bash
# A local team stack on 127.0.0.1 only: an S3-protocol server (moto), an MLflow tracking server
# (sqlite backend, artifacts in that S3 store) and a Prefect server. Prints the env vars that
# point charlm at it; the same commands then run against these servers instead of the embedded
# defaults.
#
#   infra/local-stack.sh start     # start all three (idempotent), print the env
#   infra/local-stack.sh env       # print the env again:  eval "$(infra/local-stack.sh env)"
#   infra/local-stack.sh status
#   infra/local-stack.sh stop      # stop all three cleanly (SIGTERM, then SIGKILL after 10 s)
#
# Ports: CHARLM_S3_PORT (9000), CHARLM_MLFLOW_PORT (5001), CHARLM_PREFECT_PORT (4200).
# State (databases, logs, pids): CHARLM_STACK_DIR (default ~/.charlm/stack).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CHARLM_BIN:-$PWD/.venv/bin}
DIR=${CHARLM_STACK_DIR:-$HOME/.charlm/stack}
S3_PORT=${CHARLM_S3_PORT:-9000}
MLFLOW_PORT=${CHARLM_MLFLOW_PORT:-5001}
PREFECT_PORT=${CHARLM_PREFECT_PORT:-4200}
BUCKET=${CHARLM_BUCKET:-charlm}
mkdir -p "$DIR"

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

start_one() {  # name, command...
  local name=$1; shift
  if running "$name"; then return 0; fi
  setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/$name.pid"
}

start() {
  eval "$(env_lines)"
  start_one s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  wait_http "http://127.0.0.1:$S3_PORT/" s3
  "$BIN/python" - "$BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[1])
PY
  # created and migrated under charlm's lock, never left half-migrated (docs/mlflow.md)
  "$BIN/python" -m charlm.tracking prepare-sqlite "sqlite:///$DIR/mlflow.db" mlflow-artifacts:/
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_one mlflow "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1 --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "s3://$BUCKET/mlflow"
  PREFECT_HOME="$DIR/prefect" start_one prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-ui
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" prefect
  echo "# charlm local stack is up (state in $DIR). Use it with:" >&2
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
}

status() {
  for name in s3 mlflow prefect; do
    if running "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) env_lines ;;
  status) status ;;
  *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
