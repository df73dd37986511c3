#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target (fuzz/fuzz_targets/) for a bounded time, starting from the
# committed seeds (fuzz/seeds/<target>/), and reports what ran and what was found.
#
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_TARGETS    space-separated subset (default: all, from `cargo fuzz list`)
#   FUZZ_TOOLCHAIN  rustup toolchain (default: nightly; cargo-fuzz needs unstable compiler flags).
#                   Installed with rustup (minimal profile) when missing.
#   FUZZ_SANITIZER  address|none (default: none; the decoders are safe Rust, so ASan finds nothing
#                   there that Rust's own checks do not, and costs ~2x in speed and a full rebuild)
#   FUZZ_MAX_LEN    largest input libFuzzer generates, in bytes (default 8192: past the 4096-element
#                   shape limit, and more is slower without reaching new code)
#   FUZZ_TIMEOUT    seconds one input may take before libFuzzer reports a timeout, i.e. a message
#                   that would stall a worker (default 10)
#   FUZZ_RSS_MB     memory limit in MiB; above it libFuzzer reports an out-of-memory (default 2048)
#   FUZZ_NICE       niceness of builds and runs (default 10; the machine is shared)
#
# The grown corpus goes to .dev/fuzz/corpus/<target>/ (not committed; worker/tests/fuzz_corpus.rs
# replays it when present); logs and report.txt to .dev/fuzz/. A crash, panic, timeout or OOM
# lands in fuzz/artifacts/<target>/ (not committed); the script prints how to minimize and replay
# it, and exits non-zero.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
SECONDS_PER=${FUZZ_SECONDS:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
SANITIZER=${FUZZ_SANITIZER:-none}
MAX_LEN=${FUZZ_MAX_LEN:-8192}
TIMEOUT=${FUZZ_TIMEOUT:-10}
RSS_MB=${FUZZ_RSS_MB:-2048}
NICE=${FUZZ_NICE:-10}
CARGO_FUZZ_VERSION=0.13.2

if ! command -v rustup >/dev/null; then
  echo "fuzz: rustup is required (cargo-fuzz runs on a nightly toolchain)" >&2
  exit 1
fi
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing the $TOOLCHAIN toolchain (rustup, minimal profile)" >&2
  rustup toolchain install "$TOOLCHAIN" --profile minimal
fi
if ! rustup run "$TOOLCHAIN" rustc --version | grep -qE 'nightly|dev'; then
  echo "fuzz: $TOOLCHAIN is not a nightly toolchain; cargo-fuzz needs one (FUZZ_TOOLCHAIN=nightly)" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io into ~/.cargo/bin" >&2
  cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

# The same options for build and run, so a run never rebuilds. Release build with debug
# assertions and overflow checks (cargo-fuzz's default); 16 codegen units build much faster than
# the default 1 at a small cost in speed. fuzz/Cargo.toml optimises only the decoding crates.
OPTS=(--sanitizer "$SANITIZER" --codegen-units 16)
fuzz() { nice -n "$NICE" cargo "+$TOOLCHAIN" fuzz "$@"; }
TARGETS=${FUZZ_TARGETS:-$(cargo "+$TOOLCHAIN" fuzz list)}

start=$(date +%s)
echo "fuzz: building $(echo $TARGETS | wc -w) targets (toolchain $TOOLCHAIN, sanitizer $SANITIZER)" >&2
if [ -z "${FUZZ_TARGETS:-}" ]; then
  fuzz build "${OPTS[@]}"
else
  for t in $TARGETS; do fuzz build "${OPTS[@]}" "$t"; done
fi
built=$(date +%s)

mkdir -p "$ROOT/.dev/fuzz"
report="$ROOT/.dev/fuzz/report.txt"
{
  echo "# $(date -u +%FT%TZ) $(rustup run "$TOOLCHAIN" rustc --version)"
  echo "# FUZZ_SECONDS=$SECONDS_PER FUZZ_SANITIZER=$SANITIZER FUZZ_MAX_LEN=$MAX_LEN FUZZ_TIMEOUT=$TIMEOUT FUZZ_RSS_MB=$RSS_MB; build $((built - start))s"
  printf '%-26s %6s %11s %8s %6s %6s %6s  %s\n' target time runs exec/s cov ft corpus result
} > "$report"
failed=0
for t in $TARGETS; do
  corpus="$ROOT/.dev/fuzz/corpus/$t"
  artifacts="$ROOT/fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  log="$ROOT/.dev/fuzz/$t.log"
  echo "fuzz: $t for ${SECONDS_PER}s" >&2
  status=0
  # New inputs go to the first directory (the grown corpus); the seeds are only read.
  fuzz run "${OPTS[@]}" "$t" "$corpus" "seeds/$t" -- \
    -max_total_time="$SECONDS_PER" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" \
    -max_len="$MAX_LEN" -print_final_stats=1 \
    > "$log" 2>&1 || status=$?
  runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  rate=$(grep -oE '^stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+' || echo 0)
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+' || echo 0)
  size=$(find "$corpus" -type f | wc -l)
  found=$(( $(find "$artifacts" -type f | wc -l) - before ))
  if [ "$status" -ne 0 ] || [ "$found" -gt 0 ]; then
    result="FOUND: exit $status, $found new in fuzz/artifacts/$t/ (log .dev/fuzz/$t.log)"
    failed=$((failed + 1))
  else
    result="nothing found"
  fi
  printf '%-26s %5ss %11s %8s %6s %6s %6s  %s\n' "$t" "$SECONDS_PER" "$runs" "$rate" "$cov" "$ft" "$size" "$result" | tee -a "$report"
done
echo "# total $(( $(date +%s) - start ))s" >> "$report"
echo "fuzz: report in $report; grown corpus in .dev/fuzz/corpus/" >&2
if [ "$failed" -gt 0 ]; then
  cat >&2 <<EOF
fuzz: $failed target(s) found a crash, panic, timeout or out-of-memory; the inputs are in fuzz/artifacts/<target>/.
  reproduce:  cd fuzz && cargo +$TOOLCHAIN fuzz run ${OPTS[*]} <target> artifacts/<target>/<file>
  minimize:   cd fuzz && cargo +$TOOLCHAIN fuzz tmin ${OPTS[*]} <target> artifacts/<target>/<file>
  then fix the product code and commit the minimized input as fuzz/seeds/<target>/<name>, which
  worker/tests/fuzz_corpus.rs replays in the normal test suite.
EOF
  exit 1
fi
