#!/usr/bin/env bash
# scripts/bench-guest.sh: a real Linux guest booted by QEMU from a driveblk volume over a slow
# link, against the same image from a local file. The guest is Debian 12 (bookworm, minbase plus
# systemd-sysv, udev, openssh-server, python3-minimal, kmod and the cloud kernel's modules) in a
# 4 GiB ext4 qcow2, built by this script from the Debian archive (debootstrap) and cached; it
# boots the Debian cloud kernel the integration tests use (-kernel, with a tiny busybox initramfs
# that loads virtio_blk and switch_roots to /dev/vda), reaches multi-user.target, and a oneshot
# unit ordered after multi-user.target prints a marker on the serial console and powers off.
# Time = QEMU start to the marker, host clock. QEMU runs with -accel tcg (no KVM).
#
# Rows, interleaved within each repetition (medians of --reps):
#   local     QEMU's own qcow2 driver on a local copy of the image (virtio-blk-pci; the copy is
#             in the page cache)
#   file      driveblk serving a local copy of the image (`serve --image`): the daemon's own cost
#             (vhost-user, its qcow2 code, CPU next to a TCG guest) with no remote, to tell it
#             apart from what the link costs the volume rows
#   cold      driveblk: the image imported into a `dir:` volume, served with an empty cache and
#             no boot profile over the simulated link (`serve --remote-latency-ms MS
#             --remote-bandwidth-mbit MBIT`, the link of `scripts/bench.sh --cold`); the boot
#             records a profile, saved to the volume when the daemon stops
#   profile   driveblk: another "machine" (a fresh, empty cache dir, another host name) on the
#             same volume, which now has the profile the cold boot recorded (and that boot's
#             writes, synced at its stop)
#   http      for comparison: qemu-storage-daemon exporting vhost-user-blk from a local qcow2
#             overlay whose backing file is the image read through QEMU's http driver (curl,
#             read-only, its default 256 KiB readahead) from a small HTTP server on loopback
#             that adds the same link (per-request latency, shared bandwidth); needs
#             qemu-block-extra from bookworm-backports (installed if missing)
# Each repetition works on its own hard-link copy of the freshly imported volume (so every cold
# row has no profile) and its own copy of the local image (QEMU writes to it).
# With --remote gdrive the cold and profile rows' volume is on the project's Drive emulator
# (driveemu) instead: it is the link (the same latency per request and shared bandwidth, and
# Drive's per-user request limit, 200/s with bursts of 200, as scripts/bench.sh --cold-remote
# gdrive), and driveblk runs its real Drive code (auth, pacer, retries, read merging); each
# repetition gets its own volume, imported through the emulator before the first boot.
# Columns: time, ratio to local, the wall time during which a guest read waited on the remote
# (status.json remote.guest_wait_ms), guest misses, misses served by waiting on the profile
# stream, MB that crossed the link, remote requests (the daemon's
# status.json: remote.bytes, remote.requests.gets; by source: miss / profile / readahead / stream /
# hydrate), the daemon's CPU seconds from its start to the guest's power-off (driveblk rows).
# Targets (issue 11): cold <= 1.2x local, profile <= 1.02x local.
#
# Usage: scripts/bench-guest.sh [--reps N] [--rows REGEX] [--link "MS MBIT"] [--remote dir|gdrive] [--smp N]
#                               [--mem MIB] [--serve-args STR] [--chunk-size SIZE]
#                               [--timeout S] [--rep-wrapper CMD] [--record] [--keep]
#                               [--rebuild] [--build-only] [--append STR] [--smoke]
#   --reps N          repetitions (default 3); each runs every selected row once, in order
#   --rows REGEX      only rows whose name matches (grep -E; default all: local, file, cold,
#                     profile, http; profile needs cold)
#   --link "MS MBIT"  simulated link (default "100 200": 100 ms per request, 200 Mbit/s)
#   --remote R        where the cold and profile rows' volume is: dir (default; a dir: volume
#                     behind driveblk's simulated link) or gdrive (the Drive emulator; needs
#                     `cargo build --release -p driveemu`)
#   --smp N, --mem MIB  guest vCPUs (default 1: on a 2-core host the other core is left to the
#                     backend) and memory (default 1024)
#   --serve-args STR  more `driveblk serve` arguments for the cold and profile rows (e.g.
#                     "--hydrate", "--readahead-chunks 0")
#   --chunk-size SIZE the volume's chunk size at import (default: import's, 1M)
#   --timeout S       most seconds one boot may take to reach the marker (default 300)
#   --rep-wrapper CMD each repetition runs as `CMD bench-guest.sh <one rep>` (e.g. a command that
#                     quiets the machine while it runs); the image build and the import are outside
#   --record          put the table in docs/benchmarks.md (a section before "## How to run")
#   --keep            keep the work dir (serial logs, daemon logs, status files)
#   --rebuild         rebuild the cached guest image even if its stamp matches
#   --build-only      build (or check) the cached guest image and exit
#   --append STR      more kernel command line (diagnosis: "systemd.show_status=1
#                     systemd.log_level=info" shows each unit on the console)
#   --smoke           one rep of the local row only: checks the image boots (about a minute)
# Env: DRIVEBLK_GUEST_CACHE (default /var/tmp/driveblk-bench-guest) holds the built image,
#      kernel, initramfs and kernel .deb; DEBIAN_MIRROR (default http://deb.debian.org/debian).
# Needs root the first time (debootstrap, apt-get). Build driveblk first
# (`cargo build --release -p driveblk`): the script builds nothing while it measures.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/loopback.sh
. "$ROOT/scripts/loopback.sh"
# shellcheck source=scripts/record.sh
. "$ROOT/scripts/record.sh"
SELF=$ROOT/scripts/bench-guest.sh
CMDLINE="scripts/bench-guest.sh$(printf ' %q' "$@")"
die() { echo "bench-guest.sh: error: $*" >&2; exit 1; }
log() { echo "bench-guest.sh: $*" >&2; }

GCACHE=${DRIVEBLK_GUEST_CACHE:-/var/tmp/driveblk-bench-guest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REPS=3 ROWS_RE="" LINK="100 200" SMP=1 MEM=1024 TIMEOUT=300 WRAPPER="" RECORD=0 KEEP=0
REBUILD=0 BUILD_ONLY=0 ONE_REP="" WORK="" APPEND_EXTRA="" SERVE_ARGS="" CHUNK_SIZE="" REMOTE=dir
DRIVE_LIMIT=200/200
while [[ $# -gt 0 ]]; do
    case $1 in
        --reps) REPS=$2; shift 2 ;;
        --rows) ROWS_RE=$2; shift 2 ;;
        --link) LINK=$2; shift 2 ;;
        --remote) REMOTE=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --rep-wrapper) WRAPPER=$2; shift 2 ;;
        --record) RECORD=1; shift ;;
        --keep) KEEP=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --append) APPEND_EXTRA=$2; shift 2 ;;
        --serve-args) SERVE_ARGS=$2; shift 2 ;;
        --chunk-size) CHUNK_SIZE=$2; shift 2 ;;
        --smoke) REPS=1 ROWS_RE='^local$'; shift ;;
        --one-rep) ONE_REP=$2 WORK=$3; shift 3 ;; # internal: one repetition in an existing work dir
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
read -r LAT MBIT <<<"$LINK"
[[ $LAT =~ ^[0-9]+$ && $MBIT =~ ^[1-9][0-9]*$ ]] || die "--link wants \"MS MBIT\", e.g. \"100 200\""
[[ $REMOTE == dir || $REMOTE == gdrive ]] || die "--remote wants dir or gdrive"
# How serve, info and import reach the volume: through driveblk's simulated link (dir:), or the
# emulator, which is the link (gdrive:; the arguments are written by the main run, below).
LINK_ARGS=(--remote-latency-ms "$LAT" --remote-bandwidth-mbit "$MBIT")
REMOTE_ARGS=("${LINK_ARGS[@]}")
read -r -a EXTRA_SERVE <<<"$SERVE_ARGS"
ALL_ROWS=(local file cold profile http)
ROWS=()
for r in "${ALL_ROWS[@]}"; do
    [[ -z $ROWS_RE ]] || grep -qE -- "$ROWS_RE" <<<"$r" || continue
    ROWS+=("$r")
done
[[ ${#ROWS[@]} -gt 0 ]] || die "no row matches --rows '$ROWS_RE'"
[[ " ${ROWS[*]} " != *" profile "* || " ${ROWS[*]} " == *" cold "* ]] ||
    die "the profile row needs the cold row (it boots the profile the cold boot recorded)"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DRIVEBLK=${DRIVEBLK_BIN:-$TARGET/release/driveblk}
EMU=$TARGET/release/driveemu
vol_url() { # rep: the volume the rep's cold and profile rows boot
    if [[ $REMOTE == gdrive ]]; then echo "gdrive:/bench/vol-$1"; else echo "dir:$WORK/remote/vol-$1"; fi
}

# ---- The guest image (built once, cached) --------------------------------------------------------
# Bump RECIPE when what goes into the image changes; the stamp also names the package versions
# the archive gave (debootstrap takes the newest bookworm packages, so a later build may differ).
RECIPE=1
SUITE=bookworm
PKGS=systemd-sysv,udev,openssh-server,python3-minimal,kmod
DISK_SIZE=4G
MARKER=DRIVEBLK-GUEST-BOOTED
IMG=$GCACHE/guest.qcow2 KERNEL=$GCACHE/vmlinuz INITRD=$GCACHE/initrd.cpio STAMP=$GCACHE/guest.stamp
# virtio_blk and what it needs; the cloud kernel has ext4 built in.
WANT_MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

need_pkg() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    [[ $EUID == 0 ]] || die "$1 is missing and installing $2 needs root"
    log "installing $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
}

kernel_pkg() { # the package linux-image-cloud-amd64 depends on (as integration/guest/build.sh)
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1
}

build_image() {
    [[ $EUID == 0 ]] || die "building the guest image needs root (debootstrap)"
    need_pkg debootstrap debootstrap
    need_pkg mkfs.ext4 e2fsprogs
    need_pkg cpio cpio
    need_pkg qemu-img qemu-utils
    dpkg -s busybox-static >/dev/null 2>&1 || need_pkg busybox-static-missing busybox-static
    local kpkg kver stamp
    kpkg=$(kernel_pkg)
    [[ -n $kpkg ]] || { apt-get update -qq; kpkg=$(kernel_pkg); }
    [[ -n $kpkg ]] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"
    kver=$(apt-cache policy "$kpkg" | sed -n 's/^ *Candidate: //p')
    stamp="recipe=$RECIPE suite=$SUITE pkgs=$PKGS size=$DISK_SIZE kernel=$kpkg $kver script=$(sed -n '/^build_image()/,/^}/p' "$SELF" | sha256sum | cut -c1-16)"
    if [[ $REBUILD == 0 && -s $IMG && -s $KERNEL && -s $INITRD && -f $STAMP ]] &&
        [[ $(head -n1 "$STAMP") == "$stamp" ]]; then
        return 0
    fi
    mkdir -p "$GCACHE/debs"
    exec 8>"$GCACHE/.build.lock"
    flock 8
    log "building the guest image in $GCACHE (debootstrap $SUITE from $MIRROR: a few minutes)"
    local t deb krel
    t=$(mktemp -d "$GCACHE/build.XXXXXX")
    # shellcheck disable=SC2064 # expand now: t is local
    trap "rm -rf '$t'" RETURN
    deb=$(ls "$GCACHE/debs/${kpkg}_"*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]] || ! dpkg-deb -f "$deb" Version | grep -qxF "$kver"; then
        rm -f "$GCACHE/debs/${kpkg}_"*.deb
        (cd "$GCACHE/debs" && apt-get download "$kpkg" 2>&1 | { grep -v unsandboxed >&2 || true; })
        deb=$(ls "$GCACHE/debs/${kpkg}_"*.deb 2>/dev/null | head -n1 || true)
        [[ -n $deb ]] || die "apt-get download $kpkg failed"
    fi
    krel=${kpkg#linux-image-}

    # Root filesystem: Debian minbase plus the services of a small server.
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$t/root" "$MIRROR" >"$t/debootstrap.log" 2>&1 ||
        { tail -n 30 "$t/debootstrap.log" >&2; die "debootstrap failed"; }
    # The kernel's modules (udev and systemd-modules-load read them from the disk at boot), and
    # its image under /boot as an installed kernel would be; QEMU boots the same file (-kernel).
    dpkg-deb -x "$deb" "$t/kernel"
    mkdir -p "$t/root/usr/lib/modules" "$t/root/boot"
    cp -a "$t/kernel/lib/modules/$krel" "$t/root/usr/lib/modules/"
    cp "$t/kernel/boot/vmlinuz-$krel" "$t/root/boot/"
    chroot "$t/root" depmod -a "$krel"
    echo guest >"$t/root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 guest\n' >"$t/root/etc/hosts"
    echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' >"$t/root/etc/fstab"
    # A fixed machine id: no boot runs systemd's first-boot setup.
    echo 5a0cfe11d21e4b0c9d6b3c2a1f0e9d8c >"$t/root/etc/machine-id"
    cat >"$t/root/etc/systemd/system/driveblk-bench-booted.service" <<EOF
[Unit]
Description=Tell the host the boot reached multi-user.target, then power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "$MARKER uptime=\$(cut -d" " -f1 /proc/uptime) init_ticks=\$(cut -d" " -f22 /proc/1/stat)" >/dev/ttyS0'
ExecStartPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/driveblk-bench-booted.service \
        "$t/root/etc/systemd/system/multi-user.target.wants/driveblk-bench-booted.service"
    chroot "$t/root" apt-get clean
    rm -rf "$t/root/var/lib/apt/lists/"* "$t/root/var/log/"*.log
    # ext4 over the whole disk; inode tables written now (lazy_itable_init=0), so the guest's
    # kernel does not zero them in the background during the measured boots.
    truncate -s "$DISK_SIZE" "$t/disk.raw"
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L guestroot -U 2d1b6f0e-3c8a-4e5b-9f17-6a2c4d8e0b31 \
        -E hash_seed=7e4a0c1b-5d2f-4a6e-8b3c-9f1d2e3a4b5c,lazy_itable_init=0,lazy_journal_init=0 \
        -d "$t/root" "$t/disk.raw"
    qemu-img convert -f raw -O qcow2 "$t/disk.raw" "$t/guest.qcow2"

    # Initramfs: busybox, the virtio modules (dependencies first), an init that mounts /dev/vda
    # read-only and hands over to systemd.
    local r=$t/initrd m dep seen=" " order=()
    mkdir -p "$r"/{bin,dev,proc,sys,root,lib/modules}
    cp /bin/busybox "$r/bin/busybox"
    add_mod() {
        local name=${1//-/_} path deps d
        [[ $seen != *" $name "* ]] || return 0
        seen+="$name "
        grep -qE "/$name\.ko(\.[a-z]+)?\$" "$t/kernel/lib/modules/$krel/modules.builtin" && return 0
        path=$(find "$t/kernel/lib/modules/$krel/kernel" -regextype posix-extended \
            -regex ".*/${name//_/[-_]}\.ko(\.(xz|zst))?" | head -n1)
        [[ -n $path ]] || die "module $name not in $kpkg"
        case $path in
            *.xz) xz -dc "$path" >"$r/lib/modules/$name.ko" ;;
            *.zst) zstd -qdc "$path" >"$r/lib/modules/$name.ko" ;;
            *) cp "$path" "$r/lib/modules/$name.ko" ;;
        esac
        deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$r/lib/modules/$name.ko" | head -n1 | cut -d= -f2)
        for d in ${deps//,/ }; do add_mod "$d"; done
        order+=("$name")
    }
    for m in "${WANT_MODULES[@]}"; do add_mod "$m"; done
    printf '%s\n' "${order[@]}" >"$r/lib/modules/load-order"
    cat >"$r/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /lib/modules/load-order); do /bin/busybox insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
/bin/busybox mount -t ext4 -o ro /dev/vda /root || { echo "initrd: cannot mount /dev/vda"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /root/dev
exec /bin/busybox switch_root /root /sbin/init
EOF
    chmod 0755 "$r/init"
    (cd "$r" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$t/initrd.cpio"

    mv "$t/guest.qcow2" "$IMG"
    cp "$t/kernel/boot/vmlinuz-$krel" "$KERNEL"
    mv "$t/initrd.cpio" "$INITRD"
    {
        echo "$stamp"
        chroot "$t/root" dpkg-query -W -f '${Package} ${Version}\n'
    } >"$STAMP"
    log "guest image built: $IMG ($(qemu-img info --output=json "$IMG" | jq -r '."virtual-size" / 1073741824 | tostring + " GiB"') virtual, $(du -h "$IMG" | cut -f1) stored), kernel $krel"
}

# ---- One boot ------------------------------------------------------------------------------------
# boot TAG DISK-ARGS...: starts QEMU, waits for the marker on the serial console. Prints
# "SECS GUEST-UPTIME" (host seconds from QEMU's start to the marker; the guest's uptime then).
APPEND="console=ttyS0 root=/dev/vda rootfstype=ext4 ro quiet panic=-1${APPEND_EXTRA:+ $APPEND_EXTRA}"
boot() {
    local tag=$1 ser=$WORK/$1.serial qlog=$WORK/$1.qemu.log qpid t0 t1="" i
    shift
    : >"$ser"
    t0=$EPOCHREALTIME
    qemu-system-x86_64 -accel tcg -cpu max -m "$MEM" -smp "$SMP" \
        -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem \
        -display none -monitor none -nic none -no-reboot -serial "file:$ser" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" "$@" </dev/null >"$qlog" 2>&1 &
    qpid=$!
    while :; do
        if grep -q -m1 "$MARKER" "$ser"; then t1=$EPOCHREALTIME; break; fi
        kill -0 "$qpid" 2>/dev/null || break
        if awk -v a="$t0" -v b="$EPOCHREALTIME" -v m="$TIMEOUT" 'BEGIN {exit !(b - a > m)}'; then break; fi
        sleep 0.05
    done
    # It powers itself off right after the marker.
    for ((i = 0; i < 600; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    if [[ -z $t1 ]]; then
        log "$tag: no marker within ${TIMEOUT}s; serial tail:"; tail -n 15 "$ser" | sed 's/^/    /' >&2
        sed 's/^/    qemu: /' "$qlog" >&2
        return 1
    fi
    awk -v a="$t0" -v b="$t1" -v u="$(grep -a -m1 -o "$MARKER uptime=[0-9.]*" "$ser" | cut -d= -f2)" \
        'BEGIN {printf "%.2f %s\n", b - a, u}'
}

# ---- The daemon ----------------------------------------------------------------------------------
DPID=""
wait_socket() { # name logfile: until $DPID listens on the vhost socket (30 s), or says why not
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -S $WORK/vhost.sock ]] && return 0
        kill -0 "$DPID" 2>/dev/null || break
        sleep 0.1
    done
    log "$1 did not start; log:"; sed 's/^/    /' "$2" >&2
    return 1
}
start_daemon() { # logfile hostname serve-args...
    local logf=$1 host=$2 i
    shift 2
    rm -f "$WORK/vhost.sock"
    DRIVEBLK_HOSTNAME=$host NO_COLOR=1 "$DRIVEBLK" serve --socket "$WORK/vhost.sock" "$@" >"$logf" 2>&1 &
    DPID=$!
    wait_socket driveblk "$logf"
}
stop_daemon() { # logfile [seconds]: SIGTERM, must exit 0 (the final sync and the profile's upload)
    local logf=$1 secs=${2:-600} rc=0 i
    [[ -n $DPID ]] || return 0
    kill -TERM "$DPID" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then
        kill -KILL "$DPID" 2>/dev/null || true
        rc=137
    fi
    wait "$DPID" 2>/dev/null || rc=$?
    DPID=""
    [[ $rc == 0 ]] || { log "driveblk exited $rc after SIGTERM; log tail:"; tail -n 20 "$logf" | sed 's/^/    /' >&2; }
    return "$rc"
}
# CPU seconds (user + system, all threads) a process used so far.
cpu_secs() { [[ -r /proc/$1/stat ]] && sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12 + $13) / hz}'; }
has_profile() { # url (dir: read directly, as before; gdrive: needs the emulator's address)
    local a=()
    [[ $REMOTE != gdrive ]] || a=("${REMOTE_ARGS[@]}")
    "$DRIVEBLK" info --json "$1" "${a[@]}" 2>/dev/null | jq -e '.boot_profile != null' >/dev/null
}

# The http row's server: ranged GETs of one file, each after one round trip (MS), the bytes
# paced through one link of MBIT shared by all connections; counts requests and bytes.
HTTP_PY='
import http.server, os, re, socketserver, sys, threading, time
path, lat, rate, portfile, statsfile = sys.argv[1], float(sys.argv[2]) / 1000, float(sys.argv[3]) * 125000, sys.argv[4], sys.argv[5]
size = os.path.getsize(path)
lock = threading.Lock()
state = {"busy_until": 0.0, "requests": 0, "bytes": 0}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_HEAD(self): self.serve(False)
    def do_GET(self): self.serve(True)
    def serve(self, body):
        start, end, code = 0, size - 1, 200
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:
            start, code = int(m[1]), 206
            if m[2]: end = min(int(m[2]), size - 1)
        n = end - start + 1 if body else 0
        time.sleep(lat)
        with lock:
            t = max(time.time(), state["busy_until"]) + n / rate
            state["busy_until"] = t
            state["requests"] += 1
            state["bytes"] += n
            open(statsfile, "w").write("%d %d\n" % (state["requests"], state["bytes"]))
        time.sleep(max(0.0, t - time.time()))
        self.send_response(code)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1 if code == 206 else size))
        if code == 206: self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        if n:
            with open(path, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(n))
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
open(portfile, "w").write(str(s.server_address[1]))
s.serve_forever()
'
HPID=""
start_http() { # the server for this run, over the pristine image; sets HTTP_URL
    local i
    rm -f "$WORK/http.port" "$WORK/http.stats"
    python3 -c "$HTTP_PY" "$WORK/http.qcow2" "$LAT" "$MBIT" "$WORK/http.port" "$WORK/http.stats" \
        >"$WORK/http.log" 2>&1 &
    HPID=$!
    for ((i = 0; i < 100; i++)); do [[ -s $WORK/http.port ]] && break; sleep 0.1; done
    [[ -s $WORK/http.port ]] || { cat "$WORK/http.log" >&2; die "the http server did not start"; }
    HTTP_URL=http://127.0.0.1:$(cat "$WORK/http.port")/guest.qcow2
}
start_qsd_http() { # logfile: qsd exports an overlay whose backing file comes over http
    local logf=$1 i
    rm -f "$WORK/vhost.sock" "$WORK/overlay.qcow2"
    qemu-img create -q -f qcow2 -u -b "$WORK/http.qcow2" -F qcow2 "$WORK/overlay.qcow2" "$(qemu-img info --output=json "$IMG" | jq '."virtual-size"')"
    qemu-storage-daemon \
        --blockdev "driver=http,node-name=h0,url=$HTTP_URL,read-only=on" \
        --blockdev "driver=qcow2,node-name=base0,file=h0,read-only=on" \
        --blockdev "driver=file,node-name=o0,filename=$WORK/overlay.qcow2" \
        --blockdev "driver=qcow2,node-name=disk0,file=o0,backing=base0" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$WORK/vhost.sock,writable=on,num-queues=1" \
        >"$logf" 2>&1 &
    DPID=$!
    wait_socket qemu-storage-daemon "$logf"
}

VHOST_ARGS=(-chardev "socket,id=c0,path=@SOCK@" -device "vhost-user-blk-pci,chardev=c0,num-queues=1")
vhost_args() { local a; for a in "${VHOST_ARGS[@]}"; do printf '%s\n' "${a//@SOCK@/$WORK/vhost.sock}"; done; }

# ---- One repetition (rows in order; results appended to $WORK/results.tsv) ----------------------
# results.tsv: row rep secs guest-uptime remote-bytes gets misses miss/profile/readahead/stream/hydrate
#              profile-waits stop-secs guest-wait-secs daemon-cpu-secs (or "row rep FAIL")
run_rep() {
    local rep=$1 row res vol url cache st t0 stop args cpu
    vol=$WORK/remote/vol-$rep url=$(vol_url "$rep")
    for row in "${ROWS[@]}"; do
        log "rep $rep: $row"
        case $row in
            local)
                # In the page cache, and written back: the copy's writeback must not land in the boot.
                cp --sparse=always "$IMG" "$WORK/local.qcow2"
                sync "$WORK/local.qcow2"
                cat "$WORK/local.qcow2" >/dev/null
                if res=$(boot "r$rep-local" -blockdev "driver=file,node-name=f0,filename=$WORK/local.qcow2" \
                    -blockdev driver=qcow2,node-name=d0,file=f0 -device virtio-blk-pci,drive=d0,num-queues=1); then
                    printf 'local\t%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\n' "$rep" ${res} >>"$WORK/results.tsv"
                else
                    printf 'local\t%s\tFAIL\n' "$rep" >>"$WORK/results.tsv"
                fi
                rm -f "$WORK/local.qcow2"
                ;;
            file)
                cp --sparse=always "$IMG" "$WORK/local.qcow2"
                sync "$WORK/local.qcow2"
                cat "$WORK/local.qcow2" >/dev/null
                res=FAIL
                if start_daemon "$WORK/r$rep-file.log" machine-file --image "$WORK/local.qcow2" --format qcow2; then
                    mapfile -t args < <(vhost_args)
                    res=$(boot "r$rep-file" "${args[@]}") || res=FAIL
                    cpu=$(cpu_secs "$DPID")
                    stop_daemon "$WORK/r$rep-file.log" 30 || res=FAIL
                fi
                rm -f "$WORK/local.qcow2"
                if [[ $res == FAIL ]]; then
                    printf 'file\t%s\tFAIL\n' "$rep" >>"$WORK/results.tsv"
                else
                    # shellcheck disable=SC2086 # res is "secs uptime"
                    printf 'file\t%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\t%s\n' "$rep" ${res} "$cpu" >>"$WORK/results.tsv"
                fi
                ;;
            http)
                local r0=0 b0=0
                [[ ! -s $WORK/http.stats ]] || read -r r0 b0 <"$WORK/http.stats"
                if start_qsd_http "$WORK/r$rep-http.log"; then
                    mapfile -t args < <(vhost_args)
                    res=$(boot "r$rep-http" "${args[@]}") || res=FAIL
                    stop_daemon "$WORK/r$rep-http.log" 30 || res=FAIL
                else
                    res=FAIL
                fi
                rm -f "$WORK/overlay.qcow2"
                if [[ $res == FAIL ]]; then
                    printf 'http\t%s\tFAIL\n' "$rep" >>"$WORK/results.tsv"
                else
                    read -r r1 b1 <"$WORK/http.stats"
                    # shellcheck disable=SC2086 # res is "secs uptime"
                    printf 'http\t%s\t%s\t%s\t%s\t%s\t-\t-\t-\t-\t-\t-\n' "$rep" ${res} $((b1 - b0)) $((r1 - r0)) >>"$WORK/results.tsv"
                fi
                ;;
            cold | profile)
                if [[ $row == cold && $REMOTE == dir ]]; then
                    rm -rf "$vol"
                    cp -al "$WORK/remote/base" "$vol"
                fi
                cache=$WORK/cache-$rep-$row
                rm -rf "$cache"
                if ! start_daemon "$WORK/r$rep-$row.log" "machine-$row" --volume "$url" --cache-dir "$cache" \
                    "${REMOTE_ARGS[@]}" "${EXTRA_SERVE[@]}"; then
                    printf '%s\t%s\tFAIL\n' "$row" "$rep" >>"$WORK/results.tsv"
                    continue
                fi
                mapfile -t args < <(vhost_args)
                res=$(boot "r$rep-$row" "${args[@]}") || res=FAIL
                cpu=$(cpu_secs "$DPID")
                sleep 1.2 # status.json is refreshed every second
                st=$WORK/r$rep-$row.status.json
                cp "$cache/status.json" "$st" 2>/dev/null || true
                # The stop uploads the guest's writes and (cold) the profile it recorded, over the
                # link; a profile not up when the stop gives up on it is sent by a restart on the
                # same cache (as scripts/bench.sh --cold does).
                t0=$EPOCHREALTIME
                stop_daemon "$WORK/r$rep-$row.log" || res=FAIL
                if [[ $row == cold && $res != FAIL ]] && ! has_profile "$url"; then
                    log "rep $rep: the profile's upload outlasted the stop; a restart on the same cache sends it"
                    start_daemon "$WORK/r$rep-$row.resume.log" "machine-$row" --volume "$url" --cache-dir "$cache" \
                        "${REMOTE_ARGS[@]}" || res=FAIL
                    for _ in $(seq 1 1200); do has_profile "$url" && break; sleep 0.5; done
                    stop_daemon "$WORK/r$rep-$row.resume.log" || res=FAIL
                    has_profile "$url" || { log "rep $rep: the cold boot saved no boot profile"; res=FAIL; }
                fi
                stop=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
                rm -rf "$cache"
                if [[ $res == FAIL || ! -s $st ]]; then
                    printf '%s\t%s\tFAIL\n' "$row" "$rep" >>"$WORK/results.tsv"
                    continue
                fi
                # shellcheck disable=SC2086 # res is "secs uptime"
                jq -r --arg row "$row" --arg rep "$rep" --arg res "$res" --arg stop "$stop" --arg cpu "$cpu" '
                    ($res | split(" ")) as $r | .remote as $m | $m.bytes_by_source as $b |
                    [$row, $rep, $r[0], $r[1], $m.bytes, ($m.requests.gets // $m.fetches), $m.misses,
                     "\($b.miss)/\($b.profile)/\($b.readahead)/\($b.stream)/\($b.hydrate // 0)", (.boot_profile.waits // 0), $stop,
                     (if $m.guest_wait_ms == null then "-" else $m.guest_wait_ms / 1000 end), $cpu] | @tsv' \
                    "$st" >>"$WORK/results.tsv"
                ;;
        esac
        log "    $(tail -n1 "$WORK/results.tsv")"
    done
    [[ " ${ROWS[*]} " != *" cold "* || $REMOTE != dir ]] || rm -rf "$vol"
}

if [[ -n $ONE_REP ]]; then
    # Internal: one repetition inside the work dir the outer run prepared (--rep-wrapper).
    trap 'for p in $DPID $HPID; do kill -KILL "$p" 2>/dev/null || true; done' EXIT
    [[ $REMOTE != gdrive ]] || mapfile -t REMOTE_ARGS <"$WORK/remote.args"
    [[ " ${ROWS[*]} " != *" http "* ]] || start_http
    run_rep "$ONE_REP"
    exit 0
fi

# ---- Main ----------------------------------------------------------------------------------------
need_pkg qemu-system-x86_64 qemu-system-x86
need_pkg jq jq
build_image
if [[ $BUILD_ONLY == 1 ]]; then
    log "guest image: $IMG ($(head -n1 "$STAMP"))"
    exit 0
fi
[[ " ${ROWS[*]} " != *" cold "* ]] || [[ -x $DRIVEBLK ]] ||
    die "$DRIVEBLK is missing: cargo build --release -p driveblk (or DRIVEBLK_BIN=...)"
[[ $REMOTE != gdrive || -x $EMU ]] || die "$EMU is missing: cargo build --release -p driveemu"

WORK=$(mktemp -d /var/tmp/driveblk-bench-guest-run.XXXXXX)
EPID=""
cleanup() {
    for p in $DPID $HPID $EPID; do kill -KILL "$p" 2>/dev/null || true; done
    if [[ $KEEP == 1 ]]; then log "kept work dir $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
: >"$WORK/results.tsv"
START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
STORED=$(du -k "$IMG" | awk '{printf "%.0f", $1 / 1024}')
REMOTE_NOTE="a dir: volume behind driveblk's simulated link"
if [[ " ${ROWS[*]} " == *" cold "* && $REMOTE == gdrive ]]; then
    # The emulator is the link for every request driveblk makes, the imports' included.
    start_driveemu "$EMU" "$WORK" --latency-ms "$LAT" --bandwidth-mbit "$MBIT" --rate-limit "$DRIVE_LIMIT" \
        --data-dir "$WORK/emu-data" --sa-key-out "$WORK/drive-creds.json" || die "the Drive emulator did not start"
    EPID=$EMU_PID
    REMOTE_ARGS=(--drive-api-url "$EMU_BASE" --drive-credentials "$WORK/drive-creds.json")
    printf '%s\n' "${REMOTE_ARGS[@]}" >"$WORK/remote.args"
    REMOTE_NOTE="a gdrive: volume on the Drive emulator (driveemu), which is the link, per-user limit $DRIVE_LIMIT requests/s/burst; one volume per rep, imported through it"
    for ((rep = 1; rep <= REPS; rep++)); do
        log "importing the guest image into $(vol_url "$rep") (through the emulator's link)"
        t0=$EPOCHREALTIME
        "$DRIVEBLK" import --format qcow2 --quiet ${CHUNK_SIZE:+--chunk-size "$CHUNK_SIZE"} "$IMG" "$(vol_url "$rep")" \
            "${REMOTE_ARGS[@]}" >"$WORK/import.log" 2>&1 || { sed 's/^/    /' "$WORK/import.log" >&2; die "import failed"; }
        log "    imported in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s"
    done
elif [[ " ${ROWS[*]} " == *" cold "* ]]; then
    log "importing the guest image into a dir: volume (local, no link)"
    mkdir -p "$WORK/remote"
    t0=$EPOCHREALTIME
    "$DRIVEBLK" import --format qcow2 --quiet ${CHUNK_SIZE:+--chunk-size "$CHUNK_SIZE"} "$IMG" "dir:$WORK/remote/base" >"$WORK/import.log" 2>&1 ||
        { sed 's/^/    /' "$WORK/import.log" >&2; die "import failed"; }
    log "    imported in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s, $(du -sm "$WORK/remote/base" | cut -f1) MiB in the volume"
fi
if [[ " ${ROWS[*]} " == *" http "* ]]; then
    command -v python3 >/dev/null || die "the http row needs python3"
    if [[ ! -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ]] && ! qemu-storage-daemon --blockdev help 2>&1 | grep -qw http; then
        [[ $EUID == 0 ]] || die "the http row needs qemu-block-extra (QEMU's curl driver)"
        log "installing qemu-block-extra from bookworm-backports (QEMU's http driver)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-block-extra >/dev/null
    fi
    cp --sparse=always "$IMG" "$WORK/http.qcow2"
    [[ -n $WRAPPER ]] || start_http
fi
log "rows: ${ROWS[*]}; $REPS reps; link $LAT ms / $MBIT Mbit/s; guest -smp $SMP -m $MEM, tcg; work dir $WORK"
REP_LOADS=()
for ((rep = 1; rep <= REPS; rep++)); do
    if [[ -n $WRAPPER ]]; then
        # shellcheck disable=SC2086 # the wrapper is a word list
        $WRAPPER "$SELF" --one-rep "$rep" "$WORK" --rows "$ROWS_RE" --link "$LINK" --remote "$REMOTE" --smp "$SMP" --mem "$MEM" \
            --timeout "$TIMEOUT" --append "$APPEND_EXTRA" --serve-args "$SERVE_ARGS" || log "rep $rep: the wrapper failed"
    else
        run_rep "$rep"
    fi
    REP_LOADS+=("$(cut -d' ' -f1 /proc/loadavg)")
done
END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- Table ---------------------------------------------------------------------------------------
# Median of the numbers on stdin ("-" entries skipped; "nan" if none).
median() { grep -E '^-?[0-9.]+$' | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
vals() { awk -F'\t' -v r="$1" -v c="$2" '$1 == r && $3 != "FAIL" {print $c}' "$WORK/results.tsv"; }
failed() { awk -F'\t' -v r="$1" '$1 == r && $3 == "FAIL" {n++} END {print n + 0}' "$WORK/results.tsv"; }
LOCAL_MED=$(vals local 3 | median)
TAB=$WORK/table.md
{
    echo "| row | time s (median) | per rep | guest uptime s | × local | target | met | guest waited on the remote s | guest misses | waits on the profile | MB from the remote: total (miss / profile / readahead / stream / hydrate) | remote requests | daemon CPU s | stop s (sync + profile upload) |"
    echo "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        med=$(vals "$row" 3 | median)
        per=$(vals "$row" 3 | paste -sd' ' | sed 's/ /, /g')
        nf=$(failed "$row")
        [[ $nf == 0 ]] || per="$per ($nf failed)"
        up=$(vals "$row" 4 | median)
        ratio=$(awk -v a="$med" -v b="$LOCAL_MED" 'BEGIN {print (a == "nan" || b == "nan") ? "n/a" : sprintf("%.2f", a / b)}')
        case $row in cold) tgt=1.2 ;; profile) tgt=1.02 ;; *) tgt="" ;; esac
        if [[ $row == http ]]; then
            echo "| $row (qsd, QEMU's http driver) | $med | $per | $up | $ratio | - | - | - | - | - | $(vals "$row" 5 | median | awk '{printf "%.0f", $1 / 1e6}') | $(vals "$row" 6 | median) | - | - |"
            continue
        fi
        met="-"
        [[ -z $tgt || $ratio == n/a ]] || met=$(awk -v r="$ratio" -v t="$tgt" 'BEGIN {print (r <= t) ? "yes" : "no"}')
        if [[ $row == local || $row == file ]]; then
            name=$row
            [[ $row == local ]] && name="local (QEMU's qcow2 driver)"
            [[ $row == file ]] && name="file (driveblk --image, no remote)"
            echo "| $name | $med | $per | $up | $ratio | - | - | - | - | - | - | - | $(vals "$row" 12 | median | sed 's/^nan$/-/') | - |"
        else
            mb=$(vals "$row" 5 | median | awk '{printf "%.0f", $1 / 1e6}')
            by=$(vals "$row" 8 | awk -F/ '{m += $1; p += $2; r += $3; s += $4; h += $5; n++} END {if (n) printf "%.0f / %.0f / %.0f / %.0f / %.0f", m/n/1e6, p/n/1e6, r/n/1e6, s/n/1e6, h/n/1e6}')
            echo "| $row | $med | $per | $up | $ratio | ≤ ${tgt}× | $met | $(vals "$row" 11 | median) | $(vals "$row" 7 | median) | $(vals "$row" 9 | median) | $mb ($by) | $(vals "$row" 6 | median) | $(vals "$row" 12 | median) | $(vals "$row" 10 | median) |"
        fi
    done
} >"$TAB"
HEAD="Guest: Debian 12 ($PKGS), ${DISK_SIZE} ext4 qcow2, ${STORED} MiB stored; cloud kernel $(sed -n 's/.*kernel=linux-image-\([^ ]*\) .*/\1/p' "$STAMP" | head -n1); QEMU $(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9.]*\).*/\1/p' | head -n1) -accel tcg -smp $SMP -m $MEM. Volume: $REMOTE_NOTE, chunk size ${CHUNK_SIZE:-1M}${SERVE_ARGS:+, serve $SERVE_ARGS}. Link: $LAT ms per request, $MBIT Mbit/s. Time: QEMU start to the marker (a unit after multi-user.target); guest uptime at the marker alongside. Medians of $REPS reps, rows interleaved per rep; MB by source: means. Load average (1/5/15) at start: $START_LOAD; after each rep: ${REP_LOADS[*]}; at end: $END_LOAD."
echo
echo "$HEAD"
echo
cat "$TAB"
echo
if [[ $RECORD == 1 ]]; then
    COMMIT="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . ':!docs/benchmarks.md' 2>/dev/null || echo ' (dirty)')"
    SEC=$WORK/section.md
    {
        echo "### $(date -u '+%Y-%m-%d %H:%M') UTC: a real guest's boot from a volume (scripts/bench-guest.sh, commit $COMMIT)"
        echo
        echo "- command: \`$CMDLINE\`"
        echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
        echo
        echo "$HEAD"
        echo
        cat "$TAB"
        echo
    } >"$SEC"
    record_sitting "$SEC" "$ROOT/docs/benchmarks.md" || die "could not record in docs/benchmarks.md"
    log "recorded in docs/benchmarks.md"
fi
awk -F'\t' '$3 == "FAIL" {f = 1} END {exit f}' "$WORK/results.tsv" || die "some boots failed (see the messages above)"
