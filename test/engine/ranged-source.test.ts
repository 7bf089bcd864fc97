/**
 * The shared range-reading core (src/engine/ranged-source.ts) on its own: a
 * subclass over bytes in memory that records every fetch, so coalescing, the
 * in-flight limit, read-ahead, retries, the byte budget and the Limiter's abort
 * are seen directly. (HTTP and S3 run it for real in test/net and test/store.)
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AbortedError, LimitExceededError, SourceUnavailableError } from '../../src/engine/errors.js';
import { openImage } from '../../src/engine/open.js';
import { Limiter, RangedSource, type RangedSourceTuning } from '../../src/engine/ranged-source.js';
import { readExtents } from '../../src/engine/reader.js';
import { makeTempDir, qemuImg, qemuIo, seededBytes } from '../helpers/qemu.js';

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
/** Lets fetches in flight (each a setImmediate here) land. */
const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 20));

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

  it('fetches announced ranges ahead, in the order announced, touching ones in one request, within aheadBytes', async () => {
    const s = new MemorySource(data, { aheadBytes: 1 << 20, concurrency: 1 });
    const M = 1 << 20;
    // Out of file order, as an image whose data lies backwards would be read.
    s.willRead(3 * M, 3 * M + 300_000);
    s.willRead(3 * M + 300_000, 3 * M + 600_000);
    s.willRead(3 * M + 600_000, 3 * M + 900_000); // touches the one before: the same request
    s.willRead(M, M + 700_000);
    s.willRead(5 * M, 5 * M + 100_000);
    await tick();
    // The first two requests fit the 1 MiB; the third waits for room; no read-ahead in the file's order.
    expect(s.fetches).toEqual([
      [3 * M, 3 * M + 300_000],
      [3 * M + 300_000, 3 * M + 900_000],
    ]);
    const target = new Uint8Array(300_000);
    expect(await s.readInto(target, 3 * M)).toBe(300_000);
    expect(Buffer.from(target).equals(data.subarray(3 * M, 3 * M + 300_000))).toBe(true);
    expect(Buffer.from(await s.read(3 * M + 300_000, 300_000)).equals(data.subarray(3 * M + 300_000, 3 * M + 600_000))).toBe(true);
    await tick();
    expect(s.fetches.length).toBe(2); // a third of the second request is still to be read: its memory is held
    expect(Buffer.from(await s.read(3 * M + 600_000, 300_000)).equals(data.subarray(3 * M + 600_000, 3 * M + 900_000))).toBe(true);
    await tick();
    expect(s.fetches.slice(2)).toEqual([
      [M, M + 700_000],
      [5 * M, 5 * M + 100_000],
    ]);
    // A read beyond what was announced fetches only the rest; nothing announced is fetched again.
    expect(Buffer.from(await s.read(5 * M, 200_000)).equals(data.subarray(5 * M, 5 * M + 200_000))).toBe(true);
    expect(Buffer.from(await s.read(M, 700_000)).equals(data.subarray(M, M + 700_000))).toBe(true);
    expect(s.fetches.slice(4)).toEqual([[5 * M + 100_000, 5 * M + 200_000]]);
    expect(s.stats.readAheadHits).toBe(0);
  });

  it('uses up announced ranges that overlap without touching, so their room comes back', async () => {
    const s = new MemorySource(data, { aheadBytes: 600_000, concurrency: 1 });
    // A compressed cluster's upper-bound read reaching into the next one, announced in two batches.
    s.willRead(0, 300_000);
    s.willRead(200_000, 500_000);
    await tick();
    expect(Buffer.from(await s.read(200_000, 300_000)).equals(data.subarray(200_000, 500_000))).toBe(true);
    expect(Buffer.from(await s.read(0, 300_000)).equals(data.subarray(0, 300_000))).toBe(true);
    // Both are read: the whole window is free for what comes next.
    s.willRead(1 << 20, (1 << 20) + 550_000);
    await tick();
    expect(s.fetches.at(-1)).toEqual([1 << 20, (1 << 20) + 550_000]);
    expect(Buffer.from(await s.read(1 << 20, 550_000)).equals(data.subarray(1 << 20, (1 << 20) + 550_000))).toBe(true);
  });

  it('gives back the room of an announced range used up inside another, so read-ahead goes on', async () => {
    const s = new MemorySource(data, { aheadBytes: 600_000, concurrency: 2 });
    // The second lies wholly inside the first (two guest clusters on one host cluster, say): a read of the
    // first copies nothing from the second's fetch, but uses it up.
    s.willRead(0, 300_000);
    s.willRead(100_000, 200_000);
    await tick();
    expect(Buffer.from(await s.read(0, 300_000)).equals(data.subarray(0, 300_000))).toBe(true);
    await tick();
    s.willRead(1 << 20, (1 << 20) + 550_000);
    await tick();
    // Fetched ahead: the ring has all its room again (before, the inner fetch's region stayed taken).
    expect(s.fetches.at(-1)).toEqual([1 << 20, (1 << 20) + 550_000]);
    expect(Buffer.from(await s.read(1 << 20, 550_000)).equals(data.subarray(1 << 20, (1 << 20) + 550_000))).toBe(true);
  });

  it('does not hand the memory of an announced fetch on while a piece of it is still arriving after another failed', async () => {
    const K = 256 * 1024;
    // The first piece of [0, 2K) fails at once, the second lands 60 ms later: its bytes must not land in
    // memory the ring has meanwhile given to the next announced range.
    class LatePieceSource extends MemorySource {
      protected override async fetchOnce(start: number, end: number): Promise<Buffer> {
        if (start === 0) {
          this.fetches.push([start, end]);
          throw new SourceUnavailableError('dropped');
        }
        if (start === K) await new Promise((r) => setTimeout(r, 60));
        return super.fetchOnce(start, end);
      }
    }
    const s = new LatePieceSource(data, { aheadBytes: 2 * K, maxRequestBytes: K, concurrency: 4, attempts: 1 });
    s.willRead(0, 2 * K);
    await tick();
    s.willRead(1 << 20, (1 << 20) + 2 * K);
    await new Promise((r) => setTimeout(r, 150));
    expect(Buffer.from(await s.read(1 << 20, 2 * K)).equals(data.subarray(1 << 20, (1 << 20) + 2 * K))).toBe(true);
  });

  it('takes from cached blocks what it has, and fetches again an announced range whose fetch failed', async () => {
    const s = new MemorySource(data, { attempts: 1, concurrency: 4 });
    // A table read beside the data: its block is cached, and the data announced next is not fetched twice.
    expect(Buffer.from(await s.read(100, 64)).equals(data.subarray(100, 164))).toBe(true);
    s.willRead(64 * 1024, 1 << 20);
    expect(Buffer.from(await s.read(64 * 1024, (1 << 20) - 64 * 1024)).equals(data.subarray(64 * 1024, 1 << 20))).toBe(true);
    expect(s.fetches).toEqual([
      [0, 256 * 1024],
      [256 * 1024, 1 << 20],
    ]);
    s.failures = 1;
    s.willRead(2 << 20, 3 << 20);
    await tick();
    expect(Buffer.from(await s.read(2 << 20, 1 << 20)).equals(data.subarray(2 << 20, 3 << 20))).toBe(true);
    expect(s.fetches.slice(2)).toEqual([
      [2 << 20, 3 << 20],
      [2 << 20, 3 << 20],
    ]);
  });

  it('is told by the reader what it will read, along the map: an image whose data lies backwards in the file is fetched once', async () => {
    const { dir, cleanup } = await makeTempDir('diskconv-ranged-');
    try {
      // qemu-io writes from the last guest offset to the first: clusters (and L2 tables) lie in the file in that order.
      const path = join(dir, 'backwards.qcow2');
      await qemuImg('create', '-f', 'qcow2', path, '256M');
      const writes: string[] = [];
      for (let i = 11; i >= 0; i--) writes.push('-c', `write -P ${i + 1} ${i * 19 + 1}M 1M`);
      for (let i = 31; i >= 0; i--) writes.push('-c', `write -P 0x5a ${230 * 1024 + i * 48 + 12}k 20k`);
      await qemuIo(...writes, path);
      const file = await readFile(path);
      const s = new MemorySource(file, {});
      const image = await openImage(s, { format: 'qcow2' });
      let guest = 0;
      for await (const extent of readExtents(image, s)) guest += extent.length;
      expect(guest).toBe(256 * 2 ** 20);
      // No byte of the file fetched twice.
      const sorted = [...s.fetches].sort((a, b) => a[0] - b[0]);
      const overlaps = sorted.filter(([start], i) => i > 0 && start < (sorted[i - 1] as [number, number])[1]);
      expect(overlaps, JSON.stringify(sorted)).toEqual([]);
      expect(s.stats.bytesFetched).toBeLessThanOrEqual(file.length);
      expect(s.stats.announcedHits).toBeGreaterThan(0);
      await image.close?.();
    } finally {
      await cleanup();
    }
  });

  it('refuses reads after close and bad offsets', async () => {
    const s = new MemorySource(data, {});
    await expect(s.read(-1, 10)).rejects.toMatchObject({ code: 'IMAGE_CORRUPT' });
    expect((await s.read(data.length, 10)).length).toBe(0);
    await s.close();
    await expect(s.read(0, 10)).rejects.toThrow(/closed/);
  });
});

describe('RangedSource memory', () => {
  it('holds an announced-read ring no larger than the source, and reads the same bytes through it', async () => {
    const small = data.subarray(0, 3 * 2 ** 20 + 12_345);
    const s = new MemorySource(small, {}); // the default aheadBytes (32 MiB) is more than the whole source
    expect(s.aheadMemoryBytes).toBe(0); // nothing until the first announcement is fetched
    s.willRead(0, 2 ** 20);
    s.willRead(2 * 2 ** 20, small.length);
    const first = await s.read(0, 2 ** 20);
    const second = Buffer.alloc(small.length - 2 * 2 ** 20);
    await s.readInto(second, 2 * 2 ** 20);
    expect(Buffer.compare(first, small.subarray(0, 2 ** 20))).toBe(0);
    expect(Buffer.compare(second, small.subarray(2 * 2 ** 20))).toBe(0);
    expect(s.stats.announcedHits).toBe(2);
    expect(s.aheadMemoryBytes).toBeGreaterThan(0);
    expect(s.aheadMemoryBytes).toBeLessThanOrEqual(small.length);
    await s.close();
  });

  it('keeps the ring at aheadBytes when the source is larger', async () => {
    const s = new MemorySource(data, { aheadBytes: 2 ** 20 });
    s.willRead(0, 512 * 1024);
    expect(Buffer.compare(await s.read(0, 512 * 1024), data.subarray(0, 512 * 1024))).toBe(0);
    expect(s.aheadMemoryBytes).toBe(2 ** 20);
    await s.close();
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
