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
#   5. checks exactly-once on moving-average (every price point once, every moving average equal to
#      the one an uninterrupted run computes) across the scale, with more events;
#   6. autoscaling on lag: a backlog raises replicas to the cap, it drains, replicas fall after the
#      scale-down stabilization window;
#   7. a spec change rolls the Deployment, with nothing lost and nothing doubled;
#   8. (local mode) kills a worker process: its pod turns unready until the restarted process is ready;
#   9. deletes the examples and checks that their Deployments, ConfigMaps and other children are
#      garbage-collected through their owner references, and that the consumer group of the one
#      with cleanupPolicy DeleteConsumerGroup is gone.
# Counts are compared with a baseline taken before producing, so the test can run again on the same
# dev stack. It cannot after a restart of the in-memory broker alone (PostgreSQL still holds the
# old offsets): `make dev-reset` restarts the whole dev stack.
# On failure it prints the namespace's objects, events and pod logs, and the operator's logs. The
# namespace is deleted in every case unless E2E_KEEP_NAMESPACE=1.
#
# E2E_MODE=local runs the same steps on the local control plane with the test-only local node
# (make e2e-local, scripts/local.sh): the admin kubeconfig .dev/cluster/kubeconfig instead of a
# context, PostgreSQL and Kafka of the dev stack on 127.0.0.1, worker processes found through the
# node's pid files, and per-run topic, group and database names (the broker and PostgreSQL are
# shared). E2E_SHORT=1 is the short form for CI (fewer events, short stabilization windows).
#
# Environment (defaults in brackets):
#   E2E_MODE [kind]                        kind or local
#   KUBE_CONTEXT [kind-streamops]          kubectl context (kind); the test never touches another
#   WORKER_IMAGE [ghcr.io/streamops/streamops-worker:<Cargo.toml version>]
#   OPERATOR_NAMESPACE [streamops-system]  OPERATOR_DEPLOYMENT [streamops-operator]
#   DEV_NAMESPACE [streamops-dev]          E2E_TIMEOUT [300] seconds per wait
#   E2E_EVENTS [200] events per handler    E2E_KEEP_NAMESPACE [0]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
E2E_MODE=${E2E_MODE:-kind}
E2E_SHORT=${E2E_SHORT:-0}
KUBE_CONTEXT=${KUBE_CONTEXT:-kind-streamops}
WORKER_IMAGE=${WORKER_IMAGE:-ghcr.io/streamops/streamops-worker:$VERSION}
OPERATOR_NAMESPACE=${OPERATOR_NAMESPACE:-streamops-system}
OPERATOR_DEPLOYMENT=${OPERATOR_DEPLOYMENT:-streamops-operator}
DEV_NAMESPACE=${DEV_NAMESPACE:-streamops-dev}
E2E_TIMEOUT=${E2E_TIMEOUT:-300}
if [[ $E2E_SHORT == 1 ]]; then E2E_EVENTS=${E2E_EVENTS:-200}; else E2E_EVENTS=${E2E_EVENTS:-2000}; fi
# The backlog for the autoscaling step, and its scale-down stabilization window.
if [[ $E2E_SHORT == 1 ]]; then E2E_BACKLOG=${E2E_BACKLOG:-20000}; else E2E_BACKLOG=${E2E_BACKLOG:-100000}; fi
if [[ $E2E_SHORT == 1 ]]; then E2E_STABILIZATION=${E2E_STABILIZATION:-15}; else E2E_STABILIZATION=${E2E_STABILIZATION:-60}; fi
E2E_KEEP_NAMESPACE=${E2E_KEEP_NAMESPACE:-0}
BOOTSTRAP="kafka.$DEV_NAMESPACE:9092"
CONSUMERS=(moving-average sensor fraud pipeline-trigger)
# Local mode: names unique to this run (shared broker and PostgreSQL), the dev stack on loopback.
RUN_ID=""
LOCAL_DIR="$ROOT/.dev/localnode"
E2E_DB=streamops
if [[ $E2E_MODE == local ]]; then
  RUN_ID="e2e$(date +%s)$((RANDOM % 1000))"
  E2E_DB="streamops_$RUN_ID"
  LOCAL_BIN_DIR=${LOCALNODE_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
  eval "$(bash "$ROOT/scripts/cluster-build.sh" --print)"
  PATH="$(dirname "$KUBECTL"):$PATH"
fi
SUFFIX=${RUN_ID:+-$RUN_ID}
TOPIC_MA="price-events$SUFFIX"

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }
if [[ $E2E_MODE == local ]]; then
  k() { kubectl --kubeconfig "$ROOT/.dev/cluster/kubeconfig" "$@"; }
else
  k() { kubectl --context "$KUBE_CONTEXT" "$@"; }
fi

# Runs SQL in the dev stack's PostgreSQL and prints the single value it returns.
psql_value() {
  if [[ $E2E_MODE == local ]]; then
    psql -h 127.0.0.1 -U postgres -d "$E2E_DB" -v ON_ERROR_STOP=1 -tAc "$1"
  else
    k -n "$DEV_NAMESPACE" exec deploy/postgres -c postgres -- \
      psql -U streamops -d streamops -v ON_ERROR_STOP=1 -tAc "$1"
  fi
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
  if [[ $E2E_MODE == local ]]; then
    # The sink is a pod on the local node: its address is reachable from the host.
    local ip
    ip=$(k -n "$DEV_NAMESPACE" get pods -l app.kubernetes.io/name=webhook-sink --field-selector=status.phase=Running \
      -o jsonpath='{.items[0].status.podIP}')
    curl -fsS "http://$ip:8080/requests" | python3 -c 'import json, sys; print(json.load(sys.stdin)["count"])'
  else
    k -n "$DEV_NAMESPACE" exec deploy/webhook-sink -c sink -- python3 -c \
      'import json, urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:8080/requests"))["count"])'
  fi
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
  if [[ $E2E_MODE == local ]]; then
    # No kubelet API: the local node keeps each container's output in its pod directory.
    local f
    for f in "$LOCAL_DIR/pods/${ns}"_*/*.log "$LOCAL_DIR/pods/${OPERATOR_NAMESPACE}"_*/*.log; do
      [[ -f $f ]] || continue
      printf '\n--- %s\n' "$f" >&2
      tail -n 100 "$f" >&2
    done
    printf '\n--- local node\n' >&2
    tail -n 60 "$LOCAL_DIR/localnode.log" >&2 || true
    return 0
  fi
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
  if [[ $E2E_MODE == local && $E2E_KEEP_NAMESPACE != 1 ]]; then
    # The per-run database and topics (the consumer groups go with the StreamConsumers).
    (
      sleep 20
      psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$E2E_DB\" WITH (FORCE)" >/dev/null 2>&1
    ) &
  fi
  if ((rc == 0)); then
    echo "e2e: PASSED in ${SECONDS}s (mode $E2E_MODE, short $E2E_SHORT)"
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
  local d deployments=(kafka postgres redis scorer webhook-sink)
  # Local mode: Kafka, PostgreSQL and Redis are the dev stack on the host (make dev-up).
  [[ $E2E_MODE == local ]] && deployments=(scorer webhook-sink)
  for d in "${deployments[@]}"; do
    k -n "$DEV_NAMESPACE" rollout status "deploy/$d" --timeout="${E2E_TIMEOUT}s" ||
      die "dev stack deployment $d is not available (make deploy)"
  done
  wait_job "$DEV_NAMESPACE" create-topics
}

# produce NS NAME KIND TOPIC [COUNT]: starts a Job that runs `streamops-worker produce` (wait_job
# waits). On the local node the image's entrypoint maps to the locally built worker.
produce() {
  local ns=$1 name=$2 kind=$3 topic=$4 count=${5:-$E2E_EVENTS}
  k -n "$ns" delete job "produce-$name" --ignore-not-found --wait=true >/dev/null
  k -n "$ns" create job "produce-$name" --image="$WORKER_IMAGE" -- \
    /usr/local/bin/streamops-worker produce --bootstrap-servers "$BOOTSTRAP" --topic "$topic" \
    --kind "$kind" --count "$count" >/dev/null
}

# The examples as applied: unchanged on kind; in local mode with this run's topics, groups and
# database (the broker and PostgreSQL are shared with other runs).
examples() {
  local f
  for f in "$ROOT"/manifests/examples/*.yaml; do
    echo '---'
    if [[ -n $RUN_ID ]]; then
      sed -E -e "s#(topics: \[\")([^\"]+)(\"\])#\1\2$SUFFIX\3#" \
        -e "s#(groupId: )(.*)#\1\2$SUFFIX#" \
        -e "s#(errorTopic: )([a-z.-]+)-failed#\1\2$SUFFIX-failed#" \
        -e "s#(postgres://[^ ]*/)streamops\$#\1$E2E_DB#" "$f"
    else
      cat "$f"
    fi
  done
}

# Local mode: this run's database and topics (price-events and sensor readings with 3 partitions,
# like manifests/dev/60-topics.yaml).
local_setup() {
  [[ $E2E_MODE == local ]] || return 0
  log "database $E2E_DB and topics *$SUFFIX"
  psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE \"$E2E_DB\" OWNER streamops" >/dev/null
  local t p
  for t in "price-events:3" "machine.sensor.readings:3" "transactions:3" "pipeline-events:1" \
    "price-events-failed:1" "machine.sensor.readings-failed:1" "transactions-failed:1" "pipeline-events-failed:1"; do
    p=${t##*:}
    t=${t%:*}
    [[ $t == *-failed ]] && t="${t%-failed}$SUFFIX-failed" || t="$t$SUFFIX"
    "$LOCAL_BIN_DIR/streamops-worker" topic create "$t" --partitions "$p" --bootstrap-servers 127.0.0.1:9092 >/dev/null
  done
}

group() { echo "$1-consumer$SUFFIX"; }

# Exactly once for moving-average: every message of the topic counted once in the offsets, every
# valid one once in price_points (the rest rejected once), and every moving average equal to the
# one an uninterrupted run over the stored points computes. Prints the mismatches; 0 when it holds.
exactly_once_mismatches() {
  local want=$1
  psql_value "
    WITH pts AS (
      SELECT topic, partition, \"offset\", avg(price) OVER w AS avg, count(*) OVER w AS n
      FROM price_points WHERE topic = '$TOPIC_MA'
      WINDOW w AS (PARTITION BY topic, partition, symbol ORDER BY \"offset\" ROWS BETWEEN 4 PRECEDING AND CURRENT ROW)),
    bad_avg AS (
      SELECT count(*) AS c FROM pts LEFT JOIN moving_averages m USING (topic, partition, \"offset\")
      WHERE (pts.n = 5 AND (m.average IS NULL OR abs(m.average - pts.avg) > 1e-6 * greatest(1, abs(pts.avg))))
         OR (pts.n < 5 AND m.\"offset\" IS NOT NULL)),
    extra_avg AS (
      SELECT count(*) AS c FROM moving_averages m WHERE m.topic = '$TOPIC_MA'
        AND NOT EXISTS (SELECT 1 FROM price_points p WHERE (p.topic, p.partition, p.\"offset\") = (m.topic, m.partition, m.\"offset\"))),
    counted AS (
      SELECT (SELECT count(*) FROM price_points WHERE topic = '$TOPIC_MA')
           + (SELECT count(*) FROM streamops_rejections WHERE topic = '$TOPIC_MA' AND consumer_group = '$(group moving-average)') AS c),
    offs AS (
      SELECT COALESCE(SUM(next_offset), 0) AS c FROM streamops_offsets
      WHERE consumer_group = '$(group moving-average)' AND topic = '$TOPIC_MA')
    SELECT (SELECT c FROM bad_avg) + (SELECT c FROM extra_avg)
         + abs((SELECT c FROM counted) - $want) + abs((SELECT c FROM offs) - $want)"
}

check_exactly_once() {
  local want=$1 bad
  [[ $E2E_MODE == local ]] || { echo "    (kind: exactly-once is checked against the per-run topic in local mode only)"; return 0; }
  wait_at_least "offsets of group $(group moving-average)" "$want" group_offsets "$(group moving-average)"
  bad=$(exactly_once_mismatches "$want")
  [[ $bad == 0 ]] || die "exactly-once does not hold on $TOPIC_MA: $bad mismatches (want $want messages each counted once)"
  echo "    exactly once: $want messages, each applied once; every moving average as an uninterrupted run computes it"
}

# Pods of a StreamConsumer (by its status.selector) that are Ready.
ready_pods() {
  local ns=$1 sc=$2 selector
  selector=$(k -n "$ns" get "streamconsumer/$sc" -o jsonpath='{.status.selector}')
  k -n "$ns" get pods -l "$selector" \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -c ' True$' || true
}

# streamops_assigned_partitions of each worker pod (kind: through the API server's pod proxy).
assigned_partitions() {
  local ns=$1 sc=$2 selector pod n
  selector=$(k -n "$ns" get "streamconsumer/$sc" -o jsonpath='{.status.selector}')
  local ip metrics
  for pod in $(k -n "$ns" get pods -l "$selector" --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'); do
    if [[ $E2E_MODE == local ]]; then
      # The API server refuses to proxy to loopback addresses; the pod address is local here.
      ip=$(k -n "$ns" get "pod/$pod" -o jsonpath='{.status.podIP}')
      metrics=$(curl -fsS "http://$ip:8080/metrics")
    else
      metrics=$(k get --raw "/api/v1/namespaces/$ns/pods/$pod:8080/proxy/metrics")
    fi
    n=$(awk '/^streamops_assigned_partitions/ {s += $2} END {print s + 0}' <<<"$metrics")
    echo "$pod $n"
  done
}

spec_replicas() { k -n "$1" get "streamconsumer/$2" -o jsonpath='{.spec.replicas}'; }
deployment_replicas() { k -n "$1" get "deploy/$2" -o jsonpath='{.spec.replicas}' 2>/dev/null; }

e2e() {
  local ns=$1 c

  local_setup
  log "apply manifests/examples/"
  examples | k -n "$ns" apply -f -
  local refs=()
  for c in "${CONSUMERS[@]}"; do refs+=("streamconsumer/$c"); done
  k -n "$ns" wait --for=condition=Ready "${refs[@]}" --timeout="${E2E_TIMEOUT}s"
  k -n "$ns" get streamconsumers

  log "baseline"
  # Indexed like CONSUMERS (no associative arrays: macOS ships bash 3.2).
  local offsets_before=() i
  for i in "${!CONSUMERS[@]}"; do
    offsets_before[i]=$(group_offsets "$(group "${CONSUMERS[i]}")")
  done
  local ma_before sensor_before tx_before pred_before hooks_before
  ma_before=$(table_rows moving_averages)
  sensor_before=$(table_rows sensor_readings)
  tx_before=$(table_rows transactions)
  pred_before=$(table_rows predictions)
  hooks_before=$(webhook_calls)
  echo "    moving_averages=$ma_before sensor_readings=$sensor_before transactions=$tx_before predictions=$pred_before webhook calls=$hooks_before"

  log "1. produce $E2E_EVENTS events per handler"
  produce "$ns" moving-average moving-average "$TOPIC_MA"
  produce "$ns" sensor sensor "machine.sensor.readings$SUFFIX"
  produce "$ns" fraud fraud "transactions$SUFFIX"
  produce "$ns" pipeline-trigger pipeline-trigger "pipeline-events$SUFFIX"
  for c in "${CONSUMERS[@]}"; do wait_job "$ns" "produce-$c"; done

  log "results in PostgreSQL and the webhook sink"
  for i in "${!CONSUMERS[@]}"; do
    c=${CONSUMERS[i]}
    wait_at_least "offsets of group $(group "$c")" $((offsets_before[i] + E2E_EVENTS)) group_offsets "$(group "$c")"
  done
  wait_at_least "moving_averages rows" $((ma_before + 1)) table_rows moving_averages
  wait_at_least "sensor_readings rows" $((sensor_before + 1)) table_rows sensor_readings
  wait_at_least "transactions rows" $((tx_before + 1)) table_rows transactions
  wait_at_least "predictions rows" $((pred_before + 1)) table_rows predictions
  wait_at_least "pipeline-trigger webhook calls" $((hooks_before + 1)) webhook_calls
  local produced=$E2E_EVENTS
  [[ $E2E_MODE == local ]] && check_exactly_once "$produced"

  log "2. kubectl scale streamconsumer/moving-average --replicas=3"
  k -n "$ns" scale streamconsumer/moving-average --replicas=3
  k -n "$ns" wait --for=jsonpath='{.status.readyReplicas}'=3 streamconsumer/moving-average --timeout="${E2E_TIMEOUT}s"
  local ready
  ready=$(ready_pods "$ns" moving-average)
  ((ready == 3)) || die "expected 3 ready moving-average pods, found $ready"
  k -n "$ns" get pods -l "$(k -n "$ns" get streamconsumer/moving-average -o jsonpath='{.status.selector}')" -o wide
  produce "$ns" moving-average moving-average "$TOPIC_MA"
  wait_job "$ns" produce-moving-average
  produced=$((produced + E2E_EVENTS))
  if [[ $E2E_MODE == local ]]; then
    wait_until "three worker processes share the 3 partitions of $TOPIC_MA (one each)" \
      partitions_shared "$ns" moving-average 3
    assigned_partitions "$ns" moving-average | sed 's/^/    /'
    check_exactly_once "$produced"
  fi

  log "3. autoscaling on lag: backlog -> replicas up to the cap -> drained -> replicas down"
  autoscale_step "$ns"
  produced=$((produced + E2E_BACKLOG))
  [[ $E2E_MODE == local ]] && check_exactly_once "$produced"

  log "4. a spec change rolls the Deployment; nothing lost, nothing doubled"
  spec_change_step "$ns"
  produced=$((produced + E2E_EVENTS))
  [[ $E2E_MODE == local ]] && check_exactly_once "$produced"

  log "5. kill a worker process: Ready turns false until its replacement is ready"
  kill_worker_step "$ns"

  log "6. delete the examples; owner references clean up their children; DeleteConsumerGroup"
  k -n "$ns" patch streamconsumer/sensor --type=merge -p '{"spec":{"cleanupPolicy":"DeleteConsumerGroup"}}'
  local uids
  uids=$(k -n "$ns" get streamconsumers -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}')
  [[ $(wc -l <<<"$uids") -eq ${#CONSUMERS[@]} ]] || die "expected ${#CONSUMERS[@]} StreamConsumers, found: $uids"
  examples | k -n "$ns" delete -f - --wait=true --timeout="${E2E_TIMEOUT}s"
  wait_until "no object owned by the deleted StreamConsumers is left" no_children_of "$ns" "$uids"
  local left
  left=$(k -n "$ns" get deployments,configmaps -l app.kubernetes.io/managed-by=streamops-operator -o name)
  [[ -z $left ]] || die "operator-managed objects remain: $left"
  wait_until "the worker pods are gone" no_worker_pods "$ns"
  # The operator reports what it did with each group; the broker must agree for the deleted one.
  # (An empty group without committed offsets may vanish from the broker by itself, so Retain is
  # checked through the operator's event, not the broker.)
  wait_until "event ConsumerGroupDeleted for sensor (cleanupPolicy DeleteConsumerGroup)" \
    has_event "$ns" sensor ConsumerGroupDeleted
  wait_until "event ConsumerGroupRetained for moving-average (cleanupPolicy Retain)" \
    has_event "$ns" moving-average ConsumerGroupRetained
  has_event "$ns" moving-average ConsumerGroupDeleted && die "the consumer group of moving-average (Retain) was deleted"
  if [[ $E2E_MODE == local ]]; then
    wait_until "consumer group $(group sensor) is gone from the broker" group_absent "$(group sensor)"
  fi
}

has_event() {
  [[ -n $(k -n "$1" get events --field-selector "involvedObject.name=$2,reason=$3" -o name) ]]
}

group_absent() {
  ! python3 "$ROOT/scripts/kafka_groups.py" 127.0.0.1:9092 | grep -qxF "$1"
}

# Each of N running workers holds at least one partition, and together they hold all N.
partitions_shared() {
  local ns=$1 sc=$2 want=$3 lines total=0 holders=0 pod n
  lines=$(assigned_partitions "$ns" "$sc")
  while read -r pod n; do
    [[ -n $pod ]] || continue
    total=$((total + n))
    ((n > 0)) && holders=$((holders + 1))
  done <<<"$lines"
  ((total == want && holders == want))
}

# The backlog is built at 0 replicas, so that it is there whatever the workers' speed; then
# autoscaling takes over with scale-to-zero, so the workers stay at 0 until the autoscaler's first
# reading of the backlog wakes them straight to the cap. (With minReplicas 1 alone, turning
# autoscaling on started one worker at once, which could drain the whole short backlog before
# the first reading: seen in CI, "replicas rise to the cap" never came.) When the backlog is
# drained, the replicas fall back to 0 after the stabilization window.
autoscale_step() {
  local ns=$1 cap=3 t0
  k -n "$ns" scale streamconsumer/moving-average --replicas=0
  wait_until "moving-average at 0 replicas" no_pods_of "$ns" moving-average
  produce "$ns" moving-average-backlog moving-average "$TOPIC_MA" "$E2E_BACKLOG"
  wait_job "$ns" produce-moving-average-backlog
  wait_at_least "lag of the backlog seen by the operator" $((E2E_BACKLOG / 2)) sc_lag "$ns" moving-average
  t0=$SECONDS
  k -n "$ns" patch streamconsumer/moving-average --type=merge -p "{\"spec\":{\"autoscaling\":{
    \"minReplicas\":1,\"maxReplicas\":$cap,\"lagThreshold\":500,\"pollIntervalSeconds\":2,
    \"scaleToZero\":true,\"activationLag\":100,
    \"scaleUpStabilizationSeconds\":0,\"scaleDownStabilizationSeconds\":$E2E_STABILIZATION}}}"
  wait_until "backlog of $E2E_BACKLOG: replicas rise to the cap ($cap)" test_eq "$cap" deployment_replicas "$ns" moving-average
  echo "    scaled to $cap after $((SECONDS - t0))s"
  wait_until "the backlog drains (lag 0)" test_eq 0 sc_lag "$ns" moving-average
  echo "    drained after $((SECONDS - t0))s"
  t0=$SECONDS
  wait_until "replicas fall to 0 after the stabilization window (scale to zero)" test_eq 0 deployment_replicas "$ns" moving-average
  echo "    back to 0 replicas $((SECONDS - t0))s after the lag reached 0 (window ${E2E_STABILIZATION}s)"
  k -n "$ns" patch streamconsumer/moving-average --type=json -p '[{"op":"remove","path":"/spec/autoscaling"}]'
  k -n "$ns" scale streamconsumer/moving-average --replicas=2
  k -n "$ns" wait --for=jsonpath='{.status.readyReplicas}'=2 streamconsumer/moving-average --timeout="${E2E_TIMEOUT}s"
}

no_pods_of() {
  local selector
  selector=$(k -n "$1" get "streamconsumer/$2" -o jsonpath='{.status.selector}')
  [[ -z $(k -n "$1" get pods -l "$selector" -o name) ]]
}

test_eq() {
  local want=$1 got
  shift
  got=$("$@")
  [[ $got == "$want" ]]
}

sc_lag() {
  local v
  v=$(k -n "$1" get "streamconsumer/$2" -o jsonpath='{.status.lag.total}')
  [[ -n $v ]] && echo "$v"
}

spec_change_step() {
  local ns=$1 rs_before rs_after
  rs_before=$(k -n "$ns" get deploy/moving-average -o jsonpath='{.metadata.annotations.deployment\.kubernetes\.io/revision}')
  produce "$ns" moving-average moving-average "$TOPIC_MA"
  # A new batch size changes the worker configuration (its hash is in the pod template).
  k -n "$ns" patch streamconsumer/moving-average --type=merge -p '{"spec":{"batch":{"maxMessages":137}}}'
  wait_until "the Deployment rolled (new revision)" revision_above "$ns" "$rs_before"
  k -n "$ns" rollout status deploy/moving-average --timeout="${E2E_TIMEOUT}s"
  wait_job "$ns" produce-moving-average
  rs_after=$(k -n "$ns" get deploy/moving-average -o jsonpath='{.metadata.annotations.deployment\.kubernetes\.io/revision}')
  echo "    revision $rs_before -> $rs_after"
  k -n "$ns" wait --for=condition=Ready streamconsumer/moving-average --timeout="${E2E_TIMEOUT}s"
}

revision_above() {
  local r
  r=$(k -n "$1" get deploy/moving-average -o jsonpath='{.metadata.annotations.deployment\.kubernetes\.io/revision}')
  ((r > $2))
}

pod_ready() { k -n "$1" get "pod/$2" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }

kill_worker_step() {
  local ns=$1 selector pod pidfile pid restarts deadline seen_false=0
  if [[ $E2E_MODE != local ]]; then
    echo "    kind: not run (the worker image has no shell to kill the process with); run make e2e-local"
    return 0
  fi
  selector=$(k -n "$ns" get streamconsumer/moving-average -o jsonpath='{.status.selector}')
  pod=$(k -n "$ns" get pods -l "$selector" --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}')
  pidfile="$LOCAL_DIR/pods/${ns}_$pod/worker.pid"
  [[ -f $pidfile ]] || die "no pid file $pidfile for pod $pod"
  pid=$(cat "$pidfile")
  [[ $(pod_ready "$ns" "$pod") == True ]] || die "pod $pod is not Ready before the kill"
  restarts=$(k -n "$ns" get "pod/$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')
  echo "    kill -9 $pid (pod $pod, restarts $restarts)"
  kill -9 "$pid"
  deadline=$((SECONDS + 30))
  while ((SECONDS < deadline)); do
    if [[ $(pod_ready "$ns" "$pod") == False ]]; then seen_false=1; break; fi
    sleep 0.2
  done
  ((seen_false)) || die "pod $pod stayed Ready after its process was killed"
  echo "    pod $pod Ready=False"
  wait_until "pod $pod Ready again (container restarted)" test_eq True pod_ready "$ns" "$pod"
  local now
  now=$(k -n "$ns" get "pod/$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')
  ((now == restarts + 1)) || die "restartCount of $pod: $restarts -> $now, wanted +1"
  [[ $(cat "$pidfile") != "$pid" ]] || die "the pid file of $pod still names the killed process"
  echo "    restartCount $restarts -> $now; new process $(cat "$pidfile")"
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
