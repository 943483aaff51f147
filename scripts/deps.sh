#!/usr/bin/env bash
# Installs what driveblk's tests, demo and benchmark need, on Debian 12.
# Idempotent and quick when everything is present. QEMU 10 comes from
# bookworm-backports: plain bookworm's qemu-system-x86 (7.2) would replace
# the qemu-utils 10 that the machine ships with.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }

for bin in qemu-system-x86_64 qemu-img qemu-io qemu-storage-daemon; do
  if ! have "$bin" || [ "$(qemu_major "$bin")" -lt 8 ] 2>/dev/null; then
    need_apt+=(qemu); break
  fi
done
have busybox || need_apt+=(busybox-static)
have cpio || need_apt+=(cpio)
have fio || need_apt+=(fio)
have zstd || need_apt+=(zstd)
have xz || need_apt+=(xz-utils)
have jq || need_apt+=(jq)
# ss: scripts/garage.sh checks that the server itself holds its ports; ip
# and tc shape a test's own network namespace (tests/remote_outage.rs).
{ have ss && have tc; } || need_apt+=(iproute2)
have unshare || need_apt+=(util-linux)
# systemd-analyze verifies the driveblk@.service unit (tests/e2e_service.rs);
# virt-xml-validate checks `driveblk libvirt-xml` output.
have systemd-analyze || need_apt+=(systemd)
have virt-xml-validate || need_apt+=(libvirt-clients)
have xmllint || need_apt+=(libxml2-utils)
# Loopback file systems the cache directory is tested on (tests/e2e_cache_fs.rs;
# exFAT through FUSE where the kernel has no driver).
have mkfs.xfs || need_apt+=(xfsprogs)
have mkfs.btrfs || need_apt+=(btrfs-progs)
have mkfs.exfat || need_apt+=(exfatprogs)
have mount.exfat-fuse || need_apt+=(exfat-fuse)

# Garage: the real S3 store the s3:// tests start (scripts/garage.sh).
# crates.io ships no binary, so it is built once (several minutes on two
# cores; cache ~/.cargo/bin/garage between CI runs to skip it).
if ! have garage && [ ! -x "$HOME/.cargo/bin/garage" ]; then
  echo "deps: installing garage 2.5.0 (cargo install, takes minutes)" >&2
  # Built for speed of building (no LTO, light optimisation): a test
  # fixture, not a production store.
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo install --locked --quiet garage --version 2.5.0
fi

# Azurite: Microsoft's Azure Blob Storage emulator the az:// tests start
# (scripts/azurite.sh), from npm; Node comes from Debian if missing.
if ! have azurite-blob; then
  have npm || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
  echo "deps: installing azurite (npm)" >&2
  npm install -g --silent azurite@3 >/dev/null
fi

if [ ${#need_apt[@]} -eq 0 ]; then
  exit 0
fi
echo "deps: installing ${need_apt[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list
fi
apt-get update -qq
pkgs=()
for p in "${need_apt[@]}"; do
  case "$p" in
    qemu) apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null ;;
    *) pkgs+=("$p") ;;
  esac
done
if [ ${#pkgs[@]} -gt 0 ]; then
  apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
echo "deps: qemu $(qemu_major qemu-system-x86_64), qemu-img $(qemu_major qemu-img)" >&2
