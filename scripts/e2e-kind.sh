#!/usr/bin/env bash
# End-to-end test of streamops on a kind cluster (`make e2e`).
#
# Needs: the cluster (`make kind-up`), the images loaded (`make images kind-load`), the operator and
# the dev stack deployed (`make deploy`). In a fresh temporary namespace it then
#   1. applies the four examples (manifests/examples/) and waits for every StreamConsumer to be Ready;
#   2. produces events for each handler with a Job that runs the worker image's `produce`;
#   3. checks that PostgreSQL got the rows and the offsets (kubectl exec psql), and that the
#      pipeline-trigger webhook was called;
#   4. scales moving-average to 3 replicas with `kubectl scale` and checks the pods;
#   5. deletes the examples and checks that their Deployments, ConfigMaps and other children are
#      garbage-collected through their owner references.
# Counts are compared with a baseline taken before producing, so the test can run again on the same
# dev stack. It cannot after a restart of the in-memory broker alone (PostgreSQL still holds the
# old offsets): `make dev-reset` restarts the whole dev stack.
# On failure it prints the namespace's objects, events and pod logs, and the operator's logs. The
# namespace is deleted in every case unless E2E_KEEP_NAMESPACE=1.
#
# Environment (defaults in brackets):
#   KUBE_CONTEXT [kind-streamops]          kubectl context; the test never touches another
#   WORKER_IMAGE [ghcr.io/streamops/streamops-worker:<Cargo.toml version>]
#   OPERATOR_NAMESPACE [streamops-system]  OPERATOR_DEPLOYMENT [streamops-operator]
#   DEV_NAMESPACE [streamops-dev]          E2E_TIMEOUT [300] seconds per wait
#   E2E_EVENTS [200] events per handler    E2E_KEEP_NAMESPACE [0]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
KUBE_CONTEXT=${KUBE_CONTEXT:-kind-streamops}
WORKER_IMAGE=${WORKER_IMAGE:-ghcr.io/streamops/streamops-worker:$VERSION}
OPERATOR_NAMESPACE=${OPERATOR_NAMESPACE:-streamops-system}
OPERATOR_DEPLOYMENT=${OPERATOR_DEPLOYMENT:-streamops-operator}
DEV_NAMESPACE=${DEV_NAMESPACE:-streamops-dev}
E2E_TIMEOUT=${E2E_TIMEOUT:-300}
E2E_EVENTS=${E2E_EVENTS:-200}
E2E_KEEP_NAMESPACE=${E2E_KEEP_NAMESPACE:-0}
BOOTSTRAP="kafka.$DEV_NAMESPACE:9092"
CONSUMERS=(moving-average sensor fraud pipeline-trigger)

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$KUBE_CONTEXT" "$@"; }

# Runs SQL in the dev stack's PostgreSQL and prints the single value it returns.
psql_value() {
  k -n "$DEV_NAMESPACE" exec deploy/postgres -c postgres -- \
    psql -U streamops -d streamops -v ON_ERROR_STOP=1 -tAc "$1"
}

# Rows of a table, 0 if the table does not exist yet.
table_rows() {
  psql_value "SELECT CASE WHEN to_regclass('public.$1') IS NULL THEN 0 ELSE (SELECT count(*) FROM public.$1) END"
}

# Sum of the next offsets a consumer group stored in PostgreSQL (the worker commits them in the
# same transaction as the results, so this counts every message applied or rejected).
group_offsets() {
  psql_value "SELECT CASE WHEN to_regclass('public.streamops_offsets') IS NULL THEN 0 ELSE (SELECT COALESCE(SUM(next_offset), 0) FROM public.streamops_offsets WHERE consumer_group = '$1') END"
}

webhook_calls() {
  k -n "$DEV_NAMESPACE" exec deploy/webhook-sink -c sink -- python3 -c \
    'import json, urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:8080/requests"))["count"])'
}

# Polls a command until its output is an integer >= the wanted value.
wait_at_least() {
  local what=$1 want=$2; shift 2
  local deadline=$((SECONDS + E2E_TIMEOUT)) got=""
  while ((SECONDS < deadline)); do
    got=$("$@" 2>/dev/null || true)
    if [[ $got =~ ^[0-9]+$ ]] && ((got >= want)); then
      echo "    $what: $got (wanted >= $want)"
      return 0
    fi
    sleep 3
  done
  die "$what: got '${got}', wanted >= $want within ${E2E_TIMEOUT}s"
}

# Polls until a command succeeds.
wait_until() {
  local what=$1; shift
  local deadline=$((SECONDS + E2E_TIMEOUT))
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then
      echo "    $what"
      return 0
    fi
    sleep 3
  done
  "$@" || true
  die "not within ${E2E_TIMEOUT}s: $what"
}

# Waits for a Job to complete; fails fast when it has failed.
wait_job() {
  local ns=$1 job=$2 deadline=$((SECONDS + E2E_TIMEOUT)) state
  while ((SECONDS < deadline)); do
    state=$(k -n "$ns" get job "$job" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
    case " $state " in
      *" Complete "*) return 0 ;;
      *" Failed "*)
        k -n "$ns" logs "job/$job" --all-containers --tail=50 >&2 || true
        die "job $ns/$job failed"
        ;;
    esac
    sleep 2
  done
  die "job $ns/$job did not complete within ${E2E_TIMEOUT}s"
}

dump_state() {
  local ns=$1
  printf '\n==> e2e failed: state of namespace %s\n' "$ns" >&2
  k -n "$ns" get streamconsumers,deployments,replicasets,pods,configmaps,services,jobs,poddisruptionbudgets -o wide >&2 || true
  k -n "$ns" describe streamconsumers >&2 || true
  k -n "$ns" get events --sort-by=.lastTimestamp >&2 || true
  local pod
  for pod in $(k -n "$ns" get pods -o name 2>/dev/null); do
    printf '\n--- logs of %s\n' "$pod" >&2
    k -n "$ns" logs "$pod" --all-containers --tail=200 >&2 || true
    k -n "$ns" logs "$pod" --all-containers --previous --tail=50 >/dev/null 2>&1 &&
      k -n "$ns" logs "$pod" --all-containers --previous --tail=50 >&2
  done
  printf '\n--- operator (%s/%s)\n' "$OPERATOR_NAMESPACE" "$OPERATOR_DEPLOYMENT" >&2
  k -n "$OPERATOR_NAMESPACE" get pods -o wide >&2 || true
  k -n "$OPERATOR_NAMESPACE" logs "deploy/$OPERATOR_DEPLOYMENT" --tail=300 >&2 || true
  printf '\n--- dev stack (%s)\n' "$DEV_NAMESPACE" >&2
  k -n "$DEV_NAMESPACE" get pods,jobs -o wide >&2 || true
}

# with_temp_ns FUNC: creates a fresh namespace, runs FUNC NAMESPACE, and on exit dumps the state
# when FUNC failed, then deletes the namespace (unless E2E_KEEP_NAMESPACE=1).
with_temp_ns() {
  local fn=$1
  TEMP_NS="streamops-e2e-$(date +%s)-$RANDOM"
  k create namespace "$TEMP_NS" >/dev/null
  k label namespace "$TEMP_NS" app.kubernetes.io/part-of=streamops-e2e >/dev/null
  trap 'cleanup_temp_ns $?' EXIT
  log "namespace $TEMP_NS"
  "$fn" "$TEMP_NS"
}

cleanup_temp_ns() {
  local rc=$1
  trap - EXIT
  if ((rc != 0)); then
    dump_state "$TEMP_NS"
  fi
  if [[ $E2E_KEEP_NAMESPACE == 1 ]]; then
    echo "e2e: keeping namespace $TEMP_NS (E2E_KEEP_NAMESPACE=1)"
  else
    # Without waiting: a StreamConsumer's finalizer needs a running operator, and a broken one must
    # not hang the test.
    k delete namespace "$TEMP_NS" --wait=false >/dev/null 2>&1 || true
  fi
  if ((rc == 0)); then
    echo "e2e: PASSED"
  fi
  exit "$rc"
}

preflight() {
  command -v kubectl >/dev/null || die "kubectl is not installed"
  k version >/dev/null 2>&1 || die "cannot reach the cluster of context $KUBE_CONTEXT (make kind-up)"
  k get crd streamconsumers.streamops.dev >/dev/null 2>&1 || die "the StreamConsumer CRD is not installed (make deploy)"
  log "operator and dev stack"
  k -n "$OPERATOR_NAMESPACE" rollout status "deploy/$OPERATOR_DEPLOYMENT" --timeout="${E2E_TIMEOUT}s" ||
    die "the operator is not available (make deploy)"
  local d
  for d in kafka postgres redis scorer webhook-sink; do
    k -n "$DEV_NAMESPACE" rollout status "deploy/$d" --timeout="${E2E_TIMEOUT}s" ||
      die "dev stack deployment $d is not available (make deploy)"
  done
  wait_job "$DEV_NAMESPACE" create-topics
}

# produce NS NAME KIND TOPIC: starts a Job that runs `streamops-worker produce` (wait_job waits).
produce() {
  local ns=$1 name=$2 kind=$3 topic=$4
  k -n "$ns" create job "produce-$name" --image="$WORKER_IMAGE" -- \
    /usr/local/bin/streamops-worker produce --bootstrap-servers "$BOOTSTRAP" --topic "$topic" \
    --kind "$kind" --count "$E2E_EVENTS" >/dev/null
}

e2e() {
  local ns=$1 c

  log "apply manifests/examples/"
  k -n "$ns" apply -f "$ROOT/manifests/examples/"
  local refs=()
  for c in "${CONSUMERS[@]}"; do refs+=("streamconsumer/$c"); done
  k -n "$ns" wait --for=condition=Ready "${refs[@]}" --timeout="${E2E_TIMEOUT}s"
  k -n "$ns" get streamconsumers

  log "baseline"
  # Indexed like CONSUMERS (no associative arrays: macOS ships bash 3.2).
  local offsets_before=() i
  for i in "${!CONSUMERS[@]}"; do
    offsets_before[i]=$(group_offsets "${CONSUMERS[i]}-consumer")
  done
  local ma_before sensor_before tx_before pred_before hooks_before
  ma_before=$(table_rows moving_averages)
  sensor_before=$(table_rows sensor_readings)
  tx_before=$(table_rows transactions)
  pred_before=$(table_rows predictions)
  hooks_before=$(webhook_calls)
  echo "    moving_averages=$ma_before sensor_readings=$sensor_before transactions=$tx_before predictions=$pred_before webhook calls=$hooks_before"

  log "produce $E2E_EVENTS events per handler"
  produce "$ns" moving-average moving-average price-events
  produce "$ns" sensor sensor machine.sensor.readings
  produce "$ns" fraud fraud transactions
  produce "$ns" pipeline-trigger pipeline-trigger pipeline-events
  for c in "${CONSUMERS[@]}"; do wait_job "$ns" "produce-$c"; done

  log "results in PostgreSQL and the webhook sink"
  for i in "${!CONSUMERS[@]}"; do
    c=${CONSUMERS[i]}
    wait_at_least "offsets of group $c-consumer" $((offsets_before[i] + E2E_EVENTS)) group_offsets "$c-consumer"
  done
  wait_at_least "moving_averages rows" $((ma_before + 1)) table_rows moving_averages
  wait_at_least "sensor_readings rows" $((sensor_before + 1)) table_rows sensor_readings
  wait_at_least "transactions rows" $((tx_before + 1)) table_rows transactions
  wait_at_least "predictions rows" $((pred_before + 1)) table_rows predictions
  wait_at_least "pipeline-trigger webhook calls" $((hooks_before + 1)) webhook_calls

  log "kubectl scale streamconsumer/moving-average --replicas=3"
  k -n "$ns" scale streamconsumer/moving-average --replicas=3
  k -n "$ns" wait --for=jsonpath='{.status.readyReplicas}'=3 streamconsumer/moving-average --timeout="${E2E_TIMEOUT}s"
  local selector ready
  selector=$(k -n "$ns" get streamconsumer/moving-average -o jsonpath='{.status.selector}')
  [[ -n $selector ]] || die "status.selector of moving-average is empty"
  ready=$(k -n "$ns" get pods -l "$selector" \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -c ' True$' || true)
  ((ready == 3)) || die "expected 3 ready moving-average pods (selector $selector), found $ready"
  k -n "$ns" get pods -l "$selector" -o wide

  log "delete the examples; owner references clean up their children"
  local uids
  uids=$(k -n "$ns" get streamconsumers -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}')
  [[ $(wc -l <<<"$uids") -eq ${#CONSUMERS[@]} ]] || die "expected ${#CONSUMERS[@]} StreamConsumers, found: $uids"
  k -n "$ns" delete -f "$ROOT/manifests/examples/" --wait=true --timeout="${E2E_TIMEOUT}s"
  wait_until "no object owned by the deleted StreamConsumers is left" no_children_of "$ns" "$uids"
  local left
  left=$(k -n "$ns" get deployments,configmaps -l app.kubernetes.io/managed-by=streamops-operator -o name)
  [[ -z $left ]] || die "operator-managed objects remain: $left"
  wait_until "the worker pods are gone" no_worker_pods "$ns"
}

# Succeeds when no object in the namespace has an owner reference to one of the UIDs; prints the
# ones that do otherwise.
no_children_of() {
  local ns=$1 uids=$2 owned
  # shellcheck disable=SC2016 # a Go template, not a shell expansion
  owned=$(k -n "$ns" get deployments,replicasets,configmaps,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets \
    -o go-template='{{range .items}}{{$o := .}}{{range .metadata.ownerReferences}}{{.uid}} {{$o.kind}}/{{$o.metadata.name}}{{"\n"}}{{end}}{{end}}' |
    grep -F -f <(printf '%s\n' "$uids") || true)
  [[ -z $owned ]] || { echo "$owned"; return 1; }
}

no_worker_pods() {
  [[ -z $(k -n "$1" get pods -l app.kubernetes.io/managed-by=streamops-operator -o name) ]]
}

preflight
with_temp_ns e2e
