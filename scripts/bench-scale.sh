#!/usr/bin/env bash
# Scale bench (issue 16): 100, 500 and 1,000 StreamConsumers across 20 namespaces on the local
# control plane (scripts/cluster-up.sh, real kube-scheduler), worker pods made Ready by kwok on one
# fake Node (no worker processes run), two operator replicas (release build, leader election, the
# chart's RBAC through a ServiceAccount token). Prints a table: time to converge, the leader's peak
# RSS, API requests per StreamConsumer, fail-over time. Asserts nothing; the targets are printed.
#
#   scripts/bench-scale.sh                         (make bench-scale; part of make bench)
#   BENCH_SCALE_SIZES=100,500 scripts/bench-scale.sh
#   BENCH_SCALE_TIMEOUT=900 (seconds to wait for convergence per size; 1,000 took over 600 s)
#   BENCH_SCALE_FLOOR=0 (skip the control-plane floor: N bare Deployments made Ready with no
#   operator, measured before each size; the table's converge/floor is the operator's ratio)
#
# Needs the dev stack's Kafka on 127.0.0.1:9092 (make dev-up): the StreamConsumers point at it and
# the operator reads their lag (every BENCH_SCALE_LAG_INTERVAL seconds, default 30 as in
# production). Control-plane ports: the CLUSTER_*_PORT variables of cluster-up.sh. A control plane
# this script started is stopped at the end; one that was already running is left running (its
# bench objects removed). Do not run it beside `make test-cluster` on the same control plane: the
# fake node would take the tests' pods.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=../versions.env
source "$ROOT/versions.env"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"

SIZES="${BENCH_SCALE_SIZES:-100,500,1000}"
BROKER="${BENCH_SCALE_BROKER:-127.0.0.1:9092}"
WORK="$ROOT/.dev/bench-scale"
DIR="$ROOT/.dev/cluster"
SYSTEM_NS=streamops-scale
RELEASE=streamops-scale
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"

mkdir -p "$WORK"
say() { echo "bench-scale: $*" >&2; }

eval "$(bash scripts/cluster-build.sh --print)"
was_running=false
if [[ -f "$DIR/kubeconfig" && -x "$KUBECTL" ]] && "$KUBECTL" --kubeconfig "$DIR/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
  was_running=true
fi

bash scripts/cluster-build.sh kwok >&2
# The worker binary only creates the topic (make bench has built it for scripts/bench.sh already);
# BENCH_SCALE_WORKER_BIN names another build of it.
WORKER_BIN="${BENCH_SCALE_WORKER_BIN:-$TARGET/release/streamops-worker}"
# BENCH_SCALE_OPERATOR_BIN names another build of the operator (an A/B comparison); then the
# operator is not built here (nor the worker when BENCH_SCALE_WORKER_BIN is given).
OPERATOR_BIN="${BENCH_SCALE_OPERATOR_BIN:-$TARGET/release/streamops-operator}"
packages=()
[[ -n "${BENCH_SCALE_OPERATOR_BIN:-}" ]] || packages+=(-p streamops-operator)
[[ -n "${BENCH_SCALE_WORKER_BIN:-}" ]] || packages+=(-p streamops-worker)
if ((${#packages[@]})); then
  say "building (release): ${packages[*]}"
  cargo build -q --release "${packages[@]}" --bins
fi

bash scripts/cluster-up.sh >&2
cleanup() {
  if [[ "$was_running" == false ]]; then
    bash scripts/cluster-down.sh >&2 || true
  else
    "$KUBECTL" --kubeconfig "$DIR/kubeconfig" delete namespace "$SYSTEM_NS" --wait=false >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

kubectl_admin() { "$KUBECTL" --kubeconfig "$DIR/kubeconfig" "$@"; }
kubectl_admin apply -f crds/ >&2
kubectl_admin wait --for=condition=Established crd/streamconsumers.streamops.dev --timeout=60s >&2
# The operator's ServiceAccount and RBAC from the chart, as its own release (its own Lease).
HELM_HOME="$WORK/helm"
KUBECONFIG="$DIR/kubeconfig" HELM_CACHE_HOME="$HELM_HOME/cache" HELM_CONFIG_HOME="$HELM_HOME/config" \
  HELM_DATA_HOME="$HELM_HOME/data" "$HELM" upgrade --install "$RELEASE" charts/streamops \
  --namespace "$SYSTEM_NS" --create-namespace --set leaderElection.force=true --set replicaCount=0 >&2

# The topic the StreamConsumers read (their lag is read from it).
"$WORKER_BIN" topic create streamops-scale-bench --partitions 1 \
  --bootstrap-servers "$BROKER" >&2

server="$(kubectl_admin config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
python3 -B scripts/bench_scale.py \
  --sizes "$SIZES" \
  --server "$server" \
  --pki "$DIR/pki" \
  --kubeconfig "$DIR/kubeconfig" \
  --kubectl "$KUBECTL" \
  --kwok "$KWOK" \
  --kwok-stages "$KWOK_STAGES" \
  --operator-bin "$OPERATOR_BIN" \
  --work "$WORK" \
  --system-ns "$SYSTEM_NS" \
  --service-account "$RELEASE-operator" \
  --lease "$RELEASE-operator" \
  --brokers "$BROKER" \
  --lag-interval "${BENCH_SCALE_LAG_INTERVAL:-30}" \
  --timeout "${BENCH_SCALE_TIMEOUT:-900}" \
  $([[ "${BENCH_SCALE_FLOOR:-1}" == 0 ]] && echo --no-floor)
