#!/usr/bin/env bash
# Apache Kafka for the dev stack, the tests, the benchmarks and the fault suite: one node in KRaft
# combined mode (broker and controller), run from a classpath resolved from Maven Central.
#
#   scripts/kafka.sh classpath                 resolve (once) and print the cached classpath dir
#   scripts/kafka.sh start DIR PORT CTRL_PORT [ADVERTISED_HOST:PORT]
#                                              format DIR (once) and start a broker; pid in DIR/kafka.pid
#   scripts/kafka.sh ready HOST:PORT [SECONDS]  wait until a Metadata request answers
#   scripts/kafka.sh stop DIR                  stop the broker started in DIR (SIGTERM, then SIGKILL)
#
# The version is pinned in versions.env; the classpath is cached under $STREAMOPS_CACHE, outside
# the work tree, so every clone on the machine reuses it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../versions.env
source "$ROOT/versions.env"
LIBS="$STREAMOPS_CACHE/kafka-$KAFKA_VERSION/libs"
HEAP="${STREAMOPS_KAFKA_HEAP:-1g}"
# The collector's flags (word-split); STREAMOPS_KAFKA_GC_OPTS replaces them, e.g. to log collections.
# STREAMOPS_KAFKA_PROPS (newline-separated key=value) is appended to the broker's properties.
GC_OPTS="${STREAMOPS_KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20}"

die() { printf 'kafka: error: %s\n' "$*" >&2; exit 1; }

classpath() {
  if [ ! -f "$LIBS/.complete" ]; then
    command -v mvn >/dev/null || die "mvn (Maven) not found; install Maven (Debian: maven) and OpenJDK 17+"
    command -v java >/dev/null || die "java not found; install OpenJDK 17 or newer"
    printf 'kafka: resolving org.apache.kafka:kafka_2.13:%s and its runtime classpath from Maven Central\n' "$KAFKA_VERSION" >&2
    rm -rf "$LIBS"
    mkdir -p "$(dirname "$LIBS")"
    local log="$STREAMOPS_CACHE/kafka-$KAFKA_VERSION/maven.log"
    if ! mvn -B -q -f "$ROOT/tools/kafka/pom.xml" \
        -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$LOG4J_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS" >"$log" 2>&1; then
      die "resolving the Kafka classpath with Maven failed; see $log"
    fi
    [ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] || die "kafka_2.13-$KAFKA_VERSION.jar is missing from $LIBS"
    touch "$LIBS/.complete"
  fi
  echo "$LIBS"
}

write_config() {
  local dir=$1 port=$2 ctrl=$3 advertised=$4
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<PROPS
# Written by scripts/kafka.sh: one node, broker and controller (KRaft combined mode), loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctrl
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl
advertised.listeners=PLAINTEXT://$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
# One node: every internal topic has one replica and needs one in sync.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
# Tests and the demo start consumers at once: no initial rebalance delay.
group.initial.rebalance.delay.ms=0
# Retention checks run often enough for tests that provoke a retention gap.
log.retention.check.interval.ms=5000
log.segment.delete.delay.ms=1000
file.delete.delay.ms=1000
PROPS
  # Extra broker properties, one per line (later lines win), e.g. to try thread counts.
  if [ -n "${STREAMOPS_KAFKA_PROPS:-}" ]; then
    printf '# From STREAMOPS_KAFKA_PROPS:\n%s\n' "$STREAMOPS_KAFKA_PROPS" >>"$dir/server.properties"
  fi
  cat >"$dir/log4j2.properties" <<LOG
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $dir/kafka.log
appender.file.filePattern = $dir/kafka.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
LOG
}

# The JVM command line for a tool or the broker; fills the array JAVA_ARGS.
java_args() {
  local dir=$1; shift
  local libs; libs="$(classpath)"
  local gc; read -r -a gc <<<"$GC_OPTS"
  JAVA_ARGS=(java -Xms"$HEAP" -Xmx"$HEAP" "${gc[@]}" -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$libs/*" "$@")
}

start() {
  local dir=$1 port=$2 ctrl=$3 advertised=${4:-127.0.0.1:$2}
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ -f "$dir/kafka.pid" ] && kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
    echo "kafka: already running in $dir (pid $(cat "$dir/kafka.pid"))" >&2
    return 0
  fi
  classpath >/dev/null
  write_config "$dir" "$port" "$ctrl" "$advertised"
  if [ ! -f "$dir/data/meta.properties" ]; then
    local cluster_id
    java_args "$dir" kafka.tools.StorageTool random-uuid
    cluster_id="$("${JAVA_ARGS[@]}" 2>>"$dir/format.log")"
    java_args "$dir" kafka.tools.StorageTool format --ignore-formatted -t "$cluster_id" -c "$dir/server.properties"
    "${JAVA_ARGS[@]}" >>"$dir/format.log" 2>&1 \
      || die "formatting the storage in $dir/data failed; see $dir/format.log"
  fi
  # setsid: the broker survives the shell that started it, in a session of its own. setsid forks
  # when it is a process group leader, so `$!` may not be the broker: the shell it runs records
  # its own pid, then becomes the JVM (exec), so kafka.pid is the broker's pid either way.
  java_args "$dir" kafka.Kafka "$dir/server.properties"
  rm -f "$dir/kafka.pid"
  (cd "$dir" && nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/kafka.pid" "${JAVA_ARGS[@]}" \
    >"$dir/stdout.log" 2>&1 </dev/null &)
  local i
  for i in $(seq 1 50); do [ -s "$dir/kafka.pid" ] && break; sleep 0.1; done
  [ -s "$dir/kafka.pid" ] || die "the broker in $dir did not start (see $dir/stdout.log)"
  echo "kafka: started in $dir (pid $(cat "$dir/kafka.pid")), listening on 127.0.0.1:$port, log $dir/kafka.log" >&2
}

ready() {
  local addr=$1 seconds=${2:-90}
  python3 "$ROOT/scripts/kafka_ready.py" "$addr" --timeout "$seconds" >/dev/null \
    || die "Kafka at $addr did not answer a Metadata request within ${seconds}s"
}

stop() {
  local dir=$1 pid i
  [ -f "$dir/kafka.pid" ] || return 0
  pid="$(cat "$dir/kafka.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/kafka.pid"
}

cmd=${1:-}
shift || true
case "$cmd" in
  classpath) classpath ;;
  start) [ $# -ge 3 ] || die "usage: kafka.sh start DIR PORT CTRL_PORT [ADVERTISED_HOST:PORT]"; start "$@" ;;
  ready) [ $# -ge 1 ] || die "usage: kafka.sh ready HOST:PORT [SECONDS]"; ready "$@" ;;
  stop) [ $# -ge 1 ] || die "usage: kafka.sh stop DIR"; stop "$@" ;;
  *) die "usage: kafka.sh classpath | start DIR PORT CTRL_PORT [ADVERTISED] | ready HOST:PORT [SECONDS] | stop DIR" ;;
esac
