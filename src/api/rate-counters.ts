/**
 * The rate limit's counters (a store for @fastify/rate-limit): counted in this
 * API process first and settled with Redis in batches, so a status poll does not
 * wait for a Redis round trip of its own while several API processes still share
 * one count per token (or address) and window.
 *
 * Each counter (route + token or address) is Redis's fixed window, the key and
 * INCR/PEXPIRE semantics of @fastify/rate-limit's own Redis store (so old and new
 * processes share counts). Here a process:
 * - settles a counter with Redis before it answers the first request it sees of
 *   that counter in a window, so it starts from the shared count;
 * - then admits requests on its own count (what Redis said at the last settle plus
 *   what it admitted since) while that stays under the limit and it has admitted
 *   fewer than `localAllowance` of them since the last settle
 *   (RATE_LIMIT_LOCAL_PERCENT of the limit, rounded down); past that, a request
 *   waits for the next settle and is counted by Redis, as with a plain Redis store;
 * - refuses on its own count once that reaches the limit (no round trip);
 * - sends what it admitted every `settleMs` (RATE_LIMIT_SETTLE_MS), all counters
 *   in one script call, and at once when a request is waiting.
 * So one process admits exactly the limit per window, and P processes at most
 * limit × (1 + (P − 1) × RATE_LIMIT_LOCAL_PERCENT / 100): each may have that many
 * admissions the others have not seen yet. With an allowance of 0 (small limits,
 * or RATE_LIMIT_LOCAL_PERCENT=0) every request is counted by Redis before it is
 * answered. Requests admitted just before a window ends and settled after it are
 * counted in the next window (stricter, never looser); a process that dies loses
 * at most its unsettled admissions.
 */
import type { Redis } from 'ioredis';
import { allSettledOrThrow } from '../engine/settle.js';

/** Increments and windows of several counters in one step; returns, per counter, its count and its window's remaining ms. */
const SETTLE = `
local out = {}
for i = 1, #KEYS do
  local inc = tonumber(ARGV[2 * i - 1])
  local window = tonumber(ARGV[2 * i])
  local current = redis.call('INCRBY', KEYS[i], inc)
  local ttl = window
  if current == inc then
    redis.call('PEXPIRE', KEYS[i], window)
  else
    ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then
      redis.call('PEXPIRE', KEYS[i], window)
      ttl = window
    end
  end
  out[2 * i - 1] = current
  out[2 * i] = ttl
end
return out
`;

/** Counters settled per script call (its argument list stays small). */
const SETTLE_BATCH = 500;
/** Idle counters kept beyond this are forgotten (the next request of one settles first, so forgetting costs only a round trip). */
const MAX_IDLE_COUNTERS = 10_000;

type Done = (error: Error | null, result?: { current: number; ttl: number }) => void;

interface Counter {
  readonly key: string;
  max: number;
  windowMs: number;
  /** Requests this process may admit on its own count between settles. */
  allowance: number;
  /** The count Redis returned at the last settle, in the window ending at `windowEnd`. */
  known: number;
  /** performance.now() at which the window ends; 0: no window known. */
  windowEnd: number;
  /** Admitted here, not sent yet. */
  pending: number;
  /** Admitted here, in the settle in flight. */
  sending: number;
  /** Requests that waited, in the settle in flight (counted until it answers). */
  sendingWaiting: number;
  /** Requests waiting for the next settle; each is counted in it. */
  waiting: Done[];
}

interface RateLimitStore {
  incr(key: string, done: Done, timeWindow: number, max: number): void;
  child(routeOptions: unknown): RateLimitStore;
}

export interface RateCountersOptions {
  /** Redis key prefix (the plugin's nameSpace). */
  namespace: string;
  /** RATE_LIMIT_LOCAL_PERCENT: the share of a limit a process may admit between settles. */
  localPercent: number;
  /** RATE_LIMIT_SETTLE_MS. */
  settleMs: number;
}

export class RateCounters {
  private readonly counters = new Map<string, Counter>();
  /** Counters with something to send (admitted or waiting): a settle looks at these only. */
  private readonly dirty = new Set<Counter>();
  private lastForget = 0;
  private inFlight: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private immediate: NodeJS.Immediate | undefined;
  private closed = false;

  constructor(
    private readonly redis: Redis,
    private readonly options: RateCountersOptions,
  ) {
    if (!(redis as unknown as Record<string, unknown>).diskconvSettleRates) redis.defineCommand('diskconvSettleRates', { lua: SETTLE });
  }

  /** The store class for @fastify/rate-limit's `store` option (its routes' stores are children, as with its Redis store). */
  storeClass(): new () => RateLimitStore {
    const counters = this;
    const storeFor = (prefix: string): RateLimitStore => ({
      incr: (key, done, timeWindow, max) => counters.incr(prefix + key, done, timeWindow, max),
      child: (routeOptions) => {
        const route = (routeOptions as { routeInfo: { method: string; url: string } }).routeInfo;
        return storeFor(`${counters.options.namespace}${route.method}${route.url}-`);
      },
    });
    return class {
      constructor() {
        return storeFor(counters.options.namespace);
      }
    } as unknown as new () => RateLimitStore;
  }

  /** How many counters this process holds (memory stays bounded: idle ones past MAX_IDLE_COUNTERS are forgotten). */
  get held(): number {
    return this.counters.size;
  }

  /** Counts one request of `key`; `done` gets its count in the window (over `max`: refused) and the window's remaining ms. */
  incr(key: string, done: Done, windowMs: number, max: number): void {
    const now = performance.now();
    let c = this.counters.get(key);
    if (c === undefined) {
      c = { key, max, windowMs, allowance: 0, known: 0, windowEnd: 0, pending: 0, sending: 0, sendingWaiting: 0, waiting: [] };
      this.counters.set(key, c);
    }
    c.max = max;
    c.windowMs = windowMs;
    c.allowance = Math.floor((max * this.options.localPercent) / 100);
    if (c.windowEnd > now) {
      const counted = c.known + c.sending + c.sendingWaiting + c.pending;
      const ttl = c.windowEnd - now;
      // At the limit on this process's own count: refused without a round trip (counts only grow within a window).
      if (counted >= max) return done(null, { current: counted + 1, ttl });
      if (c.sending + c.pending < c.allowance) {
        c.pending++;
        this.dirty.add(c);
        this.settleLater();
        return done(null, { current: counted + 1, ttl });
      }
    }
    // No window known (first request seen, or the window ended) or the allowance is used: counted by Redis first.
    c.waiting.push(done);
    this.dirty.add(c);
    this.settleSoon();
  }

  /** Sends what is left; no timer stays behind. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.inFlight;
    this.run();
    await this.inFlight;
  }

  private settleLater(): void {
    if (this.closed) return this.settleSoon();
    if (this.timer === undefined) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.run();
      }, this.options.settleMs);
      this.timer.unref();
    }
  }

  private settleSoon(): void {
    if (this.immediate === undefined) {
      this.immediate = setImmediate(() => {
        this.immediate = undefined;
        this.run();
      });
    }
  }

  /** One settle at a time; what arrives meanwhile goes in the next. */
  private run(): void {
    if (this.inFlight) return;
    this.inFlight = this.settle()
      .catch(() => {})
      .finally(() => {
        this.inFlight = undefined;
        if (this.dirty.size === 0) return;
        for (const c of this.dirty) if (c.waiting.length > 0) return this.settleSoon();
        this.settleLater();
      });
  }

  private async settle(): Promise<void> {
    const batch: Array<{ c: Counter; waiting: Done[]; inc: number }> = [];
    const now = performance.now();
    for (const c of this.dirty) {
      batch.push({ c, waiting: c.waiting, inc: c.pending + c.waiting.length });
      c.sending = c.pending;
      c.sendingWaiting = c.waiting.length;
      c.pending = 0;
      c.waiting = [];
    }
    this.dirty.clear();
    // A look over every counter, at most once a second (settles can come many times a second).
    if (now - this.lastForget >= 1000 || this.counters.size > MAX_IDLE_COUNTERS) {
      this.lastForget = now;
      this.forgetIdle(now);
    }
    const calls: Array<Promise<void>> = [];
    for (let i = 0; i < batch.length; i += SETTLE_BATCH) calls.push(this.settleBatch(batch.slice(i, i + SETTLE_BATCH)));
    // Every batch answered before the next settle may start: one that failed first must not let a new settle
    // overwrite `sending` of counters still in flight in another (their admissions would go uncounted meanwhile).
    await allSettledOrThrow(calls);
  }

  private async settleBatch(batch: Array<{ c: Counter; waiting: Done[]; inc: number }>): Promise<void> {
    const args: Array<string | number> = [batch.length];
    for (const b of batch) args.push(b.c.key);
    for (const b of batch) args.push(b.inc, b.c.windowMs);
    let reply: number[];
    try {
      reply = await (this.redis as unknown as { diskconvSettleRates(...a: Array<string | number>): Promise<number[]> }).diskconvSettleRates(...args);
    } catch (err) {
      for (const { c, waiting } of batch) {
        // Admitted requests stay counted (sent again with the next settle); waiting ones get the error, as from a Redis store.
        c.pending += c.sending;
        c.sending = c.sendingWaiting = 0;
        if (c.pending > 0) this.dirty.add(c);
        for (const done of waiting) done(err as Error);
      }
      throw err;
    }
    const at = performance.now();
    batch.forEach(({ c, waiting }, i) => {
      const current = Number(reply[2 * i]);
      const ttl = Number(reply[2 * i + 1]);
      c.known = current;
      c.sending = c.sendingWaiting = 0;
      c.windowEnd = at + ttl;
      // The waiting requests are the last of the increment.
      let n = current - waiting.length;
      for (const done of waiting) done(null, { current: ++n, ttl });
    });
  }

  /** Counters whose window has ended and that have nothing to send are dropped; so are the oldest idle ones past the bound. */
  private forgetIdle(now: number): void {
    let over = this.counters.size - MAX_IDLE_COUNTERS;
    for (const [key, c] of this.counters) {
      if (c.pending > 0 || c.sending > 0 || c.sendingWaiting > 0 || c.waiting.length > 0) continue;
      if (c.windowEnd <= now || over > 0) {
        this.counters.delete(key);
        over--;
      }
    }
  }
}
