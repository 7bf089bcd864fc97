/**
 * Space reservations: a conversion checks the store's free space against its
 * image's allocation before it writes, and reserves what it checked for, so two
 * jobs that each fit alone cannot both pass the check and then both run out of
 * space halfway. Reservations live in Redis, keyed by the store (every worker
 * writing to one directory shares them), and are released when the attempt
 * ends; a worker that dies leaves one that expires after `ttlMs` unless renewed.
 *
 * Conservative by design: bytes a reserving job has already written count both
 * in the filesystem's used space and in its reservation.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import type { Config } from '../config.js';

/**
 * KEYS[1] hash owner -> "bytes:expiresAt". ARGV: owner, bytes, free, reserve, now, expiresAt.
 * Drops expired entries, then reserves when free - (others' reservations) covers bytes + reserve.
 * Returns {1, others} or {0, others}.
 */
const RESERVE = `
local others = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local owner = entries[i]
  local sep = string.find(entries[i + 1], ':', 1, true)
  local bytes = tonumber(string.sub(entries[i + 1], 1, sep - 1))
  local expires = tonumber(string.sub(entries[i + 1], sep + 1))
  if expires < tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[1], owner)
  elseif owner ~= ARGV[1] then
    others = others + bytes
  end
end
if tonumber(ARGV[3]) - others < tonumber(ARGV[2]) + tonumber(ARGV[4]) then return {0, tostring(others)} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ARGV[6]) - tonumber(ARGV[5])))
return {1, tostring(others)}
`;

/** Renews an existing reservation only. */
const RENEW = `
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local sep = string.find(v, ':', 1, true)
redis.call('HSET', KEYS[1], ARGV[1], string.sub(v, 1, sep - 1) .. ':' .. ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
`;

/** One key per store: the same directory (or bucket) seen by every worker. */
export function spaceKey(config: Pick<Config, 'store' | 'dataDir'>): string {
  const where = config.store.kind === 'file' ? `file:${config.store.root ?? join(config.dataDir, 'store')}` : `s3:${config.store.bucket}/${config.store.prefix}`;
  return `diskconv:space:${createHash('sha256').update(where).digest('hex').slice(0, 32)}`;
}

export interface Reservation {
  /** Frees the space for other jobs. Safe to call twice. */
  release(): Promise<void>;
}

export class SpaceReservations {
  constructor(
    private readonly redis: Redis,
    private readonly key: string,
    private readonly ttlMs: number,
  ) {}

  /**
   * Reserves `bytes` if `free` (as the store reports it now) minus every other live
   * reservation leaves `reserve` bytes over; otherwise returns the bytes others hold.
   */
  async reserve(owner: string, bytes: number, free: number, reserve: number): Promise<{ reservation: Reservation } | { others: number }> {
    const now = Date.now();
    const [ok, others] = (await this.redis.eval(RESERVE, 1, this.key, owner, String(bytes), String(free), String(reserve), String(now), String(now + this.ttlMs))) as [number, string];
    if (ok !== 1) return { others: Number(others) };
    const timer = setInterval(() => {
      void this.redis.eval(RENEW, 1, this.key, owner, String(Date.now() + this.ttlMs), String(this.ttlMs)).catch(() => {});
    }, Math.max(100, Math.floor(this.ttlMs / 3)));
    timer.unref();
    let released = false;
    return {
      reservation: {
        release: async () => {
          if (released) return;
          released = true;
          clearInterval(timer);
          await this.redis.hdel(this.key, owner).catch(() => {});
        },
      },
    };
  }

  /** Bytes currently reserved (for tests and metrics). */
  async reserved(): Promise<number> {
    const values = await this.redis.hvals(this.key);
    return values.reduce((sum, v) => sum + Number(v.split(':')[0]), 0);
  }
}
