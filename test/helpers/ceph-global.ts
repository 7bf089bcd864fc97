/**
 * Vitest global setup for the shared test Ceph: reserves a directory for this
 * run and provides it to the test files (`inject('cephRunDir')`). Nothing starts
 * here: the first test file that calls useCeph() (helpers/ceph.ts) starts the one
 * cluster of the run, the others wait for it and share it. Teardown stops it (by
 * PID, through scripts/ceph-dev.sh down) if it was started.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { TestProject } from 'vitest/node';

declare module 'vitest' {
  export interface ProvidedContext {
    cephRunDir: string;
  }
}

export const CEPH_DEV = new URL('../../scripts/ceph-dev.sh', import.meta.url).pathname;

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const dir = await mkdtemp(join(tmpdir(), 'diskconv-ceph-run-'));
  project.provide('cephRunDir', dir);
  return async () => {
    const cluster = join(dir, 'cluster');
    if (existsSync(join(cluster, 'ceph.conf'))) {
      await promisify(execFile)(CEPH_DEV, ['down', cluster], { timeout: 60_000 }).catch((err: unknown) => {
        console.error(`ceph-dev down failed: ${String(err)}`);
      });
    }
    await rm(dir, { recursive: true, force: true });
  };
}
