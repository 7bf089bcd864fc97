/**
 * A tus locker shared by every API process behind one balancer: an upload's
 * lock is a Redis key (SET NX with a TTL, renewed while held, released only by
 * its own token), so two processes can never both write one upload. tus asks a
 * lock's holder to let go when another request wants it (a client that
 * reconnected while its old PATCH still hangs); across processes that request
 * travels by Redis pub/sub to whichever process holds the lock, which then ends
 * its request (tus' `requestRelease`), as @tus/server's MemoryLocker does in one
 * process. A holder that died stops renewing: its key expires after LOCK_TTL_MS.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { ERRORS, type Lock, type Locker, type RequestRelease } from '@tus/utils';
import type { Redis } from 'ioredis';

const LOCK_TTL_MS = 10_000;
const RENEW_MS = 3_000;
const RETRY_MS = 50;

/** Deletes or extends the key only while it still holds our token. */
const UNLOCK = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`;
const RENEW = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end`;

export interface RedisLockerOptions {
  /** How long a request waits for a lock before tus answers 500 "failed to acquire lock" (MemoryLocker's default). */
  acquireTimeoutMs?: number;
  ttlMs?: number;
}

export class RedisLocker implements Locker {
  /** Release requests for the locks this process holds, by upload id. */
  private readonly held = new Map<string, RequestRelease>();
  private readonly ready: Promise<void>;
  readonly acquireTimeoutMs: number;
  readonly ttlMs: number;

  /** `subscriber` is a connection of its own (it is put in subscriber mode). */
  constructor(
    readonly redis: Redis,
    private readonly subscriber: Redis,
    private readonly prefix: string,
    options: RedisLockerOptions = {},
  ) {
    this.acquireTimeoutMs = options.acquireTimeoutMs ?? 30_000;
    this.ttlMs = options.ttlMs ?? LOCK_TTL_MS;
    this.ready = this.subscriber.psubscribe(`${this.channelPrefix}*`).then(() => {});
    this.ready.catch(() => {});
    this.subscriber.on('pmessage', (_pattern: string, channel: string) => {
      const release = this.held.get(channel.slice(this.channelPrefix.length));
      if (release) void Promise.resolve(release()).catch(() => {});
    });
  }

  get channelPrefix(): string {
    return `${this.prefix}tus-release:`;
  }
  key(id: string): string {
    return `${this.prefix}tus-lock:${id}`;
  }

  newLock(id: string): Lock {
    return new RedisLock(this, id);
  }

  /** @internal */
  hold(id: string, release: RequestRelease): void {
    this.held.set(id, release);
  }
  /** @internal */
  drop(id: string): void {
    this.held.delete(id);
  }
  /** @internal */
  async subscribed(): Promise<void> {
    await this.ready;
  }

  async close(): Promise<void> {
    this.subscriber.disconnect();
  }
}

class RedisLock implements Lock {
  private readonly token = randomBytes(12).toString('hex');
  private renewal: NodeJS.Timeout | undefined;

  constructor(
    private readonly locker: RedisLocker,
    private readonly id: string,
  ) {}

  async lock(stopSignal: AbortSignal, requestRelease: RequestRelease): Promise<void> {
    const { redis } = this.locker;
    const key = this.locker.key(this.id);
    await this.locker.subscribed();
    const deadline = Date.now() + this.locker.acquireTimeoutMs;
    for (;;) {
      if (stopSignal.aborted) throw ERRORS.ERR_LOCK_TIMEOUT;
      const got = await redis.set(key, this.token, 'PX', this.locker.ttlMs, 'NX');
      if (got === 'OK') break;
      // Held, here or in another process: ask the holder to let go, then try again.
      await redis.publish(`${this.locker.channelPrefix}${this.id}`, this.token);
      if (Date.now() >= deadline) throw ERRORS.ERR_LOCK_TIMEOUT;
      await sleep(RETRY_MS);
    }
    this.locker.hold(this.id, requestRelease);
    this.renewal = setInterval(() => {
      redis.eval(RENEW, 1, key, this.token, String(this.locker.ttlMs)).catch(() => {});
    }, Math.min(RENEW_MS, Math.floor(this.locker.ttlMs / 3)));
    this.renewal.unref();
  }

  async unlock(): Promise<void> {
    if (this.renewal) clearInterval(this.renewal);
    this.renewal = undefined;
    this.locker.drop(this.id);
    await this.locker.redis.eval(UNLOCK, 1, this.locker.key(this.id), this.token);
  }
}
