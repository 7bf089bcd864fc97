/**
 * POST /v1/jobs with an application/octet-stream body, converted while it
 * arrives (src/queue/upload-stream.ts has the worker's half): the job is created
 * as soon as the first bytes show the body is a plain image (no compressed
 * wrapper), and a worker reads the staging file while this request still writes
 * it. The staged copy is hashed and committed as for any upload, so a retry of
 * the job never needs the client again.
 *
 * Used when it can be: an octet-stream body with a Content-Length (the source's
 * size), a store whose uncommitted writes another process can read (a local
 * or shared directory, or a bucket with S3_STAGING_OVERLAP: each part also an
 * object of its own, announced in the mark), and STREAM_UPLOADS on. With an Idempotency-Key that has no entry
 * yet (routes/jobs.ts sends the others to the staged path), the key is claimed
 * once the last byte is in and its sha256 known, the fingerprint being the same
 * as on the staged path; an upload that fails before then leaves no job at all
 * (the retry makes a new one, as on the staged path), and a concurrent request
 * that claimed the key first wins: this request's job is removed and the
 * winner's job answered as a replay. Anything else takes the staged path
 * (bodies.ts): returns undefined before it has read a byte, or, for a wrapped
 * body, stages it through the ordinary path with the bytes it already read.
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { detectWrapper, isDiskconvError, WRAPPER_PROBE_BYTES } from '../engine/index.js';
import type { JobError, JobRecord } from '../queue/records.js';
import type { StagedWrite } from '../store/index.js';
import { asBodyError, checkDeclaredLength, readOptionFields, streamToStore, verifyChecksum, watchIdle, mediaType, type BodyDeps, type JobOptions, type Received } from './bodies.js';
import type { ApiContext } from './context.js';
import { ApiError, fastifyErrorCode, QUEUE_RETRY_AFTER_SECONDS } from './errors.js';
import { checkJobOptions, newJobRecord, submitJob } from './job-record.js';
import { requestFingerprint, type Claim } from './idempotency.js';
import { jobPath, presentJob } from './present.js';

/** Whether this request can take the streaming path (nothing of the body read yet). */
export function canStream(ctx: ApiContext, request: FastifyRequest): boolean {
  if (!ctx.config.streamUploads) return false;
  // A store whose uncommitted writes another process can read: a directory, or a bucket part by part (S3_STAGING_OVERLAP).
  if (mediaType(request) !== 'application/octet-stream' || !(ctx.stores.staging.followPath || ctx.stores.staging.createFollowed)) return false;
  const length = Number(request.headers['content-length']);
  return Number.isSafeInteger(length) && length > 0 && request.headers['transfer-encoding'] === undefined;
}

/** Reads the first chunks of a body (or a multipart file) until there are enough to tell a wrapper, or it ends. */
export async function readHead(body: AsyncIterator<Buffer>): Promise<{ head: Buffer[]; headBytes: number; ended: boolean }> {
  const head: Buffer[] = [];
  let headBytes = 0;
  while (headBytes < WRAPPER_PROBE_BYTES) {
    const next = await body.next();
    if (next.done) return { head, headBytes, ended: true };
    head.push(next.value);
    headBytes += next.value.length;
  }
  return { head, headBytes, ended: false };
}

/** The chunks readHead took, then the rest. */
export async function* replay(head: Buffer[], rest: AsyncIterator<Buffer>, ended: boolean): AsyncGenerator<Buffer> {
  yield* head;
  if (ended) return;
  for (;;) {
    const next = await rest.next();
    if (next.done) return;
    yield next.value;
  }
}

export async function receiveStreaming(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string, idempotencyKey?: string): Promise<FastifyReply> {
  const deps: BodyDeps = { config: ctx.config, staging: ctx.stores.staging, destinations: ctx.stores.destinations, policy: ctx.policy };
  const stopWatching = watchIdle(request, ctx.config.uploadIdleTimeoutMs);
  try {
    return await stream(ctx, request, reply, id, deps, idempotencyKey);
  } finally {
    stopWatching();
  }
}

/** Claims the Idempotency-Key for job `id` now that the request is known whole; `existing` names the job a concurrent request made. */
async function claimKey(ctx: ApiContext, request: FastifyRequest, key: string, received: Received, id: string): Promise<{ claim: Claim } | { existing: JobRecord }> {
  const claimed = await ctx.idempotency.claim(request.tenant, key, requestFingerprint(received, id), id, async (job) => (await ctx.records.getForTenant(job, request.tenant)) !== undefined);
  if (claimed.kind === 'claimed') return { claim: claimed.claim };
  const existing = await ctx.records.getForTenant(claimed.job, request.tenant);
  if (!existing) throw new ApiError('IDEMPOTENCY_KEY_IN_USE', 'the job of this Idempotency-Key is being removed; retry shortly', { 'retry-after': '1' });
  return { existing };
}

function replayed(request: FastifyRequest, reply: FastifyReply, existing: JobRecord): FastifyReply {
  request.log.info({ job: existing.id }, 'idempotent replay');
  return reply.code(200).header('location', jobPath(existing.id)).header('idempotent-replayed', 'true').send(presentJob(existing));
}

async function stream(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string, deps: BodyDeps, idempotencyKey: string | undefined): Promise<FastifyReply> {
  const { options, filename } = readOptionFields((request.query ?? {}) as Record<string, string>, id, deps, { passphrase: false, filename: true });
  const callback = await checkJobOptions(ctx, options);
  await checkDeclaredLength(request, 0, deps);
  const declared = Number(request.headers['content-length']);
  const body = request.body as Readable | undefined;
  if (!body || typeof body.pipe !== 'function') throw new ApiError('EMPTY_BODY', 'the body is empty');
  const iterator = (body as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  // The staging write exists from the start, as on the staged path (a stalled body is seen, and swept, the same way).
  // Into a bucket, each part is announced in the upload's mark as it becomes readable (upload-parts.ts reads it).
  const staging = ctx.stores.staging;
  let announce: ((ready: number) => Promise<void>) | undefined;
  const followed = !staging.followPath && staging.createFollowed ? await staging.createFollowed(id, declared, (ready) => announce?.(ready) ?? Promise.resolve()) : undefined;
  const writer = followed ?? (await staging.create(id));
  let head: Buffer[];
  let ended: boolean;
  try {
    const read = await readHead(iterator);
    if (read.headBytes === 0) throw new ApiError('EMPTY_BODY', 'the upload is empty');
    ({ head, ended } = read);
  } catch (err) {
    await writer.abort().catch(() => {});
    throw asBodyError(err);
  }

  const wrapped = detectWrapper(Buffer.concat(head).subarray(0, WRAPPER_PROBE_BYTES)) !== undefined;
  if (wrapped) {
    await writer.abort();
    // A compressed wrapper is decompressed into staging, its size unknown until the end: staged path.
    const stored = await streamToStore(Readable.from(replay(head, iterator, ended)), id, deps);
    await verifyChecksum(stored, options, id, deps);
    const source = { kind: 'upload' as const, key: id, ...stored, ...(filename ? { filename } : {}) };
    let claim: Claim | undefined;
    if (idempotencyKey !== undefined) {
      const got = await claimKey(ctx, request, idempotencyKey, { source, options }, id).catch(async (err: unknown) => {
        await ctx.stores.staging.delete(id).catch(() => {});
        throw err;
      });
      if ('existing' in got) {
        await ctx.stores.staging.delete(id).catch(() => {});
        return replayed(request, reply, got.existing);
      }
      claim = got.claim;
    }
    const record = newJobRecord(id, request.tenant, source, options, callback);
    await submit(ctx, request, record).catch(async (err: unknown) => {
      await claim?.release().catch(() => {});
      throw err;
    });
    await claim?.created().catch((err: unknown) => request.log.warn({ err }, 'could not record the Idempotency-Key'));
    return reply.code(202).header('location', jobPath(id)).send(presentJob(record));
  }

  const token = writer.followToken;
  if (token === undefined) {
    await writer.abort();
    throw new Error('the staging store offers no token to follow its write');
  }
  const parts = followed && { bytes: followed.partBytes, removeCopies: () => followed.removeFollowCopies() };
  // Never over a `failed` mark: the job is failed before the write is aborted, and an announcement may come between.
  if (followed) announce = async (ready) => void (await ctx.uploadMarks.advance(id, { state: 'receiving', token, size: declared, parts: { bytes: followed.partBytes, ready } }));
  const done = await overlap(ctx, request, reply, {
    id,
    options,
    ...(filename ? { filename } : {}),
    callback,
    declared,
    writer,
    token,
    chunks: replay(head, iterator, ended),
    ...(idempotencyKey !== undefined ? { idempotencyKey } : {}),
    ...(parts ? { parts } : {}),
  });
  if ('restage' in done) throw new Error('an exact length never restages');
  return done.sent;
}

/** What overlap() needs: the job's options, the staging write the file goes to, the file's bytes. */
export interface OverlapPlan {
  id: string;
  options: JobOptions;
  filename?: string;
  passphrase?: string;
  callback: Pick<JobRecord, 'callback_url' | 'callback'>;
  /** The source's size: the body's Content-Length, or (predicted) what a multipart body's file part will be. */
  declared: number;
  writer: StagedWrite;
  token: string;
  /** The file's bytes, from the first. */
  chunks: AsyncIterable<Buffer>;
  idempotencyKey?: string;
  /**
   * `declared` is a prediction (streaming-multipart.ts): a file that ends elsewhere is no error, and `rest()`
   * reads what follows it, true when nothing does. Either way off, the answer is `restage` instead of a reply.
   */
  predicted?: { rest(): Promise<boolean> };
  /**
   * The write goes into a bucket part by part (StagedWrite from createFollowed): the marks carry the part size
   * (the API's announce adds how many are readable), and the parts' own objects go once the commit is announced.
   */
  parts?: { bytes: number; removeCopies(): Promise<void> };
}

/** A predicted upload that turned out otherwise: its staged bytes (`path`), for a job of their own; `retire()` removes the overlapped job and its write. */
export interface Restage {
  restage: { size: number; sha256: string; path: string; retire(): Promise<void> };
}

/**
 * A reply overlap() sent, wrapped: a FastifyReply is a thenable (it settles, with undefined, once the response is
 * out), so an async function returning it bare resolves to undefined instead of the reply.
 */
export interface Sent {
  sent: FastifyReply;
}

/**
 * The job made at once, converting while `chunks` go to the staging write; the staged copy committed at the
 * end. Answers 202 (or a replay), or hands a mispredicted upload back as `restage`.
 */
export async function overlap(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, plan: OverlapPlan): Promise<Sent | Restage> {
  const { id, options, filename, callback, declared, writer, token, idempotencyKey, predicted } = plan;
  const parts = plan.parts ? { parts: { bytes: plan.parts.bytes, ready: 0 } } : {};
  const hash = createHash('sha256');
  let size = 0;
  let jobExists = false;
  let whole = true;
  /**
   * The upload failed after the job was made; its worker stops reading. A client that hears the
   * refusal (a wrong checksum, a body longer than declared, a store failure) gets no job, as on the
   * staged path; a job whose client went away (dropped, timed out) stays, failed with the reason.
   */
  const failJob = async (error: JobError): Promise<void> => {
    await ctx.uploadMarks.set(id, { state: 'failed', ...error }).catch(() => {});
    if (!jobExists) return;
    await ctx.queue.removeWaiting(id).catch(() => {});
    // With an Idempotency-Key the client retries with it: a failed job would stand in the retry's way, so none is left.
    if (idempotencyKey === undefined && (error.code === 'INCOMPLETE_BODY' || error.code === 'UPLOAD_TIMEOUT')) {
      await ctx.records.transition(id, 'failed', ['queued', 'running'], { error, last_error: undefined, attempt_id: undefined }).catch(() => {});
    } else {
      const rec = await ctx.records.get(id).catch(() => undefined);
      if (rec) await ctx.records.remove(rec).catch(() => {});
      await ctx.records.publishCancel(id).catch(() => {});
      await ctx.stores.staging.delete(id).catch(() => {});
      // A worker that finished before the refusal was heard: its output goes with the job.
      await ctx.stores.output.delete(id).catch(() => {});
    }
  };
  try {
    await ctx.uploadMarks.set(id, { state: 'receiving', token, size: declared, ...parts });
    const record = newJobRecord(id, request.tenant, { kind: 'upload', key: id, size: declared, sha256: '', ...(filename ? { filename } : {}) }, options, callback);
    delete record.source.sha256; // known once the last byte is in
    await submit(ctx, request, record, plan.passphrase);
    jobExists = true;
    request.log.info({ job: id, kind: 'upload', size: declared, streaming: true }, 'job created; converting while the upload arrives');

    async function* counted(): AsyncGenerator<Buffer> {
      for await (const chunk of plan.chunks) {
        size += chunk.length;
        if (size > declared && !predicted) throw new ApiError('VALIDATION_FAILED', `the body is longer than its Content-Length (${declared})`);
        hash.update(chunk);
        yield chunk;
      }
      if (size < declared && !predicted) throw new ApiError('INCOMPLETE_BODY', `the body ended after ${size} of the ${declared} bytes its Content-Length declared`);
    }
    await pipeline(counted(), writer.stream);
    if (predicted) whole = (await predicted.rest()) && size === declared;
  } catch (err) {
    const failure = asBodyError(err);
    const fastify = fastifyErrorCode(failure);
    const error: JobError = isDiskconvError(failure)
      ? { code: failure.code, message: failure.message }
      : fastify !== undefined
        ? { code: fastify, message: (failure as Error).message.replace(/^FST_[A-Z_]+:\s*/, '') }
        : { code: 'INCOMPLETE_BODY', message: 'the upload failed before its last byte' };
    // The worker is told first: a part object removed by the abort is then never read as a store failure.
    await failJob(error);
    await writer.abort().catch(() => {});
    request.log.info({ job: id, code: error.code, bytes: size }, 'streaming upload failed; its job fails with it');
    throw failure;
  }

  const sha256 = hash.digest('hex');
  if (!whole) {
    const path = ctx.stores.staging.followPath?.(id, token);
    if (path === undefined) throw new Error('the staging store offers no path to its write');
    const retire = async (): Promise<void> => {
      await writer.abort().catch(() => {});
      await failJob({ code: 'UPLOAD_RESTAGED', message: 'the request held more than the file its job was made for; converted as a new job from the staged copy' });
    };
    request.log.info({ job: id, bytes: size, predicted: declared }, 'the multipart body was not as predicted; its overlapped job goes, the staged copy makes the job');
    return { restage: { size, sha256, path, retire } };
  }
  await ctx.uploadMarks.set(id, { state: 'received', token, size, sha256, ...(plan.parts ? { parts: { bytes: plan.parts.bytes, ready: Math.ceil(size / plan.parts.bytes) } } : {}) });
  // A job no worker has started yet shows its sha256 now; a running one is told by the mark (the worker records it).
  const queued = await ctx.records.get(id).catch(() => undefined);
  if (queued?.state === 'queued') await ctx.records.update(id, ['queued'], { source: { ...queued.source, size, sha256 } }).catch(() => {});
  if (options.expected_sha256 && options.expected_sha256 !== sha256) {
    const message = `the upload's sha256 is ${sha256}, expected ${options.expected_sha256}`;
    await writer.abort().catch(() => {});
    await failJob({ code: 'CHECKSUM_MISMATCH', message });
    throw new ApiError('CHECKSUM_MISMATCH', message);
  }
  let claim: Claim | undefined;
  if (idempotencyKey !== undefined) {
    let got: { claim: Claim } | { existing: JobRecord };
    try {
      got = await claimKey(ctx, request, idempotencyKey, { source: { kind: 'upload', key: id, size, sha256, ...(filename ? { filename } : {}) }, options }, id);
    } catch (err) {
      // Another body under this key, or one still being created: this request's job goes.
      await writer.abort().catch(() => {});
      const refusal = isDiskconvError(err) ? { code: err.code, message: err.message } : { code: 'QUEUE_UNAVAILABLE', message: 'the Idempotency-Key could not be checked' };
      await failJob(refusal);
      throw err;
    }
    if ('existing' in got) {
      // A concurrent request with this key and this body made its job first: that one stands, this one goes.
      await writer.abort().catch(() => {});
      await failJob({ code: 'IDEMPOTENT_REPLAY', message: 'a concurrent request with the same Idempotency-Key made the job' });
      return { sent: replayed(request, reply, got.existing) };
    }
    claim = got.claim;
    await claim.created().catch((err: unknown) => request.log.warn({ err }, 'could not record the Idempotency-Key'));
  }
  // The staged copy, for a retry that must not need the client: unless the job is over already.
  const finished = async (): Promise<boolean> => {
    const state = await ctx.records.getState(id).catch(() => undefined);
    return state === 'succeeded' || state === 'failed' || state === 'cancelled' || state === undefined;
  };
  if (await finished()) {
    await writer.abort().catch(() => {});
  } else {
    try {
      await writer.commit();
      await ctx.uploadMarks.set(id, { state: 'committed', size, sha256 });
      // The worker reads the committed object from now on (a part it misses sends it there); the sweeps take what this leaves.
      await plan.parts?.removeCopies().catch((err: unknown) => request.log.warn({ err, job: id }, 'could not remove the part objects of a committed upload; the sweeper will'));
      // Finished while we committed: the worker may have removed the input before it was in place.
      if (await finished()) await ctx.stores.staging.delete(id).catch(() => {});
    } catch (err) {
      // The worker finished and removed the write first: nothing is lost.
      if (!(await finished())) {
        await writer.abort().catch(() => {});
        const error: JobError = isDiskconvError(err) ? { code: err.code, message: err.message } : { code: 'STORE_UNAVAILABLE', message: 'the store is unavailable' };
        await failJob(error);
        throw err;
      }
    }
  }
  const now = (await ctx.records.get(id)) ?? undefined;
  const shown = now ? { ...now, source: { ...now.source, size, sha256 } } : undefined;
  return { sent: reply.code(202).header('location', jobPath(id)).send(shown ? presentJob(shown) : { id }) };
}

async function submit(ctx: ApiContext, request: FastifyRequest, record: Parameters<typeof submitJob>[1], passphrase?: string): Promise<void> {
  try {
    await submitJob(ctx, record, passphrase);
  } catch (err) {
    request.log.error({ err }, 'enqueue failed');
    throw new ApiError('QUEUE_UNAVAILABLE', undefined, { 'retry-after': String(QUEUE_RETRY_AFTER_SECONDS) });
  }
}
