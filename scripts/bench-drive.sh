#!/usr/bin/env bash
# scripts/bench-drive.sh: driveblk's Google Drive code path (auth, pacer, retries, read merging,
# resumable uploads) against the project's Drive emulator shaped like a home or office link:
#   - fetch rows: `driveblk export --parallel N` of a volume for N = 1, 8, 32, with 1 MiB chunks
#     (bandwidth-bound) and 64 KiB chunks (request-bound): MB/s, requests/s the emulator served
#     (`files.get media`), requests per MiB;
#   - upload rows: `driveblk import` of incompressible data, and write-back: a guest
#     (driveblk-bench, a libblkio client) writes 256 MiB of incompressible data into a served
#     volume, then SIGTERM: the final sync uploads it, timed from SIGTERM to exit. Both as a
#     share of the link.
#
# Usage: scripts/bench-drive.sh [--link "MS MBIT"] [--limit RATE/BURST] [--pacer RATE[,BURST]]
#                               [--record] [--keep]
#   --link    emulator latency per request and shared bandwidth (default "100 200")
#   --limit   the emulator's per-user request limit (default 200/200; Drive documents ~12,000
#             requests per minute per user)
#   --pacer   driveblk's --drive-pacer (default: driveblk's own default)
#   --record  append the table to docs/benchmarks.md
# Runs about 5 minutes on the default link. Build first; it builds nothing while measuring.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/loopback.sh
. "$ROOT/scripts/loopback.sh"
die() { echo "bench-drive.sh: error: $*" >&2; exit 1; }
log() { echo "bench-drive.sh: $*" >&2; }
LINK="100 200" LIMIT=200/200 PACER="" RECORD=0 KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --link) LINK=$2; shift 2 ;;
        --limit) LIMIT=$2; shift 2 ;;
        --pacer) PACER=$2; shift 2 ;;
        --record) RECORD=1; shift ;;
        --keep) KEEP=1; shift ;;
        *) die "unknown argument $1 (see the header of this script)" ;;
    esac
done
read -r LAT MBIT <<<"$LINK"
[[ $LAT =~ ^[0-9]+$ && $MBIT =~ ^[1-9][0-9]*$ ]] || die "--link wants \"MS MBIT\""
command -v jq >/dev/null || apt-get install -y -q jq >/dev/null
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
log "building driveblk, driveemu and driveblk-bench (release)"
(cd "$ROOT" && cargo build --release -q -p driveblk -p driveemu -p driveblk-bench) || die "build failed"
DRIVEBLK=$TARGET/release/driveblk EMU=$TARGET/release/driveemu GEN=$TARGET/release/driveblk-bench

WORK=$(mktemp -d /var/tmp/driveblk-bench-drive.XXXXXX)
EMU_PID="" DPID=""
cleanup() {
    [[ -z $DPID ]] || kill -KILL "$DPID" 2>/dev/null || true
    [[ -z $EMU_PID ]] || kill -TERM "$EMU_PID" 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

STATS=$WORK/emu-stats.json
start_driveemu "$EMU" "$WORK" --latency-ms "$LAT" --bandwidth-mbit "$MBIT" --rate-limit "$LIMIT" \
    --sa-key-out "$WORK/creds.json" --stats-out "$STATS" \
    || die "the Drive emulator did not start"
DRIVE=(--drive-api-url "$EMU_BASE" --drive-credentials "$WORK/creds.json")
[[ -z $PACER ]] || DRIVE+=(--drive-pacer "$PACER")
LINK_BPS=$((MBIT * 125000))

# Counters of the emulator now (it rewrites the file every 0.5 s: wait for a fresh copy).
snap() { sleep 0.6; jq -c '{media: (.requests["files.get media"] // 0), all: ([.requests[]] | add // 0), out: .bytes_out, inb: .bytes_in, limited: (.rate_limited_403 + .rate_limited_429)}' "$STATS"; }
now() { echo "$EPOCHREALTIME"; }
TAB=$WORK/table.md
{
    echo "| row | wall s | MB moved | MB/s | share of link | requests | requests/s | requests per MiB | rate-limited answers |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
} >"$TAB"
row() { # name secs bytes requests limited
    awk -v n="$1" -v s="$2" -v b="$3" -v r="$4" -v l="$5" -v link="$LINK_BPS" 'BEGIN {
        printf "| %s | %.1f | %.1f | %.2f | %.0f%% | %d | %.1f | %.2f | %d |\n", n, s, b / 1e6, b / 1e6 / s, 100 * b / s / link, r, r / s, r / (b / 1048576), l }' >>"$TAB"
    tail -1 "$TAB" >&2
}

# ---- Volumes: imports are the upload rows ------------------------------------------------------
declare -A SIZE_MB=([1M]=256 [64K]=32)
for cs in 1M 64K; do
    img=$WORK/img-$cs.raw
    dd if=/dev/urandom of="$img" bs=1M count="${SIZE_MB[$cs]}" status=none
    s0=$(snap); t0=$(now)
    "$DRIVEBLK" import "$img" "gdrive:/bench/vol-$cs" --chunk-size "$cs" --quiet "${DRIVE[@]}" >"$WORK/import-$cs.log" 2>&1 ||
        { cat "$WORK/import-$cs.log" >&2; die "import failed"; }
    t1=$(now); s1=$(snap)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
    [[ $cs == 1M ]] && row "import ${SIZE_MB[$cs]} MiB incompressible, chunk $cs (upload)" "$secs" \
        "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.inb - $a.inb')" \
        "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.all - $a.all')" \
        "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.limited - $a.limited')"
    rm -f "$img"
done

# ---- Fetch rows -----------------------------------------------------------------------------------
for cs in 1M 64K; do
    for par in 1 8 32; do
        out=$WORK/out.raw
        s0=$(snap); t0=$(now)
        "$DRIVEBLK" export "gdrive:/bench/vol-$cs" "$out" --parallel "$par" --quiet "${DRIVE[@]}" \
            >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log" >&2; die "export failed"; }
        t1=$(now); s1=$(snap)
        rm -f "$out"
        row "fetch: export, chunk $cs, $par parallel" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" \
            "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.out - $a.out')" \
            "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.media - $a.media')" \
            "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.limited - $a.limited')"
    done
done

# ---- Write-back sync row ---------------------------------------------------------------------------
SOCK=$WORK/vhost.sock CACHE=$WORK/cache
"$DRIVEBLK" serve --socket "$SOCK" --volume gdrive:/bench/vol-1M --format raw --cache-dir "$CACHE" \
    --boot-profile off --sync-interval 3600 --sync-timeout 600 "${DRIVE[@]}" >"$WORK/serve.log" 2>&1 &
DPID=$!
for ((i = 0; i < 300; i++)); do [[ -S $SOCK ]] && break; sleep 0.1; done
[[ -S $SOCK ]] || { cat "$WORK/serve.log" >&2; die "serve did not start"; }
"$GEN" --socket "$SOCK" --rw write --bs 1m --iodepth 8 --ios 256 --size 256m --data random --io-timeout 60 --json \
    >"$WORK/gen.json" 2>"$WORK/gen.err" || { cat "$WORK/gen.err" >&2; die "the generator failed"; }
s0=$(snap); t0=$(now)
kill -TERM "$DPID"
wait "$DPID" || { tail -20 "$WORK/serve.log" >&2; die "serve did not stop cleanly"; }
t1=$(now); s1=$(snap)
DPID=""
up=$(jq '.sync.bytes_uploaded' "$CACHE/status.json")
left=$(jq '.sync.dirty_bytes' "$CACHE/status.json")
[[ $left == 0 ]] || die "the final sync left $left bytes"
row "write-back: final sync of 256 MiB written by a guest, incompressible" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$up" \
    "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.all - $a.all')" \
    "$(jq -n --argjson a "$s0" --argjson b "$s1" '$b.limited - $a.limited')"

HEAD="Drive emulator (driveemu) at $LAT ms per request, $MBIT Mbit/s (= $((LINK_BPS / 1000000)) MB/s) shared, per-user limit $LIMIT requests/s/burst; driveblk pacer ${PACER:-default}; requests are what the emulator served (fetch rows: \`files.get media\`; upload rows: all). Load at end: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "$HEAD"
echo
cat "$TAB"
if [[ $RECORD == 1 ]]; then
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M') UTC: the Drive code path (scripts/bench-drive.sh, commit $(git -C "$ROOT" rev-parse --short HEAD))"
        echo
        echo "$HEAD"
        echo
        cat "$TAB"
    } >>"$ROOT/docs/benchmarks.md"
    log "recorded in docs/benchmarks.md"
fi
