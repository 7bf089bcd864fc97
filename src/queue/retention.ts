/**
 * Retention: finished jobs (records, outputs) go after RESULT_TTL_SECONDS; objects
 * that belong to no live job (an upload whose API died before enqueueing, writes
 * a killed worker left) go after ORPHAN_TTL_SECONDS. One sweeper at a time across
 * all workers (a Redis lock).
 */
import { randomBytes } from 'node:crypto';
import { readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { ObjectKind, Store } from '../store/store.js';
import type { JobRecords } from './records.js';

export interface SweepReport {
  expiredJobs: number;
  orphanObjects: number;
  uncommitted: number;
  scratch: number;
}

export async function sweepOnce(deps: {
  config: Pick<Config, 'retention'>;
  records: JobRecords;
  store: Store;
  scratchDir?: string;
  now?: number;
}): Promise<SweepReport> {
  const { records, store, config } = deps;
  const now = deps.now ?? Date.now();
  const report: SweepReport = { expiredJobs: 0, orphanObjects: 0, uncommitted: 0, scratch: 0 };

  for (;;) {
    const ids = await records.finishedBefore(now - config.retention.resultTtlSeconds * 1000);
    if (ids.length === 0) break;
    for (const id of ids) {
      const rec = await records.get(id);
      await store.delete('output', id);
      await store.delete('input', id);
      if (rec) await records.remove(rec);
      else await records.remove({ id, tenant: '' }); // index entry without record
      report.expiredJobs++;
    }
    if (ids.length < 100) break;
  }

  const orphanBefore = now - config.retention.orphanTtlSeconds * 1000;
  for (const kind of ['input', 'output'] as ObjectKind[]) {
    for await (const obj of store.list(kind)) {
      if (obj.modifiedAt >= orphanBefore) continue;
      const state = await records.getState(obj.key);
      // Inputs are needed while a job waits or runs; outputs while it is succeeded.
      const wanted = kind === 'input' ? state === 'queued' || state === 'running' : state === 'succeeded';
      if (!wanted) {
        await store.delete(kind, obj.key);
        report.orphanObjects++;
      }
    }
  }
  report.uncommitted = await store.sweepUncommitted(orphanBefore);

  if (deps.scratchDir) {
    for (const name of await readdir(deps.scratchDir).catch(() => [] as string[])) {
      const path = join(deps.scratchDir, name);
      const st = await stat(path).catch(() => undefined);
      if (st && st.mtimeMs < orphanBefore) {
        await rm(path, { force: true, recursive: true });
        report.scratch++;
      }
    }
  }
  return report;
}

/** Deletes the lock only if we still own it. */
const RELEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`;

/** Runs sweepOnce every RETENTION_SWEEP_SECONDS under a lock, so one worker sweeps at a time. */
export function startSweeper(deps: {
  config: Pick<Config, 'retention'>;
  redis: Redis;
  records: JobRecords;
  store: Store;
  scratchDir: string;
  logger: Logger;
}): { stop(): void } {
  const owner = randomBytes(8).toString('hex');
  const periodMs = deps.config.retention.sweepSeconds * 1000;
  let running = false;
  const tick = async (): Promise<void> => {
    if (running) return;
    running = true;
    try {
      // The lock outlives a crashed sweeper by at most a few minutes.
      const locked = await deps.redis.set(deps.records.sweepLockKey, owner, 'PX', 300_000, 'NX');
      if (locked !== 'OK') return;
      try {
        const report = await sweepOnce(deps);
        if (report.expiredJobs + report.orphanObjects + report.uncommitted + report.scratch > 0) deps.logger.info({ sweep: report }, 'retention sweep');
      } finally {
        await deps.redis.eval(RELEASE, 1, deps.records.sweepLockKey, owner);
      }
    } catch (err) {
      deps.logger.warn({ err }, 'retention sweep failed');
    } finally {
      running = false;
    }
  };
  const timer = setInterval(() => void tick(), periodMs);
  timer.unref();
  setTimeout(() => void tick(), 1000).unref();
  return { stop: () => clearInterval(timer) };
}
