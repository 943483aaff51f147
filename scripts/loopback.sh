# Sourced by the scripts that start a test store on loopback (garage.sh,
# azurite.sh, and the benchmarks that start the Drive emulator): helpers they share.

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

start_driveemu() { # EMU DIR ARGS...: starts the Drive emulator (driveemu) with ARGS in the
  # background, its stdout in DIR/emu.out and its log in DIR/emu.log; sets EMU_PID, and
  # EMU_BASE to the URL it serves once it has printed it (its --stats-out file, if asked
  # for, is written before that). Returns 1, the log on stderr, if it does not start.
  local emu=$1 dir=$2 i
  shift 2
  "$emu" "$@" >"$dir/emu.out" 2>"$dir/emu.log" &
  EMU_PID=$!
  EMU_BASE=""
  for ((i = 0; i < 100; i++)); do
    EMU_BASE=$(sed -n 's/^base_url=//p' "$dir/emu.out" 2>/dev/null)
    [ -z "$EMU_BASE" ] && kill -0 "$EMU_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$EMU_BASE" ] && return 0
  kill "$EMU_PID" 2>/dev/null
  echo "the Drive emulator did not start ($dir/emu.log):" >&2
  sed 's/^/    /' "$dir/emu.log" >&2
  return 1
}
