#!/usr/bin/env bash
# scripts/bench-scale.sh: costs as the image grows (issue 14, item 4). For a 40 GiB qcow2 shaped
# like a used Windows disk (data scattered over its first 24 GiB) and a 400 GiB one (allocations
# over the whole size, so its metadata is large), measures:
#   first-read   serve -> first 4K guest read answered, cold cache, over the simulated link
#                (a dir: remote behind the shaping wrapper); RSS after that read and after a
#                boot-like workload (driveblk-bench --pattern boot); size of the cache state
#   drive        the same first read through the Drive emulator (driveemu) shaping the link
#   import       time and MB/s, against the disk's read speed (O_DIRECT dd) and zstd -3 on 2 cores
#   export       over the link (MB/s against its speed)
#   hydrate      over the link
# and prints one table. Results are kept per (size, row) in $WORK/results.tsv, so a row can be
# re-run alone (--rows) and the table printed again (--table).
#
# Usage: scripts/bench-scale.sh [--sizes "40G 400G"] [--rows REGEX] [--work DIR] [--link "MS MBIT"]
#                               [--table] [--clean] [--record]
#   --rows REGEX  rows to (re)run: build|import|first-read|drive|export|hydrate (default all)
#   --work DIR    scratch (default /var/tmp/driveblk-scale); images are built once and kept
#   --table       only print the table from the results so far
#   --results F   keep results in F (default $WORK/results.tsv), e.g. one file per build compared
#   --clean       delete the work dir and exit
#   --record      append the table to docs/benchmarks.md's scale section (prints it otherwise)
# Every timed step runs under $QUIET_RUN (default /work/quiet-run.sh when present: it pauses
# compilers on a shared machine); each is well under 6 minutes. Building images is not timed.
# Env: DRIVEBLK_BIN, DRIVEEMU_BIN, BENCH_BIN pick prebuilt binaries (default: this tree's release).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/loopback.sh
. "$ROOT/scripts/loopback.sh"
SIZES="40G 400G" ROWS_RE="" RESULTS="" WORK=/var/tmp/driveblk-scale LINK="100 200" TABLE_ONLY=0 RECORD=0
die() { echo "bench-scale.sh: error: $*" >&2; exit 1; }
log() { echo "bench-scale.sh: $*" >&2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --sizes) SIZES=$2; shift 2 ;;
        --rows) ROWS_RE=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --link) LINK=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --table) TABLE_ONLY=1; shift ;;
        --record) RECORD=1; shift ;;
        --clean) rm -rf "$WORK"; exit 0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
QUIET_RUN=${QUIET_RUN-$([[ -x /work/quiet-run.sh ]] && echo /work/quiet-run.sh || true)}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DRIVEBLK=${DRIVEBLK_BIN:-$TARGET/release/driveblk}
EMU=${DRIVEEMU_BIN:-$TARGET/release/driveemu}
GEN=${BENCH_BIN:-$TARGET/release/driveblk-bench}
read -r LAT MBIT <<<"$LINK"
LINKARGS=(--remote-latency-ms "$LAT" --remote-bandwidth-mbit "$MBIT")
LINK_MBS=$(awk -v m="$MBIT" 'BEGIN {printf "%.1f", m / 8}')
RAM_CACHE=256M
mkdir -p "$WORK"
RESULTS=${RESULTS:-$WORK/results.tsv}
touch "$RESULTS"

want() { [[ -z $ROWS_RE ]] || grep -Eq "$ROWS_RE" <<<"$1"; }
now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }
put() { # size key value: one result, replacing an earlier one
    local tmp=$RESULTS.tmp
    awk -F'\t' -v s="$1" -v k="$2" '!($1 == s && $2 == k)' "$RESULTS" >"$tmp"
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$tmp"
    mv "$tmp" "$RESULTS"
}
get() { awk -F'\t' -v s="$1" -v k="$2" '$1 == s && $2 == k {v = $3} END {print (v == "" ? "-" : v)}' "$RESULTS"; }
quiet() { if [[ -n $QUIET_RUN ]]; then "$QUIET_RUN" "$@"; else "$@"; fi; }
# A shell function run in a quiet window (quiet-run.sh runs a command, not a function).
quiet_fn() { quiet bash -c '"$@"' bash "$@"; }
# Runs a command in a quiet window and sets T0/T1 to when it started and ended inside the window
# (not counting the wait for the window).
timed() {
    local f=$WORK/.timed
    quiet bash -c 'a=$EPOCHREALTIME; "${@:2}"; rc=$?; echo "$a $EPOCHREALTIME" >"$1"; exit $rc' bash "$f" "$@" || return
    read -r T0 T1 <"$f"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k / 1024}'; }

if [[ $TABLE_ONLY == 0 ]]; then
    for b in "$DRIVEBLK" "$EMU" "$GEN"; do
        [[ -x $b ]] || die "$b missing: cargo build --release -p driveblk -p driveemu -p driveblk-bench"
    done
fi

# ---- Images ------------------------------------------------------------------------------------
shape() { # size -> "span every block" of the scattered writes
    case $1 in
        40G) echo "$((24 << 30)) $((12 << 20)) $((512 << 10))" ;; # 2048 x 512 KiB over 24 GiB: 1 GiB
        400G) echo "$((400 << 30)) $((128 << 20)) $((256 << 10))" ;; # 3200 x 256 KiB everywhere
        *) echo "$(($(numfmt --from=iec "$1") * 6 / 10)) $((16 << 20)) $((512 << 10))" ;;
    esac
}
build() { # size
    local s=$1 img=$WORK/img-$1.qcow2 raw=$WORK/img-$1.raw
    [[ -s $img ]] && return
    log "$s: building $img"
    local span every block
    read -r span every block <<<"$(shape "$s")"
    python3 "$ROOT/scripts/bench-scale-image.py" "$raw" "$(numfmt --from=iec "$s")" "$span" "$every" "$block"
    qemu-img convert -f raw -O qcow2 "$raw" "$img.tmp"
    rm -f "$raw"
    mv "$img.tmp" "$img"
    local info l2 rb
    info=$(qemu-img info --output=json "$img")
    put "$s" file_mb "$(($(stat -c %s "$img") / 1000000))"
    put "$s" data_mb "$(($(jq '."actual-size"' <<<"$info") / 1000000))"
    # L2 tables and refcount blocks, from qemu-img check's allocation map.
    l2=$(qemu-img map --output=json "$img" | jq '[.[] | select(.data) | (.start / 536870912 | floor)] | unique | length')
    put "$s" l2_tables "$l2"
}
import_vol() { # size -> dir: volume (import not timed here)
    local s=$1 url=dir:$WORK/remote/vol-$1
    [[ -f $WORK/remote/vol-$1/volume.json ]] && return
    mkdir -p "$WORK/remote"
    "$DRIVEBLK" import "$WORK/img-$s.qcow2" "$url" --format qcow2 --quiet >"$WORK/import-$s.log" 2>&1 ||
        { cat "$WORK/import-$s.log" >&2; die "import failed"; }
}

# ---- Rows ----------------------------------------------------------------------------------------
row_import() { # size: import, disk read, zstd -3 -T2
    local s=$1 img=$WORK/img-$1.qcow2 t0 t1 bytes
    bytes=$(stat -c %s "$img")
    rm -rf "$WORK/remote/imp-$s"
    sync
    log "$s: import (timed)"
    timed "$DRIVEBLK" import "$img" "dir:$WORK/remote/imp-$s" --format qcow2 --quiet >"$WORK/imp-$s.log" 2>&1 ||
        { cat "$WORK/imp-$s.log" >&2; die "import failed"; }
    t0=$T0 t1=$T1
    sync
    put "$s" import_s "$(secs "$t0" "$t1")"
    put "$s" import_mbs "$(awk -v b="$bytes" -v a="$t0" -v c="$t1" 'BEGIN {printf "%.0f", b / (c - a) / 1e6}')"
    rm -rf "$WORK/remote/imp-$s"
    # The disk, bypassing the page cache; zstd on 2 cores (input from the page cache).
    local disk zs
    disk=$(quiet dd if="$img" of=/dev/null bs=4M iflag=direct 2>&1 | awk '/copied/ {v = $(NF-1); if ($NF ~ /^GB/) v *= 1000; if ($NF ~ /^kB/) v /= 1000; print v}')
    cat "$img" >/dev/null
    timed zstd -3 -T2 -q -c "$img" >/dev/null
    t0=$T0 t1=$T1
    zs=$(awk -v b="$bytes" -v a="$t0" -v c="$t1" 'BEGIN {printf "%.0f", b / (c - a) / 1e6}')
    put "$s" disk_mbs "$disk"
    put "$s" zstd_mbs "$zs"
}

serve_first_read() { # size label remote-args... : starts serve, times the first read, RSS, boot workload
    local s=$1 tag=$2
    shift 2
    local cache=$WORK/cache-$tag sock=$WORK/$tag.sock log=$WORK/$tag.log pid t0 t1 tr
    rm -rf "$cache" "$sock"
    t0=$(now)
    "$DRIVEBLK" serve --socket "$sock" --format qcow2 --cache-dir "$cache" --ram-cache "$RAM_CACHE" \
        --boot-profile off --log-level info "$@" >"$log" 2>&1 &
    pid=$!
    rm -f "$WORK/$tag.sockt"
    # When the socket appears, the disk is open (serve binds it after opening).
    (for ((i = 0; i < 30000; i++)); do [[ -S $sock ]] && { now >"$WORK/$tag.sockt"; break; }; sleep 0.01; done) &
    # The first guest read: sector 0 (what firmware reads first), 4 KiB, one request.
    if ! "$GEN" --socket "$sock" --rw read --bs 4k --iodepth 1 --ios 1 --connect-timeout 300 \
        --io-timeout 120 --json >"$WORK/$tag.first.json" 2>"$WORK/$tag.first.err"; then
        kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
        cat "$WORK/$tag.first.err" "$log" >&2
        die "$tag: first read failed"
    fi
    t1=$(now)
    tr=$(secs "$t0" "$t1")
    put "$s" "${tag}_first_s" "$tr"
    put "$s" "${tag}_rss_first_mib" "$(mib "$(rss_kib "$pid")")"
    # The socket appears once open finished: when did it?
    [[ -s $WORK/$tag.sockt ]] && put "$s" "${tag}_open_s" "$(secs "$t0" "$(cat "$WORK/$tag.sockt")")"
    if [[ $tag == dir-* ]]; then
        # A boot-like workload: 20,000 reads, ~300 MB, over the first 24 GiB.
        local span
        span=$(( $(numfmt --from=iec "$s") > (24 << 30) ? (24 << 30) : $(numfmt --from=iec "$s") ))
        "$GEN" --socket "$sock" --pattern boot --trace-reads 20000 --trace-bytes 300m --size "$span" \
            --io-timeout 120 --json >"$WORK/$tag.boot.json" 2>"$WORK/$tag.boot.err" ||
            { cat "$WORK/$tag.boot.err" >&2; log "$tag: boot workload failed"; }
        put "$s" "${tag}_boot_s" "$(jq -r '.elapsed_s * 10 | round / 10' "$WORK/$tag.boot.json" 2>/dev/null || echo -)"
        put "$s" "${tag}_rss_boot_mib" "$(mib "$(rss_kib "$pid")")"
        put "$s" "${tag}_hwm_mib" "$(mib "$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")")"
        # The L2 tables stream in the background: when are they all in, and what is RSS then?
        local i
        for ((i = 0; i < 2400; i++)); do
            grep -q 'image metadata resident\|metadata chunks could not be prefetched' "$log" && break
            sleep 0.1
        done
        if grep -q 'image metadata resident' "$log"; then
            put "$s" "${tag}_meta_s" "$(secs "$t0" "$(now)")"
            put "$s" "${tag}_rss_meta_mib" "$(mib "$(rss_kib "$pid")")"
        fi
    fi
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    # Cache state: everything in the cache dir but the data file.
    put "$s" "${tag}_state_kib" "$(find "$cache" -maxdepth 1 -type f ! -name data -printf '%s\n' | awk '{t += $1} END {printf "%.0f", t / 1024}')"
    ls -la "$cache" >"$WORK/$tag.cache-ls"
    rm -rf "$cache"
}

row_first_read() { # size, dir: remote behind the shaping wrapper
    local s=$1
    import_vol "$s"
    log "$s: first read over the simulated link (dir:)"
    quiet_fn serve_first_read "$s" "dir-$s" --volume "dir:$WORK/remote/vol-$s" "${LINKARGS[@]}"
}

row_drive() { # size, through the Drive emulator shaping the link (latency, one shared bandwidth)
    local s=$1 EMU_PID EMU_BASE
    start_driveemu "$EMU" "$WORK" --latency-ms "$LAT" --bandwidth-mbit "$MBIT" --sa-key-out "$WORK/emu-creds.json" \
        || die "driveemu did not start"
    local emu=$EMU_PID drive=(--drive-api-url "$EMU_BASE" --drive-credentials "$WORK/emu-creds.json")
    # The emulator keeps files in memory, and shapes every transfer: this upload is not timed.
    log "$s: importing into the Drive emulator over the link (not timed)"
    "$DRIVEBLK" import "$WORK/img-$s.qcow2" "gdrive:/bench/vol-$s" --format qcow2 --quiet "${drive[@]}" \
        >"$WORK/emu-import-$s.log" 2>&1 || { kill "$emu"; cat "$WORK/emu-import-$s.log" >&2; die "import failed"; }
    log "$s: first read through the Drive emulator"
    quiet_fn serve_first_read "$s" "drive-$s" --volume "gdrive:/bench/vol-$s" "${drive[@]}" || true
    kill "$emu"; wait "$emu" 2>/dev/null || true
}

row_export() { # size, over the link
    local s=$1 t0 t1 bytes out=$WORK/export-$1.qcow2
    import_vol "$s"
    bytes=$(stat -c %s "$WORK/img-$s.qcow2")
    rm -rf "$WORK/export-cache" "$out"
    mkdir -p "$WORK/export-cache"
    log "$s: export over the link (timed)"
    timed "$DRIVEBLK" export "dir:$WORK/remote/vol-$s" "$out" --cache-dir "$WORK/export-cache" --quiet "${LINKARGS[@]}" \
        >"$WORK/export-$s.log" 2>&1 || { cat "$WORK/export-$s.log" >&2; die "export failed"; }
    t0=$T0 t1=$T1
    cmp -s "$out" "$WORK/img-$s.qcow2" || log "$s: WARNING: the export differs from the image"
    rm -rf "$out" "$WORK/export-cache"
    put "$s" export_s "$(secs "$t0" "$t1")"
    put "$s" export_mbs "$(awk -v b="$bytes" -v a="$t0" -v c="$t1" 'BEGIN {printf "%.1f", b / (c - a) / 1e6}')"
}

row_hydrate() { # size, over the link, into an empty cache
    local s=$1 t0 t1 bytes cache=$WORK/hydrate-cache
    import_vol "$s"
    bytes=$(stat -c %s "$WORK/img-$s.qcow2")
    rm -rf "$cache"
    log "$s: hydrate over the link (timed)"
    timed "$DRIVEBLK" hydrate "dir:$WORK/remote/vol-$s" --cache-dir "$cache" --quiet "${LINKARGS[@]}" \
        >"$WORK/hydrate-$s.log" 2>&1 || { cat "$WORK/hydrate-$s.log" >&2; die "hydrate failed"; }
    t0=$T0 t1=$T1
    put "$s" hydrate_state_kib "$(find "$cache" -maxdepth 1 -type f ! -name data -printf '%s\n' | awk '{t += $1} END {printf "%.0f", t / 1024}')"
    rm -rf "$cache"
    put "$s" hydrate_s "$(secs "$t0" "$t1")"
    put "$s" hydrate_mbs "$(awk -v b="$bytes" -v a="$t0" -v c="$t1" 'BEGIN {printf "%.1f", b / (c - a) / 1e6}')"
}

export -f now secs put get rss_kib mib die log serve_first_read
export WORK DRIVEBLK GEN RAM_CACHE RESULTS
# ---- Run -------------------------------------------------------------------------------------------
if [[ $TABLE_ONLY == 0 ]]; then
    for s in $SIZES; do
        build "$s"
        want import && row_import "$s"
        want first-read && row_first_read "$s"
        want export && row_export "$s"
        want hydrate && row_hydrate "$s"
        [[ $s != 40G ]] || ! want drive || row_drive "$s"
    done
    put all commit "$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' (dirty)')"
    put all date "$(date -u +%Y-%m-%dT%H:%MZ)"
    put all load "$(cut -d' ' -f1-3 /proc/loadavg)"
fi

# ---- Table ---------------------------------------------------------------------------------------
target_rss() { awk -v r="$(numfmt --from=iec "$RAM_CACHE")" -v s="$(numfmt --from=iec "$1")" 'BEGIN {printf "%.0f", r / 1048576 + 64 + s / 1073741824}'; }
{
    echo "Link: $LAT ms per request, $MBIT Mbit/s (= $LINK_MBS MB/s) shared; RAM tier $RAM_CACHE; cold cache per run; commit $(get all commit), $(get all date), load $(get all load)."
    echo
    printf '| measure | target |'; for s in $SIZES; do printf ' %s |' "$s"; done; echo
    printf '|---|---|'; for s in $SIZES; do printf -- '---:|'; done; echo
    line() { # label target key [suffix]
        printf '| %s | %s |' "$1" "$2"
        for s in $SIZES; do printf ' %s |' "$(get "$s" "${3//@/$s}")"; done
        echo
    }
    line "image file MB (qcow2, data + metadata)" "" file_mb
    line "L2 tables in use" "" l2_tables
    line "serve -> socket listening (disk open), dir:, s" "" "dir-@_open_s"
    line "first read, dir: over the link, s" "≤ 2 (40G)" "dir-@_first_s"
    line "first read, Drive emulator, s" "≤ 2 (40G)" "drive-@_first_s"
    line "RSS after the first read via Drive, MiB" "" "drive-@_rss_first_mib"
    printf '| RSS after the first read, MiB | ≤ RAM tier + 64 + 1/GiB |'
    for s in $SIZES; do printf ' %s (≤ %s) |' "$(get "$s" "dir-${s}_rss_first_mib")" "$(target_rss "$s")"; done; echo
    printf '| RSS after a boot-like workload (20k reads, 300 MB), MiB | same |'
    for s in $SIZES; do printf ' %s (peak %s) |' "$(get "$s" "dir-${s}_rss_boot_mib")" "$(get "$s" "dir-${s}_hwm_mib")"; done; echo
    line "boot-like workload over the link, s" "" "dir-@_boot_s"
    line "all L2 tables resident (background), s after serve" "" "dir-@_meta_s"
    line "RSS then, MiB" "" "dir-@_rss_meta_mib"
    line "cache state after it (state file + journal + pins), KiB" "" "dir-@_state_kib"
    line "cache state after hydrate, KiB" "" hydrate_state_kib
    printf '| import s (MB/s; disk O_DIRECT MB/s; zstd -3 -T2 MB/s) | ≥ 80%% of min(disk, zstd) |'
    for s in $SIZES; do
        printf ' %s (%s; %s; %s) |' "$(get "$s" import_s)" "$(get "$s" import_mbs)" "$(get "$s" disk_mbs)" "$(get "$s" zstd_mbs)"
    done; echo
    printf '| export over the link, s (MB/s; link %s MB/s) | |' "$LINK_MBS"
    for s in $SIZES; do printf ' %s (%s) |' "$(get "$s" export_s)" "$(get "$s" export_mbs)"; done; echo
    printf '| hydrate over the link, s (MB/s; link %s MB/s) | |' "$LINK_MBS"
    for s in $SIZES; do printf ' %s (%s) |' "$(get "$s" hydrate_s)" "$(get "$s" hydrate_mbs)"; done; echo
} >"$RESULTS.md"
cat "$RESULTS.md"
