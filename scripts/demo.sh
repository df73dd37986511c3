#!/usr/bin/env bash
# The local demo: runs the four example StreamConsumers from manifests/examples/ side by side on the
# local stack (Apache Kafka, PostgreSQL, Redis), with the reference scorer and a webhook receiver, feeds
# them sample events and prints what each produced.
#
# The example manifests address in-cluster services (kafka.streamops-dev:9092, ...); the demo runs
# them unchanged but for those addresses, which it swaps for the local ones.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
DEMO="$ROOT/.dev/demo"
rm -rf "$DEMO"
mkdir -p "$DEMO"

BROKER=127.0.0.1:9092
DB=streamops_demo
export STREAMOPS_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export STREAMOPS_REDIS_URL="redis://127.0.0.1:6379/15"
SCORER_ADDR=127.0.0.1:18080
HOOK_ADDR=127.0.0.1:18081
PRICE_EVENTS=${PRICE_EVENTS:-20000}
SENSOR_EVENTS=${SENSOR_EVENTS:-10000}
FRAUD_EVENTS=${FRAUD_EVENTS:-5000}
PIPELINE_EVENTS=${PIPELINE_EVENTS:-2500}

log() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }

log "building the binaries"
cargo build -q --bins
W="$ROOT/target/debug/streamops-worker"
D="$ROOT/target/debug/streamops-demo"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

log "fresh database $DB and Redis db 15"
psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
redis-cli -n 15 FLUSHDB >/dev/null

log "reference scorer on $SCORER_ADDR, webhook receiver on $HOOK_ADDR"
"$W" scorer --listen "$SCORER_ADDR" > "$DEMO/scorer.log" 2>&1 & PIDS+=($!)
python3 "$ROOT/scripts/webhook_receiver.py" "$HOOK_ADDR" "$DEMO/webhooks.jsonl" > "$DEMO/webhook.log" 2>&1 & PIDS+=($!)

declare -A SPEC KIND_COUNT
KINDS=(moving-average sensor fraud pipeline-trigger)
KIND_COUNT=([moving-average]=$PRICE_EVENTS [sensor]=$SENSOR_EVENTS [fraud]=$FRAUD_EVENTS [pipeline-trigger]=$PIPELINE_EVENTS)

for kind in "${KINDS[@]}"; do
  src="manifests/examples/$kind.yaml"
  [ -f "$src" ] || { echo "demo: $src is missing" >&2; exit 1; }
  # Swap the in-cluster addresses for the local ones; nothing else changes.
  sed -e "s#kafka\.streamops-dev:9092#$BROKER#g" \
      -e "s#http://scorer\.streamops-dev:8080#http://$SCORER_ADDR#g" \
      -e "s#http://webhook-sink\.streamops-dev:8080#http://$HOOK_ADDR#g" \
      "$src" > "$DEMO/$kind.yaml"
  SPEC[$kind]="$DEMO/$kind.yaml"
done

topic_of() { "$D" info --spec "$1" --field topic; }
error_topic_of() { "$D" info --spec "$1" --field error-topic; }
group_of() { "$D" info --spec "$1" --field group; }

for kind in "${KINDS[@]}"; do
  t="$(topic_of "${SPEC[$kind]}")"; et="$(error_topic_of "${SPEC[$kind]}")"
  log "$kind: topics $t and $et (recreated empty)"
  "$W" topic delete "$t" --bootstrap-servers "$BROKER" >/dev/null 2>&1 || true
  "$W" topic delete "$et" --bootstrap-servers "$BROKER" >/dev/null 2>&1 || true
  "$W" topic create "$t" --partitions 3 --bootstrap-servers "$BROKER"
  "$W" topic create "$et" --partitions 1 --bootstrap-servers "$BROKER"
done

port=19090
for kind in "${KINDS[@]}"; do
  log "$kind: starting the worker (streamops-worker run --spec $kind.yaml)"
  "$W" run --spec "${SPEC[$kind]}" --bootstrap-servers "$BROKER" \
    --http-listen "127.0.0.1:$port" --log-format text > "$DEMO/worker-$kind.log" 2>&1 & PIDS+=($!)
  port=$((port + 1))
done

for kind in "${KINDS[@]}"; do
  t="$(topic_of "${SPEC[$kind]}")"
  log "$kind: producing ${KIND_COUNT[$kind]} events (1% malformed) to $t"
  "$W" produce --bootstrap-servers "$BROKER" --topic "$t" --kind "$kind" \
    --count "${KIND_COUNT[$kind]}" --poison-percent 1 --seed 42
done

log "waiting until every event is accounted for (rows + error topic)"
for kind in "${KINDS[@]}"; do
  g="$(group_of "${SPEC[$kind]}")"
  want=${KIND_COUNT[$kind]}
  for _ in $(seq 1 600); do
    got=$(psql -tA -h 127.0.0.1 -U postgres -d "$DB" -c \
      "SELECT COALESCE(SUM(next_offset),0) FROM streamops_offsets WHERE consumer_group = '$g'" 2>/dev/null || echo 0)
    [ "${got:-0}" -ge "$want" ] && break
    sleep 0.5
  done
  [ "${got:-0}" -ge "$want" ] || { echo "demo: $kind stopped at $got of $want; see $DEMO/worker-$kind.log" >&2; exit 1; }
done

log "stopping the workers"
cleanup
PIDS=()

echo
"$D" report --database-url "$STREAMOPS_DATABASE_URL" --redis-url "$STREAMOPS_REDIS_URL" --bootstrap-servers "$BROKER" \
  $(for kind in "${KINDS[@]}"; do printf -- '--spec %s ' "${SPEC[$kind]}"; done) \
  --webhooks "$DEMO/webhooks.jsonl"
