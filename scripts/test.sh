#!/usr/bin/env bash
# Runs every driveblk test: Rust unit and integration tests (libblkio as the
# client, qemu-img/qemu-io as the QCOW2 oracle), then real Linux guests under
# QEMU against the daemon. Installs what it needs first.
#
#   scripts/test.sh            # everything CI runs
#   SOAK=1 scripts/test.sh     # plus the slow soak / crash-loop tests
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

passed=0
failed=0
stage() { # name, command...
  local name=$1; shift
  echo "=== $name"
  local t0=$SECONDS
  if "$@"; then
    passed=$((passed + 1)); echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1)); echo "=== $name: FAILED ($((SECONDS - t0)) s)"
  fi
}

cargo build --workspace --all-targets
stage "rust tests" cargo nextest run --workspace --no-fail-fast
if [ -x integration/run-all.sh ]; then
  stage "guest tests" integration/run-all.sh "${CARGO_TARGET_DIR:-$PWD/target}/debug/driveblk"
fi

echo "test.sh: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
