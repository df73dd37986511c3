#!/usr/bin/env bash
# Throughput benchmark of the worker (`make bench`). For each handler kind in BENCH_KINDS:
#   1. worker: sustained rate from topic to committed rows (first commit to last), release build
#   2. raw consume rate of the same topic, no processing
#   3. PostgreSQL binary COPY rate of the same rows
#   ratio = worker / min(2, 3); peak RSS of the worker (VmHWM)
# then, for moving-average:
#   4. end-to-end latency from produce to committed row (p50, p99) at fixed rates
#      (BENCH_LATENCY_RATES, default 1000,10000,50000 msg/s; BENCH_LATENCY=0 skips it), in
#      BENCH_LATENCY_ROUNDS rounds (default 3) of BENCH_LATENCY_SECONDS (default 10) per rate,
#      after BENCH_LATENCY_WARMUP seconds (default 120) at 10,000 msg/s for a freshly started broker
#   5. rollout: longest processing pause of any partition while 3 workers are replaced one at a
#      time under 5,000 msg/s, for static membership, dynamic cooperative-sticky and KIP-848
#      (BENCH_ROLLOUT=0 skips it; it takes a few minutes, static membership alone ~3)
# The worker runs with the spec's batch defaults unless BENCH_BATCH sets batch.maxMessages.
# Needs the local services of DEVELOPERS.md (Apache Kafka, PostgreSQL).
#
# Adding a kind: write `bench_<kind>` (dashes become underscores) that calls `bench_kind` with the
# kind and a handler block for the worker configuration, and give `streamops-bench copy` an arm
# for the kind's rows.
set -euo pipefail
cd "$(dirname "$0")/.."

BROKER=${STREAMOPS_BENCH_BROKER:-127.0.0.1:9092}
PG=${STREAMOPS_BENCH_PG:-postgres://postgres@127.0.0.1:5432}
COUNT=${BENCH_COUNT:-200000}
PARTITIONS=${BENCH_PARTITIONS:-3}
KINDS=${BENCH_KINDS:-moving-average sensor fraud pipeline-trigger}
BATCH=${BENCH_BATCH:-}
LATENCY_RATES=${BENCH_LATENCY_RATES:-1000,10000,50000}
LATENCY_SECONDS=${BENCH_LATENCY_SECONDS:-10}
LATENCY_ROUNDS=${BENCH_LATENCY_ROUNDS:-3}
LATENCY_WARMUP=${BENCH_LATENCY_WARMUP:-120}
WORK=$(mktemp -d /tmp/streamops-bench.XXXXXX)
ROWS=()
WORKER_PID=""

cleanup() {
  if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

for svc in "${BROKER}" "127.0.0.1:5432"; do
  host=${svc%:*}; port=${svc##*:}
  if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    echo "bench: nothing listens on $svc; start the dev services (make dev-up)" >&2
    exit 1
  fi
done

echo "bench: building release binaries" >&2
cargo build -q --release -p streamops-worker --bins
BIN=target/release/streamops-worker
BENCH=target/release/streamops-bench

# The batch block of a worker configuration: none (the spec's defaults) unless BENCH_BATCH is set.
batch_yaml() {
  if [[ -n "$BATCH" ]]; then
    printf 'batch:\n  maxMessages: %s\n  maxWaitMs: 100' "$BATCH"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

field() { # field NAME "k=v k=v ..."
  tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"
}

# bench_kind KIND HANDLER_YAML: one row of the table.
bench_kind() {
  local kind=$1 handler_yaml=$2
  local id="bench-${kind}-$$-$(date +%s)"
  local topic="$id" db="bench_${kind//-/_}_$$_$(date +%s)"
  local url="$PG/$db" copydb="${db}_copy"
  echo "bench[$kind]: topic $topic, $COUNT messages, $PARTITIONS partitions" >&2
  "$BIN" topic create "$topic" --partitions "$PARTITIONS" --bootstrap-servers "$BROKER" >&2
  "$BIN" topic create "$topic-failed" --partitions 1 --bootstrap-servers "$BROKER" >&2
  psql -q "$PG/postgres" -c "CREATE DATABASE $db" -c "CREATE DATABASE $copydb" >&2
  "$BIN" produce --bootstrap-servers "$BROKER" --topic "$topic" --kind "$kind" \
    --count "$COUNT" --keys 16 --seed 1 >&2

  cat >"$WORK/$kind.yaml" <<YAML
consumerId: $id
kafka:
  bootstrapServers: $BROKER
  topics: [$topic]
  groupId: $id
  autoOffsetReset: earliest
  securityProtocol: PLAINTEXT
handler:
$handler_yaml
errorTopic: $topic-failed
$(batch_yaml)
maxMessageBytes: 1048576
httpListen: 127.0.0.1:0
progressEvery: 50000
YAML
  STREAMOPS_DATABASE_URL="$url" "$BIN" run --config "$WORK/$kind.yaml" --instance-id "$id-0" \
    --log-format json 2>"$WORK/$kind-worker.log" &
  WORKER_PID=$!
  local w; w=$("$BENCH" wait --database-url "$url" --group "$id" --count "$COUNT" --pid "$WORKER_PID")
  kill -TERM "$WORKER_PID"; wait "$WORKER_PID" || true; WORKER_PID=""

  local c; c=$("$BENCH" consume --bootstrap-servers "$BROKER" --topic "$topic" --count "$COUNT")
  local p; p=$("$BENCH" copy --database-url "$PG/$copydb" --kind "$kind" --count "$COUNT" \
    --keys 16 --seed 1 --partitions "$PARTITIONS")

  local wr cr pr hwm
  wr=$(field rate "$w"); cr=$(field rate "$c"); pr=$(field rate "$p"); hwm=$(field vmhwm_kb "$w")
  local ratio; ratio=$(awk -v w="$wr" -v c="$cr" -v p="$pr" 'BEGIN{m=(c<p)?c:p; printf "%.2f", w/m}')
  ROWS+=("$(printf '%-16s %12s %12s %12s %8s %10s' "$kind" "$wr" "$cr" "$pr" "$ratio" "$((hwm / 1024)) MiB")")

  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
    -c "DROP DATABASE IF EXISTS $copydb WITH (FORCE)" >&2 || true
  "$BIN" topic delete "$topic" --bootstrap-servers "$BROKER" >&2 || true
  "$BIN" topic delete "$topic-failed" --bootstrap-servers "$BROKER" >&2 || true
}

bench_moving_average() {
  bench_kind moving-average "  kind: moving-average
  window: 5"
}

bench_sensor() {
  bench_kind sensor "  kind: sensor"
}

# wait_http URL: waits until URL answers (a service started in the background).
wait_http() {
  local i
  for i in $(seq 1 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench: $1 never answered" >&2
  return 1
}

# fraud: the worker against the reference scorer, then the scorer alone under a load loop, with
# 1 request in flight (as the worker calls it) and with 4.
bench_fraud() {
  local port=${BENCH_SCORER_PORT:-18080} scorer_pid
  "$BIN" scorer --listen "127.0.0.1:$port" 2>"$WORK/scorer.log" &
  scorer_pid=$!
  trap 'kill -TERM '"$scorer_pid"' 2>/dev/null || true; cleanup' EXIT
  wait_http "http://127.0.0.1:$port/health"
  bench_kind fraud "  kind: fraud
  scoringUrl: http://127.0.0.1:$port/predict
  timeoutMs: 2000
  maxRetries: 3
  batchSize: 100
  fraudThreshold: 0.8"
  local one four
  one=$("$BENCH" scorer-load --url "http://127.0.0.1:$port/predict" --requests 1000 \
    --batch-size 100 --concurrency 1)
  four=$("$BENCH" scorer-load --url "http://127.0.0.1:$port/predict" --requests 2000 \
    --batch-size 100 --concurrency 4)
  kill -TERM "$scorer_pid" 2>/dev/null || true
  wait "$scorer_pid" 2>/dev/null || true
  trap cleanup EXIT
  ROWS+=("$(printf '  fraud: reference scorer alone, batches of 100: %s tx/s with 1 request in flight, %s tx/s with 4' \
    "$(field rate "$one")" "$(field rate "$four")")")
}

# pipeline-trigger: events counted in Redis, a trigger every 10,000 events (maxEvents matches
# PIPELINE_TRIGGER_MAX_EVENTS of streamops-bench) to a local webhook receiver.
bench_pipeline_trigger() {
  local port=${BENCH_WEBHOOK_PORT:-18081} hook_pid
  if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    echo "bench: nothing listens on 127.0.0.1:6379 (Redis); start the dev services (make dev-up)" >&2
    exit 1
  fi
  python3 scripts/webhook_receiver.py "127.0.0.1:$port" "$WORK/triggers.jsonl" 2>"$WORK/webhook.log" &
  hook_pid=$!
  trap 'kill -TERM '"$hook_pid"' 2>/dev/null || true; cleanup' EXIT
  sleep 0.5
  export STREAMOPS_REDIS_URL=redis://127.0.0.1:6379/
  bench_kind pipeline-trigger "  kind: pipeline-trigger
  pipelineName: bench
  maxEvents: 10000
  maxTimeSeconds: 3600
  webhook:
    url: http://127.0.0.1:$port/hook"
  unset STREAMOPS_REDIS_URL
  kill -TERM "$hook_pid" 2>/dev/null || true
  wait "$hook_pid" 2>/dev/null || true
  trap cleanup EXIT
  local triggers; triggers=$(wc -l <"$WORK/triggers.jsonl" 2>/dev/null || echo 0)
  ROWS+=("$(printf '  pipeline-trigger: %s webhook triggers for %s events (maxEvents 10000); events are counted in Redis, so pg-copy is only the pipeline_runs rows' "$triggers" "$COUNT")")
  redis-cli --scan --pattern 'consumer:{bench-pipeline-trigger-*' 2>/dev/null | xargs -r redis-cli del >/dev/null 2>&1 || true
}

# Latency from produce to committed row, moving-average, one worker, fixed rates.
LATENCY_ROWS=()
bench_latency() {
  local id="bench-latency-$$-$(date +%s)"
  local topic="$id" db="bench_latency_$$_$(date +%s)" port; port=$(free_port)
  local url="$PG/$db"
  echo "bench[latency]: topic $topic, $PARTITIONS partitions, rates $LATENCY_RATES msg/s" >&2
  "$BIN" topic create "$topic" --partitions "$PARTITIONS" --bootstrap-servers "$BROKER" >&2
  "$BIN" topic create "$topic-failed" --partitions 1 --bootstrap-servers "$BROKER" >&2
  psql -q "$PG/postgres" -c "CREATE DATABASE $db" >&2
  cat >"$WORK/latency.yaml" <<YAML
consumerId: $id
kafka:
  bootstrapServers: $BROKER
  topics: [$topic]
  groupId: $id
  autoOffsetReset: earliest
  securityProtocol: PLAINTEXT
handler:
  kind: moving-average
  window: 5
errorTopic: $topic-failed
$(batch_yaml)
maxMessageBytes: 1048576
httpListen: 127.0.0.1:$port
progressEvery: 1000000
YAML
  STREAMOPS_DATABASE_URL="$url" "$BIN" run --config "$WORK/latency.yaml" --instance-id "$id-0" \
    --log-format json 2>"$WORK/latency-worker.log" &
  WORKER_PID=$!
  local i
  for i in $(seq 1 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null && break
    sleep 0.1
  done
  local out
  out=$("$BENCH" latency --bootstrap-servers "$BROKER" --topic "$topic" --database-url "$url" \
    --group "$id" --rates "$LATENCY_RATES" --seconds "$LATENCY_SECONDS" \
    --rounds "$LATENCY_ROUNDS" --first-warmup-secs "$LATENCY_WARMUP")
  kill -TERM "$WORKER_PID"; wait "$WORKER_PID" || true; WORKER_PID=""
  while read -r line; do
    LATENCY_ROWS+=("$(printf '%8s %7s %9s %8s %8s %8s %8s %11s %9s %9s' "$(field rate "$line")" \
      "$(field round "$line")" "$(field achieved_rate "$line")" "$(field p50_ms "$line")" \
      "$(field p99_ms "$line")" "$(field max_ms "$line")" "$(field ack_p99_ms "$line")" \
      "$(field sample_gap_max_ms "$line")" "$(field send_lag_max_ms "$line")" \
      "$(field tool_cpu_pct "$line")")")
  done <<<"$out"
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >&2 || true
  "$BIN" topic delete "$topic" --bootstrap-servers "$BROKER" >&2 || true
  "$BIN" topic delete "$topic-failed" --bootstrap-servers "$BROKER" >&2 || true
}

# Rolling replacement of 3 workers under 5,000 msg/s, per group-membership set-up.
ROLLOUT_ROWS=()
bench_rollout() {
  local out
  out=$("$BENCH" rollout --worker-bin "$BIN" --bootstrap-servers "$BROKER" --pg "$PG" \
    --work-dir "$WORK/rollout")
  while read -r line; do
    ROLLOUT_ROWS+=("$(printf '%-10s %14s %22s %10s %8s' "$(field setup "$line")" \
      "$(field max_pause_ms "$line")" "$(field resumed_after_sigterm_s "$line")" \
      "$(field produced "$line")" "$(field exact "$line")")")
  done <<<"$out"
}

for kind in $KINDS; do
  fn="bench_${kind//-/_}"
  if declare -F "$fn" >/dev/null; then
    "$fn"
  else
    echo "bench: no benchmark for handler kind $kind yet" >&2
  fi
done

if [[ "${BENCH_LATENCY:-1}" != 0 ]]; then bench_latency; fi
if [[ "${BENCH_ROLLOUT:-1}" != 0 ]]; then bench_rollout; fi

echo
echo "streamops worker benchmark: $COUNT messages, $PARTITIONS partitions, batch ${BATCH:-spec defaults} (msg/s)"
printf '%-16s %12s %12s %12s %8s %10s\n' "handler" "worker" "raw-consume" "pg-copy" "ratio" "peak-rss"
for r in "${ROWS[@]}"; do echo "$r"; done
echo "ratio = worker / min(raw-consume, pg-copy); peak-rss = worker VmHWM"
echo "targets (moving-average): worker >= 150000 msg/s, ratio >= 0.5, peak-rss < 64 MiB"
if ((${#LATENCY_ROWS[@]})); then
  echo
  echo "moving-average latency, produce -> committed row (ms; offsets sampled every 2 ms), $PARTITIONS partitions, one worker, $LATENCY_ROUNDS rounds of $LATENCY_SECONDS s per rate after a ${LATENCY_WARMUP} s warm-up"
  printf '%8s %7s %9s %8s %8s %8s %8s %11s %9s %9s\n' "rate" "round" "achieved" "p50" "p99" "max" \
    "ack-p99" "sample-gap" "send-lag" "tool-cpu%"
  for r in "${LATENCY_ROWS[@]}"; do echo "$r"; done
  echo "target: p99 <= 50 ms at 10000 msg/s (the median row: median of each column over the rounds)"
  echo "ack-p99 = produce -> broker acknowledgement (before the worker can fetch); sample-gap = longest pause between two offset samples;"
  echo "send-lag = longest lateness of a send behind its schedule; tool-cpu% = the measuring tool's own CPU (100 = one core)"
fi
if ((${#ROLLOUT_ROWS[@]})); then
  echo
  echo "rollout: 3 workers replaced one at a time (new identity; old one SIGTERM once the new one is ready), 5000 msg/s, 6 partitions"
  printf '%-10s %14s %22s %10s %8s\n' "set-up" "max-pause-ms" "resumed-after-SIGTERM-s" "messages" "exact"
  for r in "${ROLLOUT_ROWS[@]}"; do echo "$r"; done
  echo "target: no partition paused longer than 5000 ms; exact = every message committed once"
fi
