/**
 * Resumable uploads: the tus 1.0 protocol (core, creation, termination, checksum,
 * expiration) at /v1/uploads, by @tus/server with its file store under
 * DATA_DIR/uploads. An upload's metadata carries the job options (filename,
 * source_format, expected_sha256, callback_url); the tenant is bound to the upload
 * when it is created and checked on every later request (another tenant's upload
 * is a 404). A completed upload becomes a job exactly once: a Redis key claims
 * the upload id for one job, the bytes move into input staging (hashed on the
 * way), the job is enqueued, and the tus copy is removed; a HEAD of a completed
 * upload still answers its full offset and names the job (`Diskconv-Job`).
 * Unfinished uploads are removed UPLOAD_TTL_SECONDS after they were created.
 *
 * The checksum extension (which @tus/server does not implement) is done here: a
 * PATCH with `Upload-Checksum: <sha1|sha256|md5> <base64>` is spooled to a
 * scratch file while hashed, and handed on only when it matches (460 otherwise).
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { FileStore } from '@tus/file-store';
import { Server, type Upload } from '@tus/server';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { isDiskconvError } from '../../engine/errors.js';
import type { JobRecord, SourceFormat } from '../../queue/records.js';
import { checkCallbackUrl, initialCallback } from '../../queue/webhooks.js';
import { sanitizeFilename, SOURCE_FORMATS } from '../bodies.js';
import type { ApiContext } from '../context.js';
import { problemFor } from '../errors.js';
import { jobPath } from '../present.js';
import { newJobId } from './jobs.js';

export const UPLOADS_PATH = '/v1/uploads';
const CHECKSUM_ALGORITHMS = ['sha1', 'sha256', 'md5'] as const;
const METADATA_KEYS = new Set(['filename', 'filetype', 'source_format', 'expected_sha256', 'callback_url']);

/** A tus hook's refusal: @tus/server sends `body` with `status_code`. */
function refusal(code: Parameters<typeof problemFor>[0], detail: string, status?: number): { status_code: number; body: string } {
  const problem = problemFor(code, detail);
  return { status_code: status ?? problem.status, body: JSON.stringify(problem) };
}

interface Claim {
  job: string;
  size: number;
}

export async function uploadRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  const directory = join(ctx.config.dataDir, 'uploads');
  await mkdir(directory, { recursive: true, mode: 0o750 });
  // A checksummed PATCH spools into the scratch folder for as long as it lasts; nothing stays there between requests.
  await mkdir(ctx.scratchDir, { recursive: true, mode: 0o750 });
  const ttlMs = ctx.config.uploads.ttlSeconds * 1000;
  const datastore = new FileStore({ directory, expirationPeriodInMilliseconds: ttlMs });
  const prefix = ctx.records.keyPrefix;
  const claimKey = (uploadId: string): string => `${prefix}upload:${uploadId}`;
  /** Who is asking, per request handed to tus (set by the route before tus sees it). */
  const tenants = new WeakMap<Request, string>();
  const log = app.log;

  const finish = async (req: Request, upload: Upload): Promise<{ headers: Record<string, string> }> => {
    const tenant = tenants.get(req) ?? '';
    const meta = upload.metadata ?? {};
    const id = newJobId();
    const size = upload.size ?? upload.offset;
    const claimed = await ctx.redis.set(claimKey(upload.id), JSON.stringify({ job: id, size } satisfies Claim), 'EX', ctx.config.retention.resultTtlSeconds, 'NX');
    if (claimed !== 'OK') {
      const existing = JSON.parse((await ctx.redis.get(claimKey(upload.id))) ?? '{}') as Partial<Claim>;
      return { headers: { 'Diskconv-Job': jobPath(existing.job ?? '') } };
    }
    try {
      const lease = await ctx.leases.hold(id);
      try {
        // Into staging, hashed on the way: the job's source is exactly what was received.
        const hash = createHash('sha256');
        const writer = await ctx.stores.staging.create(id);
        try {
          await pipeline(
            createReadStream(join(directory, upload.id)),
            new Transform({
              transform(chunk: Buffer, _enc, done) {
                hash.update(chunk);
                done(null, chunk);
              },
            }),
            writer.stream,
          );
          await writer.commit();
        } catch (err) {
          await writer.abort().catch(() => {});
          throw err;
        }
        const sha256 = hash.digest('hex');
        if (meta.expected_sha256 && meta.expected_sha256.toLowerCase() !== sha256) {
          await ctx.stores.staging.delete(id).catch(() => {});
          await ctx.redis.del(claimKey(upload.id));
          await datastore.remove(upload.id).catch(() => {});
          throw refusal('CHECKSUM_MISMATCH', `the upload's sha256 is ${sha256}, expected ${meta.expected_sha256}`);
        }
        const now = Date.now();
        const filename = sanitizeFilename(meta.filename ?? undefined);
        const record: JobRecord = {
          id,
          tenant,
          state: 'queued',
          source_format: (meta.source_format ?? 'auto') as SourceFormat,
          output_format: 'raw',
          ...(meta.expected_sha256 ? { expected_sha256: meta.expected_sha256.toLowerCase() } : {}),
          created_at: now,
          updated_at: now,
          attempts: 0,
          source: { kind: 'upload', size, sha256, ...(filename ? { filename } : {}) },
          progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null },
          ...(meta.callback_url ? { callback_url: meta.callback_url, callback: initialCallback() } : {}),
        };
        try {
          await ctx.records.create(record);
          await ctx.queue.enqueue(id);
        } catch (err) {
          await ctx.records.remove(record).catch(() => {});
          await ctx.stores.staging.delete(id).catch(() => {});
          throw err;
        }
        log.info({ job: id, upload: upload.id, size }, 'job created from a tus upload');
      } finally {
        await lease.release();
      }
    } catch (err) {
      if (typeof err === 'object' && err !== null && 'status_code' in err) throw err;
      await ctx.redis.del(claimKey(upload.id)).catch(() => {});
      log.error({ err, upload: upload.id }, 'could not turn a finished upload into a job');
      throw refusal(isDiskconvError(err) && err.code === 'INSUFFICIENT_SPACE' ? 'INSUFFICIENT_SPACE' : 'QUEUE_UNAVAILABLE', 'the upload is complete but its job could not be created; retry the last PATCH');
    }
    // The bytes are in staging now; the tus copy goes (its claim answers HEADs from here on).
    await datastore.remove(upload.id).catch(() => {});
    return { headers: { 'Diskconv-Job': jobPath(id) } };
  };

  const tus = new Server({
    path: UPLOADS_PATH,
    datastore,
    relativeLocation: true,
    respectForwardedHeaders: ctx.config.trustProxy,
    maxSize: ctx.config.maxUploadBytes,
    namingFunction: () => randomBytes(16).toString('hex'),
    exposedHeaders: ['Diskconv-Job'],
    async onUploadCreate(req, upload) {
      const meta = upload.metadata ?? {};
      for (const key of Object.keys(meta)) if (!METADATA_KEYS.has(key)) throw refusal('VALIDATION_FAILED', `unknown metadata key '${key.slice(0, 64)}'; allowed: ${[...METADATA_KEYS].join(', ')}`);
      if (meta.source_format && !(SOURCE_FORMATS as readonly string[]).includes(meta.source_format)) {
        throw refusal('VALIDATION_FAILED', `source_format must be one of ${SOURCE_FORMATS.join(', ')}`);
      }
      if (meta.expected_sha256 && !/^[0-9a-fA-F]{64}$/.test(meta.expected_sha256)) throw refusal('VALIDATION_FAILED', 'expected_sha256 must be 64 hex digits');
      if (meta.callback_url) {
        try {
          await checkCallbackUrl(meta.callback_url, ctx.config);
        } catch (err) {
          if (isDiskconvError(err)) throw refusal(err.code === 'URL_REFUSED' ? 'URL_REFUSED' : 'INVALID_ARGUMENT', err.message);
          throw err;
        }
      }
      if (upload.size === undefined) throw refusal('VALIDATION_FAILED', 'Upload-Length is required (Upload-Defer-Length is not accepted)');
      // The tenant goes with the upload, set here and never taken from the client.
      return { metadata: { ...meta, tenant: tenants.get(req) ?? '' } };
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
  const verifyChecksum = async (request: FastifyRequest, header: string): Promise<{ body: Readable; cleanup: () => Promise<void> } | { status: number; message: string }> => {
    const m = /^(\w+) ([A-Za-z0-9+/=]+)$/.exec(header.trim());
    if (!m || !(CHECKSUM_ALGORITHMS as readonly string[]).includes(m[1] as string)) return { status: 400, message: `Upload-Checksum must be '<${CHECKSUM_ALGORITHMS.join('|')}> <base64>'` };
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
    if (uploadId && (request.method === 'HEAD' || request.method === 'PATCH')) {
      const raw = await ctx.redis.get(claimKey(uploadId));
      if (raw) {
        const claim = JSON.parse(raw) as Claim;
        const rec = await ctx.records.get(claim.job);
        if (!rec || rec.tenant !== request.tenant) return reply.code(404).header('tus-resumable', '1.0.0').header('cache-control', 'no-store').send();
        return reply
          .code(request.method === 'HEAD' ? 200 : 204)
          .header('tus-resumable', '1.0.0')
          .header('upload-offset', String(claim.size))
          .header('upload-length', String(claim.size))
          .header('cache-control', 'no-store')
          .header('diskconv-job', jobPath(claim.job))
          .send();
      }
    }
    let body: Readable | undefined;
    let cleanup: (() => Promise<void>) | undefined;
    const checksum = request.headers['upload-checksum'];
    if (request.method === 'PATCH' && typeof checksum === 'string') {
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
      const response = await tus.handleWeb(webRequest);
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
