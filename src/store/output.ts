/**
 * The output store: a converted raw image, written in guest order with its size
 * known up front, visible only once committed, served back over HTTP with
 * ranges (or a presigned URL), removed by retention. Implementations: a local
 * directory (file/), a bucket (s3/).
 */
import type { Readable } from 'node:stream';
import type { ExtentSink } from '../engine/index.js';
import type { ByteRange, ObjectStat, OwnerCheck } from './common.js';

export interface StoredOutput extends ObjectStat {
  /** Where it is, for the job's `output.location` (`s3://BUCKET/KEY`); absent for a local directory, whose paths clients never see. */
  location?: string;
}

/** Receives the image as extents; `finish()` is called by the converter, `commit()` by the job. */
export interface OutputWriter extends ExtentSink {
  /** After `finish()`: makes the object durable and visible under its key. */
  commit(): Promise<StoredOutput>;
}

export interface OutputStore {
  readonly kind: string;
  /** A writer for an image of exactly `size` bytes. */
  create(key: string, size: number): Promise<OutputWriter>;
  stat(key: string): Promise<StoredOutput | undefined>;
  /** The bytes, or a range of them; throws StoreObjectMissingError when absent. */
  read(key: string, range?: ByteRange): Promise<Readable>;
  /** A time-limited URL a client can GET directly, when the store has such a thing. */
  presignedUrl?(key: string, ttlSeconds: number): Promise<string>;
  /** Removes the object and its uncommitted writes. Absent objects are fine. */
  delete(key: string): Promise<void>;
  /** Committed objects, for retention. */
  list(): AsyncIterable<ObjectStat>;
  sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number>;
  freeBytes(): Promise<number | undefined>;
  ping(): Promise<void>;
}
