/**
 * The shared test Ceph (one per test run; see ceph-global.ts): useCeph() starts
 * it the first time any test file asks, in the run's directory, and every other
 * file (in any fork) waits for the same cluster (once-per-run.ts).
 *
 * Outside CI a machine without Ceph's packages skips the Ceph tests (as a skip,
 * via `describe.skipIf(!cephAvailable)`); in CI (`CI=true`) they run and fail.
 */
import { execFile, execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { inject } from 'vitest';
import { CEPH_DEV } from './ceph-global.js';
import { oncePerRun } from './once-per-run.js';

export interface CephEnv {
  CEPH_DEV_DIR: string;
  CEPH_CONF: string;
  CEPH_ARGS: string;
  CEPH_FSID: string;
  S3_ENDPOINT: string;
  S3_REGION: string;
  S3_FORCE_PATH_STYLE: string;
  AWS_ACCESS_KEY_ID: string;
  AWS_SECRET_ACCESS_KEY: string;
}

function hasCommand(name: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** The packages are there; in CI, true regardless, so a missing Ceph fails instead of skipping. */
export const cephAvailable: boolean = process.env.CI === 'true' || ['ceph-mon', 'ceph-osd', 'radosgw', 'rbd'].every(hasCommand);

function parseEnv(text: string): CephEnv {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0) env[line.slice(0, i)] = line.slice(i + 1);
  }
  for (const k of ['CEPH_CONF', 'S3_ENDPOINT', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'CEPH_FSID']) {
    if (!env[k]) throw new Error(`ceph-dev printed no ${k}`);
  }
  return env as unknown as CephEnv;
}

let cached: Promise<CephEnv> | undefined;

/** The run's Ceph, started on first use. Throws (the test fails) when it cannot start. */
export function useCeph(): Promise<CephEnv> {
  cached ??= start();
  return cached;
}

async function start(): Promise<CephEnv> {
  const runDir = inject('cephRunDir');
  if (!runDir) throw new Error('no cephRunDir: test/helpers/ceph-global.ts is not in vitest.config.ts globalSetup');
  const text = await oncePerRun(runDir, 'the test Ceph', async () => {
    const { stdout } = await promisify(execFile)(CEPH_DEV, ['up', join(runDir, 'cluster')], { timeout: 240_000 });
    parseEnv(stdout);
    return stdout;
  });
  return parseEnv(text);
}

/** Runs a Ceph CLI (rbd, ceph, radosgw-admin) against the test cluster. */
export async function cephCli(env: CephEnv, cmd: string, args: string[], options: { encoding?: 'buffer' } = {}): Promise<string> {
  const { stdout } = await promisify(execFile)(cmd, args, {
    env: { ...process.env, CEPH_CONF: env.CEPH_CONF, CEPH_ARGS: env.CEPH_ARGS },
    maxBuffer: 1 << 30,
    timeout: 120_000,
    ...(options.encoding ? { encoding: 'buffer' as unknown as BufferEncoding } : {}),
  });
  return String(stdout);
}

/**
 * Removes test RBD images ("pool/name", or "name" in pool rbd) with their
 * snapshots, whatever state a test left them in; missing ones are no error.
 */
export async function removeRbdImages(env: CephEnv, images: Iterable<string>): Promise<void> {
  for (const image of images) {
    const spec = image.includes('/') ? image : `rbd/${image}`;
    await cephCli(env, 'rbd', ['snap', 'unprotect', `${spec}@snap`]).catch(() => {});
    await cephCli(env, 'rbd', ['snap', 'purge', '--no-progress', spec]).catch(() => {});
    await cephCli(env, 'rbd', ['rm', '--no-progress', spec]).catch(() => {});
  }
}
