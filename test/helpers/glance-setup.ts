/**
 * Vitest global setup for the shared test Glance: reserves a directory for this
 * run and provides it (`inject('glanceRunDir')`). Nothing starts here: the first
 * test file that calls useGlance() (helpers/glance.ts) starts the run's one
 * Glance (with the run's test Ceph as its RBD store where Ceph is installed), the
 * others share it. Teardown stops it by PID (scripts/glance-dev.sh down).
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
    glanceRunDir: string;
  }
}

const GLANCE_DEV = new URL('../../scripts/glance-dev.sh', import.meta.url).pathname;

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const dir = await mkdtemp(join(tmpdir(), 'diskconv-glance-run-'));
  project.provide('glanceRunDir', dir);
  return async () => {
    const glance = join(dir, 'glance');
    if (existsSync(join(glance, 'glance-api.conf'))) {
      await promisify(execFile)(GLANCE_DEV, ['down', glance], { timeout: 60_000 }).catch((err: unknown) => {
        console.error(`glance-dev down failed: ${String(err)}`);
      });
    }
    await rm(dir, { recursive: true, force: true });
  };
}
