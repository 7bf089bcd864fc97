/**
 * A staged upload another host can read while it arrives (S3_STAGING_OVERLAP):
 * a multipart upload's parts cannot be read before CompleteMultipartUpload, so
 * each part is first PUT as an object of its own,
 *
 *   PREFIX input/<key>.parts/<n>   part n (from 0) of the write in progress of input <key>
 *
 * announced (the caller says so in the upload's Redis mark), then copied into
 * the multipart upload server-side (UploadPartCopy: no byte through the API
 * again). The last part is the exception: it goes into the multipart upload
 * from its buffer (UploadPart) while its object is PUT, so that after the last
 * byte the commit waits for one upload of it, not a PUT and then a copy. On the
 * test Ceph the copy costs the API 0.38 s of CPU per 192 MiB where
 * PUT and UploadPart of the same buffer cost 0.58 s and twice the bytes sent;
 * the bucket does the same work either way, about twice the staged path's
 * (bench/s3-part-objects.mjs). The part objects are removed once the object is
 * committed and its readers told (`removeFollowCopies`), or by abort; a
 * sweep removes those of a dead API (sweepPartObjects).
 *
 * Memory: the part being filled and at most PARTS_IN_FLIGHT parts on their way.
 */
import { Writable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  UploadPartCopyCommand,
  type S3Client,
} from '@aws-sdk/client-s3';
import { allSettledOrThrow } from '../../engine/settle.js';
import { assertKey, StoreError, StoreObjectMissingError, type ObjectStat, type OwnerCheck } from '../common.js';
import type { FollowedWrite } from '../staging.js';
import { asS3StoreError, deadline, getRangeInto, isNotFound, type S3Settings } from './client.js';
import { uploadPart } from './multipart.js';
import { MAX_PARTS, partSizeFor } from './objects.js';

/** Parts being PUT at once (each holds its buffer): two, as the staged path's multipart upload has. */
const PARTS_IN_FLIGHT = 2;
/** Server-side copies under way at once (they hold no buffer here; they bound the part objects ahead of the upload). */
const COPIES_IN_FLIGHT = 4;

/** Part objects removed at once after the commit. */
const DELETES_IN_FLIGHT = 8;

const PART_NAME = /^(\d{1,5})$/;

export class PartObjects {
  constructor(
    private readonly client: S3Client,
    private readonly settings: S3Settings,
  ) {}

  private get bucket(): string {
    return this.settings.bucket;
  }

  /** PREFIX input/<key> */
  objectKey(key: string): string {
    assertKey(key);
    return `${this.settings.prefix}input/${key}`;
  }

  /** PREFIX input/<key>.parts/ */
  partsPrefix(key: string): string {
    return `${this.objectKey(key)}.parts/`;
  }

  partKey(key: string, part: number): string {
    if (!Number.isSafeInteger(part) || part < 0 || part >= MAX_PARTS) throw new StoreError(`part ${part} of input ${key} is out of range`);
    return `${this.partsPrefix(key)}${part}`;
  }

  /** Bytes [start, start + target.length) of part object `part` of input `key`, into `target`; StoreObjectMissingError when it is not (or no longer) there. */
  async readInto(key: string, part: number, start: number, target: Uint8Array, signal?: AbortSignal): Promise<void> {
    const Key = this.partKey(key, part);
    try {
      await getRangeInto(this.client, { Bucket: this.bucket, Key }, start, target, { timeoutMs: this.settings.requestTimeoutMs, signal, what: `part ${part} of input ${key}` });
    } catch (err) {
      if (isNotFound(err)) throw new StoreObjectMissingError(`part ${part} of input ${key} is not in the bucket`, { cause: err });
      throw asS3StoreError(err, `read of part ${part} of input ${key}`, signal);
    }
  }

  private async deleteObject(Key: string): Promise<void> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key }), { abortSignal: deadline(this.settings.requestTimeoutMs) });
    } catch (err) {
      if (!isNotFound(err)) throw asS3StoreError(err, `delete of ${Key}`);
    }
  }

  /** Part objects under input/<key>.parts/ (only names of ours: <n>). */
  private async *listParts(prefix: string): AsyncIterable<{ Key: string; key: string; modifiedAt: number }> {
    let ContinuationToken: string | undefined;
    do {
      let res;
      try {
        res = await this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, ...(ContinuationToken ? { ContinuationToken } : {}) }), {
          abortSignal: deadline(this.settings.requestTimeoutMs),
        });
      } catch (err) {
        throw asS3StoreError(err, 'listing of part objects');
      }
      for (const o of res.Contents ?? []) {
        if (o.Key) yield { Key: o.Key, key: o.Key.slice(prefix.length), modifiedAt: o.LastModified?.getTime() ?? 0 };
      }
      ContinuationToken = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (ContinuationToken);
  }

  /** Removes every part object of input `key` (the job is gone, or its write is). */
  async deleteAll(key: string): Promise<void> {
    const prefix = this.partsPrefix(key);
    for await (const o of this.listParts(prefix)) {
      if (PART_NAME.test(o.key)) await this.deleteObject(o.Key);
    }
  }

  /**
   * Part objects of writes a dead API left (last written before `olderThan`, their key held by no live owner):
   * only names this file makes (PREFIX input/<job key>.parts/<n>). Returns how many were removed.
   */
  async sweep(olderThan: number, owned: OwnerCheck): Promise<number> {
    const prefix = `${this.settings.prefix}input/`;
    const ownedNow = new Map<string, boolean>();
    let removed = 0;
    for await (const o of this.listParts(prefix)) {
      const m = /^([A-Za-z0-9_-]{1,128})\.parts\/(\d{1,5})$/.exec(o.key);
      if (!m || o.modifiedAt >= olderThan) continue;
      const key = m[1] as string;
      let held = ownedNow.get(key);
      if (held === undefined) ownedNow.set(key, (held = await owned(key)));
      if (held) continue;
      await this.deleteObject(o.Key);
      removed++;
    }
    return removed;
  }

  /**
   * A write of input `key` (`size` bytes, the body's declared length) whose parts are readable as they arrive:
   * `announce(n)` is awaited each time parts 0..n-1 are all readable, in order, never after the stream finished
   * or the write was aborted.
   */
  async create(key: string, size: number, announce: (readyParts: number) => Promise<void>): Promise<FollowedWrite> {
    const Key = this.objectKey(key);
    const partBytes = partSizeFor(size);
    let uploadId: string;
    try {
      const res = await this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key, ContentType: 'application/octet-stream' }), {
        abortSignal: deadline(this.settings.requestTimeoutMs),
      });
      if (!res.UploadId) throw new StoreError(`the bucket gave no upload id for input ${key}`);
      uploadId = res.UploadId;
    } catch (err) {
      throw asS3StoreError(err, `start of the upload of input ${key}`);
    }
    const UploadId = uploadId;
    const etags: string[] = [];
    const readable: boolean[] = [];
    /** Part objects PUT (or being PUT): the ones abort removes. */
    let started = 0;
    let announced = 0;
    let announcing: Promise<void> = Promise.resolve();
    let stopped = false;
    /** The multipart upload went away under us (the job's input was deleted: it is over). The rest of the body is drained. */
    let discarded = false;
    let failure: Error | undefined;
    /** PUTs of part objects (each holds its part's buffer) and copies into the multipart upload (no buffer) under way. */
    const puts = new Set<Promise<void>>();
    const copies = new Set<Promise<void>>();
    /** The part being filled (copied into: the body's chunks are not kept). */
    let filling: Buffer | undefined;
    let filled = 0;
    let written = 0;

    const tellReadable = (): void => {
      let ready = announced;
      while (readable[ready]) ready++;
      if (ready === announced) return;
      announced = ready;
      // Each announcement carries the latest count, so one that failed (Redis briefly away) is made good by
      // the next: a failure must not skip the announcements after it (settle() still sees the last one's).
      announcing = announcing.catch(() => {}).then(() => (stopped ? undefined : announce(ready)));
    };

    const copyPart = async (part: number, partKey: string): Promise<void> => {
      try {
        const res = await this.client.send(
          new UploadPartCopyCommand({ Bucket: this.bucket, Key, UploadId, PartNumber: part + 1, CopySource: encodeURI(`${this.bucket}/${partKey}`) }),
          { abortSignal: deadline(this.settings.requestTimeoutMs) },
        );
        const etag = res.CopyPartResult?.ETag;
        if (!etag) throw new StoreError(`the bucket gave no ETag for part ${part} of input ${key}`);
        etags[part] = etag;
      } catch (err) {
        if (isNotFound(err)) discarded = true;
        else failure ??= asS3StoreError(err, `copy of part ${part} of input ${key}`);
      }
    };

    /** Part `part` into the multipart upload from its buffer (the last part: no copy to wait for after its PUT). */
    const uploadDirect = async (part: number, body: Buffer): Promise<void> => {
      try {
        etags[part] = await uploadPart(this.client, { Bucket: this.bucket, Key, UploadId }, part + 1, body, `part ${part} of input ${key}`, this.settings.requestTimeoutMs);
      } catch (err) {
        if (err instanceof StoreObjectMissingError) discarded = true;
        else failure ??= err as Error;
      }
    };

    /**
     * PUT as its own object (the buffer is free after), announced, then copied into the multipart upload. The last
     * part (`direct`) goes into the multipart upload from its buffer while its object is PUT: after the last byte,
     * the commit then waits for one upload, not for a PUT and then a server-side copy of it (its bytes are sent
     * twice, one part of the upload).
     */
    const sendPart = async (part: number, body: Buffer, direct: boolean): Promise<void> => {
      const partKey = this.partKey(key, part);
      if (direct) {
        const u = uploadDirect(part, body).finally(() => copies.delete(u));
        copies.add(u);
      }
      try {
        await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: partKey, Body: body, ContentType: 'application/octet-stream' }), {
          abortSignal: deadline(this.settings.requestTimeoutMs),
        });
      } catch (err) {
        failure ??= asS3StoreError(err, `upload of part ${part} of input ${key}`);
        return;
      }
      readable[part] = true;
      tellReadable();
      if (direct) return;
      const c = copyPart(part, partKey).finally(() => copies.delete(c));
      copies.add(c);
    };

    /** The part being filled goes (`last`: the body has ended, no part follows it). */
    const flush = async (last = false): Promise<void> => {
      if (failure) throw failure;
      if (filled === 0 || !filling) return;
      const body = filled === filling.length ? filling : filling.subarray(0, filled);
      filling = undefined;
      filled = 0;
      if (discarded) return;
      // The last part waits for no slot: nothing is filled behind it, and the commit waits for it.
      while (!last && (puts.size >= PARTS_IN_FLIGHT || copies.size >= COPIES_IN_FLIGHT)) await Promise.race([...puts, ...copies]);
      if (failure) throw failure;
      const part = started++;
      if (part >= MAX_PARTS) throw new StoreError(`input ${key} is larger than ${partBytes * MAX_PARTS} bytes (its declared size was ${size})`);
      const p = sendPart(part, body, last).finally(() => puts.delete(p));
      puts.add(p);
    };

    const settle = async (): Promise<void> => {
      while (puts.size > 0 || copies.size > 0) await Promise.race([...puts, ...copies]);
      await announcing.catch(() => {});
    };

    const stream = new Writable({
      highWaterMark: 1 << 20,
      write(chunk: Buffer, _encoding, done) {
        (async () => {
          let at = 0;
          while (at < chunk.length) {
            filling ??= Buffer.allocUnsafe(partBytes);
            const take = Math.min(chunk.length - at, partBytes - filled);
            chunk.copy(filling, filled, at, at + take);
            filled += take;
            written += take;
            at += take;
            // A full part that ends the declared body is the last: it goes as final() would send it.
            if (filled === partBytes) await flush(written === size);
          }
        })().then(() => done(), done);
      },
      final(done) {
        // The last part (short) goes now: the source's every byte is readable before the stream says it finished.
        (async () => {
          await flush(true);
          await settle();
          if (failure) throw failure;
        })().then(() => done(), done);
      },
    });

    let aborted = false;
    // The API answers the upload once they are gone: DELETEs side by side, not one after another.
    const removeParts = async (): Promise<void> => {
      let next = 0;
      const lane = async (): Promise<void> => {
        while (next < started) await this.deleteObject(this.partKey(key, next++));
      };
      await allSettledOrThrow(Array.from({ length: Math.min(DELETES_IN_FLIGHT, started) }, lane));
    };
    return {
      stream,
      partBytes,
      followToken: UploadId,
      commit: async (): Promise<ObjectStat> => {
        if (!stream.writableFinished) throw new StoreError(`commit of input ${key} before the stream finished`);
        await settle();
        if (failure) throw failure;
        if (discarded) throw new StoreObjectMissingError(`input ${key} was removed while it was written`);
        const Parts = etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 }));
        if (Parts.length !== started || Parts.some((p) => !p.ETag)) throw new StoreError(`input ${key}: ${Parts.length} of ${started} parts in place`);
        try {
          await this.client.send(new CompleteMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId, MultipartUpload: { Parts } }), {
            abortSignal: deadline(this.settings.requestTimeoutMs),
          });
        } catch (err) {
          throw asS3StoreError(err, `completion of input ${key}`);
        }
        // RGW answers Complete with an empty ETag: the object's size and date read back.
        let head;
        try {
          head = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key }), { abortSignal: deadline(this.settings.requestTimeoutMs) });
        } catch (err) {
          throw asS3StoreError(err, `stat of input ${key}`);
        }
        const stored = head.ContentLength ?? 0;
        if (stored !== written) throw new StoreError(`input ${key} is ${stored} bytes in the bucket after its completion, ${written} written`);
        return { key, size: stored, modifiedAt: head.LastModified?.getTime() ?? Date.now() };
      },
      removeFollowCopies: async () => {
        stopped = true;
        await removeParts();
      },
      abort: async () => {
        if (aborted) return;
        aborted = true;
        stopped = true;
        stream.destroy();
        await settle();
        try {
          await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId }), { abortSignal: deadline(this.settings.requestTimeoutMs) });
        } catch (err) {
          // RGW answers NoSuchKey (not NoSuchUpload) for an upload already gone.
          if (!isNotFound(err)) throw asS3StoreError(err, `abort of the upload of input ${key}`);
        }
        await removeParts();
      },
    };
  }
}
