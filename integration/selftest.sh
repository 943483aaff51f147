#!/usr/bin/env bash
# Prove the harness can fail: boot guests against qemu-storage-daemon with
# wrong expectations and with injected I/O errors (blkdebug), and check that
# run-guest.sh reports FAIL (exit 1) for each and PASS for a correct run.
# Usage: integration/selftest.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

ensure_qemu
"$HERE/guest/build.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/driveblk-selftest.XXXXXX")"
LOGDIR="$BUILD_DIR/logs/selftest-$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$LOGDIR"
QPID=
cleanup() {
    local rc=$?
    trap - INT TERM
    if [ -n "$QPID" ]; then stop_pid "$QPID" 5 || true; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SIZE=$((32 * 1048576))
IMG="$WORK/disk.raw"
SOCK="$WORK/vb.sock"
FAILS=0

# qsd_up [extra blockdev layer: blkdebug options]
qsd_up() {
    rm -f "$IMG" "$SOCK"
    truncate -s "$SIZE" "$IMG"
    local top=file0 extra=()
    if [ -n "${1:-}" ]; then
        extra=(--blockdev "driver=blkdebug,node-name=dbg,image=file0,$1")
        top=dbg
    fi
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$IMG,discard=unmap" "${extra[@]}" \
        --blockdev "driver=raw,node-name=disk0,file=$top,discard=unmap" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1" \
        >"$LOGDIR/qsd.log" 2>&1 &
    QPID=$!
    wait_for_socket "$SOCK" "$QPID" 15 || die "qemu-storage-daemon did not start: $(cat "$LOGDIR/qsd.log")"
}
qsd_down() { stop_pid "$QPID" 5 || true; QPID=; }

# expect NAME WANT_RC run-guest-args...
expect() {
    local name=$1 want=$2 rc=0
    shift 2
    echo "--- selftest $name: expecting run-guest.sh exit $want"
    "$HERE/run-guest.sh" --socket "$SOCK" --no-build --fio-size 2M --timeout 240 \
        --log "$LOGDIR/$name.serial.log" "$@" || rc=$?
    if [ "$rc" = "$want" ]; then
        echo "SELFTEST $name: ok (exit $rc)"
    else
        echo "SELFTEST $name: WRONG (exit $rc, wanted $want)"
        FAILS=$((FAILS + 1))
    fi
}

qsd_up
expect correct 0 --size "$SIZE" --ro no --discard yes --serial vhost_user_blk
expect wrong-size 1 --size $((SIZE + 512)) --no-fio
expect wrong-serial 1 --size "$SIZE" --serial not-this-one --no-fio
expect wrong-hash 1 --size "$SIZE" --hash "$SIZE:00000000000000000000000000000000" --no-fio
expect wrong-ro 1 --size "$SIZE" --ro yes --no-fio
expect wrong-queues 1 --size "$SIZE" --expect-queues 2 --no-fio
qsd_down

# every write fails with EIO: fio and the dmesg check must catch it
qsd_up "inject-error.0.event=pwritev,inject-error.0.errno=5,inject-error.0.immediately=on"
expect write-eio 1 --size "$SIZE"
qsd_down

echo
if [ "$FAILS" = 0 ]; then
    echo "SELFTEST PASS: the harness passes a good backend and fails every broken expectation (logs: $LOGDIR)"
else
    echo "SELFTEST FAIL: $FAILS scenario(s) not detected (logs: $LOGDIR)"
    exit 1
fi
