/**
 * The one range-reading core behind every remote source (a URL read by HTTP
 * range requests, an S3 object read by ranged GETs): a subclass says how to
 * fetch bytes [start, end) once; this class decides what to fetch and when.
 * - small reads (headers, tables) come from a bounded LRU of aligned blocks, and
 *   concurrent readers of one block share one request (coalescing);
 * - large reads (the reader's coalesced data runs) are split into requests of at
 *   most `maxRequestBytes`, at most `concurrency` in flight for the whole source;
 * - ranges the reader announces (willRead: the file ranges of the batches it
 *   has cut from the image's map, in the order it will read them) are fetched
 *   ahead in that order, touching ones in one request, several in flight, up to
 *   `aheadBytes` held until they are read: the read-ahead follows the map, and
 *   every announced byte is fetched once, however the image orders its data;
 * - without announcements, a large read starts a read-ahead of the same length
 *   after it (when `readAhead`), which the next sequential read picks up;
 * - a large read overlapping a large fetch in flight or just done (a
 *   read-ahead, or another reader's) takes those bytes from it: a reader with
 *   several reads in flight never has one range fetched twice;
 * - a failed request is retried when the subclass calls the failure transient.
 * It knows nothing of HTTP or S3.
 */
import { alignedBuffer } from './aligned.js';
import { AbortedError, ImageCorruptError, LimitExceededError, throwIfAborted } from './errors.js';
import { allSettledOrThrow } from './settle.js';
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
  /** Read the same length again after each large read, in the background (until ranges are announced: willRead). */
  readAhead: boolean;
  /** Most bytes of announced ranges (willRead) fetched ahead and not yet read (memory bound, capped at the source's size; one range may exceed it). */
  aheadBytes: number;
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
  aheadBytes: 32 * 2 ** 20,
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
  /** Reads served (wholly or partly) by the fetch of an announced range (willRead). */
  announcedHits: number;
}

/** A fetch of announced ranges (one request for touching ones), held until each of them has been read. */
interface AheadFetch {
  start: number;
  end: number;
  /** Where its bytes land: a region of the ring, or memory of its own (out of turn, when the ring is full). */
  memory: Uint8Array;
  region: RingRegion | undefined;
  /** Settles when `memory` holds the bytes (or the fetch failed). */
  done: Promise<unknown>;
  settled: boolean;
  /** The announced ranges not yet read, flat: [start0, end0, start1, end1, ...]. */
  unread: number[];
  /** Reads copying out of `memory` now. */
  copying: number;
  /** Out of `ahead`: no read will look for it any more. */
  retired: boolean;
}

interface RingRegion {
  at: number;
  length: number;
  free: boolean;
}

/**
 * The memory of the announced fetches: one buffer handed out in order as a ring,
 * each region given back once its bytes have been read (mostly in the same order;
 * a region given back early waits for those before it). Fixed memory, no garbage
 * per request.
 */
class Ring {
  private memory: Buffer | undefined;
  /** Live regions, oldest first. */
  private readonly regions: RingRegion[] = [];
  constructor(readonly size: number) {}

  get empty(): boolean {
    return this.regions.length === 0;
  }

  /** Bytes of memory it holds (none until the first region is taken). */
  get allocated(): number {
    return this.memory?.length ?? 0;
  }

  /** A region of `length` bytes, or undefined when the ring has no such room now. */
  take(length: number): { region: RingRegion; memory: Uint8Array } | undefined {
    if (length > this.size || length <= 0) return undefined;
    // Page-mapped memory of its own (not malloc's): given back to the kernel whole once the source is gone,
    // where a malloc'd ring under glibc's raised mmap threshold stayed in the heap, job after job.
    this.memory ??= alignedBuffer(this.size);
    const first = this.regions[0];
    const last = this.regions[this.regions.length - 1];
    let at: number | undefined;
    if (!first || !last) at = 0;
    else {
      const head = last.at + last.length;
      if (last.at >= first.at) {
        // Not wrapped: room after the newest, else before the oldest.
        if (this.size - head >= length) at = head;
        else if (first.at >= length) at = 0;
      } else if (first.at - head >= length) at = head;
    }
    if (at === undefined) return undefined;
    const region = { at, length, free: false };
    this.regions.push(region);
    return { region, memory: this.memory.subarray(at, at + length) };
  }

  give(region: RingRegion): void {
    region.free = true;
    while (this.regions[0]?.free) this.regions.shift();
  }
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

/** Flat ranges [s0, e0, s1, e1, ...] less [from, to). */
function unreadAfter(unread: number[], from: number, to: number): number[] {
  const left: number[] = [];
  for (let i = 0; i < unread.length; i += 2) {
    const s = unread[i] as number;
    const e = unread[i + 1] as number;
    if (e <= from || s >= to) left.push(s, e);
    else {
      if (s < from) left.push(s, from);
      if (e > to) left.push(to, e);
    }
  }
  return left;
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
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
  readonly stats: RangedSourceStats = { requests: 0, bytesFetched: 0, readAheadHits: 0, announcedHits: 0 };
  /** Announced ranges not yet fetched, in the order announced (from `planHead` on), touching ones joined. */
  private plan: Array<{ start: number; end: number; unread: number[] }> = [];
  private planHead = 0;
  /** Fetches of announced ranges, in flight or done, with ranges still to be read. */
  private ahead: AheadFetch[] = [];
  private ring: Ring;
  private aheadInFlight = 0;
  /** Set by the first announcement: from then on the file-order read-ahead is off. */
  private announced = false;
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
    this.ring = new Ring(this.aheadRingBytes());
    if (ownerSignal) {
      if (ownerSignal.aborted) this.lifetime.abort();
      else ownerSignal.addEventListener('abort', () => this.lifetime.abort(), { once: true });
    }
  }

  /** The announced-read ring's size: the tuning's bound, but never more than the source (a small image needs no 32 MiB ring). */
  private aheadRingBytes(): number {
    return Math.max(0, Math.min(this.tuning.aheadBytes, this.size));
  }

  /** Bytes the announced-read ring holds now (memory, whether or not in use): at most min(aheadBytes, size). */
  get aheadMemoryBytes(): number {
    return this.ring.allocated;
  }

  /**
   * Bytes [start, end) in one request (or a few, for a short answer); exactly end - start bytes,
   * written into `target` when one is given (where the subclass can; else the base copies them there).
   */
  protected abstract fetchOnce(start: number, end: number, signal: AbortSignal, target?: Uint8Array): Promise<Uint8Array>;
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
    if (this.announced && this.aheadOverlapping(offset, end)) {
      const out = Buffer.allocUnsafe(end - offset);
      await this.copyAnnounced(out, offset, end, signal);
      return out;
    }
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
    if (this.tuning.readAhead && !this.announced && aheadEnd > aheadStart && !this.closed) this.remember(aheadStart, aheadEnd, true);
    const buffers = await raceAbort(Promise.all(parts), signal);
    return buffers.length === 1 ? (buffers[0] as Buffer) : Buffer.concat(buffers);
  }

  /** Fills `target` from `offset`: announced ranges are copied out of their fetch, the rest fetched straight into it. */
  async readInto(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number> {
    throwIfAborted(signal);
    if (this.closed) throw this.closedError();
    throwIfAborted(this.lifetime.signal);
    if (!Number.isSafeInteger(offset) || offset < 0) throw new ImageCorruptError(`${this.name}: invalid read offset=${offset} length=${target.length}`);
    const end = Math.min(this.size, offset + target.length);
    if (end <= offset) return 0;
    if (this.announced && this.aheadOverlapping(offset, end)) {
      await this.copyAnnounced(target, offset, end, signal);
      return end - offset;
    }
    const bytes = await this.read(offset, end - offset, signal);
    target.set(bytes);
    return bytes.length;
  }

  willRead(start: number, end: number): void {
    end = Math.min(end, this.size);
    if (this.closed || !Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end <= start) return;
    this.announced = true;
    const last = this.plan.length > this.planHead ? this.plan[this.plan.length - 1] : undefined;
    // Touching ranges (runs the reader split at its batch or read bounds) go in one request.
    if (last && last.end === start && end - last.start <= this.tuning.maxRequestBytes) {
      last.end = end;
      last.unread.push(start, end);
    } else {
      this.plan.push({ start, end, unread: [start, end] });
    }
    this.pump();
  }

  /** Starts fetches of announced ranges, in order, while a request slot and room in the ring allow. */
  private pump(): void {
    while (!this.closed && this.planHead < this.plan.length && this.aheadInFlight < this.tuning.concurrency) {
      const next = this.plan[this.planHead] as { start: number; end: number; unread: number[] };
      const room = this.ring.take(next.end - next.start);
      // A range larger than the whole ring is fetched on its own once the ring is empty.
      if (!room && !(this.ring.empty && next.end - next.start > this.ring.size)) return;
      this.planHead++;
      this.startAhead(next, room);
    }
    if (this.planHead > 1024 && this.planHead * 2 > this.plan.length) {
      this.plan = this.plan.slice(this.planHead);
      this.planHead = 0;
    }
  }

  private startAhead(range: { start: number; end: number; unread: number[] }, room: { region: RingRegion; memory: Uint8Array } | undefined): AheadFetch {
    const memory = room?.memory ?? Buffer.allocUnsafe(range.end - range.start);
    const fetch: AheadFetch = { start: range.start, end: range.end, unread: range.unread, memory, region: room?.region, done: Promise.resolve(), settled: false, copying: 0, retired: false };
    this.ahead.push(fetch);
    this.aheadInFlight++;
    fetch.done = this.fetchAround(range.start, range.end, memory).then(
      () => {
        fetch.settled = true;
        this.aheadInFlight--;
        this.giveBack(fetch);
        this.pump();
      },
      (err: unknown) => {
        // Later reads of these ranges fetch them again (with their own retries) and see the error if it lasts.
        fetch.settled = true;
        this.aheadInFlight--;
        this.retire(fetch);
        this.giveBack(fetch);
        this.pump();
        throw err;
      },
    );
    fetch.done.catch(() => {}); // surfaced to the reads that wait for it
    return fetch;
  }

  /**
   * [start, end) into `memory`: the parts in cached blocks (a table read beside the data, or a block
   * of data read before it was announced) copied from them, only the rest fetched.
   */
  private async fetchAround(start: number, end: number, memory: Uint8Array): Promise<void> {
    const block = this.tuning.blockBytes;
    const parts: Array<Promise<unknown>> = [];
    let gap = start;
    if (this.cache.size > 0) {
      for (let i = Math.floor(start / block); i * block < end; i++) {
        const cached = this.cache.get(i);
        if (!cached) continue;
        const from = Math.max(start, i * block);
        const to = Math.min(end, (i + 1) * block);
        if (gap < from) parts.push(this.fetchSplit(gap, from, this.lifetime.signal, memory.subarray(gap - start, from - start)));
        parts.push(cached.then((data) => memory.set(data.subarray(from - i * block, to - i * block), from - start)));
        gap = to;
      }
    }
    if (gap < end) parts.push(this.fetchSplit(gap, end, this.lifetime.signal, memory.subarray(gap - start, end - start)));
    await allSettledOrThrow(parts);
  }

  /** No read will look for `fetch` any more. */
  private retire(fetch: AheadFetch): void {
    if (fetch.retired) return;
    fetch.retired = true;
    const i = this.ahead.indexOf(fetch);
    if (i >= 0) this.ahead.splice(i, 1);
  }

  /** Gives a fetch's memory back to the ring once it is retired, settled and nobody copies out of it. */
  private giveBack(fetch: AheadFetch): void {
    if (!fetch.retired || !fetch.settled || fetch.copying > 0 || !fetch.region) return;
    this.ring.give(fetch.region);
    fetch.region = undefined;
    this.pump();
  }

  /** Whether [offset, end) overlaps an announced range, fetched or not. */
  private aheadOverlapping(offset: number, end: number): boolean {
    if (this.ahead.some((f) => f.start < end && offset < f.end)) return true;
    for (let i = this.planHead; i < this.plan.length; i++) {
      const p = this.plan[i] as { start: number; end: number };
      if (p.start < end && offset < p.end) return true;
    }
    return false;
  }

  /**
   * Fills `target` with [offset, end), a read that meets announced ranges: their bytes are copied out
   * of the fetch of them (started now, out of turn, when the ring has not reached them yet), the rest
   * fetched straight into `target`. The announced ranges it covers are then read: once all of a
   * fetch's are, its memory goes back to the ring.
   */
  private async copyAnnounced(target: Uint8Array, offset: number, end: number, signal: AbortSignal | undefined): Promise<void> {
    const parts: Array<Promise<unknown>> = [];
    for (let pos = offset; pos < end; ) {
      let hit = this.ahead.find((f) => f.start <= pos && pos < f.end);
      if (!hit) {
        for (let i = this.planHead; i < this.plan.length; i++) {
          const p = this.plan[i] as { start: number; end: number; unread: number[] };
          if (p.start <= pos && pos < p.end) {
            this.plan.splice(i, 1);
            hit = this.startAhead(p, this.ring.take(p.end - p.start));
            break;
          }
        }
      }
      if (hit) {
        const fetch = hit;
        const from = pos;
        const to = Math.min(end, fetch.end);
        fetch.copying++;
        this.stats.announcedHits++;
        parts.push(
          fetch.done
            .then(() => target.set(fetch.memory.subarray(from - fetch.start, to - fetch.start), from - offset))
            .finally(() => {
              fetch.copying--;
              this.giveBack(fetch);
            }),
        );
        pos = to;
        continue;
      }
      // Not announced: up to where an announced range begins.
      let next = end;
      for (const f of this.ahead) if (f.start > pos && f.start < next) next = f.start;
      for (let i = this.planHead; i < this.plan.length; i++) {
        const p = this.plan[i] as { start: number };
        if (p.start > pos && p.start < next) next = p.start;
      }
      parts.push(this.fetchSplit(pos, next, this.lifetime.signal, target.subarray(pos - offset, next - offset)));
      pos = next;
    }
    // Read, in every fetch and announcement it overlaps: ranges that overlap without touching (a compressed
    // cluster's upper-bound read reaching into the next batch's first one) are each used up.
    for (const fetch of this.ahead.filter((f) => f.start < end && offset < f.end)) this.markRead(fetch, Math.max(offset, fetch.start), Math.min(end, fetch.end));
    for (let i = this.plan.length - 1; i >= this.planHead; i--) {
      const p = this.plan[i] as { start: number; end: number; unread: number[] };
      if (p.start >= end || offset >= p.end) continue;
      p.unread = unreadAfter(p.unread, offset, end);
      if (p.unread.length === 0) this.plan.splice(i, 1);
    }
    await raceAbort(Promise.all(parts), signal);
  }

  /** The bytes [from, to) of `fetch`'s announced ranges have been read; a fetch with none left is retired. */
  private markRead(fetch: AheadFetch, from: number, to: number): void {
    fetch.unread = unreadAfter(fetch.unread, from, to);
    if (fetch.unread.length === 0) {
      this.retire(fetch);
      // A fetch used up by a read that copied nothing from it (it lay inside another's range) has no copy
      // to give its room back when it ends: give it back here, or the ring stays taken from this region on.
      this.giveBack(fetch);
    }
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

  /** [offset, end) in requests of at most maxRequestBytes; into `target` when given (then it is what is returned). */
  private async fetchSplit(offset: number, end: number, signal: AbortSignal, target?: Uint8Array): Promise<Buffer> {
    const pieces: Array<Promise<Buffer>> = [];
    for (let start = offset; start < end; start += this.tuning.maxRequestBytes) {
      const stop = Math.min(end, start + this.tuning.maxRequestBytes);
      pieces.push(this.fetch(start, stop, signal, target?.subarray(start - offset, stop - offset)));
    }
    // Into a target, every piece must have stopped writing before a failure is given: the caller may hand
    // the memory to another fetch (the ring) as soon as this rejects.
    const parts = target ? await allSettledOrThrow(pieces) : await Promise.all(pieces);
    if (target) return asBuffer(target);
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
  private async fetch(start: number, end: number, signal: AbortSignal, target?: Uint8Array): Promise<Buffer> {
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
          const bytes = await this.fetchOnce(start, end, signal, target);
          if (bytes.length !== end - start) throw new Error(`${this.name}: asked for ${end - start} bytes at ${start}, got ${bytes.length}`);
          this.stats.bytesFetched += bytes.length;
          if (!target) return asBuffer(bytes);
          if (bytes.buffer !== target.buffer || bytes.byteOffset !== target.byteOffset) target.set(bytes);
          return asBuffer(target);
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
    this.plan = [];
    this.planHead = 0;
    this.ahead = [];
    this.ring = new Ring(this.aheadRingBytes());
    await this.release();
  }
}
