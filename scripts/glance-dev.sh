#!/usr/bin/env bash
# A throw-away Glance (Debian's glance-api, Glance 25) on 127.0.0.1, for tests and for trying the
# publish paths on a laptop. Everything (config, sqlite, image store, staging, logs, pid) lives in DIR.
#
#   scripts/glance-dev.sh up DIR     configure (first time) and start; prints the env to use
#   scripts/glance-dev.sh stop DIR   stop the API (by its PID); config and images stay
#   scripts/glance-dev.sh start DIR  start it again on the same port
#   scripts/glance-dev.sh down DIR   stop it (DIR stays: remove it yourself)
#   scripts/glance-dev.sh env DIR    print GLANCE_URL, GLANCE_TOKEN, ...
#
# Environment read by `up`:
#   GLANCE_PORT            port (default: a free one)
#   GLANCE_DEV_TOKEN       the token the API accepts as X-Auth-Token (default: random)
#   GLANCE_CEPH_CONF       a ceph.conf (with a client.admin keyring): enables the `ceph` RBD store, made the default
#   GLANCE_CEPH_POOL       its pool (default: rbd)
#   GLANCE_SHOW_MULTIPLE_LOCATIONS  true (default) or false: false makes Glance refuse adding a location
#                          (403), the way many clouds run it, for the fallback to uploading
#   GLANCE_KEYSTONE_URL    a Keystone v3 (scripts/keystone-dev.sh): tokens are validated by keystonemiddleware's
#                          authtoken (no cache) instead of the fixed token below; with GLANCE_KEYSTONE_USERNAME and
#                          GLANCE_KEYSTONE_PASSWORD (project admin, domain Default) as Glance's service user
# Without GLANCE_CEPH_CONF the only store is `fs` (a directory).
#
# Auth: no Keystone. A paste filter (scripts/glance-dev/diskconv_glance_auth.py) plays the
# Keystone-authenticating proxy: a request with the right X-Auth-Token gets a fixed project, user and
# the admin role through Glance's own `context` filter; any other request gets 401.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=pidfile.sh
. "$HERE/pidfile.sh"
GLANCE_API=${GLANCE_API:-/usr/bin/glance-api}
GLANCE_MANAGE=${GLANCE_MANAGE:-/usr/bin/glance-manage}

die() { echo "glance-dev: $*" >&2; exit 1; }

free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

configure() {
  local dir=$1
  mkdir -p "$dir/images" "$dir/staging" "$dir/tasks" "$dir/log"
  local port=${GLANCE_PORT:-$(free_port)}
  local token=${GLANCE_DEV_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
  printf '%s\n' "$token" >"$dir/token"
  chmod 600 "$dir/token"
  local backends="fs:file" default=fs ceph_section="" flavor=diskconv keystone_section=""
  if [[ -n "${GLANCE_KEYSTONE_URL:-}" ]]; then
    flavor=keystone
    keystone_section="
[keystone_authtoken]
www_authenticate_uri = $GLANCE_KEYSTONE_URL
auth_url = $GLANCE_KEYSTONE_URL
auth_type = password
username = ${GLANCE_KEYSTONE_USERNAME:-admin}
password = ${GLANCE_KEYSTONE_PASSWORD:?GLANCE_KEYSTONE_PASSWORD is needed with GLANCE_KEYSTONE_URL}
project_name = admin
user_domain_name = Default
project_domain_name = Default
token_cache_time = -1
interface = public
"
  fi
  if [[ -n "${GLANCE_CEPH_CONF:-}" ]]; then
    [[ -r "$GLANCE_CEPH_CONF" ]] || die "GLANCE_CEPH_CONF=$GLANCE_CEPH_CONF is not readable"
    backends="ceph:rbd, fs:file"
    default=ceph
    ceph_section="[ceph]
rbd_store_pool = ${GLANCE_CEPH_POOL:-rbd}
rbd_store_user = admin
rbd_store_ceph_conf = $GLANCE_CEPH_CONF
rbd_store_chunk_size = 8
store_description = test Ceph RBD
"
  fi
  cat >"$dir/glance-api.conf" <<CONF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $port
workers = 0
enabled_backends = $backends
show_multiple_locations = ${GLANCE_SHOW_MULTIPLE_LOCATIONS:-true}
show_image_direct_url = true
enabled_import_methods = [glance-direct]
log_file = $dir/log/glance-api.log
use_stderr = false
lock_path = $dir
image_cache_dir = $dir/cache

[database]
connection = sqlite:///$dir/glance.sqlite

[glance_store]
default_backend = $default

[fs]
filesystem_store_datadir = $dir/images/
store_description = test file store

$ceph_section
[os_glance_staging_store]
filesystem_store_datadir = $dir/staging/

[os_glance_tasks_store]
filesystem_store_datadir = $dir/tasks/

[image_import_opts]
image_import_plugins = []

[paste_deploy]
flavor = $flavor
config_file = $dir/glance-api-paste.ini
$keystone_section
[oslo_concurrency]
lock_path = $dir

[oslo_policy]
policy_file = $dir/policy.yaml
CONF
  : >"$dir/policy.yaml"
  cp /etc/glance/glance-api-paste.ini "$dir/glance-api-paste.ini"
  cat >>"$dir/glance-api-paste.ini" <<PASTE

# The test pipeline: our token filter stands in for Keystone's authtoken, then Glance's own context.
[pipeline:glance-api-diskconv]
pipeline = healthcheck versionnegotiation diskconvauth context rootapp

[filter:diskconvauth]
paste.filter_factory = diskconv_glance_auth:filter_factory
token_file = $dir/token
PASTE
  sed -i -e "s#^disable_by_file_path = .*#disable_by_file_path = $dir/healthcheck_disable#" "$dir/glance-api-paste.ini"
  printf '%s\n' "$port" >"$dir/port"
  (cd "$dir" && "$GLANCE_MANAGE" --config-file "$dir/glance-api.conf" db_sync >"$dir/log/db_sync.log" 2>&1) ||
    { cat "$dir/log/db_sync.log" >&2; die "glance-manage db_sync failed"; }
}

running() {
  local dir=$1
  [[ -f "$dir/glance-api.pid" ]] && kill -0 "$(cat "$dir/glance-api.pid")" 2>/dev/null
}

start() {
  local dir=$1
  [[ -f "$dir/glance-api.conf" ]] || die "$dir is not configured (run up first)"
  running "$dir" && return 0
  local port
  port=$(cat "$dir/port")
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is already taken by another process"; fi
  # Debian's /usr/bin/python3 has the glance modules (a pyenv python3 on PATH has not).
  # exec: the PID recorded is glance-api's own (workers = 0: one process, no children).
  (cd "$dir" && PYTHONPATH="$HERE/glance-dev${PYTHONPATH:+:$PYTHONPATH}" exec "$GLANCE_API" --config-file "$dir/glance-api.conf" \
    >>"$dir/log/stdout.log" 2>&1 </dev/null) &
  echo $! >"$dir/glance-api.pid"
  local pid
  pid=$(cat "$dir/glance-api.pid")
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { tail -30 "$dir/log/glance-api.log" "$dir/log/stdout.log" >&2 || true; die "glance-api exited during start-up"; }
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/healthcheck" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  die "glance-api did not become healthy in 30 s (see $dir/log)"
}

stop() { stop_pidfile "$1/glance-api.pid" TERM; }

print_env() {
  local dir=$1
  echo "GLANCE_URL=http://127.0.0.1:$(cat "$dir/port")"
  echo "GLANCE_TOKEN=$(cat "$dir/token")"
  if grep -q '^\[ceph\]' "$dir/glance-api.conf"; then
    echo "GLANCE_RBD_POOLS=$(sed -n 's/^rbd_store_pool = //p' "$dir/glance-api.conf")"
  fi
}

cmd=${1:-}
dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || die "usage: $0 up|start|stop|down|env DIR"
[[ "$dir" = /* ]] || dir="$PWD/$dir"
case "$cmd" in
  up)
    mkdir -p "$dir"
    [[ -f "$dir/glance-api.conf" ]] || configure "$dir"
    start "$dir"
    print_env "$dir"
    ;;
  start) start "$dir" ;;
  stop | down) stop "$dir" ;;
  env) print_env "$dir" ;;
  *) die "unknown command '$cmd' (up, start, stop, down, env)" ;;
esac
