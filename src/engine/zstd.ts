import { createRequire } from 'node:module';
import * as zlib from 'node:zlib';
import { CodecDataError } from './codec-error.js';

/**
 * qcow2 zstd clusters, decoded by libzstd (what qemu decodes with, so it
 * accepts and refuses what qemu does: content checksums, window limits,
 * reserved bits, dictionaries). Node >= 22.15 carries libzstd in node:zlib;
 * on older Node the zstd-napi binding (an optional dependency that builds its
 * bundled libzstd with node-gyp) does the same.
 *
 * qemu (block/qcow2-threads.c) calls ZSTD_decompressStream into the cluster
 * until the cluster is full, frame after frame, and ignores whatever follows
 * (sector padding); it fails when a call makes no progress (the input ends
 * first) or when the last frame is not completely decoded and flushed once
 * the cluster is full (the frame holds more than the cluster). This does the
 * same calls with the same checks.
 */

/** One ZSTD_decompressStream step: bytes written and consumed; `remaining` is its return value when known. */
interface ZstdStep {
  produced: number;
  consumed: number;
  /** ZSTD_decompressStream's hint: 0 once a frame is completely decoded and flushed. */
  remaining?: number;
}

interface ZstdStreamer {
  readonly name: string;
  reset(): void;
  /** Throws CodecDataError for libzstd errors. */
  step(input: Uint8Array, out: Uint8Array): ZstdStep;
}

/** node:zlib's native zstd handle (internal; the same shape as its zlib handles). */
interface NodeZstdHandle {
  writeSync(flush: number, input: Uint8Array, inOffset: number, inLength: number, out: Uint8Array, outOffset: number, outLength: number): void;
  reset(): void;
  onerror: (this: NodeZstdHandle, message: string, errno: number, code?: string) => void;
}

/** libzstd through node:zlib's own zstd decompressor (Node >= 22.15). */
class NodeZstdStreamer implements ZstdStreamer {
  readonly name = 'node:zlib';
  private handle: NodeZstdHandle | undefined;
  private state: Uint32Array | undefined;
  private failure: string | undefined;

  static available(): boolean {
    return typeof (zlib as { createZstdDecompress?: unknown }).createZstdDecompress === 'function';
  }

  reset(): void {
    this.open()[0].reset();
  }

  step(input: Uint8Array, out: Uint8Array): ZstdStep {
    const [handle, state] = this.open();
    this.failure = undefined;
    handle.writeSync(0, input, 0, input.length, out, 0, out.length);
    if (this.failure !== undefined) {
      const message = this.failure;
      this.handle = this.state = undefined; // node:zlib has closed it
      throw new CodecDataError(message);
    }
    return { produced: out.length - (state[0] as number), consumed: input.length - (state[1] as number) };
  }

  private open(): [NodeZstdHandle, Uint32Array] {
    if (this.handle && this.state) return [this.handle, this.state];
    const create = (zlib as unknown as { createZstdDecompress: () => zlib.Inflate }).createZstdDecompress;
    const stream = create();
    const { _handle: handle, _writeState: state } = stream as unknown as { _handle?: NodeZstdHandle | null; _writeState?: Uint32Array };
    if (!handle || typeof handle.writeSync !== 'function' || typeof handle.reset !== 'function' || typeof handle.onerror !== 'function' || !(state instanceof Uint32Array)) {
      stream.destroy();
      throw new Error('node:zlib zstd internals differ');
    }
    stream.on('error', () => {});
    const onerror = handle.onerror;
    handle.onerror = (message, errno, code) => {
      this.failure = message;
      onerror.call(handle, message, errno, code);
    };
    this.handle = handle;
    this.state = state;
    return [handle, state];
  }
}

/** The parts of zstd-napi's binding used here. */
interface ZstdNapiBinding {
  DCtx: new () => {
    decompressStream(dst: Uint8Array, src: Uint8Array): [remaining: number, produced: number, consumed: number];
    reset(directive: number): void;
  };
  ResetDirective: { sessionOnly: number };
}

/** libzstd through the zstd-napi binding (Node 20). */
class NapiZstdStreamer implements ZstdStreamer {
  readonly name = 'zstd-napi';
  private readonly dctx: InstanceType<ZstdNapiBinding['DCtx']>;

  constructor(private readonly binding: ZstdNapiBinding) {
    this.dctx = new binding.DCtx();
  }

  reset(): void {
    this.dctx.reset(this.binding.ResetDirective.sessionOnly);
  }

  step(input: Uint8Array, out: Uint8Array): ZstdStep {
    let result: [number, number, number];
    if (!(input instanceof Uint8Array) || !(out instanceof Uint8Array)) throw new TypeError('zstd step: input and out must be Uint8Arrays');
    try {
      result = this.dctx.decompressStream(out, input);
    } catch (err) {
      // libzstd's errors come as plain Errors named by ZSTD_getErrorName; a TypeError is our bug.
      if (err instanceof Error && err.constructor === Error) throw new CodecDataError(err.message);
      throw err;
    }
    return { remaining: result[0], produced: result[1], consumed: result[2] };
  }
}

let streamer: ZstdStreamer | null | undefined;
let unavailable = '';

/** The libzstd this process decodes with, or null (then `zstdUnavailableReason()` says why). */
function zstd(): ZstdStreamer | null {
  if (streamer !== undefined) return streamer;
  const reasons: string[] = [];
  if (NodeZstdStreamer.available()) {
    try {
      const s = new NodeZstdStreamer();
      s.reset();
      return (streamer = s);
    } catch (err) {
      reasons.push(`node:zlib: ${(err as Error).message}`);
    }
  } else reasons.push(`node:zlib has no zstd before Node 22.15 (this is ${process.version})`);
  try {
    const binding = createRequire(import.meta.url)('zstd-napi/binding') as ZstdNapiBinding;
    return (streamer = new NapiZstdStreamer(binding));
  } catch (err) {
    reasons.push(`zstd-napi: ${(err as Error).message.split('\n')[0]}`);
  }
  unavailable = reasons.join('; ');
  return (streamer = null);
}

/** Which libzstd binding decodes zstd here ('node:zlib', 'zstd-napi'), or undefined when none loads. */
export function zstdBackend(): string | undefined {
  return zstd()?.name;
}

export function zstdUnavailableReason(): string {
  zstd();
  return unavailable;
}

/** Where a probe for output left over after the cluster is full goes. */
const overflowProbe = new Uint8Array(64);
const NO_INPUT = new Uint8Array(0);

/**
 * Decodes one qcow2 zstd cluster into `out` (exactly decodedLength bytes) as
 * qemu does. Throws CodecDataError for damaged data, a plain Error when no
 * libzstd could be loaded.
 */
export function decodeZstdCluster(input: Uint8Array, decodedLength: number, out: Uint8Array = Buffer.allocUnsafeSlow(decodedLength)): Uint8Array {
  const z = zstd();
  if (!z) throw new ZstdUnavailableError(`zstd-compressed clusters need libzstd: ${unavailable}`);
  if (!(input instanceof Uint8Array) || !(out instanceof Uint8Array) || out.length < decodedLength) {
    throw new TypeError('decodeZstdCluster: input and out must be Uint8Arrays, out at least decodedLength bytes');
  }
  const target = out.subarray(0, decodedLength);
  z.reset();
  let inPos = 0;
  let outPos = 0;
  let last: ZstdStep = { produced: 0, consumed: 0 };
  while (outPos < decodedLength) {
    last = z.step(input.subarray(inPos), target.subarray(outPos));
    if (last.produced === 0 && last.consumed === 0) {
      throw new CodecDataError(`zstd data ends after ${outPos} of ${decodedLength} bytes`);
    }
    inPos += last.consumed;
    outPos += last.produced;
  }
  // The cluster is full: the last frame must be completely decoded and flushed.
  const complete = last.remaining !== undefined ? last.remaining === 0 : z.step(NO_INPUT, overflowProbe).produced === 0 && endsAFrame(input, inPos);
  if (!complete) throw new CodecDataError(`zstd frame decodes to more than the ${decodedLength}-byte cluster`);
  return target;
}

/** Thrown when this Node has no libzstd: the image is fine, the host lacks a library. */
export class ZstdUnavailableError extends Error {}

/**
 * Whether a zstd frame (or skippable frame) of `input` ends exactly at `pos`,
 * walking frame and block headers from the start (RFC 8878 3.1). Used where
 * node:zlib does not say whether libzstd finished its frame: with output room
 * gone and nothing left to flush, libzstd stops only at a frame's end or where
 * its input ends.
 */
function endsAFrame(input: Uint8Array, pos: number): boolean {
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  let p = 0;
  while (p < pos) {
    if (p + 8 > input.length) return false;
    const magic = view.getUint32(p, true);
    if ((magic & 0xfffffff0) === 0x184d2a50) {
      p += 8 + view.getUint32(p + 4, true);
      continue;
    }
    if (magic !== 0xfd2fb528) return false;
    const descriptor = input[p + 4] as number;
    const fcsFlag = descriptor >> 6;
    const singleSegment = (descriptor >> 5) & 1;
    const checksum = (descriptor >> 2) & 1;
    const dictBytes = [0, 1, 2, 4][descriptor & 3] as number;
    const fcsBytes = [singleSegment, 2, 4, 8][fcsFlag] as number;
    p += 5 + (singleSegment ? 0 : 1) + dictBytes + fcsBytes;
    for (;;) {
      if (p + 3 > input.length) return false;
      const header = (input[p] as number) | ((input[p + 1] as number) << 8) | ((input[p + 2] as number) << 16);
      const type = (header >> 1) & 3;
      p += 3 + (type === 1 ? 1 : header >>> 3);
      if (header & 1) break;
    }
    p += checksum ? 4 : 0;
  }
  return p === pos;
}
