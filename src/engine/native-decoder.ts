import { availableParallelism } from 'node:os';
import { loadAddon } from './native.js';
import type { Codec } from './types.js';

/**
 * diskconv's optional native decoder (native/codec, built by node-gyp at `npm
 * ci` and `npm run build` where libdeflate and libzstd are installed): the
 * compressed clusters of a batch decode on the libuv threadpool, a few calls
 * per batch, with libdeflate (deflate) and the system's libzstd (zstd). It
 * only vouches for clean decodes; every cluster it declines (damaged data, a
 * stream that runs on past its cluster, a zstd window over 2 MiB) comes back
 * as -1 and the caller decodes it with its own decoder, which gives qemu's
 * answer and the error message. Where it did not build, decompress.ts decodes
 * on worker threads as before.
 */
interface CodecHelper {
  /** Resolves with the bytes decoded into each output, or -1 where the helper declines. */
  decodeMany(codec: number, inputs: Uint8Array[], outputs: Uint8Array[]): Promise<Int32Array>;
  /**
   * Decodes each input and writes its bytes [skip, skip + length) at `position` of `fd`
   * (meta: [position, skip, length, decodedLength] per input; zero blocks of `block` skipped)
   * from the decoding thread. Resolves with the bytes decoded (and written), or -1 where
   * the helper declines (nothing written); rejects with an fs-style error when a write fails.
   * Absent from a helper built before it existed.
   */
  decodeWrite?(codec: number, inputs: Uint8Array[], meta: Float64Array, fd: number, block: number): Promise<Int32Array>;
}

/** Where decodeToFile writes: the output's descriptor and its sparse block (0: every byte). */
export interface DirectTarget {
  fd: number;
  block: number;
  /** What a failed write becomes (the sink's own words for it); the fs error as it is without this. */
  writeError?: (err: unknown, offset: number) => unknown;
}

const CODEC_IDS: Record<Codec, number> = { deflate: 0, 'vmdk-grain': 1, zstd: 2 };
/** decodeWrite's "codec" for bytes that are written as they are (native/codec CODEC_VERBATIM). */
const VERBATIM = 3;

let helper: CodecHelper | null | undefined;

function codecHelper(): CodecHelper | null {
  if (helper === undefined) helper = loadAddon<CodecHelper>('codec', 'decodeMany');
  return helper;
}

interface Job {
  input: Uint8Array;
  output: Uint8Array;
  resolve: (produced: number) => void;
  reject: (err: Error) => void;
}

interface DirectJob {
  input: Uint8Array;
  position: number;
  skip: number;
  length: number;
  decodedLength: number;
  resolve: (produced: number) => void;
  reject: (err: Error) => void;
}

/** A direct call's share of decoded bytes: small enough that writes start while the rest of a group decodes. */
const DIRECT_PART_BYTES = 2 ** 20;

/** Calls per group of jobs gathered in one turn: one per core, so every core decodes. */
const SPLIT = Math.max(1, availableParallelism());
/** Below this many decoded bytes a group is not split (a call costs a threadpool round trip). */
const SPLIT_MIN_BYTES = 512 * 1024;

/**
 * Jobs queued in one turn of the event loop (the reader issues a read's
 * clusters at once) go out together, per codec, split into one call per core.
 */
class NativeDecoder {
  private readonly queues = new Map<number, Job[]>();
  private readonly directQueues = new Map<string, { id: number; target: DirectTarget; jobs: DirectJob[] }>();
  private scheduled = false;

  constructor(private readonly native: CodecHelper) {}

  /** Whether decodeToFile is there (a helper built before it existed has only decodeMany). */
  get writesDirect(): boolean {
    return typeof this.native.decodeWrite === 'function';
  }

  /**
   * Decodes `input` (a cluster of `decodedLength` bytes) and writes its bytes
   * [skip, skip + length) at `position` of the target, from the thread that
   * decoded it. Resolves with the bytes decoded, or -1 where the helper declines
   * (nothing written: the caller decodes it itself); rejects when the write fails.
   */
  decodeToFile(codec: Codec, input: Uint8Array, decodedLength: number, target: DirectTarget, position: number, skip: number, length: number): Promise<number> {
    return this.queueDirect(CODEC_IDS[codec], input, decodedLength, target, position, skip, length);
  }

  /**
   * Writes `input`'s bytes [skip, skip + length) at `position` of the target from
   * a threadpool thread, zero blocks skipped as decodeToFile does (no decoding:
   * the stored runs of a compressed image). Resolves with `length`; rejects when the write fails.
   */
  writeToFile(input: Uint8Array, target: DirectTarget, position: number, skip: number, length: number): Promise<number> {
    // In pieces of about DIRECT_PART_BYTES, cut at multiples of the sparse block (the zero-block
    // test sees the same blocks as one write would), so a long run is written by every core.
    const piece = target.block > 0 ? Math.max(1, Math.round(DIRECT_PART_BYTES / target.block)) * target.block : DIRECT_PART_BYTES;
    const cut = position - (position % piece) + piece;
    if (length <= piece || position + length <= cut) return this.queueDirect(VERBATIM, input, input.length, target, position, skip, length);
    const parts: Array<Promise<number>> = [];
    for (let at = 0, end = cut - position; at < length; ) {
      parts.push(this.queueDirect(VERBATIM, input, input.length, target, position + at, skip + at, end - at));
      at = end;
      end = Math.min(length, end + piece);
    }
    return Promise.all(parts).then(() => length);
  }

  private queueDirect(id: number, input: Uint8Array, decodedLength: number, target: DirectTarget, position: number, skip: number, length: number): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const key = `${id}:${target.fd}:${target.block}`;
      let queue = this.directQueues.get(key);
      if (!queue) this.directQueues.set(key, (queue = { id, target, jobs: [] }));
      queue.jobs.push({ input, position, skip, length, decodedLength, resolve, reject });
      this.schedule();
    });
  }

  private schedule(): void {
    if (!this.scheduled) {
      this.scheduled = true;
      queueMicrotask(() => this.dispatch());
    }
  }

  /** Decodes into `output`; resolves with the bytes decoded, or -1 where the helper declines. */
  decode(codec: Codec, input: Uint8Array, output: Uint8Array): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const id = CODEC_IDS[codec];
      let queue = this.queues.get(id);
      if (!queue) this.queues.set(id, (queue = []));
      queue.push({ input, output, resolve, reject });
      this.schedule();
    });
  }

  private dispatch(): void {
    this.scheduled = false;
    for (const [key, { id, target, jobs }] of this.directQueues) {
      this.directQueues.delete(key);
      const bytes = jobs.reduce((n, j) => n + j.length, 0);
      const parts = bytes < SPLIT_MIN_BYTES ? 1 : Math.min(jobs.length, Math.max(SPLIT, Math.ceil(bytes / DIRECT_PART_BYTES)));
      const per = Math.ceil(jobs.length / parts);
      for (let at = 0; at < jobs.length; at += per) this.sendDirect(id, target, jobs.slice(at, at + per));
    }
    for (const [id, jobs] of this.queues) {
      this.queues.delete(id);
      const bytes = jobs.reduce((n, j) => n + j.output.length, 0);
      const parts = bytes < SPLIT_MIN_BYTES ? 1 : Math.min(SPLIT, jobs.length);
      const per = Math.ceil(jobs.length / parts);
      for (let at = 0; at < jobs.length; at += per) this.send(id, jobs.slice(at, at + per));
    }
  }

  private send(id: number, jobs: Job[]): void {
    settle(jobs, () =>
      this.native.decodeMany(
        id,
        jobs.map((j) => j.input),
        jobs.map((j) => j.output),
      ),
    );
  }

  private sendDirect(id: number, target: DirectTarget, jobs: DirectJob[]): void {
    const meta = new Float64Array(jobs.length * 4);
    jobs.forEach((j, i) => {
      meta[4 * i] = j.position;
      meta[4 * i + 1] = j.skip;
      meta[4 * i + 2] = j.length;
      meta[4 * i + 3] = j.decodedLength;
    });
    settle(jobs, () =>
      (this.native.decodeWrite as NonNullable<CodecHelper['decodeWrite']>)(
        id,
        jobs.map((j) => j.input),
        meta,
        target.fd,
        target.block,
      ),
    );
  }
}

/** Starts one native call for a batch and settles each job with its own result (or everyone with the call's error). */
function settle(jobs: ReadonlyArray<{ resolve(result: number): void; reject(err: Error): void }>, start: () => Promise<Int32Array>): void {
  let pending: Promise<Int32Array>;
  try {
    pending = start();
  } catch (err) {
    for (const job of jobs) job.reject(err as Error);
    return;
  }
  pending.then(
    (results) => jobs.forEach((job, i) => job.resolve(results[i] ?? -1)),
    (err: Error) => jobs.forEach((job) => job.reject(err)),
  );
}

let decoder: NativeDecoder | null | undefined;
let enabled = true;

/** The native decoder, or null where native/codec did not build or is switched off. */
export function nativeDecoder(): NativeDecoder | null {
  if (!enabled) return null;
  if (decoder === undefined) {
    const native = codecHelper();
    decoder = native ? new NativeDecoder(native) : null;
  }
  return decoder;
}

/** Turns the native decoder off (or on again) in this process: for tests of the other decoders. */
export function setNativeDecoding(on: boolean): void {
  enabled = on;
}
