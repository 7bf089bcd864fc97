/**
 * A source decorator that caps read bandwidth (WORKER_READ_BYTES_PER_SECOND), so a
 * worker on a shared machine or shared storage does not starve its neighbours.
 * Wraps any RandomAccessSource without touching format code.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { AbortedError, type RandomAccessSource } from '../engine/index.js';

export class ThrottledSource implements RandomAccessSource {
  private nextFree = 0;
  constructor(
    private readonly inner: RandomAccessSource,
    private readonly bytesPerSecond: number,
  ) {
    const ahead = inner.willRead?.bind(inner);
    if (ahead) this.willRead = ahead;
  }

  /** The inner source's, when it has one: a throttled URL import still fetches what the reader announces. */
  readonly willRead?: (start: number, end: number) => void;

  get size(): number {
    return this.inner.size;
  }
  get name(): string {
    return this.inner.name;
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    // Reserve this read's share of time; concurrent reads queue behind each other.
    const now = Date.now();
    const start = Math.max(now, this.nextFree);
    this.nextFree = start + (1000 * length) / this.bytesPerSecond;
    const wait = start - now;
    if (wait > 0) {
      try {
        await sleep(wait, undefined, signal ? { signal } : undefined);
      } catch {
        throw new AbortedError();
      }
    }
    return this.inner.read(offset, length, signal);
  }

  allocatedSize(): Promise<number | undefined> {
    return this.inner.allocatedSize?.() ?? Promise.resolve(undefined);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
