#!/usr/bin/env bash
# scripts/bench-fleet.sh: a fleet cold start. N daemons on one host, each with an empty cache of
# its own, serve the same golden volume on Google Drive (the project's Drive emulator on loopback:
# one shared link of --link latency per request and bandwidth, counting every request and byte),
# and N guests (driveblk-bench, a libblkio client) replay the same boot trace at the same moment.
# Rows:
#   - one boot alone;
#   - N boots at once, no sharing (each daemon fetches everything itself);
#   - N boots at once with `serve --shared-cache DIR` (one directory for all of them);
#   - N boots at once again, with the shared directory the previous row filled (a second wave).
# Columns: MB the emulator sent, requests it served (`files.get media`), and the time until the
# last of the N guests finished its trace, each against N x one boot.
# Every daemon is `--ephemeral` (the fleet mode: guest writes stay in the daemon's cache) and there
# is no boot profile, so each row is a first boot.
#
# Usage: scripts/bench-fleet.sh [--link "MS MBIT"] [--daemons N] [--size SIZE] [--trace-bytes SIZE]
#                               [--record] [--keep]
#   --link         emulator latency per request and shared bandwidth (default "100 200")
#   --daemons      N (default 8)
#   --size         volume size (default 1G; the first 60% random data, the rest a hole)
#   --trace-bytes  bytes each boot trace reads (default 200m, in 20,000 reads)
#   --record       put the table in docs/benchmarks.md (a section before "## How to run")
# Runs about 4 minutes with the defaults. Build first (release); it builds nothing while measuring.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/loopback.sh
. "$ROOT/scripts/loopback.sh"
# shellcheck source=scripts/record.sh
. "$ROOT/scripts/record.sh"
die() { echo "bench-fleet.sh: error: $*" >&2; exit 1; }
log() { echo "bench-fleet.sh: $*" >&2; }
LINK="100 200" N=8 SIZE=1G TRACE_BYTES=200m RECORD=0 KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --link) LINK=$2; shift 2 ;;
        --daemons) N=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --trace-bytes) TRACE_BYTES=$2; shift 2 ;;
        --record) RECORD=1; shift ;;
        --keep) KEEP=1; shift ;;
        *) die "unknown argument $1 (see the header of this script)" ;;
    esac
done
read -r LAT MBIT <<<"$LINK"
[[ $LAT =~ ^[0-9]+$ && $MBIT =~ ^[1-9][0-9]*$ ]] || die "--link wants \"MS MBIT\""
[[ $N =~ ^[1-9][0-9]*$ ]] || die "--daemons wants a number"
command -v jq >/dev/null || apt-get install -y -q jq >/dev/null
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DRIVEBLK=$TARGET/release/driveblk EMU=$TARGET/release/driveemu GEN=$TARGET/release/driveblk-bench
for b in "$DRIVEBLK" "$EMU" "$GEN"; do
    [[ -x $b ]] || die "$b is missing: cargo build --release -p driveblk -p driveemu -p driveblk-bench"
done

WORK=$(mktemp -d /var/tmp/driveblk-bench-fleet.XXXXXX)
EMU_PID="" PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    [[ -z $EMU_PID ]] || kill -TERM "$EMU_PID" 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

STATS=$WORK/emu-stats.json
start_driveemu "$EMU" "$WORK" --latency-ms "$LAT" --bandwidth-mbit "$MBIT" --sa-key-out "$WORK/creds.json" --stats-out "$STATS" \
    || die "the Drive emulator did not start"
DRIVE=(--drive-api-url "$EMU_BASE" --drive-credentials "$WORK/creds.json")
LINK_BPS=$((MBIT * 125000))
# Counters of the emulator now (rewritten every 0.5 s: wait for a fresh copy).
snap() { sleep 0.6; jq -c '{media: (.requests["files.get media"] // 0), out: .bytes_out}' "$STATS"; }

# ---- The golden volume ---------------------------------------------------------------------------
bytes=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
span_mb=$((bytes * 6 / 10 / 1048576))
img=$WORK/golden.raw
log "golden volume: $SIZE, first $span_mb MiB random; importing over the link"
truncate -s "$bytes" "$img"
dd if=/dev/urandom of="$img" bs=1M count="$span_mb" conv=notrunc status=none
URL=gdrive:/bench/golden
t0=$EPOCHREALTIME
"$DRIVEBLK" import "$img" "$URL" --quiet "${DRIVE[@]}" >"$WORK/import.log" 2>&1 ||
    { cat "$WORK/import.log" >&2; die "import failed"; }
IMPORT_S=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", b - a}')
rm -f "$img"

# ---- Rows ----------------------------------------------------------------------------------------
TAB=$WORK/table.md
{
    echo "| row | daemons | MB sent by the remote | vs N x one boot | media requests | s until all finished | vs one boot | shared dir: hits / stored / waited |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
} >"$TAB"
ONE_MB="" ONE_S=""
run_row() { # name daemons shared-dir(or "")
    local name=$1 n=$2 shared=$3 i pids=() gens=() s0 s1 t0 secs mb media hits=0 stored=0 waited=0
    for ((i = 0; i < n; i++)); do
        local sock=$WORK/sock$i cache=$WORK/cache$i
        rm -rf "$cache" "$sock"
        local extra=()
        [[ -z $shared ]] || extra=(--shared-cache "$shared")
        "$DRIVEBLK" serve --socket "$sock" --volume "$URL" --format raw --cache-dir "$cache" --ephemeral \
            --ram-cache 256M "${extra[@]}" "${DRIVE[@]}" >"$WORK/serve$i.log" 2>&1 &
        pids+=($!)
        PIDS+=($!)
    done
    for ((i = 0; i < n; i++)); do
        for ((j = 0; j < 300; j++)); do [[ -S $WORK/sock$i ]] && break; sleep 0.1; done
        [[ -S $WORK/sock$i ]] || { cat "$WORK/serve$i.log" >&2; die "serve $i did not start"; }
    done
    s0=$(snap)
    t0=$EPOCHREALTIME
    for ((i = 0; i < n; i++)); do
        "$GEN" --socket "$WORK/sock$i" --pattern boot --trace-bytes "$TRACE_BYTES" --trace-reads 20000 \
            --io-timeout 300 --json >"$WORK/gen$i.json" 2>"$WORK/gen$i.err" &
        gens+=($!)
    done
    for ((i = 0; i < n; i++)); do
        wait "${gens[$i]}" || { cat "$WORK/gen$i.err" >&2; die "$name: guest $i failed"; }
    done
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
    s1=$(snap)
    for ((i = 0; i < n; i++)); do kill -TERM "${pids[$i]}"; done
    for ((i = 0; i < n; i++)); do
        wait "${pids[$i]}" || { tail -5 "$WORK/serve$i.log" >&2; die "$name: daemon $i did not stop cleanly"; }
        if [[ -n $shared ]]; then
            hits=$((hits + $(jq '.shared_cache.hits' "$WORK/cache$i/status.json")))
            stored=$((stored + $(jq '.shared_cache.stored' "$WORK/cache$i/status.json")))
            waited=$((waited + $(jq '.shared_cache.waited' "$WORK/cache$i/status.json")))
        fi
    done
    PIDS=()
    mb=$(jq -n --argjson a "$s0" --argjson b "$s1" '($b.out - $a.out) / 1e6 | round')
    media=$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.media - $a.media')
    if [[ -z $ONE_MB ]]; then ONE_MB=$mb ONE_S=$secs; fi
    local sh="-"
    [[ -z $shared ]] || sh="$hits / $stored / $waited"
    awk -v name="$name" -v n="$n" -v mb="$mb" -v one="$ONE_MB" -v m="$media" -v s="$secs" -v ones="$ONE_S" -v sh="$sh" 'BEGIN {
        printf "| %s | %d | %d | %.2f | %d | %.1f | %.1fx | %s |\n", name, n, mb, mb / (n * one), m, s, s / ones, sh }' >>"$TAB"
    log "  $(tail -1 "$TAB")"
}
log "one boot alone"
run_row "one boot" 1 ""
log "$N boots at once, no sharing"
run_row "$N boots, no sharing" "$N" ""
log "$N boots at once, one shared directory"
rm -rf "$WORK/shared"
run_row "$N boots, --shared-cache" "$N" "$WORK/shared"
log "$N boots at once, the shared directory filled (second wave)"
run_row "$N boots, --shared-cache filled" "$N" "$WORK/shared"

HEAD="Drive emulator (driveemu) at $LAT ms per request, $MBIT Mbit/s (= $((LINK_BPS / 1000000)) MB/s) shared by all daemons; golden volume $SIZE raw (first 60% random), 1 MiB chunks, imported in $IMPORT_S s; each guest replays the boot trace (\`--pattern boot --trace-bytes $TRACE_BYTES --trace-reads 20000\`, QD8) on its own daemon (\`--ephemeral\`, empty cache, no boot profile); all guests of a row start together. \"vs N x one boot\": MB sent / (daemons x MB of one boot). Load at end: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "$HEAD"
echo
cat "$TAB"
if [[ $RECORD == 1 ]]; then
    SEC=$WORK/section.md
    {
        echo "### $(date -u '+%Y-%m-%d %H:%M') UTC: a fleet cold start (scripts/bench-fleet.sh, commit $(git -C "$ROOT" rev-parse --short HEAD))"
        echo
        echo "$HEAD"
        echo
        cat "$TAB"
        echo
    } >"$SEC"
    record_sitting "$SEC" "$ROOT/docs/benchmarks.md" || die "could not record in docs/benchmarks.md"
    log "recorded in docs/benchmarks.md"
fi
