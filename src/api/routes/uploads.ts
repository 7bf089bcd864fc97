/**
 * Resumable uploads: the tus 1.0 protocol (core, creation, termination, checksum,
 * expiration) at /v1/uploads, by @tus/server with its file store under
 * DATA_DIR/uploads, or, with STORE_URL=s3://..., with our store that writes
 * straight into the bucket under the job's staging key (tus-s3-store.ts: the API
 * host keeps no byte on disk, and the completed upload is the staged input,
 * not copied). An upload's metadata carries the job options, read by the
 * same schema as POST /v1/jobs' fields (bodies.ts `readOptionFields`: filename,
 * source_format, expected_sha256, callback_url, output_target/rbd_pool/rbd_image,
 * glance as JSON text, passphrase) and checked when the upload is created, before
 * a byte is sent; the record is built by job-record.ts like any other job's. A
 * passphrase never stays in the upload's metadata (which the tus store keeps on
 * disk or in the bucket): it goes at once to the job's own Redis key, with the
 * upload's TTL. The job id is chosen at creation (so an RBD image defaults to it,
 * as for POST /v1/jobs); the tenant is bound to the upload
 * when it is created and checked on every later request (another tenant's upload
 * is a 404). A completed upload becomes a job exactly once: a Redis key claims
 * the upload id for one job, the bytes move into input staging (hashed on the
 * way), the job is enqueued, and the tus copy is removed; a HEAD of a completed
 * upload still answers its full offset and names the job (`Diskconv-Job`).
 * Unfinished uploads are removed UPLOAD_TTL_SECONDS after they were created.
 *
 * Several API processes may serve one upload (behind one balancer, on a shared
 * store): its lock is in Redis (tus-locker.ts), so no two of them write it at once.
 *
 * The checksum extension (which @tus/server does not implement) is done here: a
 * PATCH with `Upload-Checksum: <sha1|sha256|md5> <base64>` is spooled to a
 * scratch file while hashed, and handed on only when it matches (460 otherwise);
 * into the bucket it is hashed on its way and the store commits it only when the
 * digest matched (checksumScope), so nothing is spooled.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { pipeline as pipelineCallback } from 'node:stream';
import { FileStore } from '@tus/file-store';
import { Server, type Upload } from '@tus/server';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { isDiskconvError } from '../../engine/errors.js';
import { detectWrapper, WRAPPER_PROBE_BYTES } from '../../engine/index.js';
import { FileStaging } from '../../store/file/staging.js';
import { WriteBehind } from '../../store/file/write-behind.js';
import { S3Staging } from '../../store/s3/staging.js';
import { readOptionFields, streamToStore, type FieldOptions, type StoredUpload } from '../bodies.js';
import type { ApiContext } from '../context.js';
import { ApiError, problemFor, toProblem } from '../errors.js';
import { checkJobOptions, newJobRecord, submitJob } from '../job-record.js';
import { RedisLocker } from '../tus-locker.js';
import { checksumScope, TusS3Store } from '../tus-s3-store.js';
import { jobPath } from '../present.js';
import { newJobId } from './jobs.js';

export const UPLOADS_PATH = '/v1/uploads';
const CHECKSUM_ALGORITHMS = ['sha1', 'sha256', 'md5'] as const;
/** Metadata keys the server sets itself (a client sending one is refused); `filetype` is tus-js-client's, ignored. */
const SERVER_KEYS = ['tenant', 'job'] as const;
const IGNORED_KEYS = new Set(['filetype']);

/** A tus hook's refusal: @tus/server sends `body` with `status_code`. */
function refusal(code: Parameters<typeof problemFor>[0], detail: string, status?: number): { status_code: number; body: string } {
  const problem = problemFor(code, detail);
  return { status_code: status ?? problem.status, body: JSON.stringify(problem) };
}

/** Any error as a tus hook's refusal, with the status and problem the rest of the API would answer. */
function refusalOf(err: unknown): { status_code: number; body: string } {
  if (typeof err === 'object' && err !== null && 'status_code' in err) return err as { status_code: number; body: string };
  const { problem } = toProblem(err);
  return { status_code: problem.status, body: JSON.stringify(problem) };
}

/** The client's metadata as option fields: server keys and ignored keys left out; a key without a value is '' (for the schema to judge, never silently absent). */
function optionFieldsOf(meta: Record<string, string | null>): Record<string, string | undefined> {
  const fields: Record<string, string | undefined> = {};
  for (const [k, v] of Object.entries(meta)) {
    if (IGNORED_KEYS.has(k) || (SERVER_KEYS as readonly string[]).includes(k)) continue;
    fields[k] = v ?? '';
  }
  return fields;
}

/**
 * tus's file store, with each PATCH's bytes flushed to disk while they arrive (write-behind, one fdatasync per
 * 32 MiB in the background), so the fsync when the finished upload is linked into staging has little left to do.
 */
class FlushingFileStore extends FileStore {
  override async write(readable: Readable, id: string, offset: number): Promise<number> {
    const behind = await WriteBehind.open(join(this.directory, id)).catch(() => undefined);
    if (!behind) return super.write(readable, id, offset);
    let seen = 0;
    const counted = new Transform({
      transform(chunk: Buffer, _enc, done) {
        seen += chunk.length;
        behind.written(seen);
        done(null, chunk);
      },
    });
    // pipeline destroys `counted` with the body's error, so tus's own pipeline fails as it would without us.
    pipelineCallback(readable, counted, () => {});
    try {
      return await super.write(counted, id, offset);
    } finally {
      await behind.abort();
    }
  }
}

interface Claim {
  job: string;
  size: number;
}

export async function uploadRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  const ttlMs = ctx.config.uploads.ttlSeconds * 1000;
  const prefix = ctx.records.keyPrefix;
  const staging = ctx.stores.staging;
  const directory = join(ctx.config.dataDir, 'uploads');
  // Into the bucket when staging is one: no byte of an upload on this host's disk.
  const s3 = staging instanceof S3Staging ? staging : undefined;
  const s3Store = s3 ? new TusS3Store({ ...s3.access(), redis: ctx.redis, prefix, leases: ctx.leases, expirationMs: ttlMs }) : undefined;
  if (!s3Store) {
    await mkdir(directory, { recursive: true, mode: 0o750 });
    // A checksummed PATCH spools into the scratch folder for as long as it lasts; nothing stays there between requests.
    await mkdir(ctx.scratchDir, { recursive: true, mode: 0o750 });
  }
  const datastore = s3Store ?? new FlushingFileStore({ directory, expirationPeriodInMilliseconds: ttlMs });
  const claimKey = (uploadId: string): string => `${prefix}upload:${uploadId}`;
  /** Who is asking, per request handed to tus (set by the route before tus sees it). */
  const tenants = new WeakMap<Request, string>();
  const log = app.log;
  const bodyDeps = { config: ctx.config, staging, destinations: ctx.stores.destinations, policy: ctx.policy };

  /**
   * The completed upload as the job's staged input. File store: streamed into
   * staging, hashed on the way. Bucket: it is the staged object already; its
   * sha256 is the store's, and only a compressed wrapper is read back, to be
   * staged unwrapped under the same key (the new object replaces the old only
   * at its completion, after the last byte was read).
   */
  const stage = async (upload: Upload, id: string): Promise<StoredUpload> => {
    if (!s3Store || !s3) {
      const adopted = await adoptTusFile(upload, id);
      return adopted ?? streamToStore(createReadStream(join(directory, upload.id)), id, bodyDeps);
    }
    const size = upload.size ?? upload.offset;
    if (size === 0) throw new ApiError('EMPTY_BODY', 'the upload is empty');
    const source = await s3.open(id, `upload ${upload.id}`);
    let head: Uint8Array;
    try {
      head = await source.read(0, Math.min(size, WRAPPER_PROBE_BYTES));
    } finally {
      await source.close();
    }
    if (detectWrapper(head)) return streamToStore(await s3.read(id), id, bodyDeps);
    const started = Date.now();
    const { sha256, readBackBytes } = await s3Store.sha256Of(upload.id);
    // A resume that reached another API process: the digest cost one read of the whole object.
    if (readBackBytes > 0) log.info({ upload: upload.id, job: id, bytes: readBackBytes, ms: Date.now() - started }, 'sha256 of a tus upload read back from the bucket');
    return { size, sha256 };
  };

  /**
   * A plain (unwrapped) tus upload on the staging store's filesystem becomes the staged input by a hard link,
   * hashed by one read: no copy of the whole image after its last byte (a 1.2 GiB upload was copied for 6.6 s,
   * under load, before its job existed). tus keeps its own name for the file until the job exists (then
   * `datastore.remove` drops it), so a failed completion can still be retried with the last PATCH. Undefined when
   * it must be copied: a compressed wrapper (decompressed into staging), an empty upload (refused there), S3 or
   * another filesystem.
   */
  const adoptTusFile = async (upload: Upload, id: string): Promise<StoredUpload | undefined> => {
    if (!(staging instanceof FileStaging) || !(datastore instanceof FileStore)) return undefined;
    const path = join(directory, upload.id);
    const handle = await open(path, 'r');
    let head: Buffer;
    try {
      const { bytesRead, buffer } = await handle.read(Buffer.alloc(WRAPPER_PROBE_BYTES), 0, WRAPPER_PROBE_BYTES, 0);
      head = buffer.subarray(0, bytesRead);
    } finally {
      await handle.close();
    }
    if (head.length === 0 || detectWrapper(head)) return undefined;
    const hash = createHash('sha256');
    let size = 0;
    for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
      size += chunk.length;
      hash.update(chunk);
    }
    if (size !== (upload.size ?? size)) return undefined;
    const adopted = await staging.adopt(id, path);
    if (!adopted) return undefined;
    return { size, sha256: hash.digest('hex') };
  };

  const finish = async (req: Request, upload: Upload): Promise<{ headers: Record<string, string> }> => {
    const tenant = tenants.get(req) ?? '';
    const meta = upload.metadata ?? {};
    const id = meta.job ?? newJobId();
    const size = upload.size ?? upload.offset;
    const claimed = await ctx.redis.set(claimKey(upload.id), JSON.stringify({ job: id, size } satisfies Claim), 'EX', ctx.config.retention.resultTtlSeconds, 'NX');
    if (claimed !== 'OK') {
      const existing = JSON.parse((await ctx.redis.get(claimKey(upload.id))) ?? '{}') as Partial<Claim>;
      return { headers: { 'Diskconv-Job': jobPath(existing.job ?? '') } };
    }
    try {
      const lease = await ctx.leases.hold(id);
      try {
        // Into staging the way POST /v1/jobs stores a body: hashed as received, a compressed wrapper removed on the way.
        let stored: StoredUpload;
        try {
          stored = await stage(upload, id);
        } catch (err) {
          // The bytes themselves are refused (a corrupt wrapper, a bomb): final, like the same body sent to POST /v1/jobs.
          if (!(isDiskconvError(err) && err.deterministic)) throw err;
          if (s3Store) await ctx.stores.staging.delete(id).catch(() => {});
          await ctx.records.deletePassphrase(id).catch(() => {});
          await ctx.redis.del(claimKey(upload.id));
          await datastore.remove(upload.id).catch(() => {});
          throw refusalOf(err);
        }
        const { sha256 } = stored;
        let fields: FieldOptions;
        let callback: Awaited<ReturnType<typeof checkJobOptions>>;
        try {
          // Checked at creation already; again now, by the same rules, in case the configuration changed since.
          fields = readOptionFields(optionFieldsOf(meta), id, ctx.stores, { passphrase: false, filename: true });
          callback = await checkJobOptions(ctx, fields.options);
          const expected = fields.options.expected_sha256;
          if (expected && expected !== sha256) throw refusal('CHECKSUM_MISMATCH', `the upload's sha256 is ${sha256}, expected ${expected}`);
        } catch (err) {
          await ctx.stores.staging.delete(id).catch(() => {});
          await ctx.records.deletePassphrase(id).catch(() => {});
          await ctx.redis.del(claimKey(upload.id));
          await datastore.remove(upload.id).catch(() => {});
          throw refusalOf(err);
        }
        const passphrase = await ctx.records.getPassphrase(id);
        const source = { kind: 'upload' as const, key: id, ...stored, ...(fields.filename ? { filename: fields.filename } : {}) };
        try {
          await submitJob(ctx, newJobRecord(id, tenant, source, fields.options, callback), passphrase);
        } catch (err) {
          // submitJob took the half-made job back, passphrase included: a retried PATCH needs it again.
          if (passphrase !== undefined) await ctx.records.putPassphrase(id, passphrase, ctx.config.uploads.ttlSeconds + 3600).catch(() => {});
          throw err;
        }
        log.info({ job: id, upload: upload.id, size }, 'job created from a tus upload');
      } finally {
        await lease.release();
      }
    } catch (err) {
      if (typeof err === 'object' && err !== null && 'status_code' in err) throw err;
      await ctx.redis.del(claimKey(upload.id)).catch(() => {});
      // The staged object waits for the retried PATCH: keep the sweeps off it meanwhile.
      if (s3Store) await ctx.leases.reserve(id, ttlMs).catch(() => {});
      log.error({ err, upload: upload.id }, 'could not turn a finished upload into a job');
      throw refusal(isDiskconvError(err) && err.code === 'INSUFFICIENT_SPACE' ? 'INSUFFICIENT_SPACE' : 'QUEUE_UNAVAILABLE', 'the upload is complete but its job could not be created; retry the last PATCH');
    }
    // The bytes are in staging now; the tus copy goes (its claim answers HEADs from here on).
    await datastore.remove(upload.id).catch(() => {});
    return { headers: { 'Diskconv-Job': jobPath(id) } };
  };

  // One lock per upload across every API process (a file store every API shares, or the bucket).
  const subscriber = ctx.redis.duplicate({ enableOfflineQueue: true });
  subscriber.on('error', (err) => log.warn({ err: err.message }, 'tus locker: redis connection error'));
  const locker = new RedisLocker(ctx.redis, subscriber, prefix);
  app.addHook('onClose', async () => locker.close());

  const tus = new Server({
    path: UPLOADS_PATH,
    datastore,
    locker,
    relativeLocation: true,
    respectForwardedHeaders: ctx.config.trustProxy,
    maxSize: ctx.config.maxUploadBytes,
    namingFunction: () => randomBytes(16).toString('hex'),
    exposedHeaders: ['Diskconv-Job'],
    async onUploadCreate(req, upload) {
      const meta = upload.metadata ?? {};
      for (const key of SERVER_KEYS) if (key in meta) throw refusal('VALIDATION_FAILED', `metadata key '${key}' is set by the server`);
      if (upload.size === undefined) throw refusal('VALIDATION_FAILED', 'Upload-Length is required (Upload-Defer-Length is not accepted)');
      const job = newJobId();
      let passphrase: string | undefined;
      try {
        // The same schema and checks as POST /v1/jobs, before a byte of the image is sent.
        const fields = readOptionFields(optionFieldsOf(meta), job, ctx.stores, { passphrase: true, filename: true });
        await checkJobOptions(ctx, fields.options);
        passphrase = fields.passphrase;
      } catch (err) {
        throw refusalOf(err);
      }
      // The passphrase goes to the job's own key now (until the upload would expire), never into the stored metadata.
      if (passphrase !== undefined) await ctx.records.putPassphrase(job, passphrase, ctx.config.uploads.ttlSeconds + 3600);
      const { passphrase: _dropped, ...kept } = meta;
      // The tenant and the job id go with the upload, set here and never taken from the client.
      return { metadata: { ...kept, tenant: tenants.get(req) ?? '', job } };
    },
    async onIncomingRequest(req, uploadId) {
      if (req.method === 'POST' || req.method === 'OPTIONS') return;
      const upload = await datastore.getUpload(uploadId).catch(() => undefined);
      if (!upload || upload.metadata?.tenant !== tenants.get(req)) throw refusal('NOT_FOUND', 'no such upload');
    },
    onUploadFinish: finish,
  });

  // Unfinished uploads go after UPLOAD_TTL_SECONDS (every API process sweeps; removals are idempotent).
  const sweep = setInterval(() => {
    tus.cleanUpExpiredUploads().catch((err: unknown) => log.warn({ err }, 'tus expiry sweep failed'));
  }, Math.min(60_000, ttlMs));
  sweep.unref();
  app.addHook('onClose', async () => clearInterval(sweep));

  // tus bodies reach the handler untouched.
  app.addContentTypeParser('application/offset+octet-stream', (_request, payload, done) => done(null, payload));

  /** A checksum'd PATCH: spool and hash; hand on the spooled bytes only when they match. */
  const parseChecksum = (header: string): { algorithm: string; digest: string } | undefined => {
    const m = /^(\w+) ([A-Za-z0-9+/=]+)$/.exec(header.trim());
    if (!m || !(CHECKSUM_ALGORITHMS as readonly string[]).includes(m[1] as string)) return undefined;
    return { algorithm: m[1] as string, digest: m[2] as string };
  };
  const CHECKSUM_FORMAT = `Upload-Checksum must be '<${CHECKSUM_ALGORITHMS.join('|')}> <base64>'`;

  /**
   * A checksum'd PATCH into the bucket: hashed on its way to the store, which
   * commits it only if the stream ends cleanly (checksumScope); a digest that
   * does not match ends the stream with an error instead, and the route answers 460.
   */
  const checkInline = (request: FastifyRequest, expected: { algorithm: string; digest: string }): { body: Readable; mismatched: () => boolean } => {
    const hash = createHash(expected.algorithm);
    let mismatch = false;
    const body = new Transform({
      transform(chunk: Buffer, _enc, done) {
        hash.update(chunk);
        done(null, chunk);
      },
      flush(done) {
        if (hash.digest('base64') === expected.digest) return done();
        mismatch = true;
        done(new Error('Checksum Mismatch'));
      },
    });
    request.raw.on('error', (err) => body.destroy(err));
    request.raw.pipe(body);
    return { body, mismatched: () => mismatch };
  };

  const verifyChecksum = async (request: FastifyRequest, header: string): Promise<{ body: Readable; cleanup: () => Promise<void> } | { status: number; message: string }> => {
    const m = /^(\w+) ([A-Za-z0-9+/=]+)$/.exec(header.trim());
    if (!m || !(CHECKSUM_ALGORITHMS as readonly string[]).includes(m[1] as string)) return { status: 400, message: CHECKSUM_FORMAT };
    const path = join(ctx.scratchDir, `tus-checksum.${randomBytes(12).toString('hex')}`);
    const hash = createHash(m[1] as string);
    const limit = ctx.config.maxUploadBytes;
    let seen = 0;
    try {
      await pipeline(
        request.raw,
        new Transform({
          transform(chunk: Buffer, _enc, done) {
            seen += chunk.length;
            if (seen > limit) return done(new Error('too large'));
            hash.update(chunk);
            done(null, chunk);
          },
        }),
        createWriteStream(path, { mode: 0o600 }),
      );
    } catch {
      await rm(path, { force: true });
      return { status: 400, message: 'the PATCH body could not be read' };
    }
    if (hash.digest('base64') !== m[2]) {
      await rm(path, { force: true });
      return { status: 460, message: 'Checksum Mismatch' };
    }
    return { body: createReadStream(path), cleanup: () => rm(path, { force: true }) };
  };

  const handle = async (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> => {
    const { upload_id: uploadId } = (request.params ?? {}) as { upload_id?: string };
    // A completed upload is a job now: HEAD says so; a repeated final PATCH is answered as done.
    // True once it has answered. (Not the reply itself: a FastifyReply is a thenable that settles with undefined, so an
    // async function returning it would come back undefined and the request would be answered twice.)
    const completed = async (): Promise<boolean> => {
      if (!uploadId || (request.method !== 'HEAD' && request.method !== 'PATCH')) return false;
      const raw = await ctx.redis.get(claimKey(uploadId));
      if (!raw) return false;
      const claim = JSON.parse(raw) as Claim;
      const rec = await ctx.records.get(claim.job);
      // Claimed but no record yet: its job is being made; tus still has the upload and answers.
      if (!rec) return false;
      if (rec.tenant !== request.tenant) {
        reply.code(404).header('tus-resumable', '1.0.0').header('cache-control', 'no-store').send();
        return true;
      }
      reply
        .code(request.method === 'HEAD' ? 200 : 204)
        .header('tus-resumable', '1.0.0')
        .header('upload-offset', String(claim.size))
        .header('upload-length', String(claim.size))
        .header('cache-control', 'no-store')
        .header('diskconv-job', jobPath(claim.job))
        .send();
      return true;
    };
    if (await completed()) return reply;
    let body: Readable | undefined;
    let cleanup: (() => Promise<void>) | undefined;
    let mismatched: (() => boolean) | undefined;
    const checksum = request.headers['upload-checksum'];
    if (request.method === 'PATCH' && typeof checksum === 'string' && s3Store) {
      const expected = parseChecksum(checksum);
      if (!expected) return reply.code(400).header('tus-resumable', '1.0.0').type('text/plain').send(CHECKSUM_FORMAT);
      ({ body, mismatched } = checkInline(request, expected));
    } else if (request.method === 'PATCH' && typeof checksum === 'string') {
      const verified = await verifyChecksum(request, checksum);
      if ('status' in verified) return reply.code(verified.status).header('tus-resumable', '1.0.0').type('text/plain').send(verified.message);
      ({ body, cleanup } = verified);
    } else if (request.method === 'PATCH' || request.method === 'POST') {
      body = request.raw;
    }
    try {
      const headers = new Headers();
      for (const [k, v] of Object.entries(request.headers)) {
        if (v === undefined || k === 'upload-checksum') continue;
        headers.set(k, Array.isArray(v) ? v.join(', ') : v);
      }
      const webRequest = new Request(`http://localhost${request.url}`, {
        method: request.method,
        headers,
        ...(body ? { body: Readable.toWeb(body) as ReadableStream, duplex: 'half' } : {}),
      } as RequestInit);
      tenants.set(webRequest, request.tenant);
      const response = mismatched ? await checksumScope.run({ checksummed: true }, () => tus.handleWeb(webRequest)) : await tus.handleWeb(webRequest);
      if (mismatched?.()) {
        await response.body?.cancel().catch(() => {});
        return reply.code(460).header('tus-resumable', '1.0.0').type('text/plain').send('Checksum Mismatch');
      }
      // Completed (and its tus copy removed, or half removed: tus says 410) by another request meanwhile.
      if (response.status === 404 || response.status === 410) {
        if (await completed()) return reply;
      }
      reply.code(response.status);
      response.headers.forEach((value, key) => {
        if (key === 'tus-extension') value = `${value},checksum`;
        reply.header(key, value);
      });
      if (request.method === 'OPTIONS') reply.header('tus-checksum-algorithm', CHECKSUM_ALGORITHMS.join(','));
      const text = response.body ? await response.text() : '';
      return reply.send(text === '' ? undefined : text);
    } finally {
      await cleanup?.();
    }
  };

  const writeLimit = { rateLimit: { max: ctx.config.rateLimit.reads, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } };
  app.route({ method: ['POST', 'OPTIONS'], url: UPLOADS_PATH, config: writeLimit, handler: handle });
  app.route({ method: ['HEAD', 'PATCH', 'DELETE', 'OPTIONS'], url: `${UPLOADS_PATH}/:upload_id`, config: writeLimit, handler: handle });
}
