#!/usr/bin/env bash
# Builds promtool (Prometheus's rule checker and unit-test runner) from Go modules, once, into the
# shared cache, and prints its path. The version is pinned in versions.env (PROMETHEUS_VERSION).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null
source "$root/versions.env"
dir="$STREAMOPS_CACHE/bin/prometheus-$PROMETHEUS_VERSION"
if [ ! -x "$dir/promtool" ]; then
  command -v go >/dev/null || { echo "promtool.sh: Go is needed to build promtool" >&2; exit 1; }
  mkdir -p "$dir"
  echo "building promtool $PROMETHEUS_VERSION into $dir (once)" >&2
  GOBIN="$dir" GOFLAGS=-mod=mod go install "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >&2
fi
echo "$dir/promtool"
