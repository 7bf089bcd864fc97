/**
 * Objects of one kind under the bucket's prefix, and the multipart uploads
 * that are their writes in progress:
 *
 *   PREFIX input/<key>    committed staged uploads
 *   PREFIX output/<key>   committed raw images
 *
 * An object exists only once its upload completes (CompleteMultipartUpload,
 * or a single PutObject), so a reader sees a whole object or none; an
 * uncommitted write is a multipart upload in progress, swept by its
 * initiation time and its owner.
 */
import { Readable, PassThrough } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  type S3Client,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { assertKey, StoreObjectMissingError, type ByteRange, type ObjectStat, type OwnerCheck } from '../common.js';
import type { ObjectSet } from '../objects.js';
import { asS3StoreError, deadline, getRangeInto, isNotFound, pingBucket, type S3Settings } from './client.js';

export type S3Kind = 'input' | 'output';

export interface HeadResult extends ObjectStat {
  etag: string | undefined;
}

/** S3 allows 10,000 parts of at least 5 MiB (all but the last). */
export const MAX_PARTS = 10_000;
export const MIN_PART_BYTES = 5 * 2 ** 20;
/** Our parts unless said: 8 MiB. */
const DEFAULT_PART_BYTES = 8 * 2 ** 20;

/** Parts of at least `least` bytes (S3: 5 MiB; 8 MiB here unless said), whole MiB, few enough for `size` (10,000 at most). */
export function partSizeFor(size: number | undefined, least = DEFAULT_PART_BYTES): number {
  const floor = Math.max(MIN_PART_BYTES, least);
  if (size === undefined) return floor;
  const needed = Math.ceil(size / (MAX_PARTS - 1));
  return Math.max(floor, Math.ceil(needed / 2 ** 20) * 2 ** 20);
}

/** An upload in progress: a writable stream into a multipart upload. */
export interface S3Write {
  stream: PassThrough;
  /** Resolves once the object is complete, with its metadata read back (RGW answers Complete with an empty ETag). */
  done(): Promise<HeadResult>;
  abort(): Promise<void>;
  /** Rejects when the upload fails before the stream ends (so writers never wait on a dead stream). */
  readonly failed: Promise<never>;
}

export class S3Objects implements ObjectSet {
  constructor(
    readonly client: S3Client,
    readonly settings: S3Settings,
    readonly kind: S3Kind,
  ) {}

  objectKey(key: string): string {
    assertKey(key);
    return `${this.settings.prefix}${this.kind}/${key}`;
  }

  /** s3://BUCKET/KEY */
  location(key: string): string {
    return `s3://${this.settings.bucket}/${this.objectKey(key)}`;
  }

  private get timeout(): number {
    return this.settings.requestTimeoutMs;
  }

  write(key: string, options: { size?: number; queueSize?: number } = {}): S3Write {
    const Key = this.objectKey(key);
    const stream = new PassThrough({ highWaterMark: 1 << 20 });
    const upload = new Upload({
      client: this.client,
      params: { Bucket: this.settings.bucket, Key, Body: stream, ContentType: 'application/octet-stream' },
      partSize: partSizeFor(options.size),
      queueSize: options.queueSize ?? 4,
      leavePartsOnError: false,
    });
    const finished = upload.done();
    let failedReject: (err: unknown) => void = () => {};
    const failed = new Promise<never>((_, reject) => (failedReject = reject));
    failed.catch(() => {});
    finished.catch((err: unknown) => {
      failedReject(asS3StoreError(err, `upload of ${this.kind} ${key}`));
      stream.resume(); // let writers blocked on backpressure through; their bytes go nowhere
    });
    let aborted = false;
    return {
      stream,
      failed,
      done: async () => {
        try {
          await finished;
        } catch (err) {
          throw asS3StoreError(err, `upload of ${this.kind} ${key}`);
        }
        const head = await this.head(key);
        if (!head) throw new StoreObjectMissingError(`${this.kind} ${key} is not in the bucket after its upload completed`);
        return head;
      },
      abort: async () => {
        if (aborted) return;
        aborted = true;
        stream.destroy();
        await upload.abort().catch(() => {});
        await finished.catch(() => {});
        // lib-storage aborts its multipart upload; make sure, with our own id (never another writer's).
        if (upload.uploadId) await this.abortUpload(Key, upload.uploadId);
      },
    };
  }

  private async abortUpload(Key: string, UploadId: string): Promise<void> {
    try {
      await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.settings.bucket, Key, UploadId }), { abortSignal: deadline(this.timeout) });
    } catch (err) {
      // RGW answers NoSuchKey (not NoSuchUpload) for an upload already gone.
      if (!isNotFound(err)) throw asS3StoreError(err, `abort of an upload of ${Key}`);
    }
  }

  async head(key: string): Promise<HeadResult | undefined> {
    try {
      const res = await this.client.send(new HeadObjectCommand({ Bucket: this.settings.bucket, Key: this.objectKey(key) }), { abortSignal: deadline(this.timeout) });
      return { key, size: res.ContentLength ?? 0, modifiedAt: res.LastModified?.getTime() ?? 0, etag: res.ETag };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw asS3StoreError(err, `stat of ${this.kind} ${key}`);
    }
  }

  async stat(key: string): Promise<ObjectStat | undefined> {
    const head = await this.head(key);
    return head && { key, size: head.size, modifiedAt: head.modifiedAt };
  }

  async read(key: string, range?: ByteRange): Promise<Readable> {
    try {
      // The body streams for as long as the client reads; only the request itself has a deadline.
      const res = await this.client.send(
        new GetObjectCommand({ Bucket: this.settings.bucket, Key: this.objectKey(key), ...(range ? { Range: `bytes=${range.start}-${range.end}` } : {}) }),
      );
      if (!(res.Body instanceof Readable)) throw new Error('the S3 client returned no stream');
      return res.Body;
    } catch (err) {
      if (isNotFound(err)) throw new StoreObjectMissingError(`${this.kind} ${key} is not in the store`);
      throw asS3StoreError(err, `read of ${this.kind} ${key}`);
    }
  }

  /** Bytes [start, start + target.length) of the object, into `target`, in one ranged GET with a deadline. */
  async readInto(key: string, start: number, target: Uint8Array, signal?: AbortSignal): Promise<void> {
    try {
      await getRangeInto(this.client, { Bucket: this.settings.bucket, Key: this.objectKey(key) }, start, target, { timeoutMs: this.timeout, signal, what: `${this.kind} ${key}` });
    } catch (err) {
      if (isNotFound(err)) throw new StoreObjectMissingError(`${this.kind} ${key} is not in the store`, { cause: err });
      throw asS3StoreError(err, `read of ${this.kind} ${key}`, signal);
    }
  }

  /** Removes the object and every upload in progress for its key. */
  async delete(key: string): Promise<void> {
    const Key = this.objectKey(key);
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.settings.bucket, Key }), { abortSignal: deadline(this.timeout) });
    } catch (err) {
      if (!isNotFound(err)) throw asS3StoreError(err, `delete of ${this.kind} ${key}`);
    }
    for await (const upload of this.uploads(Key)) {
      if (upload.key === Key) await this.abortUpload(Key, upload.uploadId);
    }
  }

  async *list(): AsyncIterable<ObjectStat> {
    const Prefix = `${this.settings.prefix}${this.kind}/`;
    let ContinuationToken: string | undefined;
    do {
      let res;
      try {
        res = await this.client.send(new ListObjectsV2Command({ Bucket: this.settings.bucket, Prefix, ...(ContinuationToken ? { ContinuationToken } : {}) }), {
          abortSignal: deadline(this.timeout),
        });
      } catch (err) {
        throw asS3StoreError(err, `listing of ${this.kind}`);
      }
      for (const o of res.Contents ?? []) {
        const key = (o.Key ?? '').slice(Prefix.length);
        if (key && !key.includes('/')) yield { key, size: o.Size ?? 0, modifiedAt: o.LastModified?.getTime() ?? 0 };
      }
      ContinuationToken = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (ContinuationToken);
  }

  /** Multipart uploads in progress under `prefix`. */
  async *uploads(prefix: string): AsyncIterable<{ key: string; uploadId: string; initiated: number }> {
    let KeyMarker: string | undefined;
    let UploadIdMarker: string | undefined;
    do {
      let res;
      try {
        res = await this.client.send(
          new ListMultipartUploadsCommand({ Bucket: this.settings.bucket, Prefix: prefix, ...(KeyMarker ? { KeyMarker } : {}), ...(UploadIdMarker ? { UploadIdMarker } : {}) }),
          { abortSignal: deadline(this.timeout) },
        );
      } catch (err) {
        throw asS3StoreError(err, 'listing of uploads in progress');
      }
      for (const u of res.Uploads ?? []) {
        if (u.Key && u.UploadId) yield { key: u.Key, uploadId: u.UploadId, initiated: u.Initiated?.getTime() ?? 0 };
      }
      const more = res.IsTruncated === true;
      KeyMarker = more ? res.NextKeyMarker : undefined;
      UploadIdMarker = more ? res.NextUploadIdMarker : undefined;
    } while (KeyMarker);
  }

  async sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number> {
    const Prefix = `${this.settings.prefix}${this.kind}/`;
    let removed = 0;
    for await (const u of this.uploads(Prefix)) {
      if (u.initiated >= olderThan) continue;
      const key = u.key.slice(Prefix.length);
      if (key.length > 0 && (await owned(key))) continue;
      await this.abortUpload(u.key, u.uploadId);
      removed++;
    }
    return removed;
  }

  /** A bucket has no free-space figure. */
  async freeBytes(): Promise<undefined> {
    return undefined;
  }

  ping(): Promise<void> {
    return pingBucket(this.client, this.settings);
  }
}
