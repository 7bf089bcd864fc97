/**
 * A job from a request whose body is in (staged, or a URL checked): the
 * Idempotency-Key claimed, the record made and enqueued, 202. POST /v1/jobs's
 * staged path (routes/jobs.ts) and a multipart upload whose overlapped job was
 * given up for the staged copy (streaming-multipart.ts) both end here.
 */
import { randomBytes } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Received } from './bodies.js';
import type { ApiContext } from './context.js';
import { ApiError, QUEUE_RETRY_AFTER_SECONDS } from './errors.js';
import { requestFingerprint, type Claim } from './idempotency.js';
import { checkJobOptions, newJobRecord, submitJob } from './job-record.js';
import { jobPath, presentJob } from './present.js';

/**
 * 128 random bits, URL-safe: unguessable, and safe as a store key. Never with a leading '-': the id is
 * also the default RBD image name, which may not start with one (`rbd` would read it as an option), and
 * one id in 64 did, so such a job's RBD target was refused.
 */
export function newJobId(): string {
  for (;;) {
    const id = randomBytes(16).toString('base64url');
    if (!id.startsWith('-')) return id;
  }
}

export async function createFromReceived(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string, received: Received, idempotencyKey: string | undefined): Promise<FastifyReply> {
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
}
