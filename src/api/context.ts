/** What the routes need; built once by buildApp from the config and the deps. */
import type { Redis } from 'ioredis';
import type { Config } from '../config.js';
import type { ConversionQueue } from '../queue/queue.js';
import type { JobRecords } from '../queue/records.js';
import type { UrlPolicyShape } from '../queue/url-import.js';
import type { Leases } from '../queue/leases.js';
import type { UploadMarks } from '../queue/upload-stream.js';
import type { IdempotencyKeys } from './idempotency.js';
import type { Stores } from '../store/index.js';

export interface AppDeps {
  records: JobRecords;
  queue: Pick<ConversionQueue, 'enqueue' | 'removeWaiting' | 'depth'> & Partial<Pick<ConversionQueue, 'promote'>>;
  stores: Stores;
  /** For readiness and the shared rate-limit counters. */
  redis: Redis;
}

export interface ApiContext extends AppDeps {
  config: Config;
  policy: UrlPolicyShape;
  /** Leases that keep the sweeps off an upload or inspection in progress. */
  leases: Leases;
  /** How an upload converted while it arrives is going (src/queue/upload-stream.ts). */
  uploadMarks: UploadMarks;
  /** Idempotency-Key of POST /v1/jobs, per tenant, in Redis. */
  idempotency: IdempotencyKeys;
  /** Local scratch space of this API process, DATA_DIR/work (URL inspection staged whole, an archive's compressed members). */
  scratchDir: string;
}
