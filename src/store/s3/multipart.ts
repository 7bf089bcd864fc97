/**
 * A multipart upload written from part buffers of our own, for the output store
 * (output.ts): bytes are copied once, from the reader's recycled extent buffers
 * into the part being filled (zeros are filled in place), and the buffers are
 * reused part after part. At most `partsInFlight` UploadParts are under way (and
 * the last part beside them), so the memory is (partsInFlight + 1) × partBytes,
 * allocated once per write.
 *
 * Before, lib-storage's Upload took the extents through a PassThrough: a copy of
 * each extent (the reader recycles its buffer), lib-storage's Buffer.concat of
 * those copies into a fresh part of 8 MiB every time (garbage the GC frees late),
 * four such parts in flight and the one being gathered.
 *
 * The last part goes up when the writer says the bytes are all there
 * (`sendTail`, at the converter's finish), not at commit: the job's commit then
 * only waits for what is in flight and completes the upload (the object becomes
 * visible only then, as before). An object smaller than one part is one
 * PutObject at commit.
 */
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  PutObjectCommand,
  UploadPartCommand,
  type S3Client,
} from '@aws-sdk/client-s3';
import { alignedBuffer } from '../../engine/aligned.js';
import { StoreError } from '../common.js';
import { asS3StoreError, deadline, isNotFound } from './client.js';
import { MAX_PARTS, MIN_PART_BYTES } from './objects.js';

export interface PartWriterOptions {
  partBytes: number;
  /** UploadParts under way at once (each holds its buffer); one more buffer is being filled meanwhile. */
  partsInFlight: number;
  requestTimeoutMs: number;
}

export interface PartWriterStats {
  /** Parts uploaded or being uploaded. */
  partsSent: number;
  /** The most UploadParts that were under way at once (the last part may go beside partsInFlight others). */
  maxInFlight: number;
  /** Part buffers allocated over the write (they are reused). */
  buffers: number;
}

/**
 * One UploadPart: part `PartNumber` (from 1) of multipart upload `upload` from `body`, its ETag returned (the commit
 * lists them). `what` names the part in errors; failures are asS3StoreError's (an upload that went away:
 * StoreObjectMissingError).
 */
export async function uploadPart(
  client: S3Client,
  upload: { Bucket: string; Key: string; UploadId: string },
  PartNumber: number,
  body: Uint8Array,
  what: string,
  requestTimeoutMs: number,
  signal?: AbortSignal,
): Promise<string> {
  try {
    const res = await client.send(new UploadPartCommand({ ...upload, PartNumber, Body: body, ContentLength: body.length }), {
      abortSignal: deadline(requestTimeoutMs, signal),
    });
    if (!res.ETag) throw new StoreError(`the bucket gave no ETag for ${what}`);
    return res.ETag;
  } catch (err) {
    throw asS3StoreError(err, `upload of ${what}`, signal);
  }
}

export class PartWriter {
  private uploadId: Promise<string> | undefined;
  private readonly free: Buffer[] = [];
  private filling: Buffer | undefined;
  private filled = 0;
  private readonly etags: string[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private failure: Error | undefined;
  private readonly lifetime = new AbortController();
  private sealed = false;
  private aborted = false;
  /** Bytes taken so far. */
  written = 0;
  readonly stats: PartWriterStats = { partsSent: 0, maxInFlight: 0, buffers: 0 };

  constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly Key: string,
    private readonly what: string,
    private readonly options: PartWriterOptions,
  ) {
    if (options.partBytes < MIN_PART_BYTES) throw new Error(`parts of ${options.partBytes} bytes: S3 wants at least 5 MiB`);
    if (options.partsInFlight < 1) throw new Error('at least one part in flight');
  }

  private check(): void {
    if (this.failure) throw this.failure;
    if (this.aborted) throw new StoreError(`${this.what}: written after abort`);
    if (this.sealed) throw new StoreError(`${this.what}: written after its last part`);
  }

  /** The part to fill: a free buffer, a new one while fewer than partsInFlight + 1 exist, else once a part has gone up. */
  private async part(): Promise<Buffer> {
    for (;;) {
      this.check();
      if (this.filling) return this.filling;
      const reused = this.free.pop();
      if (reused) return (this.filling = reused);
      if (this.stats.buffers < this.options.partsInFlight + 1) {
        this.stats.buffers++;
        // Page-mapped, not malloc's: the kernel gets it back whole once the write is gone.
        return (this.filling = alignedBuffer(this.options.partBytes));
      }
      await Promise.race(this.inFlight);
    }
  }

  /** Copies `bytes` into the parts (the caller may reuse them once this resolves). */
  async write(bytes: Uint8Array): Promise<void> {
    for (let at = 0; at < bytes.length; ) {
      const part = await this.part();
      const take = Math.min(bytes.length - at, part.length - this.filled);
      part.set(bytes.subarray(at, at + take), this.filled);
      at += take;
      await this.advance(take);
    }
  }

  async zeros(length: number): Promise<void> {
    for (let left = length; left > 0; ) {
      const part = await this.part();
      const take = Math.min(left, part.length - this.filled);
      part.fill(0, this.filled, this.filled + take);
      left -= take;
      await this.advance(take);
    }
  }

  /** A full part goes up once fewer than partsInFlight are under way. */
  private async advance(bytes: number): Promise<void> {
    this.filled += bytes;
    this.written += bytes;
    if (this.filled < this.options.partBytes) return;
    while (this.inFlight.size >= this.options.partsInFlight) await Promise.race(this.inFlight);
    this.check();
    this.send();
  }

  private start(): Promise<string> {
    this.uploadId ??= (async () => {
      try {
        const res = await this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: this.Key, ContentType: 'application/octet-stream' }), {
          abortSignal: deadline(this.options.requestTimeoutMs, this.lifetime.signal),
        });
        if (!res.UploadId) throw new StoreError(`the bucket gave no upload id for ${this.what}`);
        return res.UploadId;
      } catch (err) {
        throw asS3StoreError(err, `start of the upload of ${this.what}`, this.lifetime.signal);
      }
    })();
    return this.uploadId;
  }

  /** The part being filled goes up (its buffer is free again once its UploadPart has answered). */
  private send(): void {
    const buffer = this.filling;
    if (!buffer || this.filled === 0) return;
    const body = this.filled === buffer.length ? buffer : buffer.subarray(0, this.filled);
    this.filling = undefined;
    this.filled = 0;
    const PartNumber = ++this.stats.partsSent;
    if (PartNumber > MAX_PARTS) {
      this.failure ??= new StoreError(`${this.what} needs more than ${MAX_PARTS} parts of ${this.options.partBytes} bytes`);
      return;
    }
    const sent = (async () => {
      const UploadId = await this.start();
      const upload = { Bucket: this.bucket, Key: this.Key, UploadId };
      this.etags[PartNumber - 1] = await uploadPart(this.client, upload, PartNumber, body, `part ${PartNumber} of ${this.what}`, this.options.requestTimeoutMs, this.lifetime.signal);
    })()
      .catch((err: unknown) => {
        this.failure ??= err as Error;
      })
      .finally(() => {
        this.inFlight.delete(sent);
        this.free.push(buffer);
      });
    this.inFlight.add(sent);
    this.stats.maxInFlight = Math.max(this.stats.maxInFlight, this.inFlight.size);
  }

  /**
   * Every byte is written: the last (short) part goes up now, so that commit has only the completion left.
   * An object of less than one part is kept for one PutObject at commit (nothing of it is in the bucket before).
   */
  sendTail(): void {
    if (this.sealed) return;
    this.check();
    this.sealed = true;
    // At once, even beside partsInFlight others (its buffer is already there): it is what the commit waits for.
    if (this.stats.partsSent > 0) this.send();
  }

  private async settle(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
  }

  /** After sendTail: the object made whole and visible. */
  async complete(): Promise<void> {
    if (!this.sealed) throw new StoreError(`${this.what}: completed before its last part`);
    await this.settle();
    if (this.failure) throw this.failure;
    if (this.aborted) throw new StoreError(`${this.what}: completed after abort`);
    const timeout = { abortSignal: deadline(this.options.requestTimeoutMs, this.lifetime.signal) };
    if (this.stats.partsSent === 0) {
      const body = this.filling ? this.filling.subarray(0, this.filled) : Buffer.alloc(0);
      try {
        await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: this.Key, Body: body, ContentLength: body.length, ContentType: 'application/octet-stream' }), timeout);
      } catch (err) {
        throw asS3StoreError(err, `upload of ${this.what}`, this.lifetime.signal);
      }
      this.filling = undefined;
      return;
    }
    const UploadId = await this.start();
    const Parts = this.etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 }));
    if (Parts.length !== this.stats.partsSent || Parts.some((p) => !p.ETag)) throw new StoreError(`${this.what}: ${Parts.length} of ${this.stats.partsSent} parts in place`);
    try {
      await this.client.send(new CompleteMultipartUploadCommand({ Bucket: this.bucket, Key: this.Key, UploadId, MultipartUpload: { Parts } }), timeout);
    } catch (err) {
      throw asS3StoreError(err, `completion of ${this.what}`, this.lifetime.signal);
    }
  }

  /** Stops every part under way and removes the upload in progress (nothing is left in the bucket). */
  async abort(): Promise<void> {
    if (this.aborted) return;
    this.aborted = true;
    this.lifetime.abort();
    await this.settle();
    this.filling = undefined;
    this.free.length = 0;
    const started = this.uploadId && (await this.uploadId.catch(() => undefined));
    if (!started) return;
    try {
      await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: this.Key, UploadId: started }), {
        abortSignal: deadline(this.options.requestTimeoutMs),
      });
    } catch (err) {
      // RGW answers NoSuchKey (not NoSuchUpload) for an upload already gone.
      if (!isNotFound(err)) throw asS3StoreError(err, `abort of the upload of ${this.what}`);
    }
  }
}
