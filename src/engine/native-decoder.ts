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
}

const CODEC_IDS: Record<Codec, number> = { deflate: 0, 'vmdk-grain': 1, zstd: 2 };

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
  private scheduled = false;

  constructor(private readonly native: CodecHelper) {}

  /** Decodes into `output`; resolves with the bytes decoded, or -1 where the helper declines. */
  decode(codec: Codec, input: Uint8Array, output: Uint8Array): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const id = CODEC_IDS[codec];
      let queue = this.queues.get(id);
      if (!queue) this.queues.set(id, (queue = []));
      queue.push({ input, output, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        queueMicrotask(() => this.dispatch());
      }
    });
  }

  private dispatch(): void {
    this.scheduled = false;
    for (const [id, jobs] of this.queues) {
      this.queues.delete(id);
      const bytes = jobs.reduce((n, j) => n + j.output.length, 0);
      const parts = bytes < SPLIT_MIN_BYTES ? 1 : Math.min(SPLIT, jobs.length);
      const per = Math.ceil(jobs.length / parts);
      for (let at = 0; at < jobs.length; at += per) this.send(id, jobs.slice(at, at + per));
    }
  }

  private send(id: number, jobs: Job[]): void {
    let pending: Promise<Int32Array>;
    try {
      pending = this.native.decodeMany(
        id,
        jobs.map((j) => j.input),
        jobs.map((j) => j.output),
      );
    } catch (err) {
      for (const job of jobs) job.reject(err as Error);
      return;
    }
    pending.then(
      (results) => jobs.forEach((job, i) => job.resolve(results[i] ?? -1)),
      (err: Error) => jobs.forEach((job) => job.reject(err)),
    );
  }
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
