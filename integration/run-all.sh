#!/usr/bin/env bash
# Run the real-guest suite against a vhost-user-blk backend: for each case,
# make an image, start the backend, boot the guest (run-guest.sh), stop the
# backend, then check the image on the host.
#
# Usage: integration/run-all.sh [options] [DRIVEBLK_BIN]
#   DRIVEBLK_BIN             driveblk binary (default backend when given;
#                            also --bin PATH)
#   --backend driveblk|qsd   which backend to test (qsd = qemu-storage-daemon,
#                            the reference; default driveblk)
#   --skip-qcow2             skip the qcow2 cases (also DRIVEBLK_SKIP_QCOW2=1)
#   --only a,b               run only these cases (names below)
#   --expect-discard yes|no|any   discard offered by the backend (default yes)
#   --expect-write-zeroes yes|no|any  WRITE_ZEROES offered (default yes)
#   --expect-wcache back|through|any  guest write-cache mode (default: back
#                            for driveblk, any for qsd, which is write-through)
#   --fio-size SIZE          bytes per fio job (default 8M)
#   --timeout SEC            per guest boot (default 240)
#   --demo                   stream guest consoles
#   --keep                   keep the work directory (images, logs)
#   --list                   list the cases and exit
# Cases: raw-1q raw-2q raw-4q raw-ro-serial raw-big qcow2-2q qcow2-empty
#        volume-qcow2 volume-profile-ro volume-wb-2nd-machine
#        qcow2-compressed-ro volume-gdrive-2nd-machine restart-kill9
#        restart-kill9-verify restart-term
#                              (--list; details at the bottom of this file)
# Exit 0 only if every case passed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

ALL_CASES=(raw-1q raw-2q raw-4q raw-ro-serial raw-big qcow2-2q qcow2-empty volume-qcow2 volume-profile-ro volume-wb-2nd-machine qcow2-compressed-ro volume-gdrive-2nd-machine restart-kill9 restart-kill9-verify restart-term)
VOLUME_URL= VOLUME_CACHE=
SERVE_EXTRA=()   # more `driveblk serve` arguments for the next start_backend
SOCKET_WAIT=15   # seconds start_backend waits for the socket
BACKEND= BIN= SKIP_QCOW2=${DRIVEBLK_SKIP_QCOW2:-0} ONLY= EXP_DISCARD=yes EXP_WZEROES=yes EXP_WCACHE=
FIO_SIZE=8M TIMEOUT=240 DEMO=0 KEEP=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage 0 ;;
        --list) printf '%s\n' "${ALL_CASES[@]}"; exit 0 ;;
        --backend) BACKEND=${2:?--backend needs a value}; shift 2 ;;
        --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
        --skip-qcow2) SKIP_QCOW2=1; shift ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --expect-discard) EXP_DISCARD=${2:?}; shift 2 ;;
        --expect-write-zeroes) EXP_WZEROES=${2:?}; shift 2 ;;
        --expect-wcache) EXP_WCACHE=${2:?}; shift 2 ;;
        --fio-size) FIO_SIZE=${2:?}; shift 2 ;;
        --timeout) TIMEOUT=${2:?}; shift 2 ;;
        --demo) DEMO=1; shift ;;
        --keep) KEEP=1; shift ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$BIN" ] || die "more than one binary given"; BIN=$1; shift ;;
    esac
done
[ -n "$BACKEND" ] || BACKEND=driveblk
case $BACKEND in
    driveblk)
        [ -n "$BIN" ] || die "give the driveblk binary (run-all.sh PATH/TO/driveblk), or --backend qsd"
        [ -x "$BIN" ] || die "driveblk binary not found or not executable: $BIN"
        BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" ;;
    qsd) ;;
    *) die "--backend must be driveblk or qsd" ;;
esac
case $EXP_DISCARD in yes|no|any) ;; *) die "--expect-discard yes|no|any" ;; esac
case $EXP_WZEROES in yes|no|any) ;; *) die "--expect-write-zeroes yes|no|any" ;; esac
if [ -z "$EXP_WCACHE" ]; then
    if [ "$BACKEND" = driveblk ]; then EXP_WCACHE=back; else EXP_WCACHE=any; fi
fi
case $EXP_WCACHE in back|through|any) ;; *) die "--expect-wcache back|through|any" ;; esac
for c in ${ONLY//,/ }; do
    [[ " ${ALL_CASES[*]} " == *" $c "* ]] || die "unknown case '$c' (see --list)"
done

ensure_qemu
"$HERE/guest/build.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/driveblk-integ.XXXXXX")"
LOGDIR="$BUILD_DIR/logs/run-$(date -u +%Y%m%dT%H%M%S)-$BACKEND"
mkdir -p "$LOGDIR"
BPID= GPID= EMU_PID=
[ -z "${XDG_CACHE_HOME+set}" ] || ORIG_XDG_CACHE_HOME=$XDG_CACHE_HOME
cleanup() {
    local rc=$?
    trap - INT TERM
    # run-guest.sh stops its QEMU on TERM
    if [ -n "$GPID" ]; then stop_pid "$GPID" 15 || true; fi
    if [ -n "$BPID" ]; then stop_pid "$BPID" 5 || true; fi
    if [ -n "$EMU_PID" ]; then stop_pid "$EMU_PID" 5 || true; fi
    if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- images --------------------------------------------------------------
# Random data in a few regions (one crossing a 64 KiB cluster boundary), the
# rest sparse zeroes, so reads of existing data are checked by hash.
make_raw() { # FILE BYTES
    rm -f "$1"
    truncate -s "$2" "$1"
    head -c $((3 * 1048576)) /dev/urandom | dd of="$1" bs=1M seek=0 conv=notrunc status=none
    head -c 200000 /dev/urandom | dd of="$1" oflag=seek_bytes seek=$((9 * 1048576 - 4096)) conv=notrunc status=none
    head -c 65536 /dev/urandom | dd of="$1" oflag=seek_bytes seek=$(($2 - 65536)) conv=notrunc status=none
}
raw_hash() { head -c "$2" "$1" | md5sum | cut -d' ' -f1; }   # FILE LEN
img_hash() { # FILE FORMAT LEN -> md5 of the first LEN guest-visible bytes
    if [ "$2" = raw ]; then
        raw_hash "$1" "$3"
    else
        qemu-img convert -f "$2" -O raw "$1" "$WORK/convert.raw"
        raw_hash "$WORK/convert.raw" "$3"
        rm -f "$WORK/convert.raw"
    fi
}

# ---- backends ------------------------------------------------------------
# start_backend SOCK IMG FMT QUEUES RO(0|1) SERIAL LOG -> sets BPID
start_backend() {
    local sock=$1 img=$2 fmt=$3 nq=$4 ro=$5 serial=$6 blog=$7
    case $BACKEND in
        qsd) start_qsd "$sock" "$img" "$fmt" "$nq" "$ro" "$blog"; BPID=$QSD_PID ;;
        driveblk)
            local args=(serve --socket "$sock" --format "$fmt" --num-queues "$nq" --log-level info)
            if [ -n "$VOLUME_URL" ]; then args+=(--volume "$VOLUME_URL" --cache-dir "$VOLUME_CACHE")
            else args+=(--image "$img"); fi
            [ "$ro" = 0 ] || args+=(--read-only)
            [ -z "$serial" ] || args+=(--serial "$serial")
            args+=("${SERVE_EXTRA[@]}")
            rm -f "$sock"
            echo "+ $BIN ${args[*]}" >"$blog"
            NO_COLOR=1 "$BIN" "${args[@]}" >>"$blog" 2>&1 &
            BPID=$!
            if ! wait_for_socket "$sock" "$BPID" "$SOCKET_WAIT"; then
                sed 's/^/  | /' "$blog" >&2
                kill -KILL "$BPID" 2>/dev/null && wait "$BPID" 2>/dev/null
                BPID=
                return 1
            fi ;;
    esac
}
# The serial a backend reports: qsd always answers GET_ID with this.
expected_serial() { if [ "$BACKEND" = qsd ]; then echo vhost_user_blk; else echo "$1"; fi; }

# guest RESULT_FILE ARGS... : run-guest.sh in the background (so a signal to
# this script is handled at once), its output shown and saved.
guest() {
    local out=$1 rc=0
    shift
    "$HERE/run-guest.sh" "$@" > >(tee "$out") 2>&1 &
    GPID=$!
    wait "$GPID" || rc=$?
    GPID=
    return "$rc"
}

# ---- one case ------------------------------------------------------------
declare -a SUMMARY=()
FAILED=0
hostcheck() { # name status detail
    echo "  HOST name=$1 status=$2 detail=$3"
    [ "$2" = PASS ] || CASE_OK=0
}

# run_case NAME FORMAT QUEUES RO(0|1) SERIAL SIZE [KEY=VALUE...]
#   image=filled|empty|compressed   filled: random regions (qcow2: converted
#       from such a raw file); empty: `qemu-img create`; compressed: qcow2
#       with compressed clusters (qemu-img convert -c)
#   hashlen=BYTES   how much of the disk the guest hashes (default: all of it)
#   fio_offset=BYTES  where the guest's fio jobs start
#   fio_size=SIZE   bytes per fio job for this case (default: --fio-size)
#   qsize=N         virtqueue size of the QEMU device (default: QEMU's)
#   reboot=1        boot a second guest on the same backend process
#   restart=1       afterwards start a new backend process on the image and
#                   boot a guest that checks the data is still there
#   source=volume   import the image into a dir: remote volume, delete the
#                   local file, and serve the volume from an empty cache; the
#                   host checks run on `driveblk export` of the volume
#   coldagain=1     (source=volume, ro=1) afterwards boot again from a second,
#                   empty cache: the first boot (`--boot-profile record`: a
#                   read-only serve records only when asked) saved a boot
#                   profile, which the second streams ahead of the guest
#   remote=gdrive   (source=volume) the volume lives on Google Drive: the Drive
#                   API emulator (the driveemu binary next to driveblk) on
#                   loopback, reached through DRIVEBLK_DRIVE_API_URL and a
#                   service-account key, like production but for the URL;
#                   each backend ("machine") has its own empty id record
#   othermachine=1  (source=volume, ro=0) write-back to the remote: after its
#                   tests the guest makes an ext2 and writes fsynced files; the stop
#                   (SIGTERM) must have uploaded every change (status.json:
#                   no dirty bytes, a generation committed); the host checks
#                   run on an export through a fresh, empty cache, and a
#                   second backend on another empty cache ("another
#                   machine") boots a guest that must read the first guest's
#                   final disk (md5) and find every file intact (md5 list)
run_case() {
    local name=$1 fmt=$2 nq=$3 ro=$4 serial=$5 size=$6
    shift 6
    local image=filled hashlen=$size fio_offset=0 qsize= reboot=0 restart=0 source=file coldagain=0 othermachine=0 fio_size=$FIO_SIZE remote=dir kv
    for kv in "$@"; do
        case $kv in
            image=*|hashlen=*|fio_offset=*|qsize=*|reboot=*|restart=*|source=*|coldagain=*|othermachine=*|fio_size=*|remote=*) local "$kv" ;;
            *) die "run_case: bad option $kv" ;;
        esac
    done
    local img="$WORK/$name.$fmt" sock="$WORK/$name.sock" blog="$LOGDIR/$name.backend.log"
    local t0 rc before after gh
    CASE_OK=1
    t0=$(date +%s.%N)
    echo "=== case $name: $fmt/$image queues=$nq${qsize:+ queue-size=$qsize} ro=$ro serial=${serial:-none} size=$size backend=$BACKEND"

    if [ "$image" = empty ]; then
        rm -f "$img"
        if [ "$fmt" = raw ]; then truncate -s "$size" "$img"
        else qemu-img create -q -f "$fmt" "$img" "$size"; fi
    else
        make_raw "$WORK/$name.src.raw" "$size"
        if [ "$fmt" = raw ]; then
            mv "$WORK/$name.src.raw" "$img"
        else
            local copt=()
            [ "$image" != compressed ] || copt=(-c)
            qemu-img convert -f raw -O "$fmt" "${copt[@]}" "$WORK/$name.src.raw" "$img"
            rm -f "$WORK/$name.src.raw"
        fi
    fi
    before=$(img_hash "$img" "$fmt" "$hashlen")
    VOLUME_URL= VOLUME_CACHE=
    if [ "$source" = volume ]; then
        VOLUME_URL="dir:$WORK/$name.remote/vol" VOLUME_CACHE="$WORK/$name.cache"
        if [ "$remote" = gdrive ]; then
            start_drive_emulator
            VOLUME_URL="gdrive:/integration/$name"
            export XDG_CACHE_HOME="$WORK/$name.host1"
        fi
        mkdir -p "$WORK/$name.remote"
        "$BIN" import --quiet "$img" "$VOLUME_URL" >"$LOGDIR/$name.import.log" 2>&1 \
            || die "import into $VOLUME_URL failed (log: $LOGDIR/$name.import.log)"
        rm -f "$img"   # the guest can only be reading the volume
    fi

    # A read-only serve records a boot profile only when asked to.
    if [ "$coldagain" = 1 ] && [ "$ro" = 1 ]; then SERVE_EXTRA=(--boot-profile record); fi
    if ! start_backend "$sock" "$img" "$fmt" "$nq" "$ro" "$serial" "$blog"; then
        SERVE_EXTRA=()
        hostcheck backend-start FAIL "backend did not create $sock (log: $blog)"
        finish_case "$name" "$t0"
        return
    fi

    SERVE_EXTRA=()
    local args=(--socket "$sock" --size "$size" --queues "$nq" --ro "$([ "$ro" = 1 ] && echo yes || echo no)"
        --hash "$hashlen:$before" --fio-size "$fio_size" --fio-offset "$fio_offset"
        --timeout "$TIMEOUT" --no-build --log "$LOGDIR/$name.serial.log")
    [ "$ro" = 1 ] || args+=(--dump-hash "$hashlen")
    [ -z "$qsize" ] || args+=(--queue-size "$qsize")
    [ -z "$serial" ] || args+=(--serial "$(expected_serial "$serial")")
    # read-only disks: whether discard is offered is the backend's business
    [ "$EXP_DISCARD" = any ] || [ "$ro" = 1 ] || args+=(--discard "$EXP_DISCARD")
    [ "$EXP_WZEROES" = any ] || [ "$ro" = 1 ] || args+=(--write-zeroes "$EXP_WZEROES")
    [ "$EXP_WCACHE" = any ] || args+=(--wcache "$EXP_WCACHE")
    [ "$DEMO" = 0 ] || args+=(--demo)
    [ "$othermachine" = 0 ] || args+=(--files write)
    rc=0
    guest "$LOGDIR/$name.result.txt" "${args[@]}" || rc=$?
    [ "$rc" = 0 ] || CASE_OK=0
    gh=$(sed -n 's/^ *HASH len=[0-9]* md5=\([0-9a-f]*\).*/\1/p' "$LOGDIR/$name.result.txt" | tail -n1)

    # Second boot against the same backend process: QEMU reconnects, and
    # what the first guest wrote must still be there.
    if [ "$reboot" = 1 ] && [ -n "$gh" ]; then
        echo "--- $name: second boot on the same backend (reconnect, data persists)"
        local args2=(--socket "$sock" --size "$size" --queues "$nq" --hash "$hashlen:$gh" --no-fio
            --timeout "$TIMEOUT" --no-build --log "$LOGDIR/$name.reboot.serial.log")
        [ "$DEMO" = 0 ] || args2+=(--demo)
        guest "$LOGDIR/$name.reboot.result.txt" "${args2[@]}" || CASE_OK=0
    fi

    # Stop the backend: SIGTERM must make it exit 0 and remove its socket
    # (write-back: after its final sync, which may take a while).
    rc=0
    stop_pid "$BPID" "$([ "$othermachine" = 1 ] && echo 120 || echo 10)" || rc=$?
    BPID=
    if [ "$rc" = 0 ]; then hostcheck backend-exit PASS "exit 0 on SIGTERM"
    else hostcheck backend-exit FAIL "exit status $rc on SIGTERM (log: $blog)"; fi
    if [ "$BACKEND" = driveblk ]; then
        if [ -e "$sock" ]; then hostcheck socket-removed FAIL "$sock still exists"
        else hostcheck socket-removed PASS "socket gone"; fi
    fi

    # Write-back: everything the guest wrote went up at the stop.
    local export_cache=$VOLUME_CACHE export_what="with its local writes"
    if [ "$othermachine" = 1 ] && [ "$source" = volume ]; then
        local st="$VOLUME_CACHE/status.json" dirty gens
        dirty=$(jq -r '.sync.dirty_bytes' "$st" 2>/dev/null || echo '?')
        gens=$(jq -r '.sync.generations_committed' "$st" 2>/dev/null || echo 0)
        if [ "$dirty" = 0 ] && [ "${gens:-0}" -ge 1 ] && jq -e '.running == false' "$st" >/dev/null 2>&1; then
            hostcheck synced-at-stop PASS "$gens generation(s) committed, $(jq -r '.sync.bytes_uploaded' "$st") bytes uploaded, nothing dirty left"
        else
            hostcheck synced-at-stop FAIL "dirty bytes left: $dirty, generations committed: $gens (status: $st, log: $blog)"
        fi
        # Only what is on the remote: a fresh, empty cache.
        export_cache="$WORK/$name.cache-export" export_what="through an empty cache (remote only)"
    fi
    # What the guest saw must be what is in the image file.
    if [ "$source" = volume ]; then
        if "$BIN" export --quiet "$VOLUME_URL" "$img" --cache-dir "$export_cache" >"$LOGDIR/$name.export.log" 2>&1; then
            hostcheck volume-export PASS "exported the volume $export_what"
        else
            hostcheck volume-export FAIL "export failed (log: $LOGDIR/$name.export.log)"
        fi
    fi
    if [ "$fmt" = qcow2 ]; then
        if qemu-img check -q "$img" >"$LOGDIR/$name.qemu-img-check.txt" 2>&1; then
            hostcheck qemu-img-check PASS "image consistent"
        else
            hostcheck qemu-img-check FAIL "$(head -c 300 "$LOGDIR/$name.qemu-img-check.txt" | tr '\n' ' ')"
        fi
    fi
    after=$(img_hash "$img" "$fmt" "$hashlen")
    if [ "$ro" = 1 ]; then
        if [ "$after" = "$before" ]; then hostcheck image-unchanged PASS "read-only image untouched"
        else hostcheck image-unchanged FAIL "read-only image changed"; fi
    elif [ -z "$gh" ]; then
        hostcheck image-matches-guest FAIL "guest printed no final HASH"
    elif [ "$after" = "$gh" ]; then
        hostcheck image-matches-guest PASS "first $hashlen bytes of the image = guest's view (md5 ${after:0:16}...)"
    else
        hostcheck image-matches-guest FAIL "image md5 $after != guest's $gh"
    fi
    if [ "$fio_offset" -gt 0 ] && [ "$ro" = 0 ] && [ "$fmt" = raw ]; then
        # fio's region lies beyond hashlen: its data must have reached the file there
        local nz
        nz=$(dd if="$img" bs=1M skip=$((fio_offset / 1048576)) count=8 status=none | tr -d '\000' | wc -c)
        if [ "$nz" -gt 0 ]; then hostcheck high-offset-data PASS "$nz non-zero bytes at offset $fio_offset"
        else hostcheck high-offset-data FAIL "no data in the image at offset $fio_offset"; fi
    fi
    # A fresh backend process must read back what the previous one wrote
    # (for qcow2: its own metadata, reopened).
    if [ "$restart" = 1 ] && [ "$ro" = 0 ] && [ -n "$gh" ]; then
        echo "--- $name: new backend process on the same image, data must persist"
        if start_backend "$sock" "$img" "$fmt" "$nq" 0 "$serial" "$LOGDIR/$name.restart.backend.log"; then
            local args3=(--socket "$sock" --size "$size" --queues "$nq" --hash "$hashlen:$gh" --no-fio
                --timeout "$TIMEOUT" --no-build --log "$LOGDIR/$name.restart.serial.log")
            [ "$DEMO" = 0 ] || args3+=(--demo)
            guest "$LOGDIR/$name.restart.result.txt" "${args3[@]}" || CASE_OK=0
            stop_pid "$BPID" 10 || hostcheck backend-exit FAIL "restarted backend: exit status $? on SIGTERM"
            BPID=
        else
            hostcheck backend-restart FAIL "backend did not start again on the written image"
        fi
    fi
    # Another machine, same volume: an empty cache streams the boot profile
    # the first boot saved, and the guest reads the same bytes.
    if [ "$coldagain" = 1 ] && [ "$source" = volume ]; then
        echo "--- $name: boot again from an empty cache, with the saved boot profile"
        if ls "$WORK/$name.remote/vol"/profile-* >/dev/null 2>&1; then
            hostcheck profile-saved PASS "$(ls "$WORK/$name.remote/vol" | grep -c '^profile-.*[^k]$') profile index(es) on the remote"
        else
            hostcheck profile-saved FAIL "the first boot saved no boot profile (log: $blog)"
        fi
        VOLUME_CACHE="$WORK/$name.cache2"
        if start_backend "$sock" "$img" "$fmt" "$nq" "$ro" "$serial" "$LOGDIR/$name.cold.backend.log"; then
            local args4=(--socket "$sock" --size "$size" --queues "$nq" --ro "$([ "$ro" = 1 ] && echo yes || echo no)"
                --hash "$hashlen:$before" --no-fio --timeout "$TIMEOUT" --no-build --log "$LOGDIR/$name.cold.serial.log")
            [ -z "$serial" ] || args4+=(--serial "$(expected_serial "$serial")")
            [ "$DEMO" = 0 ] || args4+=(--demo)
            guest "$LOGDIR/$name.cold.result.txt" "${args4[@]}" || CASE_OK=0
            local st="$VOLUME_CACHE/status.json" segs sdone waits
            sleep 1.2 # status.json is rewritten every second
            segs=$(jq -r '.boot_profile.segments' "$st" 2>/dev/null || echo 0)
            sdone=$(jq -r '.boot_profile.segments_done' "$st" 2>/dev/null || echo 0)
            waits=$(jq -r '.boot_profile.waits' "$st" 2>/dev/null || echo 0)
            if [ "${segs:-0}" -gt 0 ] && [ "$sdone" = "$segs" ]; then
                hostcheck profile-streamed PASS "$sdone/$segs segments streamed, $waits guest misses waited on them"
            else
                hostcheck profile-streamed FAIL "segments $segs, streamed $sdone (status: $st)"
            fi
            stop_pid "$BPID" 10 || hostcheck backend-exit FAIL "cold backend: exit status $? on SIGTERM"
            BPID=
        else
            hostcheck backend-restart FAIL "backend did not start on an empty cache"
        fi
    fi
    # Another machine: a new backend on an empty cache serves the volume, and
    # a guest must read exactly what the first guest left on the disk.
    if [ "$othermachine" = 1 ] && [ "$source" = volume ] && [ -n "$gh" ]; then
        echo "--- $name: another machine (new backend, empty cache) boots the volume, the writes must be there"
        VOLUME_CACHE="$WORK/$name.cache2"
        [ "$remote" != gdrive ] || export XDG_CACHE_HOME="$WORK/$name.host2"
        if start_backend "$sock" "$img" "$fmt" "$nq" 0 "$serial" "$LOGDIR/$name.other.backend.log"; then
            local args5=(--socket "$sock" --size "$size" --queues "$nq" --hash "$hashlen:$gh" --no-fio --files check
                --timeout "$TIMEOUT" --no-build --log "$LOGDIR/$name.other.serial.log")
            [ "$DEMO" = 0 ] || args5+=(--demo)
            guest "$LOGDIR/$name.other.result.txt" "${args5[@]}" || CASE_OK=0
            stop_pid "$BPID" 60 || hostcheck backend-exit FAIL "second machine's backend: exit status $? on SIGTERM"
            BPID=
        else
            hostcheck backend-restart FAIL "backend did not start on an empty cache"
        fi
    fi
    if [ "$BACKEND" = driveblk ] && grep -qiE "panic|panicked" "$LOGDIR/$name".*backend.log; then
        hostcheck backend-log FAIL "panic in $blog"
    fi
    finish_case "$name" "$t0"
}

# run_restart_case NAME SOURCE QUEUES SIZE KILLS LOAD_SEC [LATENCY_MS [WCACHE]]
# A daemon restart the guest never notices. The guest (QEMU chardev
# reconnect-ms=500) runs a load of random reads over the first 3/4 of the
# disk and O_SYNC random writes over the rest while the backend is killed
# with SIGKILL and started again KILLS times, 2 s after each start. Passes
# only if the load finished without error (no request lost), the guest
# logged no I/O error or stray completion, a restarted daemon resubmitted
# requests left in flight (backend logs), and the backing store equals the
# guest's final view of the disk. SOURCE:
#   volume  random data imported into a dir: volume in 64 KiB chunks, served
#           from an empty cache with LATENCY_MS on every remote request: the
#           reads miss while written pages hit, so completions are out of
#           order at every kill
#   file    a raw image file, its page cache dropped (reads go to the disk)
# The writes carry crc32c checksums verified during the load: a write the
# guest saw complete (and flushed: O_SYNC) must survive every kill.
# WCACHE=through: the guest first switches the disk to write-through, which
# QEMU never tells a restarted daemon; each one must keep it (its log says
# so), or the guest's writes would sit in a write-back cache it never
# flushes.
# DRIVEBLK_RESTART_KILLS=N overrides the number of kills (0: the same load
# without any, which tells a crash-recovery bug from a race).
run_restart_case() {
    local name=$1 source=$2 nq=$3 size=$4 kills=$5 load=$6 latency=${7:-0} wcache=${8:-}
    local img="$WORK/$name.raw" sock="$WORK/$name.sock" blog t0 rc=0 gh after i k tk resub verify=yes
    CASE_OK=1
    t0=$(date +%s.%N)
    echo "=== case $name: $source of $size random bytes, queues=$nq, remote latency ${latency}ms, $kills x kill -9 during a ${load}s load"
    head -c "$size" /dev/urandom >"$img"
    VOLUME_URL= VOLUME_CACHE=
    if [ "$source" = volume ]; then
        VOLUME_URL="dir:$WORK/$name.remote/vol" VOLUME_CACHE="$WORK/$name.cache"
        mkdir -p "$WORK/$name.remote"
        # 64 KiB chunks: many distinct misses for the cold reads to hit
        "$BIN" import --quiet --chunk-size 64K "$img" "$VOLUME_URL" >"$LOGDIR/$name.import.log" 2>&1 \
            || die "import into $VOLUME_URL failed (log: $LOGDIR/$name.import.log)"
        rm -f "$img"
        # No whole-volume stream on its first boot (a small volume's
        # default): the cache would hold everything within seconds, and the
        # kills would find nothing waiting on the remote.
        SERVE_EXTRA=(--remote-latency-ms "$latency" --first-boot-whole-below 0)
    else
        sync "$img"
        dd if="$img" iflag=nocache count=0 status=none   # drop it from the page cache
    fi
    blog="$LOGDIR/$name.0.backend.log"
    if ! start_backend "$sock" "$img" raw "$nq" 0 "drvblk-restart" "$blog"; then
        hostcheck backend-start FAIL "backend did not create $sock (log: $blog)"
        SERVE_EXTRA=()
        finish_case "$name" "$t0"
        return
    fi
    local serial_log="$LOGDIR/$name.serial.log"
    : >"$serial_log"
    local args=(--socket "$sock" --size "$size" --queues "$nq" --no-fio --restart-load "$load"
        --restart-verify "$verify" --reconnect-ms 500 --dump-hash "$size" --timeout "$TIMEOUT" --no-build --log "$serial_log")
    [ "$DEMO" = 0 ] || args+=(--demo)
    [ -z "$wcache" ] || args+=(--set-wcache "$wcache")
    "$HERE/run-guest.sh" "${args[@]}" > >(tee "$LOGDIR/$name.result.txt") 2>&1 &
    GPID=$!
    # Kill only once the load runs (a kill during boot proves nothing).
    for i in $(seq 1200); do
        grep -q '^LOAD-START' "$serial_log" 2>/dev/null && break
        kill -0 "$GPID" 2>/dev/null || break
        sleep 0.1
    done
    k=0
    if grep -q '^LOAD-START' "$serial_log" 2>/dev/null; then
        for k in $(seq "$kills"); do
            sleep 2
            kill -0 "$GPID" 2>/dev/null || { k=$((k - 1)); break; }
            tk=$(date +%s.%N)
            kill -KILL "$BPID" 2>/dev/null || true
            wait "$BPID" 2>/dev/null || true
            [ "$k" -lt "$kills" ] || SERVE_EXTRA=()
            blog="$LOGDIR/$name.$k.backend.log"
            if ! start_backend "$sock" "$img" raw "$nq" 0 "drvblk-restart" "$blog"; then
                hostcheck backend-restart FAIL "backend did not start again after kill -9 #$k (log: $blog)"
                break
            fi
            echo "  $(date -u +%T.%3N) kill -9 #$k, restarted (pid $BPID) in $(awk -v a="$tk" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')s"
        done
    fi
    SERVE_EXTRA=()
    wait "$GPID" || rc=$?
    GPID=
    [ "$rc" = 0 ] || CASE_OK=0
    if [ "$k" = "$kills" ]; then hostcheck killed PASS "$kills x kill -9 + restart during the load"
    else hostcheck killed FAIL "only $k of $kills kills happened during the load"; fi
    resub=$(cat "$LOGDIR/$name".*.backend.log | sed -n 's/.*resubmitted=\([0-9]*\).*/\1/p' | awk '{n += $1} END {print n + 0}')
    if [ "$resub" = 0 ] && [ "$source" = file ]; then
        # a local file completes fast: a run may find nothing in flight
        hostcheck resubmitted PASS "nothing was in flight at the kills this time (the data checks stand)"
    elif [ "$resub" -gt 0 ]; then
        hostcheck resubmitted PASS "$resub request(s) left in flight by a killed daemon resubmitted by its successor"
    else
        hostcheck resubmitted FAIL "no restarted daemon resubmitted anything (inflight tracking off, or no kill hit a request in flight) (logs: $LOGDIR/$name.*.backend.log)"
    fi
    if [ -n "$wcache" ] && [ "$k" -gt 0 ]; then
        local kept=0
        for i in $(seq "$k"); do
            grep -q "cache mode (write $wcache), set before this daemon started, is kept" \
                "$LOGDIR/$name.$i.backend.log" && kept=$((kept + 1))
        done
        if [ "$kept" = "$k" ]; then hostcheck cache-mode-kept PASS "all $k restarted daemons kept the guest's write $wcache"
        else hostcheck cache-mode-kept FAIL "only $kept of $k restarted daemons kept the guest's write $wcache (logs: $LOGDIR/$name.*.backend.log)"; fi
    fi
    gh=$(sed -n 's/^ *HASH len=[0-9]* md5=\([0-9a-f]*\).*/\1/p' "$LOGDIR/$name.result.txt" | tail -n1)
    rc=0
    stop_pid "$BPID" 30 || rc=$?
    BPID=
    if [ "$rc" = 0 ]; then hostcheck backend-exit PASS "exit 0 on SIGTERM"
    else hostcheck backend-exit FAIL "exit status $rc on SIGTERM (log: $blog)"; fi
    if [ "$source" = volume ] && ! "$BIN" export --quiet "$VOLUME_URL" "$img" --cache-dir "$VOLUME_CACHE" >"$LOGDIR/$name.export.log" 2>&1; then
        hostcheck volume-export FAIL "export failed (log: $LOGDIR/$name.export.log)"
    else
        after=$(raw_hash "$img" "$size")
        if [ -z "$gh" ]; then hostcheck image-matches-guest FAIL "guest printed no final HASH"
        elif [ "$after" = "$gh" ]; then hostcheck image-matches-guest PASS "$source = guest's view (md5 ${after:0:16}...)"
        else hostcheck image-matches-guest FAIL "$source md5 $after != guest's $gh"; fi
    fi
    if grep -qiE "panicked" "$LOGDIR/$name".*backend.log; then
        hostcheck backend-log FAIL "panic in $LOGDIR/$name.*.backend.log"
    fi
    finish_case "$name" "$t0"
}

# run_term_case NAME SIZE LATENCY_MS
# A planned restart (SIGTERM, as docs/restart.md recommends) while a guest
# read is in flight. Random data imported into a dir: volume in 64 KiB
# chunks and served from an empty cache with LATENCY_MS on every remote
# request; the guest (reconnect-ms=500) hashes the whole disk; 2 s after it
# sees the disk the backend gets SIGTERM, and once it has exited a new one
# starts on the same cache (no added latency). Passes only if the guest's
# hash finished and matched (GUEST PASS within --timeout): the stopping
# daemon must complete what it accepted while QEMU is still connected, or
# those completions' interrupts are lost and the guest's read hangs.
# Also cache-mode: the first daemon's last "serving the guest write ..."
# line names the mode the guest reports (SeaBIOS negotiates no FLUSH, the
# guest's driver does).
run_term_case() {
    local name=$1 size=$2 latency=$3
    local img="$WORK/$name.raw" sock="$WORK/$name.sock" blog t0 rc=0 md5 i
    CASE_OK=1
    t0=$(date +%s.%N)
    echo "=== case $name: volume of $size random bytes, remote latency ${latency}ms, SIGTERM + restart during the guest's first read"
    head -c "$size" /dev/urandom >"$img"
    md5=$(raw_hash "$img" "$size")
    VOLUME_URL="dir:$WORK/$name.remote/vol" VOLUME_CACHE="$WORK/$name.cache"
    mkdir -p "$WORK/$name.remote"
    "$BIN" import --quiet --chunk-size 64K "$img" "$VOLUME_URL" >"$LOGDIR/$name.import.log" 2>&1 \
        || die "import into $VOLUME_URL failed (log: $LOGDIR/$name.import.log)"
    rm -f "$img"
    SERVE_EXTRA=(--remote-latency-ms "$latency")
    # the lease and the volume check take several slow round trips
    SOCKET_WAIT=90
    blog="$LOGDIR/$name.0.backend.log"
    if ! start_backend "$sock" "$img" raw 1 0 "drvblk-term" "$blog"; then
        SERVE_EXTRA=() SOCKET_WAIT=15
        hostcheck backend-start FAIL "backend did not create $sock (log: $blog)"
        finish_case "$name" "$t0"
        return
    fi
    SERVE_EXTRA=()
    local serial_log="$LOGDIR/$name.serial.log"
    : >"$serial_log"
    local args=(--socket "$sock" --size "$size" --queues 1 --no-fio --hash "$size:$md5" --reconnect-ms 500
        --timeout "$TIMEOUT" --no-build --log "$serial_log")
    SOCKET_WAIT=15
    [ "$DEMO" = 0 ] || args+=(--demo)
    "$HERE/run-guest.sh" "${args[@]}" > >(tee "$LOGDIR/$name.result.txt") 2>&1 &
    GPID=$!
    for i in $(seq 1200); do
        grep -q 'name=disk-present' "$serial_log" 2>/dev/null && break
        kill -0 "$GPID" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q 'name=disk-present' "$serial_log" 2>/dev/null; then
        sleep 2
        rc=0
        stop_pid "$BPID" 60 || rc=$?
        BPID=
        if [ "$rc" = 0 ]; then hostcheck backend-term PASS "exit 0 on SIGTERM under the guest's read"
        else hostcheck backend-term FAIL "exit status $rc on SIGTERM (log: $blog)"; fi
        blog="$LOGDIR/$name.1.backend.log"
        if start_backend "$sock" "$img" raw 1 0 "drvblk-term" "$blog"; then
            echo "  $(date -u +%T.%3N) SIGTERM, restarted (pid $BPID)"
        else
            hostcheck backend-restart FAIL "backend did not start again after SIGTERM (log: $blog)"
        fi
    else
        hostcheck disk-present FAIL "the guest never saw the disk (log: $serial_log)"
    fi
    rc=0
    wait "$GPID" || rc=$?
    GPID=
    if [ "$rc" = 0 ]; then hostcheck guest PASS "the guest's read finished across the SIGTERM restart"
    else hostcheck guest FAIL "run-guest.sh exit $rc (serial log: $serial_log)"; fi
    # SeaBIOS negotiates no FLUSH (served write-through), the guest's
    # driver then FLUSH and CONFIG_WCE: the first daemon's last word on the
    # mode must be the one the guest reports
    local gmode dmode
    gmode=$(sed -n 's/.*name=write-cache status=[A-Z]* detail=write \(back\|through\).*/\1/p' "$serial_log" | tail -n1)
    dmode=$(sed -n 's/.*serving the guest write \(back\|through\).*/\1/p' "$LOGDIR/$name.0.backend.log" | tail -n1)
    if [ -n "$gmode" ] && [ "$gmode" = "$dmode" ]; then hostcheck cache-mode PASS "the daemon serves the guest write $gmode, as the guest reports"
    else hostcheck cache-mode FAIL "the guest reports write ${gmode:-?}, the daemon last said write ${dmode:-?} (log: $LOGDIR/$name.0.backend.log)"; fi
    if [ -n "$BPID" ]; then
        rc=0
        stop_pid "$BPID" 30 || rc=$?
        BPID=
        [ "$rc" = 0 ] || hostcheck backend-exit FAIL "exit status $rc on SIGTERM (log: $blog)"
    fi
    if grep -qiE "panicked" "$LOGDIR/$name".*backend.log; then
        hostcheck backend-log FAIL "panic in $LOGDIR/$name.*.backend.log"
    fi
    finish_case "$name" "$t0"
}

# The Drive API emulator, started once for the gdrive cases; driveblk reaches
# it through the same environment variables a user would set.
start_drive_emulator() {
    [ -z "$EMU_PID" ] || return 0
    local emu out i
    emu="$(dirname "$BIN")/driveemu"
    [ -x "$emu" ] || die "driveemu binary not found next to $BIN (cargo build --workspace)"
    out="$WORK/driveemu.out"
    "$emu" --listen 127.0.0.1:0 --sa-key-out "$WORK/drive-sa.json" >"$out" 2>"$LOGDIR/driveemu.log" &
    EMU_PID=$!
    for i in $(seq 100); do
        grep -q '^base_url=' "$out" 2>/dev/null && break
        kill -0 "$EMU_PID" 2>/dev/null || die "driveemu exited (log: $LOGDIR/driveemu.log)"
        sleep 0.1
    done
    DRIVEBLK_DRIVE_API_URL=$(sed -n 's/^base_url=//p' "$out")
    [ -n "$DRIVEBLK_DRIVE_API_URL" ] || die "driveemu printed no base_url"
    export DRIVEBLK_DRIVE_API_URL DRIVEBLK_DRIVE_CREDENTIALS="$WORK/drive-sa.json"
    unset DRIVEBLK_DRIVE_TOKEN
    log "Drive API emulator at $DRIVEBLK_DRIVE_API_URL"
}

finish_case() { # NAME T0
    local t1 secs verdict
    t1=$(date +%s.%N)
    secs=$(awk -v a="$2" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')
    if [ "$CASE_OK" = 1 ]; then verdict=PASS; else verdict=FAIL; FAILED=$((FAILED + 1)); fi
    echo "=== case $1: $verdict in ${secs}s"
    SUMMARY+=("$(printf '%-22s %-4s %6ss' "$1" "$verdict" "$secs")")
    rm -rf "$WORK/$1".*
    VOLUME_URL= VOLUME_CACHE=
    if [ -n "${ORIG_XDG_CACHE_HOME+set}" ]; then export XDG_CACHE_HOME=$ORIG_XDG_CACHE_HOME; else unset XDG_CACHE_HOME; fi
}

want() { # NAME -> run it?
    [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]] || return 1
    if [ "$BACKEND" = qsd ] && [[ "$1" == volume* || "$1" == restart-* ]]; then
        SUMMARY+=("$(printf '%-22s %-4s' "$1" SKIP)")
        return 1
    fi
    if [ "$SKIP_QCOW2" = 1 ] && [[ "$1" == qcow2* ]]; then
        SUMMARY+=("$(printf '%-22s %-4s' "$1" SKIP)")
        return 1
    fi
}

T_ALL=$(date +%s.%N)
MiB=1048576
GiB=$((1024 * MiB))
# 1 queue; then a second guest on the same backend process (reconnect)
want raw-1q && run_case raw-1q raw 1 0 "drvblk-raw-1q" $((32 * MiB)) reboot=1
want raw-2q && run_case raw-2q raw 2 0 "drvblk-raw-2q" $((32 * MiB)) qsize=256 restart=1
# 4 queues offered, 2 vCPUs: the guest uses only 2, the others stay idle;
# a serial of exactly 20 bytes (no NUL terminator in the GET_ID reply);
# 16-entry virtqueues: full rings, large requests in few descriptors
want raw-4q && run_case raw-4q raw 4 0 "01234567890123456789" $((32 * MiB)) qsize=16
# odd size (not a multiple of 4 KiB) on purpose
want raw-ro-serial && run_case raw-ro-serial raw 2 1 "drvblk-ro-0042" $((24 * MiB + 3 * 512))
# 6 GiB sparse: fio straddles the 4 GiB mark (32-bit sector/offset bugs)
want raw-big && run_case raw-big raw 2 0 "drvblk-raw-big" $((6 * GiB)) hashlen=$((32 * MiB)) fio_offset=$((4 * GiB - 4 * MiB))
want qcow2-2q && run_case qcow2-2q qcow2 2 0 "drvblk-qcow2-2q" $((32 * MiB))
want qcow2-empty && run_case qcow2-empty qcow2 1 0 "drvblk-qcow2-empty" $((32 * MiB)) image=empty restart=1
# a remote volume (dir: remote, empty cache): lazy reads, local writes, export
want volume-qcow2 && run_case volume-qcow2 qcow2 2 0 "drvblk-volume" $((32 * MiB)) source=volume restart=1
# a read-only qcow2 volume booted twice from empty caches: the first boot
# records a boot profile, the second streams it
want volume-profile-ro && run_case volume-profile-ro qcow2 1 1 "" $((24 * MiB)) source=volume coldagain=1
# write-back: a guest writes (fio, with fsyncs) to a qcow2 volume; the stop
# uploads every change; another machine (empty cache) boots the same volume
# and reads the first guest's final disk
want volume-wb-2nd-machine && run_case volume-wb-2nd-machine qcow2 1 0 "drvblk-wb" $((32 * MiB)) source=volume othermachine=1 fio_size=4M
# the same on Google Drive (the Drive API emulator): import, a guest writes
# and syncs, the stop uploads every change as fenced generations, and a
# second backend with an empty cache and its own id record reads them back
want volume-gdrive-2nd-machine && run_case volume-gdrive-2nd-machine qcow2 1 0 "drvblk-gd" $((32 * MiB)) source=volume remote=gdrive othermachine=1 fio_size=4M
# kill -9 and restart the backend 5 times under a guest's load, on a cold
# volume behind a slow link and on a raw file with checksummed writes:
# inflight tracking (INFLIGHT_SHMFD) makes each restart invisible to the
# guest (docs/restart.md)
want restart-kill9 && run_restart_case restart-kill9 volume 2 $((64 * MiB)) "${DRIVEBLK_RESTART_KILLS:-5}" 40 300
want restart-kill9-verify && run_restart_case restart-kill9-verify file 2 $((96 * MiB)) 5 20 0 through
# SIGTERM (a planned restart) while a cold read of the guest is in flight:
# the stopping daemon completes it before letting QEMU go
want restart-term && run_term_case restart-term $((16 * MiB)) 3000
want qcow2-compressed-ro && run_case qcow2-compressed-ro qcow2 1 1 "drvblk-qcow2-cmp-ro" $((24 * MiB)) image=compressed

TOTAL=$(awk -v a="$T_ALL" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
echo
echo "=== summary (backend $BACKEND${BIN:+ $BIN}; logs in $LOGDIR)"
printf '  %s\n' "${SUMMARY[@]}"
if [ "$FAILED" = 0 ]; then
    echo "ALL PASS in ${TOTAL}s"
else
    echo "FAILED: $FAILED case(s), ${TOTAL}s"
    exit 1
fi
