#!/usr/bin/env bash
# scripts/bench.sh: driveblk vs qemu-storage-daemon (qsd), same image, same load generator
# (driveblk-bench, a libblkio vhost-user-blk client), same run, interleaved A/B per repetition.
#
# Usage: scripts/bench.sh [--reps N] [--quick] [--runtime S] [--warmup S] [--size SIZE]
#                         [--rows REGEX] [--record] [--keep] [--self-test-qsd] [--drop-caches]
#                         [--no-ceiling]
#                         [--cold] [--cold-only] [--cold-config SPEC]... [--cold-size SIZE]
#                         [--cold-link "MS MBIT"] [--cold-no-export] [--sync-link "MS MBIT"] [--encrypt]
#                         [--encrypt-cache]
#   --reps N         repetitions per row and daemon (default 3); the table shows medians
#   --quick          fast smoke run: 1 rep, 1 s runs, 256 MiB image
#   --runtime S      measured seconds per run (default 8); --warmup S unmeasured (default 1)
#   --size SIZE      image size for dd (default 2G)
#   --rows REGEX     only rows whose name matches (grep -E)
#   --no-ceiling     skip the ceiling runs: by default every rep of every A/B row also runs the
#                    same load against qsd's null-co driver (`--blockdev driver=null-co,
#                    read-zeroes=off`: the vhost-user protocol with no storage at all), once per
#                    distinct load and queue count, and the table shows each daemon's IOPS as a
#                    share of that ceiling measured in the same run
#   --record         append the table, command, date and machine to docs/benchmarks.md
#   --keep           keep the work dir (images, logs, per-run JSON)
#   --self-test-qsd  benchmark qsd against qsd (same as BENCH_A=qsd), to prove the harness
#   --drop-caches    also run the "page cache dropped" volume row (root: drop_caches before
#                    every run of both daemons; slows everything else on the machine for a while)
#   --cold           after the A/B rows, the cold boot-trace experiment (driveblk only, slow:
#                    minutes per config): a --cold-size image (default 10G, first 60% random
#                    data) imported as a raw volume, served over a simulated link, empty cache,
#                    three --pattern boot replays per config: the first boot (records a boot
#                    profile, saved at SIGTERM), a cold start on a new cache with that profile
#                    (identical repeat), and a boot a tenth of whose files differ
#                    (--trace-differ 0.1) on a new cache with the profile the runs before left,
#                    then (dir: only) that boot again against the same profile on a new cache
#                    with `serve` started ahead of the guest, which waits until the profile
#                    has streamed (the profile local before the boot; that wait in the run's
#                    name);
#                    compared with the bandwidth floor and with "download first" (driveblk
#                    export over the same link)
#   --cold-only      only the cold experiment (no A/B rows)
#   --cold-config S  CHUNK[:SERVE-ARGS], e.g. "256K:--fetch-concurrency 64"; repeatable; the
#                    volume is imported once per chunk size (default "1M")
#   --cold-link "MS MBIT"   simulated link (default "100 200": 100 ms per request, 200 Mbit/s)
#   --cold-no-export skip the download-first measurement
#   --cold-data-pct P  share of the cold image that holds data, and that the trace's files are
#                    spread over (default 60; 50 on a 40G image is a Windows-like disk with data
#                    over its first 20 GiB)
#   --cold-drop-image  delete the cold image once imported (implies --cold-no-export): a 40G
#                    image's data then need not fit on the disk twice; the table states the
#                    download-first time as its floor (stored bytes / link rate)
#   --cold-runs L    which cold runs, comma-separated: first,repeat,differ,ahead (default all;
#                    "none": only make the image and import it). With BENCH_WORK the runs of one
#                    experiment can be split across invocations (short quiet windows): e.g.
#                    "none", then "first", then "repeat,differ" (they use the profile left there)
#   --cold-import-args A  extra arguments for the cold volume's import, e.g. "--single-frames"
#                    (one zstd frame per chunk, as before sub-frames: misses fetch whole chunks)
#   --cold-remote R  dir (default: a local folder behind the simulated link) or gdrive: the
#                    project's Drive emulator (driveemu) on loopback shapes the link itself
#                    (--cold-link latency per request, one shared bandwidth) and enforces a
#                    per-user request limit (--cold-drive-limit RATE/BURST, default 200/200: the
#                    ~12,000 requests/min per user Drive documented before its quota units);
#                    import, serve and export then go through the real Drive code path (auth,
#                    pacer, retries, read merging). Remote requests per run are reported.
#   --sync-link "MS MBIT"   simulated link of the write-back rows (default "100 200"): the
#                    "volume writeback/writethrough/unsafe, link" FLUSH rows and the sync rows
# Write-back set: --rows 'volume (writeback|writethrough|unsafe)|sync:' (about 11 min, --reps 3):
#   A/B rows "volume writeback: 4K randwrite QD32 1q", "... 64K seqwrite QD8 1q" (writeback mode,
#   vs qsd on the same qcow2; from a hydrated cache, and as "volume writeback, empty cache: ..."),
#   "volume writeback|writethrough|unsafe, link: 4K write+FLUSH QD1" (p50/p99 of write+FLUSH
#   pairs in each cache mode; qsd: fdatasync of its qcow2 file), and the
#   driveblk-only sync rows (SYNC_ROWS below, own table): bytes uploaded / bytes the guest changed
#   (before and after compression), upload rate as a share of the link, remote requests (counted
#   with strace) per GiB uploaded, and the upload for one 4 KiB write on a 40 GiB sparse qcow2.
#   --encrypt        every volume is imported with --encrypt (a random key file in the work
#                    dir, given to every driveblk command by DRIVEBLK_KEY_FILE): the cost of
#                    encryption is this run's rows against a run without it
#   --encrypt-cache  --encrypt, and every driveblk cache (serve, hydrate) kept encrypted
#                    (`--encrypt-cache`): the SSD-warm and write-back rows then show its cost
# Env: BENCH_A / BENCH_B pick the two daemons (driveblk|qsd; default driveblk vs qsd).
#      BENCH_TMPDIR=dir holds the work dir (default /var/tmp), e.g. /dev/shm when the disk is short.
#      BENCH_WORK=dir is the work dir itself, reused and kept (the cold image and volumes are made
#      only when absent there): see --cold-runs.
#      DRIVEBLK_BIN=path benchmarks a prebuilt driveblk instead of building this tree's;
#      BENCH_GEN=path uses a prebuilt driveblk-bench likewise (nothing is built then).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/loopback.sh
. "$ROOT/scripts/loopback.sh"
CMDLINE="scripts/bench.sh$(printf ' %q' "$@")"
A=${BENCH_A:-driveblk}
B=${BENCH_B:-qsd}
REPS=3 RUNTIME=8 WARMUP=1 SIZE=2G ROWS_RE="" RECORD=0 KEEP=0 QUICK=0 REPS_SET=0
CEILING=1 DROP_CACHES=0 COLD=0 COLD_ONLY=0 COLD_SIZE=10G COLD_LINK="100 200" COLD_EXPORT=1 COLD_CONFIGS=() COLD_DATA_PCT=60 COLD_DROP_IMAGE=0
COLD_REMOTE=dir COLD_DRIVE_LIMIT=200/200 IMPORT_ENC= ENC_CACHE= COLD_IMPORT_ARGS= COLD_RUNS=first,repeat,differ,ahead
SYNC_LINK="100 200"

die() { echo "bench.sh: error: $*" >&2; exit 1; }
log() { echo "bench.sh: $*" >&2; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --reps) REPS=$2; REPS_SET=1; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --rows) ROWS_RE=$2; shift 2 ;;
        --record) RECORD=1; shift ;;
        --keep) KEEP=1; shift ;;
        --self-test-qsd) A=qsd; shift ;;
        --drop-caches) DROP_CACHES=1; shift ;;
        --no-ceiling) CEILING=0; shift ;;
        --cold) COLD=1; shift ;;
        --cold-only) COLD=1 COLD_ONLY=1; shift ;;
        --cold-config) COLD_CONFIGS+=("$2"); shift 2 ;;
        --cold-size) COLD_SIZE=$2; shift 2 ;;
        --cold-link) COLD_LINK=$2; shift 2 ;;
        --cold-no-export) COLD_EXPORT=0; shift ;;
        --cold-data-pct) COLD_DATA_PCT=$2; shift 2 ;;
        --cold-drop-image) COLD_DROP_IMAGE=1 COLD_EXPORT=0; shift ;;
        --cold-import-args) COLD_IMPORT_ARGS=$2; shift 2 ;;
        --cold-runs) COLD_RUNS=$2; shift 2 ;;
        --cold-remote) COLD_REMOTE=$2; shift 2 ;;
        --cold-drive-limit) COLD_DRIVE_LIMIT=$2; shift 2 ;;
        --sync-link) SYNC_LINK=$2; shift 2 ;;
        --encrypt) IMPORT_ENC=--encrypt; shift ;;
        --encrypt-cache) IMPORT_ENC=--encrypt ENC_CACHE=--encrypt-cache; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
if [[ $QUICK == 1 ]]; then
    RUNTIME=1 WARMUP=0.2 SIZE=256M
    [[ $REPS_SET == 1 ]] || REPS=1
fi
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
[[ $COLD_REMOTE == dir || $COLD_REMOTE == gdrive ]] || die "--cold-remote is dir or gdrive"
for d in "$A" "$B"; do [[ $d == driveblk || $d == qsd ]] || die "unknown daemon '$d' (driveblk|qsd)"; done
read -r SYNC_LAT SYNC_MBIT <<<"$SYNC_LINK"
[[ $SYNC_LAT =~ ^[0-9]+$ && $SYNC_MBIT =~ ^[1-9][0-9]*$ ]] || die "--sync-link wants \"MS MBIT\", e.g. \"100 200\""
LINK_ARGS="--remote-latency-ms $SYNC_LAT --remote-bandwidth-mbit $SYNC_MBIT"

# ---- Rows --------------------------------------------------------------------------------------
# name | image kind | queues | generator args | driveblk args | qsd format blockdev (node disk0)
# Image kinds (made once per bench run by ensure_image; "@L2@" in the qsd column becomes an
# l2-cache-size covering the whole disk, so both daemons keep all qcow2 metadata in memory):
#   raw          --size of random data
#   qcow2        the raw image converted to qcow2 (fully allocated)
#   qcow2-empty  a fresh `qemu-img create -f qcow2` image: every run gets its own copy, so both
#                daemons start from an empty image and allocate as they write
#   overlay      an empty qcow2 overlay with the qcow2 image as backing file (qsd opens the
#                backing file with the same file options); every run gets its own copy
#   vol-ram      driveblk: the qcow2 image imported as a volume (dir: remote on local disk),
#                served with an empty cache dir per run; a warm-up pass (1 MiB sequential reads
#                of the whole disk, both daemons) fills its RAM tier. qsd: the qcow2 file.
#   vol-ssd      driveblk: the same volume served from a cache dir hydrated once (`driveblk
#                hydrate`), RAM tier 64M, so reads hit the SSD tier. qsd: the qcow2 file.
#                Before each run of either daemon both files are read into the page cache.
#   vol-ssd-drop vol-ssd, but the page cache is dropped before each run of either daemon
#                (only with --drop-caches): both read from the disk, not from memory.
#   vol-wb       driveblk: the volume written in a cache mode (--cache), from a per-run copy of
#                the hydrated cache dir (writes never wait for a fetch) and a per-run hard-link
#                copy of the remote folder (generations committed during the run go there and
#                are thrown away with it); --sync-timeout 1 at stop, so the final upload of what
#                the run dirtied is cut short. qsd: the qcow2 file, written in place. "@LINK@" in
#                the driveblk column becomes the --sync-link simulated link.
#   vol-wb-cold  vol-wb, but from an empty cache dir per run (writes of whole pages into chunks
#                not cached land without fetching them; qcow2 metadata is fetched on first use).
#   null         qsd's null-co driver, no image (the ceiling runs, see --no-ceiling); not a row.
#   The vol-* rows run with --boot-profile off: they measure steady-state serving (a recorded
#   "boot" here would be the warm-up pass, saved at every stop); the cold experiment measures
#   boot profiles.
ROWS=(
    "4K randread QD32 1q|raw|1|--rw randread --bs 4k --iodepth 32|--format raw|driver=raw"
    "4K randread QD32 2q|raw|2|--rw randread --bs 4k --iodepth 32|--format raw|driver=raw"
    "4K randwrite QD32 1q|raw|1|--rw randwrite --bs 4k --iodepth 32|--format raw|driver=raw"
    "4K randwrite QD32 2q|raw|2|--rw randwrite --bs 4k --iodepth 32|--format raw|driver=raw"
    "64K seqread QD8 1q|raw|1|--rw read --bs 64k --iodepth 8|--format raw|driver=raw"
    "qcow2 full: 4K randread QD32 1q|qcow2|1|--rw randread --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@"
    "qcow2 full: 4K randread QD32 2q|qcow2|2|--rw randread --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@"
    "qcow2 full: 4K randwrite QD32 1q|qcow2|1|--rw randwrite --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@"
    "qcow2 full: 64K seqread QD8 1q|qcow2|1|--rw read --bs 64k --iodepth 8|--format qcow2|driver=qcow2,l2-cache-size=@L2@"
    "qcow2 sparse: 4K randwrite QD32 1q|qcow2-empty|1|--rw randwrite --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@"
    "qcow2 sparse: 4K randwrite QD32 2q|qcow2-empty|2|--rw randwrite --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@"
    "qcow2 overlay: 4K randread QD32 1q|overlay|1|--rw randread --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@,backing=base0"
    "qcow2 overlay: 4K randwrite QD32 1q|overlay|1|--rw randwrite --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=@L2@,backing=base0"
    "volume RAM-warm: 4K randread QD32 1q|vol-ram|1|--rw randread --bs 4k --iodepth 32|--format qcow2 --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume RAM-warm: 4K randread QD32 2q|vol-ram|2|--rw randread --bs 4k --iodepth 32|--format qcow2 --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume SSD-warm: 4K randread QD32 1q|vol-ssd|1|--rw randread --bs 4k --iodepth 32|--format qcow2 --ram-cache 64M --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume SSD-warm: 4K randread QD32 2q|vol-ssd|2|--rw randread --bs 4k --iodepth 32|--format qcow2 --ram-cache 64M --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume RAM-warm: 4K randread QD1 1q (latency)|vol-ram|1|--rw randread --bs 4k --iodepth 1|--format qcow2 --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume SSD-warm: 4K randread QD1 1q (latency)|vol-ssd|1|--rw randread --bs 4k --iodepth 1|--format qcow2 --ram-cache 64M --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume SSD, page cache dropped: 4K randread QD32 1q|vol-ssd-drop|1|--rw randread --bs 4k --iodepth 32|--format qcow2 --ram-cache 64M --boot-profile off|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback: 4K randwrite QD32 1q|vol-wb|1|--rw randwrite --bs 4k --iodepth 32|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback: 64K seqwrite QD8 1q|vol-wb|1|--rw write --bs 64k --iodepth 8|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback: 4K randwrite QD32, FLUSH every 8 1q|vol-wb|1|--rw randwrite --bs 4k --iodepth 32 --flush-every 8|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback: 4K write+FLUSH QD1 1q (latency)|vol-wb|1|--rw randwrite --bs 4k --iodepth 1 --flush-every 1|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback, empty cache: 4K randwrite QD32 1q|vol-wb-cold|1|--rw randwrite --bs 4k --iodepth 32|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback, empty cache: 64K seqwrite QD8 1q|vol-wb-cold|1|--rw write --bs 64k --iodepth 8|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1|driver=qcow2,l2-cache-size=@L2@"
    "volume writeback, link: 4K write+FLUSH QD1|vol-wb|1|--rw randwrite --bs 4k --iodepth 1 --flush-every 1|--format qcow2 --boot-profile off --cache writeback --sync-timeout 1 @LINK@|driver=qcow2,l2-cache-size=@L2@"
    "volume writethrough, link: 4K write+FLUSH QD1|vol-wb|1|--rw randwrite --bs 4k --iodepth 1 --flush-every 1|--format qcow2 --boot-profile off --cache writethrough --sync-timeout 1 @LINK@|driver=qcow2,l2-cache-size=@L2@"
    "volume unsafe, link: 4K write+FLUSH QD1|vol-wb|1|--rw randwrite --bs 4k --iodepth 1 --flush-every 1|--format qcow2 --boot-profile off --cache unsafe --sync-timeout 1 @LINK@|driver=qcow2,l2-cache-size=@L2@"
)

# ---- Write-back sync rows (driveblk only) --------------------------------------------------------
# name | volume kind | generator args | driveblk args. Selected with --rows like the A/B rows; each
# rep serves the volume over the simulated link (--sync-link), makes the generator's changes,
# then SIGTERM: the final sync uploads them (timed from SIGTERM to exit). Volume kinds:
#   sync-raw  512 MiB of random data (incompressible) as a raw volume; every run starts from a
#             copy of one hydrated cache dir (writes never wait for a fetch) and a hard-link copy
#             of the remote folder (objects are immutable; each run commits into its own copy)
#   sync-40g  `qemu-img create -f qcow2` of 40 GiB (sparse), imported; empty cache dir per run
SYNC_ROWS=(
    "sync: 256 MiB sequential, compressible data|sync-raw|--rw write --bs 1m --iodepth 8 --ios 256 --size 256m --data compressible|--format raw"
    "sync: 256 MiB sequential, incompressible data|sync-raw|--rw write --bs 1m --iodepth 8 --ios 256 --size 256m --data random|--format raw"
    "sync: 4K writes one per MiB over 256 MiB, incompressible|sync-raw|--rw write --bs 4k --stride 1m --iodepth 1 --ios 256 --size 256m --data random|--format raw"
    "sync: one 4K write + FLUSH, 40 GiB sparse qcow2|sync-40g|--rw randwrite --bs 4k --iodepth 1 --ios 1 --flush-every 1 --data random|--format qcow2"
)

# ---- Tools -------------------------------------------------------------------------------------
need_root_apt() { [[ $EUID == 0 ]] || die "$1 is missing and installing it needs root"; }
if ! command -v qemu-storage-daemon >/dev/null; then
    need_root_apt qemu-storage-daemon
    log "installing qemu-utils from bookworm-backports (qemu-storage-daemon)"
    echo "deb http://deb.debian.org/debian bookworm-backports main" \
        >/etc/apt/sources.list.d/bookworm-backports.list
    apt-get update -q && apt-get install -y -q -t bookworm-backports qemu-utils
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon still not found"
fi
if ! command -v jq >/dev/null; then
    need_root_apt jq
    apt-get install -y -q jq || { apt-get update -q && apt-get install -y -q jq; }
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GEN=$TARGET/release/driveblk-bench
DRIVEBLK=${DRIVEBLK_BIN:-$TARGET/release/driveblk}
GEN=${BENCH_GEN:-$GEN}
cd "$ROOT"
if [[ -n ${BENCH_GEN:-} ]]; then
    [[ -x $GEN ]] || die "BENCH_GEN=$GEN is not an executable"
else
    log "building driveblk-bench (release)"
    cargo build --release -q -p driveblk-bench || die "driveblk-bench failed to build"
fi
if [[ -n ${DRIVEBLK_BIN:-} ]]; then
    [[ -x $DRIVEBLK_BIN ]] || die "DRIVEBLK_BIN=$DRIVEBLK_BIN is not an executable"
elif [[ $A == driveblk || $B == driveblk || $COLD == 1 ]]; then
    log "building driveblk (release)"
    cargo build --release -q -p driveblk ||
        die "driveblk failed to build (BENCH_A=qsd or --self-test-qsd benchmarks qsd against itself)"
fi
if [[ $COLD == 1 && $COLD_REMOTE == gdrive ]]; then
    log "building driveemu (release)"
    cargo build --release -q -p driveemu || die "driveemu failed to build"
fi
EMU=$TARGET/release/driveemu EMU_PID=""

# ---- Work dir, cleanup -------------------------------------------------------------------------
# /var/tmp rather than /tmp: the image should sit on a real filesystem's page cache, not tmpfs.
if [[ -n ${BENCH_WORK:-} ]]; then
    mkdir -p "$BENCH_WORK" && WORK=$(cd "$BENCH_WORK" && pwd) KEEP=1
else
    WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/driveblk-bench.XXXXXX")
fi
if [[ -n $IMPORT_ENC && ! -f $WORK/volume.key ]]; then
    head -c 32 /dev/urandom >"$WORK/volume.key"
    export DRIVEBLK_KEY_FILE=$WORK/volume.key
fi
SOCK=$WORK/vhost.sock
DPID=""
cleanup() {
    [[ -z $EMU_PID ]] || kill -TERM "$EMU_PID" 2>/dev/null || true
    if [[ -n $DPID ]] && kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$DPID" 2>/dev/null || true
    fi
    if [[ $KEEP == 1 ]]; then log "kept work dir $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- Images ------------------------------------------------------------------------------------
declare -A IMAGES
SIZE_BYTES=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
# qsd's l2-cache-size (an integer: qsd rejects suffixes): 8 bytes of L2 entry per 64 KiB cluster
# for the whole disk, rounded up to 1 MiB, plus 1 MiB of slack.
L2_BYTES=$(( (SIZE_BYTES * 8 / 65536 / 1048576 + 2) * 1048576 ))
VOLURL="" SSD_CACHE="" DAEMON_PREFIX=()
ensure_image() { # kind: creates the image once per run (in this shell, so IMAGES persists)
    local kind=$1 path
    [[ -z ${IMAGES[$kind]:-} ]] || return 0
    case $kind in
        raw)
            path=$WORK/disk.raw
            log "writing $SIZE of random data to $path"
            # Fully written (no holes), so both daemons read real data rather than sparse zeros.
            dd if=/dev/urandom of="$path" bs=1M count=$((SIZE_BYTES / 1048576)) status=none conv=fsync
            ;;
        qcow2)
            ensure_image raw
            path=$WORK/disk.qcow2
            log "converting the raw image to $path"
            qemu-img convert -f raw -O qcow2 "${IMAGES[raw]}" "$path"
            ;;
        qcow2-empty)
            path=$WORK/empty.qcow2
            qemu-img create -q -f qcow2 "$path" "$SIZE_BYTES"
            ;;
        overlay)
            ensure_image qcow2
            path=$WORK/overlay.qcow2
            qemu-img create -q -f qcow2 -b "${IMAGES[qcow2]}" -F qcow2 "$path"
            ;;
        null)
            IMAGES[$kind]=none # qsd's null-co driver: no image at all
            return 0
            ;;
        vol-ram | vol-ssd | vol-ssd-drop | vol-wb | vol-wb-cold)
            ensure_image qcow2
            path=${IMAGES[qcow2]}
            # Only driveblk serves volumes (qsd vs qsd: both serve the qcow2 file).
            if [[ -z $VOLURL && ($A == driveblk || $B == driveblk) ]]; then
                VOLURL=dir:$WORK/remote/vol
                mkdir -p "$WORK/remote"
                log "importing $path into $VOLURL"
                "$DRIVEBLK" import "$path" "$VOLURL" --quiet $IMPORT_ENC >"$WORK/import.log" 2>&1 ||
                    { sed 's/^/    /' "$WORK/import.log" >&2; die "driveblk import failed"; }
            fi
            if [[ -n $VOLURL && $kind != vol-ram && -z $SSD_CACHE ]]; then
                SSD_CACHE=$WORK/cache-ssd
                log "hydrating $VOLURL into $SSD_CACHE"
                "$DRIVEBLK" hydrate "$VOLURL" --cache-dir "$SSD_CACHE" --quiet $ENC_CACHE >"$WORK/hydrate.log" 2>&1 ||
                    { sed 's/^/    /' "$WORK/hydrate.log" >&2; die "driveblk hydrate failed"; }
                sync -f "$WORK"
            fi
            ;;
        *) die "unknown image kind $kind" ;;
    esac
    cat "$path" >/dev/null # warm the page cache
    IMAGES[$kind]=$path
}
fresh_copy_kind() { [[ $1 == qcow2-empty || $1 == overlay ]]; }

# ---- Daemons -----------------------------------------------------------------------------------
start_daemon() { # daemon image queues driveblk-args qsd-fmt logfile [driveblk source args...]
    local d=$1 img=$2 q=$3 dargs=${4//@LINK@/$LINK_ARGS} qfmt=${5//@L2@/$L2_BYTES} logf=$6
    shift 6
    local src=("$@") pre=()
    [[ ${#src[@]} -gt 0 ]] || src=(--image "$img")
    rm -f "$SOCK"
    case $d in
        qsd)
            if [[ $qfmt == *backing=base0* ]]; then
                # The overlay's backing file, opened like the overlay (io_uring, page cache).
                pre=(--blockdev "driver=file,node-name=bfile0,filename=${IMAGES[qcow2]},aio=io_uring,cache.direct=off,read-only=on"
                    --blockdev "driver=qcow2,node-name=base0,file=bfile0,read-only=on,l2-cache-size=$L2_BYTES")
            fi
            if [[ $qfmt == driver=null-co* ]]; then
                pre=(--blockdev "$qfmt,node-name=disk0")
            else
                pre+=(--blockdev "driver=file,node-name=file0,filename=$img,aio=io_uring,cache.direct=off"
                    --blockdev "$qfmt,node-name=disk0,file=file0")
            fi
            qemu-storage-daemon "${pre[@]}" \
                --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$q" \
                >"$logf" 2>&1 &
            ;;
        driveblk)
            # shellcheck disable=SC2086 # row args are word lists
            local enc=()
            [[ -n $ENC_CACHE && " ${src[*]} " == *" --volume "* ]] && enc=("$ENC_CACHE")
            NO_COLOR=1 "${DAEMON_PREFIX[@]}" "$DRIVEBLK" serve --socket "$SOCK" "${src[@]}" "${enc[@]}" --num-queues "$q" $dargs >"$logf" 2>&1 &
            ;;
    esac
    DPID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S $SOCK ]] && return 0
        if ! kill -0 "$DPID" 2>/dev/null; then
            local rc=0
            wait "$DPID" || rc=$?
            DPID=""
            log "$d exited (status $rc) before creating its socket; log:"; sed 's/^/    /' "$logf" >&2
            return 1
        fi
        sleep 0.1
    done
    log "$d did not create $SOCK within 10 s; log:"; sed 's/^/    /' "$logf" >&2
    return 1
}

stop_daemon() { # daemon logfile [seconds]: SIGTERM, must exit 0 within 10 s (or the given time)
    local d=$1 logf=$2 secs=${3:-10} rc=0 i
    [[ -n $DPID ]] || return 0
    kill -TERM "$DPID" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then
        kill -KILL "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
        DPID=""
        log "$d did not exit within $secs s of SIGTERM (killed)"
        return 1
    fi
    wait "$DPID" || rc=$?
    DPID=""
    if [[ $rc != 0 ]]; then
        log "$d exited with status $rc after SIGTERM; log:"; tail -n 20 "$logf" | sed 's/^/    /' >&2
        return 1
    fi
}

# ---- Runs --------------------------------------------------------------------------------------
RESULTS=$WORK/results.tsv # row daemon rep iops mbps p50 p99 daemon-cpu% gen-cpu% (or FAIL)
CLK_TCK=$(getconf CLK_TCK)
# utime + stime of all the daemon's threads, in clock ticks (fields 14 and 15 of stat, counted
# after the ")" that ends the command name, which may contain spaces).
cpu_ticks() { [[ -r /proc/$1/stat ]] && sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
: >"$RESULTS"
FAILED=0
drop_page_cache() {
    sync
    echo 3 >/proc/sys/vm/drop_caches || die "cannot drop the page cache (needs root)"
}
run_one() { # row-index rep daemon key (key names the side in results: A and B may be one daemon)
    local idx=$1 rep=$2 d=$3 key=$4 name kind q gargs dargs qfmt img tag out src=() cache=""
    IFS='|' read -r name kind q gargs dargs qfmt <<<"${ROWS[$idx]}"
    ensure_image "$kind"
    img=${IMAGES[$kind]}
    tag="r${idx}-${rep}-${key//#/}"
    out=$WORK/$tag.json
    if fresh_copy_kind "$kind"; then
        # Its own copy per run: writes of one run never leave allocated clusters for the next.
        cp --sparse=always "$img" "$WORK/run.qcow2"
        img=$WORK/run.qcow2
    fi
    case $kind in
        vol-ram) cache=$WORK/cache-$tag; src=(--volume "$VOLURL" --cache-dir "$cache" --ram-cache $((SIZE_BYTES * 3 / 2))) ;;
        vol-ssd*) cache=$SSD_CACHE; src=(--volume "$VOLURL" --cache-dir "$cache") ;;
        vol-wb*)
            if [[ $d == driveblk ]]; then
                cache=$WORK/cache-$tag
                rm -rf "$cache" "$WORK/remote-$tag"
                if [[ $kind == vol-wb ]]; then cp -a --sparse=always "$SSD_CACHE" "$cache"; else mkdir -p "$cache"; fi
                cp -al "${VOLURL#dir:}" "$WORK/remote-$tag"
                sync -f "$WORK" # the copy's dirty pages must not be written back during the run
                src=(--volume "dir:$WORK/remote-$tag" --cache-dir "$cache")
            fi ;;
    esac
    [[ $kind != vol-ssd-drop ]] || drop_page_cache
    if [[ $kind == vol-ssd ]]; then
        # Warm means in the page cache, for both daemons' files. A host may page out a file's
        # cold pages (the EPYC host's DAMON scheme takes pages untouched for a minute): every
        # row's qsd run reads the qcow2, but only these rows read the cache's data file.
        cat "$img" >/dev/null
        find "$SSD_CACHE" -type f -exec cat {} + >/dev/null
    fi
    # Start on a settled disk: what the previous run wrote or deleted is on it, so its writeback
    # never lands inside this run (a write+FLUSH row would pay for it).
    sync
    local ok=1 cpu0 cpu1 t0 t1 cpu=nan
    if start_daemon "$d" "$img" "$q" "$dargs" "$qfmt" "$WORK/$tag.log" "${src[@]}"; then
        if [[ $kind == vol-ram ]]; then
            # Warm-up pass, both daemons: read the whole disk once (fills driveblk's RAM tier;
            # for qsd the qcow2 file is already in the page cache), then flush what it wrote.
            if ! "$GEN" --socket "$SOCK" --rw read --bs 1m --iodepth 8 --ios $((SIZE_BYTES / 1048576)) \
                --io-timeout 60 --json >"$WORK/$tag.warm.json" 2>"$WORK/$tag.warm.err"; then
                log "warm-up pass failed: $name, $d, rep $rep:"; sed 's/^/    /' "$WORK/$tag.warm.err" >&2
                ok=0
            fi
            sync -f "$WORK"
        fi
        # Trace rows (--pattern) replay a whole trace once, cold: no runtime, no warmup.
        local timing=(--runtime "$RUNTIME" --warmup "$WARMUP")
        [[ " $gargs " != *" --pattern "* ]] || timing=()
        cpu0=$(cpu_ticks "$DPID") t0=$EPOCHREALTIME
        # shellcheck disable=SC2086
        if [[ $ok == 1 ]] && ! "$GEN" --socket "$SOCK" --queues "$q" $gargs "${timing[@]}" \
            --io-timeout 20 --json >"$out" 2>"$WORK/$tag.err"; then
            log "generator failed: $name, $d, rep $rep:"; sed 's/^/    /' "$WORK/$tag.err" >&2
            log "$d log tail:"; tail -n 20 "$WORK/$tag.log" | sed 's/^/    /' >&2
            ok=0
        fi
        cpu1=$(cpu_ticks "$DPID") t1=$EPOCHREALTIME
        if [[ -n $cpu0 && -n $cpu1 ]]; then
            cpu=$(awk -v c="$((cpu1 - cpu0))" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
                'BEGIN {printf "%.0f", 100 * c / hz / (t1 - t0)}')
        fi
        if [[ -n $cache && $d == driveblk ]]; then
            # Where the reads were served from (status.json is refreshed every second).
            sleep 1.2
            jq -c '{ram_hits: .ram.hits, ram_bytes: .ram.bytes, ssd_hits: .ssd.hits, misses: .remote.misses, fetches: .remote.fetches}' "$cache/status.json" \
                >"$WORK/$tag.status" 2>/dev/null && log "    driveblk tiers: $(cat "$WORK/$tag.status")"
        fi
        stop_daemon "$d" "$WORK/$tag.log" || ok=0
        # Flush dirty pages of write rows now, so writeback never lands inside the next run.
        [[ $kind == null ]] || sync "$img"
    else
        ok=0
    fi
    [[ $kind != vol-ram ]] || rm -rf "$cache"
    [[ $kind != vol-wb* ]] || rm -rf "$WORK/cache-$tag" "$WORK/remote-$tag"
    ! fresh_copy_kind "$kind" || rm -f "$WORK/run.qcow2"
    if [[ $ok == 1 ]]; then
        jq -r --arg n "$name" --arg d "$key" --arg r "$rep" --arg cpu "$cpu" \
            '[$n, $d, $r, .iops, .mbps, .lat_us.p50, .lat_us.p99, $cpu, (.gen_cpu_pct // "nan")] | @tsv' "$out" >>"$RESULTS"
        jq -r --arg d "$d" --arg cpu "$cpu" '"    \($d): \(.iops|round) IOPS  \(.mbps*10|round/10) MB/s  p50 \(.lat_us.p50) us  p99 \(.lat_us.p99) us  daemon CPU \($cpu)%  generator CPU \(.gen_cpu_pct)%"' "$out" >&2
    else
        printf '%s\t%s\t%s\tFAIL\n' "$name" "$key" "$rep" >>"$RESULTS"
        FAILED=1
    fi
}

LABEL_A=$A LABEL_B=$B KEY_A=$A KEY_B=$B
[[ $A == "$B" ]] && LABEL_A="$A(A)" LABEL_B="$B(B)" KEY_B="$B#B"
START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
SEL=()
for i in "${!ROWS[@]}"; do
    [[ ${ROWS[$i]} == \#* ]] && continue
    [[ $COLD_ONLY == 0 ]] || continue
    IFS='|' read -r name kind _ <<<"${ROWS[$i]}"
    [[ $kind != vol-ssd-drop || $DROP_CACHES == 1 ]] || continue
    [[ -z $ROWS_RE ]] || grep -qE -- "$ROWS_RE" <<<"$name" || continue
    SEL+=("$i")
done
SYNC_SEL=()
for i in "${!SYNC_ROWS[@]}"; do
    [[ $COLD_ONLY == 0 ]] || continue
    [[ $A == driveblk || $B == driveblk ]] || continue
    [[ -z $ROWS_RE ]] || grep -qE -- "$ROWS_RE" <<<"${SYNC_ROWS[$i]%%|*}" || continue
    SYNC_SEL+=("$i")
done
[[ ${#SEL[@]} -gt 0 || ${#SYNC_SEL[@]} -gt 0 || $COLD == 1 ]] || die "no row matches --rows '$ROWS_RE'"
[[ ${#SEL[@]} -eq 0 ]] ||
    log "$LABEL_A vs $LABEL_B: ${#SEL[@]} rows x $REPS reps, ${RUNTIME}s + ${WARMUP}s warmup each; work dir $WORK"
# The ceiling of a row: the same load and queue count against qsd's null-co driver. One ceiling
# row per distinct (queues, load), appended to ROWS; CEIL_OF maps a row to its ceiling's index.
declare -A CEIL_OF=() CEIL_IDX=()
if [[ $CEILING == 1 ]]; then
    for i in "${SEL[@]}"; do
        IFS='|' read -r _ _ q gargs _ <<<"${ROWS[$i]}"
        key="$q|$gargs"
        if [[ -z ${CEIL_IDX[$key]:-} ]]; then
            CEIL_IDX[$key]=${#ROWS[@]}
            ROWS+=("ceiling (qsd null-co): ${gargs//--/} ${q}q|null|$q|$gargs|-|driver=null-co,read-zeroes=off,size=$SIZE_BYTES")
        fi
        CEIL_OF[$i]=${CEIL_IDX[$key]}
    done
fi
for i in "${SEL[@]}"; do
    for ((rep = 1; rep <= REPS; rep++)); do
        log "${ROWS[$i]%%|*}: rep $rep/$REPS"
        # A, B on odd reps and B, A on even ones: whichever side runs second inherits what the
        # first left behind (its deleted files, a warmer page cache), so neither always does.
        if ((rep % 2)); then
            run_one "$i" "$rep" "$A" "$KEY_A"
            run_one "$i" "$rep" "$B" "$KEY_B"
        else
            run_one "$i" "$rep" "$B" "$KEY_B"
            run_one "$i" "$rep" "$A" "$KEY_A"
        fi
        c=${CEIL_OF[$i]:-}
        # Each ceiling runs once per rep, next to the first row that needs it.
        if [[ -n $c ]] && ! awk -F'\t' -v n="${ROWS[$c]%%|*}" -v r="$rep" '$1 == n && $3 == r {f=1} END {exit !f}' "$RESULTS"; then
            run_one "$c" "$rep" qsd ceil
        fi
    done
done
AB_END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- Write-back sync rows ----------------------------------------------------------------------
# driveblk only. Per rep: serve a volume over the simulated link, let the generator change it,
# SIGTERM; the daemon's final sync uploads the changes. The daemon runs under strace (seccomp-bpf
# filtered to file-name syscalls, so the data path is not slowed) to count the requests the dir:
# remote serves: put = rename onto a key, create = link onto a key (the fenced commit), get =
# open of a key, head = stat of a key (minus the stat each put/create does after writing), list =
# open of the folder, delete = unlink of a key. (dir: has no "reserve" request; stores that need
# one, e.g. Drive, add one per commit.)
SYNC_TSV=$WORK/sync.tsv # row rep changed packed-chunks manifest-bytes uploaded new-object-bytes secs puts creates gets heads lists deletes gens dirty-left chunk-size patch-pages
: >"$SYNC_TSV"
declare -A SYNC_REMOTE=() SYNC_CACHE=()
ensure_sync_volume() { # kind
    local kind=$1 src
    [[ -z ${SYNC_REMOTE[$kind]:-} ]] || return 0
    mkdir -p "$WORK/remote"
    case $kind in
        sync-raw)
            src=$WORK/sync.raw
            log "sync: 512 MiB of random data as a raw volume"
            dd if=/dev/urandom of="$src" bs=1M count=512 status=none
            "$DRIVEBLK" import "$src" "dir:$WORK/remote/sync-raw" --quiet $IMPORT_ENC >"$WORK/sync-import.log" 2>&1 ||
                { sed 's/^/    /' "$WORK/sync-import.log" >&2; die "sync: import failed"; }
            "$DRIVEBLK" hydrate "dir:$WORK/remote/sync-raw" --cache-dir "$WORK/sync-raw-cache" --quiet $ENC_CACHE \
                >"$WORK/sync-hydrate.log" 2>&1 ||
                { sed 's/^/    /' "$WORK/sync-hydrate.log" >&2; die "sync: hydrate failed"; }
            rm -f "$src"
            SYNC_CACHE[$kind]=$WORK/sync-raw-cache
            ;;
        sync-40g)
            src=$WORK/sync-40g.qcow2
            qemu-img create -q -f qcow2 "$src" 40G
            "$DRIVEBLK" import "$src" "dir:$WORK/remote/sync-40g" --quiet $IMPORT_ENC >"$WORK/sync-import.log" 2>&1 ||
                { sed 's/^/    /' "$WORK/sync-import.log" >&2; die "sync: import failed"; }
            rm -f "$src"
            SYNC_CACHE[$kind]=""
            ;;
        *) die "unknown sync volume kind $kind" ;;
    esac
    sync -f "$WORK"
    SYNC_REMOTE[$kind]=$WORK/remote/$kind
}
# strace output -> "puts creates gets heads lists deletes" for requests into folder $2 made at or
# after unix time $3.
count_requests() { # strace-file remote-dir since
    awk -v dir="$2" -v since="$3" '
        $2 < since { next }
        {
            line = $0
            # The key a path names in the folder, or "" (the folder itself, other paths).
            n = 0; delete keys
            while (match(line, /"[^"]*"/)) {
                p = substr(line, RSTART + 1, RLENGTH - 2); line = substr(line, RSTART + RLENGTH)
                keys[++n] = p
            }
        }
        function key(p) { return index(p, dir "/") == 1 ? substr(p, length(dir) + 2) : "" }
        / (rename|renameat|renameat2)\(/ && n >= 2 && key(keys[2]) != "" && key(keys[2]) !~ /^\./ { puts++; next }
        / (link|linkat)\(/ && n >= 2 && key(keys[2]) != "" && key(keys[2]) !~ /^\./ { creates++; next }
        / (unlink|unlinkat)\(/ && n >= 1 && key(keys[1]) != "" && key(keys[1]) !~ /^\./ { deletes++; next }
        / openat\(/ && n >= 1 && keys[1] == dir && /O_DIRECTORY/ { lists++; next }
        / openat\(/ && n >= 1 && key(keys[1]) != "" && key(keys[1]) !~ /^\./ && !/O_CREAT/ { gets++; next }
        / (statx|newfstatat|stat|lstat)\(/ && n >= 1 && key(keys[1]) != "" && key(keys[1]) !~ /^\./ { stats++; next }
        END { h = stats - puts - creates; if (h < 0) h = 0; printf "%d %d %d %d %d %d\n", puts, creates, gets, h, lists, deletes }
    ' "$1"
}
sync_one() { # sync-row-index rep
    local idx=$1 rep=$2 name kind gargs dargs tag remote cache out st t_gen t_term t_exit secs rc=0 child i
    IFS='|' read -r name kind gargs dargs <<<"${SYNC_ROWS[$idx]}"
    ensure_sync_volume "$kind"
    tag="s${idx}-${rep}" remote=$WORK/remote-s$idx-$rep cache=$WORK/cache-s$idx-$rep out=$WORK/s${idx}-${rep}.json
    rm -rf "$remote" "$cache"
    cp -al "${SYNC_REMOTE[$kind]}" "$remote"
    if [[ -n ${SYNC_CACHE[$kind]} ]]; then cp -a --sparse=always "${SYNC_CACHE[$kind]}" "$cache"; else mkdir -p "$cache"; fi
    sync -f "$WORK"
    ls -A "$remote" | sort >"$WORK/$tag.before"
    DAEMON_PREFIX=(strace -f -qq --seccomp-bpf -ttt -s 4096 -o "$WORK/$tag.strace"
        -e trace=openat,rename,renameat,renameat2,link,linkat,unlink,unlinkat,statx,newfstatat)
    # shellcheck disable=SC2086
    if ! start_daemon driveblk "" 1 "$dargs --boot-profile off --sync-interval 3600 --sync-timeout 600 $LINK_ARGS" "" \
        "$WORK/$tag.log" --volume "dir:$remote" --cache-dir "$cache"; then
        DAEMON_PREFIX=()
        printf '%s\t%s\tFAIL\n' "$name" "$rep" >>"$SYNC_TSV"; FAILED=1; return
    fi
    DAEMON_PREFIX=()
    t_gen=$EPOCHREALTIME
    # shellcheck disable=SC2086
    if ! "$GEN" --socket "$SOCK" $gargs --io-timeout 60 --json >"$out" 2>"$WORK/$tag.err"; then
        log "generator failed: $name, rep $rep:"; sed 's/^/    /' "$WORK/$tag.err" >&2
        rc=1
    fi
    # DPID is strace; the daemon is its child.
    child=$(pgrep -P "$DPID" | head -1)
    t_term=$EPOCHREALTIME
    kill -TERM "$child" 2>/dev/null || rc=1
    for ((i = 0; i < 3000; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then
        kill -KILL "$child" 2>/dev/null || true
        rc=1
    fi
    wait "$DPID" || rc=$?
    t_exit=$EPOCHREALTIME
    DPID=""
    secs=$(awk -v a="$t_term" -v b="$t_exit" 'BEGIN {printf "%.2f", b - a}')
    st=$cache/status.json
    if [[ $rc != 0 ]] || ! jq -e '.running == false' "$st" >/dev/null 2>&1; then
        log "sync row failed: $name, rep $rep (daemon status $rc); log tail:"; tail -n 20 "$WORK/$tag.log" | sed 's/^/    /' >&2
        printf '%s\t%s\tFAIL\n' "$name" "$rep" >>"$SYNC_TSV"; FAILED=1
        rm -rf "$remote" "$cache"; return
    fi
    # What the commits packed, from the daemon's log (one line per generation).
    local packed mbytes newb reqs
    read -r packed mbytes < <(sed 's/\x1b\[[0-9;]*m//g' "$WORK/$tag.log" | awk '/write-back: committed a generation/ {
            for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "chunks") c += kv[2]; if (kv[1] == "manifest_bytes") m += kv[2] }
        } END { printf "%d %d\n", c, m }')
    newb=$(ls -A "$remote" | sort | comm -13 "$WORK/$tag.before" - | grep -v '^\.' |
        (cd "$remote" && xargs -r stat -c %s) | awk '{s += $1} END {print s + 0}')
    reqs=$(count_requests "$WORK/$tag.strace" "$remote" "$t_gen")
    # Pages uploaded as patches (chunks packed whole are in the log): from the new manifests,
    # the page runs of patches whose frame is in a pack of that generation.
    # (An --encrypt volume's manifests are sealed: its patch pages are not counted.)
    local pages=0 g
    for g in $(ls -A "$remote" | sort | comm -13 "$WORK/$tag.before" - | grep '^gen-'); do
        pages=$((pages + $(head -n1 "$remote/$g" | jq --arg p "pack-${g#gen-}-" \
            '[.packs as $P | .chunks[] | .patched? // empty | select($P[.pack] | startswith($p)) | .runs[][1]] | add // 0' \
            2>/dev/null || echo 0)))
    done
    jq -r --arg n "$name" --arg r "$rep" --arg p "$packed" --arg m "$mbytes" --arg nb "$newb" --arg secs "$secs" \
        --arg q "$reqs" --arg pages "$pages" --slurpfile st "$st" '
        ($st[0]) as $s | ($q | split(" ")) as $rq |
        [$n, $r, .bytes, $p, $m, $s.sync.bytes_uploaded, $nb, $secs, $rq[0], $rq[1], $rq[2], $rq[3], $rq[4], $rq[5],
         $s.sync.generations_committed, $s.sync.dirty_bytes, $s.chunk_size, $pages] | @tsv' "$out" >>"$SYNC_TSV"
    log "    $(tail -1 "$SYNC_TSV" | awk -F'\t' '{printf "changed %.1f MB, uploaded %.1f MB (%.3fx), %s generations, sync %s s, requests put/create/get/head/list %s/%s/%s/%s/%s", $3/1e6, $6/1e6, $6/$3, $15, $8, $9, $10, $11, $12, $13}')"
    [[ $KEEP == 1 ]] || rm -rf "$remote" "$cache"
}
if [[ ${#SYNC_SEL[@]} -gt 0 ]]; then
    command -v strace >/dev/null || { need_root_apt strace; apt-get install -y -q strace; }
    log "write-back sync rows: ${#SYNC_SEL[@]} rows x $REPS reps over a ${SYNC_LAT} ms / ${SYNC_MBIT} Mbit/s link"
    for i in "${SYNC_SEL[@]}"; do
        for ((rep = 1; rep <= REPS; rep++)); do
            log "${SYNC_ROWS[$i]%%|*}: rep $rep/$REPS"
            sync_one "$i" "$rep"
        done
    done
fi
SYNC_END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- Cold boot trace ---------------------------------------------------------------------------
# driveblk only: a raw volume behind a simulated link, empty cache, one --pattern boot replay per
# config; then "download first": driveblk export of the whole volume over the same link.
COLD_TAB=$WORK/cold.md
cold_url() { # chunk size -> the cold volume's URL
    if [[ $COLD_REMOTE == gdrive ]]; then echo "gdrive:/bench/cold-$1"; else echo "dir:$WORK/remote/cold-$1"; fi
}
# Whether volume URL $1 has a boot profile on its remote.
has_profile() { # url (inside cold_experiment: a gdrive: url needs its caller's $link for the emulator)
    # shellcheck disable=SC2046,SC2154
    "$DRIVEBLK" info --json "$1" $([[ $COLD_REMOTE == gdrive ]] && echo "$link") 2>/dev/null | jq -e '.boot_profile != null' >/dev/null
}

cold_experiment() {
    local lat mbit bytes span_mb img=$WORK/cold.raw spec cs args url cache tag out t0 t1 secs
    read -r lat mbit <<<"$COLD_LINK"
    local link="--remote-latency-ms $lat --remote-bandwidth-mbit $mbit"
    local rate=$((mbit * 125000)) # bytes/s
    local remote_note="dir: remote on local disk behind driveblk's simulated link"
    if [[ $COLD_REMOTE == gdrive ]]; then
        # The emulator is the link: its latency per request, one shared bandwidth, and the
        # per-user request limit; driveblk talks to it exactly as to Drive.
        # Its file bytes go to unlinked files in emu-data (a 40G image's 21 GB would not fit
        # in RAM), read through the page cache.
        rm -rf "$WORK/emu-data"
        start_driveemu "$EMU" "$WORK" --latency-ms "$lat" --bandwidth-mbit "$mbit" --rate-limit "$COLD_DRIVE_LIMIT" \
            --data-dir "$WORK/emu-data" --sa-key-out "$WORK/drive-creds.json" || die "cold: the Drive emulator did not start"
        link="--drive-api-url $EMU_BASE --drive-credentials $WORK/drive-creds.json"
        # A new emulator starts empty: imports of an earlier run (BENCH_WORK) are gone.
        rm -f "$WORK"/cold-import-*.done
        [[ ! -f $img.dropped ]] || die "cold: --cold-drop-image removed $img, which a new Drive emulator needs: use a fresh BENCH_WORK"
        remote_note="the Drive emulator (driveemu) at ${lat} ms per request, ${mbit} Mbit/s shared, per-user limit $COLD_DRIVE_LIMIT requests/s/burst; driveblk's real Drive code path (auth, pacer, retries, read merging)"
    fi
    [[ ${#COLD_CONFIGS[@]} -gt 0 ]] || COLD_CONFIGS=(1M)
    bytes=$(numfmt --from=iec "$COLD_SIZE") || die "bad --cold-size $COLD_SIZE"
    [[ $COLD_DATA_PCT =~ ^[0-9]+$ && $COLD_DATA_PCT -ge 1 && $COLD_DATA_PCT -le 100 ]] || die "bad --cold-data-pct $COLD_DATA_PCT"
    span_mb=$((bytes * COLD_DATA_PCT / 100 / 1048576))
    log "cold: $COLD_SIZE image, first $COLD_DATA_PCT% ($span_mb MiB) random data, the rest a hole"
    if [[ ! -f $img.done && ! -f $img.dropped ]]; then
        truncate -s "$bytes" "$img"
        dd if=/dev/urandom of="$img" bs=1M count="$span_mb" conv=notrunc status=none
        touch "$img.done"
    fi
    declare -A imported=()
    local first_url=""
    {
        echo "Link: ${lat} ms per request, ${mbit} Mbit/s (= $((rate / 1000000)) MB/s) shared; remote: $remote_note; image $COLD_SIZE raw, first $COLD_DATA_PCT% random data; QD8 boot trace (\`--pattern boot\`, defaults, its files spread over that $COLD_DATA_PCT%); empty cache dir per run; 1 run per config."
        echo
        echo "First boot: no boot profile yet; driveblk records one and saves it to the remote at SIGTERM (save time in its own column). Cold with profile: a new empty cache dir (another machine), same volume, the same boot; driveblk streams the saved profile ahead of the guest. 10%-different: a new empty cache dir, a boot a tenth of whose files are other files and as many read in another order (\`--trace-differ 0.1\`), against the profile the runs before left. 10%-different, serve started ahead: the same boot against the same profile (the one it learned is set aside) on a new cache, the guest starting once \`serve\` has streamed the profile (as when the daemon starts with the host and the VM later); that wait is in the run's name, the boot's wall time excludes it. MB by source: guest misses / profile stream / readahead / first-boot stream (hydration is off)."
        echo
        echo "| config (import chunk : serve args) | run | import s | boot trace wall s | floor s (trace bytes / link) | wall / floor | trace MB | remote MB fetched | fetched / trace | MB by source miss/profile/readahead/stream | remote fetches | guest misses | misses served by profile | readahead chunks | profile saved at stop, s |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    } >"$COLD_TAB"
    # All imports first (CPU-heavy), then the replays (link-bound).
    for spec in "${COLD_CONFIGS[@]}"; do
        cs=${spec%%:*}
        url=$(cold_url "$cs")
        [[ -n $first_url ]] || first_url=$url
        if [[ -z ${imported[$cs]:-} && -f $WORK/cold-import-$cs.done ]]; then
            imported[$cs]=-
        elif [[ -z ${imported[$cs]:-} ]]; then
            log "cold: importing with --chunk-size $cs"
            t0=$EPOCHREALTIME
            # shellcheck disable=SC2086
            "$DRIVEBLK" import "$img" "$url" --chunk-size "$cs" --quiet $IMPORT_ENC $COLD_IMPORT_ARGS $( [[ $COLD_REMOTE == gdrive ]] && echo "$link" ) >"$WORK/cold-import-$cs.log" 2>&1 ||
                { sed 's/^/    /' "$WORK/cold-import-$cs.log" >&2; die "cold import failed"; }
            sync -f "$WORK"
            touch "$WORK/cold-import-$cs.done"
            imported[$cs]=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", b - a}')
        fi
    done
    log "cold: imports done"
    if [[ $COLD_DROP_IMAGE == 1 && -f $img ]]; then
        rm -f "$img" "$img.done"
        touch "$img.dropped"
    fi
    local ci=0
    for spec in "${COLD_CONFIGS[@]}"; do
        ci=$((ci + 1))
        cs=${spec%%:*} args=""
        [[ $spec != *:* ]] || args=${spec#*:}
        url=$(cold_url "$cs")
        # Each config starts from a volume without a boot profile.
        [[ ,$COLD_RUNS, != *,first,* ]] || rm -f "$WORK/remote/cold-$cs"/profile-*
        [[ $COLD_REMOTE != gdrive ]] || [[ ${#COLD_ROWS[@]} == 0 ]] || {
            # Drive: a fresh volume per config (profiles cannot be removed by path here).
            url=gdrive:/bench/cold-$cs-${#COLD_ROWS[@]}
            # shellcheck disable=SC2086
            "$DRIVEBLK" import "$img" "$url" --chunk-size "$cs" --quiet $IMPORT_ENC $COLD_IMPORT_ARGS $link >"$WORK/cold-import-$cs-again.log" 2>&1 ||
                die "cold: re-import for $spec failed"
        }
        local run
        for run in "first boot" "cold with profile" "10%-different" "10%-different, serve started ahead"; do
            local short
            case $run in
                "first boot") short=first ;;
                "cold with profile") short=repeat ;;
                "10%-different") short=differ ;;
                *) short=ahead ;;
            esac
            [[ ,$COLD_RUNS, == *,$short,* ]] || continue
            local pdir=$WORK/remote/cold-$cs
            if [[ $short == differ && $COLD_REMOTE == dir ]]; then
                # The profile this boot streams: the "ahead" run streams it too (this boot
                # saves a new one, which has learned the files it read).
                (cd "$pdir" && ls -A | grep '^profile-' || true) >"$WORK/cold-c$ci-profiles"
            fi
            if [[ $short == ahead ]]; then
                if [[ $COLD_REMOTE != dir ]]; then
                    log "cold: $spec, $run: dir: remote only (it sets the remote's boot profiles back); skipped"
                    continue
                fi
                [[ -s $WORK/cold-c$ci-profiles ]] || die "cold: the ahead run needs the differ run before it"
                (cd "$pdir" && ls -A | grep '^profile-' | grep -vxF -f "$WORK/cold-c$ci-profiles" | xargs -r rm -f)
            fi
            # Named by config and run: runs split across invocations (BENCH_WORK) keep their logs.
            tag=cold-c$ci-$short
            COLD_ROWS+=("$spec $run")
            cache=$WORK/$tag-cache out=$WORK/$tag.json
            rm -rf "$cache"
            log "cold: $spec, $run: serving $url over the link, replaying the boot trace"
            # shellcheck disable=SC2086
            start_daemon driveblk "" 1 "--format raw $link $args" "" "$WORK/$tag.log" \
                --volume "$url" --cache-dir "$cache" || die "cold: daemon did not start"
            if [[ $short == ahead ]]; then
                # The guest comes once the profile has streamed (status.json, refreshed each second).
                t0=$EPOCHREALTIME
                for _ in $(seq 1 1200); do
                    jq -e '.boot_profile.segments > 0 and .boot_profile.segments_done == .boot_profile.segments' \
                        "$cache/status.json" >/dev/null 2>&1 && break
                    sleep 0.25
                done
                secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
                jq -e '.boot_profile.segments_done == .boot_profile.segments' "$cache/status.json" >/dev/null 2>&1 ||
                    die "cold: the profile did not stream within 300 s (see $WORK/$tag.log)"
                run="$run (profile streamed in $secs s)"
            fi
            local differ=0
            [[ $short != differ && $short != ahead ]] || differ=0.1
            if ! "$GEN" --socket "$SOCK" --pattern boot --trace-differ "$differ" --trace-span-pct "$COLD_DATA_PCT" --io-timeout 300 --json >"$out" 2>"$WORK/$tag.err"; then
                sed 's/^/    /' "$WORK/$tag.err" >&2
                stop_daemon driveblk "$WORK/$tag.log" || true
                die "cold: generator failed"
            fi
            sleep 1.5 # status.json is refreshed every second
            cp "$cache/status.json" "$WORK/$tag.status.json"
            # The first boot saves its profile on the way out: over the link, that takes a while.
            t0=$EPOCHREALTIME
            stop_daemon driveblk "$WORK/$tag.log" 900 || die "cold: daemon did not stop cleanly"
            secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
            # A shutdown waits at most 5 s for the profile's upload; what is
            # not up by then goes up at the next start on that cache: restart
            # there (no guest) until it is on the remote.
            if [[ $run == "first boot" ]] && ! has_profile "$url"; then
                log "cold: the profile's upload outlasted the shutdown; a restart on the same cache sends it"
                # shellcheck disable=SC2086
                start_daemon driveblk "" 1 "--format raw $link $args" "" "$WORK/$tag.resume.log" \
                    --volume "$url" --cache-dir "$cache" || die "cold: daemon did not start"
                for _ in $(seq 1 1800); do has_profile "$url" && break; sleep 0.5; done
                stop_daemon driveblk "$WORK/$tag.resume.log" 900 || die "cold: daemon did not stop cleanly"
                secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
                has_profile "$url" || die "cold: the first boot saved no boot profile (see $WORK/$tag.log)"
            fi
            [[ $short == first || $short == differ ]] || secs="-"
            rm -rf "$cache"
            jq -r --arg spec "$spec" --arg run "$run" --arg imp "${imported[$cs]}" --arg rate "$rate" --arg save "$secs" \
                --slurpfile st "$WORK/$tag.status.json" '
                ($st[0]) as $s | (.bytes / ($rate | tonumber)) as $floor |
                "| \($spec) | \($run) | \($imp) | \(.elapsed_s * 10 | round / 10) | \($floor * 10 | round / 10) | \(.elapsed_s / $floor * 100 | round / 100) | \(.bytes / 1e6 | round) | \($s.remote.bytes / 1e6 | round) | \($s.remote.bytes / .bytes * 100 | round / 100) | \([$s.remote.bytes_by_source | (.miss, .profile, .readahead, .stream) / 1e6 | round] | map(tostring) | join(" / ")) | \($s.remote.fetches)\(if ($s.drive_reads.requests // 0) > 0 then " (\($s.drive_reads.requests) Drive reads)" else "" end) | \($s.remote.misses) | \($s.boot_profile.waits // 0) | \($s.remote.readahead_chunks) | \($save) |"' \
                "$out" >>"$COLD_TAB"
            log "    $(tail -1 "$COLD_TAB")"
        done
    done
    if [[ $COLD_EXPORT == 1 ]]; then
        log "cold: download first: driveblk export $first_url over the same link"
        mkdir -p "$WORK/export-cache"
        t0=$EPOCHREALTIME
        # shellcheck disable=SC2086
        "$DRIVEBLK" export "$first_url" "$WORK/export.raw" --cache-dir "$WORK/export-cache" --quiet $link \
            >"$WORK/export.log" 2>&1 || { sed 's/^/    /' "$WORK/export.log" >&2; die "cold: export failed"; }
        t1=$EPOCHREALTIME
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
        cmp -s "$img" "$WORK/export.raw" || log "cold: WARNING: exported image differs from the original"
        rm -f "$WORK/export.raw"
        {
            echo
            echo "Download first (\`driveblk export\` of the ${first_url##*/} volume, same link, default --parallel: 64 MiB in flight): $secs s for $((span_mb * 1048576 / 1000000)) MB of non-zero chunks (zero chunks are not stored; their own floor: $(awk -v b="$((span_mb * 1048576))" -v r="$rate" 'BEGIN {printf "%.1f", b / r}') s)."
        } >>"$COLD_TAB"
    else
        {
            echo
            echo "Download first: not measured (--cold-no-export); its floor is $(awk -v b="$((span_mb * 1048576))" -v r="$rate" 'BEGIN {printf "%.1f", b / r}') s for $((span_mb * 1048576 / 1000000)) MB of non-zero chunks at the link's rate."
        } >>"$COLD_TAB"
    fi
}
COLD_ROWS=()
if [[ $COLD == 1 ]]; then cold_experiment; fi

# ---- Table -------------------------------------------------------------------------------------
median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
col() { # row daemon column -> values, or nothing if any rep failed
    awk -F'\t' -v n="$1" -v d="$2" -v c="$3" '$1 == n && $2 == d {print $c}' "$RESULTS"
}
med() { # row daemon column
    local v; v=$(col "$1" "$2" "$3")
    if [[ -z $v ]] || grep -q FAIL <<<"$v"; then echo FAIL; else median <<<"$v"; fi
}
fmt() { # value decimals
    if [[ $1 == FAIL ]]; then echo FAIL; else awk -v x="$1" -v p="$2" 'BEGIN {printf "%." p "f", x}'; fi
}
fmtl() { # "x/y" -> "x / y", each rounded or FAIL
    awk -v s="$1" 'function f(x) { return x == "FAIL" ? x : sprintf("%.0f", x) }
        BEGIN {split(s, a, "/"); printf "%s / %s", f(a[1]), f(a[2])}'
}
TABLE=$WORK/table.md REPTAB=$WORK/reps.md
: >"$TABLE"; : >"$REPTAB"
if [[ ${#SEL[@]} -gt 0 ]]; then
{
    echo "| row | $LABEL_A IOPS | $LABEL_B IOPS | $LABEL_A MB/s | $LABEL_B MB/s | $LABEL_A p50/p99 µs | $LABEL_B p50/p99 µs | daemon CPU % $LABEL_A / $LABEL_B | CPU % per 100K IOPS $LABEL_A / $LABEL_B | IOPS $LABEL_A/$LABEL_B | null-co IOPS | $LABEL_A / null-co | $LABEL_B / null-co |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for i in "${SEL[@]}"; do
        name=${ROWS[$i]%%|*}
        ia=$(med "$name" "$A" 4) ib=$(med "$name" "$KEY_B" 4)
        ma=$(med "$name" "$A" 5) mb=$(med "$name" "$KEY_B" 5)
        la=$(med "$name" "$A" 6)/$(med "$name" "$A" 7)
        lb=$(med "$name" "$KEY_B" 6)/$(med "$name" "$KEY_B" 7)
        if [[ $ia == FAIL || $ib == FAIL ]]; then ratio=n/a; else ratio=$(awk -v a="$ia" -v b="$ib" 'BEGIN {printf "%.2f", a / b}'); fi
        ca=$(med "$name" "$A" 8)/$(med "$name" "$KEY_B" 8)
        per=$(awk -v a="$(med "$name" "$A" 8)" -v ia="$ia" -v b="$(med "$name" "$KEY_B" 8)" -v ib="$ib" '
            function f(c, i) { return (c == "FAIL" || i == "FAIL" || c == "nan" || i + 0 == 0) ? "n/a" : sprintf("%.1f", c / (i / 1e5)) }
            BEGIN { printf "%s / %s", f(a, ia), f(b, ib) }')
        ic=FAIL rc="-" rcb="-"
        if [[ -n ${CEIL_OF[$i]:-} ]]; then
            ic=$(med "${ROWS[${CEIL_OF[$i]}]%%|*}" ceil 4)
            rc=$(awk -v a="$ia" -v c="$ic" 'BEGIN {print (a == "FAIL" || c == "FAIL") ? "n/a" : sprintf("%.2f", a / c)}')
            rcb=$(awk -v a="$ib" -v c="$ic" 'BEGIN {print (a == "FAIL" || c == "FAIL") ? "n/a" : sprintf("%.2f", a / c)}')
        fi
        echo "| $name | $(fmt "$ia" 0) | $(fmt "$ib" 0) | $(fmt "$ma" 1) | $(fmt "$mb" 1) | $(fmtl "$la") | $(fmtl "$lb") | $(fmtl "$ca") | $per | $ratio | $( [[ -n ${CEIL_OF[$i]:-} ]] && fmt "$ic" 0 || echo -) | $rc | $rcb |"
    done
} >"$TABLE"
# Per-rep IOPS, so a reader can see the spread behind each median.
reps_line() { awk '{printf "%s%s", (NR > 1 ? ", " : ""), ($1 == "FAIL" ? "FAIL" : sprintf("%.0f", $1))}'; }
{
    echo "Per-repetition IOPS (run order A, B on odd reps, B, A on even reps), and the load generator's own CPU use:"
    echo
    for i in "${SEL[@]}"; do
        name=${ROWS[$i]%%|*}
        ceil=""
        [[ -z ${CEIL_OF[$i]:-} ]] || ceil="; null-co $(col "${ROWS[${CEIL_OF[$i]}]%%|*}" ceil 4 | reps_line)"
        echo "- $name: $LABEL_A $(col "$name" "$A" 4 | reps_line); $LABEL_B $(col "$name" "$KEY_B" 4 | reps_line)$ceil" \
            "(generator CPU % median: $(fmtl "$(med "$name" "$A" 9)/$(med "$name" "$KEY_B" 9)"))"
    done
} >"$REPTAB"

fi

# Sync rows: derived figures per rep, then medians per row.
SYNC_TAB=$WORK/sync.md
if [[ ${#SYNC_SEL[@]} -gt 0 ]]; then
    # per rep: row rep changed before uploaded before/changed after/changed secs MB/s link-share gens requests req/GiB puts creates gets heads lists deletes newbytes dirty-left
    SYNC_DER=$WORK/sync-derived.tsv
    awk -F'\t' -v OFS='\t' -v rate="$((SYNC_MBIT * 125000))" '$3 == "FAIL" { print $1, $2, "FAIL"; next }
        { before = $4 * $17 + $18 * 4096 + $5; req = $9 + $10 + $11 + $12 + $13 + $14
          print $1, $2, $3, before, $6, before / $3, $6 / $3, $8, $6 / $8 / 1e6, $6 / $8 / rate, $15, req,
                ($6 > 0 ? req / ($6 / 1073741824) : 0), $9, $10, $11, $12, $13, $14, $7, $16 }' "$SYNC_TSV" >"$SYNC_DER"
    smed() { # row column -> median, or FAIL
        local v; v=$(awk -F'\t' -v n="$1" -v c="$2" '$1 == n {print $c}' "$SYNC_DER")
        if [[ -z $v ]] || grep -q FAIL <<<"$v"; then echo FAIL; else median <<<"$v"; fi
    }
    # Rates and per-GiB figures only mean something for uploads of some size (not for one 4 KiB).
    big() { if awk -v x="$(smed "$1" 5)" 'BEGIN {exit !(x != "FAIL" && x >= 16777216)}'; then echo "$2"; else echo "-"; fi; }
    hb() { awk -v x="$1" 'BEGIN { if (x == "FAIL") print x; else if (x < 1048576) printf "%.1f KiB", x / 1024; else printf "%.1f MiB", x / 1048576 }'; }
    {
        echo "Link: ${SYNC_LAT} ms per request, ${SYNC_MBIT} Mbit/s (= $((SYNC_MBIT * 125000 / 1000000)) MB/s). Uploaded = the sync counters of \`driveblk status\` (packs + manifests, after compression); before compression = chunks packed whole x chunk size (the daemon's commit log lines) + pages sent as patches x 4 KiB (the new manifests) + manifests; sync = SIGTERM to exit (the final sync), its MB/s and share of the link are of the bytes uploaded (after compression); rows that FLUSH commit during the run too, and all their commits are counted. Requests: see the method section. Medians of $REPS reps."
        echo
        echo "| row | guest changed | uploaded before compression | uploaded | before / changed | uploaded / changed | sync at stop s | upload MB/s (share of link) | generations | requests put/create/get/head/list/delete | requests per GiB uploaded |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for i in "${SYNC_SEL[@]}"; do
            name=${SYNC_ROWS[$i]%%|*}
            rate=$(big "$name" "$(fmt "$(smed "$name" 9)" 1) ($(fmt "$(awk -v x="$(smed "$name" 10)" 'BEGIN {print (x == "FAIL" ? x : 100 * x)}')" 0)%)")
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" \
                "$(hb "$(smed "$name" 3)")" "$(hb "$(smed "$name" 4)")" "$(hb "$(smed "$name" 5)")" \
                "$(fmt "$(smed "$name" 6)" 3)" "$(fmt "$(smed "$name" 7)" 3)" "$(fmt "$(smed "$name" 8)" 1)" \
                "$rate" \
                "$(fmt "$(smed "$name" 11)" 0)" \
                "$(for c in 14 15 16 17 18 19; do printf '%s/' "$(fmt "$(smed "$name" $c)" 0)"; done | sed 's#/$##')" \
                "$(big "$name" "$(fmt "$(smed "$name" 13)" 0)")"
        done
        echo
        echo "Per repetition (uploaded / changed; sync s; bytes of new objects in the remote folder; dirty bytes left at exit):"
        echo
        for i in "${SYNC_SEL[@]}"; do
            name=${SYNC_ROWS[$i]%%|*}
            echo "- $name: $(awk -F'\t' -v n="$name" '$1 == n { if ($3 == "FAIL") s = s sep "FAIL"; else s = s sep sprintf("%.3f; %.1f s; %d B; %d", $7, $8, $20, $21); sep = " | " } END {print s}' "$SYNC_DER")"
        done
    } >"$SYNC_TAB"
fi

# The result tables, as shown on the terminal and in a --record entry.
print_results() {
    if [[ ${#SEL[@]} -gt 0 ]]; then
        echo
        cat "$TABLE"
        echo
        cat "$REPTAB"
    fi
    if [[ ${#SYNC_SEL[@]} -gt 0 ]]; then
        echo
        echo "### Write-back sync (driveblk volume over a simulated link)"
        echo
        cat "$SYNC_TAB"
    fi
    if [[ $COLD == 1 ]]; then
        echo
        [[ -z ${1:-} ]] || { echo "$1"; echo; }
        cat "$COLD_TAB"
    fi
}
print_results

if [[ $RECORD == 1 ]]; then
    DOC=$ROOT/docs/benchmarks.md
    # Earlier records in DOC itself don't make the measured code dirty.
    COMMIT="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . ':!docs/benchmarks.md' 2>/dev/null || echo ' (dirty)')"
    mkdir -p "$(dirname "$DOC")"
    # shellcheck disable=SC2016 # literal backticks for markdown
    [[ -f $DOC ]] || printf '# driveblk benchmarks\n\nRecorded by `scripts/bench.sh --record`.\n' >"$DOC"
    {
        echo
        if [[ ${#SEL[@]} -gt 0 ]]; then
            echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): $LABEL_A vs $LABEL_B"
        elif [[ ${#SYNC_SEL[@]} -gt 0 ]]; then
            echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): write-back sync, driveblk volume over a simulated link"
        else
            echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): cold boot trace, driveblk volume over a simulated link"
        fi
        echo
        echo "- command: \`$CMDLINE\`$( [[ -n ${BENCH_A:-}${BENCH_B:-} ]] && echo " (BENCH_A=${BENCH_A:-} BENCH_B=${BENCH_B:-})")"
        echo "- commit: $COMMIT"
        if [[ -n ${DRIVEBLK_BIN:-} && ($A == driveblk || $B == driveblk) ]]; then
            echo "- driveblk: prebuilt \`$DRIVEBLK_BIN\` (not built from this commit)"
        fi
        echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
        echo "- load average (1/5/15 min) at start: $START_LOAD; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
        [[ ${#SEL[@]} -eq 0 ]] || echo "- $(qemu-storage-daemon --version | head -1)"
        if [[ ${#SEL[@]} -gt 0 ]]; then
            echo "- load average at the end of the A/B rows: $AB_END_LOAD"
            [[ ${#SYNC_SEL[@]} -eq 0 ]] || echo "- load average at the end of the sync rows: $SYNC_END_LOAD"
            echo "- image: raw $SIZE on $(df --output=fstype "$WORK" | tail -1) (qcow2 kinds derived from it, see scripts/bench.sh), page cache warm unless the row says otherwise; ${RUNTIME}s measured after ${WARMUP}s warmup; medians of $REPS reps"
        fi
        print_results "### Cold boot trace (driveblk volume over a simulated link)"
    } >>"$DOC"
    log "recorded in $DOC"
fi
[[ $FAILED == 0 ]] || die "some runs failed (FAIL in the table); see the messages above"
