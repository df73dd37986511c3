#!/usr/bin/env bash
# Starts whatever of the local stack is missing: build tools, PostgreSQL, Redis and Apache Kafka
# (one KRaft node from Maven Central, version pinned in versions.env).
# Idempotent. Records what it started in .dev/started so that dev-down.sh stops only that.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/.dev"
mkdir -p "$DEV"
STARTED="$DEV/started"
touch "$STARTED"
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf 'dev-up: %s\n' "$*" >&2; }
die() { printf 'dev-up: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 i
  for i in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  die "$name did not open 127.0.0.1:$port within 60 s"
}

mark_started() { grep -qx "$1" "$STARTED" || echo "$1" >> "$STARTED"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- build tools for librdkafka (rdkafka-sys builds it from source) and the test tooling
missing=()
for pkg in gcc g++ make pkg-config libssl-dev zlib1g-dev curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3 python3-venv); fi
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"

# --- PostgreSQL
if port_open 5432; then
  log "PostgreSQL already listening on 127.0.0.1:5432"
else
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql postgresql-client
  fi
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  [ -n "$version" ] || die "no PostgreSQL cluster found under /etc/postgresql"
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q "streamops-dev" "$hba"; then
    # Local development only: trust loopback connections, as the tests and the demo expect.
    log "allowing trusted loopback connections in $hba"
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust # streamops-dev\nhost all all ::1/128 trust # streamops-dev' "$hba"
  fi
  log "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || $SUDO pg_ctlcluster "$version" main start
  mark_started "postgres $version"
  wait_port 5432 PostgreSQL
fi

# --- Redis
if port_open 6379; then
  log "Redis already listening on 127.0.0.1:6379"
else
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$DEV" --logfile "$DEV/redis.log" --pidfile "$DEV/redis.pid"
  mark_started redis
  wait_port 6379 Redis
fi

# --- Apache Kafka: one node, broker and controller (KRaft), classpath from Maven Central
if port_open 9092; then
  log "a broker is already listening on 127.0.0.1:9092"
  bash "$ROOT/scripts/kafka.sh" ready 127.0.0.1:9092 90
else
  if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    apt_install default-jdk-headless maven
  fi
  bash "$ROOT/scripts/kafka.sh" start "$DEV/kafka" 9092 9093
  mark_started kafka
  log "waiting for Kafka to answer a Metadata request"
  bash "$ROOT/scripts/kafka.sh" ready 127.0.0.1:9092 120
fi

log "stack is up: PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379, Kafka 127.0.0.1:9092 (log .dev/kafka/kafka.log)"
