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
import type { OwnerCheck, Stores } from '../store/index.js';
import type { Leases } from './leases.js';
import type { JobRecords } from './records.js';

export interface SweepReport {
  expiredJobs: number;
  orphanObjects: number;
  uncommitted: number;
  scratch: number;
  /** Unfinished jobs that had no BullMQ job (an API died between record and enqueue) and were enqueued again. */
  requeued: number;
  /** Unfinished jobs whose BullMQ job ended without a result; failed with WORKER_LOST. */
  lost: number;
  /** What dead attempts left in destinations (RBD temporaries) for jobs that no longer wait or run. */
  destinationLeftovers: number;
}

/** What the sweeper needs of the queue to reconcile records with BullMQ. */
export interface QueuePort {
  enqueue(id: string): Promise<void>;
  /** The BullMQ state of a job, undefined when BullMQ has no such job. */
  stateOf(id: string): Promise<string | undefined>;
}

/** A job's record and its BullMQ job are written one after the other; give that this long before reconciling. */
const RECONCILE_AFTER_MS = 60_000;

export async function sweepOnce(deps: {
  config: Pick<Config, 'retention'>;
  records: JobRecords;
  stores: Pick<Stores, 'staging' | 'output'> & Partial<Pick<Stores, 'destinations'>>;
  /** Leases of writes in progress (uploads, inspections); without it, only job states protect a write. */
  leases?: Pick<Leases, 'held'>;
  queue?: QueuePort;
  scratchDir?: string;
  now?: number;
}): Promise<SweepReport> {
  const { records, config } = deps;
  const { staging, output } = deps.stores;
  /** A key is owned while a lease on it lives or its job waits or runs (a worker renews its BullMQ lock meanwhile). */
  const owned: OwnerCheck = async (key) => {
    if (await deps.leases?.held(key)) return true;
    const state = await records.getState(key);
    return state === 'queued' || state === 'running';
  };
  const now = deps.now ?? Date.now();
  const report: SweepReport = { expiredJobs: 0, orphanObjects: 0, uncommitted: 0, scratch: 0, requeued: 0, lost: 0, destinationLeftovers: 0 };

  if (deps.queue) {
    for (const id of await records.unfinishedBefore(now - RECONCILE_AFTER_MS, 500)) {
      const state = await records.getState(id);
      if (state === undefined) {
        await records.remove({ id, tenant: '' }); // a stale index entry
        continue;
      }
      if (state !== 'queued' && state !== 'running') continue;
      const bull = await deps.queue.stateOf(id);
      if (bull === undefined) {
        await deps.queue.enqueue(id);
        report.requeued++;
      } else if (bull === 'failed' || bull === 'completed') {
        const { moved } = await records.transition(id, 'failed', ['queued', 'running'], { error: { code: 'WORKER_LOST', message: 'the job ended without a result' } });
        if (moved) {
          await staging.delete(id);
          await output.delete(id);
          report.lost++;
        }
      }
    }
  }

  for (;;) {
    const ids = await records.finishedBefore(now - config.retention.resultTtlSeconds * 1000);
    if (ids.length === 0) break;
    for (const id of ids) {
      const rec = await records.get(id);
      await output.delete(id);
      await staging.delete(id);
      if (rec) await records.remove(rec);
      else await records.remove({ id, tenant: '' }); // index entry without record
      report.expiredJobs++;
    }
    if (ids.length < 100) break;
  }

  const orphanBefore = now - config.retention.orphanTtlSeconds * 1000;
  // Inputs are needed while their job waits or runs (or an upload still holds its lease).
  for await (const obj of staging.list()) {
    if (obj.modifiedAt >= orphanBefore || (await owned(obj.key))) continue;
    await staging.delete(obj.key);
    report.orphanObjects++;
  }
  // Outputs while their job is succeeded, or still running (committed, not yet recorded).
  for await (const obj of output.list()) {
    if (obj.modifiedAt >= orphanBefore) continue;
    if ((await records.getState(obj.key)) === 'succeeded' || (await owned(obj.key))) continue;
    await output.delete(obj.key);
    report.orphanObjects++;
  }
  report.uncommitted = (await staging.sweepUncommitted(orphanBefore, owned)) + (await output.sweepUncommitted(orphanBefore, owned));
  // No age here: a temporary lives only while its job waits or runs, and rbd refuses to remove one still being written.
  if (deps.stores.destinations) report.destinationLeftovers = await deps.stores.destinations.sweepLeftovers(owned);

  if (deps.scratchDir) {
    for (const name of await readdir(deps.scratchDir).catch(() => [] as string[])) {
      const path = join(deps.scratchDir, name);
      const st = await stat(path).catch(() => undefined);
      // Scratch files are named after their job or inspection: `<key>.download`.
      const key = name.split('.')[0] ?? '';
      if (st && st.mtimeMs < orphanBefore && !(key !== '' && (await owned(key)))) {
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
  stores: Pick<Stores, 'staging' | 'output'> & Partial<Pick<Stores, 'destinations'>>;
  leases: Pick<Leases, 'held'>;
  queue: QueuePort;
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
      // The lock outlives a crashed sweeper (or a Redis restart that kept it in its append-only file) by a few
      // periods at most, never minutes of no sweeping; two sweeps at once are harmless anyway (idempotent deletes).
      const locked = await deps.redis.set(deps.records.sweepLockKey, owner, 'PX', Math.min(300_000, Math.max(15_000, 5 * periodMs)), 'NX');
      if (locked !== 'OK') return;
      try {
        const report = await sweepOnce(deps);
        if (Object.values(report).some((n) => n > 0)) deps.logger.info({ sweep: report }, 'retention sweep');
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
