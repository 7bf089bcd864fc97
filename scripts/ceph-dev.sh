#!/usr/bin/env bash
# A throw-away single-node Ceph (Debian's ceph-mon, ceph-osd, radosgw, ceph-common 16.2) for the
# tests and for trying the S3 and RBD paths on a laptop. No cephadm, no systemd, no root:
# one mon on msgr2 only, one memstore OSD, RGW (beast) on a free port, pool size 1, an `rbd`
# pool, and an S3 user. Everything (config, keyring, data, sockets, logs, PIDs) lives under one
# directory; the daemons run in the foreground as background processes and are stopped by PID.
#
#   scripts/ceph-dev.sh up [DIR]   start a cluster in DIR (default: a new temp dir); prints env lines
#   scripts/ceph-dev.sh env DIR    print the env lines of a running cluster again
#   scripts/ceph-dev.sh down DIR   stop its daemons (by PID) and remove DIR
#
# The env lines (KEY=VALUE, one a line, no quoting needed; `set -a; . DIR/env; set +a` exports them):
#   CEPH_DEV_DIR CEPH_CONF CEPH_ARGS CEPH_FSID S3_ENDPOINT S3_REGION S3_FORCE_PATH_STYLE
#   AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
# Tuning: CEPH_DEV_MEMSTORE_BYTES (default 8G: a full memstore OSD blocks writes forever).
set -euo pipefail
# shellcheck source=pidfile.sh
. "$(cd "$(dirname "$0")" && pwd)/pidfile.sh"

die() { echo "ceph-dev: $*" >&2; exit 1; }
log() { echo "ceph-dev: $*" >&2; }

for tool in ceph-mon ceph-osd radosgw ceph rbd radosgw-admin ceph-authtool monmaptool python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (apt-get install ceph-mon ceph-osd radosgw ceph-common python3)"
done

# A port nobody listens on now. Binding 0 and closing leaves a small race; the daemons' own
# bind fails loudly if we lose it, and `up` then checks that OUR daemon answers on it.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
port_busy() { python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(0.3); sys.exit(0 if s.connect_ex(("127.0.0.1",int(sys.argv[1])))==0 else 1)' "$1"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_dir() {
  local pidfile
  for pidfile in "$1"/pids/rgw.pid "$1"/pids/osd.pid "$1"/pids/mon.pid; do stop_pidfile "$pidfile" TERM; done
}

print_env() {
  local dir=$1
  [ -f "$dir/env" ] || die "no cluster in $dir (no $dir/env)"
  cat "$dir/env"
}

cmd_up() {
  local dir=${1:-}
  if [ -z "$dir" ]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/ceph-dev.XXXXXX"); else mkdir -p "$dir"; fi
  dir=$(cd "$dir" && pwd)
  [ -e "$dir/ceph.conf" ] && die "$dir already holds a cluster (scripts/ceph-dev.sh down $dir first)"
  mkdir -p "$dir"/{mon,osd,rgw,run,log,pids}
  trap 'log "start failed; logs in $dir/log"; stop_dir "$dir"' ERR

  local fsid mon_port rgw_port osd_uuid
  fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
  osd_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
  mon_port=$(free_port)
  rgw_port=$(free_port)
  while [ "$rgw_port" = "$mon_port" ]; do rgw_port=$(free_port); done
  local memstore=${CEPH_DEV_MEMSTORE_BYTES:-8G}

  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
mon initial members = a
ms bind msgr1 = false
ms bind msgr2 = true
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.\$pid.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
mon pg warn min per osd = 0
mon max pg per osd = 1000
paxos propose interval = 0.05
paxos min wait = 0.01
rados osd op timeout = 30
rados mon op timeout = 30
client mount timeout = 30
rgw gc obj min wait = 10
rgw gc processor period = 10

[mon]
mon data = $dir/mon

[osd]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = $memstore
memstore page set = true
osd max object name len = 256
osd max object namespace len = 64

[client.rgw.a]
rgw data = $dir/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw dns name = 127.0.0.1
EOF
  export CEPH_CONF=$dir/ceph.conf
  export CEPH_ARGS="--id=admin"

  # Every key, made before the mon exists: its mkfs imports them all.
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" >/dev/null 2>"$dir/log/mon-mkfs.err"

  port_busy "$mon_port" && die "port $mon_port was taken meanwhile; run up again"
  ceph-mon -i a -f >"$dir/log/mon.out" 2>&1 &
  echo $! >"$dir/pids/mon.pid"
  local i
  for i in $(seq 1 100); do
    alive "$dir/pids/mon.pid" || die "ceph-mon exited; see $dir/log"
    if timeout 5 ceph --connect-timeout 3 fsid 2>/dev/null | grep -qx "$fsid"; then break; fi
    [ "$i" = 100 ] && die "ceph-mon did not answer on 127.0.0.1:$mon_port; see $dir/log"
    sleep 0.1
  done

  timeout 20 ceph osd new "$osd_uuid" 0 >/dev/null
  ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>"$dir/log/osd-mkfs.err"
  ceph-osd -i 0 -f >"$dir/log/osd.out" 2>&1 &
  echo $! >"$dir/pids/osd.pid"
  for i in $(seq 1 300); do
    alive "$dir/pids/osd.pid" || die "ceph-osd exited; see $dir/log"
    if [ "$(timeout 5 ceph osd dump -f json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for o in d["osds"] if o["up"] and o["in"]))' 2>/dev/null)" = 1 ]; then break; fi
    [ "$i" = 300 ] && die "ceph-osd did not come up; see $dir/log"
    sleep 0.1
  done

  timeout 30 ceph osd pool create rbd 8 >/dev/null 2>&1
  timeout 60 rbd pool init rbd

  port_busy "$rgw_port" && die "port $rgw_port was taken meanwhile; run up again"
  radosgw -n client.rgw.a -f >"$dir/log/rgw.out" 2>&1 &
  echo $! >"$dir/pids/rgw.pid"
  local access secret
  access=$(python3 -c 'import secrets; print("DK" + secrets.token_hex(9).upper())')
  secret=$(python3 -c 'import secrets; print(secrets.token_urlsafe(30))')
  for i in $(seq 1 600); do
    alive "$dir/pids/rgw.pid" || die "radosgw exited; see $dir/log"
    if python3 - "$rgw_port" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1)
except urllib.error.HTTPError:
    pass
PY
    [ "$i" = 600 ] && die "radosgw did not answer on 127.0.0.1:$rgw_port; see $dir/log"
    sleep 0.1
  done
  timeout 60 radosgw-admin -n client.admin user create --uid=diskconv --display-name=diskconv \
    --access-key="$access" --secret="$secret" >/dev/null

  cat >"$dir/env" <<EOF
CEPH_DEV_DIR=$dir
CEPH_CONF=$dir/ceph.conf
CEPH_ARGS=--id=admin
CEPH_FSID=$fsid
S3_ENDPOINT=http://127.0.0.1:$rgw_port
S3_REGION=us-east-1
S3_FORCE_PATH_STYLE=true
AWS_ACCESS_KEY_ID=$access
AWS_SECRET_ACCESS_KEY=$secret
EOF
  trap - ERR
  print_env "$dir"
}

cmd_down() {
  local dir=${1:-${CEPH_DEV_DIR:-}}
  [ -n "$dir" ] || die "usage: ceph-dev.sh down DIR"
  [ -d "$dir" ] || exit 0
  [ -f "$dir/ceph.conf" ] || die "$dir does not look like a ceph-dev cluster (no ceph.conf); not removing it"
  stop_dir "$dir"
  rm -rf "$dir"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  env) shift; print_env "${1:-${CEPH_DEV_DIR:-}}" ;;
  down) shift; cmd_down "$@" ;;
  *) echo "usage: $0 up [DIR] | env DIR | down DIR" >&2; exit 2 ;;
esac
