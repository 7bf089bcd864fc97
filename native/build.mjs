// Builds diskconv's optional native helpers with node-gyp:
//   native/seek   SEEK_DATA/SEEK_HOLE, batched reads and writes (the I/O path) and early writeback
//                 (sync_file_range) of flushed outputs;
//   native/codec  batched decoding of compressed clusters with libdeflate and libzstd
//                 (needs libdeflate-dev and libzstd-dev).
// Run by `npm ci`/`npm install` (the package's install script) and `npm run build`. Each is optional:
// when one cannot build (no compiler, no headers or libraries), diskconv takes its JavaScript path
// instead (reading and scanning sparse raw files; node:zlib and zstd on decoder threads), so a
// failure here prints why and exits 0.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const HELPERS = [
  { name: 'seek', what: 'SEEK_DATA/SEEK_HOLE for sparse raw sources, batched writes, early writeback of flushed outputs', without: 'sparse raw files will be read and scanned instead, flushed outputs written back at the end only' },
  { name: 'codec', what: 'compressed clusters decoded with libdeflate and libzstd', without: 'compressed clusters decode with node:zlib and zstd on decoder threads instead' },
];
if (process.platform !== 'linux') {
  console.log(`native: not built on ${process.platform} (the helpers are Linux-only); diskconv takes its JavaScript paths`);
  process.exit(0);
}
for (const helper of HELPERS) build(helper);

function build({ name, what, without }) {
  const dir = join(here, name);
  const built = join(dir, 'build', 'Release', `${name}.node`);
  // --if-missing (npm run build): rebuild only when the helper is missing or older than its sources.
  const common = join(here, 'common'); // headers both helpers include
  const sourcesTime = () =>
    Math.max(
      ...readdirSync(dir).filter((f) => /\.(c|h|gyp)$/.test(f)).map((f) => statSync(join(dir, f)).mtimeMs),
      ...readdirSync(common).filter((f) => f.endsWith('.h')).map((f) => statSync(join(common, f)).mtimeMs),
    );
  if (process.argv.includes('--if-missing') && existsSync(built) && statSync(built).mtimeMs >= sourcesTime()) return;
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
    console.log(`native/${name}: built (${what})`);
  } else {
    const why = (res.error?.message ?? `${res.stderr ?? ''}${res.stdout ?? ''}`).trim().split('\n').slice(-5).join('\n  ');
    console.log(`native/${name}: not built; ${without}.\n  ${why}`);
  }
}
