/**
 * Leases: a write in progress says "mine, alive" in Redis, renewed while its
 * owner runs, so a sweep on any host can tell a live write from one a dead
 * process left behind without trusting mtimes (a long run of holes writes
 * nothing for minutes; an S3 multipart upload has no mtime at all).
 *
 *   <prefix>lease:<name>   string, the owner's token, with a TTL
 *
 * The owner renews at a third of the TTL; if it dies, the lease lapses within
 * one TTL and the sweeps may take what it left.
 */
import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';

export interface Lease {
  /** Stops renewing and deletes the lease (only if it is still ours). */
  release(): Promise<void>;
}

const RELEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`;

export class Leases {
  private readonly prefix: string;
  constructor(
    private readonly redis: Redis,
    queueName: string,
    readonly ttlMs = 30_000,
  ) {
    this.prefix = `diskconv:${queueName}:lease:`;
  }

  /** Takes (or takes over) the lease `name` and renews it until released. */
  async hold(name: string): Promise<Lease> {
    const key = this.prefix + name;
    const token = randomBytes(8).toString('hex');
    await this.redis.set(key, token, 'PX', this.ttlMs);
    const timer = setInterval(() => {
      // A failed renewal (Redis briefly away) is retried at the next tick; the TTL covers two misses.
      this.redis.set(key, token, 'PX', this.ttlMs).catch(() => {});
    }, Math.max(100, Math.floor(this.ttlMs / 3)));
    timer.unref();
    let released = false;
    return {
      release: async () => {
        if (released) return;
        released = true;
        clearInterval(timer);
        await this.redis.eval(RELEASE, 1, key, token).catch(() => {});
      },
    };
  }

  /**
   * Holds `name` for `ms` without an owner process renewing it: a write that
   * lives between requests (a tus upload into the bucket, idle until its client
   * resumes) and is its own sweeper's until then. `hold` takes it over.
   */
  async reserve(name: string, ms: number): Promise<void> {
    await this.redis.set(this.prefix + name, `reserved-${randomBytes(8).toString('hex')}`, 'PX', Math.max(1, Math.ceil(ms)));
  }

  async held(name: string): Promise<boolean> {
    return (await this.redis.exists(this.prefix + name)) === 1;
  }
}
