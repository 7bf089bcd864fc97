/**
 * Job records: the durable state of every job, in Redis, shared by API and
 * workers. BullMQ moves work between workers; the record is what clients see, so
 * an API process can restart mid-job and lose nothing.
 *
 *   <prefix>job:<id>         hash: state, tenant, timestamps, JSON fields
 *   <prefix>tenant:<tenant>  zset: job ids by creation time (listing, per tenant)
 *   <prefix>finished         zset: job ids by finish time (retention)
 *   <prefix>unfinished       zset: job ids not yet finished, by creation time (reconciliation)
 *   <prefix>stats            hash: jobs by state, bytes converted, conversion seconds
 *   <prefix>events:<id>      stream: the job's state and progress events (events.ts), trimmed
 *   <prefix>events           pub/sub: the id of a job whose events stream grew
 *
 * State changes go through one Lua script that moves only from allowed states,
 * so a cancel and a worker's finish cannot both win.
 */
import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import { DiskconvError } from '../engine/errors.js';
import { appendJobEvent, eventsChannel, eventsKey, EVENTS_KEPT, EVENTS_TTL_MS } from './events.js';

export const JOB_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'] as const;
export type JobState = (typeof JOB_STATES)[number];
export const FINAL_STATES: readonly JobState[] = ['succeeded', 'failed', 'cancelled'];
export const isFinal = (state: JobState): boolean => FINAL_STATES.includes(state);

export type SourceFormat = 'auto' | 'raw' | 'qcow2' | 'vmdk' | 'vdi' | 'vpc' | 'vhdx';

export interface JobSource {
  kind: 'upload' | 'url';
  /** Client's file name (metadata only; never a path). */
  filename?: string;
  url?: string;
  /** Final URL after redirects. */
  final_url?: string;
  size?: number;
  sha256?: string;
  format?: string;
  virtual_size?: number;
  /** The engine's info (qemu-img info JSON). */
  info?: Record<string, unknown>;
  /** How a URL was read: range requests or staged whole. */
  mode?: 'range' | 'staged';
  /** A gzip/xz/bzip2/zstd wrapper (found by its magic bytes) that was decompressed; size and sha256 are of the wrapped bytes. */
  wrapper?: 'gzip' | 'xz' | 'bzip2' | 'zstd';
  /** Size of the image inside the wrapper. */
  unwrapped_size?: number;
}

export interface JobProgress {
  /** `done` for a succeeded job, `failed` or `cancelled` for the others once they end (set by the transition script). */
  phase: 'queued' | 'downloading' | 'probing' | 'converting' | 'committing' | 'publishing' | 'retrying' | 'done' | 'failed' | 'cancelled';
  /** On a failed or cancelled job: the phase it was in when it ended. */
  ended_in?: Exclude<JobProgress['phase'], 'done' | 'failed' | 'cancelled'>;
  bytes_done: number;
  bytes_total: number | null;
  percent: number | null;
}

export interface JobOutput {
  format: 'raw';
  size: number;
  sha256: string;
  /** When OUTPUT_HASHES names it, or the job publishes into Glance. */
  sha512?: string;
  md5?: string;
  data_bytes: number;
  /** Where it is: `s3://BUCKET/KEY` in the output store, `rbd://FSID/POOL/IMAGE/snap` for an RBD target; absent for a local directory. */
  location?: string;
  /** Set when the job wrote to a destination (RBD) instead of the output store. */
  target?: 'rbd';
  pool?: string;
  image?: string;
  snapshot?: string;
  /** The Glance image this output was published as (jobs with `glance`). */
  glance?: GlanceOutput;
}

/** Where a job writes instead of the output store (an RBD image in a user's pool). */
export interface JobDestination {
  target: 'rbd';
  pool: string;
  image: string;
}

/** What a job asks Glance to record (the `glance` option). */
export interface GlanceRequest {
  name?: string;
  visibility?: 'private' | 'shared' | 'community' | 'public';
  min_disk?: number;
  min_ram?: number;
  protected?: boolean;
  properties?: Record<string, string>;
}

export interface GlanceOutput {
  image_id: string;
  /** Glance's image status; `active` once the job has succeeded. */
  status: string;
  /** `location`: registered in place (zero copy); `upload`: the bytes were sent to Glance. */
  method: 'location' | 'upload';
  /** Glance's recorded md5 and sha512 (equal to the output's md5 and sha512). */
  checksum?: string | null;
  os_hash_algo?: string | null;
  os_hash_value?: string | null;
  /** Why a location registration fell back to an upload. */
  fallback_reason?: string;
}

export interface JobError {
  code: string;
  message: string;
}

export interface JobRecord {
  id: string;
  tenant: string;
  state: JobState;
  source_format: SourceFormat;
  /** An OVA's disk or a tar bundle's top member (the `disk` option). */
  disk?: string;
  output_format: 'raw';
  expected_sha256?: string;
  /** Publish the output into Glance once converted. */
  glance?: GlanceRequest;
  created_at: number;
  updated_at: number;
  started_at?: number;
  finished_at?: number;
  attempts: number;
  source: JobSource;
  progress: JobProgress;
  output?: JobOutput;
  /** The job's destination, when it is not the output store. */
  destination?: JobDestination;
  error?: JobError;
  /** The last transient error, while retries remain. */
  last_error?: JobError;
  /** Conversion wall time of the successful attempt, seconds. */
  duration_seconds?: number;
  /**
   * The attempt that owns a running job (internal, never shown to clients): a
   * worker's writes carry it, so an attempt that was superseded (its lock lost,
   * the job taken by another worker) can neither report progress nor finish it.
   */
  attempt_id?: string;
  /** Where the terminal state is POSTed (webhooks.ts), and how that went. */
  callback_url?: string;
  callback?: JobCallback;
}

export interface JobCallback {
  state: 'pending' | 'delivered' | 'failed';
  attempts: number;
  last_status: number | null;
  last_error: string | null;
}

/** Histogram buckets for conversion seconds (Prometheus `le`). */
export const DURATION_BUCKETS = [1, 5, 15, 60, 300, 900, 3600] as const;

const JSON_FIELDS = ['source', 'progress', 'output', 'destination', 'error', 'last_error', 'callback', 'glance'] as const;
const NUMBER_FIELDS = ['created_at', 'updated_at', 'started_at', 'finished_at', 'attempts', 'duration_seconds'] as const;

type FieldValue = string | number | object | undefined;

function encodeFields(fields: Partial<Record<string, FieldValue>>): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(fields)) {
    // '' deletes the field (see the script).
    out.push(k, v === undefined ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v));
  }
  return out;
}

function decode(hash: Record<string, string>, passThrough?: (field: string, json: string) => unknown): JobRecord | undefined {
  if (!hash.id || !hash.state) return undefined;
  const rec: Record<string, unknown> = { ...hash };
  for (const f of JSON_FIELDS) {
    const json = hash[f];
    if (json === undefined) continue;
    const kept = passThrough?.(f, json);
    rec[f] = kept !== undefined ? kept : JSON.parse(json);
  }
  for (const f of NUMBER_FIELDS) if (hash[f] !== undefined) rec[f] = Number(hash[f]);
  return rec as unknown as JobRecord;
}

/**
 * Moves a job to ARGV[1] when its state is one of ARGV[2] (",a,b,") and, when
 * ARGV[6] is not empty, the attempt that owns it is ARGV[6]; sets fields (from ARGV[8]).
 * Appends the job's events in the same step (KEYS[6], published on ARGV[7]): a
 * `progress` entry when progress was written, then a `state` entry when the state
 * moved, so no reader ever sees a record ahead of its events (an event stream that
 * found a cancelled record before its terminal progress entry ended without it).
 * A job that finished with a callback_url is due for delivery (KEYS[7]).
 * Returns {moved, previous state, terminal progress}.
 */
const TRANSITION = `
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if not string.find(ARGV[2], ',' .. cur .. ',', 1, true) then return {0, cur} end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'attempt_id') ~= ARGV[6] then return {0, cur} end
if cur ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[2], 'state:' .. cur, -1)
  redis.call('HINCRBY', KEYS[2], 'state:' .. ARGV[1], 1)
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[3])
local written = ''
for i = 8, #ARGV, 2 do
  if ARGV[i] == 'progress' then written = ARGV[i + 1] end
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i]) else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
-- failed or cancelled: progress.phase says so, and ended_in keeps the phase the job was in
local terminal = ''
if (ARGV[1] == 'failed' or ARGV[1] == 'cancelled') and cur ~= ARGV[1] then
  local p = redis.call('HGET', KEYS[1], 'progress')
  if p then
    local prior = string.match(p, '"phase":"([%a_]+)"')
    if prior and prior ~= 'failed' and prior ~= 'cancelled' then
      local tail = ''
      if not string.find(p, '"ended_in":', 1, true) then tail = ',"ended_in":"' .. prior .. '"' end
      terminal = string.gsub(p, '"phase":"[%a_]+"', '"phase":"' .. ARGV[1] .. '"' .. tail, 1)
      redis.call('HSET', KEYS[1], 'progress', terminal)
    end
  end
end
local progress = terminal
if progress == '' then progress = written end
local appended = false
if progress ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '${EVENTS_KEPT}', '*', 'e', '{"type":"progress","progress":' .. progress .. '}')
  appended = true
end
if cur ~= ARGV[1] then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '${EVENTS_KEPT}', '*', 'e', '{"type":"state","state":"' .. ARGV[1] .. '","previous":"' .. cur .. '"}')
  appended = true
end
if appended then
  redis.call('PEXPIRE', KEYS[6], '${EVENTS_TTL_MS}')
  redis.call('PUBLISH', ARGV[7], ARGV[5])
end
if ARGV[4] == '1' and cur ~= ARGV[1] and redis.call('HEXISTS', KEYS[1], 'callback_url') == 1 then
  redis.call('ZADD', KEYS[7], 'NX', ARGV[3], ARGV[5])
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
  -- a finished job's passphrase goes in the same step (KEYS[5]; the TTL is only the backstop)
  redis.call('DEL', KEYS[5])
end
return {1, cur, terminal}
`;

/** Removes a record and its index entries; keeps the per-state counts right. */
const REMOVE = `
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
redis.call('HINCRBY', KEYS[2], 'state:' .. cur, -1)
redis.call('DEL', KEYS[1])
return 1
`;

export interface ListOptions {
  state?: JobState;
  limit: number;
  cursor?: string;
}

export interface ListPage {
  jobs: JobRecord[];
  nextCursor: string | null;
}

/** Longest a passphrase stays in Redis if its job never finishes (a backstop: a final state deletes it). */
export const PASSPHRASE_TTL_SECONDS = 24 * 3600;

export class JobRecords {
  private readonly prefix: string;
  constructor(
    private readonly redis: Redis,
    queueName: string,
  ) {
    this.prefix = `diskconv:${queueName}:`;
  }

  key(id: string): string {
    return `${this.prefix}job:${id}`;
  }
  private tenantKey(tenant: string): string {
    return `${this.prefix}tenant:${tenant}`;
  }
  get statsKey(): string {
    return `${this.prefix}stats`;
  }
  get finishedKey(): string {
    return `${this.prefix}finished`;
  }
  get unfinishedKey(): string {
    return `${this.prefix}unfinished`;
  }
  /** Pub/sub channel carrying ids of cancelled jobs to workers. */
  get cancelChannel(): string {
    return `${this.prefix}cancel`;
  }
  get sweepLockKey(): string {
    return `${this.prefix}sweep-lock`;
  }

  async create(record: JobRecord): Promise<void> {
    const { id, tenant } = record;
    await this.redis
      .multi()
      .hset(this.key(id), ...encodeFields(Object.fromEntries(Object.entries(record).filter(([, v]) => v !== undefined))))
      .zadd(this.tenantKey(tenant), record.created_at, id)
      .zadd(this.unfinishedKey, record.created_at, id)
      .hincrby(this.statsKey, `state:${record.state}`, 1)
      .exec();
    await appendJobEvent(this.redis, this.prefix, id, { type: 'state', state: record.state });
  }

  async get(id: string): Promise<JobRecord | undefined> {
    return decode(await this.redis.hgetall(this.key(id)));
  }

  /**
   * getForTenant, with JSON fields left as their stored text where `passThrough`
   * returns a stand-in for them (present.ts answers a status poll without parsing
   * and re-serialising the record's JSON).
   */
  async getForTenantPassing(id: string, tenant: string, passThrough: (field: string, json: string) => unknown): Promise<JobRecord | undefined> {
    const hash = await this.redis.hgetall(this.key(id));
    if (hash.tenant !== tenant) return undefined;
    return decode(hash, passThrough);
  }

  /** A tenant's own job, or undefined: another tenant's job looks exactly like a missing one. */
  async getForTenant(id: string, tenant: string): Promise<JobRecord | undefined> {
    const rec = await this.get(id);
    return rec && rec.tenant === tenant ? rec : undefined;
  }

  async getState(id: string): Promise<JobState | undefined> {
    return ((await this.redis.hget(this.key(id), 'state')) ?? undefined) as JobState | undefined;
  }

  /**
   * Moves the job to `state` if it is currently in one of `from`, setting `fields`
   * (undefined values delete the field). Returns whether it moved and the previous state.
   */
  async transition(
    id: string,
    state: JobState,
    from: readonly JobState[],
    fields: Partial<Record<keyof JobRecord, FieldValue>> = {},
    options: { owner?: string } = {},
  ): Promise<{ moved: boolean; previous: JobState | undefined }> {
    const now = Date.now();
    const result = (await this.redis.eval(
      TRANSITION,
      7,
      this.key(id),
      this.statsKey,
      this.finishedKey,
      this.unfinishedKey,
      this.passphraseKey(id),
      eventsKey(this.prefix, id),
      this.webhooksDueKey,
      state,
      `,${from.join(',')},`,
      String(now),
      isFinal(state) ? '1' : '0',
      id,
      options.owner ?? '',
      eventsChannel(this.prefix),
      ...encodeFields(fields),
    )) as [number, string, string?];
    return { moved: result[0] === 1, previous: (result[1] || undefined) as JobState | undefined };
  }

  /** Updates fields without changing state, only while the job is in `while`. */
  async update(id: string, whileIn: readonly JobState[], fields: Partial<Record<keyof JobRecord, FieldValue>>, options: { owner?: string } = {}): Promise<boolean> {
    const state = await this.getState(id);
    if (!state || !whileIn.includes(state)) return false;
    return (await this.transition(id, state, [state], fields, options)).moved;
  }

  /**
   * An encrypted image's passphrase lives in its own key (<prefix>secret:<id>),
   * never in the job record or the BullMQ job data, with a TTL, and is deleted
   * when the job reaches a final state or is removed.
   */
  private passphraseKey(id: string): string {
    return `${this.prefix}secret:${id}`;
  }
  async putPassphrase(id: string, passphrase: string, ttlSeconds = PASSPHRASE_TTL_SECONDS): Promise<void> {
    await this.redis.set(this.passphraseKey(id), passphrase, 'EX', ttlSeconds);
  }
  async getPassphrase(id: string): Promise<string | undefined> {
    return (await this.redis.get(this.passphraseKey(id))) ?? undefined;
  }
  async deletePassphrase(id: string): Promise<void> {
    await this.redis.del(this.passphraseKey(id));
  }

  async remove(record: Pick<JobRecord, 'id' | 'tenant'>): Promise<boolean> {
    const n = (await this.redis.eval(REMOVE, 5, this.key(record.id), this.statsKey, this.finishedKey, this.tenantKey(record.tenant), this.unfinishedKey, record.id)) as number;
    await this.redis.del(eventsKey(this.prefix, record.id)).catch(() => {});
    await this.deletePassphrase(record.id).catch(() => {});
    await this.redis.zrem(this.webhooksDueKey, record.id).catch(() => {});
    await this.redis.publish(`${this.prefix}events`, record.id).catch(() => {});
    return n === 1;
  }

  /** Newest first; the cursor is opaque to clients. Work per call is bounded. */
  async list(tenant: string, options: ListOptions): Promise<ListPage> {
    const key = this.tenantKey(tenant);
    let max = '+inf';
    let after: { score: number; id: string } | undefined;
    if (options.cursor) {
      after = decodeCursor(options.cursor);
      max = String(after.score);
    }
    const jobs: JobRecord[] = [];
    const scanBudget = Math.max(1000, options.limit * 10);
    let scanned = 0;
    let offset = 0;
    for (;;) {
      const batch = await this.redis.zrevrangebyscore(key, max, '-inf', 'WITHSCORES', 'LIMIT', offset, 200);
      if (batch.length === 0) return { jobs, nextCursor: null };
      offset += batch.length / 2;
      const pipeline = this.redis.pipeline();
      const members: { id: string; score: number }[] = [];
      for (let i = 0; i < batch.length; i += 2) {
        const id = batch[i] as string;
        const score = Number(batch[i + 1]);
        // Equal scores come in reverse lexical order; skip what the previous page returned.
        if (after && score === after.score && id >= after.id) continue;
        members.push({ id, score });
        pipeline.hgetall(this.key(id));
      }
      const results = (await pipeline.exec()) ?? [];
      for (let i = 0; i < members.length; i++) {
        const member = members[i] as { id: string; score: number };
        scanned++;
        const rec = decode((results[i]?.[1] ?? {}) as Record<string, string>);
        if (rec && (!options.state || rec.state === options.state)) {
          jobs.push(rec);
          if (jobs.length >= options.limit) return { jobs, nextCursor: encodeCursor(member) };
        }
        if (scanned >= scanBudget) return { jobs, nextCursor: encodeCursor(member) };
      }
      if (batch.length < 400) return { jobs, nextCursor: null };
    }
  }

  /** Ids of jobs finished before `before` (ms), oldest first. */
  async finishedBefore(before: number, count = 100): Promise<string[]> {
    return this.redis.zrangebyscore(this.finishedKey, '-inf', String(before), 'LIMIT', 0, count);
  }

  /** Ids of jobs created before `before` (ms) and not finished, oldest first. */
  async unfinishedBefore(before: number, count = 100): Promise<string[]> {
    return this.redis.zrangebyscore(this.unfinishedKey, '-inf', String(before), 'LIMIT', 0, count);
  }

  async stats(): Promise<Record<string, string>> {
    return this.redis.hgetall(this.statsKey);
  }

  /** Counts a successful conversion for /metrics. */
  async recordConversion(bytes: number, seconds: number): Promise<void> {
    const m = this.redis.multi().hincrby(this.statsKey, 'bytes_converted', bytes).hincrby(this.statsKey, 'conversions', 1);
    m.hincrbyfloat(this.statsKey, 'conversion_seconds_sum', seconds);
    for (const le of DURATION_BUCKETS) if (seconds <= le) m.hincrby(this.statsKey, `conversion_seconds_le_${le}`, 1);
    await m.exec();
  }

  /** Redis key prefix of this queue's keys. */
  get keyPrefix(): string {
    return this.prefix;
  }
  /** zset: ids of finished jobs whose callback is due, by due time (webhooks.ts). */
  get webhooksDueKey(): string {
    return `${this.prefix}webhooks:due`;
  }

  /** Records a callback's delivery state, only while the record exists. */
  async setCallback(id: string, callback: JobCallback): Promise<void> {
    await this.redis.eval(
      "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'callback', ARGV[1]) end return 0",
      1,
      this.key(id),
      JSON.stringify(callback),
    );
  }

  /** Announces a cancellation to every worker. */
  async publishCancel(id: string): Promise<void> {
    await this.redis.publish(this.cancelChannel, id);
  }
}

function encodeCursor(pos: { score: number; id: string }): string {
  return Buffer.from(`${pos.score}:${pos.id}`).toString('base64url');
}

export class InvalidCursorError extends DiskconvError {
  readonly code = 'INVALID_CURSOR' as const;
  readonly deterministic = true;
}

function decodeCursor(cursor: string): { score: number; id: string } {
  const text = Buffer.from(cursor, 'base64url').toString();
  const m = /^(\d{1,16}):([A-Za-z0-9_-]{1,64})$/.exec(text);
  if (!m) throw new InvalidCursorError('invalid cursor');
  return { score: Number(m[1]), id: m[2] as string };
}

/** A tenant is named by a hash of its token, so no token is ever stored. */
export function tenantOf(token: string | undefined): string {
  return token === undefined ? 'anonymous' : createHash('sha256').update(token).digest('hex').slice(0, 32);
}
