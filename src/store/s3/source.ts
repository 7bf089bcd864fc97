/**
 * A staged object read with ranged GETs as the engine's RandomAccessSource,
 * never whole into memory or onto disk:
 * - small reads (headers, tables) come from a bounded LRU of aligned blocks, and
 *   concurrent readers of one block share one request (coalescing);
 * - large reads (the reader's coalesced data runs) go straight to S3, split
 *   into requests of at most `maxRequestBytes`, a few in flight;
 * - a large read starts a read-ahead of the same length after it, which the
 *   next sequential read picks up;
 * - every GET carries If-Match with the ETag we sized, so a replaced object is
 *   an error, never a disk stitched from two versions.
 */
import { GetObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { ImageCorruptError, throwIfAborted } from '../../engine/errors.js';
import { StoreError } from '../common.js';
import type { RandomAccessSource } from '../../engine/index.js';
import { asS3StoreError, deadline } from './client.js';

export interface S3SourceTuning {
  blockBytes: number;
  cacheBlocks: number;
  maxRequestBytes: number;
  concurrency: number;
}

export const DEFAULT_S3_SOURCE_TUNING: Readonly<S3SourceTuning> = Object.freeze({
  blockBytes: 256 * 1024,
  cacheBlocks: 32,
  maxRequestBytes: 8 * 2 ** 20,
  concurrency: 4,
});

class Limiter {
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(private readonly limit: number) {}
  async run<T>(task: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.active++;
    try {
      return await task();
    } finally {
      this.active--;
      this.waiting.shift()?.();
    }
  }
}

export interface S3SourceStats {
  requests: number;
  bytesFetched: number;
  readAheadHits: number;
}

export class S3RangeSource implements RandomAccessSource {
  private readonly cache = new Map<number, Promise<Buffer>>();
  private readonly limiter: Limiter;
  private readonly lifetime = new AbortController();
  /** One read-ahead at a time: the bytes right after the last large read. */
  private ahead: { offset: number; end: number; data: Promise<Buffer> } | undefined;
  private closed = false;
  readonly stats: S3SourceStats = { requests: 0, bytesFetched: 0, readAheadHits: 0 };

  constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly key: string,
    readonly size: number,
    private readonly etag: string | undefined,
    readonly name: string,
    private readonly requestTimeoutMs: number,
    private readonly tuning: S3SourceTuning = DEFAULT_S3_SOURCE_TUNING,
  ) {
    this.limiter = new Limiter(tuning.concurrency);
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    throwIfAborted(signal);
    if (this.closed) throw new StoreError(`${this.name}: read after close`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new ImageCorruptError(`${this.name}: invalid read offset=${offset} length=${length}`);
    }
    const end = Math.min(this.size, offset + length);
    if (end <= offset) return new Uint8Array(0);
    if (end - offset < this.tuning.blockBytes) return this.readCached(offset, end);

    let out: Buffer;
    const ahead = this.ahead;
    if (ahead && ahead.offset === offset && ahead.end >= end) {
      this.ahead = undefined;
      this.stats.readAheadHits++;
      const data = await ahead.data;
      out = data.subarray(0, end - offset);
    } else {
      if (ahead && !(ahead.offset < end && offset < ahead.end)) this.ahead = undefined; // not sequential: drop it
      out = await this.fetchSplit(offset, end);
    }
    // Read ahead the same length, in the background (its failure surfaces only if it is used).
    const nextEnd = Math.min(this.size, end + (end - offset));
    if (nextEnd > end && !this.ahead) {
      const data = this.fetchSplit(end, nextEnd);
      data.catch(() => {});
      this.ahead = { offset: end, end: nextEnd, data };
    }
    return out;
  }

  private async fetchSplit(offset: number, end: number): Promise<Buffer> {
    const pieces: Array<Promise<Buffer>> = [];
    for (let start = offset; start < end; start += this.tuning.maxRequestBytes) {
      pieces.push(this.fetch(start, Math.min(end, start + this.tuning.maxRequestBytes)));
    }
    const parts = await Promise.all(pieces);
    return parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts);
  }

  private async readCached(offset: number, end: number): Promise<Uint8Array> {
    const block = this.tuning.blockBytes;
    const first = Math.floor(offset / block);
    const last = Math.floor((end - 1) / block);
    const blocks: Array<Promise<Buffer>> = [];
    for (let i = first; i <= last; i++) blocks.push(this.block(i));
    const buffers = await Promise.all(blocks);
    const out = Buffer.allocUnsafe(end - offset);
    buffers.forEach((data, k) => {
      const blockStart = (first + k) * block;
      const from = Math.max(offset, blockStart);
      data.copy(out, from - offset, from - blockStart, Math.min(end, blockStart + data.length) - blockStart);
    });
    return out;
  }

  private block(index: number): Promise<Buffer> {
    const cached = this.cache.get(index);
    if (cached) {
      this.cache.delete(index);
      this.cache.set(index, cached);
      return cached;
    }
    const start = index * this.tuning.blockBytes;
    const pending = this.fetch(start, Math.min(this.size, start + this.tuning.blockBytes));
    this.cache.set(index, pending);
    pending.catch(() => {
      if (this.cache.get(index) === pending) this.cache.delete(index);
    });
    while (this.cache.size > this.tuning.cacheBlocks) this.cache.delete(this.cache.keys().next().value as number);
    return pending;
  }

  /** Bytes [start, end) in one ranged GET (the SDK retries transient failures). */
  private fetch(start: number, end: number): Promise<Buffer> {
    return this.limiter.run(async () => {
      if (this.closed) throw new StoreError(`${this.name}: read after close`);
      const signal = deadline(this.requestTimeoutMs, this.lifetime.signal);
      this.stats.requests++;
      try {
        const res = await this.client.send(
          new GetObjectCommand({ Bucket: this.bucket, Key: this.key, Range: `bytes=${start}-${end - 1}`, ...(this.etag ? { IfMatch: this.etag } : {}) }),
          { abortSignal: signal },
        );
        if (!res.Body) throw new StoreError(`${this.name}: empty answer to a range request`);
        const bytes = Buffer.from(await res.Body.transformToByteArray());
        if (bytes.length !== end - start) {
          throw new StoreError(`${this.name}: asked for ${end - start} bytes at ${start}, got ${bytes.length}`);
        }
        this.stats.bytesFetched += bytes.length;
        return bytes;
      } catch (err) {
        if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 412) {
          throw new StoreError(`${this.name} was replaced while it was read`, { cause: err });
        }
        throw asS3StoreError(err, `read of ${this.name}`);
      }
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    this.lifetime.abort();
    this.cache.clear();
    this.ahead = undefined;
  }
}
