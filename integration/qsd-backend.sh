#!/usr/bin/env bash
# Serve an image over vhost-user-blk with qemu-storage-daemon (reference
# backend), in the foreground until SIGINT/SIGTERM.
# Usage: integration/qsd-backend.sh --socket PATH --image FILE
#          [--format raw|qcow2] [--read-only] [--num-queues N]
# Example (two terminals):
#   integration/qsd-backend.sh --socket /tmp/vb.sock --image /tmp/disk.img --num-queues 2
#   integration/run-guest.sh --socket /tmp/vb.sock --size 67108864 --queues 2 --demo
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

SOCK= IMG= FMT=raw RO=0 NQ=1
while [ $# -gt 0 ]; do
    case $1 in
        --socket) SOCK=${2:?}; shift 2 ;;
        --image) IMG=${2:?}; shift 2 ;;
        --format) FMT=${2:?}; shift 2 ;;
        --read-only) RO=1; shift ;;
        --num-queues) NQ=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[ -n "$SOCK" ] && [ -n "$IMG" ] || die "--socket and --image are required"
[ -f "$IMG" ] || die "no image at $IMG"
case $FMT in raw|qcow2) ;; *) die "--format must be raw or qcow2" ;; esac
ensure_qemu

QSD_PID=
QSD_LOG="$(mktemp "${TMPDIR:-/tmp}/qsd.XXXXXX.log")"
cleanup() {
    [ -z "$QSD_PID" ] || stop_pid "$QSD_PID" 10 || true
    rm -f "$SOCK" "$QSD_LOG"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start_qsd "$SOCK" "$IMG" "$FMT" "$NQ" "$RO" "$QSD_LOG"
log "qemu-storage-daemon (pid $QSD_PID) serving $IMG ($FMT, queues=$NQ, ro=$RO) on $SOCK; Ctrl-C stops it"
tail -n +1 -f --pid="$QSD_PID" "$QSD_LOG" &
wait "$QSD_PID" || die "qemu-storage-daemon exited with $?"
