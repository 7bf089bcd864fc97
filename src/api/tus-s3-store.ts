/**
 * A tus data store that writes straight into the bucket, under the staging key
 * of the upload's job: an upload in progress is an S3 multipart upload at
 * `PREFIX input/<job>`, so when its last byte arrives CompleteMultipartUpload
 * makes it the job's staged input, with no copy. The API host keeps no byte of
 * it on disk; its memory holds at most one part per PATCH in flight.
 *
 *   Redis <prefix>tus-s3:<upload id>   the upload (JSON): size, metadata, the
 *                                      multipart upload id, the parts committed
 *                                      (number, ETag, bytes), the tail, offset
 *   Redis <prefix>tus-s3:expiry        sorted set: upload id by expiry time
 *   S3    PREFIX input/<job>           the multipart upload, then the object
 *   S3    PREFIX tus/<id>.tail.<rand>  the bytes past the last whole part
 *
 * S3 parts are at least 5 MiB (all but the last) while a tus PATCH may end
 * anywhere: bytes past the last whole part go to a small tail object and are
 * prepended to the next PATCH's first part. The offset a HEAD answers is what
 * is committed in Redis (parts + tail), never what is merely in memory; a
 * commit is a compare-and-set on the offset, made under the tus lock (shared by
 * every API process, tus-locker.ts). A PATCH cut off mid-way keeps what arrived
 * (its last bytes as a tail); a PATCH with Upload-Checksum (checksumScope) commits
 * only at its end, when routes/uploads.ts has verified its digest: its parts are
 * uploaded meanwhile under part numbers the committed list does not name, so a
 * refused PATCH leaves nothing (the next one overwrites those numbers, and
 * CompleteMultipartUpload names only committed parts).
 *
 * sha256: Node's hash state cannot be stored, so it is kept in this process's
 * memory next to the offset it covers. A resume that reaches the same process
 * (one connection, or a balancer with affinity) continues it; one that reaches
 * another process cannot, and the digest is then computed at completion by one
 * GET of the whole object (`sha256Of`): N bytes read back from the bucket and
 * hashed, seconds per GiB.
 *
 * The job id is reserved as a lease (queue/leases.ts) for the upload's life, so
 * the staging sweep leaves its multipart upload alone; expired uploads are
 * aborted here (`deleteExpired`) and, should every API be gone, by that sweep
 * once the reservation lapses.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  PutObjectCommand,
  UploadPartCommand,
  type S3Client,
} from '@aws-sdk/client-s3';
import { DataStore, ERRORS, Upload } from '@tus/utils';
import type { Redis } from 'ioredis';
import type { Leases } from '../queue/leases.js';
import { asS3StoreError, deadline, isNotFound, type S3Settings } from '../store/s3/client.js';
import { partSizeFor } from '../store/s3/objects.js';

/** Set by the route around a PATCH that carries Upload-Checksum: commit only at a clean end. */
export const checksumScope = new AsyncLocalStorage<{ checksummed: true }>();

interface Part {
  n: number;
  etag: string;
  bytes: number;
}

interface TusS3Record {
  id: string;
  size: number;
  metadata: Record<string, string | null>;
  creation_date: string;
  job: string;
  /** The object key in the bucket (staging's key of the job). */
  key: string;
  uploadId: string;
  partSize: number;
  parts: Part[];
  /** Committed bytes: the parts and the tail. */
  offset: number;
  tail?: { key: string; bytes: number };
  /** Set once CompleteMultipartUpload succeeded; the sha256 when this process saw every byte. */
  completed?: { sha256?: string };
}

/** Replaces the record only while its offset is the one the writer started from (and it is not completed). */
const COMMIT = `local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local r = cjson.decode(cur)
if r.completed or r.offset ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1`;

/** Bounds the hash states kept in memory (one per upload this process is receiving). */
const MAX_HASH_STATES = 10_000;

export interface TusS3StoreOptions {
  client: S3Client;
  settings: S3Settings;
  /** The bucket key of a staging key (S3Staging.access().objectKey). */
  objectKey: (key: string) => string;
  redis: Redis;
  /** Redis key prefix (the records'). */
  prefix: string;
  leases: Pick<Leases, 'reserve'>;
  expirationMs: number;
}

export class TusS3Store extends DataStore {
  private readonly hashes = new Map<string, { offset: number; hash: Hash }>();
  private readonly client: S3Client;
  private readonly bucket: string;
  private readonly timeout: number;

  constructor(private readonly o: TusS3StoreOptions) {
    super();
    this.extensions = ['creation', 'creation-with-upload', 'termination', 'expiration'];
    this.client = o.client;
    this.bucket = o.settings.bucket;
    this.timeout = o.settings.requestTimeoutMs;
  }

  private recordKey(id: string): string {
    return `${this.o.prefix}tus-s3:${id}`;
  }
  private get expiryKey(): string {
    return `${this.o.prefix}tus-s3:expiry`;
  }
  /** Records outlive the upload's expiry, so the expiry sweep still finds what to abort. */
  private get recordTtlMs(): number {
    return this.o.expirationMs * 2 + 3_600_000;
  }

  override getExpiration(): number {
    return this.o.expirationMs;
  }

  private async load(id: string): Promise<TusS3Record> {
    const raw = await this.o.redis.get(this.recordKey(id));
    if (!raw) throw ERRORS.FILE_NOT_FOUND;
    return JSON.parse(raw) as TusS3Record;
  }

  private async commit(from: number, rec: TusS3Record): Promise<void> {
    const ok = await this.o.redis.eval(COMMIT, 1, this.recordKey(rec.id), String(from), JSON.stringify(rec));
    // Only a second writer of the same upload (the tus lock makes that impossible) or a removal meanwhile.
    if (ok !== 1) throw ERRORS.FILE_WRITE_ERROR;
  }

  private s3<T>(what: string, run: (signal: AbortSignal) => Promise<T>): Promise<T> {
    return run(deadline(this.timeout)).catch((err: unknown) => {
      throw asS3StoreError(err, what);
    });
  }

  override async create(upload: Upload): Promise<Upload> {
    const job = upload.metadata?.job;
    if (!job || upload.size === undefined) throw ERRORS.FILE_WRITE_ERROR;
    const key = this.o.objectKey(job);
    const created = await this.s3(`start of upload ${upload.id}`, (abortSignal) =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: key, ContentType: 'application/octet-stream' }), { abortSignal }),
    );
    if (!created.UploadId) throw new Error('the bucket answered CreateMultipartUpload without an UploadId');
    const creation = upload.creation_date ?? new Date().toISOString();
    const rec: TusS3Record = {
      id: upload.id,
      size: upload.size,
      metadata: upload.metadata ?? {},
      creation_date: creation,
      job,
      key,
      uploadId: created.UploadId,
      partSize: partSizeFor(upload.size),
      parts: [],
      offset: 0,
    };
    // The sweeps leave the job's staging key alone while the upload may still be resumed.
    await this.o.leases.reserve(job, this.o.expirationMs + 3_600_000);
    await this.o.redis.multi().set(this.recordKey(upload.id), JSON.stringify(rec), 'PX', this.recordTtlMs).zadd(this.expiryKey, Date.parse(creation) + this.o.expirationMs, upload.id).exec();
    this.hashes.delete(upload.id);
    upload.creation_date = creation;
    upload.storage = { type: 's3', path: key, bucket: this.bucket };
    return upload;
  }

  override async getUpload(id: string): Promise<Upload> {
    const rec = await this.load(id);
    return new Upload({
      id,
      size: rec.size,
      offset: rec.completed ? rec.size : rec.offset,
      metadata: rec.metadata,
      creation_date: rec.creation_date,
      storage: { type: 's3', path: rec.key, bucket: this.bucket },
    });
  }

  override async declareUploadLength(): Promise<void> {
    throw ERRORS.UNSUPPORTED_CREATION_DEFER_LENGTH_EXTENSION;
  }

  private rememberHash(id: string, offset: number, hash: Hash): void {
    this.hashes.delete(id);
    if (this.hashes.size >= MAX_HASH_STATES) {
      const oldest = this.hashes.keys().next().value;
      if (oldest !== undefined) this.hashes.delete(oldest);
    }
    this.hashes.set(id, { offset, hash });
  }

  private async readTail(key: string, bytes: number): Promise<Buffer> {
    const res = await this.s3(`read of tail ${key}`, (abortSignal) => this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal }));
    const body = Buffer.from((await res.Body?.transformToByteArray()) ?? []);
    if (body.length !== bytes) throw new Error(`tail ${key} is ${body.length} bytes, expected ${bytes}`);
    return body;
  }

  private async deleteObject(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal: deadline(this.timeout) }).catch((err: unknown) => {
      if (!isNotFound(err)) throw asS3StoreError(err, `delete of ${key}`);
    });
  }

  private tailKey(id: string): string {
    return `${this.o.settings.prefix}tus/${id}.tail.${randomBytes(6).toString('hex')}`;
  }

  override async write(stream: Readable, id: string, offset: number): Promise<number> {
    const start = await this.load(id);
    if (start.completed) return start.size;
    if (start.offset !== offset) throw ERRORS.INVALID_OFFSET;
    const deferred = checksumScope.getStore()?.checksummed === true;
    const rec: TusS3Record = { ...start, parts: [...start.parts] };
    let committedOffset = start.offset;
    // Continue this process's hash where it stopped; otherwise sha256Of reads the object back at the end.
    const known = this.hashes.get(id);
    const hash = start.offset === 0 ? createHash('sha256') : known && known.offset === start.offset ? known.hash.copy() : undefined;
    if (!hash) this.hashes.delete(id);

    // Bytes not yet in a part: the committed tail (already hashed), then what this PATCH brings.
    const pending: Buffer[] = [];
    let pendingBytes = 0;
    let oldTail = start.tail;
    if (start.tail) {
      pending.push(await this.readTail(start.tail.key, start.tail.bytes));
      pendingBytes = start.tail.bytes;
    }
    let received = start.offset;
    const obsoleteTails: string[] = [];

    const take = (n: number): Buffer => {
      const all = Buffer.concat(pending, pendingBytes);
      pending.length = 0;
      pendingBytes = all.length - n;
      if (pendingBytes > 0) pending.push(Buffer.from(all.subarray(n)));
      return all.subarray(0, n);
    };
    const uploadPart = async (body: Buffer): Promise<void> => {
      const n = rec.parts.length + 1;
      const res = await this.s3(`part ${n} of upload ${id}`, (abortSignal) =>
        this.client.send(new UploadPartCommand({ Bucket: this.bucket, Key: rec.key, UploadId: rec.uploadId, PartNumber: n, Body: body, ContentLength: body.length }), { abortSignal }),
      );
      if (!res.ETag) throw new Error(`the bucket answered part ${n} without an ETag`);
      rec.parts.push({ n, etag: res.ETag, bytes: body.length });
    };
    const commitNow = async (): Promise<void> => {
      await this.commit(committedOffset, rec);
      committedOffset = rec.offset;
      for (const key of obsoleteTails.splice(0)) await this.deleteObject(key).catch(() => {});
    };

    let failure: unknown;
    try {
      for await (const chunk of stream as AsyncIterable<Buffer>) {
        let piece = chunk;
        if (received + piece.length > rec.size) throw ERRORS.ERR_SIZE_EXCEEDED;
        while (piece.length > 0) {
          const room = rec.partSize - pendingBytes;
          const now = piece.subarray(0, room);
          piece = piece.subarray(now.length);
          hash?.update(now);
          pending.push(Buffer.from(now));
          pendingBytes += now.length;
          received += now.length;
          if (pendingBytes < rec.partSize) continue;
          // A whole part: up it goes (the next bytes wait: one part in memory per PATCH).
          const snapshot = hash?.copy();
          await uploadPart(take(rec.partSize));
          rec.offset = received;
          if (oldTail) {
            obsoleteTails.push(oldTail.key);
            oldTail = undefined;
          }
          delete rec.tail;
          if (!deferred) {
            await commitNow();
            if (snapshot) this.rememberHash(id, rec.offset, snapshot);
          }
        }
      }
    } catch (err) {
      failure = err;
    }

    if (failure !== undefined && deferred) {
      // A checksummed PATCH that did not end cleanly (or whose digest did not match) leaves nothing.
      throw failure;
    }
    try {
      if (failure === undefined && received === rec.size) {
        const last = take(pendingBytes);
        if (last.length > 0 || rec.parts.length === 0) await uploadPart(last);
        try {
          await this.client.send(
            new CompleteMultipartUploadCommand({
              Bucket: this.bucket,
              Key: rec.key,
              UploadId: rec.uploadId,
              MultipartUpload: { Parts: rec.parts.map((p) => ({ PartNumber: p.n, ETag: p.etag })) },
            }),
            { abortSignal: deadline(this.timeout) },
          );
        } catch (err) {
          // A completion whose answer was lost, retried: the upload is an object of the full size already.
          if (!(isNotFound(err) && (await this.objectSize(rec.key)) === rec.size)) throw asS3StoreError(err, `completion of upload ${id}`);
        }
        if (oldTail) obsoleteTails.push(oldTail.key);
        delete rec.tail;
        rec.offset = rec.size;
        rec.completed = hash ? { sha256: hash.digest('hex') } : {};
        await commitNow();
        this.hashes.delete(id);
        await this.o.redis.zrem(this.expiryKey, id);
        return rec.size;
      }
      if (received > committedOffset) {
        // What arrived past the last part waits in a tail object for the next PATCH.
        if (pendingBytes > 0) {
          const key = this.tailKey(id);
          const body = take(pendingBytes);
          await this.s3(`tail of upload ${id}`, (abortSignal) =>
            this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: body, ContentLength: body.length }), { abortSignal }),
          );
          if (oldTail) obsoleteTails.push(oldTail.key);
          rec.tail = { key, bytes: body.length };
        }
        rec.offset = received;
        await commitNow();
        if (hash) this.rememberHash(id, rec.offset, hash.copy());
      }
    } catch (err) {
      failure ??= err;
    }
    if (failure !== undefined) throw failure;
    return rec.offset;
  }

  /** The completed upload's sha256: remembered when this process saw every byte, else read back from the bucket once. */
  async sha256Of(id: string): Promise<{ sha256: string; readBackBytes: number }> {
    const rec = await this.load(id);
    if (!rec.completed) throw ERRORS.FILE_NOT_FOUND;
    if (rec.completed.sha256) return { sha256: rec.completed.sha256, readBackBytes: 0 };
    const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: rec.key })).catch((err: unknown) => {
      throw asS3StoreError(err, `read of upload ${id}`);
    });
    if (!(res.Body instanceof Readable)) throw new Error('the S3 client returned no stream');
    const hash = createHash('sha256');
    let bytes = 0;
    for await (const chunk of res.Body as AsyncIterable<Buffer>) {
      hash.update(chunk);
      bytes += chunk.length;
    }
    if (bytes !== rec.size) throw asS3StoreError(new Error(`${bytes} bytes read back, ${rec.size} uploaded`), `read of upload ${id}`);
    const sha256 = hash.digest('hex');
    rec.completed = { sha256 };
    await this.o.redis.set(this.recordKey(id), JSON.stringify(rec), 'KEEPTTL');
    return { sha256, readBackBytes: bytes };
  }

  /** The object key in the bucket of a completed upload (for tests and logs). */
  async objectKeyOf(id: string): Promise<string> {
    return (await this.load(id)).key;
  }

  /**
   * Removes the upload: an unfinished one's multipart upload and tail; a
   * completed one's record only (its object is the job's staged input now).
   */
  override async remove(id: string): Promise<void> {
    const raw = await this.o.redis.get(this.recordKey(id));
    if (!raw) throw ERRORS.FILE_NOT_FOUND;
    await this.discard(JSON.parse(raw) as TusS3Record);
  }

  private async discard(rec: TusS3Record): Promise<void> {
    if (!rec.completed) {
      await this.client
        .send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: rec.key, UploadId: rec.uploadId }), { abortSignal: deadline(this.timeout) })
        .catch((err: unknown) => {
          // RGW answers NoSuchKey (not NoSuchUpload) for an upload already gone.
          if (!isNotFound(err)) throw asS3StoreError(err, `abort of upload ${rec.id}`);
        });
    }
    if (rec.tail) await this.deleteObject(rec.tail.key);
    this.hashes.delete(rec.id);
    await this.o.redis.multi().del(this.recordKey(rec.id)).zrem(this.expiryKey, rec.id).exec();
  }

  override async deleteExpired(): Promise<number> {
    const ids = await this.o.redis.zrangebyscore(this.expiryKey, '-inf', Date.now(), 'LIMIT', 0, 500);
    let removed = 0;
    for (const id of ids) {
      const raw = await this.o.redis.get(this.recordKey(id));
      if (!raw) {
        await this.o.redis.zrem(this.expiryKey, id);
        continue;
      }
      const rec = JSON.parse(raw) as TusS3Record;
      if (rec.completed) {
        await this.o.redis.zrem(this.expiryKey, id);
        continue;
      }
      await this.discard(rec);
      removed++;
    }
    return removed;
  }

  private async objectSize(key: string): Promise<number | undefined> {
    try {
      const head = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal: deadline(this.timeout) });
      return head.ContentLength;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw asS3StoreError(err, `stat of ${key}`);
    }
  }
}
