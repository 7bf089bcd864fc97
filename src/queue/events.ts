/**
 * A job's events, shared by every API process: each change of a job record
 * appends an entry to the job's Redis stream `<prefix>events:<id>` (a `state`
 * entry when the state moved, a `progress` entry when progress was written) and
 * publishes the job's id on `<prefix>events`. An API process holds one
 * subscription for all its event streams (GET /v1/jobs/{id}/events) and reads
 * the stream from the last entry it sent, so nothing lives in process memory and
 * a client's Last-Event-ID (a stream entry id) resumes exactly where it left off.
 */
import type { Redis } from 'ioredis';
import type { JobProgress, JobState } from './records.js';

export type JobEvent =
  | { type: 'state'; state: JobState; previous?: JobState }
  | { type: 'progress'; progress: JobProgress };

export interface StoredJobEvent {
  /** The stream entry id, `<ms>-<seq>`: the SSE event id. */
  id: string;
  event: JobEvent;
}

/** Entries kept per job; a reader that falls further behind gets the current state instead. */
export const EVENTS_KEPT = 500;
/** A stream outlives a forgotten record by at most this long. */
export const EVENTS_TTL_MS = 7 * 86400 * 1000;

export const eventsKey = (prefix: string, id: string): string => `${prefix}events:${id}`;
export const eventsChannel = (prefix: string): string => `${prefix}events`;

export async function appendJobEvent(redis: Redis, prefix: string, id: string, event: JobEvent): Promise<void> {
  const key = eventsKey(prefix, id);
  await redis
    .multi()
    .xadd(key, 'MAXLEN', '~', String(EVENTS_KEPT), '*', 'e', JSON.stringify(event))
    .pexpire(key, EVENTS_TTL_MS)
    .publish(eventsChannel(prefix), id)
    .exec();
}

/** Stream entry ids compare as (ms, seq). */
export function compareEventIds(a: string, b: string): number {
  const [am = 0, as = 0] = a.split('-').map(Number);
  const [bm = 0, bs = 0] = b.split('-').map(Number);
  return am !== bm ? am - bm : as - bs;
}

export const EVENT_ID = /^\d{1,16}-\d{1,10}$/;

/** Entries after `after` (exclusive; undefined for all), oldest first, at most `count`. */
export async function readJobEvents(redis: Redis, prefix: string, id: string, after: string | undefined, count = 1000): Promise<StoredJobEvent[]> {
  const entries = (await redis.xrange(eventsKey(prefix, id), after ? `(${after}` : '-', '+', 'COUNT', count)) as Array<[string, string[]]>;
  const out: StoredJobEvent[] = [];
  for (const [entryId, fields] of entries) {
    const i = fields.indexOf('e');
    const text = i >= 0 ? fields[i + 1] : undefined;
    if (text === undefined) continue;
    try {
      out.push({ id: entryId, event: JSON.parse(text) as JobEvent });
    } catch {
      // not ours
    }
  }
  return out;
}

/** The oldest entry id still kept, or undefined for an empty (or missing) stream. */
export async function firstJobEventId(redis: Redis, prefix: string, id: string): Promise<string | undefined> {
  const entries = (await redis.xrange(eventsKey(prefix, id), '-', '+', 'COUNT', 1)) as Array<[string, string[]]>;
  return entries[0]?.[0];
}

/** The newest entry id, or undefined. */
export async function lastJobEventId(redis: Redis, prefix: string, id: string): Promise<string | undefined> {
  const entries = (await redis.xrevrange(eventsKey(prefix, id), '+', '-', 'COUNT', 1)) as Array<[string, string[]]>;
  return entries[0]?.[0];
}

/**
 * One subscription per process to `<prefix>events`, fanned out to the listeners
 * of each job id. Created lazily by the first listener; closed with the app.
 */
export class JobEventHub {
  private subscriber: Redis | undefined;
  private starting: Promise<void> | undefined;
  private readonly listeners = new Map<string, Set<() => void>>();

  constructor(
    private readonly redis: Redis,
    readonly prefix: string,
  ) {}

  /** Calls `onChange` whenever job `id` has new events; returns the unsubscribe function. */
  async listen(id: string, onChange: () => void): Promise<() => void> {
    await this.start();
    let set = this.listeners.get(id);
    if (!set) this.listeners.set(id, (set = new Set()));
    set.add(onChange);
    return () => {
      const s = this.listeners.get(id);
      s?.delete(onChange);
      if (s && s.size === 0) this.listeners.delete(id);
    };
  }

  private start(): Promise<void> {
    this.starting ??= (async () => {
      // A subscriber waits for its connection (the API's own client fails fast instead).
      const sub = this.redis.duplicate({ enableOfflineQueue: true });
      sub.on('error', () => {}); // ioredis reconnects and resubscribes; readers also poll
      sub.on('message', (_channel: string, id: string) => {
        for (const fn of this.listeners.get(id) ?? []) fn();
      });
      this.subscriber = sub;
      await sub.subscribe(eventsChannel(this.prefix));
    })();
    return this.starting;
  }

  async close(): Promise<void> {
    this.listeners.clear();
    const sub = this.subscriber;
    this.subscriber = undefined;
    this.starting = undefined;
    if (sub) await sub.quit().catch(() => sub.disconnect());
  }
}
