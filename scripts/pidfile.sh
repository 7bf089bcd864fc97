# Sourced by the *-dev.sh scripts: processes they started, known by a PID file.

# stop_pidfile FILE [SIGNAL]: asks the process to stop (TERM unless told), waits
# up to 10 s, then kills it; removes FILE. Only ever the PID this script wrote.
stop_pidfile() {
  local file=$1 signal=${2:-TERM} pid
  [[ -f "$file" ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}
