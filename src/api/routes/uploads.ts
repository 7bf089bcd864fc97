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
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, open, rm, stat } from 'node:fs/promises';
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

/** What the routes learn of each PATCH as tus writes it (the sha256 on the way, the overlap's start and resumes). */
interface WriteHooks {
  /** Before a PATCH's first byte is written at `offset`. Never throws. */
  before(id: string, offset: number): Promise<void>;
  /** A chunk on its way to the file at `at`. */
  chunk(id: string, at: number, chunk: Buffer): void;
  /** The PATCH ended: the file's new end, or undefined when the write failed. Never throws. */
  after(id: string, end: number | undefined): Promise<void>;
}

/**
 * tus's file store, with each PATCH's bytes flushed to disk while they arrive (write-behind, one fdatasync per
 * 32 MiB in the background), so the fsync when the finished upload is linked into staging has little left to do;
 * and each chunk shown to the routes (WriteHooks) on its way.
 */
class FlushingFileStore extends FileStore {
  hooks: WriteHooks | undefined;

  override async write(readable: Readable, id: string, offset: number): Promise<number> {
    const hooks = this.hooks;
    await hooks?.before(id, offset);
    const behind = await WriteBehind.open(join(this.directory, id)).catch(() => undefined);
    let seen = 0;
    const counted = new Transform({
      transform(chunk: Buffer, _enc, done) {
        hooks?.chunk(id, offset + seen, chunk);
        seen += chunk.length;
        behind?.written(seen);
        done(null, chunk);
      },
    });
    // pipeline destroys `counted` with the body's error, so tus's own pipeline fails as it would without us.
    pipelineCallback(readable, counted, () => {});
    let end: number | undefined;
    try {
      end = await super.write(counted, id, offset);
      return end;
    } finally {
      await behind?.abort();
      await hooks?.after(id, end);
    }
  }
}

/** The sha256 of an upload's bytes from its first, hashed as its PATCHes arrive in this process. */
interface RunningHash {
  hash: Hash;
  /** Bytes hashed (the upload's offset when in step). */
  at: number;
  touched: number;
}

/** A tus upload converted while it arrives: its job, and the token of the staging link its worker follows. */
interface Overlap {
  job: string;
  token?: string;
  /** Set once the job exists: an overlap whose start died before that is undone at completion, and staged whole. */
  created?: boolean;
}

/** Uploads smaller than this are staged whole: a worker following them gains nothing. */
const OVERLAP_MIN_BYTES = 2 ** 20;

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

  // ---- Conversion while the PATCHes arrive (file store): see the README's "tus uploads convert as they arrive".
  const fileStaging = staging instanceof FileStaging ? staging : undefined;
  const overlapOn = ctx.config.streamUploads && fileStaging !== undefined && datastore instanceof FlushingFileStore;
  const overlapKey = (uploadId: string): string => `${prefix}upload-overlap:${uploadId}`;
  const overlapTtl = ctx.config.uploads.ttlSeconds + ctx.config.retention.resultTtlSeconds;
  const hashes = new Map<string, RunningHash>();
  /** Overlaps being started by a PATCH of this process (the upload's completion waits for its start). */
  const starting = new Map<string, Promise<void>>();
  const getOverlap = async (uploadId: string): Promise<Overlap | undefined> => {
    const raw = await ctx.redis.get(overlapKey(uploadId));
    return raw ? (JSON.parse(raw) as Overlap) : undefined;
  };

  /**
   * The first bytes of an upload show a plain image: its job is made now, and a worker converts while the rest
   * arrives, reading tus's file through a hard link in staging's uncommitted writes (the worker's side is
   * src/queue/upload-stream.ts, the same as for a POST /v1/jobs body). Anything that goes wrong here leaves the
   * upload on the staged path: its job is made at completion, as before. Never throws.
   */
  const startOverlap = async (uploadId: string, head: Buffer): Promise<void> => {
    if (!fileStaging) return;
    let upload: Upload;
    try {
      upload = await datastore.getUpload(uploadId);
    } catch {
      return;
    }
    const size = upload.size;
    const meta = upload.metadata ?? {};
    const id = meta.job;
    if (size === undefined || size < OVERLAP_MIN_BYTES || !id || detectWrapper(head) !== undefined) return;
    if ((await ctx.redis.set(overlapKey(uploadId), JSON.stringify({ job: id } satisfies Overlap), 'EX', overlapTtl, 'NX').catch(() => null)) !== 'OK') return;
    let token: string | undefined;
    let marked = false;
    try {
      token = await fileStaging.linkUncommitted(id, join(directory, uploadId));
      if (token === undefined) throw new Error('tus uploads and staging lie on different filesystems');
      const fields = readOptionFields(optionFieldsOf(meta), id, ctx.stores, { passphrase: false, filename: true });
      const callback = await checkJobOptions(ctx, fields.options);
      const created = Date.parse(upload.creation_date ?? '');
      const expires = (Number.isFinite(created) ? created : Date.now()) + ttlMs;
      // The link is the job's until the upload completes or expires: the sweeps leave it alone meanwhile.
      await ctx.leases.reserve(id, Math.max(1000, expires - Date.now() + 60_000));
      await ctx.redis.set(overlapKey(uploadId), JSON.stringify({ job: id, token } satisfies Overlap), 'EX', overlapTtl);
      await ctx.uploadMarks.set(id, { state: 'receiving', token, size, resumable: { idleMs: ctx.config.tusOverlapIdleMs, expires, patch: 1 } });
      marked = true;
      const passphrase = await ctx.records.getPassphrase(id);
      const record = newJobRecord(id, meta.tenant ?? '', { kind: 'upload', key: id, size, sha256: '', ...(fields.filename ? { filename: fields.filename } : {}) }, fields.options, callback);
      delete record.source.sha256; // known once the last byte is in
      try {
        await submitJob(ctx, record, passphrase);
      } catch (err) {
        if (passphrase !== undefined) await ctx.records.putPassphrase(id, passphrase, ctx.config.uploads.ttlSeconds + 3600).catch(() => {});
        throw err;
      }
      await ctx.redis.set(overlapKey(uploadId), JSON.stringify({ job: id, token, created: true } satisfies Overlap), 'EX', overlapTtl);
      log.info({ job: id, upload: uploadId, size, streaming: true }, 'job created; converting while the tus upload arrives');
    } catch (err) {
      log.warn({ err, upload: uploadId, job: id }, 'could not convert the tus upload as it arrives; it is staged whole instead');
      if (marked) await ctx.uploadMarks.delete(id).catch(() => {});
      if (token !== undefined) await fileStaging.dropUncommitted(id, token).catch(() => {});
      await ctx.redis.del(overlapKey(uploadId)).catch(() => {});
    }
  };

  if (datastore instanceof FlushingFileStore) {
    datastore.hooks = {
      // A PATCH of an overlapped upload begins: the worker is told (a parked job runs again), the link restored if swept.
      before: async (uploadId, offset) => {
        if (!overlapOn || offset === 0) return;
        try {
          await starting.get(uploadId);
          const overlap = await getOverlap(uploadId);
          if (!overlap?.token || !overlap.created || !fileStaging) return;
          const mark = await ctx.uploadMarks.get(overlap.job);
          if (mark?.state !== 'receiving' || !mark.resumable) return;
          let token = mark.token;
          const path = fileStaging.followPath(overlap.job, token);
          if (path === undefined || !(await stat(path).catch(() => undefined))) {
            token = (await fileStaging.linkUncommitted(overlap.job, join(directory, uploadId))) ?? token;
            await ctx.redis.set(overlapKey(uploadId), JSON.stringify({ ...overlap, token } satisfies Overlap), 'EX', overlapTtl);
          }
          // Only over the `receiving` mark just read: a termination that failed the upload meanwhile stands.
          if (!(await ctx.uploadMarks.advance(overlap.job, { ...mark, token, resumable: { ...mark.resumable, patch: mark.resumable.patch + 1 } }))) return;
          await ctx.queue.promote?.(overlap.job);
        } catch (err) {
          log.warn({ err, upload: uploadId }, 'could not tell the worker that a tus upload resumed; it converts once the upload completes');
        }
      },
      chunk: (uploadId, at, chunk) => {
        let running = hashes.get(uploadId);
        if (at === 0) {
          running = { hash: createHash('sha256'), at: 0, touched: Date.now() };
          hashes.set(uploadId, running);
          if (overlapOn && chunk.length >= WRAPPER_PROBE_BYTES && !starting.has(uploadId)) {
            const started = startOverlap(uploadId, Buffer.from(chunk.subarray(0, WRAPPER_PROBE_BYTES))).finally(() => starting.delete(uploadId));
            starting.set(uploadId, started);
          }
        }
        if (!running) return;
        if (running.at !== at) {
          hashes.delete(uploadId); // out of step (a PATCH that failed half-written): read back at completion
          return;
        }
        running.hash.update(chunk);
        running.at += chunk.length;
        running.touched = Date.now();
      },
      after: async (uploadId, end) => {
        const running = hashes.get(uploadId);
        if (!running) return;
        // A failed write may have left fewer bytes in the file than were hashed: keep the hash only when in step.
        const at = end ?? (await stat(join(directory, uploadId)).then((st) => st.size, () => -1));
        if (at !== running.at) hashes.delete(uploadId);
      },
    };
  }

  /** The sha256 of a finished upload's file: hashed as it arrived when this process saw every byte, else one read. */
  const sha256OfFile = async (uploadId: string, size: number): Promise<string> => {
    const running = hashes.get(uploadId);
    // A copy: the completion may fail and be retried with the last PATCH.
    if (running && running.at === size) return running.hash.copy().digest('hex');
    const started = Date.now();
    const hash = createHash('sha256');
    let read = 0;
    for await (const chunk of createReadStream(join(directory, uploadId), { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
      read += chunk.length;
      hash.update(chunk);
    }
    if (read !== size) throw new Error(`the finished upload's file holds ${read} bytes, ${size} expected`);
    log.info({ upload: uploadId, bytes: read, ms: Date.now() - started }, 'sha256 of a tus upload read back from its file');
    return hash.digest('hex');
  };

  /** The job of an overlapped upload ended by its client or refused: it fails (or goes), its staging link with it. */
  const endOverlapJob = async (id: string, error: { code: string; message: string }, remove: boolean): Promise<void> => {
    await ctx.uploadMarks.set(id, { state: 'failed', ...error }).catch(() => {});
    await ctx.queue.removeWaiting(id).catch(() => {});
    if (remove) {
      const rec = await ctx.records.get(id).catch(() => undefined);
      if (rec) await ctx.records.remove(rec).catch(() => {});
      await ctx.records.publishCancel(id).catch(() => {});
      await ctx.stores.output.delete(id).catch(() => {});
    } else {
      await ctx.records.transition(id, 'failed', ['queued', 'running'], { error, last_error: undefined, attempt_id: undefined }).catch(() => {});
    }
    await ctx.stores.staging.delete(id).catch(() => {});
  };

  /**
   * The last byte of an overlapped upload is in: its staged copy is committed (fsync, hard link: no copy, and no
   * read when this process hashed every byte on the way), the worker told (the mark), a parked job run again.
   * The tus file keeps its own name until this succeeded, so a failure here is retried with the last PATCH.
   */
  const finishOverlapped = async (upload: Upload, overlap: Overlap & { token: string }): Promise<{ headers: Record<string, string> }> => {
    const id = overlap.job;
    const size = upload.size ?? upload.offset;
    const claimed = await ctx.redis.set(claimKey(upload.id), JSON.stringify({ job: id, size } satisfies Claim), 'EX', ctx.config.retention.resultTtlSeconds, 'NX');
    if (claimed !== 'OK') {
      const existing = JSON.parse((await ctx.redis.get(claimKey(upload.id))) ?? '{}') as Partial<Claim>;
      return { headers: { 'Diskconv-Job': jobPath(existing.job ?? id) } };
    }
    try {
      const lease = await ctx.leases.hold(id);
      try {
        const sha256 = await sha256OfFile(upload.id, size);
        const fields = readOptionFields(optionFieldsOf(upload.metadata ?? {}), id, ctx.stores, { passphrase: false, filename: true });
        const expected = fields.options.expected_sha256;
        if (expected && expected !== sha256) {
          const message = `the upload's sha256 is ${sha256}, expected ${expected}`;
          await endOverlapJob(id, { code: 'CHECKSUM_MISMATCH', message }, true);
          await ctx.records.deletePassphrase(id).catch(() => {});
          await ctx.redis.del(claimKey(upload.id), overlapKey(upload.id));
          await datastore.remove(upload.id).catch(() => {});
          hashes.delete(upload.id);
          throw refusal('CHECKSUM_MISMATCH', message);
        }
        if (!fileStaging || !(await fileStaging.adopt(id, join(directory, upload.id)))) throw new Error('the finished upload could not be linked into staging');
        await ctx.uploadMarks.set(id, { state: 'committed', size, sha256 });
        const rec = await ctx.records.get(id);
        if (rec?.state === 'queued') await ctx.records.update(id, ['queued'], { source: { ...rec.source, size, sha256 } }).catch(() => {});
        // The job ended while the bytes arrived (a corrupt image, a cancel): its input goes with it.
        if (!rec || rec.state === 'succeeded' || rec.state === 'failed' || rec.state === 'cancelled') await ctx.stores.staging.delete(id).catch(() => {});
        await ctx.queue.promote?.(id);
        await fileStaging.dropUncommitted(id, overlap.token).catch(() => {});
        log.info({ job: id, upload: upload.id, size }, 'tus upload complete; its job converted along');
      } finally {
        await lease.release();
      }
    } catch (err) {
      if (typeof err === 'object' && err !== null && 'status_code' in err) throw err;
      await ctx.redis.del(claimKey(upload.id)).catch(() => {});
      log.error({ err, upload: upload.id }, 'could not commit a finished tus upload');
      throw refusal(isDiskconvError(err) && err.code === 'INSUFFICIENT_SPACE' ? 'INSUFFICIENT_SPACE' : 'QUEUE_UNAVAILABLE', 'the upload is complete but its job could not be committed; retry the last PATCH');
    }
    hashes.delete(upload.id);
    await ctx.redis.del(overlapKey(upload.id)).catch(() => {});
    await datastore.remove(upload.id).catch(() => {});
    return { headers: { 'Diskconv-Job': jobPath(id) } };
  };

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
    const size = (await stat(path)).size;
    if (size !== (upload.size ?? size)) return undefined;
    // Hashed as the PATCHes arrived when this process saw them all; else one read.
    const sha256 = await sha256OfFile(upload.id, size);
    const adopted = await staging.adopt(id, path);
    if (!adopted) return undefined;
    return { size, sha256 };
  };

  const finish = async (req: Request, upload: Upload): Promise<{ headers: Record<string, string> }> => {
    await starting.get(upload.id);
    const overlap = overlapOn ? await getOverlap(upload.id) : undefined;
    if (overlap?.token && overlap.created) return finishOverlapped(upload, { ...overlap, token: overlap.token });
    if (overlap) {
      // Its start died before the job existed (the API process went away): undone, and staged whole below.
      await ctx.uploadMarks.delete(overlap.job);
      if (overlap.token !== undefined) await fileStaging?.dropUncommitted(overlap.job, overlap.token);
      await ctx.redis.del(overlapKey(upload.id));
    }
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
        hashes.delete(upload.id);
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
    for (const [uploadId, running] of hashes) if (Date.now() - running.touched > ttlMs) hashes.delete(uploadId);
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
      if (overlapOn && uploadId && (request.method === 'PATCH' || request.method === 'HEAD' || request.method === 'DELETE') && response.status < 300) {
        await starting.get(uploadId);
        const overlap = await getOverlap(uploadId).catch(() => undefined);
        if (overlap && request.method === 'DELETE') {
          // Terminated by its client: the job converting along fails with it (its staging link goes; tus removed its file).
          await endOverlapJob(overlap.job, { code: 'UPLOAD_TERMINATED', message: 'the client terminated the upload (tus DELETE) before its last byte' }, false);
          await ctx.redis.del(overlapKey(uploadId)).catch(() => {});
          hashes.delete(uploadId);
        } else if (overlap?.created && !response.headers.has('diskconv-job')) {
          // Converting already: the job is named from the PATCH that made it on.
          reply.header('diskconv-job', jobPath(overlap.job));
        }
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
