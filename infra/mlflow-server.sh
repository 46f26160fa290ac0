#!/usr/bin/env bash
# Start an MLflow tracking server for charlm, bound to loopback, with artifacts in the store.
#
#   infra/mlflow-server.sh                 # sqlite backend, artifacts in $CHARLM_STORE/mlflow-artifacts
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@127.0.0.1:5432/mlflow infra/mlflow-server.sh
#   then, for charlm:  export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT:-5050}
#
# Environment (all optional):
#   MLFLOW_HOST                  bind address (default 127.0.0.1; anything wider needs a proxy with auth)
#   MLFLOW_PORT                  port (default 5050; moto and mlflow both default to 5000)
#   MLFLOW_BACKEND_STORE_URI     sqlite:///... (default sqlite:///$CHARLM_HOME/mlflow-server.db) or
#                                postgresql://user@host:5432/db (password via ~/.pgpass or PGPASSWORD,
#                                never in the URI; needs the postgres extra: psycopg 3, which SQLAlchemy 2.1 opens postgresql:// with)
#   MLFLOW_ARTIFACTS_DESTINATION where the server keeps artifacts (default $CHARLM_STORE/mlflow-artifacts,
#                                e.g. s3://bucket/prefix/mlflow-artifacts; clients upload through the server)
#   MLFLOW_WORKERS               server worker processes (default 1: ~500 MB instead of ~2.5 GB)
#   MLFLOW_BIN                   the mlflow executable (default: mlflow on PATH, else .venv/bin/mlflow)
#   AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: for S3
#                                artifacts, read by the server from its environment only.
# Extra arguments are passed to `mlflow server`.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
charlm_home="${CHARLM_HOME:-$HOME/.charlm}"
store="${CHARLM_STORE:-$charlm_home/store}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5050}"
workers="${MLFLOW_WORKERS:-1}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$charlm_home/mlflow-server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${store%/}/mlflow-artifacts}"

bin="${MLFLOW_BIN:-}"
if [[ -z "$bin" ]]; then
  if command -v mlflow >/dev/null 2>&1; then bin="$(command -v mlflow)"
  elif [[ -x "$here/.venv/bin/mlflow" ]]; then bin="$here/.venv/bin/mlflow"
  else echo "mlflow-server.sh: no mlflow executable (install charlm[pipeline] or set MLFLOW_BIN)" >&2; exit 2
  fi
fi

case "$backend" in
  sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;;
  postgresql://*:*@*|postgres://*:*@*)
    echo "mlflow-server.sh: put the database password in ~/.pgpass or PGPASSWORD, not in MLFLOW_BACKEND_STORE_URI" >&2
    exit 2 ;;
esac
case "$artifacts" in
  *://*) ;;
  *) mkdir -p "$artifacts" ;;
esac

# A new sqlite database is created and migrated under charlm's file lock (in a temporary file,
# renamed into place last), so a server stopped during its first migration, or charlm commands
# starting at the same time, never leave it half-migrated; a half-migrated one is refused in one
# line saying how to recover (docs/mlflow.md).
if [[ "$backend" == sqlite:///* ]]; then
  py="$(dirname "$bin")/python"; [[ -x "$py" ]] || py=python3
  "$py" -m charlm.tracking prepare-sqlite "$backend" mlflow-artifacts:/ ||
    { echo "mlflow-server.sh: the tracking database $backend is not usable (see above)" >&2; exit 2; }
fi

# The job runner (for GenAI features) spawns extra workers; telemetry off; no auth token prompts.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true

exec "$bin" server \
  --host "$host" \
  --port "$port" \
  --workers "$workers" \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  "$@"
