/**
 * POST /v1/jobs with an application/octet-stream body, converted while it
 * arrives (src/queue/upload-stream.ts has the worker's half): the job is created
 * as soon as the first bytes show the body is a plain image (no compressed
 * wrapper), and a worker reads the staging file while this request still writes
 * it. The staged copy is hashed and committed as for any upload, so a retry of
 * the job never needs the client again.
 *
 * Used when it can be: an octet-stream body with a Content-Length (the source's
 * size), no Idempotency-Key (a replay must not meet a job whose upload failed
 * under it), a store whose uncommitted writes another process can read (a local
 * or shared directory; S3 parts are unreadable until the multipart upload
 * completes), and STREAM_UPLOADS on. Anything else takes the staged path
 * (bodies.ts): returns undefined before it has read a byte, or, for a wrapped
 * body, stages it through the ordinary path with the bytes it already read.
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { detectWrapper, isDiskconvError, WRAPPER_PROBE_BYTES } from '../engine/index.js';
import type { JobError } from '../queue/records.js';
import { asBodyError, checkDeclaredLength, readOptionFields, streamToStore, verifyChecksum, watchIdle, mediaType, type BodyDeps } from './bodies.js';
import type { ApiContext } from './context.js';
import { ApiError, QUEUE_RETRY_AFTER_SECONDS } from './errors.js';
import { checkJobOptions, newJobRecord, submitJob } from './job-record.js';
import { jobPath, presentJob } from './present.js';

/** Whether this request can take the streaming path (nothing of the body read yet). */
export function canStream(ctx: ApiContext, request: FastifyRequest, idempotencyKey: string | undefined): boolean {
  if (!ctx.config.streamUploads || idempotencyKey !== undefined) return false;
  if (mediaType(request) !== 'application/octet-stream' || !ctx.stores.staging.followPath) return false;
  const length = Number(request.headers['content-length']);
  return Number.isSafeInteger(length) && length > 0 && request.headers['transfer-encoding'] === undefined;
}

/** Reads the first chunks of the body until there are enough to tell a wrapper (or the body ends). */
async function readHead(body: AsyncIterator<Buffer>): Promise<{ head: Buffer[]; headBytes: number; ended: boolean }> {
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

async function* replay(head: Buffer[], rest: AsyncIterator<Buffer>, ended: boolean): AsyncGenerator<Buffer> {
  yield* head;
  if (ended) return;
  for (;;) {
    const next = await rest.next();
    if (next.done) return;
    yield next.value;
  }
}

export async function receiveStreaming(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string): Promise<FastifyReply> {
  const deps: BodyDeps = { config: ctx.config, staging: ctx.stores.staging, destinations: ctx.stores.destinations, policy: ctx.policy };
  const stopWatching = watchIdle(request, ctx.config.uploadIdleTimeoutMs);
  try {
    return await stream(ctx, request, reply, id, deps);
  } finally {
    stopWatching();
  }
}

async function stream(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string, deps: BodyDeps): Promise<FastifyReply> {
  const { options, filename } = readOptionFields((request.query ?? {}) as Record<string, string>, id, deps, { passphrase: false, filename: true });
  const callback = await checkJobOptions(ctx, options);
  await checkDeclaredLength(request, 0, deps);
  const declared = Number(request.headers['content-length']);
  const body = request.body as Readable | undefined;
  if (!body || typeof body.pipe !== 'function') throw new ApiError('EMPTY_BODY', 'the body is empty');
  const iterator = (body as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  // The staging write exists from the start, as on the staged path (a stalled body is seen, and swept, the same way).
  const writer = await ctx.stores.staging.create(id);
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
    const record = newJobRecord(id, request.tenant, { kind: 'upload', key: id, ...stored, ...(filename ? { filename } : {}) }, options, callback);
    await submit(ctx, request, record);
    return reply.code(202).header('location', jobPath(id)).send(presentJob(record));
  }

  const token = writer.followToken;
  if (token === undefined) {
    await writer.abort();
    throw new Error('the staging store offers no token to follow its write');
  }
  const hash = createHash('sha256');
  let size = 0;
  let jobExists = false;
  /**
   * The upload failed after the job was made; its worker stops reading. A client that hears the
   * refusal (a wrong checksum, a body longer than declared, a store failure) gets no job, as on the
   * staged path; a job whose client went away (dropped, timed out) stays, failed with the reason.
   */
  const failJob = async (error: JobError): Promise<void> => {
    await ctx.uploadMarks.set(id, { state: 'failed', ...error }).catch(() => {});
    if (!jobExists) return;
    await ctx.queue.removeWaiting(id).catch(() => {});
    if (error.code === 'INCOMPLETE_BODY' || error.code === 'UPLOAD_TIMEOUT') {
      await ctx.records.transition(id, 'failed', ['queued', 'running'], { error, last_error: undefined, attempt_id: undefined }).catch(() => {});
    } else {
      const rec = await ctx.records.get(id).catch(() => undefined);
      if (rec) await ctx.records.remove(rec).catch(() => {});
      await ctx.stores.staging.delete(id).catch(() => {});
    }
  };
  try {
    await ctx.uploadMarks.set(id, { state: 'receiving', token, size: declared });
    const record = newJobRecord(id, request.tenant, { kind: 'upload', key: id, size: declared, sha256: '', ...(filename ? { filename } : {}) }, options, callback);
    delete record.source.sha256; // known once the last byte is in
    await submit(ctx, request, record);
    jobExists = true;
    request.log.info({ job: id, kind: 'upload', size: declared, streaming: true }, 'job created; converting while the upload arrives');

    async function* counted(): AsyncGenerator<Buffer> {
      for await (const chunk of replay(head, iterator, ended)) {
        size += chunk.length;
        if (size > declared) throw new ApiError('VALIDATION_FAILED', `the body is longer than its Content-Length (${declared})`);
        hash.update(chunk);
        yield chunk;
      }
      if (size < declared) throw new ApiError('INCOMPLETE_BODY', `the body ended after ${size} of the ${declared} bytes its Content-Length declared`);
    }
    await pipeline(counted(), writer.stream);
  } catch (err) {
    await writer.abort().catch(() => {});
    const failure = asBodyError(err);
    const error: JobError = isDiskconvError(failure) ? { code: failure.code, message: failure.message } : { code: 'INCOMPLETE_BODY', message: 'the upload failed before its last byte' };
    await failJob(error);
    request.log.info({ job: id, code: error.code, bytes: size }, 'streaming upload failed; its job fails with it');
    throw failure;
  }

  const sha256 = hash.digest('hex');
  await ctx.uploadMarks.set(id, { state: 'received', token, size, sha256 });
  // A job no worker has started yet shows its sha256 now; a running one is told by the mark (the worker records it).
  const queued = await ctx.records.get(id).catch(() => undefined);
  if (queued?.state === 'queued') await ctx.records.update(id, ['queued'], { source: { ...queued.source, size, sha256 } }).catch(() => {});
  if (options.expected_sha256 && options.expected_sha256 !== sha256) {
    const message = `the upload's sha256 is ${sha256}, expected ${options.expected_sha256}`;
    await writer.abort().catch(() => {});
    await failJob({ code: 'CHECKSUM_MISMATCH', message });
    throw new ApiError('CHECKSUM_MISMATCH', message);
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
  return reply.code(202).header('location', jobPath(id)).send(shown ? presentJob(shown) : { id });
}

async function submit(ctx: ApiContext, request: FastifyRequest, record: Parameters<typeof submitJob>[1]): Promise<void> {
  try {
    await submitJob(ctx, record);
  } catch (err) {
    request.log.error({ err }, 'enqueue failed');
    throw new ApiError('QUEUE_UNAVAILABLE', undefined, { 'retry-after': String(QUEUE_RETRY_AFTER_SECONDS) });
  }
}
