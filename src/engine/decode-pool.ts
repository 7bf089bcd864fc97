import { Worker, type MessagePort } from 'node:worker_threads';
import { CodecDataError } from './codec-error.js';
import type { Codec } from './types.js';

// A small pool of worker threads that decode compressed clusters off the main
// thread, so clusters decode on every core while the main thread keeps reading
// and writing. A round trip costs about as much as decoding a few clusters, so
// many clusters travel in one message, inputs packed into one transferred
// buffer and outputs carved from one transferred buffer.

/** Decodes one cluster synchronously; `alloc` hands out output space that travels back without a copy. */
export type DecodeSync = (codec: Codec, input: Uint8Array, decodedLength: number, alloc: (bytes: number) => Uint8Array) => Uint8Array;

interface DecodeRequest {
  id: number;
  /** The inputs of jobs not in shared memory, back to back. */
  input: Uint8Array;
  /** Shared memory the other jobs read from and decode into, in place. */
  buffers: SharedArrayBuffer[];
  /**
   * Each job's codec, [start, end) in `input` and decoded length; or, for a job in
   * shared memory, `sharedIn` [buffer, offset, length] and `sharedOut` [buffer, offset].
   */
  jobs: Array<{ codec: Codec; start: number; end: number; decodedLength: number; sharedIn?: [number, number, number]; sharedOut?: [number, number] }>;
}
/** `data`: the codec refused the bytes (CodecDataError); otherwise the decoder itself failed (a bug). */
type DecodeResult = { output: Uint8Array } | { length: number } | { error: string; data: boolean; stack?: string };
interface DecodeReply {
  id: number;
  results: DecodeResult[];
}

interface PendingJob {
  codec: Codec;
  input: Uint8Array;
  decodedLength: number;
  /** Where the output goes when input and target are both in shared memory. */
  target?: Uint8Array;
  resolve: (out: Uint8Array) => void;
  reject: (err: Error) => void;
}

/** Messages a worker holds at once: one decoding, one waiting, so it never idles on a round trip. */
const WORKER_WINDOW = 2;
/** Limits per message: jobs, input bytes and decoded bytes. */
const MESSAGE_JOBS = 64;
const MESSAGE_INPUT_BYTES = 2 * 2 ** 20;
const MESSAGE_DECODED_BYTES = 2 * 2 ** 20;

class PoolWorker {
  readonly pending = new Map<number, PendingJob[]>();
  /** Replies received: a worker that dies before its first one could not start at all. */
  replies = 0;
  private failed = false;

  constructor(
    readonly worker: Worker,
    private readonly onReply: (w: PoolWorker) => void,
    private readonly onExit: (w: PoolWorker) => void,
  ) {
    worker.unref();
    worker.on('message', (reply: DecodeReply) => {
      const jobs = this.pending.get(reply.id);
      if (!jobs) return;
      this.pending.delete(reply.id);
      this.replies++;
      if (this.pending.size === 0) worker.unref();
      jobs.forEach((job, i) => {
        const result = reply.results[i];
        if (!result) job.reject(new Error('decoder worker returned no result'));
        else if ('error' in result) job.reject(result.data ? new CodecDataError(result.error) : workerFailure(result));
        else if ('length' in result) job.resolve((job.target as Uint8Array).subarray(0, result.length));
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
    worker.on('exit', (code) => fail(new Error(`decoder worker exited with code ${code}`)));
  }

  post(id: number, jobs: PendingJob[]): void {
    // Keep the process alive while work is in flight; idle workers do not hold it open.
    if (this.pending.size === 0) this.worker.ref();
    this.pending.set(id, jobs);
    // Jobs in shared memory travel as references; the others' inputs in one copy
    // (they are views into read buffers the reader recycles).
    const copied = jobs.filter((j) => !j.target);
    const input = new Uint8Array(copied.reduce((n, j) => n + j.input.length, 0));
    const buffers: SharedArrayBuffer[] = [];
    const bufferIndex = (b: ArrayBufferLike): number => {
      const i = buffers.indexOf(b as SharedArrayBuffer);
      return i >= 0 ? i : buffers.push(b as SharedArrayBuffer) - 1;
    };
    const layout: DecodeRequest['jobs'] = [];
    let at = 0;
    for (const job of jobs) {
      if (job.target) {
        layout.push({
          codec: job.codec,
          start: 0,
          end: 0,
          decodedLength: job.decodedLength,
          sharedIn: [bufferIndex(job.input.buffer), job.input.byteOffset, job.input.length],
          sharedOut: [bufferIndex(job.target.buffer), job.target.byteOffset],
        });
        continue;
      }
      input.set(job.input, at);
      layout.push({ codec: job.codec, start: at, end: at + job.input.length, decodedLength: job.decodedLength });
      at += job.input.length;
    }
    const request: DecodeRequest = { id, input, buffers, jobs: layout };
    this.worker.postMessage(request, [input.buffer]);
  }
}

/**
 * Jobs wait in one queue and go, many per message, to whichever worker has
 * room, so a worker that drew cheap clusters is not left idle while another
 * finishes expensive ones. Where no worker can start, jobs decode inline.
 */
export class DecodePool {
  private readonly workers: PoolWorker[] = [];
  private queue: PendingJob[] = [];
  private queueHead = 0;
  private nextId = 1;
  private scheduled = false;
  /** Set when a worker could not start; jobs then decode on this thread. */
  private broken = false;

  constructor(
    private readonly script: URL,
    private readonly workerData: unknown,
    private readonly size: number,
    private readonly decodeInline: DecodeSync,
  ) {}

  /**
   * Decodes on a worker. With `target` (at least decodedLength bytes) and both
   * it and `input` in shared memory, the worker reads and writes them in place
   * and the result is a view of `target`.
   */
  decode(codec: Codec, input: Uint8Array, decodedLength: number, target?: Uint8Array): Promise<Uint8Array> {
    const inPlace = target && isSharedView(input) && isSharedView(target) && target.length >= decodedLength ? target : undefined;
    return new Promise((resolve, reject) => {
      this.queue.push({ codec, input, decodedLength, ...(inPlace ? { target: inPlace } : {}), resolve, reject });
      // Callers issue a group's decodes at once: gather them before sending.
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
    let inputBytes = 0;
    let decodedBytes = 0;
    while (this.queueHead < this.queue.length && jobs.length < MESSAGE_JOBS && inputBytes < MESSAGE_INPUT_BYTES && decodedBytes < MESSAGE_DECODED_BYTES) {
      const job = this.queue[this.queueHead] as PendingJob;
      this.queue[this.queueHead++] = undefined as unknown as PendingJob; // release the input
      jobs.push(job);
      inputBytes += job.input.length;
      decodedBytes += job.decodedLength;
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
            const target = job.target;
            job.resolve(this.decodeInline(job.codec, job.input, job.decodedLength, (n) => (target && n <= target.length ? target.subarray(0, n) : Buffer.allocUnsafeSlow(n))));
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

  private workerWithRoom(): PoolWorker | undefined {
    let best: PoolWorker | undefined;
    for (const w of this.workers) if (w.pending.size < WORKER_WINDOW && (!best || w.pending.size < best.pending.size)) best = w;
    if (best && best.pending.size === 0) return best;
    if (this.workers.length < this.size) {
      const worker = new PoolWorker(
        new Worker(this.script, { workerData: this.workerData }),
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

function isSharedView(bytes: Uint8Array): boolean {
  return typeof SharedArrayBuffer === 'function' && bytes.buffer instanceof SharedArrayBuffer;
}

/** A decoder's own failure in a worker, with the worker's stack. */
function workerFailure(result: { error: string; stack?: string }): Error {
  const err = new Error(`decoder worker failed: ${result.error}`);
  if (result.stack) err.stack = `${err.stack ?? ''}\n  in the worker: ${result.stack}`;
  return err;
}

/** The worker side: answers decode requests on `port` with `decodeSync`. */
export function serveDecodeRequests(port: MessagePort, decodeSync: DecodeSync): void {
  port.on('message', (request: DecodeRequest) => {
    // Outputs are carved from one buffer per message, made on first use.
    let slab: Uint8Array | undefined;
    let slabUsed = 0;
    const alloc = (bytes: number): Uint8Array => {
      slab ??= Buffer.allocUnsafeSlow(request.jobs.reduce((n, j) => n + j.decodedLength, 0));
      if (slabUsed + bytes > slab.length) return Buffer.allocUnsafeSlow(bytes);
      slabUsed += bytes;
      return slab.subarray(slabUsed - bytes, slabUsed);
    };
    const results: DecodeResult[] = [];
    const transfer: ArrayBuffer[] = [];
    for (const job of request.jobs) {
      try {
        if (job.sharedIn && job.sharedOut) {
          const [ib, io, il] = job.sharedIn;
          const [ob, oo] = job.sharedOut;
          const inBuf = request.buffers[ib] as SharedArrayBuffer;
          const outBuf = request.buffers[ob] as SharedArrayBuffer;
          const output = decodeSync(job.codec, new Uint8Array(inBuf, io, il), job.decodedLength, (n) => new Uint8Array(outBuf, oo, n));
          if (output.buffer !== outBuf || output.byteOffset !== oo) throw new Error('decoder did not decode in place');
          results.push({ length: output.length });
          continue;
        }
        const output = decodeSync(job.codec, request.input.subarray(job.start, job.end), job.decodedLength, alloc);
        results.push({ output });
        // Outputs may share a buffer; transfer each buffer once.
        const buffer = output.buffer as ArrayBuffer;
        if (!transfer.includes(buffer)) transfer.push(buffer);
      } catch (err) {
        results.push(err instanceof Error ? { error: err.message, data: err instanceof CodecDataError, stack: err.stack } : { error: String(err), data: false });
      }
    }
    const reply: DecodeReply = { id: request.id, results };
    port.postMessage(reply, transfer);
  });
}
