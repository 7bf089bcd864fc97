/** POST/GET/DELETE /v1/jobs: create, list, read and cancel conversion jobs. */
import { randomBytes } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { isFinal, JOB_STATES, type JobRecord } from '../../queue/records.js';
import { checkJobOptions, newJobRecord, submitJob } from '../job-record.js';
import { receiveBody } from '../bodies.js';
import type { ApiContext } from '../context.js';
import { ApiError, QUEUE_RETRY_AFTER_SECONDS } from '../errors.js';
import { idempotencyKeyOf, requestFingerprint, type Claim } from '../idempotency.js';
import { jobPath, presentJob } from '../present.js';
import { canStream, receiveStreaming } from '../streaming-upload.js';

/** 128 random bits, URL-safe: unguessable, and safe as a store key. */
export function newJobId(): string {
  return randomBytes(16).toString('base64url');
}

const JOB_ID = /^[A-Za-z0-9_-]{22}$/;

const listQuery = z
  .object({
    state: z.enum(JOB_STATES).optional(),
    limit: z.coerce.number().int().min(1).max(100).default(20),
    cursor: z.string().max(200).optional(),
  })
  .strict();

/** The caller's job, or 404 for a missing job, a malformed id and another tenant's job alike. */
export async function findJob(ctx: ApiContext, request: FastifyRequest): Promise<JobRecord> {
  const { id } = request.params as { id: string };
  const rec = JOB_ID.test(id) ? await ctx.records.getForTenant(id, request.tenant) : undefined;
  if (!rec) throw new ApiError('NOT_FOUND', 'no such job');
  return rec;
}

export async function jobRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  app.post('/v1/jobs', { config: { rateLimit: { max: ctx.config.rateLimit.jobs, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } } }, async (request, reply) => {
    // Checked before a byte of the body is read.
    const idempotencyKey = idempotencyKeyOf(request.headers);
    const id = newJobId();
    // Until the record exists, the lease is what keeps the sweeps off the upload.
    const lease = await ctx.leases.hold(id);
    try {
      // A key already in use (a retry of a request that got this far, or a concurrent one) takes the staged path, which compares the bodies.
      if (canStream(ctx, request) && (idempotencyKey === undefined || !(await ctx.idempotency.has(request.tenant, idempotencyKey)))) {
        return await receiveStreaming(ctx, request, reply, id, idempotencyKey);
      }
      return await createJob(request, reply, id, idempotencyKey);
    } finally {
      await lease.release();
    }
  });

  const createJob = async (request: FastifyRequest, reply: FastifyReply, id: string, idempotencyKey: string | undefined): Promise<FastifyReply> => {
    const received = await receiveBody(request, id, { config: ctx.config, staging: ctx.stores.staging, destinations: ctx.stores.destinations, policy: ctx.policy });
    const callback = await checkJobOptions(ctx, received.options).catch(async (err: unknown) => {
      if (received.source.kind === 'upload') await ctx.stores.staging.delete(id).catch(() => {});
      throw err;
    });
    // Idempotency-Key: claimed once the request is known to be acceptable, just before the job exists.
    let claim: Claim | undefined;
    if (idempotencyKey !== undefined) {
      const fingerprint = requestFingerprint(received, id);
      const claimed = await ctx.idempotency
        .claim(request.tenant, idempotencyKey, fingerprint, id, async (job) => (await ctx.records.getForTenant(job, request.tenant)) !== undefined)
        .catch(async (err: unknown) => {
          await ctx.stores.staging.delete(id).catch(() => {});
          throw err;
        });
      if (claimed.kind === 'existing') {
        // The same request again: its job as it is now, not a second one; this upload goes.
        await ctx.stores.staging.delete(id).catch(() => {});
        const existing = await ctx.records.getForTenant(claimed.job, request.tenant);
        if (!existing) throw new ApiError('IDEMPOTENCY_KEY_IN_USE', 'the job of this Idempotency-Key is being removed; retry shortly', { 'retry-after': '1' });
        request.log.info({ job: existing.id }, 'idempotent replay');
        return reply.code(200).header('location', jobPath(existing.id)).header('idempotent-replayed', 'true').send(presentJob(existing));
      }
      claim = claimed.claim;
    }
    const src = received.source;
    const record = newJobRecord(id, request.tenant, src, received.options, callback);
    try {
      await submitJob(ctx, record, received.passphrase);
    } catch (err) {
      await claim?.release().catch(() => {});
      request.log.error({ err }, 'enqueue failed');
      throw new ApiError('QUEUE_UNAVAILABLE', undefined, { 'retry-after': String(QUEUE_RETRY_AFTER_SECONDS) });
    }
    // The job exists: a failure to remember its key only costs the retry its replay (the pending TTL runs out).
    await claim?.created().catch((err: unknown) => request.log.warn({ err }, 'could not record the Idempotency-Key'));
    request.log.info({ job: id, kind: src.kind, size: src.kind === 'upload' ? src.size : undefined }, 'job created');
    return reply.code(202).header('location', jobPath(id)).send(presentJob(record));
  };

  const readLimit = { rateLimit: { max: ctx.config.rateLimit.reads, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } };

  app.get('/v1/jobs', { config: readLimit }, async (request) => {
    const q = listQuery.parse(request.query ?? {});
    const page = await ctx.records.list(request.tenant, { limit: q.limit, ...(q.state ? { state: q.state } : {}), ...(q.cursor ? { cursor: q.cursor } : {}) });
    return { jobs: page.jobs.map(presentJob), next_cursor: page.nextCursor };
  });

  app.get('/v1/jobs/:id', { config: readLimit }, async (request) => presentJob(await findJob(ctx, request)));

  app.delete('/v1/jobs/:id', { config: readLimit }, async (request, reply) => {
    const rec = await findJob(ctx, request);
    if (!isFinal(rec.state)) {
      const { moved } = await ctx.records.transition(rec.id, 'cancelled', ['queued', 'running'], { last_error: undefined });
      if (moved) {
        // Tell the worker (if any) at once; take the job off the queue if no worker has it yet.
        await ctx.records.publishCancel(rec.id);
        await ctx.queue.removeWaiting(rec.id).catch((err: unknown) => request.log.warn({ err }, 'could not remove the queued job'));
        await ctx.stores.staging.delete(rec.id);
        request.log.info({ job: rec.id }, 'job cancelled');
        return presentJob((await ctx.records.get(rec.id)) ?? rec);
      }
    }
    // Finished (or finished while we looked): remove its files and its record.
    await ctx.stores.output.delete(rec.id);
    await ctx.stores.staging.delete(rec.id);
    await ctx.records.remove(rec);
    request.log.info({ job: rec.id }, 'job deleted');
    return reply.code(204).send();
  });
}
