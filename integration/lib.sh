# shellcheck shell=bash
# Shared helpers for the driveblk real-guest integration harness.
# Source it; do not execute it. Callers must use `set -euo pipefail`.

INTEG_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
BUILD_DIR="${DRIVEBLK_INTEG_BUILD:-$INTEG_DIR/build}"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# apt-get install, only when something is actually missing.
_apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to install: $* (install them by hand or rerun as root)"
    log "installing: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 \
        || { DEBIAN_FRONTEND=noninteractive apt-get update >&2 && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; }
}

# major version of an installed qemu binary ("10"), or empty.
_qemu_major() {
    "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p' | head -n1
}

# Host tools for booting guests and running qemu-storage-daemon.
# QEMU comes from bookworm-backports (10.x): bookworm's own qemu-system-x86 7.2
# would downgrade/remove qemu-utils 10, so never install it without -t.
ensure_qemu() {
    local ok=1 b
    for b in qemu-system-x86_64 qemu-storage-daemon qemu-img; do
        command -v "$b" >/dev/null 2>&1 || ok=0
    done
    if [ "$ok" = 1 ] && [ "$(_qemu_major qemu-system-x86_64)" -ge 8 ] 2>/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "QEMU >= 8 (qemu-system-x86_64, qemu-storage-daemon, qemu-img) missing and not root"
    if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "enabling bookworm-backports"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' \
            > /etc/apt/sources.list.d/bookworm-backports.list
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-utils >&2
    for b in qemu-system-x86_64 qemu-storage-daemon qemu-img; do
        command -v "$b" >/dev/null 2>&1 || die "$b still missing after install"
    done
}

# Tools for building the guest initramfs.
ensure_guest_build_tools() {
    local pkgs=()
    dpkg -s busybox-static >/dev/null 2>&1 || pkgs+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || pkgs+=(cpio)
    command -v fio >/dev/null 2>&1 || pkgs+=(fio)
    command -v xz >/dev/null 2>&1 || pkgs+=(xz-utils)
    command -v zstd >/dev/null 2>&1 || pkgs+=(zstd)
    if [ "${#pkgs[@]}" -gt 0 ]; then _apt_install "${pkgs[@]}"; fi
    # busybox-static installs /bin/busybox; make sure it really is static.
    if ldd /bin/busybox >/dev/null 2>&1; then
        die "/bin/busybox is dynamically linked; install busybox-static"
    fi
}

# Wait until a unix socket exists (and the owning pid is alive).
wait_for_socket() { # SOCK PID TIMEOUT_S
    local sock=$1 pid=$2 t=$3 i=0
    while [ ! -S "$sock" ]; do
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
        i=$((i + 1))
        [ "$i" -lt $((t * 20)) ] || return 1
    done
}

# Stop a process we started: SIGTERM, wait up to N s, then SIGKILL.
# Returns the process' exit status (or 137 if it had to be killed).
stop_pid() { # PID [TIMEOUT_S]
    local pid=$1 t=${2:-10} i=0 rc=0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || rc=$?; return "$rc"; }
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        sleep 0.1
        i=$((i + 1))
        if [ "$i" -ge $((t * 10)) ]; then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 137
        fi
    done
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

# Start qemu-storage-daemon exporting IMG as vhost-user-blk on SOCK, in the
# background. Sets QSD_PID. Args: SOCK IMG FORMAT(raw|qcow2) QUEUES RO(0|1) LOGFILE
start_qsd() {
    local sock=$1 img=$2 fmt=$3 queues=$4 ro=$5 logf=$6 writable=on ro_opt=off aio=threads
    [ "$ro" = 1 ] && { writable=off; ro_opt=on; }
    rm -f "$sock"
    # discard=unmap: guest discards punch holes, so they read back as zeroes.
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$img,aio=$aio,cache.direct=off,discard=unmap,read-only=$ro_opt" \
        --blockdev "driver=$fmt,node-name=disk0,file=file0,discard=unmap,read-only=$ro_opt" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=$writable,num-queues=$queues" \
        >"$logf" 2>&1 &
    QSD_PID=$!
    wait_for_socket "$sock" "$QSD_PID" 15 || { cat "$logf" >&2; die "qemu-storage-daemon did not create $sock"; }
}
