#!/usr/bin/env bash
# Azurite (Microsoft's Azure Storage emulator, from npm) on loopback, for the
# az:// tests: the same wire protocol as Azure Blob Storage, one container.
#
#   scripts/azurite.sh start DIR   # start it in DIR; prints `export VAR=...`
#                                  # lines (emulator URL, container) on stdout
#   scripts/azurite.sh stop DIR    # stop it (DIR stays)
#   AZURITE_WATCH_PID=PID ...      # start: also stop it when PID exits, and
#                                  # then delete DIR (a test's scratch)
#
#   eval "$(scripts/azurite.sh start /tmp/az)"
#   driveblk import disk.qcow2 az://$AZURITE_CONTAINER/vols/disk
#
# object_store talks to it with AZURE_STORAGE_USE_EMULATOR=true (the
# well-known devstoreaccount1 account and key) at AZURITE_BLOB_STORAGE_URL.
# scripts/deps.sh installs `azurite-blob` (npm install -g azurite).
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
if [ "$cmd" = stop ]; then
  if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; rm -f "$dir/pid"; fi
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
bin=${AZURITE:-$(command -v azurite-blob || true)}
[ -n "$bin" ] || { echo "azurite: no azurite-blob (run scripts/deps.sh)" >&2; exit 1; }

# shellcheck source=scripts/loopback.sh
. "$(dirname "$0")/loopback.sh"
mkdir -p "$dir/data"
# A picked port can be taken between the check and the bind (by another
# test's store): then the server is started again on a new port.
for attempt in 1 2 3 4 5; do
  port=${AZURITE_PORT:-$(free_port)}
  setsid "$bin" --blobHost 127.0.0.1 --blobPort "$port" --location "$dir/data" --silent \
    --skipApiVersionCheck --disableTelemetry >"$dir/azurite.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  sp=$(cat "$dir/pid")
  for _ in $(seq 1 100); do
    holds "$sp" "$port" && break
    kill -0 "$sp" 2>/dev/null || break
    sleep 0.2
  done
  holds "$sp" "$port" && break
  kill "$sp" 2>/dev/null || true
  if [ "$attempt" -lt 5 ] && [ -z "${AZURITE_PORT:-}" ] && grep -q EADDRINUSE "$dir/azurite.log"; then
    echo "azurite: port $port was taken before the server bound it; trying another" >&2
    continue
  fi
  echo "azurite: server did not come up; see $dir/azurite.log" >&2; cat "$dir/azurite.log" >&2; exit 1
done
if [ -n "${AZURITE_WATCH_PID:-}" ]; then
  ( sp=$(cat "$dir/pid")
    while kill -0 "$AZURITE_WATCH_PID" 2>/dev/null && kill -0 "$sp" 2>/dev/null; do sleep 1; done
    kill "$sp" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$sp" 2>/dev/null || break; sleep 0.2; done
    rm -rf "$dir" ) >/dev/null 2>&1 < /dev/null &
  disown
fi

url=http://127.0.0.1:$port
account=devstoreaccount1
# The emulator's published account key (not a secret: every Azurite has it).
key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
# Create the container with a SharedKey-signed PUT (object_store has no
# call for it); retried while the server starts.
mkcontainer() {
  python3 - "$url" "$account" "$key" driveblk <<'PY'
import base64, email.utils, hashlib, hmac, sys, urllib.error, urllib.request
url, account, key, container = sys.argv[1:5]
date, ver, ctype = email.utils.formatdate(usegmt=True), "2021-08-06", "application/octet-stream"
resource = f"/{account}/{account}/{container}\nrestype:container"
sts = "PUT\n\n\n\n\n" + ctype + "\n\n\n\n\n\n\n" + f"x-ms-date:{date}\nx-ms-version:{ver}\n" + resource
sig = base64.b64encode(hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"{url}/{account}/{container}?restype=container", method="PUT", data=b"", headers={
    "x-ms-date": date, "x-ms-version": ver, "Content-Type": ctype, "Authorization": f"SharedKey {account}:{sig}"})
try:
    urllib.request.urlopen(req, timeout=5)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 409 else 1)
PY
}
for _ in $(seq 1 100); do
  mkcontainer 2>/dev/null && break
  kill -0 "$(cat "$dir/pid")" 2>/dev/null || { echo "azurite: server exited; see $dir/azurite.log" >&2; cat "$dir/azurite.log" >&2; exit 1; }
  sleep 0.2
done
mkcontainer || { echo "azurite: could not create the container; see $dir/azurite.log" >&2; exit 1; }

cat > "$dir/env" <<EOF
export AZURE_STORAGE_USE_EMULATOR=true
export AZURITE_BLOB_STORAGE_URL=$url
export AZURE_ALLOW_HTTP=true
export AZURITE_CONTAINER=driveblk
export AZURITE_PID=$(cat "$dir/pid")
EOF
cat "$dir/env"
