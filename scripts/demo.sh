#!/usr/bin/env bash
# driveblk demo: builds driveblk, creates a small qcow2 image, serves it over
# vhost-user-blk, boots a real Linux guest (QEMU, TCG) on it, runs verified
# I/O inside the guest (fio with crc32c), shuts everything down cleanly and
# checks the image with qemu-img. Installs what it needs on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
. integration/lib.sh

scripts/deps.sh
log "building driveblk (release)"
cargo build --release --quiet --bin driveblk
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/driveblk

work=$(mktemp -d /tmp/driveblk-demo.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

img=$work/demo.qcow2
sock=$work/driveblk.sock
qemu-img create -q -f qcow2 "$img" 256M
log "created $img: $(qemu-img info --output=json "$img" | grep -o '"virtual-size": [0-9]*')"

"$BIN" serve --socket "$sock" --image "$img" --format qcow2 --num-queues 2 --serial driveblk-demo \
  >"$work/driveblk.log" 2>&1 &
pid=$!
wait_for_socket "$sock" "$pid" 30
log "driveblk is serving on $sock (pid $pid)"

log "booting a Linux guest on it (TCG, ~10-40 s)"
integration/run-guest.sh --socket "$sock" --size $((256 << 20)) --serial driveblk-demo --queues 2 \
  --fio-size 16M --demo

log "stopping driveblk (SIGTERM: finish in-flight I/O, flush, close)"
kill -TERM "$pid"
wait "$pid"; rc=$?
pid=
log "driveblk exited with status $rc"
log "qemu-img check of the image the guest wrote:"
qemu-img check -f qcow2 "$img"
log "image now holds $(qemu-img info --output=json "$img" | grep -o '"actual-size": [0-9]*') bytes on disk"
log "driveblk log:"
sed 's/^/    /' "$work/driveblk.log"
log "demo finished: guest I/O verified, image consistent"
