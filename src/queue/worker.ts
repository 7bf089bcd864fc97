/**
 * The conversion worker process: a BullMQ Worker running WORKER_CONCURRENCY
 * conversions, the cancellation watcher and the retention sweeper.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Worker } from 'bullmq';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { Stores } from '../store/index.js';
import { CancelWatcher } from './cancel.js';
import { Leases } from './leases.js';
import { UploadMarks } from './upload-stream.js';
import { createProcessor, failIfUnfinished, type ProcessResult } from './processor.js';
import { bullConnection, ConversionQueue, type ConvertJobData } from './queue.js';
import { JobRecords } from './records.js';
import { SpaceReservations, spaceKey } from './space.js';
import { startSweeper } from './retention.js';
import { startWebhookLoop } from './webhooks.js';

export interface RunningWorker {
  /** Stops taking jobs; waits up to `graceMs` for running ones, then hands them back. */
  close(graceMs?: number): Promise<void>;
}

export async function startWorker(config: Config, deps: { stores: Stores; logger: Logger; redisUrl: string }): Promise<RunningWorker> {
  const { stores, logger, redisUrl } = deps;
  const redis = new Redis(redisUrl, { maxRetriesPerRequest: 3 });
  redis.on('error', (err) => logger.warn({ err: err.message }, 'redis connection error'));
  const records = new JobRecords(redis, config.queueName);
  const cancels = new CancelWatcher(redis, records);
  await cancels.start();
  const scratchDir = join(config.dataDir, 'work');
  await mkdir(scratchDir, { recursive: true, mode: 0o750 });

  const space = new SpaceReservations(redis, spaceKey(config), Math.max(60_000, 3 * config.worker.lockDurationMs));
  const uploads = { marks: new UploadMarks(redis, config.queueName), leases: new Leases(redis, config.queueName) };
  const processor = createProcessor({ config, records, stores, cancels, logger, scratchDir, space, uploads });
  const worker = new Worker<ConvertJobData, ProcessResult>(config.queueName, processor, {
    connection: bullConnection(redisUrl),
    concurrency: config.workerConcurrency,
    lockDuration: config.worker.lockDurationMs,
    stalledInterval: config.worker.stalledIntervalMs,
    maxStalledCount: config.worker.maxStalledCount,
    // Retries come back after a backoff; keep the fetch loop responsive in tests and small setups.
    drainDelay: 5,
  });
  worker.on('error', (err) => logger.warn({ err: err.message }, 'worker error'));
  worker.on('failed', (job, err) => {
    // Jobs BullMQ fails on its own (stalled too many times) never reach our catch block.
    if (!job) return;
    void (async () => {
      if ((await job.getState().catch(() => 'unknown')) !== 'failed') return;
      const rec = await failIfUnfinished(records, job.data.id, {
        code: /stalled/i.test(err.message) ? 'WORKER_LOST' : 'INTERNAL_ERROR',
        message: /stalled/i.test(err.message) ? 'the job was interrupted too many times' : 'internal error',
      }).catch(() => undefined);
      if (rec) {
        await stores.staging.delete(rec.id).catch(() => {});
        await stores.output.delete(rec.id).catch(() => {});
        logger.warn({ job: rec.id, err: err.message }, 'job failed outside the processor');
      }
    })();
  });
  // The worker's own queue handle, to put back jobs whose enqueue was lost (see retention.ts).
  const queue = new ConversionQueue(redisUrl, config);
  queue.queue.on('error', (err) => logger.warn({ err: err.message }, 'queue connection error'));
  const sweeper = startSweeper({ config, redis, records, stores, leases: new Leases(redis, config.queueName), queue, scratchDir, logger });
  // Completion webhooks: a loop of their own, so a dead receiver never holds a conversion.
  const webhooks = startWebhookLoop({ config, redis, records, logger });
  await worker.waitUntilReady();
  logger.info({ queue: config.queueName, concurrency: config.workerConcurrency }, 'worker ready');

  let closing: Promise<void> | undefined;
  return {
    close(graceMs = config.shutdownGraceMs) {
      closing ??= (async () => {
        sweeper.stop();
        await webhooks.stop();
        const timer = setTimeout(() => {
          logger.info('shutdown grace period over; handing back running jobs');
          cancels.abortAll('shutdown');
        }, graceMs);
        timer.unref();
        await worker.close();
        clearTimeout(timer);
        await cancels.stop();
        await queue.close();
        await redis.quit().catch(() => redis.disconnect());
        logger.info('worker stopped');
      })();
      return closing;
    },
  };
}
