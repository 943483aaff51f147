#!/usr/bin/env bash
# driveblk demo: a VM disk that lives on a remote, booted lazily.
#  1. builds driveblk and makes a 256 MiB qcow2 image with some data in it;
#  2. imports it into a remote volume (a `dir:` remote: a local folder, the
#     embedded default; Google Drive comes next) and deletes the local copy;
#  3. serves the volume with an empty cache over vhost-user-blk and boots a
#     real Linux guest (QEMU, TCG) on it: the guest checks the disk's contents,
#     runs fio with crc32c verification, discard and flushes;
#  4. shows the cache statistics (`driveblk status`), stops driveblk cleanly
#     (which saves the boot profile it recorded to the remote);
#  5. "another machine": boots again, read-only, from a second, empty cache;
#     driveblk streams the boot profile ahead of the guest;
#  6. exports the volume with the first guest's writes and checks it with
#     qemu-img.
# Installs what it needs on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
. integration/lib.sh

scripts/deps.sh
log "building driveblk (release)"
cargo build --release --quiet --bin driveblk
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/driveblk

work=$(mktemp -d /tmp/driveblk-demo.XXXXXX)
pid=
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

size=$((256 << 20))
img=$work/demo.qcow2
url=dir:$work/remote/demo
cache=$work/cache
sock=$work/driveblk.sock

log "1. making a 256 MiB qcow2 image with 64 MiB of data"
head -c $((64 << 20)) /dev/urandom > "$work/data.raw"
truncate -s $size "$work/data.raw"
qemu-img convert -q -f raw -O qcow2 "$work/data.raw" "$img"
want=$(md5sum < "$work/data.raw" | cut -d' ' -f1)
rm "$work/data.raw"

log "2. importing it as a remote volume: $url"
mkdir -p "$work/remote"
"$BIN" import --quiet "$img" "$url"
rm "$img"

log "3. serving the volume from an empty cache, booting a guest on it"
"$BIN" serve --socket "$sock" --volume "$url" --format qcow2 --cache-dir "$cache" \
  --num-queues 2 --serial driveblk-demo >"$work/driveblk.log" 2>&1 &
pid=$!
wait_for_socket "$sock" "$pid" 30
integration/run-guest.sh --socket "$sock" --size $size --serial driveblk-demo --queues 2 \
  --hash "$size:$want" --fio-size 16M --demo

log "4. cache statistics while the daemon runs:"
sleep 1.2
"$BIN" status --cache-dir "$cache" | sed 's/^/    /'

log "stopping driveblk (SIGTERM: finish in-flight I/O, flush, close)"
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
pid=
log "driveblk exited with status $rc"
[ "$rc" = 0 ]

log "the volume now has a boot profile:"
"$BIN" info "$url" | sed 's/^/    /'

log "5. another machine: an empty cache, read-only; the boot profile streams ahead of the guest"
# The first guest's writes live in the first cache (uploading them is the
# write-back issue), so this one sees the volume as imported.
"$BIN" serve --socket "$sock" --volume "$url" --format qcow2 --cache-dir "$work/cache2" \
  --read-only --serial driveblk-demo >"$work/driveblk2.log" 2>&1 &
pid=$!
wait_for_socket "$sock" "$pid" 30
integration/run-guest.sh --socket "$sock" --size $size --serial driveblk-demo --ro yes \
  --hash "$size:$want" --no-fio --demo
sleep 1.2
"$BIN" status --cache-dir "$work/cache2" | sed 's/^/    /'
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ]

log "6. exporting the volume with the first guest's writes and checking it with qemu-img"
"$BIN" export --quiet "$url" "$work/exported.qcow2" --cache-dir "$cache"
qemu-img check -f qcow2 "$work/exported.qcow2" | sed 's/^/    /'
log "driveblk log:"
sed 's/^/    /' "$work/driveblk.log"
log "demo finished: the guest booted from a remote volume, verified its I/O, and the result is a consistent image"
