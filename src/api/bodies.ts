/**
 * The three kinds of body POST /v1/jobs and POST /v1/inspect accept:
 *   multipart/form-data  a part `file` plus optional fields;
 *   application/octet-stream  the image itself, options in the query string;
 *   application/json  {"source": {"url": ...}, ...}.
 * Uploads stream into the store (never whole in memory), hashed on the way, and
 * are committed (fsync'd, renamed into place) before anything is enqueued.
 */
import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';
import type { Multipart, MultipartFile, MultipartValue } from '@fastify/multipart';
import type { FastifyRequest } from 'fastify';
import { z } from 'zod';
import type { Config } from '../config.js';
import { isDiskconvError } from '../engine/errors.js';
import { DEFAULT_LIMITS, LimitExceededError, unwrapStream, type UnwrapResult, type WrapperFormat } from '../engine/index.js';
import type { GlanceRequest, JobDestination, SourceFormat } from '../queue/records.js';
import { checkImportUrl, type UrlPolicyShape } from '../queue/url-import.js';
import type { Destinations, InputStaging, StagedWrite } from '../store/index.js';
import { ApiError } from './errors.js';

export const SOURCE_FORMATS = ['auto', 'raw', 'qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx'] as const;

const sha256Field = z
  .string()
  .regex(/^[0-9a-fA-F]{64}$/, 'expected 64 hex digits')
  .transform((s) => s.toLowerCase());

/** Image attributes Glance sets itself or that a job does not choose: never as `properties`. */
const GLANCE_RESERVED = new Set([
  'id', 'name', 'status', 'visibility', 'protected', 'os_hidden', 'checksum', 'os_hash_algo', 'os_hash_value', 'owner', 'size',
  'virtual_size', 'min_disk', 'min_ram', 'disk_format', 'container_format', 'created_at', 'updated_at', 'deleted', 'deleted_at',
  'locations', 'direct_url', 'self', 'file', 'schema', 'tags', 'stores', 'members',
]);

/** The `glance` option: what the published Glance image is called and carries (disk_format raw, container_format bare always). */
export const glanceOption = z
  .object({
    name: z.string().max(255).optional(),
    visibility: z.enum(['private', 'shared', 'community', 'public']).optional(),
    min_disk: z.number().int().min(0).max(2 ** 31 - 1).optional(),
    min_ram: z.number().int().min(0).max(2 ** 31 - 1).optional(),
    protected: z.boolean().optional(),
    properties: z
      .record(
        z
          .string()
          .min(1)
          .max(255)
          .refine((k) => !GLANCE_RESERVED.has(k) && !k.startsWith('os_glance'), { message: 'is an attribute Glance sets itself' }),
        z.string().max(65535),
      )
      .refine((p) => Object.keys(p).length <= 128, { message: 'at most 128 properties' })
      .optional(),
  })
  .strict();

/** The same as a JSON-encoded string (multipart field, query parameter). */
const glanceText = z
  .string()
  .max(256 * 1024)
  .transform((s, ctx) => {
    try {
      return JSON.parse(s) as unknown;
    } catch {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'expected a JSON object' });
      return z.NEVER;
    }
  })
  .pipe(glanceOption);

/** Options shared by the three kinds of body. */
const optionFields = {
  source_format: z.enum(SOURCE_FORMATS).default('auto'),
  output_format: z.literal('raw').default('raw'),
  expected_sha256: sha256Field.optional(),
  callback_url: z.string().min(1).max(2048).optional(),
  /** An OVA's disk (1-based index, diskId or file) or a tar bundle's top member (src/engine/archive/). */
  disk: z.string().min(1).max(256).optional(),
};

/** An encrypted image's key: JSON body or multipart field only (never the query string, which is logged). */
const passphraseField = z.string().min(1).max(1024);

const jsonBody = z
  .object({
    source: z.object({ url: z.string().min(1).max(4096) }).strict(),
    ...optionFields,
    glance: glanceOption.optional(),
    /** Where the raw image goes instead of the output store. */
    output: z.object({ target: z.literal('rbd'), pool: z.string().min(1).max(128), image: z.string().min(1).max(128).optional() }).strict().optional(),
    passphrase: passphraseField.optional(),
  })
  .strict();

/** The same choice for uploads, as query parameters or multipart fields. */
const destinationFields = {
  output_target: z.enum(['store', 'rbd']).optional(),
  rbd_pool: z.string().min(1).max(128).optional(),
  rbd_image: z.string().min(1).max(128).optional(),
};

const uploadOptions = z.object({ ...optionFields, ...destinationFields, glance: glanceText.optional(), filename: z.string().max(1024).optional() }).strict();

/**
 * The job's destination (the image defaults to the job id), checked against
 * RBD_POOLS before a byte of the body is read or stored.
 */
function destinationOf(fields: { target?: 'store' | 'rbd' | undefined; pool?: string | undefined; image?: string | undefined }, key: string, deps: Pick<BodyDeps, 'destinations'>): JobDestination | undefined {
  if (fields.target !== 'rbd') {
    if (fields.pool !== undefined || fields.image !== undefined) throw new ApiError('VALIDATION_FAILED', 'rbd_pool and rbd_image need output_target=rbd');
    return undefined;
  }
  if (fields.pool === undefined) throw new ApiError('VALIDATION_FAILED', 'an rbd target needs a pool');
  const destination: JobDestination = { target: 'rbd', pool: fields.pool, image: fields.image ?? key };
  deps.destinations.check(destination);
  return destination;
}

export interface JobOptions {
  source_format: SourceFormat;
  output_format: 'raw';
  expected_sha256?: string;
  /** POSTed the job on a terminal state (src/queue/webhooks.ts). */
  callback_url?: string;
  destination?: JobDestination;
  glance?: GlanceRequest;
  disk?: string;
}

export type ReceivedSource =
  | ({ kind: 'upload'; key: string; filename?: string } & StoredUpload)
  | { kind: 'url'; url: string };

export interface Received {
  source: ReceivedSource;
  options: JobOptions;
  /** Kept apart from the options: it goes to its own Redis key, never into the record. */
  passphrase?: string;
}

export interface BodyDeps {
  config: Pick<Config, 'maxUploadBytes'> & Partial<Pick<Config, 'uploadIdleTimeoutMs' | 'maxVirtualSize'>>;
  staging: InputStaging;
  destinations: Pick<Destinations, 'check'>;
  policy: UrlPolicyShape;
}

/** What the flat text fields name: the job's options, the file name, an encrypted image's key. */
export interface FieldOptions {
  options: JobOptions;
  filename?: string;
  passphrase?: string;
}

/**
 * The job options as flat text fields: the query string of an octet-stream
 * upload, multipart fields, and a tus upload's Upload-Metadata (routes/uploads.ts)
 * all go through this one schema. `passphrase` only where the fields are not
 * logged (never the query string); `filename` only where it is not the file
 * part's own name. The destination is checked against RBD_POOLS here.
 */
export function readOptionFields(
  fields: Record<string, string | undefined>,
  key: string,
  deps: Pick<BodyDeps, 'destinations'>,
  accept: { passphrase: boolean; filename: boolean },
): FieldOptions {
  const { passphrase: rawPassphrase, ...values } = fields;
  if (rawPassphrase !== undefined && !accept.passphrase) {
    throw new ApiError('VALIDATION_FAILED', 'passphrase is accepted in a JSON body, a multipart field or tus Upload-Metadata, never in the query string');
  }
  if (values.filename !== undefined && !accept.filename) throw new ApiError('VALIDATION_FAILED', "filename: the file part's own name is the file name");
  const passphrase = rawPassphrase === undefined ? undefined : passphraseField.parse(rawPassphrase);
  const parsed = uploadOptions.parse(values);
  const destination = destinationOf({ target: parsed.output_target, pool: parsed.rbd_pool, image: parsed.rbd_image }, key, deps);
  const filename = sanitizeFilename(parsed.filename);
  return {
    options: {
      source_format: parsed.source_format,
      output_format: parsed.output_format,
      ...(parsed.expected_sha256 ? { expected_sha256: parsed.expected_sha256 } : {}),
      ...(parsed.callback_url ? { callback_url: parsed.callback_url } : {}),
      ...(destination ? { destination } : {}),
      ...(parsed.glance ? { glance: parsed.glance } : {}),
      ...(parsed.disk !== undefined ? { disk: parsed.disk } : {}),
    },
    ...(filename ? { filename } : {}),
    ...(passphrase !== undefined ? { passphrase } : {}),
  };
}

/** Room for multipart boundaries and headers around the file. */
export const MULTIPART_OVERHEAD = 1 << 20;
/** Space kept free in the store beyond an upload's declared length. */
const FREE_SPACE_RESERVE = 64 * 2 ** 20;

export function mediaType(request: FastifyRequest): string | undefined {
  const ct = request.headers['content-type'];
  return typeof ct === 'string' ? (ct.split(';')[0] ?? '').trim().toLowerCase() : undefined;
}

/** A client's file name is metadata: its last path component, printable, bounded. */
export function sanitizeFilename(name: string | undefined): string | undefined {
  if (!name) return undefined;
  const base = name.split(/[/\\]/).pop() ?? '';
  // eslint-disable-next-line no-control-regex
  const clean = base.replace(/[\u0000-\u001f\u007f"]/g, '').trim().slice(0, 255);
  return clean === '' || clean === '.' || clean === '..' ? undefined : clean;
}

/**
 * Reads the request's body into `key` (uploads) or validates its URL (JSON).
 * On any failure nothing stays in the store.
 */
export async function receiveBody(request: FastifyRequest, key: string, deps: BodyDeps): Promise<Received> {
  const type = mediaType(request);
  if (type === 'application/json') return receiveJson(request, key, deps);
  if (type === 'application/octet-stream' || type === 'multipart/form-data') {
    const stopWatching = watchIdle(request, deps.config.uploadIdleTimeoutMs);
    try {
      await checkDeclaredLength(request, type === 'multipart/form-data' ? MULTIPART_OVERHEAD : 0, deps);
      return await (type === 'multipart/form-data' ? receiveMultipart(request, key, deps) : receiveOctetStream(request, key, deps));
    } finally {
      stopWatching();
    }
  }
  throw new ApiError(
    'UNSUPPORTED_MEDIA_TYPE',
    `Content-Type ${type ?? '(none)'} is not accepted; use multipart/form-data, application/octet-stream or application/json`,
  );
}

/**
 * Drops an upload whose body sends nothing for `ms` (UPLOAD_IDLE_TIMEOUT_MS): a
 * client that declares a length and stalls would otherwise hold a socket, a file
 * descriptor and a staging file forever. Destroying the request fails the body's
 * pipeline, whose writer then removes the staging file.
 */
export function watchIdle(request: FastifyRequest, ms: number | undefined): () => void {
  // fastify.inject's simulated requests have no socket to time out.
  if (!ms || typeof request.raw.setTimeout !== 'function') return () => {};
  const onTimeout = (): void => {
    request.log.info({ idle_ms: ms }, 'upload idle for too long; dropped');
    request.raw.destroy(new ApiError('UPLOAD_TIMEOUT', `the upload sent nothing for ${ms} ms`));
  };
  request.raw.setTimeout(ms, onTimeout);
  return () => {
    request.raw.off('timeout', onTimeout);
    // The socket is gone when the request was destroyed (timed out, client went away).
    if (request.raw.socket) request.raw.socket.setTimeout(0);
  };
}

export async function checkDeclaredLength(request: FastifyRequest, overhead: number, deps: BodyDeps): Promise<void> {
  const header = request.headers['content-length'];
  if (header === undefined) return; // chunked: the limit is enforced while streaming
  const length = Number(header);
  if (length > deps.config.maxUploadBytes + overhead) {
    throw new ApiError('PAYLOAD_TOO_LARGE', `the body is ${length} bytes; MAX_UPLOAD_BYTES is ${deps.config.maxUploadBytes}`);
  }
  const free = await deps.staging.freeBytes();
  if (free !== undefined && length + FREE_SPACE_RESERVE > free) {
    throw new ApiError('INSUFFICIENT_SPACE', `the body is ${length} bytes and the store has ${free} bytes free`);
  }
}

async function receiveJson(request: FastifyRequest, key: string, deps: BodyDeps): Promise<Received> {
  if (request.body === undefined || request.body === null) throw new ApiError('EMPTY_BODY', 'the JSON body is empty');
  const body = jsonBody.parse(request.body);
  const destination = body.output ? destinationOf(body.output, key, deps) : undefined;
  await checkImportUrl(body.source.url, deps.policy);
  return {
    source: { kind: 'url', url: body.source.url },
    options: {
      source_format: body.source_format,
      output_format: body.output_format,
      ...(body.expected_sha256 ? { expected_sha256: body.expected_sha256 } : {}),
      ...(body.callback_url ? { callback_url: body.callback_url } : {}),
      ...(destination ? { destination } : {}),
      ...(body.glance ? { glance: body.glance } : {}),
      ...(body.disk !== undefined ? { disk: body.disk } : {}),
    },
    ...(body.passphrase !== undefined ? { passphrase: body.passphrase } : {}),
  };
}

async function receiveOctetStream(request: FastifyRequest, key: string, deps: BodyDeps): Promise<Received> {
  const { options, filename } = readOptionFields((request.query ?? {}) as Record<string, string>, key, deps, { passphrase: false, filename: true });
  const body = request.body as Readable | undefined;
  if (!body || typeof body.pipe !== 'function') throw new ApiError('EMPTY_BODY', 'the body is empty');
  const stored = await streamToStore(body, key, deps);
  await verifyChecksum(stored, options, key, deps);
  return { source: { kind: 'upload', key, ...stored, ...(filename ? { filename } : {}) }, options };
}

async function receiveMultipart(request: FastifyRequest, key: string, deps: BodyDeps): Promise<Received> {
  return receiveParts(request.parts()[Symbol.asyncIterator](), {}, key, deps);
}

/**
 * The rest of a multipart body: `parts` from where the caller stopped, the `fields` it
 * read so far, and (streaming-multipart.ts) a file part it took already, whose bytes
 * `file` gives from the start. Stages the file, reads the fields; nothing stays staged
 * on a failure.
 */
export async function receiveParts(
  parts: AsyncIterator<Multipart>,
  fields: Record<string, string>,
  key: string,
  deps: BodyDeps,
  taken?: { part: MultipartFile; file: Readable },
): Promise<Received> {
  let stored: StoredUpload | undefined;
  let filename: string | undefined;
  const storeFile = async (part: MultipartFile, file: Readable): Promise<void> => {
    filename = sanitizeFilename(part.filename);
    stored = await streamToStore(file, key, deps);
    if ((part.file as Readable & { truncated?: boolean }).truncated) {
      throw new ApiError('PAYLOAD_TOO_LARGE', `the file is larger than MAX_UPLOAD_BYTES (${deps.config.maxUploadBytes})`);
    }
  };
  try {
    if (taken) await storeFile(taken.part, taken.file);
    for (;;) {
      const next = await parts.next();
      if (next.done) break;
      const part = next.value;
      if (part.type === 'file') {
        if (part.fieldname !== 'file' || stored) {
          part.file.resume();
          throw new ApiError('TOO_MANY_FILES', `unexpected file part '${part.fieldname.slice(0, 64)}'; send one part named 'file'`);
        }
        checkEarlyDestination(fields, key, deps);
        await storeFile(part, part.file);
      } else {
        addField(fields, part);
      }
    }
  } catch (err) {
    await deps.staging.delete(key).catch(() => {});
    throw asBodyError(err);
  }
  try {
    if (!stored) throw new ApiError('MISSING_FILE');
    const { options, passphrase } = readOptionFields(fields, key, deps, { passphrase: true, filename: false });
    await verifyChecksum(stored, options, key, deps);
    return { source: { kind: 'upload', key, ...stored, ...(filename ? { filename } : {}) }, options, ...(passphrase !== undefined ? { passphrase } : {}) };
  } catch (err) {
    await deps.staging.delete(key).catch(() => {});
    throw err;
  }
}

/** A multipart field into `fields`; twice is an error. */
export function addField(fields: Record<string, string>, part: MultipartValue): void {
  if (part.fieldname in fields) throw new ApiError('VALIDATION_FAILED', `field '${part.fieldname.slice(0, 64)}' appears twice`);
  fields[part.fieldname] = typeof part.value === 'string' ? part.value : String(part.value);
}

/** Fields sent before the file: a refused destination stops the upload before it is stored. */
export function checkEarlyDestination(fields: Record<string, string>, key: string, deps: Pick<BodyDeps, 'destinations'>): void {
  if ('output_target' in fields || 'rbd_pool' in fields) {
    const early = uploadOptions.pick({ output_target: true, rbd_pool: true, rbd_image: true }).safeParse(fields);
    if (early.success) destinationOf({ target: early.data.output_target, pool: early.data.rbd_pool, image: early.data.rbd_image }, key, deps);
  }
}

export async function verifyChecksum(stored: { sha256: string }, options: JobOptions, key: string, deps: BodyDeps): Promise<void> {
  if (options.expected_sha256 && options.expected_sha256 !== stored.sha256) {
    await deps.staging.delete(key).catch(() => {});
    throw new ApiError('CHECKSUM_MISMATCH', `the upload's sha256 is ${stored.sha256}, expected ${options.expected_sha256}`);
  }
}

/** What an upload stored: the received bytes' size and sha256, and the wrapper removed on the way. */
export interface StoredUpload {
  /** Bytes received (what the client sent; `sha256` is theirs). */
  size: number;
  sha256: string;
  /** A gzip/xz/bzip2/zstd wrapper found by its magic and decompressed into the store. */
  wrapper?: WrapperFormat;
  /** The staged (inner) image's size, when a wrapper was removed. */
  unwrapped_size?: number;
}

/**
 * Streams into a new input object with a size limit and sha256; commits it
 * durably. A compressed wrapper (by magic bytes) is decompressed on the way, so
 * the store holds the inner image: bounded by MAX_VIRTUAL_SIZE and the store's
 * free space (a bomb is LIMIT_EXCEEDED), a truncated or corrupt wrapper is
 * IMAGE_CORRUPT; either way nothing stays staged.
 */
export async function streamToStore(body: Readable, key: string, deps: BodyDeps): Promise<StoredUpload> {
  const max = deps.config.maxUploadBytes;
  const hash = createHash('sha256');
  let size = 0;
  // Counted and hashed as it arrives, before any decompression: the limit and the sha256 are of what was sent.
  async function* received(): AsyncGenerator<Buffer> {
    for await (const chunk of body as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > max) throw new ApiError('PAYLOAD_TOO_LARGE', `the upload is larger than MAX_UPLOAD_BYTES (${max})`);
      hash.update(chunk);
      yield chunk;
    }
  }
  const bound = await unwrapBound(deps);
  const writer: StagedWrite = await deps.staging.create(key);
  let result: UnwrapResult;
  try {
    result = await unwrapStream(received(), writer.stream, bound);
    if (size === 0) throw new ApiError('EMPTY_BODY', 'the upload is empty');
    await writer.commit();
  } catch (err) {
    await writer.abort().catch(() => {});
    // Out of room is the store's state, not the image's fault: 507, as for an upload that fills the disk.
    if (err instanceof LimitExceededError && err.limit === FREE_SPACE_LIMIT) {
      throw new ApiError('INSUFFICIENT_SPACE', `the unwrapped image passed the ${err.maximum} bytes the staging store has free`);
    }
    throw asBodyError(err);
  }
  return { size, sha256: hash.digest('hex'), ...(result.wrapper ? { wrapper: result.wrapper, unwrapped_size: result.bytes } : {}) };
}

const FREE_SPACE_LIMIT = 'free space in the staging store';

/** How far a wrapper may decompress into staging: MAX_VIRTUAL_SIZE, or the store's free space when that is less. */
async function unwrapBound(deps: BodyDeps): Promise<{ maxBytes: number; limitName: string }> {
  const maxVirtual = deps.config.maxVirtualSize ?? DEFAULT_LIMITS.maxVirtualSize;
  const free = await deps.staging.freeBytes().catch(() => undefined);
  if (free !== undefined && Math.max(0, free - FREE_SPACE_RESERVE) < maxVirtual) {
    return { maxBytes: Math.max(0, free - FREE_SPACE_RESERVE), limitName: FREE_SPACE_LIMIT };
  }
  return { maxBytes: maxVirtual, limitName: 'MAX_VIRTUAL_SIZE' };
}

/** Errors from streams and busboy carry no code; name them. */
export function asBodyError(err: unknown): unknown {
  if (err instanceof z.ZodError || isDiskconvError(err)) return err;
  const e = err as { code?: unknown; message?: unknown };
  // The store's filesystem filled up while the body streamed in (a chunked upload declares no length to check first).
  if (e.code === 'ENOSPC' || e.code === 'EDQUOT') return new ApiError('INSUFFICIENT_SPACE', 'the store ran out of space while the upload was written');
  if (typeof e.code === 'string' && e.code.startsWith('FST_')) return err;
  if (e.code === 'ERR_STREAM_PREMATURE_CLOSE' || e.code === 'ECONNRESET' || e.code === 'ABORT_ERR') {
    return new ApiError('INCOMPLETE_BODY', 'the client closed the connection before the body was complete');
  }
  if (typeof e.message === 'string' && /multipart|boundary|part|form/i.test(e.message)) {
    return new ApiError('MALFORMED_MULTIPART', e.message);
  }
  return err;
}
