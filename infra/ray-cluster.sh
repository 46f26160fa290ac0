#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, on 127.0.0.1 only: a head (GCS, dashboard with the
# job API, Ray Client server) and N worker nodes that join it with `ray start --address`, each with
# its own CPU count, ports and temp dir. Stopped by process group, never by `ray stop` (which stops
# every Ray on the machine, other users' and tests' too).
#
#   infra/ray-cluster.sh start [N]    # head + N worker nodes (default 1); waits until all are alive
#   infra/ray-cluster.sh env          # eval "$(infra/ray-cluster.sh env)": RAY_ADDRESS and friends
#   infra/ray-cluster.sh status       # each node's process group, then the cluster's live nodes
#   infra/ray-cluster.sh stop         # SIGTERM each node's process group, SIGKILL after 10 s
#
# Settings (environment): CHARLM_RAY_DIR (state: pids, logs, temp dirs; default ~/.charlm/ray,
# keep it short: Ray's socket paths live below it), CHARLM_RAY_PORT (GCS, 6379),
# CHARLM_RAY_DASHBOARD_PORT (8265), CHARLM_RAY_CLIENT_PORT (10001), CHARLM_RAY_PORT_BASE (20000:
# node i uses BASE+100*i .. BASE+100*i+99 for its raylet, object manager, agents and workers, all
# outside Ray's default worker ports 10002-19999), CHARLM_RAY_HEAD_CPUS (1), CHARLM_RAY_NODE_CPUS
# (1), CHARLM_RAY_OBJECT_STORE_MB (256 per node).
#
# Loopback: each node is started through `python -m charlm.distributed.node start`, which is
# `ray start` in Ray's local-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), where every process of
# the node binds 127.0.0.1, with Ray's refusal of worker nodes in that mode lifted. charlm's drivers
# set that mode by themselves when RAY_ADDRESS is on loopback; Ray's own CLI needs it in the
# environment (`env` prints it).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CHARLM_BIN:-$PWD/.venv/bin}
DIR=${CHARLM_RAY_DIR:-$HOME/.charlm/ray}
PORT=${CHARLM_RAY_PORT:-6379}
DASHBOARD_PORT=${CHARLM_RAY_DASHBOARD_PORT:-8265}
CLIENT_PORT=${CHARLM_RAY_CLIENT_PORT:-10001}
PORT_BASE=${CHARLM_RAY_PORT_BASE:-20000}
HEAD_CPUS=${CHARLM_RAY_HEAD_CPUS:-1}
NODE_CPUS=${CHARLM_RAY_NODE_CPUS:-1}
OBJECT_STORE_MB=${CHARLM_RAY_OBJECT_STORE_MB:-256}
ADDRESS=127.0.0.1:$PORT
mkdir -p "$DIR"

env_lines() {
  cat <<EOV
export RAY_ADDRESS=$ADDRESS
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
EOV
}

node_env() {  # the environment every node (and so every Ray worker process) starts with
  export PATH="$BIN:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
  unset RAY_ADDRESS
}

alive() {  # a process of the node's group is still running (zombies left unreaped do not count)
  [ -f "$DIR/$1.pgid" ] || return 1
  ps -eo pgid=,stat= | awk -v g="$(cat "$DIR/$1.pgid")" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

node_ports() {  # index -> the per-node port flags
  local b=$((PORT_BASE + 100 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --dashboard-agent-listen-port=$((b + 2))" \
    "--dashboard-agent-grpc-port=$((b + 3)) --metrics-export-port=$((b + 4)) --runtime-env-agent-port=$((b + 5))" \
    "--min-worker-port=$((b + 10)) --max-worker-port=$((b + 99))"
}

start_node() {  # name, index, ray start args...
  local name=$1 index=$2; shift 2
  if alive "$name"; then return 0; fi
  rm -rf "${DIR:?}/$name"
  mkdir -p "$DIR/$name"
  # setsid: the node's processes (GCS, raylet, agents, workers) share one new process group, the
  # launcher's pid, which stop (and a test killing one node) signal as a whole.
  # shellcheck disable=SC2046
  setsid "$BIN/python" -m charlm.distributed.node start --temp-dir="$DIR/$name" \
    --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) $(node_ports "$index") "$@" \
    >"$DIR/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$DIR/$name.pgid"
  if ! wait "$pid"; then
    echo "ray-cluster: $name did not start (log: $DIR/$name.log):" >&2
    grep -E "Error|error|Exception" "$DIR/$name.log" | tail -3 >&2 || true
    return 1
  fi
}

wait_nodes() {  # expected count
  local n=0
  for _ in $(seq 1 60); do
    n=$("$BIN/python" -m charlm.distributed.node nodes "$ADDRESS" 2>/dev/null | wc -l || true)
    if [ "$n" -ge "$1" ]; then return 0; fi
    sleep 1
  done
  echo "ray-cluster: $n of $1 nodes alive after 60 s (logs in $DIR)" >&2
  return 1
}

start() {
  local workers=${1:-1}
  node_env
  start_node head 0 --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$HEAD_CPUS" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT"
  for i in $(seq 1 "$workers"); do
    start_node "node$i" "$i" --address="$ADDRESS" --num-cpus="$NODE_CPUS"
  done
  echo "$workers" >"$DIR/workers"
  wait_nodes $((workers + 1))
  echo "# Ray cluster up: head + $workers worker node(s) on 127.0.0.1 (state in $DIR). Use it with:" >&2
  env_lines
}

names() {
  echo head
  for i in $(seq 1 "$(cat "$DIR/workers" 2>/dev/null || echo 0)"); do echo "node$i"; done
}

stop() {
  local order
  order=$(names | tac)  # worker nodes first, the head last
  for name in $order; do
    if alive "$name"; then
      pgid=$(cat "$DIR/$name.pgid")
      kill -TERM -- "-$pgid" 2>/dev/null || true
      for _ in $(seq 1 20); do alive "$name" || break; sleep 0.5; done
      kill -KILL -- "-$pgid" 2>/dev/null || true
      echo "stopped $name" >&2
    fi
    rm -f "$DIR/$name.pgid"
  done
}

status() {
  for name in $(names); do
    if alive "$name"; then echo "$name: running (process group $(cat "$DIR/$name.pgid"))"; else echo "$name: stopped"; fi
  done
  "$BIN/python" -m charlm.distributed.node nodes "$ADDRESS"
}

case "${1:-}" in
  start) start "${2:-1}" ;;
  stop) stop ;;
  env) env_lines ;;
  status) status ;;
  *) echo "usage: $0 start [N]|stop|env|status" >&2; exit 2 ;;
esac
