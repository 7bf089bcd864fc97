/** POST/GET/DELETE /v1/jobs: create, list, read and cancel conversion jobs. */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { isFinal, JOB_STATES, type JobRecord } from '../../queue/records.js';
import { createFromReceived, newJobId } from '../create-job.js';
import { receiveBody } from '../bodies.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { idempotencyKeyOf } from '../idempotency.js';
import { passStored, presentJob, presentJobJson } from '../present.js';
import { canStreamMultipart, receiveStreamingMultipart } from '../streaming-multipart.js';
import { canStream, receiveStreaming } from '../streaming-upload.js';

export { newJobId } from '../create-job.js';

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
      const octets = canStream(ctx, request);
      if ((octets || canStreamMultipart(ctx, request)) && (idempotencyKey === undefined || !(await ctx.idempotency.has(request.tenant, idempotencyKey)))) {
        return await (octets ? receiveStreaming : receiveStreamingMultipart)(ctx, request, reply, id, idempotencyKey);
      }
      return await createJob(request, reply, id, idempotencyKey);
    } finally {
      await lease.release();
    }
  });

  const createJob = async (request: FastifyRequest, reply: FastifyReply, id: string, idempotencyKey: string | undefined): Promise<FastifyReply> => {
    const received = await receiveBody(request, id, { config: ctx.config, staging: ctx.stores.staging, destinations: ctx.stores.destinations, policy: ctx.policy });
    return createFromReceived(ctx, request, reply, id, received, idempotencyKey);
  };

  const readLimit = { rateLimit: { max: ctx.config.rateLimit.reads, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } };

  app.get('/v1/jobs', { config: readLimit }, async (request) => {
    const q = listQuery.parse(request.query ?? {});
    const page = await ctx.records.list(request.tenant, { limit: q.limit, ...(q.state ? { state: q.state } : {}), ...(q.cursor ? { cursor: q.cursor } : {}) });
    return { jobs: page.jobs.map(presentJob), next_cursor: page.nextCursor };
  });

  // The status poll: the record's JSON fields go out as stored, not parsed and serialised again.
  app.get('/v1/jobs/:id', { config: readLimit }, async (request, reply) => {
    const { id } = request.params as { id: string };
    const rec = JOB_ID.test(id) ? await ctx.records.getForTenantPassing(id, request.tenant, passStored) : undefined;
    if (!rec) throw new ApiError('NOT_FOUND', 'no such job');
    return reply.type('application/json; charset=utf-8').send(presentJobJson(rec));
  });

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
