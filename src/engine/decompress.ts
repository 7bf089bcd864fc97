import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { createInflate, createInflateRaw, inflate, inflateRaw, constants as zc, type Inflate, type InflateRaw } from 'node:zlib';
import { DecodePool, serveDecodeRequests } from './decode-pool.js';
import { isShared } from './aligned.js';
import { CodecDataError } from './codec-error.js';
import { ImageCorruptError, UnsupportedFeatureError } from './errors.js';
import type { Codec } from './types.js';
import { decodeZstdCluster, ZstdUnavailableError } from './zstd.js';
import { nativeDecoder, type DirectTarget } from './native-decoder.js';
import { decodingStarts } from './decode-start.js';

export { decodeZstdCluster, zstdBackend } from './zstd.js';
export { setNativeDecoding, type DirectTarget } from './native-decoder.js';

const inflateAsync = promisify(inflate);
const inflateRawAsync = promisify(inflateRaw);

/**
 * Decodes one compressed cluster or grain. Output is bounded by `decodedLength`:
 * a stream that would inflate past it is refused or cut there (no inflate bombs).
 *
 * `target`, when given, is room for at least `decodedLength` bytes that the
 * output may be written to (the result is then a view of it), so a caller can
 * recycle output memory and find consecutive clusters side by side.
 *
 * Clusters decode on libuv's threadpool through the native decoder
 * (native-decoder.ts) where it built; what it declines (damaged data, a stream
 * past its cluster) decodes here, which gives qemu's answer and words.
 * Without it they decode on a pool of worker threads, one per core, reading
 * their input from the reader's shared read arena and writing their output
 * into its shared decoded arena in place (no copies, no garbage); the main
 * thread meanwhile reads and writes. Without shared memory or a worker script
 * (under a TypeScript loader) they decode here, with one reused native zlib
 * context (ReusableInflater) and libzstd (zstd.ts).
 *
 * Only a codec's verdict on the data is IMAGE_CORRUPT. Anything else thrown
 * here (a TypeError, a decoder worker that died) is our bug or the host's
 * trouble: it propagates as it is, so the CLI and the service report it as an
 * internal error with its stack and the queue retries it.
 *
 * Kept small (the native path inline, the rest in functions of their own): it
 * runs once per cluster and V8 inlines it into the reader's hot loop.
 */
export function decode(codec: Codec, input: Uint8Array, decodedLength: number, where: string, target?: Uint8Array): Promise<Uint8Array> {
  if (first) started();
  const native = nativeDecoder();
  if (native === null || !validArguments(input, decodedLength)) return decodeElsewhere(codec, input, decodedLength, where, target);
  const out = target !== undefined && target.length >= decodedLength ? target.subarray(0, decodedLength) : Buffer.allocUnsafeSlow(decodedLength);
  return native.decode(codec, input, out).then((produced) => {
    if (produced < 0) return decodeDeclined(codec, input, decodedLength, where, out);
    stats.offThread++;
    return out.subarray(0, produced);
  });
}

/** Whether no cluster was decoded yet in this process (decode-start.ts). */
let first = true;
function started(): void {
  first = false;
  decodingStarts();
}

/** Whether decodeToFile can write clusters straight from the decoding thread (the native decoder with decodeWrite). */
export function writesDirect(): boolean {
  return nativeDecoder()?.writesDirect === true;
}

/**
 * Decodes one compressed cluster and writes its bytes [skip, skip + length) at
 * `position` of `target` from the thread that decoded it (native-decoder.ts),
 * without the bytes coming back to JavaScript. Resolves true when written;
 * false where the native decoder declines or is not there (nothing written:
 * the caller decodes the cluster with decode(), which gives qemu's answer and
 * words, and writes it itself). A failed write rejects with the fs error.
 */
export function decodeToFile(codec: Codec, input: Uint8Array, decodedLength: number, target: DirectTarget, position: number, skip: number, length: number): Promise<boolean> {
  if (first) started();
  const native = nativeDecoder();
  if (native === null || !native.writesDirect || !validArguments(input, decodedLength) || !(skip >= 0 && length > 0 && skip + length <= decodedLength)) return Promise.resolve(false);
  return native.decodeToFile(codec, input, decodedLength, target, position, skip, length).then((produced) => {
    if (produced < 0) return false;
    stats.offThread++;
    return true;
  });
}

/**
 * Writes `input`'s bytes [skip, skip + length) at `position` of `target` from
 * the threadpool, in parallel pieces, zero blocks left as holes as
 * decodeToFile does: the stored runs of a compressed image, so they are not
 * written by one sink call per batch after its clusters decoded. Resolves true
 * when written, false where the native decoder (with decodeWrite) is not
 * there (nothing written: the caller writes them its usual way). A failed
 * write rejects with the fs error.
 */
export function writeToFile(input: Uint8Array, target: DirectTarget, position: number, skip: number, length: number): Promise<boolean> {
  const native = nativeDecoder();
  if (native === null || !native.writesDirect || !(input instanceof Uint8Array) || !(Number.isSafeInteger(skip) && Number.isSafeInteger(length) && skip >= 0 && length > 0 && skip + length <= input.length))
    return Promise.resolve(false);
  return native.writeToFile(input, target, position, skip, length).then(() => true);
}

/** A cluster the native decoder declined (damaged data, a stream past its cluster...): decoded here, which gives qemu's answer and words. */
function decodeDeclined(codec: Codec, input: Uint8Array, decodedLength: number, where: string, out: Uint8Array): Uint8Array {
  stats.inline++;
  try {
    return decodeClusterSync(codec, input, decodedLength, (bytes) => (bytes <= out.length ? out.subarray(0, bytes) : Buffer.allocUnsafeSlow(bytes)));
  } catch (err) {
    throw blame(err, where);
  }
}

/** Without the native decoder: on the worker threads, or here. */
async function decodeElsewhere(codec: Codec, input: Uint8Array, decodedLength: number, where: string, target?: Uint8Array): Promise<Uint8Array> {
  try {
    if (codec !== 'zstd' && !reusableInflateWorks()) return await decodeDeflateAsync(codec, input, decodedLength);
    // Off this thread where input and room for the output are shared memory (no copies).
    const pool = target && isShared(input) && isShared(target) ? decoderPool() : null;
    if (pool) {
      const out = await pool.decode(codec, input, decodedLength, target);
      stats.offThread++;
      return out;
    }
    stats.inline++;
    const alloc = (bytes: number): Uint8Array => (target && target.length >= bytes ? target.subarray(0, bytes) : Buffer.allocUnsafeSlow(bytes));
    return decodeClusterSync(codec, input, decodedLength, alloc);
  } catch (err) {
    throw blame(err, where);
  }
}

/** Only a codec's verdict on the data is the image's fault (IMAGE_CORRUPT); a missing libzstd is the host's. */
function blame(err: unknown, where: string): unknown {
  if (err instanceof CodecDataError) return new ImageCorruptError(`cannot decompress ${where}: ${err.message}`, { cause: err });
  if (err instanceof ZstdUnavailableError) return new UnsupportedFeatureError(err.message, { cause: err });
  return err;
}

const stats = { offThread: 0, inline: 0 };

/** Clusters this process decoded so far on decoder threads and on the calling thread (for tests and diagnostics). */
export function decoderStats(): { offThread: number; inline: number } {
  return { ...stats };
}

/**
 * Decodes one cluster on this thread (a worker's, or the main one where no
 * worker can run). Throws CodecDataError for damaged data; decode() adds where.
 */
function decodeClusterSync(codec: Codec, input: Uint8Array, decodedLength: number, alloc: (bytes: number) => Uint8Array): Uint8Array {
  checkArguments(input, decodedLength);
  switch (codec) {
    case 'zstd':
      return decodeZstdCluster(input, decodedLength, alloc(decodedLength));
    case 'deflate':
      return inflateClusterSync(input, decodedLength, alloc(decodedLength));
    case 'vmdk-grain':
      return inflateGrainSync(input, decodedLength, alloc(decodedLength));
  }
}

/** What the native handles take; anything else would abort the process. */
function validArguments(input: Uint8Array, decodedLength: number): boolean {
  return input instanceof Uint8Array && Number.isSafeInteger(decodedLength) && decodedLength > 0 && decodedLength <= 2 ** 30;
}

/** A caller's mistake is a TypeError. */
function checkArguments(input: Uint8Array, decodedLength: number): void {
  if (!validArguments(input, decodedLength)) {
    throw new TypeError(`decode: input must be a Uint8Array and decodedLength a positive integer up to 1 GiB (got ${decodedLength})`);
  }
}

// ---------------------------------------------------------------------------
// deflate (qcow2 zlib type) and vmdk grains (zlib with header)

/**
 * qemu inflates a qcow2 cluster until the output buffer is full and ignores
 * whatever follows (the stored size is rounded up to sectors, so trailing bytes
 * are normal, and a stream that runs on past the cluster keeps its first
 * decodedLength bytes). A stream that ends before the cluster is full is corrupt.
 * One inflate call into an output of exactly the cluster size does all of that.
 */
function inflateClusterSync(input: Uint8Array, decodedLength: number, out: Uint8Array): Uint8Array {
  const produced = rawInflater.inflate(input, out, zc.Z_SYNC_FLUSH);
  if (produced !== decodedLength) throw new CodecDataError(`inflated to ${produced} bytes, expected ${decodedLength}`);
  return out;
}

/** A vmdk grain: 12-byte header (LBA, size), then a zlib stream of at most decodedLength bytes. */
function inflateGrainSync(input: Uint8Array, decodedLength: number, out: Uint8Array): Uint8Array {
  const size = grainDataSize(input);
  // decodedLength is the grain size, an upper bound: qemu writes the last grain
  // of a disk that is not a whole number of grains with only the bytes inside
  // the disk, VMware writes it whole. The reader checks the output covers
  // the bytes it takes, as qemu does. A stream that fills the grain is asked
  // for a little more, so an overlong one is seen and refused, not cut.
  // As node:zlib's inflate() does: all input without a finish flag (so output
  // past the grain is reported before a missing end), then a finish that
  // reports a stream cut short.
  const data = input.subarray(12, 12 + size);
  const produced = zlibInflater.inflate(data, out, zc.Z_SYNC_FLUSH);
  const tooLarge = new CodecDataError(`Cannot create a Buffer larger than ${decodedLength} bytes`);
  if (produced === out.length && zlibInflater.inflateMore(data, overflowProbe, zc.Z_SYNC_FLUSH) > 0) throw tooLarge;
  if (zlibInflater.inflateMore(data, overflowProbe, zc.Z_FINISH) > 0) throw tooLarge;
  if (produced === 0) throw new CodecDataError('grain inflated to 0 bytes');
  return out.subarray(0, produced);
}

/** Where an overlong grain's extra output lands. */
const overflowProbe = new Uint8Array(64);

function grainDataSize(input: Uint8Array): number {
  if (input.length < 12) throw new CodecDataError('grain header truncated');
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  const size = view.getUint32(8, true);
  if (size === 0 || 12 + size > input.length) throw new CodecDataError(`grain data size ${size} exceeds the bytes available`);
  return size;
}

/** The parts of a node:zlib stream's native handle used here (internal, unchanged since Node 10). */
interface ZlibHandle {
  writeSync(flush: number, input: Uint8Array, inOffset: number, inLength: number, out: Uint8Array, outOffset: number, outLength: number): void;
  reset(): void;
  onerror: (this: ZlibHandle, message: string, errno: number, code?: string) => void;
}
interface ZlibStreamInternals {
  _handle?: ZlibHandle | null;
  /** [avail_out, avail_in] after the last write. */
  _writeState?: Uint32Array;
}

/**
 * One zlib inflate context, reset and reused for every cluster. node:zlib's
 * public calls build a stream object and a fresh context (inflateInit, a 32 KiB
 * window) per call, which costs more than inflating a 64 KiB cluster; here a
 * cluster is one inflateReset and one inflate call straight into its output.
 * After a zlib error node:zlib closes the context, so the next call makes a new one.
 */
class ReusableInflater {
  private stream: Inflate | InflateRaw | undefined;
  private handle: ZlibHandle | undefined;
  private state: Uint32Array | undefined;
  private failure: string | undefined;
  /** Input bytes the last call left unread. */
  private inputLeft = 0;

  constructor(private readonly raw: boolean) {}

  /** Whether this Node's zlib streams expose the handle this needs. */
  works(): boolean {
    try {
      this.open();
      return true;
    } catch {
      return false;
    }
  }

  /** Inflates `input` from the start of a stream into `out` with one inflate call; returns the bytes produced. */
  inflate(input: Uint8Array, out: Uint8Array, flush: number): number {
    this.open()[0].reset();
    this.inputLeft = input.length;
    return this.write(input, out, flush);
  }

  /** Goes on with the stream of the last inflate() (same input) into `out`; returns the bytes produced. */
  inflateMore(input: Uint8Array, out: Uint8Array, flush: number): number {
    return this.write(input.subarray(input.length - this.inputLeft), out, flush);
  }

  private write(input: Uint8Array, out: Uint8Array, flush: number): number {
    const [handle, state] = this.open();
    this.failure = undefined;
    handle.writeSync(flush, input, 0, input.length, out, 0, out.length);
    if (this.failure !== undefined) {
      const message = this.failure;
      this.stream = this.handle = this.state = undefined; // node:zlib has closed it
      throw new CodecDataError(message);
    }
    this.inputLeft = state[1] as number;
    return out.length - (state[0] as number);
  }

  private open(): [ZlibHandle, Uint32Array] {
    if (this.handle && this.state) return [this.handle, this.state];
    const stream = this.raw ? createInflateRaw() : createInflate();
    const { _handle: handle, _writeState: state } = stream as unknown as ZlibStreamInternals;
    if (!handle || typeof handle.writeSync !== 'function' || typeof handle.reset !== 'function' || typeof handle.onerror !== 'function' || !(state instanceof Uint32Array)) {
      stream.destroy();
      throw new Error('node:zlib internals differ');
    }
    // node:zlib reports a zlib error through the handle's onerror (and then
    // destroys the stream); note the message so inflate() can throw it.
    stream.on('error', () => {});
    const onerror = handle.onerror;
    handle.onerror = (message, errno, code) => {
      this.failure = message;
      onerror.call(handle, message, errno, code);
    };
    this.stream = stream;
    this.handle = handle;
    this.state = state;
    return [handle, state];
  }
}

const rawInflater = new ReusableInflater(true);
const zlibInflater = new ReusableInflater(false);
let inflateChecked: boolean | undefined;

function reusableInflateWorks(): boolean {
  inflateChecked ??= rawInflater.works() && zlibInflater.works();
  return inflateChecked;
}

/** node:zlib's public API, for a Node whose zlib internals differ: slower, same results. */
async function decodeDeflateAsync(codec: Exclude<Codec, 'zstd'>, input: Uint8Array, decodedLength: number): Promise<Uint8Array> {
  try {
    if (codec === 'deflate') return await inflateClusterPrefix(input, decodedLength);
    const size = grainDataSize(input);
    const out = await inflateAsync(input.subarray(12, 12 + size), {
      maxOutputLength: decodedLength,
      chunkSize: Math.max(zc.Z_MIN_CHUNK, decodedLength + 64),
    });
    if (out.length === 0) throw new CodecDataError('grain inflated to 0 bytes');
    return out;
  } catch (err) {
    throw isZlibDataError(err) ? new CodecDataError((err as Error).message) : err;
  }
}

/** node:zlib's verdicts on data: zlib's own errors (Z_DATA_ERROR, Z_BUF_ERROR...) and output past maxOutputLength. */
function isZlibDataError(err: unknown): boolean {
  if (err instanceof CodecDataError) return true;
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (code.startsWith('Z_') || code === 'ERR_BUFFER_TOO_LARGE');
}

async function inflateClusterPrefix(input: Uint8Array, decodedLength: number): Promise<Uint8Array> {
  try {
    const out = await inflateRawAsync(input, {
      finishFlush: zc.Z_SYNC_FLUSH,
      maxOutputLength: decodedLength,
      chunkSize: Math.max(64, decodedLength),
    });
    if (out.length !== decodedLength) throw new CodecDataError(`inflated to ${out.length} bytes, expected ${decodedLength}`);
    return out;
  } catch (err) {
    // The stream goes on past the cluster: qemu keeps the first decodedLength bytes.
    const prefix = await inflateStreamPrefix(input, decodedLength);
    if (prefix) return prefix;
    throw err;
  }
}

/** Inflates until `length` bytes come out; undefined if the stream fails or ends first. */
function inflateStreamPrefix(input: Uint8Array, length: number): Promise<Uint8Array | undefined> {
  return new Promise((resolve) => {
    const stream = createInflateRaw({ finishFlush: zc.Z_SYNC_FLUSH, chunkSize: Math.max(64, length) });
    const chunks: Buffer[] = [];
    let got = 0;
    let settled = false;
    const settle = (value: Uint8Array | undefined): void => {
      if (settled) return;
      settled = true;
      stream.destroy();
      resolve(value);
    };
    stream.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      got += chunk.length;
      if (got >= length) settle(Buffer.concat(chunks, got).subarray(0, length));
    });
    stream.on('error', () => settle(undefined));
    stream.on('end', () => settle(undefined));
    stream.end(input);
  });
}


// ---------------------------------------------------------------------------
// The decoder pool: this module is its own worker script.

const WORKER_ROLE = 'diskconv-decoder';

/**
 * Decoder workers: one per core. With input and output in shared memory a
 * worker costs a message per batch of clusters, not copies; the main thread
 * mostly waits on I/O. On one core, decoding stays inline.
 */
const DECODER_WORKERS = availableParallelism() >= 2 ? availableParallelism() : 0;

let pool: DecodePool | null | undefined;

/** The shared pool, or null where it would not pay or this module cannot run as a worker (e.g. under a TypeScript loader). */
function decoderPool(): DecodePool | null {
  if (pool !== undefined) return pool;
  const script = new URL(import.meta.url);
  pool =
    isMainThread && DECODER_WORKERS >= 1 && typeof SharedArrayBuffer === 'function' && script.protocol === 'file:' && fileURLToPath(script).endsWith('.js')
      ? new DecodePool(script, { role: WORKER_ROLE }, DECODER_WORKERS, decodeClusterSync)
      : null;
  return pool;
}

/** Whether compressed clusters decode on worker threads (the reader then gives them shared memory). */
export function decodesOffThread(): boolean {
  return nativeDecoder() !== null || decoderPool() !== null;
}

function isDecoderWorkerData(data: unknown): boolean {
  return typeof data === 'object' && data !== null && (data as { role?: unknown }).role === WORKER_ROLE;
}

// Started with the role above, this module serves decode requests.
if (!isMainThread && parentPort && isDecoderWorkerData(workerData)) serveDecodeRequests(parentPort, decodeClusterSync);
