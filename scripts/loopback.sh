# Sourced by the scripts that start a test store on loopback (garage.sh,
# azurite.sh): helpers they share.

free_port() { # a port nothing listens on now
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
