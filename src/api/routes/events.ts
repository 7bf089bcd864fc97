/**
 * GET /v1/jobs/{id}/events: a job's life as Server-Sent Events.
 *
 *   event: state     data: {"state","previous","job"}  on every transition (job: the job as GET shows it)
 *   event: progress  data: {"phase","bytes_done","bytes_total","percent"}  at most every PROGRESS_MIN_MS
 *   : heartbeat      a comment every SSE_HEARTBEAT_SECONDS, so proxies keep the connection
 *
 * Every event carries `id:` (the Redis stream entry, see src/queue/events.ts); a client
 * reconnecting with Last-Event-ID gets what came after it. The stream starts with the
 * current state (unless resumed) and ends after a terminal state or when the job is removed.
 * Same auth and tenant rules as GET /v1/jobs/{id}: another tenant's job is a 404.
 */
import type { ServerResponse } from 'node:http';
import type { FastifyInstance } from 'fastify';
import { compareEventIds, EVENT_ID, firstJobEventId, JobEventHub, lastJobEventId, readJobEvents } from '../../queue/events.js';
import { isFinal, type JobProgress, type JobRecord, type JobState } from '../../queue/records.js';
import type { ApiContext } from '../context.js';
import { presentJob } from '../present.js';
import { findJob } from './jobs.js';

/** Progress events are coalesced to at most one per this many ms (state events are never held back). */
export const PROGRESS_MIN_MS = 250;

function frame(event: string, id: string | undefined, data: unknown): string {
  return `${id ? `id: ${id}\n` : ''}event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}

export async function eventRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  const hub = new JobEventHub(ctx.redis, ctx.records.keyPrefix);
  const open = new Set<() => void>();
  // Open streams must not hold a graceful close for SHUTDOWN_GRACE_MS: end them first.
  app.addHook('preClose', async () => {
    for (const end of [...open]) end();
  });
  app.addHook('onClose', async () => hub.close());

  const readLimit = { rateLimit: { max: ctx.config.rateLimit.reads, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } };
  app.get('/v1/jobs/:id/events', { config: readLimit }, async (request, reply) => {
    const rec = await findJob(ctx, request);
    const header = request.headers['last-event-id'];
    const resumeFrom = typeof header === 'string' && EVENT_ID.test(header.trim()) ? header.trim() : undefined;
    const prefix = ctx.records.keyPrefix;
    const redis = ctx.redis;

    reply.hijack();
    const res: ServerResponse = reply.raw;
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
      'x-content-type-options': 'nosniff',
    });
    res.write('retry: 2000\n\n');

    let ended = false;
    let lastSent: string | undefined = resumeFrom;
    let lastState: JobState | undefined;
    let pendingProgress: { id: string; progress: JobProgress } | undefined;
    let lastProgressAt = 0;
    let progressTimer: NodeJS.Timeout | undefined;
    let unlisten: (() => void) | undefined;

    const write = (text: string): void => {
      if (!ended && !res.destroyed) res.write(text);
    };
    const end = (): void => {
      if (ended) return;
      ended = true;
      open.delete(end);
      clearInterval(heartbeat);
      if (progressTimer) clearTimeout(progressTimer);
      unlisten?.();
      if (!res.destroyed) res.end();
    };
    open.add(end);
    res.on('close', end);

    const flushProgress = (): void => {
      if (progressTimer) clearTimeout(progressTimer);
      progressTimer = undefined;
      if (!pendingProgress) return;
      write(frame('progress', pendingProgress.id, pendingProgress.progress));
      lastSent = pendingProgress.id;
      pendingProgress = undefined;
      lastProgressAt = Date.now();
    };

    const sendState = (id: string | undefined, state: JobState, previous: JobState | undefined, current: JobRecord): void => {
      flushProgress();
      if (state !== lastState) write(frame('state', id, { state, ...(previous ? { previous } : {}), job: presentJob(current) }));
      lastState = state;
      if (id) lastSent = id;
      if (isFinal(state)) end();
    };

    // Serialised: one read of the stream at a time, each from the last entry sent.
    let pumping: Promise<void> | undefined;
    let again = false;
    let started = false; // no reads before the opening snapshot has set lastSent
    const pump = (): void => {
      if (ended) return;
      if (pumping || !started) {
        again = true;
        return;
      }
      pumping = (async () => {
        do {
          again = false;
          const events = await readJobEvents(redis, prefix, rec.id, pendingProgress?.id ?? lastSent);
          for (const { id, event } of events) {
            if (ended) return;
            if (event.type === 'progress') {
              pendingProgress = { id, progress: event.progress };
              continue;
            }
            const current = await ctx.records.get(rec.id);
            if (!current) return end();
            sendState(id, event.state, event.previous, current);
          }
          if (pendingProgress) {
            const wait = PROGRESS_MIN_MS - (Date.now() - lastProgressAt);
            if (wait <= 0) flushProgress();
            else progressTimer ??= setTimeout(flushProgress, wait);
          }
          if (events.length === 0) {
            const current = await ctx.records.get(rec.id);
            if (!current) return end();
            if (isFinal(current.state)) {
              // The final transition may have landed between the read above and this one: its events (the terminal
              // progress, then the state) are in the stream with it, written by the same script, so read them first.
              if ((await readJobEvents(redis, prefix, rec.id, pendingProgress?.id ?? lastSent)).length > 0) {
                again = true;
                continue;
              }
              // Finished, and its stream has nothing new for this client (resumed after the end, or the history
              // expired): say the final state and close.
              return sendState(await lastJobEventId(redis, prefix, rec.id), current.state, undefined, current);
            }
          }
        } while (again && !ended);
      })()
        .catch((err: unknown) => request.log.warn({ err }, 'reading job events failed; the heartbeat retries'))
        .finally(() => {
          pumping = undefined;
        });
    };

    const heartbeat = setInterval(() => {
      write(': heartbeat\n\n');
      pump(); // also covers a notification missed while the subscription reconnected
    }, ctx.config.events.heartbeatSeconds * 1000);

    try {
      unlisten = await hub.listen(rec.id, pump);
      // Resumed within the kept history: replay from there. Otherwise start from the current record.
      const first = resumeFrom ? await firstJobEventId(redis, prefix, rec.id) : undefined;
      const canResume = resumeFrom !== undefined && first !== undefined && compareEventIds(first, resumeFrom) <= 0;
      if (!canResume) {
        const latest = await lastJobEventId(redis, prefix, rec.id);
        const current = await ctx.records.get(rec.id);
        if (!current) return end();
        lastSent = latest;
        write(frame('progress', undefined, current.progress)); // the state frame below carries the id
        sendState(latest, current.state, undefined, current);
      }
      started = true;
      pump();
    } catch (err) {
      request.log.warn({ err }, 'event stream failed');
      end();
    }
  });
}
