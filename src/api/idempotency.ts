/**
 * `Idempotency-Key` on POST /v1/jobs (issue 10): a retried request with the same
 * key and the same body gets the job the first one created instead of a second
 * job; the same key with a different body is 422 IDEMPOTENCY_KEY_REUSED.
 *
 * Keys are scoped per tenant (another token's key is another key) and live in
 * Redis, so every API process sees them:
 *
 *   <prefix>idem:<tenant>:<sha256(key)>   string: {"job": id, "fp": fingerprint, "state": "pending"|"created"}
 *
 * A request claims its key (SET if absent, in one script) once its body is
 * received and checked, just before the job is created; the claim is `pending`
 * with a short TTL until the job exists, then `created` with
 * IDEMPOTENCY_TTL_SECONDS. A request that fails before the job exists releases
 * its claim, so a retry after a refusal is a fresh request. A concurrent retry
 * that finds a claim still pending waits a moment for it, else gets 409
 * IDEMPOTENCY_KEY_IN_USE. A key whose job was deleted (or expired) is free again.
 *
 * The fingerprint is a sha256 over the request's meaning: the upload's sha256 and
 * size and file name, or the URL, and every option. Never the passphrase: it is
 * stored nowhere, not even hashed, so it does not take part in the comparison.
 */
import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { Received } from './bodies.js';
import { ApiError } from './errors.js';

/** RFC 9110 field value, printable ASCII without spaces, bounded (the IETF draft's keys are short strings). */
export const IDEMPOTENCY_KEY_PATTERN = /^[\x21-\x7e]{1,255}$/;

/** How long a claim may stay pending (the request between claiming and creating the job). */
export const PENDING_TTL_SECONDS = 60;

/** How long a retry waits for a concurrent request with its key to create the job. */
const WAIT_FOR_PENDING_MS = 5000;

export interface IdempotencyEntry {
  job: string;
  fp: string;
  state: 'pending' | 'created';
}

/** Sets KEYS[1] to ARGV[1] (EX ARGV[2]) when absent; returns the value it found, or false. */
const CLAIM = `
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
`;

/** Compare and swap: when KEYS[1] is ARGV[1], sets ARGV[2] (EX ARGV[3]), or deletes it if ARGV[2] is ''. */
const SWAP = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
`;

/** The request's Idempotency-Key header, checked; undefined when absent. */
export function idempotencyKeyOf(headers: Record<string, string | string[] | undefined>): string | undefined {
  const value = headers['idempotency-key'];
  if (value === undefined) return undefined;
  if (Array.isArray(value)) throw new ApiError('VALIDATION_FAILED', 'Idempotency-Key: expected one header');
  if (!IDEMPOTENCY_KEY_PATTERN.test(value)) throw new ApiError('VALIDATION_FAILED', 'Idempotency-Key: expected 1-255 printable ASCII characters without spaces');
  return value;
}

/** JSON with object keys sorted at every level, so equal meanings hash equally. */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/**
 * What the request asks for, as a digest. `jobId` is this request's new job id:
 * an RBD image name defaulted to it is not part of what the client sent.
 */
export function requestFingerprint(received: Received, jobId: string): string {
  const src = received.source;
  const { destination, ...options } = received.options;
  const meaning = {
    source: src.kind === 'upload' ? { kind: 'upload', size: src.size, sha256: src.sha256, filename: src.filename } : { kind: 'url', url: src.url },
    options: { ...options, destination: destination ? { ...destination, image: destination.image === jobId ? null : destination.image } : undefined },
  };
  return createHash('sha256').update(canonicalJson(meaning)).digest('hex');
}

export type ClaimResult =
  | { kind: 'claimed'; claim: Claim }
  /** The key names this tenant's existing job, for the same request. */
  | { kind: 'existing'; job: string };

export interface Claim {
  /** The job exists: remember it for the full TTL. */
  created(): Promise<void>;
  /** The request failed before the job existed: forget the key. */
  release(): Promise<void>;
}

export class IdempotencyKeys {
  private readonly prefix: string;
  constructor(
    private readonly redis: Redis,
    queueName: string,
    private readonly ttlSeconds: number,
  ) {
    this.prefix = `diskconv:${queueName}:idem:`;
  }

  /** The Redis key of a tenant's Idempotency-Key (hashed: the client's key is any text). */
  redisKey(tenant: string, key: string): string {
    return `${this.prefix}${tenant}:${createHash('sha256').update(key).digest('hex')}`;
  }

  /**
   * Claims `key` for the job `jobId` about to be created, or names the job the
   * key already has. `jobExists` tells a live job from a deleted one.
   */
  async claim(tenant: string, key: string, fingerprint: string, jobId: string, jobExists: (id: string) => Promise<boolean>): Promise<ClaimResult> {
    const redisKey = this.redisKey(tenant, key);
    const pending = JSON.stringify({ job: jobId, fp: fingerprint, state: 'pending' } satisfies IdempotencyEntry);
    const deadline = Date.now() + WAIT_FOR_PENDING_MS;
    for (;;) {
      const found = (await this.redis.eval(CLAIM, 1, redisKey, pending, String(PENDING_TTL_SECONDS))) as string | null;
      if (found === null) return { kind: 'claimed', claim: this.claimOf(redisKey, pending, jobId, fingerprint) };
      const entry = parseEntry(found);
      const live = entry !== undefined && (entry.state === 'pending' || (await jobExists(entry.job)));
      if (entry && live && entry.fp !== fingerprint) {
        throw new ApiError('IDEMPOTENCY_KEY_REUSED', 'this Idempotency-Key was used with a different request (another image, URL or options); use a new key for a new job');
      }
      if (entry && live && (await jobExists(entry.job))) return { kind: 'existing', job: entry.job };
      if (entry?.state === 'pending') {
        // A concurrent request with this key is creating its job right now.
        if (Date.now() >= deadline) {
          throw new ApiError('IDEMPOTENCY_KEY_IN_USE', 'a request with this Idempotency-Key is still being processed; retry shortly', { 'retry-after': '1' });
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      // Its job was deleted or expired (or the entry is not ours): the key is free again.
      if ((await this.redis.eval(SWAP, 1, redisKey, found, pending, String(PENDING_TTL_SECONDS))) === 1) {
        return { kind: 'claimed', claim: this.claimOf(redisKey, pending, jobId, fingerprint) };
      }
    }
  }

  /** Whether the key has an entry (pending or created) for this tenant: such a request takes the staged path. */
  async has(tenant: string, key: string): Promise<boolean> {
    return (await this.redis.exists(this.redisKey(tenant, key))) === 1;
  }

  private claimOf(redisKey: string, pending: string, jobId: string, fingerprint: string): Claim {
    const created = JSON.stringify({ job: jobId, fp: fingerprint, state: 'created' } satisfies IdempotencyEntry);
    return {
      created: async () => {
        await this.redis.eval(SWAP, 1, redisKey, pending, created, String(this.ttlSeconds));
      },
      release: async () => {
        await this.redis.eval(SWAP, 1, redisKey, pending, '', '0');
      },
    };
  }
}

function parseEntry(text: string): IdempotencyEntry | undefined {
  try {
    const v = JSON.parse(text) as Partial<IdempotencyEntry>;
    return typeof v.job === 'string' && typeof v.fp === 'string' && (v.state === 'pending' || v.state === 'created') ? (v as IdempotencyEntry) : undefined;
  } catch {
    return undefined;
  }
}
