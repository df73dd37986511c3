#!/usr/bin/env bash
# Stops only what dev-up.sh started.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/.dev"
STARTED="$DEV/started"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

[ -f "$STARTED" ] || { echo "dev-down: nothing was started by dev-up"; exit 0; }

while read -r what version; do
  case "$what" in
    kafka)
      if [ -f "$DEV/kafka/kafka.pid" ]; then
        bash "$ROOT/scripts/kafka.sh" stop "$DEV/kafka" && echo "dev-down: stopped Kafka"
      fi ;;
    redis)
      if [ -f "$DEV/redis.pid" ]; then
        kill "$(cat "$DEV/redis.pid")" 2>/dev/null && echo "dev-down: stopped Redis"
        rm -f "$DEV/redis.pid"
      fi ;;
    postgres)
      $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main stop 2>/dev/null \
        || $SUDO pg_ctlcluster "$version" main stop
      echo "dev-down: stopped PostgreSQL $version" ;;
  esac
done < "$STARTED"
rm -f "$STARTED"
