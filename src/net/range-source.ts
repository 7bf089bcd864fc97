/**
 * A remote image read with HTTP range requests: the engine reads only what its
 * map needs. What to fetch and when (the block cache, coalescing, the in-flight
 * limit, read-ahead, retries) is the engine's RangedSource, shared with the S3
 * store; this file is the HTTP request for one range. Every request carries
 * If-Range with the validator we sized, and every answer is checked against it:
 * a changed file is SOURCE_CHANGED, never a disk stitched from two versions.
 */
import { RangedSource, type RangedSourceStats, type RangedSourceTuning } from '../engine/ranged-source.js';
import { SourceUnavailableError } from '../engine/errors.js';
import { SourceChangedError } from './errors.js';
import { destroyAgents, fetchFollowing, parseContentRange, type Agents } from './request.js';
import type { CheckedUrl, UrlPolicy } from './url-policy.js';

export type RangeSourceTuning = Omit<RangedSourceTuning, 'readAhead' | 'aheadBytes'> & { readAhead?: boolean; aheadBytes?: number };

export const DEFAULT_RANGE_TUNING: Readonly<RangeSourceTuning> = Object.freeze({
  blockBytes: 256 * 1024,
  cacheBlocks: 16,
  maxRequestBytes: 8 * 2 ** 20,
  concurrency: 4,
  readAhead: true,
  // Announced ranges fetched ahead of the reader (along the image's map): 0.3 s at 100 MB/s, within the worker's memory bound.
  aheadBytes: 32 * 2 ** 20,
  attempts: 3,
  retryDelayMs: 200,
});

/** What identifies the remote version we sized; a range from another version is refused. */
export interface RemoteValidator {
  etag?: string;
  lastModified?: string;
}

/** The If-Range value for a validator: a strong ETag, else Last-Modified (a weak ETag may not be used). */
export function ifRangeOf(validator: RemoteValidator): string | undefined {
  return validator.etag !== undefined && !validator.etag.startsWith('W/') ? validator.etag : validator.lastModified;
}

export type RangeSourceStats = RangedSourceStats;

export class HttpRangeSource extends RangedSource {
  private readonly ifRange: string | undefined;

  constructor(
    private readonly target: CheckedUrl,
    size: number,
    name: string,
    private readonly validator: RemoteValidator,
    private readonly policy: UrlPolicy,
    private readonly agents: Agents,
    /** Aborts everything the source does (the job's cancellation). */
    lifetimeSignal: AbortSignal | undefined,
    tuning: RangeSourceTuning = DEFAULT_RANGE_TUNING,
  ) {
    super(size, name, tuning, lifetimeSignal);
    this.ifRange = ifRangeOf(validator);
  }

  protected transient(err: unknown): boolean {
    return err instanceof SourceUnavailableError;
  }

  protected closedError(): Error {
    return new SourceUnavailableError(`${this.name}: read after close`);
  }

  protected async release(): Promise<void> {
    destroyAgents(this.agents);
  }

  protected async fetchOnce(start: number, end: number, signal: AbortSignal, target?: Uint8Array): Promise<Uint8Array> {
    const out = target ?? Buffer.allocUnsafe(end - start);
    let filled = 0;
    // A server may answer with less than asked (RFC 9110 allows it); ask again for the rest.
    for (let request = 0; filled < out.length; request++) {
      if (request > 0) this.stats.requests++;
      const from = start + filled;
      const headers: Record<string, string> = { range: `bytes=${from}-${end - 1}` };
      if (this.ifRange !== undefined) headers['if-range'] = this.ifRange;
      const exchange = await fetchFollowing(this.target, this.policy, { headers, signal, agents: this.agents });
      if (exchange.status === 200) {
        exchange.discard();
        // If-Range did not match: the server says the file is no longer the version we sized.
        throw new SourceChangedError(`${this.name} changed while it was read (a range request guarded by If-Range ${this.ifRange ?? ''} was answered with the whole file)`);
      }
      exchange.expectStatus([206]);
      const range = parseContentRange(exchange.header('content-range'));
      if (!range || range.start !== from || range.end > end - 1) {
        exchange.discard();
        throw new SourceUnavailableError(`${this.name}: asked for bytes ${from}-${end - 1}, got Content-Range '${exchange.header('content-range') ?? ''}'`);
      }
      if (range.total !== undefined && range.total !== this.size) {
        exchange.discard();
        throw new SourceChangedError(`${this.name} changed while it was read (${this.size} -> ${range.total} bytes)`);
      }
      const etag = exchange.header('etag');
      if (this.validator.etag !== undefined && etag !== undefined && etag !== this.validator.etag) {
        exchange.discard();
        throw new SourceChangedError(`${this.name} changed while it was read (ETag ${this.validator.etag} -> ${etag})`);
      }
      const lastModified = exchange.header('last-modified');
      if (this.validator.etag === undefined && this.validator.lastModified !== undefined && lastModified !== undefined && lastModified !== this.validator.lastModified) {
        exchange.discard();
        throw new SourceChangedError(`${this.name} changed while it was read (Last-Modified ${this.validator.lastModified} -> ${lastModified})`);
      }
      const partEnd = filled + (range.end - range.start + 1);
      for await (const chunk of exchange.body()) {
        if (filled + chunk.length > partEnd) {
          exchange.discard();
          throw new SourceUnavailableError(`${this.name}: the body of range ${range.start}-${range.end} is longer than its Content-Range`);
        }
        out.set(chunk, filled);
        filled += chunk.length;
      }
      if (filled !== partEnd) {
        throw new SourceUnavailableError(`${this.name}: range ${range.start}-${range.end} ended after ${filled - (range.start - start)} bytes`);
      }
    }
    return out;
  }
}
