/**
 * POST /v1/jobs with a multipart/form-data body (what the page sends), converted
 * while it arrives, as streaming-upload.ts does for an octet-stream body.
 *
 * The file part's size is not in the request, but it follows from it: a body of
 * Content-Length bytes whose file part's content starts at byte S and is the
 * last part, closed by "\r\n--BOUNDARY--\r\n" (what browsers, curl and every
 * FormData implementation send), holds Content-Length - S - (len(BOUNDARY) + 8)
 * bytes of file. S is found in the body's first bytes (kept while busboy parses
 * them: the part's headers end at the first CRLFCRLF after its delimiter; a field
 * value never holds a delimiter). The fields sent before the file (the page sends
 * them all first) are the job's options; the job is made as the file starts.
 *
 * The prediction is checked, never trusted: when the file ends elsewhere, or any
 * part follows it (a field after the file is an option the job was made
 * without), the overlapped job is removed and the staged bytes, all of them
 * there, become a new job from the whole request, as on the staged path. The
 * staged copy is hashed and committed either way, so a retry never needs the
 * client again. Anything unusual (a wrapped file, a file of a few bytes, headers
 * past the first MiB) is staged the ordinary way (bodies.ts receiveParts).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';
import type { Multipart, MultipartFile } from '@fastify/multipart';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { detectWrapper, WRAPPER_PROBE_BYTES } from '../engine/index.js';
import { FileStaging } from '../store/file/staging.js';
import {
  addField,
  asBodyError,
  checkDeclaredLength,
  checkEarlyDestination,
  mediaType,
  MULTIPART_OVERHEAD,
  readOptionFields,
  receiveParts,
  sanitizeFilename,
  streamToStore,
  verifyChecksum,
  watchIdle,
  type BodyDeps,
  type Received,
  type StoredUpload,
} from './bodies.js';
import type { ApiContext } from './context.js';
import { createFromReceived, newJobId } from './create-job.js';
import { ApiError } from './errors.js';
import { checkJobOptions } from './job-record.js';
import { overlap, readHead, replay } from './streaming-upload.js';

/** The boundary of a multipart/form-data Content-Type (RFC 2046: 1-70 characters, maybe quoted). */
export function boundaryOf(contentType: string | undefined): string | undefined {
  if (typeof contentType !== 'string') return undefined;
  const m = /;\s*boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))\s*(?:;|$)/i.exec(contentType);
  return m?.[1] ?? m?.[2];
}

/** Whether this request can take the overlapped multipart path (nothing of the body read yet). */
export function canStreamMultipart(ctx: ApiContext, request: FastifyRequest): boolean {
  if (!ctx.config.streamUploads) return false;
  if (mediaType(request) !== 'multipart/form-data' || !ctx.stores.staging.followPath) return false;
  if (boundaryOf(request.headers['content-type']) === undefined) return false;
  const length = Number(request.headers['content-length']);
  return Number.isSafeInteger(length) && length > 0 && request.headers['transfer-encoding'] === undefined;
}

/** The body's first bytes, as they arrive, up to `limit`. */
export class BodyPrefix {
  private chunks: Buffer[] = [];
  private bytes = 0;
  constructor(private readonly limit: number) {}

  readonly onData = (chunk: Buffer): void => {
    if (this.bytes >= this.limit) return;
    this.chunks.push(chunk);
    this.bytes += chunk.length;
  };

  /** Where the content of part `index` (0-based) starts, once its headers are among the kept bytes. */
  contentStart(boundary: string, index: number): number | undefined {
    const buf = Buffer.concat(this.chunks);
    this.chunks = [buf];
    const delimiter = Buffer.from(`\r\n--${boundary}`, 'latin1');
    // The first delimiter opens the body, or ends a preamble with CRLF before it.
    let at = buf.subarray(0, delimiter.length - 2).equals(delimiter.subarray(2)) ? 0 : buf.indexOf(delimiter);
    if (at < 0) return undefined;
    if (at > 0) at += 2;
    for (let i = 0; i < index; i++) {
      at = buf.indexOf(delimiter, at + delimiter.length - 2);
      if (at < 0) return undefined;
      at += 2;
    }
    const headersEnd = buf.indexOf('\r\n\r\n', at + delimiter.length - 2, 'latin1');
    return headersEnd < 0 ? undefined : headersEnd + 4;
  }
}

export async function receiveStreamingMultipart(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string, idempotencyKey?: string): Promise<FastifyReply> {
  const deps: BodyDeps = { config: ctx.config, staging: ctx.stores.staging, destinations: ctx.stores.destinations, policy: ctx.policy };
  const stopWatching = watchIdle(request, ctx.config.uploadIdleTimeoutMs);
  try {
    return await stream(ctx, request, reply, id, deps, idempotencyKey);
  } finally {
    stopWatching();
  }
}

async function stream(ctx: ApiContext, request: FastifyRequest, reply: FastifyReply, id: string, deps: BodyDeps, idempotencyKey: string | undefined): Promise<FastifyReply> {
  await checkDeclaredLength(request, MULTIPART_OVERHEAD, deps);
  const length = Number(request.headers['content-length']);
  const boundary = boundaryOf(request.headers['content-type']) as string;
  const prefix = new BodyPrefix(MULTIPART_OVERHEAD);
  const parts: AsyncIterator<Multipart> = request.parts()[Symbol.asyncIterator]();
  // The first next() pipes the request into busboy, synchronously: the prefix sees every byte busboy does.
  const first = parts.next();
  request.raw.on('data', prefix.onData);
  const stopKeeping = (): void => {
    request.raw.off('data', prefix.onData);
  };
  const fields: Record<string, string> = {};
  let part: MultipartFile | undefined;
  let before = 0;
  try {
    for (let next = await first; ; next = await parts.next()) {
      if (next.done) break;
      const p = next.value;
      if (p.type === 'file') {
        if (p.fieldname !== 'file') {
          p.file.resume();
          throw new ApiError('TOO_MANY_FILES', `unexpected file part '${p.fieldname.slice(0, 64)}'; send one part named 'file'`);
        }
        part = p;
        break;
      }
      addField(fields, p);
      before++;
    }
  } catch (err) {
    stopKeeping();
    throw asBodyError(err);
  }
  const start = part ? prefix.contentStart(boundary, before) : undefined;
  stopKeeping();
  if (!part) throw new ApiError('MISSING_FILE');
  const staged = (taken?: Readable): Promise<FastifyReply> =>
    receiveParts(parts, fields, id, deps, { part: part, file: taken ?? part.file }).then((received) => createFromReceived(ctx, request, reply, id, received, idempotencyKey));
  const declared = start === undefined ? 0 : length - start - (Buffer.byteLength(boundary, 'latin1') + 8);
  if (declared <= WRAPPER_PROBE_BYTES) return staged();

  // The job's options are the fields so far; refused now, before a byte of the file is stored (as the staged path would at the end).
  checkEarlyDestination(fields, id, deps);
  const { options, passphrase } = readOptionFields(fields, id, deps, { passphrase: true, filename: false });
  const callback = await checkJobOptions(ctx, options);
  const filename = sanitizeFilename(part.filename);
  const file = (part.file as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  let head: Awaited<ReturnType<typeof readHead>>;
  try {
    head = await readHead(file);
  } catch (err) {
    throw asBodyError(err);
  }
  if (head.ended || detectWrapper(Buffer.concat(head.head).subarray(0, WRAPPER_PROBE_BYTES)) !== undefined) {
    // A compressed wrapper (decompressed into staging, its size unknown until the end), or a tiny file: staged path.
    return staged(Readable.from(replay(head.head, file, head.ended)));
  }

  const writer = await ctx.stores.staging.create(id);
  const token = writer.followToken;
  const path = token === undefined ? undefined : ctx.stores.staging.followPath?.(id, token);
  if (token === undefined || path === undefined) {
    await writer.abort();
    throw new Error('the staging store offers no token to follow its write');
  }
  // Kept open: if the overlapped job's worker gives up on a mispredicted file and removes its write, the bytes are still here.
  let keep: FileHandle | undefined;
  try {
    keep = await open(path, 'r');
  } catch (err) {
    await writer.abort();
    throw err;
  }
  const trailing: string[] = [];
  try {
    const done = await overlap(ctx, request, reply, {
      id,
      options,
      ...(filename ? { filename } : {}),
      ...(passphrase !== undefined ? { passphrase } : {}),
      callback,
      declared,
      writer,
      token,
      chunks: replay(head.head, file, false),
      ...(idempotencyKey !== undefined ? { idempotencyKey } : {}),
      predicted: {
        rest: async () => {
          if ((part.file as Readable & { truncated?: boolean }).truncated) {
            throw new ApiError('PAYLOAD_TOO_LARGE', `the file is larger than MAX_UPLOAD_BYTES (${deps.config.maxUploadBytes})`);
          }
          for (;;) {
            const next = await parts.next();
            if (next.done) return trailing.length === 0;
            const p = next.value;
            if (p.type === 'file') {
              p.file.resume();
              throw new ApiError('TOO_MANY_FILES', `unexpected file part '${p.fieldname.slice(0, 64)}'; send one part named 'file'`);
            }
            addField(fields, p);
            trailing.push(p.fieldname);
          }
        },
      },
    });
    if (!('restage' in done)) return done.sent;
    // Not as predicted: the staged bytes become the job the whole request describes, under a new id.
    const { size, sha256, retire } = done.restage;
    const newId = newJobId();
    const lease = await ctx.leases.hold(newId);
    try {
      let received: Received;
      try {
        const all = readOptionFields(fields, newId, deps, { passphrase: true, filename: false });
        const adopted = ctx.stores.staging instanceof FileStaging ? await ctx.stores.staging.adopt(newId, path).catch(() => undefined) : undefined;
        let stored: StoredUpload;
        if (adopted && adopted.size === size) {
          stored = { size, sha256 };
        } else {
          stored = await streamToStore(keep.createReadStream({ start: 0, autoClose: false }), newId, deps);
          if (stored.sha256 !== sha256) throw new ApiError('INCOMPLETE_BODY', 'the staged copy changed while it was restaged');
        }
        await verifyChecksum(stored, all.options, newId, deps);
        received = { source: { kind: 'upload', key: newId, ...stored, ...(filename ? { filename } : {}) }, options: all.options, ...(all.passphrase !== undefined ? { passphrase: all.passphrase } : {}) };
      } finally {
        await retire();
      }
      request.log.info({ job: newId, replaces: id, fields_after_file: trailing }, 'multipart upload restaged');
      return await createFromReceived(ctx, request, reply, newId, received, idempotencyKey);
    } catch (err) {
      await ctx.stores.staging.delete(newId).catch(() => {});
      throw err;
    } finally {
      await lease.release();
    }
  } finally {
    await keep.close().catch(() => {});
  }
}
