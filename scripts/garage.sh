#!/usr/bin/env bash
# A one-node Garage S3 store on loopback, for tests and trying s3:// URLs.
#
#   scripts/garage.sh start DIR   # start it in DIR; prints `export VAR=...`
#                                 # lines (endpoint, key, bucket) on stdout
#   scripts/garage.sh stop DIR    # stop it (DIR stays)
#   GARAGE_WATCH_PID=PID ...      # start: also stop it when PID exits,
#                                 # and then delete DIR (a test's scratch)
#
#   eval "$(scripts/garage.sh start /tmp/g)"
#   driveblk import disk.qcow2 s3://$GARAGE_BUCKET/vols/disk
#
# The binary is $GARAGE, else `garage` on PATH (scripts/deps.sh installs
# it). Ports are picked at random among free ones unless GARAGE_S3_PORT /
# GARAGE_RPC_PORT / GARAGE_ADMIN_PORT are set. One node, replication 1:
# for a fleet's three-node set-up see docs/object-stores.md.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
garage_bin=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}

if [ "$cmd" = stop ]; then
  if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; rm -f "$dir/pid"; fi
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ -x "$garage_bin" ] || { echo "garage: no binary (set GARAGE, or run scripts/deps.sh)" >&2; exit 1; }

# shellcheck source=scripts/loopback.sh
. "$(dirname "$0")/loopback.sh"
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
mkdir -p "$dir/meta" "$dir/data"
cfg="$dir/garage.toml"
g() { "$garage_bin" -c "$cfg" "$@"; }

# A picked port can still be taken between the check and Garage's bind (by
# another test's store): then a bind fails with AddrInUse, and the server is
# started again on new ports. Ports set by the caller are not second-guessed.
up=
for attempt in 1 2 3 4 5; do
  s3=${GARAGE_S3_PORT:-$(free_port)}
  rpc=${GARAGE_RPC_PORT:-$(free_port)}
  admin=${GARAGE_ADMIN_PORT:-$(free_port)}
  if [ "$s3" = "$rpc" ] || [ "$s3" = "$admin" ] || [ "$rpc" = "$admin" ]; then continue; fi
  cat > "$cfg" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF

  RUST_LOG=${RUST_LOG_GARAGE:-warn} setsid "$garage_bin" -c "$cfg" server >"$dir/garage.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  # Up means the node answers and the server itself holds both HTTP ports:
  # Garage logs a failed S3 or admin bind and runs on without that API.
  gp=$(cat "$dir/pid")
  for _ in $(seq 1 100); do
    grep -q "Address already in use" "$dir/garage.log" && break
    if timeout 5 "$garage_bin" -c "$cfg" status >/dev/null 2>&1 && holds "$gp" "$s3" && holds "$gp" "$admin"; then up=1; break; fi
    kill -0 "$gp" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$up" ] && break
  kill "$gp" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$gp" 2>/dev/null || break; sleep 0.1; done
  if [ "$attempt" -lt 5 ] && grep -q "Address already in use" "$dir/garage.log" \
     && [ -z "${GARAGE_S3_PORT:-}${GARAGE_RPC_PORT:-}${GARAGE_ADMIN_PORT:-}" ]; then
    echo "garage: a port was taken before the server bound it; trying new ports" >&2
    rm -rf "$dir/meta" "$dir/data"; mkdir -p "$dir/meta" "$dir/data"
    continue
  fi
  echo "garage: server did not come up; see $dir/garage.log" >&2; cat "$dir/garage.log" >&2; exit 1
done
[ -n "$up" ] || { echo "garage: found no three free ports" >&2; exit 1; }

# Tests pass their own pid: the server goes when they do, even on a panic.
if [ -n "${GARAGE_WATCH_PID:-}" ]; then
  ( gp=$(cat "$dir/pid")
    while kill -0 "$GARAGE_WATCH_PID" 2>/dev/null && kill -0 "$gp" 2>/dev/null; do sleep 1; done
    kill "$gp" 2>/dev/null
    # The server's files go with it: nobody else knows this directory.
    for _ in $(seq 1 50); do kill -0 "$gp" 2>/dev/null || break; sleep 0.2; done
    rm -rf "$dir" ) >/dev/null 2>&1 < /dev/null &
  disown
fi
node=$(g node id -q 2>/dev/null | cut -d@ -f1)
g layout assign -z dc1 -c 1G "$node" >/dev/null
g layout apply --version 1 >/dev/null
key_id="GK$(hex 12)"; secret=$(hex 32)
g key import --yes -n driveblk "$key_id" "$secret" >/dev/null
g bucket create driveblk >/dev/null
g bucket allow --read --write --owner driveblk --key "$key_id" >/dev/null

cat > "$dir/env" <<EOF
export AWS_ENDPOINT=http://127.0.0.1:$s3
export AWS_ACCESS_KEY_ID=$key_id
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=garage
export AWS_DEFAULT_REGION=garage
export AWS_ALLOW_HTTP=true
export GARAGE_BUCKET=driveblk
export GARAGE_PID=$(cat "$dir/pid")
EOF
cat "$dir/env"
