#!/usr/bin/env bash
# From a fresh Debian/Ubuntu machine with Node.js 20.12+ to a running diskconv:
# installs redis-server if it is missing (apt), npm ci, build, then `diskconv up`,
# which starts its own redis-server on a free loopback port (data under DATA_DIR,
# ./data by default), the API and a worker, and prints the URL. Ctrl-C stops it all.
# Environment variables (PORT, DATA_DIR, API_TOKENS, ...) are passed through; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! node -e 'const [major, minor] = process.versions.node.split(".").map(Number); process.exit(major > 20 || (major === 20 && minor >= 12) ? 0 : 1)' 2>/dev/null; then
  echo "diskconv needs Node.js 20.12 or newer (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server..." >&2
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
  # The package may start a system-wide redis service; diskconv up runs its own and does not use it.
fi

npm ci --no-audit --no-fund
npm run build
exec node dist/cli.js up
