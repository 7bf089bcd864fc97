/** What the routes need; built once by buildApp from the config and the deps. */
import type { Redis } from 'ioredis';
import type { Config } from '../config.js';
import type { ConversionQueue } from '../queue/queue.js';
import type { JobRecords } from '../queue/records.js';
import type { UrlPolicyShape } from '../service/url-import.js';
import type { Store } from '../store/store.js';

export interface AppDeps {
  records: JobRecords;
  queue: Pick<ConversionQueue, 'enqueue' | 'removeWaiting' | 'depth'>;
  store: Store;
  /** For readiness and the shared rate-limit counters. */
  redis: Redis;
}

export interface ApiContext extends AppDeps {
  config: Config;
  policy: UrlPolicyShape;
  /** Local scratch space of this API process (URL inspection staged whole). */
  scratchDir: string;
}
