/**
 * ThrottledSource (WORKER_READ_BYTES_PER_SECOND): reads are paced, and what the
 * reader announces still reaches a source that fetches ahead.
 */
import { describe, expect, it } from 'vitest';
import { BufferSource } from '../../src/engine/index.js';
import { ThrottledSource } from '../../src/queue/throttle.js';

class Announced extends BufferSource {
  readonly announced: Array<[number, number]> = [];
  willRead(start: number, end: number): void {
    this.announced.push([start, end]);
  }
}

describe('ThrottledSource', () => {
  it('passes announcements on to a source that fetches ahead, and has none over one that does not', async () => {
    const inner = new Announced(Buffer.alloc(4096, 1), 'x');
    const throttled = new ThrottledSource(inner, 1 << 30);
    throttled.willRead?.(10, 20);
    expect(inner.announced).toEqual([[10, 20]]);
    expect(Buffer.from(await throttled.read(0, 8)).equals(Buffer.alloc(8, 1))).toBe(true);
    expect(new ThrottledSource(new BufferSource(Buffer.alloc(10), 'y'), 1 << 30).willRead).toBeUndefined();
  });
});
