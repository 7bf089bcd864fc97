/**
 * The BullMQ side of a job: the API enqueues a job id, workers take it. Everything
 * a client sees lives in the job record (records.ts); the BullMQ job only carries
 * the id, so BullMQ may forget finished jobs without losing anything.
 */
import { Queue, type ConnectionOptions } from 'bullmq';
import type { Config } from '../config.js';

export interface ConvertJobData {
  id: string;
}

export const JOB_NAME = 'convert';

export function bullConnection(redisUrl: string, options: { failFast?: boolean } = {}): ConnectionOptions {
  // BullMQ needs maxRetriesPerRequest: null for its blocking commands (workers). A
  // producer (the API) fails fast instead: with Redis down, a command is refused at
  // once rather than queued until Redis returns.
  return options.failFast ? { url: redisUrl, maxRetriesPerRequest: 1, enableOfflineQueue: false } : { url: redisUrl, maxRetriesPerRequest: null };
}

/** An enqueue that did not finish in time: Redis is unreachable or stuck. */
export class QueueTimeoutError extends Error {
  override name = 'QueueTimeoutError';
}

/** How long the API waits for BullMQ to take a job before answering 503. */
export const ENQUEUE_TIMEOUT_MS = 5000;

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new QueueTimeoutError(`${what} did not finish in ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

export class ConversionQueue {
  readonly queue: Queue<ConvertJobData>;
  constructor(
    redisUrl: string,
    private readonly config: Pick<Config, 'queueName' | 'jobAttempts' | 'jobBackoffMs' | 'retention'>,
    options: { failFast?: boolean } = {},
  ) {
    this.queue = new Queue<ConvertJobData>(config.queueName, { connection: bullConnection(redisUrl, options) });
  }

  async enqueue(id: string): Promise<void> {
    await withTimeout(this.enqueueNow(id), ENQUEUE_TIMEOUT_MS, 'enqueue');
  }

  private async enqueueNow(id: string): Promise<void> {
    await this.queue.add(
      JOB_NAME,
      { id },
      {
        jobId: id,
        attempts: this.config.jobAttempts,
        // Jitter: jobs that failed together (a full store, a store outage) do not all retry at the same instant.
        backoff: { type: 'exponential', delay: this.config.jobBackoffMs, jitter: 0.5 },
        // The record keeps the outcome; BullMQ's copies go soon.
        removeOnComplete: { age: 3600, count: 1000 },
        removeOnFail: { age: this.config.retention.resultTtlSeconds, count: 10000 },
      },
    );
  }

  /** Takes a job off the queue if no worker holds it; a running job is stopped by its worker. */
  async removeWaiting(id: string): Promise<void> {
    const job = await this.queue.getJob(id);
    if (!job) return;
    const state = await job.getState();
    if (state === 'waiting' || state === 'delayed' || state === 'prioritized') {
      await job.remove().catch(() => {}); // a worker took it meanwhile; it sees the record is cancelled
    }
  }

  /** Runs a delayed job now (a parked upload job whose upload resumed or completed: upload-stream.ts); false when it was not delayed. */
  async promote(id: string): Promise<boolean> {
    const job = await this.queue.getJob(id);
    if (!job || (await job.getState()) !== 'delayed') return false;
    return job.promote().then(
      () => true,
      () => false, // taken meanwhile (promoted by its worker, or removed)
    );
  }

  /** BullMQ's state of a job; undefined when BullMQ has no such job (never added, or already forgotten). */
  async stateOf(id: string): Promise<string | undefined> {
    const job = await this.queue.getJob(id);
    if (!job) return undefined;
    const state = await job.getState();
    return state === 'unknown' ? undefined : state;
  }

  /** Jobs waiting for a worker (waiting, delayed for retry, prioritized) and being worked on. */
  async depth(): Promise<{ waiting: number; delayed: number; active: number }> {
    const c = await this.queue.getJobCounts('waiting', 'delayed', 'prioritized', 'active');
    return { waiting: (c.waiting ?? 0) + (c.prioritized ?? 0), delayed: c.delayed ?? 0, active: c.active ?? 0 };
  }

  async close(): Promise<void> {
    await this.queue.close();
  }
}
