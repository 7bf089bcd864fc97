/**
 * Long conversions of holes never pin the event loop (issue 11): hashing the
 * zeros of a huge empty image runs in slices with turns of the loop between them,
 * so timers fire (a worker's lock renewal, progress, /healthz) and an abort is
 * taken within a slice, not after the whole hole (about 0.7-0.9 s per GiB).
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AbortedError, FileSource, convertToRaw, hashZeros, openImage } from '../../src/engine/index.js';
import { CountingSink } from '../fuzz/counting-sink.js';
import { makeTempDir, qemuImg } from '../helpers/qemu.js';

describe('conversion of huge holes', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-yield-'));
  });
  afterAll(async () => cleanup());

  it('hashes zeros in slices: the same digest as one buffer of zeros, with timers firing between slices', async () => {
    const length = 96 * 2 ** 20 + 12345;
    const hash = createHash('sha256');
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    const slices: number[] = [];
    await hashZeros(hash, length, { onSlice: (done) => slices.push(done) });
    clearInterval(timer);
    expect(hash.digest('hex')).toBe(createHash('sha256').update(Buffer.alloc(length)).digest('hex'));
    expect(slices.at(-1)).toBe(length);
    expect(slices.length).toBeGreaterThan(1);
    // Sliced work alone would leave timers starved until the end; here they ran meanwhile.
    expect(ticks).toBeGreaterThan(0);
  });

  it('a 32 GiB empty qcow2 keeps the event loop turning and stops on abort', async () => {
    const path = join(dir, 'empty-32g.qcow2');
    await qemuImg('create', '-f', 'qcow2', path, '32G');
    const source = await FileSource.open(path);
    const image = await openImage(source, { format: 'auto', limits: { maxVirtualSize: 2 ** 50 } });
    const controller = new AbortController();
    let ticks = 0;
    const timer = setInterval(() => {
      ticks++;
      if (ticks === 20) controller.abort();
    }, 10);
    const progress: number[] = [];
    try {
      // Whole, this is about half a minute of sha256 in one hole; it must give way to the interval and then stop.
      await expect(
        convertToRaw(image, source, new CountingSink(), { sha256: true, signal: controller.signal, progressIntervalMs: 0, onProgress: (p) => progress.push(p.bytesDone) }),
      ).rejects.toBeInstanceOf(AbortedError);
    } finally {
      clearInterval(timer);
      await image.close();
      await source.close();
    }
    expect(ticks).toBeGreaterThanOrEqual(20);
    // Progress moves inside the one hole, not only at its end.
    expect(progress.some((done) => done > 0 && done < 32 * 2 ** 30)).toBe(true);
  }, 120_000);
});
