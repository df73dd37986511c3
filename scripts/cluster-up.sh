#!/usr/bin/env bash
# Start a local Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on, certificates
# generated here), kube-controller-manager (garbage collector, Deployment and ReplicaSet
# controllers, namespace and service-account controllers) and kube-scheduler. No kubelet: pods stay
# Pending until a node registers (the test tooling's local node, or kwok for the scale bench). State lives in .dev/cluster/: pki/, etcd/, logs/, *.pid and the admin kubeconfig.
#
# Idempotent: a healthy control plane started earlier is reused; a partial one is stopped (only the
# processes this script started, from their pid files) and started again. The binaries come from
# scripts/cluster-build.sh (built once per version into $STREAMOPS_CACHE).
#
# Ports (override through the environment): CLUSTER_ETCD_PORT (23790), CLUSTER_ETCD_PEER_PORT
# (23800), CLUSTER_APISERVER_PORT (16443), CLUSTER_KCM_PORT (10357), CLUSTER_SCHEDULER_PORT (10359).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../versions.env
source "$ROOT/versions.env"

DIR="$ROOT/.dev/cluster"
PKI="$DIR/pki"
LOGS="$DIR/logs"
KUBECONFIG_FILE="$DIR/kubeconfig"
ETCD_PORT="${CLUSTER_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${CLUSTER_ETCD_PEER_PORT:-23800}"
APISERVER_PORT="${CLUSTER_APISERVER_PORT:-16443}"
KCM_PORT="${CLUSTER_KCM_PORT:-10357}"
SCHEDULER_PORT="${CLUSTER_SCHEDULER_PORT:-10359}"
# A /16: one Service per StreamConsumer, and the scale bench makes 1,000 of them (a /24 ran out).
SERVICE_CIDR="10.0.0.0/16"
START_TIMEOUT="${CLUSTER_START_TIMEOUT:-120}"

mkdir -p "$DIR" "$LOGS"
# One cluster-up at a time (parallel test binaries, a developer and CI).
exec 9>"$DIR/.lock"
flock 9

bash "$ROOT/scripts/cluster-build.sh" >&2
eval "$(bash "$ROOT/scripts/cluster-build.sh" --print)"

fail() { # fail COMPONENT STEP [LOG]
  echo "cluster-up: FAILED: $1: $2${3:+ (log: $3)}" >&2
  if [[ -n "${3:-}" && -f "$3" ]]; then
    echo "---- last lines of $3" >&2
    tail -n 25 "$3" >&2
  fi
  exit 1
}

# alive NAME BINARY: the process recorded in NAME.pid is running and is BINARY.
alive() {
  local pidfile="$DIR/$1.pid" pid exe
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [[ "$exe" == "$2" ]]
}

kubectl_admin() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

usage() {
  cat <<EOF
cluster-up: control plane ready (Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION) at https://127.0.0.1:$APISERVER_PORT
  export KUBECONFIG=$KUBECONFIG_FILE
  export PATH=$(dirname "$KUBECTL"):$(dirname "$HELM"):\$PATH   # kubectl $KUBERNETES_VERSION, helm $HELM_VERSION
  kubectl get namespaces
  (or: source $DIR/env)
Logs: $LOGS/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler}.log. Stop it with: make cluster-down
EOF
}

if alive etcd "$ETCD" && alive kube-apiserver "$KUBE_APISERVER" && alive kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
  && alive kube-scheduler "$KUBE_SCHEDULER" && kubectl_admin get --raw /readyz >/dev/null 2>&1; then
  echo "cluster-up: already running (pids $(cat "$DIR"/etcd.pid) $(cat "$DIR"/kube-apiserver.pid) $(cat "$DIR"/kube-controller-manager.pid) $(cat "$DIR"/kube-scheduler.pid))"
  usage
  exit 0
fi
if ls "$DIR"/*.pid >/dev/null 2>&1; then
  echo "cluster-up: a previous control plane is partly running or unhealthy; stopping what is left of it"
  CLUSTER_DOWN_LOCKED=1 bash "$ROOT/scripts/cluster-down.sh"
fi

for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHEDULER_PORT"; do
  if ss -Htln "sport = :$port" | grep -q .; then
    fail "ports" "127.0.0.1:$port is already in use by another process (set CLUSTER_*_PORT to move)"
  fi
done

# ---- certificates (kept across restarts; regenerated only when missing)
gen_pki() {
  local log="$LOGS/pki.log"
  : >"$log"
  mkdir -p "$PKI"
  (
    set -x
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=streamops-local-ca" \
      -keyout ca.key -out ca.crt
    # kube-apiserver serving certificate.
    cat >apiserver.ext <<EOF
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EOF
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt
    # Client certificates: the admin (system:masters) and the controller manager, which runs each
    # controller under its own service account (--use-service-account-credentials).
    echo "extendedKeyUsage=clientAuth" >client.ext
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=streamops-admin" -keyout admin.key -out admin.csr
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out admin.crt
    openssl req -newkey rsa:2048 -nodes -subj "/CN=system:kube-controller-manager" -keyout kcm.key -out kcm.csr
    openssl x509 -req -in kcm.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out kcm.crt
    # Service-account token signing key pair.
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    rm -f ./*.csr
    chmod 600 ./*.key
  ) >>"$log" 2>&1 || fail "certificates" "openssl" "$log"
}
[[ -f "$PKI/sa.pub" && -f "$PKI/kcm.crt" && -f "$PKI/admin.crt" ]] || gen_pki
# The scheduler's client certificate (system:kube-scheduler is bound by the bootstrap RBAC policy);
# made on its own so that a pki/ from before the scheduler is completed rather than replaced.
if [[ ! -f "$PKI/scheduler.crt" ]]; then
  (
    set -x
    cd "$PKI"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=system:kube-scheduler" -keyout scheduler.key -out scheduler.csr
    openssl x509 -req -in scheduler.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out scheduler.crt
    rm -f scheduler.csr
    chmod 600 scheduler.key
  ) >>"$LOGS/pki.log" 2>&1 || fail "certificates" "openssl (scheduler)" "$LOGS/pki.log"
fi

# kubeconfig USER FILE: a kubeconfig with an embedded client certificate.
write_kubeconfig() {
  local user="$1" file="$2"
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: streamops-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$user.crt")
    client-key-data: $(base64 -w0 "$PKI/$user.key")
contexts:
- name: streamops-local
  context:
    cluster: streamops-local
    user: $user
    namespace: default
current-context: streamops-local
EOF
  chmod 600 "$file.tmp"
  mv "$file.tmp" "$file"
}
write_kubeconfig admin "$KUBECONFIG_FILE"
write_kubeconfig kcm "$DIR/kcm.kubeconfig"
write_kubeconfig scheduler "$DIR/scheduler.kubeconfig"
cat >"$DIR/env" <<EOF
export KUBECONFIG=$KUBECONFIG_FILE
export PATH=$(dirname "$KUBECTL"):$(dirname "$HELM"):\$PATH
EOF

# start NAME BINARY ARGS...: start in its own session, record the pid, log to logs/NAME.log.
start() {
  local name="$1" bin="$2"
  shift 2
  local log="$LOGS/$name.log"
  echo "# $(date -u +%FT%TZ) $bin $*" >>"$log"
  setsid "$bin" "$@" >>"$log" 2>&1 </dev/null 9>&- &
  echo $! >"$DIR/$name.pid"
}

# wait_for NAME BINARY CHECK...: until CHECK succeeds, or the process died, or the timeout.
wait_for() {
  local name="$1" bin="$2"
  shift 2
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    alive "$name" "$bin" || fail "$name" "the process exited during start-up" "$LOGS/$name.log"
    ((SECONDS < deadline)) || fail "$name" "not ready after ${START_TIMEOUT}s (check: $*)" "$LOGS/$name.log"
    sleep 0.5
  done
}

# ---- etcd
mkdir -p "$DIR/etcd"
start etcd "$ETCD" \
  --name=streamops-local \
  --data-dir="$DIR/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="streamops-local=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync
wait_for etcd "$ETCD" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

# ---- kube-apiserver
start kube-apiserver "$KUBE_APISERVER" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --endpoint-reconciler-type=none \
  --secure-port="$APISERVER_PORT" \
  --cert-dir="$DIR/apiserver" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --authorization-mode=RBAC \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --allow-privileged=true \
  --disable-admission-plugins=ServiceAccount
wait_for kube-apiserver "$KUBE_APISERVER" kubectl_admin get --raw /readyz

# ---- kube-controller-manager
# Client rate limits and worker counts raised above the defaults (20 QPS, burst 30, 5 Deployment
# and 5 ReplicaSet workers), which are sized for a shared production apiserver: here one
# Deployment -> ReplicaSet -> Pod chain per StreamConsumer, and the scale bench makes 1,000 of them
# at once (at 20 QPS the controller manager alone needed minutes). A test-environment setting.
start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
  --kube-api-qps=200 \
  --kube-api-burst=400 \
  --concurrent-deployment-syncs=10 \
  --concurrent-replicaset-syncs=10 \
  --kubeconfig="$DIR/kcm.kubeconfig" \
  --authentication-kubeconfig="$DIR/kcm.kubeconfig" \
  --authorization-kubeconfig="$DIR/kcm.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --cert-dir="$DIR/kcm" \
  --root-ca-file="$PKI/ca.crt" \
  --service-account-private-key-file="$PKI/sa.key" \
  --use-service-account-credentials=true \
  --leader-elect=false \
  --controllers='*'
wait_for kube-controller-manager "$KUBE_CONTROLLER_MANAGER" curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
# The service-account controller creating `default` in `default` proves the controllers run.
wait_for kube-controller-manager "$KUBE_CONTROLLER_MANAGER" kubectl_admin -n default get serviceaccount default

# ---- kube-scheduler
# Client rate limit raised above the default (50 QPS, burst 100) for the scale bench's 1,000 pods
# (a binding and an event each); a test-environment setting.
start kube-scheduler "$KUBE_SCHEDULER" \
  --kube-api-qps=200 \
  --kube-api-burst=400 \
  --kubeconfig="$DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHEDULER_PORT" \
  --leader-elect=false
wait_for kube-scheduler "$KUBE_SCHEDULER" curl -fsSk "https://127.0.0.1:$SCHEDULER_PORT/healthz"

usage
