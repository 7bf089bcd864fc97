/**
 * Long CPU work in the engine (hashing gigabytes of holes, walking the map of a
 * huge empty image) must not hold the event loop: a worker has to renew its
 * queue lock, take a cancel, write progress and honour SIGTERM while it runs.
 * A Pacer gives the loop a turn (setImmediate, so timers and I/O callbacks run)
 * once the current synchronous stretch has lasted `sliceMs`, and checks the
 * abort signal each time it does.
 */
import { throwIfAborted } from './errors.js';

/** Longest stretch of synchronous work between two turns of the event loop. */
export const DEFAULT_SLICE_MS = 20;

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Milliseconds on a monotonic clock (`performance.now()` would load perf_hooks at every CLI start, ~2 ms). */
function now(): number {
  const [s, ns] = process.hrtime();
  return s * 1e3 + ns / 1e6;
}

export class Pacer {
  private last = now();
  private calls = 0;

  constructor(
    private readonly signal?: AbortSignal,
    private readonly sliceMs = DEFAULT_SLICE_MS,
    /** Read the clock only every `every` calls, for loops whose steps cost nanoseconds. */
    private readonly every = 1,
  ) {}

  /** True when the caller should `await pace()` now (cheap; lets a hot loop skip the await otherwise). */
  due(): boolean {
    if (++this.calls < this.every) return false;
    this.calls = 0;
    return now() - this.last >= this.sliceMs;
  }

  /** Yields to the event loop if the slice is used up, then throws if aborted. */
  async pace(): Promise<void> {
    if (!this.due()) return;
    await this.yield();
  }

  /** Yields now, whatever the clock says. */
  async yield(): Promise<void> {
    await turn();
    this.last = now();
    throwIfAborted(this.signal);
  }
}
