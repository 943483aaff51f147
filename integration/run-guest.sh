#!/usr/bin/env bash
# Boot the test guest (real QEMU, TCG) against an already-running
# vhost-user-blk backend and run the in-guest checks (see guest/init).
# Exits 0 only if the guest reported GUEST-DONE with no failed check.
#
# Usage: integration/run-guest.sh --socket PATH [options]
#   --socket PATH        vhost-user-blk socket of the backend (required)
#   --size BYTES         expected disk size in bytes
#   --serial STR         expected serial (virtio GET_ID); default: not checked
#   --ro yes|no          expected read-only flag (yes also checks writes fail)
#   --discard yes|no     discard expected to be offered (yes: blkdiscard must work)
#   --discard-zeroes yes|no  discarded range must read back as zeroes (default yes)
#   --write-zeroes yes|no    WRITE_ZEROES expected (yes: BLKZEROOUT must zero a range)
#   --wcache back|through    expected guest write-cache mode (FLUSH offered = back)
#   --queues N           num-queues of the vhost-user-blk-pci device (default 1)
#   --expect-queues N    blk-mq hw queues the guest must see (default min(N, smp))
#   --queue-size N       virtqueue size of the device (QEMU default if unset)
#   --fio-size SIZE      bytes per fio job, fio units (default 8M)
#   --fio-runtime SEC    cap per fio job (default 60)
#   --fio-jobs N         parallel jobs in the multi-queue fio job (default: hw queues)
#   --fio-offset BYTES   start of the fio region (default 0)
#   --no-fio             skip the fio jobs
#   --hash LEN:MD5    the first LEN bytes must hash to MD5 (checked before writes)
#   --dump-hash LEN      guest prints "HASH len=LEN md5=..." after the tests
#   --files write|check  after the other tests: write = make an ext2 over the whole
#                        disk and write 16 fsynced files + their md5 list; check =
#                        mount it read-only and verify the files
#   --restart-load SEC   a SEC-second load (guest/init dbt.restartload) during
#                        which the host may kill and restart the backend
#   --restart-verify yes|no  its writes are checksummed and verified (default yes)
#   --set-wcache back|through  the guest sets the disk's cache mode (sysfs
#                        cache_type, virtio CONFIG_WCE) before the restart load
#   --reconnect-ms MS    QEMU reconnects to a backend that went away (chardev
#                        reconnect-ms), as a VM meant to survive restarts would
#   --log FILE           serial log (default: integration/build/logs/guest-<time>-<pid>.log)
#   --timeout SEC        kill the VM after SEC seconds (default 240)
#   --smp N / --mem MB   guest CPUs (default 2) / memory (default 512)
#   --kernel-log         do not pass "quiet" (full kernel log on the console)
#   --demo               stream the guest console live, chatty guest output
#   --no-build           do not (re)build the guest image first
# Exit: 0 pass, 1 a check failed, 2 usage error, 3 VM/harness failure (timeout,
# QEMU error, no GUEST-DONE).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }

SOCK= SIZE= SERIAL= SERIAL_SET=0 RO= DISCARD= DZERO=1 WZEROES= WCACHE= QUEUES=1 EXPECT_Q= QSIZE=
FIO=1 FIO_SIZE=8M FIO_RUNTIME=60 FIO_JOBS= FIO_OFFSET=0 HASH= DUMPHASH= LOG= TIMEOUT=240
SMP=2 MEM=512 QUIET=quiet DEMO=0 BUILD=1 FILES= RESTARTLOAD= RESTARTVERIFY=1 RECONNECT= SETWCACHE=

yesno() { case "$2" in yes|1|on|true) echo 1 ;; no|0|off|false) echo 0 ;; *) die "$1 wants yes|no, got '$2'" ;; esac; }
isnum() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 wants a number, got '$2'"; echo "$2"; }

while [ $# -gt 0 ]; do
    opt=$1
    case $opt in
        -h|--help) usage 0 ;;
        --no-fio) FIO=0; shift; continue ;;
        --kernel-log) QUIET=; shift; continue ;;
        --demo) DEMO=1; shift; continue ;;
        --no-build) BUILD=0; shift; continue ;;
    esac
    [ $# -ge 2 ] || { echo "error: $opt needs a value" >&2; usage; }
    val=$2
    shift 2
    case $opt in
        --socket) SOCK=$val ;;
        --size) SIZE=$(isnum "$opt" "$val") ;;
        --serial) SERIAL=$val; SERIAL_SET=1 ;;
        --ro) RO=$(yesno "$opt" "$val") ;;
        --discard) DISCARD=$(yesno "$opt" "$val") ;;
        --discard-zeroes) DZERO=$(yesno "$opt" "$val") ;;
        --write-zeroes) WZEROES=$(yesno "$opt" "$val") ;;
        --wcache) case $val in back|through) WCACHE=$val ;; *) die "--wcache wants back|through" ;; esac ;;
        --queues) QUEUES=$(isnum "$opt" "$val") ;;
        --expect-queues) EXPECT_Q=$(isnum "$opt" "$val") ;;
        --queue-size) QSIZE=$(isnum "$opt" "$val") ;;
        --fio-size) [[ "$val" =~ ^[0-9]+[kKmMgG]?$ ]] || die "--fio-size: bad size '$val'"; FIO_SIZE=$val ;;
        --fio-runtime) FIO_RUNTIME=$(isnum "$opt" "$val") ;;
        --fio-jobs) FIO_JOBS=$(isnum "$opt" "$val") ;;
        --fio-offset) FIO_OFFSET=$(isnum "$opt" "$val") ;;
        --hash) [[ "$val" =~ ^[0-9]+:[0-9a-f]{32}$ ]] || die "--hash wants LEN:MD5HEX (32 hex digits)"; HASH=$val ;;
        --dump-hash) DUMPHASH=$(isnum "$opt" "$val") ;;
        --files) case $val in write|check) FILES=$val ;; *) die "--files wants write|check" ;; esac ;;
        --restart-load) RESTARTLOAD=$(isnum "$opt" "$val") ;;
        --restart-verify) RESTARTVERIFY=$(yesno "$opt" "$val") ;;
        --set-wcache) case $val in back|through) SETWCACHE=$val ;; *) die "--set-wcache wants back|through" ;; esac ;;
        --reconnect-ms) RECONNECT=$(isnum "$opt" "$val") ;;
        --log) LOG=$val ;;
        --timeout) TIMEOUT=$(isnum "$opt" "$val") ;;
        --smp) SMP=$(isnum "$opt" "$val") ;;
        --mem) MEM=$(isnum "$opt" "$val") ;;
        *) echo "error: unknown option $opt" >&2; usage ;;
    esac
done
[ -n "$SOCK" ] || { echo "error: --socket is required" >&2; usage; }
[ -S "$SOCK" ] || die "no vhost-user socket at $SOCK (is the backend running?)"
[ "$QUEUES" -ge 1 ] || die "--queues must be >= 1"
[ -n "$EXPECT_Q" ] || EXPECT_Q=$(( QUEUES < SMP ? QUEUES : SMP ))
[ -n "$FIO_JOBS" ] || FIO_JOBS=$EXPECT_Q

ensure_qemu
if [ "$BUILD" = 1 ]; then "$HERE/guest/build.sh"; fi
KERNEL="$BUILD_DIR/vmlinuz"
INITRD="$BUILD_DIR/initramfs.cpio"
[ -s "$KERNEL" ] && [ -s "$INITRD" ] || die "guest not built; run integration/guest/build.sh"

if [ -z "$LOG" ]; then
    mkdir -p "$BUILD_DIR/logs"
    LOG="$BUILD_DIR/logs/guest-$(date -u +%Y%m%dT%H%M%S)-$$.log"
fi
mkdir -p "$(dirname "$LOG")"
QLOG="${LOG%.log}.qemu.log"
: >"$LOG"
: >"$QLOG"

# ---- kernel command line -------------------------------------------------
# no_timer_check: skip the IO-APIC timer probe, flaky under a loaded TCG host
APPEND="console=ttyS0 $QUIET panic=-1 mitigations=off no_timer_check"
APPEND+=" dbt.queues=$EXPECT_Q dbt.dzero=$DZERO dbt.fio=$FIO dbt.fio_size=$FIO_SIZE"
APPEND+=" dbt.fio_runtime=$FIO_RUNTIME dbt.fio_jobs=$FIO_JOBS dbt.fio_offset=$FIO_OFFSET dbt.demo=$DEMO"
[ -z "$SIZE" ] || APPEND+=" dbt.size=$SIZE"
[ -z "$RO" ] || APPEND+=" dbt.ro=$RO"
[ -z "$DISCARD" ] || APPEND+=" dbt.discard=$DISCARD"
[ -z "$WZEROES" ] || APPEND+=" dbt.wzeroes=$WZEROES"
[ -z "$WCACHE" ] || APPEND+=" dbt.wcache=$WCACHE"
[ -z "$HASH" ] || APPEND+=" dbt.hash=$HASH"
[ -z "$DUMPHASH" ] || APPEND+=" dbt.dumphash=$DUMPHASH"
[ -z "$FILES" ] || APPEND+=" dbt.files=$FILES"
[ -z "$RESTARTLOAD" ] || APPEND+=" dbt.restartload=$RESTARTLOAD dbt.restartverify=$RESTARTVERIFY"
[ -z "$SETWCACHE" ] || APPEND+=" dbt.setwcache=$SETWCACHE"
if [ "$SERIAL_SET" = 1 ]; then
    # hex, so any bytes survive the kernel command line
    APPEND+=" dbt.serial=$(printf '%s' "$SERIAL" | od -An -v -tx1 | tr -d ' \n')"
fi

DEV="vhost-user-blk-pci,chardev=c0,num-queues=$QUEUES"
CHARDEV="socket,id=c0,path=$SOCK"
[ -z "$RECONNECT" ] || CHARDEV+=",reconnect-ms=$RECONNECT"
[ -z "$QSIZE" ] || DEV+=",queue-size=$QSIZE"

# shellcheck disable=SC2054  # commas belong to QEMU option values
QEMU_ARGS=(
    -accel tcg -cpu max -m "$MEM" -smp "$SMP"
    -nographic -nodefaults -no-user-config -no-reboot
    -monitor none -serial "file:$LOG"
    -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem
    -chardev "$CHARDEV"
    -device "$DEV"
    -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
)

QPID= TAILPID=
cleanup() {
    local rc=$?
    [ -z "$TAILPID" ] || { kill "$TAILPID" 2>/dev/null || true; wait "$TAILPID" 2>/dev/null || true; }
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$DEMO" = 1 ] && log "qemu-system-x86_64 ${QEMU_ARGS[*]}"
t0=$(date +%s.%N)
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" </dev/null >>"$QLOG" 2>&1 &
QPID=$!
if [ "$DEMO" = 1 ]; then
    # live console, without the firmware's terminal escape sequences; tail
    # ends by itself once QEMU is gone
    tail -n +1 -F --pid="$QPID" "$LOG" 2>/dev/null \
        | sed -u 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; s/\r//g' &
    TAILPID=$!
fi
qrc=0
wait "$QPID" || qrc=$?
QPID=
t1=$(date +%s.%N)
if [ -n "$TAILPID" ]; then wait "$TAILPID" 2>/dev/null || true; TAILPID=; fi
ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')

# ---- verdict -------------------------------------------------------------
CLEAN="$(sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; s/\r//g' "$LOG")"
results="$(grep -E '^RESULT name=[^ ]+ status=(PASS|FAIL|SKIP) ' <<<"$CLEAN" || true)"
done_line="$(grep -E '^GUEST-DONE pass=[0-9]+ fail=[0-9]+ skip=[0-9]+' <<<"$CLEAN" | tail -n1 || true)"
n_pass=$(grep -c ' status=PASS ' <<<"$results" || true)
n_fail=$(grep -c ' status=FAIL ' <<<"$results" || true)
n_skip=$(grep -c ' status=SKIP ' <<<"$results" || true)

if [ "$DEMO" = 0 ] && [ -n "$results" ]; then
    sed 's/^/  /' <<<"$results"
fi
grep -E '^HASH ' <<<"$CLEAN" | sed 's/^/  /' || true

verdict=0 why=
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    verdict=3 why="timeout after ${TIMEOUT}s"
elif [ -z "$done_line" ]; then
    verdict=3 why="guest did not finish (no GUEST-DONE; qemu exit $qrc)"
else
    read -r g_pass g_fail g_skip < <(sed 's/GUEST-DONE pass=\([0-9]*\) fail=\([0-9]*\) skip=\([0-9]*\).*/\1 \2 \3/' <<<"$done_line")
    if [ "$g_pass" != "$n_pass" ] || [ "$g_fail" != "$n_fail" ] || [ "$g_skip" != "$n_skip" ]; then
        # a RESULT line got mangled on the console (e.g. kernel message interleaved)
        verdict=3 why="RESULT lines ($n_pass/$n_fail/$n_skip) disagree with $done_line"
    elif [ "$g_fail" -gt 0 ]; then
        verdict=1 why="$g_fail check(s) failed"
    elif [ "$g_pass" -eq 0 ]; then
        verdict=3 why="no check passed"
    elif [ "$qrc" != 0 ]; then
        verdict=3 why="qemu exited $qrc"
    fi
fi

if [ "$verdict" = 0 ]; then
    echo "GUEST PASS pass=$n_pass skip=$n_skip time=${ELAPSED}s log=$LOG"
else
    echo "GUEST FAIL ($why) pass=$n_pass fail=$n_fail skip=$n_skip time=${ELAPSED}s log=$LOG"
    if [ "$verdict" = 3 ]; then
        echo "--- last lines of the serial log ($LOG) ---"
        tail -n 30 <<<"$CLEAN" | sed 's/^/  | /'
        if [ -s "$QLOG" ]; then
            echo "--- qemu output ($QLOG) ---"
            tail -n 20 "$QLOG" | sed 's/^/  | /'
        fi
    fi
fi
exit "$verdict"
