#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and reports what ran and what was found.
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_TARGETS  space-separated subset (default: all)
#   FUZZ_TOOLCHAIN  rustup toolchain (default: nightly; cargo-fuzz needs unstable compiler flags)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
SECONDS_PER=${FUZZ_SECONDS:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  echo "fuzz: the $TOOLCHAIN toolchain is missing; install it with: rustup toolchain install $TOOLCHAIN" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz from crates.io into ~/.cargo/bin" >&2
  cargo install --locked cargo-fuzz
fi
fuzz() { cargo "+$TOOLCHAIN" fuzz "$@"; }
TARGETS=${FUZZ_TARGETS:-$(fuzz list)}
SANITIZER=${FUZZ_SANITIZER:-address}

mkdir -p "$ROOT/.dev/fuzz"
report="$ROOT/.dev/fuzz/report.txt"
: > "$report"
failed=0
for t in $TARGETS; do
  corpus="$ROOT/.dev/fuzz/corpus/$t"
  mkdir -p "$corpus"
  log="$ROOT/.dev/fuzz/$t.log"
  echo "fuzz: $t for ${SECONDS_PER}s (sanitizer: $SANITIZER)" >&2
  status=0
  fuzz run -s "$SANITIZER" "$t" "$corpus" "seeds/$t" -- \
    -max_total_time="$SECONDS_PER" -rss_limit_mb=4096 -max_len=65536 > "$log" 2>&1 || status=$?
  runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -n1 | grep -oE '[0-9]+' || echo 0)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+' || echo 0)
  rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+' || echo 0)
  artifacts=$(find artifacts/"$t" -type f 2>/dev/null | wc -l)
  if [ "$status" -ne 0 ] || [ "$artifacts" -gt 0 ]; then
    result="FOUND ($artifacts artifacts, exit $status; see $log)"
    failed=$((failed + 1))
  else
    result="nothing found"
  fi
  printf '%-24s %6ss %12s runs %8s exec/s %6s edges  %s\n' "$t" "$SECONDS_PER" "$runs" "$rate" "$cov" "$result" | tee -a "$report"
done
echo "fuzz: report in $report"
[ "$failed" -eq 0 ]
