/**
 * A staged object read with ranged GETs as the engine's RandomAccessSource,
 * never whole into memory or onto disk. What to fetch and when (the bounded
 * block cache, coalescing of concurrent readers, the in-flight limit, splitting
 * and read-ahead) is the engine's RangedSource, shared with URL import's
 * HttpRangeSource; this file is the GET of one range. Every GET carries If-Match
 * with the ETag we sized, so a replaced object is an error, never a disk
 * stitched from two versions. The SDK retries transient failures itself.
 */
import type { S3Client } from '@aws-sdk/client-s3';
import { RangedSource, type RangedSourceStats, type RangedSourceTuning } from '../../engine/ranged-source.js';
import { StoreError } from '../common.js';
import { asS3StoreError, getRangeInto } from './client.js';

export type S3SourceTuning = Pick<RangedSourceTuning, 'blockBytes' | 'cacheBlocks' | 'maxRequestBytes' | 'concurrency'> & Partial<Pick<RangedSourceTuning, 'aheadBytes'>>;

/**
 * The announced-read ring is 16 MiB, not the engine's 32 (sized for URLs far away): the bucket is near, and a
 * staged 512 MiB-virtual qcow2 converted into the bucket took 4.06 s with 16 MiB against 4.28 s with 32 (peak RSS
 * 162 against 180 MiB; 5 alternating rounds, load 23-33), 5.01 s with 16 MiB in requests of 4 MiB.
 */
export const DEFAULT_S3_SOURCE_TUNING: Readonly<S3SourceTuning> = Object.freeze({
  blockBytes: 256 * 1024,
  cacheBlocks: 32,
  maxRequestBytes: 8 * 2 ** 20,
  concurrency: 4,
  aheadBytes: 16 * 2 ** 20,
});

export type S3SourceStats = RangedSourceStats;

export class S3RangeSource extends RangedSource {
  constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly key: string,
    size: number,
    private readonly etag: string | undefined,
    name: string,
    private readonly requestTimeoutMs: number,
    tuning: S3SourceTuning = DEFAULT_S3_SOURCE_TUNING,
  ) {
    super(size, name, { ...tuning, readAhead: true, attempts: 1 });
  }

  protected transient(): boolean {
    return false; // the SDK has retried already
  }

  protected closedError(): Error {
    return new StoreError(`${this.name}: read after close`);
  }

  protected async release(): Promise<void> {}

  /** Bytes [start, end) in one ranged GET, streamed into `target` when the base gives one (the ring), else into a buffer of their own. */
  protected async fetchOnce(start: number, end: number, signal: AbortSignal, target?: Uint8Array): Promise<Uint8Array> {
    try {
      return await getRangeInto(this.client, { Bucket: this.bucket, Key: this.key, ...(this.etag ? { IfMatch: this.etag } : {}) }, start, target ?? Buffer.allocUnsafe(end - start), {
        timeoutMs: this.requestTimeoutMs,
        signal,
        what: this.name,
      });
    } catch (err) {
      if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 412) {
        throw new StoreError(`${this.name} was replaced while it was read`, { cause: err });
      }
      throw asS3StoreError(err, `read of ${this.name}`, signal);
    }
  }
}
