/**
 * The one place that builds the S3 client (Ceph RGW, AWS S3, MinIO) and turns
 * its errors into the store's. Facts measured against Ceph 16.2 RGW (issue 7):
 * the SDK's default CRC32 checksums on streamed uploads are refused (411), so
 * checksums are sent only when an operation requires them; a full OSD makes
 * requests hang without an error, so every request has a deadline.
 */
import { Readable } from 'node:stream';
import { GetObjectCommand, HeadBucketCommand, S3Client, S3ServiceException } from '@aws-sdk/client-s3';
import { AbortedError, isDiskconvError } from '../../engine/errors.js';
import { StoreError, StoreObjectMissingError } from '../common.js';

export interface S3Settings {
  bucket: string;
  /** '' or ending in '/'. */
  prefix: string;
  endpoint: string | undefined;
  region: string;
  forcePathStyle: boolean;
  /** Deadline of one request (and the idle limit of a body in flight). */
  requestTimeoutMs: number;
}

export function createS3Client(s: S3Settings): S3Client {
  return new S3Client({
    region: s.region,
    ...(s.endpoint ? { endpoint: s.endpoint } : {}),
    forcePathStyle: s.forcePathStyle,
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: 3,
    requestHandler: {
      connectionTimeout: Math.min(10_000, s.requestTimeoutMs),
      // Idle socket limit: a request whose peer stops answering (a full OSD) fails instead of hanging.
      socketTimeout: s.requestTimeoutMs,
      requestTimeout: s.requestTimeoutMs,
      throwOnRequestTimeout: true,
    },
  });
}

/** A signal that fires on the caller's abort or after `ms`: the deadline of one request. */
export function deadline(ms: number, signal?: AbortSignal): AbortSignal {
  const timeout = AbortSignal.timeout(ms);
  return signal ? AbortSignal.any([signal, timeout]) : timeout;
}

/**
 * A GET's body read into `target`, which it must fill exactly (a ranged GET's length is known). The SDK's own
 * transformToByteArray keeps every chunk and then concatenates them: twice the range in memory for a moment, and a
 * fresh buffer per request where the caller has one to fill.
 */
export async function readBodyInto(body: unknown, target: Uint8Array, what: string): Promise<Uint8Array> {
  if (!(body instanceof Readable)) {
    const bytes = await (body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray();
    if (bytes.length !== target.length) throw new StoreError(`${what}: asked for ${target.length} bytes, got ${bytes.length}`);
    target.set(bytes);
    return target;
  }
  let at = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) {
    if (at + chunk.length > target.length) {
      body.destroy();
      throw new StoreError(`${what}: asked for ${target.length} bytes, got more`);
    }
    target.set(chunk, at);
    at += chunk.length;
  }
  if (at !== target.length) throw new StoreError(`${what}: asked for ${target.length} bytes, got ${at}`);
  return target;
}

/**
 * Bytes [start, start + target.length) of an object in one ranged GET with a deadline, into `target`, which it
 * must fill exactly; the SDK's errors are the caller's to name.
 */
export async function getRangeInto(
  client: S3Client,
  object: { Bucket: string; Key: string; IfMatch?: string },
  start: number,
  target: Uint8Array,
  request: { timeoutMs: number; signal?: AbortSignal; what: string },
): Promise<Uint8Array> {
  const res = await client.send(new GetObjectCommand({ ...object, Range: `bytes=${start}-${start + target.length - 1}` }), {
    abortSignal: deadline(request.timeoutMs, request.signal),
  });
  if (!res.Body) throw new StoreError(`${request.what}: empty answer to a range request`);
  return readBodyInto(res.Body, target, `${request.what} at ${start}`);
}

export function isNotFound(err: unknown): boolean {
  if (err instanceof S3ServiceException) {
    return err.name === 'NoSuchKey' || err.name === 'NotFound' || err.name === 'NoSuchUpload' || err.$metadata?.httpStatusCode === 404;
  }
  return false;
}

/** S3 failures as store errors: a missing object is STORE_OBJECT_MISSING, the rest transient STORE_UNAVAILABLE. */
export function asS3StoreError(err: unknown, what: string, signal?: AbortSignal): Error {
  if (isDiskconvError(err)) return err;
  if (signal?.aborted) return new AbortedError();
  if (isNotFound(err)) return new StoreObjectMissingError(`${what}: not in the bucket`, { cause: err });
  const e = err as { name?: string; message?: string; $metadata?: { httpStatusCode?: number } };
  const status = e.$metadata?.httpStatusCode;
  const why = e.name === 'TimeoutError' || e.name === 'AbortError' ? 'timed out' : `${e.name ?? 'error'}${status ? ` (HTTP ${status})` : ''}`;
  return new StoreError(`${what} failed: ${why}`, { cause: err });
}

/** Readiness: the bucket exists and our credentials reach it; the message says which is wrong. */
export async function pingBucket(client: S3Client, s: S3Settings): Promise<void> {
  try {
    await client.send(new HeadBucketCommand({ Bucket: s.bucket }), { abortSignal: deadline(Math.min(5000, s.requestTimeoutMs)) });
  } catch (err) {
    const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
    if (status === 404 || (err as { name?: string }).name === 'NotFound') throw new StoreError(`bucket '${s.bucket}' does not exist (create it first)`, { cause: err });
    if (status === 403) throw new StoreError(`access to bucket '${s.bucket}' denied (check the credentials)`, { cause: err });
    throw asS3StoreError(err, `bucket '${s.bucket}' check`);
  }
}
