#!/usr/bin/env bash
# A throw-away Keystone (Debian's `keystone` package, Keystone 22) on 127.0.0.1 for tests: sqlite, fernet tokens,
# keystone-wsgi-public under Debian's uWSGI (uwsgi-core, uwsgi-plugin-python3). Everything lives in DIR.
#
#   scripts/keystone-dev.sh up DIR     configure (first time) and start; prints OS_AUTH_URL, OS_USERNAME, ... (admin)
#   scripts/keystone-dev.sh down DIR   stop it by its PID (DIR stays: remove it yourself)
#
# The admin user, project and role come from `keystone-manage bootstrap`; db_sync and bootstrap run in one
# interpreter (scripts/keystone-dev/setup.py) and the fernet/credential keys are written directly, since every
# keystone-manage run imports all of Keystone again (several seconds each on a loaded machine).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=pidfile.sh
. "$HERE/pidfile.sh"
die() { echo "keystone-dev: $*" >&2; exit 1; }
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
key() { head -c 32 /dev/urandom | base64 | tr '+/' '-_'; }

configure() {
  local dir=$1 port password
  port=${KEYSTONE_PORT:-$(free_port)}
  password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
  for r in fernet-keys fernet-receipts credential-keys; do
    mkdir -p "$dir/$r"; key >"$dir/$r/0"; key >"$dir/$r/1"; chmod 700 "$dir/$r"; chmod 600 "$dir/$r"/*
  done
  cat >"$dir/keystone.conf" <<CONF
[DEFAULT]
log_file = $dir/keystone.log
use_stderr = false
[database]
connection = sqlite:///$dir/keystone.sqlite
[token]
provider = fernet
expiration = ${KEYSTONE_TOKEN_EXPIRATION:-3600}
[fernet_tokens]
key_repository = $dir/fernet-keys
[fernet_receipts]
key_repository = $dir/fernet-receipts
[credential]
key_repository = $dir/credential-keys
[oslo_policy]
policy_file = $dir/policy.yaml
CONF
  : >"$dir/policy.yaml"
  cat >"$dir/uwsgi.ini" <<INI
[uwsgi]
plugins = python3
http-socket = 127.0.0.1:$port
wsgi-file = /usr/bin/keystone-wsgi-public
processes = 1
threads = 1
lazy-apps = true
env = OS_KEYSTONE_CONFIG_FILES=$dir/keystone.conf
log-format = %(method) %(uri) %(status) %(uagent)
INI
  printf '%s\n' "$port" >"$dir/port"
  printf '%s\n' "$password" >"$dir/password"
  chmod 600 "$dir/password"
  (cd "$dir" && /usr/bin/python3 "$HERE/keystone-dev/setup.py" "$dir/keystone.conf" "$password" "http://127.0.0.1:$port/v3" >"$dir/setup.log" 2>&1) ||
    { tail -20 "$dir/setup.log" >&2; die "keystone db_sync/bootstrap failed"; }
}

start() {
  local dir=$1 port
  port=$(cat "$dir/port")
  if [[ -f "$dir/uwsgi.pid" ]] && kill -0 "$(cat "$dir/uwsgi.pid")" 2>/dev/null; then return 0; fi
  (cd "$dir" && exec /usr/bin/uwsgi --ini "$dir/uwsgi.ini" >>"$dir/uwsgi.log" 2>&1 </dev/null) &
  echo $! >"$dir/uwsgi.pid"
  local pid; pid=$(cat "$dir/uwsgi.pid")
  for _ in $(seq 1 900); do
    kill -0 "$pid" 2>/dev/null || { tail -20 "$dir/uwsgi.log" >&2; die "uwsgi exited during start-up"; }
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/v3" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  die "keystone did not answer in 90 s (see $dir)"
}

stop() { stop_pidfile "$1/uwsgi.pid" INT; }

cmd=${1:-}; dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || die "usage: $0 up|down DIR"
[[ "$dir" = /* ]] || dir="$PWD/$dir"
case "$cmd" in
  up)
    mkdir -p "$dir"
    [[ -f "$dir/keystone.conf" ]] || configure "$dir"
    start "$dir"
    echo "OS_AUTH_URL=http://127.0.0.1:$(cat "$dir/port")/v3"
    echo "OS_USERNAME=admin"
    echo "OS_PASSWORD=$(cat "$dir/password")"
    echo "OS_PROJECT_NAME=admin"
    echo "OS_USER_DOMAIN_NAME=Default"
    echo "OS_PROJECT_DOMAIN_NAME=Default"
    ;;
  down) stop "$dir" ;;
  *) die "unknown command '$cmd' (up, down)" ;;
esac
