import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { createInflateRaw, inflate, inflateRaw, constants as zc } from 'node:zlib';
import { Decompress as ZstdStream, decompress as zstdDecompress } from 'fzstd';
import { ImageCorruptError } from './errors.js';
import type { Codec } from './types.js';

const inflateAsync = promisify(inflate);
const inflateRawAsync = promisify(inflateRaw);

/**
 * Decodes one compressed cluster or grain. zlib work runs on libuv's thread pool
 * and zstd work on a small pool of worker threads, so many calls in flight
 * decompress in parallel. Output is bounded by `decodedLength`: a stream that
 * would inflate past it is refused or cut there (no inflate bombs).
 */
export async function decode(codec: Codec, input: Uint8Array, decodedLength: number, where: string): Promise<Uint8Array> {
  try {
    switch (codec) {
      case 'deflate':
        return await inflateClusterPrefix(input, decodedLength);
      case 'zstd': {
        const pool = zstdPool();
        return pool ? await pool.decode(input, decodedLength) : decodeZstdCluster(input, decodedLength);
      }
      case 'vmdk-grain': {
        if (input.length < 12) throw new Error('grain header truncated');
        const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
        const size = view.getUint32(8, true);
        if (size === 0 || 12 + size > input.length) throw new Error(`grain data size ${size} exceeds the bytes available`);
        // decodedLength is the grain size, an upper bound: qemu writes the last grain
        // of a disk that is not a whole number of grains with only the bytes inside
        // the disk, VMware writes it whole. The reader checks the output covers
        // the bytes it takes, as qemu does.
        // One output chunk holds the whole grain: a single pass on the thread pool
        // instead of one per 16 KiB default chunk (3x faster on 64 KiB grains).
        const out = await inflateAsync(input.subarray(12, 12 + size), {
          maxOutputLength: decodedLength,
          chunkSize: Math.max(zc.Z_MIN_CHUNK, decodedLength + 64),
        });
        if (out.length === 0) throw new Error('grain inflated to 0 bytes');
        return out;
      }
    }
  } catch (err) {
    if (err instanceof ImageCorruptError) throw err;
    throw new ImageCorruptError(`cannot decompress ${where}: ${(err as Error).message}`, { cause: err });
  }
}

// ---------------------------------------------------------------------------
// deflate (qcow2 zlib type)

/**
 * qemu inflates a qcow2 cluster until the output buffer is full and ignores
 * whatever follows (the stored size is rounded up to sectors, so trailing bytes
 * are normal). A stream that ends before the cluster is full is corrupt.
 */
async function inflateClusterPrefix(input: Uint8Array, decodedLength: number): Promise<Uint8Array> {
  try {
    // chunkSize = the whole cluster: one pass on the thread pool instead of one per 16 KiB.
    const out = await inflateRawAsync(input, {
      finishFlush: zc.Z_SYNC_FLUSH,
      maxOutputLength: decodedLength,
      chunkSize: Math.max(64, decodedLength),
    });
    if (out.length !== decodedLength) throw new Error(`inflated to ${out.length} bytes, expected ${decodedLength}`);
    return out;
  } catch (err) {
    // The stream goes on past the cluster (too long, or damaged after the point
    // where the cluster is already full): qemu keeps the first decodedLength bytes.
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
// zstd (qcow2 zstd type)

const ZSTD_MAGIC = 0xfd2fb528;
/** libzstd refuses larger windows by default (ZSTD_WINDOWLOG_LIMIT_DEFAULT) and qemu keeps the default. */
const ZSTD_MAX_WINDOW = 2 ** 27;
const ZSTD_MAX_BLOCK = 128 * 1024;

interface ZstdFrame {
  /** Input offset just past the frame (and its checksum). */
  end: number;
  /** Frame_Content_Size when the header carries it. */
  contentSize?: number;
}

/**
 * Decodes one qcow2 zstd cluster the way qemu does: zstd frames one after the
 * other until the output (the cluster) is full; bytes after that are padding.
 * A frame that would produce more than the space left, or input that ends
 * before the cluster is full, is corrupt. Throws plain Errors (the caller adds
 * where); runs in a worker thread or, where no worker can be started, inline.
 */
export function decodeZstdCluster(input: Uint8Array, decodedLength: number): Uint8Array {
  let out: Uint8Array | undefined;
  let inPos = 0;
  let outPos = 0;
  while (outPos < decodedLength) {
    if (input.length - inPos < 8) throw new Error(`zstd data ends after ${outPos} of ${decodedLength} bytes`);
    const magic = readU32LE(input, inPos);
    if (magic >>> 4 === 0x184d2a5) {
      // Skippable frame: 4-byte magic, 4-byte size, payload.
      const size = readU32LE(input, inPos + 4);
      if (size > input.length - inPos - 8) throw new Error(`skippable zstd frame at input offset ${inPos} is truncated`);
      inPos += 8 + size;
      continue;
    }
    if (magic !== ZSTD_MAGIC) throw new Error(`no zstd frame at input offset ${inPos} (magic 0x${magic.toString(16)})`);
    const frame = scanZstdFrame(input, inPos);
    const room = decodedLength - outPos;
    const frameBytes = input.subarray(inPos, frame.end);
    inPos = frame.end;
    if (frame.contentSize === undefined) {
      out ??= new Uint8Array(decodedLength);
      outPos = streamZstdFrame(frameBytes, out, outPos);
      continue;
    }
    if (frame.contentSize > room) {
      throw new Error(`zstd frame at input offset ${inPos} holds ${frame.contentSize} bytes, more than the ${room} left in the cluster`);
    }
    if (frame.contentSize === 0) continue;
    // No output buffer is passed: fzstd compares it with "== 1", which turns a
    // typed array into a string of all its bytes, on every call. Without one it
    // decodes a frame with a content size straight into a buffer of that size.
    const decoded = zstdDecompress(frameBytes);
    if (decoded.length !== frame.contentSize) throw new Error(`zstd frame decoded to ${decoded.length} bytes, its header says ${frame.contentSize}`);
    if (outPos === 0 && decoded.length === decodedLength) return decoded; // the usual case: one frame, the whole cluster
    out ??= new Uint8Array(decodedLength);
    out.set(decoded, outPos);
    outPos += decoded.length;
  }
  return out ?? new Uint8Array(decodedLength);
}

/** Frames without a content size: decode block by block and refuse output past the cluster. */
function streamZstdFrame(frameBytes: Uint8Array, out: Uint8Array, outPos: number): number {
  let pos = outPos;
  const stream = new ZstdStream((chunk) => {
    if (chunk.length > out.length - pos) throw new Error('zstd frame decodes to more than the cluster size');
    out.set(chunk, pos);
    pos += chunk.length;
  });
  stream.push(frameBytes, true);
  return pos;
}

/**
 * Walks a zstd frame's header and block headers (RFC 8878) without decoding, to
 * find where it ends and to refuse what libzstd refuses (reserved bits,
 * dictionaries, windows over 128 MiB, oversized blocks) before the decoder
 * allocates anything.
 */
function scanZstdFrame(input: Uint8Array, start: number): ZstdFrame {
  let p = start + 4;
  const need = (n: number): void => {
    if (p + n > input.length) throw new Error(`zstd frame at input offset ${start} is truncated`);
  };
  need(1);
  const descriptor = input[p++] as number;
  const fcsFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const reserved = (descriptor >> 3) & 1;
  const hasChecksum = (descriptor >> 2) & 1;
  const dictIdFlag = descriptor & 3;
  if (reserved) throw new Error(`zstd frame at input offset ${start} has a reserved header bit set`);
  let windowSize = 0;
  if (!singleSegment) {
    need(1);
    const wd = input[p++] as number;
    const base = 2 ** (10 + (wd >> 3));
    windowSize = base + (base / 8) * (wd & 7);
  }
  const dictBytes = [0, 1, 2, 4][dictIdFlag] as number;
  need(dictBytes);
  const dictId = readUintLE(input, p, dictBytes);
  p += dictBytes;
  if (dictId !== 0) throw new Error(`zstd frame at input offset ${start} needs dictionary ${dictId}`);
  const fcsBytes = fcsFlag === 0 ? singleSegment : ([0, 2, 4, 8][fcsFlag] as number);
  need(fcsBytes);
  let contentSize: number | undefined;
  if (fcsBytes > 0) {
    contentSize = readUintLE(input, p, fcsBytes) + (fcsBytes === 2 ? 256 : 0);
    p += fcsBytes;
  }
  if (singleSegment) windowSize = contentSize ?? 0;
  if (windowSize > ZSTD_MAX_WINDOW) throw new Error(`zstd frame at input offset ${start} needs a ${windowSize}-byte window (limit ${ZSTD_MAX_WINDOW})`);
  const blockMax = Math.min(windowSize, ZSTD_MAX_BLOCK);
  for (;;) {
    need(3);
    const header = (input[p] as number) | ((input[p + 1] as number) << 8) | ((input[p + 2] as number) << 16);
    p += 3;
    const last = header & 1;
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    if (type === 3) throw new Error(`zstd frame at input offset ${start} has a reserved block type`);
    if (size > blockMax) throw new Error(`zstd block of ${size} bytes exceeds the frame's maximum of ${blockMax}`);
    const payload = type === 1 ? 1 : size; // RLE blocks store one byte
    need(payload);
    p += payload;
    if (last) break;
  }
  if (hasChecksum) {
    need(4);
    p += 4;
  }
  return contentSize === undefined ? { end: p } : { end: p, contentSize };
}

function readU32LE(b: Uint8Array, p: number): number {
  return ((b[p] as number) | ((b[p + 1] as number) << 8) | ((b[p + 2] as number) << 16) | ((b[p + 3] as number) << 24)) >>> 0;
}

function readUintLE(b: Uint8Array, p: number, n: number): number {
  let value = 0;
  for (let i = n - 1; i >= 0; i--) value = value * 256 + (b[p + i] as number);
  return value;
}

// ---------------------------------------------------------------------------
// zstd worker pool: fzstd is JavaScript, so it would decode on the main thread
// one cluster at a time; workers let clusters decode on every core while the
// main thread keeps reading.

const WORKER_ROLE = 'diskconv-zstd-decoder';

/** Several clusters travel in one message: a round trip costs about as much as decoding a small cluster. */
interface ZstdRequest {
  id: number;
  /** The inputs, back to back. */
  input: Uint8Array;
  /** Each job's [start, end) in `input` and its decoded length. */
  jobs: Array<{ start: number; end: number; decodedLength: number }>;
}
type ZstdResult = { output: Uint8Array } | { error: string };
interface ZstdReply {
  id: number;
  results: ZstdResult[];
}

interface PendingJob {
  input: Uint8Array;
  decodedLength: number;
  resolve: (out: Uint8Array) => void;
  reject: (err: Error) => void;
}

/** Messages a worker holds at once: one decoding, one waiting, so it never idles on a round trip. */
const WORKER_WINDOW = 2;
/** Jobs per message, and input bytes per message. */
const MESSAGE_JOBS = 16;
const MESSAGE_BYTES = 2 * 2 ** 20;

class ZstdWorker {
  readonly pending = new Map<number, PendingJob[]>();
  /** Replies received: a worker that dies before its first one could not start at all. */
  replies = 0;
  private failed = false;

  constructor(
    readonly worker: Worker,
    private readonly onReply: (w: ZstdWorker) => void,
    private readonly onExit: (w: ZstdWorker) => void,
  ) {
    worker.unref();
    worker.on('message', (reply: ZstdReply) => {
      const jobs = this.pending.get(reply.id);
      if (!jobs) return;
      this.pending.delete(reply.id);
      this.replies++;
      if (this.pending.size === 0) worker.unref();
      jobs.forEach((job, i) => {
        const result = reply.results[i];
        if (!result) job.reject(new Error('zstd worker returned no result'));
        else if ('error' in result) job.reject(new Error(result.error));
        else job.resolve(result.output);
      });
      this.onReply(this);
    });
    const fail = (err: Error): void => {
      if (this.failed) return;
      this.failed = true;
      for (const jobs of this.pending.values()) for (const job of jobs) job.reject(err);
      this.pending.clear();
      this.onExit(this);
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`zstd worker exited with code ${code}`)));
  }

  post(id: number, jobs: PendingJob[]): void {
    // Keep the process alive while work is in flight; idle workers do not hold it open.
    if (this.pending.size === 0) this.worker.ref();
    this.pending.set(id, jobs);
    // One copy of all inputs: they are views into larger read buffers that other entries still use.
    const input = new Uint8Array(jobs.reduce((n, j) => n + j.input.length, 0));
    const layout: ZstdRequest['jobs'] = [];
    let at = 0;
    for (const job of jobs) {
      input.set(job.input, at);
      layout.push({ start: at, end: at + job.input.length, decodedLength: job.decodedLength });
      at += job.input.length;
    }
    const request: ZstdRequest = { id, input, jobs: layout };
    this.worker.postMessage(request, [input.buffer]);
  }
}

/**
 * Jobs wait in one queue and go, a few per message, to whichever worker has
 * room, so a worker that drew cheap clusters is not left idle while the other
 * finishes expensive ones.
 */
class ZstdPool {
  private readonly workers: ZstdWorker[] = [];
  private queue: PendingJob[] = [];
  private queueHead = 0;
  private nextId = 1;
  private scheduled = false;
  /** Set when a worker could not start; jobs then decode on this thread. */
  private broken = false;

  constructor(
    private readonly script: URL,
    private readonly size: number,
  ) {}

  decode(input: Uint8Array, decodedLength: number): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      this.queue.push({ input, decodedLength, resolve, reject });
      // Callers issue a batch of decodes at once: gather them before sending.
      if (!this.scheduled) {
        this.scheduled = true;
        queueMicrotask(() => {
          this.scheduled = false;
          this.dispatch();
        });
      }
    });
  }

  private take(): PendingJob[] {
    const jobs: PendingJob[] = [];
    let bytes = 0;
    while (this.queueHead < this.queue.length && jobs.length < MESSAGE_JOBS && bytes < MESSAGE_BYTES) {
      const job = this.queue[this.queueHead] as PendingJob;
      this.queue[this.queueHead++] = undefined as unknown as PendingJob; // release the input
      jobs.push(job);
      bytes += job.input.length;
    }
    if (this.queueHead === this.queue.length) {
      this.queue = [];
      this.queueHead = 0;
    }
    return jobs;
  }

  private dispatch(): void {
    while (this.queueHead < this.queue.length) {
      if (this.broken) {
        for (const job of this.take()) {
          try {
            job.resolve(decodeZstdCluster(job.input, job.decodedLength));
          } catch (err) {
            job.reject(err as Error);
          }
        }
        continue;
      }
      const worker = this.workerWithRoom();
      if (!worker) return;
      worker.post(this.nextId++, this.take());
    }
  }

  private workerWithRoom(): ZstdWorker | undefined {
    let best: ZstdWorker | undefined;
    for (const w of this.workers) if (w.pending.size < WORKER_WINDOW && (!best || w.pending.size < best.pending.size)) best = w;
    if (best && best.pending.size === 0) return best;
    if (this.workers.length < this.size) {
      const worker = new ZstdWorker(
        new Worker(this.script, { workerData: { role: WORKER_ROLE } }),
        () => this.dispatch(),
        (w) => {
          const i = this.workers.indexOf(w);
          if (i >= 0) this.workers.splice(i, 1);
          if (w.replies === 0) this.broken = true;
          this.dispatch();
        },
      );
      this.workers.push(worker);
      return worker;
    }
    return best;
  }
}

let pool: ZstdPool | null | undefined;

/** The shared pool, or null where this module cannot run as a worker (e.g. under a TypeScript loader). */
function zstdPool(): ZstdPool | null {
  if (pool !== undefined) return pool;
  const script = new URL(import.meta.url);
  pool = script.protocol === 'file:' && fileURLToPath(script).endsWith('.js') ? new ZstdPool(script, Math.max(1, availableParallelism())) : null;
  return pool;
}

function isZstdWorkerData(data: unknown): boolean {
  return typeof data === 'object' && data !== null && (data as { role?: unknown }).role === WORKER_ROLE;
}

// This module is its own worker script: started with the role above, it serves decode requests.
if (!isMainThread && parentPort && isZstdWorkerData(workerData)) {
  const port = parentPort;
  port.on('message', (request: ZstdRequest) => {
    const results: ZstdResult[] = [];
    const transfer: ArrayBuffer[] = [];
    for (const job of request.jobs) {
      try {
        const output = decodeZstdCluster(request.input.subarray(job.start, job.end), job.decodedLength);
        results.push({ output });
        // An output may be a view into a buffer another output shares; transfer each buffer once.
        const buffer = output.buffer as ArrayBuffer;
        if (!transfer.includes(buffer)) transfer.push(buffer);
      } catch (err) {
        results.push({ error: err instanceof Error ? err.message : String(err) });
      }
    }
    const reply: ZstdReply = { id: request.id, results };
    port.postMessage(reply, transfer);
  });
}
