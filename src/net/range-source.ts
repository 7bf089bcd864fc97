/**
 * A remote image read with HTTP range requests: the engine reads only what its
 * map needs. Small reads (headers, tables) go through a small LRU of aligned
 * blocks, so neighbouring metadata reads share one request; large reads (the
 * reader's coalesced data reads) go straight to the server, a few in flight.
 */
import { AbortedError, ImageCorruptError, SourceUnavailableError, throwIfAborted } from '../engine/errors.js';
import type { RandomAccessSource } from '../engine/source.js';
import { destroyAgents, fetchFollowing, parseContentRange, sleep, type Agents } from './request.js';
import type { CheckedUrl, UrlPolicy } from './url-policy.js';

export interface RangeSourceTuning {
  /** Reads shorter than this are served from cached aligned blocks of this size. */
  blockBytes: number;
  /** Blocks kept (memory bound: blockBytes × cacheBlocks). */
  cacheBlocks: number;
  /** Largest single range request; larger reads are split. */
  maxRequestBytes: number;
  /** Range requests in flight at once (also the agent's socket count). */
  concurrency: number;
  /** Attempts per range request on a transient failure. */
  attempts: number;
  /** Delay before the first retry; doubled after each. */
  retryDelayMs: number;
}

export const DEFAULT_RANGE_TUNING: Readonly<RangeSourceTuning> = Object.freeze({
  blockBytes: 256 * 1024,
  cacheBlocks: 16,
  maxRequestBytes: 8 * 2 ** 20,
  concurrency: 4,
  attempts: 3,
  retryDelayMs: 200,
});

/** What identifies the remote version we sized; a range from another version is refused. */
export interface RemoteValidator {
  etag?: string;
  lastModified?: string;
}

/** Counting semaphore. */
class Limiter {
  private active = 0;
  private waiting: Array<() => void> = [];
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

/**
 * A signal that fires when either does. Hand-made rather than AbortSignal.any so
 * that listeners on the long-lived lifetime signal are removed after every read.
 */
function linkSignals(a: AbortSignal | undefined, b: AbortSignal | undefined): { signal: AbortSignal | undefined; dispose: () => void } {
  if (!a || !b) return { signal: a ?? b, dispose: () => {} };
  const controller = new AbortController();
  const onAbort = (): void => controller.abort();
  if (a.aborted || b.aborted) controller.abort();
  a.addEventListener('abort', onAbort, { once: true });
  b.addEventListener('abort', onAbort, { once: true });
  return {
    signal: controller.signal,
    dispose: () => {
      a.removeEventListener('abort', onAbort);
      b.removeEventListener('abort', onAbort);
    },
  };
}

function raceAbort<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(new AbortedError());
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(new AbortedError());
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}

export interface RangeSourceStats {
  /** Range requests sent (retries included). */
  requests: number;
  /** Body bytes received. */
  bytesFetched: number;
}

export class HttpRangeSource implements RandomAccessSource {
  private readonly cache = new Map<number, Promise<Buffer>>();
  private readonly limiter: Limiter;
  private closed = false;
  readonly stats: RangeSourceStats = { requests: 0, bytesFetched: 0 };

  constructor(
    private readonly target: CheckedUrl,
    readonly size: number,
    readonly name: string,
    private readonly validator: RemoteValidator,
    private readonly policy: UrlPolicy,
    private readonly agents: Agents,
    /** Aborts everything the source does (the job's cancellation). */
    private readonly lifetimeSignal: AbortSignal | undefined,
    private readonly tuning: RangeSourceTuning = DEFAULT_RANGE_TUNING,
  ) {
    this.limiter = new Limiter(tuning.concurrency);
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    throwIfAborted(signal);
    throwIfAborted(this.lifetimeSignal);
    if (this.closed) throw new SourceUnavailableError(`${this.name}: read after close`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new ImageCorruptError(`${this.name}: invalid read offset=${offset} length=${length}`);
    }
    const end = Math.min(this.size, offset + length);
    if (end <= offset) return new Uint8Array(0);
    if (end - offset < this.tuning.blockBytes) return this.readCached(offset, end, signal);

    const linked = linkSignals(signal, this.lifetimeSignal);
    try {
      const pieces: Array<Promise<Buffer>> = [];
      for (let start = offset; start < end; start += this.tuning.maxRequestBytes) {
        pieces.push(this.fetchRange(start, Math.min(end, start + this.tuning.maxRequestBytes), linked.signal));
      }
      const parts = await Promise.all(pieces);
      return parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts);
    } finally {
      linked.dispose();
    }
  }

  private async readCached(offset: number, end: number, signal: AbortSignal | undefined): Promise<Uint8Array> {
    const block = this.tuning.blockBytes;
    const first = Math.floor(offset / block);
    const last = Math.floor((end - 1) / block);
    const out = Buffer.allocUnsafe(end - offset);
    const blocks = [];
    for (let i = first; i <= last; i++) blocks.push(this.block(i));
    const buffers = await raceAbort(Promise.all(blocks), signal);
    buffers.forEach((data, k) => {
      const blockStart = (first + k) * block;
      const from = Math.max(offset, blockStart) - blockStart;
      const to = Math.min(end, blockStart + data.length) - blockStart;
      data.copy(out, Math.max(offset, blockStart) - offset, from, to);
    });
    return out;
  }

  /** A cached aligned block; concurrent readers of one block share one request. */
  private block(index: number): Promise<Buffer> {
    const cached = this.cache.get(index);
    if (cached) {
      this.cache.delete(index); // most recently used goes last
      this.cache.set(index, cached);
      return cached;
    }
    const start = index * this.tuning.blockBytes;
    const pending = this.fetchRange(start, Math.min(this.size, start + this.tuning.blockBytes), this.lifetimeSignal);
    this.cache.set(index, pending);
    pending.catch(() => {
      if (this.cache.get(index) === pending) this.cache.delete(index);
    });
    while (this.cache.size > this.tuning.cacheBlocks) {
      const oldest = this.cache.keys().next().value as number;
      this.cache.delete(oldest);
    }
    return pending;
  }

  /** Bytes [start, end), retrying transient failures a few times. */
  private async fetchRange(start: number, end: number, signal: AbortSignal | undefined): Promise<Buffer> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.limiter.run(() => this.fetchRangeOnce(start, end, signal));
      } catch (err) {
        if (!(err instanceof SourceUnavailableError) || attempt >= this.tuning.attempts || this.closed) throw err;
        await sleep(this.tuning.retryDelayMs * 2 ** (attempt - 1), signal);
      }
    }
  }

  private async fetchRangeOnce(start: number, end: number, signal: AbortSignal | undefined): Promise<Buffer> {
    throwIfAborted(signal);
    const out = Buffer.allocUnsafe(end - start);
    let filled = 0;
    // A server may answer with less than asked (RFC 9110 allows it); ask again for the rest.
    while (filled < out.length) {
      const from = start + filled;
      const headers: Record<string, string> = { range: `bytes=${from}-${end - 1}` };
      const ifRange = this.validator.etag !== undefined && !this.validator.etag.startsWith('W/') ? this.validator.etag : this.validator.lastModified;
      if (ifRange !== undefined) headers['if-range'] = ifRange;
      this.stats.requests++;
      const exchange = await fetchFollowing(this.target, this.policy, { headers, ...(signal ? { signal } : {}), agents: this.agents });
      if (exchange.status === 200) {
        exchange.discard();
        throw new SourceUnavailableError(`${this.name} answered a range request with the whole resource: it changed or stopped honouring ranges`);
      }
      exchange.expectStatus([206]);
      const range = parseContentRange(exchange.header('content-range'));
      if (!range || range.start !== from || range.end > end - 1) {
        exchange.discard();
        throw new SourceUnavailableError(`${this.name}: asked for bytes ${from}-${end - 1}, got Content-Range '${exchange.header('content-range') ?? ''}'`);
      }
      if (range.total !== undefined && range.total !== this.size) {
        exchange.discard();
        throw new SourceUnavailableError(`${this.name} changed size during import (${this.size} -> ${range.total} bytes)`);
      }
      const etag = exchange.header('etag');
      if (this.validator.etag !== undefined && etag !== undefined && etag !== this.validator.etag) {
        exchange.discard();
        throw new SourceUnavailableError(`${this.name} changed during import (ETag ${this.validator.etag} -> ${etag})`);
      }
      const partEnd = filled + (range.end - range.start + 1);
      for await (const chunk of exchange.body()) {
        if (filled + chunk.length > partEnd) {
          exchange.discard();
          throw new SourceUnavailableError(`${this.name}: the body of range ${range.start}-${range.end} is longer than its Content-Range`);
        }
        chunk.copy(out, filled);
        filled += chunk.length;
        this.stats.bytesFetched += chunk.length;
      }
      if (filled !== partEnd) {
        throw new SourceUnavailableError(`${this.name}: range ${range.start}-${range.end} ended after ${filled - (range.start - start)} bytes`);
      }
    }
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.cache.clear();
    destroyAgents(this.agents);
  }
}
