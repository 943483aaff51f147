#!/usr/bin/env bash
# Runs every driveblk test: Rust unit and integration tests (libblkio as the
# client, qemu-img/qemu-io as the QCOW2 oracle), then real Linux guests under
# QEMU against the daemon. Installs what it needs first.
#
#   scripts/test.sh            # everything CI runs
#   SOAK=1 scripts/test.sh     # plus 10 minutes of fuzzing per target and the slow (ignored) benchmark tests
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

# Totals over every stage, for the closing line: tests and guest cases.
passed=0
failed=0
stages_failed=0
log=$(mktemp)
# What failed, repeated at the very end: CI keeps only the tail of the output.
failures=$(mktemp)
trap 'rm -f "$log" "$failures"' EXIT
stage() { # name, command...
  local name=$1; shift
  echo "=== $name"
  local t0=$SECONDS rc=0
  "$@" 2>&1 | tee "$log" || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    stages_failed=$((stages_failed + 1)); echo "=== $name: FAILED ($((SECONDS - t0)) s)"
  fi
}
count() { # passed-regex failed-regex: add the numbers the last stage printed
  local p f
  p=$(grep -oE "$1" "$log" | grep -oE '[0-9]+' | tail -1 || true)
  f=$(grep -oE "$2" "$log" | grep -oE '[0-9]+' | tail -1 || true)
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
}

# nextest's line for a test that did not pass.
failed_test='^ +(FAIL|SIGSEGV|SIGABRT|SIGKILL|TIMEOUT|LEAK)'
rust_failures() { # the failing tests of the last nextest stage, for the closing report
  grep -qE "$failed_test" "$log" || return 0
  { echo "--- $1 that failed, why, and the end of their output:"
    sed -n '/^ *Summary \[/,$p' "$log" >"$failures.rust"
    [ -s "$failures.rust" ] || cp "$log" "$failures.rust"
    grep -E "$failed_test" "$failures.rust" || true
    { grep -A8 'panicked at' "$failures.rust" || true; } | head -60
    echo "--- (end of output)"; tail -60 "$failures.rust"; rm -f "$failures.rust"; } >>"$failures"
}

cargo build --workspace --all-targets
# A failing test's output is printed again after nextest's summary; that
# part goes to the closing report too.
stage "rust tests" cargo nextest run --workspace --no-fail-fast --failure-output immediate-final
count '[0-9]+ passed' '[0-9]+ failed'
rust_failures "rust tests"
if [ -x integration/run-all.sh ]; then
  stage "guest tests" integration/run-all.sh "${CARGO_TARGET_DIR:-$PWD/target}/debug/driveblk"
  passed=$((passed + $(grep -cE '^  [a-z0-9-]+ +PASS ' "$log" || true)))
  guest_failed=$(grep -E '^  [a-z0-9-]+ +FAIL ' "$log" || true)
  if [ -n "$guest_failed" ]; then
    failed=$((failed + $(grep -c . <<<"$guest_failed")))
    { echo "--- guest cases that failed:"; echo "$guest_failed"; } >>"$failures"
  fi
fi

# The parsers under libFuzzer: every target briefly here (3 minutes in
# all), each for 10 minutes with SOAK=1. Each run starts from its seeds
# (fuzz/seeds/<target>) and the regression corpus (fuzz/regressions/<target>:
# inputs that once found a bug, kept so they are replayed every run); what
# the run discovers goes to a temporary corpus and is dropped. FUZZ_TARGETS
# (target:seconds ...) overrides the list and the CI times.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP enables them on stable.
FUZZ_TARGETS=${FUZZ_TARGETS:-"qcow2_open:60 virtio_request:30 volume_meta:30 pack_decode:30 profile_index:30 cache_state:30 subframe_index:30"}
fuzz_one() { # target seconds
  local corpus dirs=()
  corpus=$(mktemp -d)
  for d in "fuzz/seeds/$1" "fuzz/regressions/$1"; do [ -d "$d" ] && dirs+=("$d"); done
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$1" "$corpus" "${dirs[@]}" -- \
    -max_total_time="$2" -rss_limit_mb=2048 -print_final_stats=1
  local rc=$?
  rm -rf "$corpus"
  return $rc
}
fuzz_stage() { # seconds for every target, or "" for the CI times
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build) || { stages_failed=$((stages_failed + 1)); return; }
  local spec target secs
  for spec in $FUZZ_TARGETS; do
    target=${spec%%:*}
    secs=${1:-${spec##*:}}
    stage "fuzz $target ($secs s)" fuzz_one "$target" "$secs"
    if grep -q 'Done [0-9]* runs' "$log"; then passed=$((passed + 1)); else
      failed=$((failed + 1)); { echo "--- fuzz $target failed:"; tail -40 "$log"; } >>"$failures"
    fi
  done
}
if [ "${SOAK:-0}" = 1 ]; then
  fuzz_stage 600
  stage "slow tests (ignored by default: benchmarks of the tier and qcow2 engine)" \
    cargo nextest run --workspace --run-ignored ignored-only --release --failure-output immediate-final
  count '[0-9]+ passed' '[0-9]+ failed'
  rust_failures "slow tests"
else
  fuzz_stage ""
fi

# A stage that failed without printing a count (a build error, a crash)
# still counts as a failure.
if [ "$stages_failed" -gt 0 ] && [ "$failed" -eq 0 ]; then failed=$stages_failed; fi
if [ -s "$failures" ]; then echo "=== what failed"; cat "$failures"; fi
echo "test.sh: $passed passed, $failed failed"
[ "$stages_failed" -eq 0 ] && [ "$failed" -eq 0 ]
