#!/usr/bin/env bash
# Build the test guest: a Debian cloud kernel + a busybox/fio initramfs.
# Output (gitignored): integration/build/{vmlinuz,initramfs.cpio,guest.stamp}
# Skips the work when the stamp (inputs' versions and hashes) is unchanged.
# Usage: integration/guest/build.sh [--force]
set -euo pipefail

GUEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$GUEST_DIR/../lib.sh"

FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
esac

# Modules the guest needs for a virtio-pci block disk. Dependencies found in
# each module's modinfo are added automatically; built-in ones are skipped.
WANT_MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

ensure_guest_build_tools

# Which kernel? Whatever linux-image-cloud-amd64 currently depends on.
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1
}
KPKG="$(kernel_pkg)"
if [ -z "$KPKG" ]; then
    log "apt metadata lacks linux-image-cloud-amd64; running apt-get update"
    apt-get update >&2
    KPKG="$(kernel_pkg)"
fi
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"
KVER_PKG="$(apt-cache policy "$KPKG" | sed -n 's/^ *Candidate: //p')"

mkdir -p "$BUILD_DIR"
# concurrent runs share the build directory: one builder at a time
exec 9>"$BUILD_DIR/.build.lock"
flock 9
STAMP_FILE="$BUILD_DIR/guest.stamp"
stamp="$(
    {
        echo "kernel=$KPKG $KVER_PKG"
        echo "fio=$(dpkg-query -W -f='${Version}' fio)"
        echo "util-linux=$(dpkg-query -W -f='${Version}' util-linux)"
        echo "busybox=$(dpkg-query -W -f='${Version}' busybox-static)"
        echo "modules=${WANT_MODULES[*]}"
        sha256sum "$GUEST_DIR/build.sh" "$GUEST_DIR/init" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)"
if [ "$FORCE" = 0 ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$stamp" ] \
    && [ -s "$BUILD_DIR/vmlinuz" ] && [ -s "$BUILD_DIR/initramfs.cpio" ]; then
    log "guest up to date ($BUILD_DIR)"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/driveblk-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- kernel --------------------------------------------------------------
KDEB_DIR="$BUILD_DIR/debs"
mkdir -p "$KDEB_DIR"
deb="$(ls "$KDEB_DIR/${KPKG}_"*.deb 2>/dev/null | head -n1 || true)"
if [ -z "$deb" ] || ! dpkg-deb -f "$deb" Version | grep -qxF "$KVER_PKG"; then
    rm -f "$KDEB_DIR/${KPKG}_"*.deb
    log "downloading $KPKG $KVER_PKG"
    # apt-get download as root warns that _apt cannot write here; harmless.
    if ! (cd "$KDEB_DIR" && apt-get download "$KPKG" 2>&1 | { grep -v 'unsandboxed' >&2 || true; }); then
        # stale package lists (the archive moved on): refresh and retry once
        log "apt-get download failed; apt-get update and retry"
        apt-get update >&2
        [ "$(kernel_pkg)" = "$KPKG" ] || die "linux-image-cloud-amd64 now depends on $(kernel_pkg); rerun"
        (cd "$KDEB_DIR" && apt-get download "$KPKG" 2>&1 | { grep -v 'unsandboxed' >&2 || true; }) || true
    fi
    deb="$(ls "$KDEB_DIR/${KPKG}_"*.deb 2>/dev/null | head -n1 || true)"
    [ -n "$deb" ] || die "apt-get download $KPKG failed"
fi
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$WORK/k"
KREL="${KPKG#linux-image-}"
VMLINUZ="$(ls "$WORK"/k/boot/vmlinuz-* | head -n1)"
[ -f "$VMLINUZ" ] || die "no vmlinuz in $deb"
MODROOT="$(ls -d "$WORK"/k/lib/modules/* "$WORK"/k/usr/lib/modules/* 2>/dev/null | head -n1 || true)"
[ -d "$MODROOT" ] || die "no /lib/modules in $deb"

# ---- initramfs tree ------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,usr/bin,usr/lib,usr/lib64,lib/modules}
rm -rf "${R:?}/lib" && ln -s usr/lib "$R/lib" && ln -s usr/lib64 "$R/lib64"
mkdir -p "$R/usr/lib/modules"

cp /bin/busybox "$R/bin/busybox"
install -m 0755 "$GUEST_DIR/init" "$R/init"

# fio, and util-linux blkdiscard (busybox's has no -z / BLKZEROOUT), with
# every shared library they link (ldd), at the paths the host loader resolved
# them to; /lib -> usr/lib as on Debian so both spellings work.
copy_with_libs() { # SRC DST-in-root
    cp -L "$1" "$R$2"
    ldd "$1" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]*ld-linux/{print $1}' | sort -u |
    while read -r lib; do
        [ -e "$R$lib" ] && continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
}
mkdir -p "$R/usr/sbin"
copy_with_libs "$(command -v fio)" /usr/bin/fio
UL_BLKDISCARD="$(PATH=/usr/sbin:/sbin:$PATH command -v blkdiscard || true)"
[ -n "$UL_BLKDISCARD" ] || die "util-linux blkdiscard not found"
copy_with_libs "$UL_BLKDISCARD" /usr/sbin/blkdiscard-ul
[ -e "$R/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader was not copied"

# Kernel modules: find each, pull in its dependencies, decompress on the host
# (busybox insmod may not handle .xz/.zst), write the load order.
builtin_has() { grep -qE "/$1\.ko(\.[a-z]+)?\$" "$MODROOT/modules.builtin" 2>/dev/null; }
find_mod() { # name -> path ('-' and '_' are equivalent)
    local pat="${1//[-_]/[-_]}"
    find "$MODROOT/kernel" -regextype posix-extended -regex ".*/${pat}\.ko(\.(xz|zst|gz))?" | head -n1
}
decompress_to() { # src dst
    case "$1" in
        *.ko.xz)  xz -dc "$1" >"$2" ;;
        *.ko.zst) zstd -qdc "$1" >"$2" ;;
        *.ko.gz)  gzip -dc "$1" >"$2" ;;
        *.ko)     cp "$1" "$2" ;;
        *) die "unknown module type: $1" ;;
    esac
}
ORDER=()
declare -A SEEN=()
add_mod() { # depth-first: dependencies first
    local name="${1//-/_}" path tmp deps d
    [ -z "${SEEN[$name]:-}" ] || return 0
    SEEN[$name]=1
    if builtin_has "$name"; then log "module $name is built in"; return 0; fi
    path="$(find_mod "$name")"
    [ -n "$path" ] || die "module $name not found in $KPKG (and not built in)"
    tmp="$WORK/mods/$name.ko"
    mkdir -p "$WORK/mods"
    decompress_to "$path" "$tmp"
    deps="$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$tmp" | head -n1 | cut -d= -f2)"
    for d in ${deps//,/ }; do add_mod "$d"; done
    ORDER+=("$name")
}
for m in "${WANT_MODULES[@]}"; do add_mod "$m"; done
for m in "${ORDER[@]}"; do cp "$WORK/mods/$m.ko" "$R/usr/lib/modules/$m.ko"; done
printf '%s\n' "${ORDER[@]}" >"$R/usr/lib/modules/load-order"
log "modules (load order): ${ORDER[*]}"
echo "$KREL" >"$R/etc/guest-kernel"

# ---- pack ----------------------------------------------------------------
# Uncompressed: under TCG, gunzip of ~90 MB costs more than copying it.
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$WORK/initramfs.cpio"
cp "$VMLINUZ" "$BUILD_DIR/vmlinuz.new" && mv "$BUILD_DIR/vmlinuz.new" "$BUILD_DIR/vmlinuz"
mv "$WORK/initramfs.cpio" "$BUILD_DIR/initramfs.cpio"
echo "$stamp" >"$STAMP_FILE"
log "guest built: kernel $KREL, initramfs $(du -h "$BUILD_DIR/initramfs.cpio" | cut -f1)"
