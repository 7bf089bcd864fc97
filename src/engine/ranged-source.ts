/**
 * The one range-reading core behind every remote source (a URL read by HTTP
 * range requests, an S3 object read by ranged GETs): a subclass says how to
 * fetch bytes [start, end) once; this class decides what to fetch and when.
 * - small reads (headers, tables) come from a bounded LRU of aligned blocks, and
 *   concurrent readers of one block share one request (coalescing);
 * - large reads (the reader's coalesced data runs) are split into requests of at
 *   most `maxRequestBytes`, at most `concurrency` in flight for the whole source;
 * - a large read starts a read-ahead of the same length after it (when
 *   `readAhead`), which the next sequential read picks up;
 * - a large read overlapping a large fetch in flight or just done (a
 *   read-ahead, or another reader's) takes those bytes from it: a reader with
 *   several reads in flight never has one range fetched twice;
 * - a failed request is retried when the subclass calls the failure transient.
 * It knows nothing of HTTP or S3.
 */
import { AbortedError, ImageCorruptError, LimitExceededError, throwIfAborted } from './errors.js';
import type { RandomAccessSource } from './source.js';

export interface RangedSourceTuning {
  /** Reads shorter than this are served from cached aligned blocks of this size. */
  blockBytes: number;
  /** Blocks kept (memory bound: blockBytes × cacheBlocks). */
  cacheBlocks: number;
  /** Largest single request; larger reads are split. */
  maxRequestBytes: number;
  /** Requests in flight at once. */
  concurrency: number;
  /** Read the same length again after each large read, in the background. */
  readAhead: boolean;
  /** Attempts per request when the failure is transient (1: no retries here). */
  attempts: number;
  /** Delay before the first retry; doubled after each. */
  retryDelayMs: number;
  /** Most bytes this source may request over its life (retries included); past it, LIMIT_EXCEEDED naming `fetchLimitName`. */
  maxFetchBytes?: number;
  fetchLimitName?: string;
}

export const DEFAULT_RANGED_TUNING: Readonly<RangedSourceTuning> = Object.freeze({
  blockBytes: 256 * 1024,
  cacheBlocks: 32,
  maxRequestBytes: 8 * 2 ** 20,
  concurrency: 4,
  readAhead: true,
  attempts: 1,
  retryDelayMs: 200,
});

export interface RangedSourceStats {
  /** Requests sent (retries included; a subclass adds the extra requests of a short answer). */
  requests: number;
  /** Body bytes received. */
  bytesFetched: number;
  /** Large reads served by the read-ahead. */
  readAheadHits: number;
}

/** Counting semaphore. */
export class Limiter {
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(private readonly limit: number) {}

  async run<T>(task: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await task();
    } finally {
      release();
    }
  }

  /** Waits for a slot (or the signal's abort); the returned function gives it back, once. */
  async acquire(signal?: AbortSignal): Promise<() => void> {
    throwIfAborted(signal);
    if (this.active >= this.limit) {
      await new Promise<void>((resolve, reject) => {
        const wake = (): void => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        };
        const onAbort = (): void => {
          const i = this.waiting.indexOf(wake);
          if (i >= 0) this.waiting.splice(i, 1);
          reject(new AbortedError());
        };
        this.waiting.push(wake);
        signal?.addEventListener('abort', onAbort, { once: true });
      });
    }
    this.active++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.active--;
      this.waiting.shift()?.();
    };
  }
}

/** Waits for `promise`, or rejects with AbortedError when `signal` fires first (the work itself goes on, shared). */
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

/** Sleeps, or rejects with AbortedError when the signal fires. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new AbortedError());
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(new AbortedError());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export abstract class RangedSource implements RandomAccessSource {
  private readonly cache = new Map<number, Promise<Buffer>>();
  private readonly limiter: Limiter;
  /** Aborted by close(), and by the owner's signal when one was given. */
  private readonly lifetime = new AbortController();
  /** The last few large fetches (in flight or done, the read-ahead among them), newest last. */
  private recent: Array<{ offset: number; end: number; data: Promise<Buffer>; ahead: boolean }> = [];
  protected closed = false;
  /** Bytes asked for so far, against maxFetchBytes. */
  private asked = 0;
  readonly stats: RangedSourceStats = { requests: 0, bytesFetched: 0, readAheadHits: 0 };
  protected readonly tuning: RangedSourceTuning;

  protected constructor(
    readonly size: number,
    readonly name: string,
    tuning: Partial<RangedSourceTuning>,
    /** Aborts everything the source does (a job's cancellation). */
    ownerSignal?: AbortSignal,
  ) {
    this.tuning = { ...DEFAULT_RANGED_TUNING, ...tuning };
    this.limiter = new Limiter(this.tuning.concurrency);
    if (ownerSignal) {
      if (ownerSignal.aborted) this.lifetime.abort();
      else ownerSignal.addEventListener('abort', () => this.lifetime.abort(), { once: true });
    }
  }

  /** Bytes [start, end) in one request (or a few, for a short answer); exactly end - start bytes. */
  protected abstract fetchOnce(start: number, end: number, signal: AbortSignal): Promise<Buffer>;
  /** Whether a failure of fetchOnce may heal if asked again. */
  protected abstract transient(err: unknown): boolean;
  /** The error for a read after close(). */
  protected abstract closedError(): Error;
  /** Releases what the subclass holds (connections); after the base has stopped everything. */
  protected abstract release(): Promise<void>;

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    throwIfAborted(signal);
    if (this.closed) throw this.closedError();
    throwIfAborted(this.lifetime.signal);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new ImageCorruptError(`${this.name}: invalid read offset=${offset} length=${length}`);
    }
    const end = Math.min(this.size, offset + length);
    if (end <= offset) return new Uint8Array(0);
    if (end - offset < this.tuning.blockBytes) {
      // Inside a large fetch (a read-ahead of the data around it): from there, not as a block fetched again.
      const within = this.recent.find((r) => r.offset <= offset && end <= r.end);
      if (!within) return this.readCached(offset, end, signal);
      const data = await raceAbort(within.data, signal);
      return data.subarray(offset - within.offset, end - within.offset);
    }

    const parts: Array<Promise<Buffer>> = [];
    for (let pos = offset; pos < end; ) {
      const hit = this.recent.find((r) => r.offset <= pos && pos < r.end);
      if (hit) {
        if (hit.ahead) {
          hit.ahead = false;
          this.stats.readAheadHits++;
          void hit.data.then(() => this.forget(hit), () => {});
        }
        const from = pos - hit.offset;
        const to = Math.min(end, hit.end) - hit.offset;
        parts.push(hit.data.then((d) => (from === 0 && to === d.length ? d : d.subarray(from, to))));
        pos = Math.min(end, hit.end);
      } else {
        // Up to where a fetch already covers the rest.
        const next = this.recent.reduce((m, r) => (r.offset > pos && r.offset < m ? r.offset : m), end);
        parts.push(this.remember(pos, next, false));
        pos = next;
      }
    }
    // Read ahead the same length, in the background (its failure surfaces only if it is used), from where nothing covers it.
    let aheadStart = end;
    const aheadEnd = Math.min(this.size, end + (end - offset));
    for (let covering = this.recent.find((r) => r.offset <= aheadStart && aheadStart < r.end); covering; covering = this.recent.find((r) => r.offset <= aheadStart && aheadStart < r.end)) {
      aheadStart = covering.end;
    }
    if (this.tuning.readAhead && aheadEnd > aheadStart && !this.closed) this.remember(aheadStart, aheadEnd, true);
    const buffers = await raceAbort(Promise.all(parts), signal);
    return buffers.length === 1 ? (buffers[0] as Buffer) : Buffer.concat(buffers);
  }

  /** Fetches [offset, end) for whoever reads it (under the source's lifetime, not one reader's signal), kept among the recent. */
  private remember(offset: number, end: number, ahead: boolean): Promise<Buffer> {
    const data = this.fetchSplit(offset, end, this.lifetime.signal);
    const entry = { offset, end, data, ahead };
    this.recent.push(entry);
    // Kept while in flight (for readers overlapping it); once done, only a read-ahead nobody has used yet stays.
    data.then(
      () => {
        if (!entry.ahead) this.forget(entry);
      },
      () => this.forget(entry),
    );
    // A few more than can be in flight: enough for a reader's window of reads, bounded memory.
    while (this.recent.length > this.tuning.concurrency + 2) this.recent.shift();
    return data;
  }

  private async fetchSplit(offset: number, end: number, signal: AbortSignal): Promise<Buffer> {
    const pieces: Array<Promise<Buffer>> = [];
    for (let start = offset; start < end; start += this.tuning.maxRequestBytes) {
      pieces.push(this.fetch(start, Math.min(end, start + this.tuning.maxRequestBytes), signal));
    }
    const parts = await Promise.all(pieces);
    return parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts);
  }

  private async readCached(offset: number, end: number, signal: AbortSignal | undefined): Promise<Uint8Array> {
    const block = this.tuning.blockBytes;
    const first = Math.floor(offset / block);
    const last = Math.floor((end - 1) / block);
    const blocks: Array<Promise<Buffer>> = [];
    for (let i = first; i <= last; i++) blocks.push(this.block(i));
    const buffers = await raceAbort(Promise.all(blocks), signal);
    const out = Buffer.allocUnsafe(end - offset);
    buffers.forEach((data, k) => {
      const blockStart = (first + k) * block;
      const from = Math.max(offset, blockStart);
      data.copy(out, from - offset, from - blockStart, Math.min(end, blockStart + data.length) - blockStart);
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
    const pending = this.fetch(start, Math.min(this.size, start + this.tuning.blockBytes), this.lifetime.signal);
    this.cache.set(index, pending);
    pending.catch(() => {
      if (this.cache.get(index) === pending) this.cache.delete(index);
    });
    while (this.cache.size > this.tuning.cacheBlocks) this.cache.delete(this.cache.keys().next().value as number);
    return pending;
  }

  /** Bytes [start, end) under the in-flight limit, retrying transient failures (the wait holds no slot). */
  private async fetch(start: number, end: number, signal: AbortSignal): Promise<Buffer> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.limiter.run(async () => {
          if (this.closed) throw this.closedError();
          throwIfAborted(signal);
          const budget = this.tuning.maxFetchBytes;
          if (budget !== undefined && this.asked + (end - start) > budget) {
            throw new LimitExceededError(this.tuning.fetchLimitName ?? 'maxFetchBytes', this.asked + (end - start), budget, `${this.name}: reading it needs more bytes than allowed`);
          }
          this.asked += end - start;
          this.stats.requests++;
          const bytes = await this.fetchOnce(start, end, signal);
          if (bytes.length !== end - start) throw new Error(`${this.name}: asked for ${end - start} bytes at ${start}, got ${bytes.length}`);
          this.stats.bytesFetched += bytes.length;
          return bytes;
        });
      } catch (err) {
        if (attempt >= this.tuning.attempts || this.closed || signal.aborted || !this.transient(err)) throw err;
        await sleep(this.tuning.retryDelayMs * 2 ** (attempt - 1), signal);
      }
    }
  }

  private forget(entry: { offset: number; end: number; data: Promise<Buffer>; ahead: boolean }): void {
    const i = this.recent.indexOf(entry);
    if (i >= 0) this.recent.splice(i, 1);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.lifetime.abort();
    this.cache.clear();
    this.recent = [];
    await this.release();
  }
}
