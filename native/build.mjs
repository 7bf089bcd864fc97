#!/usr/bin/env node
// Builds diskconv's optional native helper (native/seek: SEEK_DATA/SEEK_HOLE, batched writes) with node-gyp.
// Run by `npm ci`/`npm install` (the package's install script) and `npm run build`. It is optional:
// when it cannot build (no compiler, no Node headers), diskconv reads and scans sparse raw files
// instead, so a failure here prints why and exits 0.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dir = join(here, 'seek');
const built = join(dir, 'build', 'Release', 'seek.node');
// --if-missing (npm run build): rebuild only when the helper is missing or older than its sources.
const sourcesTime = () => Math.max(...readdirSync(dir).filter((f) => /\.(c|gyp)$/.test(f)).map((f) => statSync(join(dir, f)).mtimeMs));
if (process.argv.includes('--if-missing') && existsSync(built) && statSync(built).mtimeMs >= sourcesTime()) process.exit(0);
if (process.platform !== 'linux') {
  console.log(`native/seek: not built on ${process.platform} (SEEK_DATA/SEEK_HOLE helper is Linux-only); sparse raw files are read and scanned`);
  process.exit(0);
}
// npm puts its own node-gyp at npm_config_node_gyp inside scripts; otherwise try npm's copy beside this node, then PATH.
const candidates = [process.env.npm_config_node_gyp, join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')].filter(
  (p) => p && existsSync(p),
);
const [cmd, args] = candidates[0] ? [process.execPath, [candidates[0]]] : ['node-gyp', []];
// Node's own headers where this node has them (npm passes its nodedir setting the same way), so nothing is downloaded.
const prefix = join(dirname(process.execPath), '..');
const nodedir = process.env.npm_config_nodedir || (existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : undefined);
const res = spawnSync(cmd, [...args, 'rebuild', '--loglevel=warn', ...(nodedir ? [`--nodedir=${nodedir}`] : [])], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
if (res.status === 0 && existsSync(built)) {
  console.log('native/seek: built (SEEK_DATA/SEEK_HOLE for sparse raw sources, batched writes)');
} else {
  const why = (res.error?.message ?? `${res.stderr ?? ''}${res.stdout ?? ''}`).trim().split('\n').slice(-5).join('\n  ');
  console.log(`native/seek: not built; sparse raw files will be read and scanned instead.\n  ${why}`);
}
