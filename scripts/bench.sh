#!/usr/bin/env bash
# scripts/bench.sh: driveblk vs qemu-storage-daemon (qsd), same image, same load generator
# (driveblk-bench, a libblkio vhost-user-blk client), same run, interleaved A/B per repetition.
#
# Usage: scripts/bench.sh [--reps N] [--quick] [--runtime S] [--warmup S] [--size SIZE]
#                         [--rows REGEX] [--record] [--keep] [--self-test-qsd]
#   --reps N         repetitions per row and daemon (default 3); the table shows medians
#   --quick          fast smoke run: 1 rep, 1 s runs, 256 MiB image
#   --runtime S      measured seconds per run (default 8); --warmup S unmeasured (default 1)
#   --size SIZE      image size for dd (default 2G)
#   --rows REGEX     only rows whose name matches (grep -E)
#   --record         append the table, command, date and machine to docs/benchmarks.md
#   --keep           keep the work dir (images, logs, per-run JSON)
#   --self-test-qsd  benchmark qsd against qsd (same as BENCH_A=qsd), to prove the harness
# Env: BENCH_A / BENCH_B pick the two daemons (driveblk|qsd; default driveblk vs qsd).
#      DRIVEBLK_BIN=path benchmarks a prebuilt driveblk instead of building this tree's.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CMDLINE="scripts/bench.sh$(printf ' %q' "$@")"
A=${BENCH_A:-driveblk}
B=${BENCH_B:-qsd}
REPS=3 RUNTIME=8 WARMUP=1 SIZE=2G ROWS_RE="" RECORD=0 KEEP=0 QUICK=0 REPS_SET=0

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
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
if [[ $QUICK == 1 ]]; then
    RUNTIME=1 WARMUP=0.2 SIZE=256M
    [[ $REPS_SET == 1 ]] || REPS=1
fi
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
for d in "$A" "$B"; do [[ $d == driveblk || $d == qsd ]] || die "unknown daemon '$d' (driveblk|qsd)"; done

# ---- Rows --------------------------------------------------------------------------------------
# name | image kind | queues | generator args | driveblk args | qsd format blockdev (node disk0)
# Image kinds: raw, qcow2 (made from the raw image by qemu-img). Add qcow2 or remote-volume rows
# here; a new image kind needs a case in ensure_image().
ROWS=(
    "4K randread QD32 1q|raw|1|--rw randread --bs 4k --iodepth 32|--format raw|driver=raw"
    "4K randread QD32 2q|raw|2|--rw randread --bs 4k --iodepth 32|--format raw|driver=raw"
    "4K randwrite QD32 1q|raw|1|--rw randwrite --bs 4k --iodepth 32|--format raw|driver=raw"
    "4K randwrite QD32 2q|raw|2|--rw randwrite --bs 4k --iodepth 32|--format raw|driver=raw"
    "64K seqread QD8 1q|raw|1|--rw read --bs 64k --iodepth 8|--format raw|driver=raw"
    # "4K randread QD32 1q qcow2|qcow2|1|--rw randread --bs 4k --iodepth 32|--format qcow2|driver=qcow2,l2-cache-size=8388608"
    # "boot trace QD8 1q|raw|1|--pattern boot --trace-reads 60000 --trace-bytes 600m|--format raw|driver=raw"
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
cd "$ROOT"
log "building driveblk-bench (release)"
cargo build --release -q -p driveblk-bench || die "driveblk-bench failed to build"
if [[ -n ${DRIVEBLK_BIN:-} ]]; then
    [[ -x $DRIVEBLK_BIN ]] || die "DRIVEBLK_BIN=$DRIVEBLK_BIN is not an executable"
elif [[ $A == driveblk || $B == driveblk ]]; then
    log "building driveblk (release)"
    cargo build --release -q -p driveblk ||
        die "driveblk failed to build (BENCH_A=qsd or --self-test-qsd benchmarks qsd against itself)"
fi

# ---- Work dir, cleanup -------------------------------------------------------------------------
# /var/tmp rather than /tmp: the image should sit on a real filesystem's page cache, not tmpfs.
WORK=$(mktemp -d /var/tmp/driveblk-bench.XXXXXX)
SOCK=$WORK/vhost.sock
DPID=""
cleanup() {
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
ensure_image() { # kind: creates the image once per run (in this shell, so IMAGES persists)
    local kind=$1 path
    [[ -z ${IMAGES[$kind]:-} ]] || return 0
    case $kind in
        raw)
            path=$WORK/disk.raw
            log "writing $SIZE of random data to $path"
            # Fully written (no holes), so both daemons read real data rather than sparse zeros.
            local bytes
            bytes=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
            dd if=/dev/urandom of="$path" bs=1M count=$((bytes / 1048576)) status=none conv=fsync
            ;;
        qcow2)
            ensure_image raw
            path=$WORK/disk.qcow2
            log "converting the raw image to $path"
            qemu-img convert -f raw -O qcow2 "${IMAGES[raw]}" "$path"
            ;;
        *) die "unknown image kind $kind" ;;
    esac
    cat "$path" >/dev/null # warm the page cache
    IMAGES[$kind]=$path
}

# ---- Daemons -----------------------------------------------------------------------------------
start_daemon() { # daemon image queues driveblk-args qsd-fmt logfile
    local d=$1 img=$2 q=$3 dargs=$4 qfmt=$5 logf=$6
    rm -f "$SOCK"
    case $d in
        qsd)
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=file0,filename=$img,aio=io_uring,cache.direct=off" \
                --blockdev "$qfmt,node-name=disk0,file=file0" \
                --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$q" \
                >"$logf" 2>&1 &
            ;;
        driveblk)
            # shellcheck disable=SC2086 # row args are word lists
            "$DRIVEBLK" serve --socket "$SOCK" --image "$img" --num-queues "$q" $dargs >"$logf" 2>&1 &
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

stop_daemon() { # daemon logfile: SIGTERM, must exit 0 within 10 s
    local d=$1 logf=$2 rc=0 i
    [[ -n $DPID ]] || return 0
    kill -TERM "$DPID" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then
        kill -KILL "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
        DPID=""
        log "$d did not exit within 10 s of SIGTERM (killed)"
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
run_one() { # row-index rep daemon key (key names the side in results: A and B may be one daemon)
    local idx=$1 rep=$2 d=$3 key=$4 name kind q gargs dargs qfmt img tag out
    IFS='|' read -r name kind q gargs dargs qfmt <<<"${ROWS[$idx]}"
    ensure_image "$kind"
    img=${IMAGES[$kind]}
    tag="r${idx}-${rep}-${key//#/}"
    out=$WORK/$tag.json
    local ok=1 cpu0 cpu1 t0 t1 cpu=nan
    if start_daemon "$d" "$img" "$q" "$dargs" "$qfmt" "$WORK/$tag.log"; then
        # Trace rows (--pattern) replay a whole trace once, cold: no runtime, no warmup.
        local timing=(--runtime "$RUNTIME" --warmup "$WARMUP")
        [[ " $gargs " != *" --pattern "* ]] || timing=()
        cpu0=$(cpu_ticks "$DPID") t0=$EPOCHREALTIME
        # shellcheck disable=SC2086
        if ! "$GEN" --socket "$SOCK" --queues "$q" $gargs "${timing[@]}" \
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
        stop_daemon "$d" "$WORK/$tag.log" || ok=0
        # Flush dirty pages of write rows now, so writeback never lands inside the next run.
        sync "$img"
    else
        ok=0
    fi
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
    name=${ROWS[$i]%%|*}
    [[ -z $ROWS_RE ]] || grep -qE -- "$ROWS_RE" <<<"$name" || continue
    SEL+=("$i")
done
[[ ${#SEL[@]} -gt 0 ]] || die "no row matches --rows '$ROWS_RE'"
log "$LABEL_A vs $LABEL_B: ${#SEL[@]} rows x $REPS reps, ${RUNTIME}s + ${WARMUP}s warmup each; work dir $WORK"
for i in "${SEL[@]}"; do
    for ((rep = 1; rep <= REPS; rep++)); do
        log "${ROWS[$i]%%|*}: rep $rep/$REPS"
        run_one "$i" "$rep" "$A" "$KEY_A"
        run_one "$i" "$rep" "$B" "$KEY_B"
    done
done

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
TABLE=$WORK/table.md
{
    echo "| row | $LABEL_A IOPS | $LABEL_B IOPS | $LABEL_A MB/s | $LABEL_B MB/s | $LABEL_A p50/p99 µs | $LABEL_B p50/p99 µs | daemon CPU % $LABEL_A / $LABEL_B | IOPS $LABEL_A/$LABEL_B |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for i in "${SEL[@]}"; do
        name=${ROWS[$i]%%|*}
        ia=$(med "$name" "$A" 4) ib=$(med "$name" "$KEY_B" 4)
        ma=$(med "$name" "$A" 5) mb=$(med "$name" "$KEY_B" 5)
        la=$(med "$name" "$A" 6)/$(med "$name" "$A" 7)
        lb=$(med "$name" "$KEY_B" 6)/$(med "$name" "$KEY_B" 7)
        if [[ $ia == FAIL || $ib == FAIL ]]; then ratio=n/a; else ratio=$(awk -v a="$ia" -v b="$ib" 'BEGIN {printf "%.2f", a / b}'); fi
        ca=$(med "$name" "$A" 8)/$(med "$name" "$KEY_B" 8)
        echo "| $name | $(fmt "$ia" 0) | $(fmt "$ib" 0) | $(fmt "$ma" 1) | $(fmt "$mb" 1) | $(fmtl "$la") | $(fmtl "$lb") | $(fmtl "$ca") | $ratio |"
    done
} >"$TABLE"
# Per-rep IOPS, so a reader can see the spread behind each median.
REPTAB=$WORK/reps.md
reps_line() { awk '{printf "%s%s", (NR > 1 ? ", " : ""), ($1 == "FAIL" ? "FAIL" : sprintf("%.0f", $1))}'; }
{
    echo "Per-repetition IOPS (run order A, B per rep), and the load generator's own CPU use:"
    echo
    for i in "${SEL[@]}"; do
        name=${ROWS[$i]%%|*}
        echo "- $name: $LABEL_A $(col "$name" "$A" 4 | reps_line); $LABEL_B $(col "$name" "$KEY_B" 4 | reps_line)" \
            "(generator CPU % median: $(fmtl "$(med "$name" "$A" 9)/$(med "$name" "$KEY_B" 9)"))"
    done
} >"$REPTAB"

echo
cat "$TABLE"
echo
cat "$REPTAB"

if [[ $RECORD == 1 ]]; then
    DOC=$ROOT/docs/benchmarks.md
    # Earlier records in DOC itself don't make the measured code dirty.
    COMMIT="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . ':!docs/benchmarks.md' 2>/dev/null || echo ' (dirty)')"
    mkdir -p "$(dirname "$DOC")"
    # shellcheck disable=SC2016 # literal backticks for markdown
    [[ -f $DOC ]] || printf '# driveblk benchmarks\n\nRecorded by `scripts/bench.sh --record`.\n' >"$DOC"
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): $LABEL_A vs $LABEL_B"
        echo
        echo "- command: \`$CMDLINE\`$( [[ -n ${BENCH_A:-}${BENCH_B:-} ]] && echo " (BENCH_A=${BENCH_A:-} BENCH_B=${BENCH_B:-})")"
        echo "- commit: $COMMIT"
        if [[ -n ${DRIVEBLK_BIN:-} && ($A == driveblk || $B == driveblk) ]]; then
            echo "- driveblk: prebuilt \`$DRIVEBLK_BIN\` (not built from this commit)"
        fi
        echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
        echo "- load average (1/5/15 min) at start: $START_LOAD; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "- $(qemu-storage-daemon --version | head -1)"
        echo "- image: raw $SIZE on $(df --output=fstype "$WORK" | tail -1), page cache warm; ${RUNTIME}s measured after ${WARMUP}s warmup; medians of $REPS reps"
        echo
        cat "$TABLE"
        echo
        cat "$REPTAB"
    } >>"$DOC"
    log "recorded in $DOC"
fi
[[ $FAILED == 0 ]] || die "some runs failed (FAIL in the table); see the messages above"
