#!/usr/bin/env bash
# The user's path without Docker (issue 16): the local control plane (scripts/cluster-up.sh), the
# test-only local node (localnode/, runs the pods bound to it as processes), and the chart installed
# by helm, with the operator running as a pod under its in-cluster ServiceAccount token.
# Test tooling, not product.
#
#   scripts/local.sh node-up     build the bind shim and the image map, start streamops-localnode
#   scripts/local.sh deploy      cluster-up, node-up, helm upgrade --install, the dev pods (scorer,
#                                webhook sink, topics); leaves everything running (make deploy-local)
#   scripts/local.sh node-down   stop the node (it stops its pods' processes first)
#   scripts/local.sh down        node-down, then cluster-down (make local-down)
#   scripts/local.sh env         print the environment for kubectl/helm against the local cluster
#
# Addresses for StreamConsumer specs (the kind names of manifests/dev resolve on the node too):
#   Kafka       kafka.streamops-dev:9092     or 127.0.0.1:9092   (the dev stack's broker)
#   PostgreSQL  postgres.streamops-dev:5432  or 127.0.0.1:5432   (role/database `streamops`)
#   Redis       redis.streamops-dev:6379     or 127.0.0.1:6379
#   scorer      scorer.streamops-dev:8080        (a pod on the node, Service name)
#   webhook     webhook-sink.streamops-dev:8080  (a pod on the node, Service name)
#
# Environment: the CLUSTER_* ports of cluster-up.sh; LOCALNODE_NAME [streamops-local];
# LOCALNODE_BIN_DIR [${CARGO_TARGET_DIR:-target}/debug]; LOCALNODE_IMAGE_MAP [generated];
# LOCALNODE_POD_IP_PREFIX [127.1]; HELM_RELEASE [streamops]; HELM_NAMESPACE [streamops-system];
# LOCAL_LAG_INTERVAL [10] (chart lag.interval); LOCAL_WAIT [300] seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../versions.env
source "$ROOT/versions.env"
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
DIR="$ROOT/.dev/localnode"
KUBECONFIG_FILE="$ROOT/.dev/cluster/kubeconfig"
NODE_NAME=${LOCALNODE_NAME:-streamops-local}
BIN_DIR=${LOCALNODE_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
POD_IP_PREFIX=${LOCALNODE_POD_IP_PREFIX:-127.1}
HELM_RELEASE=${HELM_RELEASE:-streamops}
HELM_NAMESPACE=${HELM_NAMESPACE:-streamops-system}
DEV_NAMESPACE=streamops-dev
LAG_INTERVAL=${LOCAL_LAG_INTERVAL:-10}
WAIT=${LOCAL_WAIT:-300}

log() { printf 'local: %s\n' "$*" >&2; }
die() { printf 'local: FAILED: %s\n' "$*" >&2; exit 1; }

tools() {
  eval "$(bash "$ROOT/scripts/cluster-build.sh" --print)"
  export KUBECONFIG="$KUBECONFIG_FILE"
  PATH="$(dirname "$KUBECTL"):$(dirname "$HELM"):$PATH"
  export PATH
}

node_alive() {
  local pid
  [[ -f $DIR/localnode.pid ]] || return 1
  pid=$(cat "$DIR/localnode.pid")
  [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *streamops-localnode* ]]
}

node_up() {
  tools
  mkdir -p "$DIR"
  [[ -x $BIN_DIR/streamops-localnode ]] || die "$BIN_DIR/streamops-localnode is missing (cargo build --workspace --bins)"
  if [[ ! -f $DIR/bindshim.so || $ROOT/localnode/shim/bindshim.c -nt $DIR/bindshim.so ]]; then
    cc -shared -fPIC -O2 -Wall -o "$DIR/bindshim.so" "$ROOT/localnode/shim/bindshim.c" -ldl ||
      die "building the bind shim (needs a C compiler)"
  fi
  local map=${LOCALNODE_IMAGE_MAP:-$DIR/images.map}
  if [[ -z ${LOCALNODE_IMAGE_MAP:-} ]]; then
    cat >"$map" <<EOF
# Written by scripts/local.sh: chart image -> locally built binary [entrypoint in the image]
ghcr.io/streamops/streamops-worker:* $BIN_DIR/streamops-worker /usr/local/bin/streamops-worker
ghcr.io/streamops/streamops-operator:* $BIN_DIR/streamops-operator /usr/local/bin/streamops-operator
EOF
  fi
  if node_alive; then
    log "node $NODE_NAME already running (pid $(cat "$DIR/localnode.pid"))"
  else
    log "starting node $NODE_NAME (log: $DIR/localnode.log)"
    echo "# $(date -u +%FT%TZ) start" >>"$DIR/localnode.log"
    KUBECONFIG="$KUBECONFIG_FILE" setsid "$BIN_DIR/streamops-localnode" \
      --node-name "$NODE_NAME" --state-dir "$DIR" --image-map "$map" \
      --bind-shim "$DIR/bindshim.so" --pod-ip-prefix "$POD_IP_PREFIX" \
      --host-alias kafka.streamops-dev=127.0.0.1 \
      --host-alias postgres.streamops-dev=127.0.0.1 \
      --host-alias redis.streamops-dev=127.0.0.1 \
      >>"$DIR/localnode.log" 2>&1 </dev/null &
    echo $! >"$DIR/localnode.pid"
  fi
  local deadline=$((SECONDS + 60))
  until [[ $(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]; do
    node_alive || { tail -n 30 "$DIR/localnode.log" >&2; die "the node exited during start-up"; }
    ((SECONDS < deadline)) || die "node $NODE_NAME not Ready within 60 s (log: $DIR/localnode.log)"
    sleep 0.5
  done
  log "node $NODE_NAME Ready"
}

node_down() {
  if node_alive; then
    local pid
    pid=$(cat "$DIR/localnode.pid")
    log "stopping node pid $pid (its pods' processes first)"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$DIR/localnode.pid"
  # Processes of pods the node could not stop (it was killed): each pod records its pids.
  local f pid
  for f in "$DIR"/pods/*/*.pid; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    if [[ -r /proc/$pid/environ ]] && tr '\0' '\n' <"/proc/$pid/environ" | grep -q "^LOCALNODE_POD_IP=$POD_IP_PREFIX\."; then
      kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  # A stopped node must not keep taking pods: without a node lifecycle controller its Node object
  # would stay Ready, and the scheduler (or the scale bench's pods) would still bind to it.
  [[ -n "${KUBECTL:-}" ]] || tools >/dev/null 2>&1 || true
  if [[ -x "${KUBECTL:-}" && -f "$KUBECONFIG_FILE" ]] \
    && "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz >/dev/null 2>&1; then
    "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" delete node "$NODE_NAME" --ignore-not-found \
      --wait=false >/dev/null 2>&1 || true
  fi
}

# The dev stack's database for the examples (their Secrets name postgres://streamops@.../streamops).
dev_database() {
  psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -q <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streamops') THEN CREATE ROLE streamops LOGIN; END IF;
END $$;
SQL
  if [[ -z $(psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'streamops'") ]]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE streamops OWNER streamops" >/dev/null
  fi
}

deploy() {
  bash "$ROOT/scripts/cluster-up.sh" >/dev/null
  node_up
  log "PostgreSQL role and database streamops (for the examples)"
  dev_database
  log "CRD and helm upgrade --install $HELM_RELEASE"
  kubectl apply --server-side --force-conflicts -f "$ROOT/charts/streamops/crds/streamconsumer.yaml" >/dev/null
  kubectl wait --for=condition=Established crd/streamconsumers.streamops.dev --timeout=60s >/dev/null
  helm upgrade --install "$HELM_RELEASE" "$ROOT/charts/streamops" \
    --namespace "$HELM_NAMESPACE" --create-namespace \
    --set-string image.tag="$VERSION" --set-string worker.image.tag="$VERSION" \
    --set logFormat=text --set lag.interval="$LAG_INTERVAL" \
    --set-json 'lag.brokers=[{"name":"dev","bootstrapServers":["kafka.streamops-dev:9092","127.0.0.1:9092"]}]' \
    --wait --timeout "${WAIT}s"
  log "dev pods in $DEV_NAMESPACE: scorer, webhook-sink, topics"
  kubectl apply -f "$ROOT/manifests/dev/00-namespace.yaml" -f "$ROOT/manifests/dev/40-scorer.yaml" \
    -f "$ROOT/manifests/dev/50-webhook-sink.yaml" >/dev/null
  kubectl -n "$DEV_NAMESPACE" delete job create-topics --ignore-not-found --wait=true >/dev/null
  kubectl apply -f "$ROOT/manifests/dev/60-topics.yaml" >/dev/null
  local d
  for d in scorer webhook-sink; do
    kubectl -n "$DEV_NAMESPACE" rollout status "deploy/$d" --timeout="${WAIT}s"
  done
  kubectl -n "$DEV_NAMESPACE" wait --for=condition=Complete job/create-topics --timeout="${WAIT}s"
  cat <<EOF
local: deployed. The operator runs as a pod on node $NODE_NAME:
  source $ROOT/.dev/cluster/env
  kubectl -n $HELM_NAMESPACE get pods -o wide
  kubectl apply -f manifests/examples/moving-average.yaml
Pod logs: $DIR/pods/<namespace>_<pod>/<container>.log   Stop: make local-down
EOF
}

case "${1:-}" in
  node-up) node_up ;;
  node-down) node_down ;;
  deploy) deploy ;;
  down)
    node_down
    bash "$ROOT/scripts/cluster-down.sh"
    ;;
  env)
    tools
    echo "export KUBECONFIG=$KUBECONFIG_FILE PATH=$(dirname "$KUBECTL"):$(dirname "$HELM"):\$PATH"
    ;;
  *) die "usage: $0 node-up|node-down|deploy|down|env" ;;
esac
