#!/usr/bin/env bash
# Stop the local control plane started by scripts/cluster-up.sh: only the processes recorded in
# .dev/cluster/*.pid, and only while each still is the binary it was started as. Keeps the
# certificates and etcd's data (CLUSTER_DOWN_PURGE=1 removes .dev/cluster entirely).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.dev/cluster"
[[ -d "$DIR" ]] || { echo "cluster-down: nothing to stop (no $DIR)"; exit 0; }
if [[ -z "${CLUSTER_DOWN_LOCKED:-}" ]]; then
  exec 9>"$DIR/.lock"
  flock 9
fi
eval "$(bash "$ROOT/scripts/cluster-build.sh" --print)"

stop() { # stop NAME BINARY
  local pidfile="$DIR/$1.pid" pid exe
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  if [[ "$exe" != "$2" ]]; then
    echo "cluster-down: $1 (pid $pid) is not running"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 100); do
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" == "$2" ]] || break
    sleep 0.1
  done
  if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" == "$2" ]]; then
    echo "cluster-down: $1 (pid $pid) ignored SIGTERM for 10 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "cluster-down: stopped $1 (pid $pid)"
}

stop kube-scheduler "$KUBE_SCHEDULER"
stop kube-controller-manager "$KUBE_CONTROLLER_MANAGER"
stop kube-apiserver "$KUBE_APISERVER"
stop etcd "$ETCD"
if [[ -n "${CLUSTER_DOWN_PURGE:-}" ]]; then
  rm -rf "$DIR"
  echo "cluster-down: removed $DIR"
fi
