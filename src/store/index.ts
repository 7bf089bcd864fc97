/**
 * The one place that turns the configuration (STORE_URL, RBD_POOLS) into the
 * three stores. The API and the workers get them from here and never learn
 * which implementation is configured.
 */
import { join } from 'node:path';
import type { Config } from '../config.js';
import { NoDestinations, type Destinations } from './destination.js';
import { FileOutputStore } from './file/output.js';
import { RbdDestinations } from './rbd/destinations.js';
import { FileStaging } from './file/staging.js';
import type { OutputStore } from './output.js';
import { createS3Client, type S3Settings } from './s3/client.js';
import { S3OutputStore } from './s3/output.js';
import { S3Staging } from './s3/staging.js';
import type { InputStaging } from './staging.js';

export interface Stores {
  staging: InputStaging;
  output: OutputStore;
  destinations: Destinations;
  /** Releases clients and connections. */
  close(): Promise<void>;
}

export async function openStores(config: Pick<Config, 'dataDir' | 'store'> & Partial<Pick<Config, 's3' | 'rbd'>>): Promise<Stores> {
  const location = config.store;
  const destinations: Destinations = config.rbd && config.rbd.pools.length > 0 ? new RbdDestinations(config.rbd) : new NoDestinations();
  if (location.kind === 's3') {
    const { stagingOverlap, ...s3 } = config.s3 ?? { endpoint: undefined, region: 'us-east-1', forcePathStyle: false, requestTimeoutMs: 60_000, stagingOverlap: false };
    const settings: S3Settings = { bucket: location.bucket, prefix: location.prefix, ...s3 };
    const client = createS3Client(settings);
    return {
      staging: new S3Staging(client, settings, { overlap: stagingOverlap }),
      output: new S3OutputStore(client, settings),
      destinations,
      close: async () => client.destroy(),
    };
  }
  const root = location.root ?? join(config.dataDir, 'store');
  return {
    staging: await FileStaging.open(root),
    output: await FileOutputStore.open(root),
    destinations,
    close: async () => {},
  };
}

export type { ByteRange, ObjectStat, OwnerCheck } from './common.js';
export { StoreError, StoreObjectMissingError } from './common.js';
export type { InputStaging, StagedWrite } from './staging.js';
export type { OutputStore, OutputWriter, StoredOutput } from './output.js';
export type { Destinations, DestinationTarget, DestinationResult, DestinationWriter, RbdTarget } from './destination.js';
export { DestinationRefusedError, DestinationExistsError, DestinationError } from './destination.js';
