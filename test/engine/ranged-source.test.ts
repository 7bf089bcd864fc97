/**
 * The shared range-reading core (src/engine/ranged-source.ts) on its own: a
 * subclass over bytes in memory that records every fetch, so coalescing, the
 * in-flight limit, read-ahead, retries, the byte budget and the Limiter's abort
 * are seen directly. (HTTP and S3 run it for real in test/net and test/store.)
 */
import { describe, expect, it } from 'vitest';
import { AbortedError, LimitExceededError, SourceUnavailableError } from '../../src/engine/errors.js';
import { Limiter, RangedSource, type RangedSourceTuning } from '../../src/engine/ranged-source.js';
import { seededBytes } from '../helpers/qemu.js';

class MemorySource extends RangedSource {
  readonly fetches: Array<[number, number]> = [];
  active = 0;
  mostActive = 0;
  failures = 0;
  constructor(
    private readonly data: Buffer,
    tuning: Partial<RangedSourceTuning>,
  ) {
    super(data.length, 'memory', tuning);
  }
  protected async fetchOnce(start: number, end: number): Promise<Buffer> {
    this.fetches.push([start, end]);
    this.active++;
    this.mostActive = Math.max(this.mostActive, this.active);
    try {
      await new Promise((r) => setImmediate(r));
      if (this.failures > 0) {
        this.failures--;
        throw new SourceUnavailableError('dropped');
      }
      return Buffer.from(this.data.subarray(start, end));
    } finally {
      this.active--;
    }
  }
  protected transient(err: unknown): boolean {
    return err instanceof SourceUnavailableError;
  }
  protected closedError(): Error {
    return new SourceUnavailableError('closed');
  }
  protected async release(): Promise<void> {}
}

const data = seededBytes(8 << 20, 3);

describe('RangedSource', () => {
  it('coalesces concurrent small reads of one block into one fetch and serves later ones from the cache', async () => {
    const s = new MemorySource(data, {});
    const reads = await Promise.all([0, 10, 4096, 100_000].map((o) => s.read(o, 64)));
    reads.forEach((b, i) => {
      const o = [0, 10, 4096, 100_000][i] as number;
      expect(Buffer.from(b).equals(data.subarray(o, o + 64))).toBe(true);
    });
    expect(s.fetches).toEqual([[0, 256 * 1024]]);
    await s.read(200, 10);
    expect(s.fetches.length).toBe(1);
  });

  it('splits large reads, keeps at most `concurrency` in flight, and reads ahead for the next sequential read', async () => {
    const s = new MemorySource(data, { maxRequestBytes: 256 * 1024, concurrency: 2 });
    expect(Buffer.from(await s.read(1 << 20, 1 << 20)).equals(data.subarray(1 << 20, 2 << 20))).toBe(true);
    expect(Buffer.from(await s.read(2 << 20, 1 << 20)).equals(data.subarray(2 << 20, 3 << 20))).toBe(true);
    expect(s.stats.readAheadHits).toBe(1);
    expect(s.mostActive).toBe(2);
    expect(s.fetches.every(([a, b]) => b - a <= 256 * 1024)).toBe(true);
    const off = new MemorySource(data, { readAhead: false });
    await off.read(1 << 20, 1 << 20);
    await off.read(2 << 20, 1 << 20);
    expect(off.stats.readAheadHits).toBe(0);
    expect(off.fetches).toEqual([
      [1 << 20, 2 << 20],
      [2 << 20, 3 << 20],
    ]);
  });

  it('retries transient failures up to `attempts`, then gives the failure', async () => {
    const s = new MemorySource(data, { attempts: 3, retryDelayMs: 1, readAhead: false });
    s.failures = 2;
    expect(Buffer.from(await s.read(0, 1 << 20)).equals(data.subarray(0, 1 << 20))).toBe(true);
    expect(s.fetches.length).toBe(3);
    s.failures = 3;
    await expect(s.read(4 << 20, 1 << 20)).rejects.toBeInstanceOf(SourceUnavailableError);
    expect(s.fetches.length).toBe(6);
  });

  it('stops at the byte budget with LIMIT_EXCEEDED naming it', async () => {
    const s = new MemorySource(data, { maxFetchBytes: 1 << 20, fetchLimitName: 'INSPECT_MAX_BYTES', readAhead: false });
    await s.read(0, 512 * 1024);
    const err = await s.read(1 << 20, 1 << 20).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LimitExceededError);
    expect(err).toMatchObject({ limit: 'INSPECT_MAX_BYTES', maximum: 1 << 20 });
    expect(s.stats.bytesFetched).toBe(512 * 1024);
  });

  it('refuses reads after close and bad offsets', async () => {
    const s = new MemorySource(data, {});
    await expect(s.read(-1, 10)).rejects.toMatchObject({ code: 'IMAGE_CORRUPT' });
    expect((await s.read(data.length, 10)).length).toBe(0);
    await s.close();
    await expect(s.read(0, 10)).rejects.toThrow(/closed/);
  });
});

describe('Limiter', () => {
  it('hands out slots in order, and a waiter whose signal aborts leaves the queue', async () => {
    const limiter = new Limiter(1);
    const first = await limiter.acquire();
    const controller = new AbortController();
    const aborted = limiter.acquire(controller.signal);
    let secondGot = false;
    const second = limiter.acquire().then((release) => {
      secondGot = true;
      return release;
    });
    controller.abort();
    await expect(aborted).rejects.toBeInstanceOf(AbortedError);
    expect(secondGot).toBe(false);
    first();
    first(); // a second call gives nothing back twice
    const release = await second;
    expect(secondGot).toBe(true);
    release();
    const third = await limiter.acquire();
    third();
  });
});
