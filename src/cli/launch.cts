/**
 * The CLI's entry point (CommonJS, so that bin/diskconv starts it without Node's ESM loader).
 *
 * An image verb (info, convert, ...) is a short process whose start is a visible share of its run: loading
 * dist/cli/main.js and the ~40 ES modules a conversion imports costs about 75 ms here, as much as converting a
 * few hundred MiB. So the build also writes the image verbs as one CommonJS file (dist/bundle/image-verbs.cjs,
 * scripts/bundle-cli.mjs) with a V8 code cache made after a warm-up run: compiled from that cache, the same
 * code starts in about a third of the time. The bundle is only an accelerator. Its manifest stamps every
 * compiled module it was made from, and when any of them changed since (a `tsc` without the bundle step), or
 * the bundle is missing, the launcher runs dist/cli/main.js, which is always the truth. The service verbs
 * (serve, worker, up) are long-lived and load fastify, BullMQ and the stores: they always run main.js.
 */
import { readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { Script } from 'node:vm';

type RunCli = (argv: string[], out?: (s: string) => void) => Promise<number>;

const DIST = dirname(__dirname);
export const BUNDLE = join(DIST, 'bundle', 'image-verbs.cjs');
export const BUNDLE_CACHE = join(DIST, 'bundle', 'image-verbs.cache');
export const BUNDLE_MANIFEST = join(DIST, 'bundle', 'image-verbs.json');

const SERVICE_VERBS = new Set(['serve', 'worker', 'up']);

/** What identifies a file's version cheaply: its size and modification time. */
export interface Stamp {
  size: number;
  mtimeMs: number;
}

export interface BundleManifest {
  node: string;
  bundle: Stamp;
  cache: Stamp | null;
  /** Every compiled module under dist/ the bundle holds, by path relative to dist/. */
  inputs: Record<string, Stamp>;
}

export function stampOf(path: string): Stamp | null {
  try {
    const s = statSync(path);
    return { size: s.size, mtimeMs: s.mtimeMs };
  } catch {
    return null;
  }
}

/**
 * Within a millisecond: copies that keep timestamps (fs.cp, cp -p) pass them through seconds as a double or
 * whole milliseconds, which moves them by up to a millisecond; a rebuild of a module is seconds later.
 */
const sameStamp = (a: Stamp | null, b: Stamp | null): boolean => a !== null && b !== null && a.size === b.size && Math.abs(a.mtimeMs - b.mtimeMs) < 1;

/**
 * Compiles the bundle as Node compiles a CommonJS module (the same wrapper, so `require`, `module` and
 * `__dirname` are the bundle's own) and runs its top level. The wrapper text is part of what the code cache
 * was made from: the build makes the cache through this function, so the two always agree.
 */
export function runBundle(source: string, cachedData?: Buffer): { script: Script; exports: { runCli: RunCli } } {
  const wrapped = `(function (exports, require, module, __filename, __dirname) {${source}\n})`;
  const script = new Script(wrapped, { filename: BUNDLE, ...(cachedData ? { cachedData } : {}) });
  const bundleModule = { exports: {} as { runCli: RunCli } };
  const fn = script.runInThisContext() as (e: object, r: NodeJS.Require, m: object, f: string, d: string) => void;
  // The bundle's own require resolves node_modules from dist/bundle/, as a module there would.
  fn(bundleModule.exports, createRequire(BUNDLE), bundleModule, BUNDLE, dirname(BUNDLE));
  return { script, exports: bundleModule.exports };
}

/** The bundled CLI, or why it cannot be used (then main.js runs). */
export function loadBundledCli(): { runCli: RunCli; cacheAccepted: boolean } | { reason: string } {
  let manifest: BundleManifest;
  try {
    manifest = JSON.parse(readFileSync(BUNDLE_MANIFEST, 'utf8')) as BundleManifest;
  } catch (err) {
    const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
    return { reason: missing ? 'no bundle (the build did not make one)' : `unreadable bundle manifest: ${(err as Error).message}` };
  }
  if (!sameStamp(stampOf(BUNDLE), manifest.bundle)) return { reason: 'the bundle changed after its manifest was written' };
  for (const [rel, stamp] of Object.entries(manifest.inputs)) {
    if (!sameStamp(stampOf(join(DIST, rel)), stamp)) return { reason: `dist/${rel} changed after the bundle was made` };
  }
  let cachedData: Buffer | undefined;
  if (manifest.cache && manifest.node === process.version && sameStamp(stampOf(BUNDLE_CACHE), manifest.cache)) {
    try {
      cachedData = readFileSync(BUNDLE_CACHE);
    } catch {
      // Unreadable: the bundle compiles without it.
    }
  }
  // (Not named `exports`: in the CommonJS tsc emits, that would shadow the module's own exports above.)
  const bundled = runBundle(readFileSync(BUNDLE, 'utf8'), cachedData);
  return { runCli: bundled.exports.runCli, cacheAccepted: cachedData !== undefined && !bundled.script.cachedDataRejected };
}

export async function run(argv: string[]): Promise<number> {
  const debug = Boolean(process.env.DISKCONV_DEBUG);
  const verb = argv[0];
  if (verb === undefined || !SERVICE_VERBS.has(verb)) {
    const bundled = loadBundledCli();
    if ('runCli' in bundled) {
      if (debug) process.stderr.write(`diskconv: running ${BUNDLE} (code cache ${bundled.cacheAccepted ? 'accepted' : 'not used'})\n`);
      return bundled.runCli(argv);
    }
    if (debug) process.stderr.write(`diskconv: running dist/cli/main.js: ${bundled.reason}\n`);
  }
  const main = (await import('./main.js')) as { runCli: RunCli };
  return main.runCli(argv);
}

if (require.main === module) {
  run(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`diskconv: INTERNAL_ERROR: ${err instanceof Error ? err.stack : String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
