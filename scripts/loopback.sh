# Sourced by the scripts that start a test store on loopback (garage.sh,
# azurite.sh): helpers they share.

free_port() { # a port nothing listens on now
  # Below the kernel's ephemeral range: a port in it can be taken by any
  # outgoing connection (another test's) between this check and the bind.
  local p low=32768
  read -r low _ < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt 11024 ] || low=32768
  while :; do
    p=$((10000 + RANDOM % (low - 10000)))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

holds() { # PID listens on PORT (rather than some other process)
  ss -ltnpH "sport = :$2" 2>/dev/null | grep -q "pid=$1,"
}
