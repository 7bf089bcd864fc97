import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { createInflate, createInflateRaw, inflate, inflateRaw, constants as zc, type Inflate, type InflateRaw } from 'node:zlib';
import { Decompress as ZstdStream, decompress as zstdDecompress } from 'fzstd';
import { DecodePool, serveDecodeRequests } from './decode-pool.js';
import { ImageCorruptError } from './errors.js';
import { xxh64 } from './xxh64.js';
import type { Codec } from './types.js';

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
 * zlib decodes on this thread: one reused native context inflates a 64 KiB
 * cluster in about 15 µs, less than handing it to a worker thread costs
 * (copies, messages, a worker's own startup). zstd, decoded in JavaScript, goes
 * to a pool of worker threads where there are cores to spare for it.
 */
export async function decode(codec: Codec, input: Uint8Array, decodedLength: number, where: string, target?: Uint8Array): Promise<Uint8Array> {
  try {
    if (codec !== 'zstd' && !reusableInflateWorks()) return await decodeDeflateAsync(codec, input, decodedLength);
    const pool = codec === 'zstd' ? zstdPool() : null;
    if (pool) return await pool.decode(codec, input, decodedLength);
    const alloc = (bytes: number): Uint8Array => (target && target.length >= bytes ? target.subarray(0, bytes) : Buffer.allocUnsafeSlow(bytes));
    return decodeClusterSync(codec, input, decodedLength, alloc);
  } catch (err) {
    if (err instanceof ImageCorruptError) throw err;
    throw new ImageCorruptError(`cannot decompress ${where}: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Decodes one cluster on this thread (a worker's, or the main one where no
 * worker can run). Throws plain Errors; decode() adds where.
 */
function decodeClusterSync(codec: Codec, input: Uint8Array, decodedLength: number, alloc: (bytes: number) => Uint8Array): Uint8Array {
  switch (codec) {
    case 'zstd':
      return decodeZstdCluster(input, decodedLength, alloc(decodedLength));
    case 'deflate':
      return inflateClusterSync(input, decodedLength, alloc(decodedLength));
    case 'vmdk-grain':
      return inflateGrainSync(input, decodedLength, alloc(decodedLength));
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
  if (produced !== decodedLength) throw new Error(`inflated to ${produced} bytes, expected ${decodedLength}`);
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
  const tooLarge = new Error(`Cannot create a Buffer larger than ${decodedLength} bytes`);
  if (produced === out.length && zlibInflater.inflateMore(data, overflowProbe, zc.Z_SYNC_FLUSH) > 0) throw tooLarge;
  if (zlibInflater.inflateMore(data, overflowProbe, zc.Z_FINISH) > 0) throw tooLarge;
  if (produced === 0) throw new Error('grain inflated to 0 bytes');
  return out.subarray(0, produced);
}

/** Where an overlong grain's extra output lands. */
const overflowProbe = new Uint8Array(64);

function grainDataSize(input: Uint8Array): number {
  if (input.length < 12) throw new Error('grain header truncated');
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  const size = view.getUint32(8, true);
  if (size === 0 || 12 + size > input.length) throw new Error(`grain data size ${size} exceeds the bytes available`);
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
      throw new Error(message);
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
  if (codec === 'deflate') return inflateClusterPrefix(input, decodedLength);
  const size = grainDataSize(input);
  const out = await inflateAsync(input.subarray(12, 12 + size), {
    maxOutputLength: decodedLength,
    chunkSize: Math.max(zc.Z_MIN_CHUNK, decodedLength + 64),
  });
  if (out.length === 0) throw new Error('grain inflated to 0 bytes');
  return out;
}

async function inflateClusterPrefix(input: Uint8Array, decodedLength: number): Promise<Uint8Array> {
  try {
    const out = await inflateRawAsync(input, {
      finishFlush: zc.Z_SYNC_FLUSH,
      maxOutputLength: decodedLength,
      chunkSize: Math.max(64, decodedLength),
    });
    if (out.length !== decodedLength) throw new Error(`inflated to ${out.length} bytes, expected ${decodedLength}`);
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
function decodeZstdClusterWithFzstd(input: Uint8Array, decodedLength: number): Uint8Array {
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

/**
 * Decodes one qcow2 zstd cluster the way qemu does: zstd frames one after the
 * other until the output (the cluster) is full; bytes after that are padding.
 * A frame that would produce more than the space left, or input that ends
 * before the cluster is full, is corrupt. Throws plain Errors (the caller adds
 * where); runs in a worker thread or, where no worker can be started, inline.
 *
 * Our own block decoder does the work (it copies literals and matches with
 * set/copyWithin and is several times faster than fzstd on disk data); fzstd
 * remains as a second opinion should ours fail for a reason other than the data.
 */
export function decodeZstdCluster(input: Uint8Array, decodedLength: number, out?: Uint8Array): Uint8Array {
  try {
    return decodeZstdFrames(input, decodedLength, out ?? new Uint8Array(decodedLength));
  } catch (err) {
    if (err instanceof ZstdDataError) throw new Error(err.message);
    return decodeZstdClusterWithFzstd(input, decodedLength);
  }
}

/** The data is not valid zstd (as opposed to a failure of the decoder itself). */
class ZstdDataError extends Error {}

function corrupt(message: string): never {
  throw new ZstdDataError(message);
}

/** `out` is exactly decodedLength bytes; every byte of it is written (matches never reach before their frame). */
function decodeZstdFrames(input: Uint8Array, decodedLength: number, out: Uint8Array): Uint8Array {
  let inPos = 0;
  let outPos = 0;
  while (outPos < decodedLength) {
    if (input.length - inPos < 8) corrupt(`zstd data ends after ${outPos} of ${decodedLength} bytes`);
    const magic = readU32LE(input, inPos);
    if (magic >>> 4 === 0x184d2a5) {
      const size = readU32LE(input, inPos + 4);
      if (size > input.length - inPos - 8) corrupt(`skippable zstd frame at input offset ${inPos} is truncated`);
      inPos += 8 + size;
      continue;
    }
    if (magic !== ZSTD_MAGIC) corrupt(`no zstd frame at input offset ${inPos} (magic 0x${magic.toString(16)})`);
    const frame = new ZstdFrameDecoder(input, inPos, out, outPos);
    inPos = frame.decode();
    outPos = frame.outPos;
  }
  return out;
}

// Literal and match length codes (RFC 8878, 3.1.1.3.2.1.1).
const LL_BASE = Uint32Array.from([
  0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 24, 28, 32, 40, 48, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
]);
const LL_BITS = Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
const ML_BASE = Uint32Array.from([
  3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 37, 39, 41, 43, 47, 51, 59, 67, 83, 99, 131, 259, 515,
  1027, 2051, 4099, 8195, 16387, 32771, 65539,
]);
const ML_BITS = Uint8Array.from([
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
]);
// Predefined distributions (RFC 8878, 3.1.1.3.2.2).
const LL_DEFAULT_NORM = [4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1, -1, -1, -1, -1];
const ML_DEFAULT_NORM = [
  1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1,
];
const OF_DEFAULT_NORM = [1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1];
const LL_MAX_SYMBOL = 35;
const ML_MAX_SYMBOL = 52;
const OF_MAX_SYMBOL = 31;

/** An FSE decoding table: per state, the symbol, the bits to read and the base of the next state. */
interface FseTable {
  log: number;
  symbol: Uint8Array;
  nbBits: Uint8Array;
  newState: Uint16Array;
}

const highBit = (x: number): number => 31 - Math.clz32(x);

function buildFseTable(norm: ArrayLike<number>, count: number, log: number): FseTable {
  const size = 1 << log;
  const symbol = new Uint8Array(size);
  const nbBits = new Uint8Array(size);
  const newState = new Uint16Array(size);
  const next = new Uint16Array(count);
  let high = size - 1;
  for (let s = 0; s < count; s++) {
    const n = norm[s] as number;
    if (n === -1) {
      symbol[high--] = s;
      next[s] = 1;
    } else {
      next[s] = n;
    }
  }
  const step = (size >> 1) + (size >> 3) + 3;
  const mask = size - 1;
  let pos = 0;
  for (let s = 0; s < count; s++) {
    const n = norm[s] as number;
    for (let i = 0; i < n; i++) {
      symbol[pos] = s;
      do pos = (pos + step) & mask;
      while (pos > high);
    }
  }
  if (pos !== 0) corrupt('zstd FSE table does not spread evenly');
  for (let u = 0; u < size; u++) {
    const s = symbol[u] as number;
    const x = next[s] as number;
    next[s] = x + 1;
    const bits = log - highBit(x);
    nbBits[u] = bits;
    newState[u] = (x << bits) - size;
  }
  return { log, symbol, nbBits, newState };
}

function rleFseTable(symbol: number): FseTable {
  return { log: 0, symbol: Uint8Array.of(symbol), nbBits: new Uint8Array(1), newState: new Uint16Array(1) };
}

const LL_DEFAULT = buildFseTable(LL_DEFAULT_NORM, LL_DEFAULT_NORM.length, 6);
const ML_DEFAULT = buildFseTable(ML_DEFAULT_NORM, ML_DEFAULT_NORM.length, 6);
const OF_DEFAULT = buildFseTable(OF_DEFAULT_NORM, OF_DEFAULT_NORM.length, 5);

/** Reads an FSE table description (forward, little-endian bits) at `pos`; returns the table and the next byte offset. */
function readFseTable(src: Uint8Array, pos: number, end: number, maxSymbol: number, maxLog: number): [FseTable, number] {
  if (pos >= end) corrupt('zstd FSE table description is truncated');
  let bit = pos * 8;
  const peek = (n: number): number => {
    const b = bit >>> 3;
    return (((src[b] ?? 0) | ((src[b + 1] ?? 0) << 8) | ((src[b + 2] ?? 0) << 16)) >>> (bit & 7)) & ((1 << n) - 1);
  };
  const log = peek(4) + 5;
  if (log > maxLog) corrupt(`zstd FSE accuracy ${log} exceeds ${maxLog}`);
  bit += 4;
  const norm = new Int16Array(maxSymbol + 1);
  let remaining = (1 << log) + 1;
  let threshold = 1 << log;
  let nbBits = log + 1;
  let symbol = 0;
  let previousZero = false;
  while (remaining > 1 && symbol <= maxSymbol) {
    if (previousZero) {
      for (;;) {
        const repeat = peek(2);
        bit += 2;
        symbol += repeat;
        if (repeat !== 3) break;
      }
      if (symbol > maxSymbol) break;
    }
    const max = 2 * threshold - 1 - remaining;
    let count: number;
    const low = peek(nbBits - 1);
    if (low < max) {
      count = low;
      bit += nbBits - 1;
    } else {
      count = peek(nbBits);
      if (count >= threshold) count -= max;
      bit += nbBits;
    }
    count--;
    remaining -= count < 0 ? -count : count;
    norm[symbol++] = count;
    previousZero = count === 0;
    while (remaining < threshold) {
      nbBits--;
      threshold >>= 1;
    }
  }
  if (remaining !== 1 || symbol > maxSymbol + 1) corrupt('zstd FSE table description is invalid');
  const next = (bit + 7) >>> 3;
  if (next > end) corrupt('zstd FSE table description is truncated');
  return [buildFseTable(norm, symbol, log), next];
}

interface HuffmanTable {
  log: number;
  symbol: Uint8Array;
  nbBits: Uint8Array;
}

/** Reads a Huffman tree description (RFC 8878, 4.2.1); returns the table and the next byte offset. */
function readHuffmanTable(src: Uint8Array, pos: number, end: number): [HuffmanTable, number] {
  if (pos >= end) corrupt('zstd Huffman tree description is truncated');
  const header = src[pos] as number;
  const weights = new Uint8Array(256);
  let count = 0;
  let next: number;
  if (header < 128) {
    // Weights compressed with FSE: two interleaved states over a backward bitstream.
    const stop = pos + 1 + header;
    if (stop > end) corrupt('zstd Huffman weights are truncated');
    const [table, streamStart] = readFseTable(src, pos + 1, stop, 255, 6);
    const bits = new BackwardBits(src, streamStart, stop);
    let state1 = bits.read(table.log);
    let state2 = bits.read(table.log);
    for (;;) {
      if (count >= 254) corrupt('zstd Huffman weights overflow');
      weights[count++] = table.symbol[state1] as number;
      state1 = (table.newState[state1] as number) + bits.read(table.nbBits[state1] as number);
      if (bits.pos < 0) {
        weights[count++] = table.symbol[state2] as number;
        break;
      }
      weights[count++] = table.symbol[state2] as number;
      state2 = (table.newState[state2] as number) + bits.read(table.nbBits[state2] as number);
      if (bits.pos < 0) {
        weights[count++] = table.symbol[state1] as number;
        break;
      }
    }
    next = stop;
  } else {
    count = header - 127;
    next = pos + 1 + Math.ceil(count / 2);
    if (next > end) corrupt('zstd Huffman weights are truncated');
    for (let i = 0; i < count; i++) {
      const byte = src[pos + 1 + (i >> 1)] as number;
      weights[i] = i & 1 ? byte & 15 : byte >> 4;
    }
  }
  let total = 0;
  for (let i = 0; i < count; i++) {
    const w = weights[i] as number;
    if (w > 11) corrupt('zstd Huffman weight too large');
    if (w) total += 1 << (w - 1);
  }
  if (total === 0) corrupt('zstd Huffman weights are all zero');
  const log = highBit(total) + 1;
  if (log > 11) corrupt('zstd Huffman table too deep');
  const rest = (1 << log) - total;
  if (rest & (rest - 1)) corrupt('zstd Huffman weights do not complete a tree');
  weights[count++] = highBit(rest) + 1;
  const rankStart = new Uint32Array(13);
  const rankCount = new Uint32Array(13);
  for (let s = 0; s < count; s++) {
    const w = weights[s] as number;
    rankCount[w] = (rankCount[w] as number) + 1;
  }
  let start = 0;
  for (let w = 1; w <= log; w++) {
    rankStart[w] = start;
    start += (rankCount[w] as number) << (w - 1);
  }
  const size = 1 << log;
  const symbol = new Uint8Array(size);
  const nbBits = new Uint8Array(size);
  for (let s = 0; s < count; s++) {
    const w = weights[s] as number;
    if (!w) continue;
    const length = 1 << (w - 1);
    const from = rankStart[w] as number;
    symbol.fill(s, from, from + length);
    nbBits.fill(log + 1 - w, from, from + length);
    rankStart[w] = from + length;
  }
  return [{ log, symbol, nbBits }, next];
}

/**
 * A backward bitstream (RFC 8878, 4.1): read from the end towards `start`; the
 * highest set bit of the last byte marks where data begins. `pos` counts the
 * bits left; it goes negative only when the data is corrupt (or, for Huffman
 * streams, while peeking past the start, which reads zeros).
 */
class BackwardBits {
  pos: number;
  constructor(
    private readonly src: Uint8Array,
    private readonly start: number,
    end: number,
  ) {
    if (end <= start) corrupt('zstd bitstream is empty');
    const last = src[end - 1] as number;
    if (last === 0) corrupt('zstd bitstream has no end mark');
    this.pos = (end - 1 - start) * 8 + highBit(last);
  }

  /** The next n (<= 24) bits, consuming them. */
  read(n: number): number {
    if (n === 0) return 0;
    const p = (this.pos -= n);
    if (p < 0) return this.peekBelowStart(p, n);
    const b = this.start + (p >>> 3);
    const src = this.src;
    return ((((src[b] as number) | ((src[b + 1] ?? 0) << 8) | ((src[b + 2] ?? 0) << 16) | ((src[b + 3] ?? 0) << 24)) >>> (p & 7)) & ((1 << n) - 1)) >>> 0;
  }

  /** Bits below the start read as zeros. */
  peekBelowStart(p: number, n: number): number {
    if (p + n <= 0) return 0;
    const src = this.src;
    const b = this.start;
    const word = ((src[b] as number) | ((src[b + 1] ?? 0) << 8) | ((src[b + 2] ?? 0) << 16)) >>> 0;
    return ((word << -p) & ((1 << n) - 1)) >>> 0;
  }
}

const MAX_BLOCK = 128 * 1024;

/** Decodes one zstd frame into `out` from `outPos`, never past out.length. */
class ZstdFrameDecoder {
  outPos: number;
  private readonly frameStart: number;
  private huffman: HuffmanTable | undefined;
  private llTable: FseTable | undefined;
  private ofTable: FseTable | undefined;
  private mlTable: FseTable | undefined;
  private rep1 = 1;
  private rep2 = 4;
  private rep3 = 8;
  private literals = new Uint8Array(0);

  constructor(
    private readonly src: Uint8Array,
    private readonly start: number,
    private readonly out: Uint8Array,
    outPos: number,
  ) {
    this.outPos = outPos;
    this.frameStart = outPos;
  }

  /** Returns the input offset after the frame. */
  decode(): number {
    const src = this.src;
    const start = this.start;
    let p = start + 4;
    if (p + 1 > src.length) corrupt(`zstd frame at input offset ${start} is truncated`);
    const descriptor = src[p++] as number;
    const fcsFlag = descriptor >> 6;
    const singleSegment = (descriptor >> 5) & 1;
    const hasChecksum = (descriptor >> 2) & 1;
    const dictIdFlag = descriptor & 3;
    if ((descriptor >> 3) & 1) corrupt(`zstd frame at input offset ${start} has a reserved header bit set`);
    let windowSize = 0;
    if (!singleSegment) {
      if (p + 1 > src.length) corrupt(`zstd frame at input offset ${start} is truncated`);
      const wd = src[p++] as number;
      const base = 2 ** (10 + (wd >> 3));
      windowSize = base + (base / 8) * (wd & 7);
    }
    const dictBytes = [0, 1, 2, 4][dictIdFlag] as number;
    const fcsBytes = fcsFlag === 0 ? singleSegment : ([0, 2, 4, 8][fcsFlag] as number);
    if (p + dictBytes + fcsBytes > src.length) corrupt(`zstd frame at input offset ${start} is truncated`);
    const dictId = readUintLE(src, p, dictBytes);
    p += dictBytes;
    if (dictId !== 0) corrupt(`zstd frame at input offset ${start} needs dictionary ${dictId}`);
    let contentSize: number | undefined;
    if (fcsBytes > 0) {
      contentSize = readUintLE(src, p, fcsBytes) + (fcsBytes === 2 ? 256 : 0);
      p += fcsBytes;
    }
    if (singleSegment) windowSize = contentSize ?? 0;
    if (windowSize > ZSTD_MAX_WINDOW) corrupt(`zstd frame at input offset ${start} needs a ${windowSize}-byte window (limit ${ZSTD_MAX_WINDOW})`);
    const room = this.out.length - this.outPos;
    if (contentSize !== undefined && contentSize > room) {
      corrupt(`zstd frame at input offset ${start} holds ${contentSize} bytes, more than the ${room} left in the cluster`);
    }
    const blockMax = Math.min(windowSize, MAX_BLOCK);
    for (;;) {
      if (p + 3 > src.length) corrupt(`zstd frame at input offset ${start} is truncated`);
      const header = (src[p] as number) | ((src[p + 1] as number) << 8) | ((src[p + 2] as number) << 16);
      p += 3;
      const last = header & 1;
      const type = (header >> 1) & 3;
      const size = header >>> 3;
      if (size > blockMax) corrupt(`zstd block of ${size} bytes exceeds the frame's maximum of ${blockMax}`);
      const payload = type === 1 ? 1 : size;
      if (p + payload > src.length) corrupt(`zstd frame at input offset ${start} is truncated`);
      switch (type) {
        case 0: // raw
          this.reserve(size);
          this.out.set(src.subarray(p, p + size), this.outPos);
          this.outPos += size;
          break;
        case 1: // RLE
          this.reserve(size);
          this.out.fill(src[p] as number, this.outPos, this.outPos + size);
          this.outPos += size;
          break;
        case 2:
          this.compressedBlock(p, p + size);
          break;
        default:
          corrupt(`zstd frame at input offset ${start} has a reserved block type`);
      }
      p += payload;
      if (last) break;
    }
    if (hasChecksum) {
      if (p + 4 > src.length) corrupt(`zstd frame at input offset ${start} is truncated`);
      // libzstd (and so qemu) verifies the content checksum: a mismatch is corruption.
      const expected = readU32LE(src, p);
      const actual = Number(xxh64(this.out.subarray(this.frameStart, this.outPos)) & 0xffffffffn);
      if (actual !== expected) corrupt(`zstd frame at input offset ${start} fails its content checksum`);
      p += 4;
    }
    if (contentSize !== undefined && this.outPos - this.frameStart !== contentSize) {
      corrupt(`zstd frame decoded to ${this.outPos - this.frameStart} bytes, its header says ${contentSize}`);
    }
    return p;
  }

  private reserve(bytes: number): void {
    if (bytes > this.out.length - this.outPos) corrupt('zstd frame decodes to more than the cluster size');
  }

  private compressedBlock(start: number, end: number): void {
    const src = this.src;
    // Literals section header.
    if (start >= end) corrupt('zstd block is empty');
    const b0 = src[start] as number;
    const litType = b0 & 3;
    const sizeFormat = (b0 >> 2) & 3;
    let p = start;
    let regenerated: number;
    let compressed = 0;
    let streams = 1;
    if (litType < 2) {
      if (sizeFormat === 0 || sizeFormat === 2) {
        regenerated = b0 >> 3;
        p += 1;
      } else if (sizeFormat === 1) {
        regenerated = (b0 >> 4) + ((src[start + 1] ?? 0) << 4);
        p += 2;
      } else {
        regenerated = (b0 >> 4) + ((src[start + 1] ?? 0) << 4) + ((src[start + 2] ?? 0) << 12);
        p += 3;
      }
    } else {
      const b1 = src[start + 1] ?? 0;
      const b2 = src[start + 2] ?? 0;
      if (sizeFormat < 2) {
        streams = sizeFormat === 0 ? 1 : 4;
        const v = b0 | (b1 << 8) | (b2 << 16);
        regenerated = (v >>> 4) & 0x3ff;
        compressed = (v >>> 14) & 0x3ff;
        p += 3;
      } else if (sizeFormat === 2) {
        streams = 4;
        const v = (b0 | (b1 << 8) | (b2 << 16) | ((src[start + 3] ?? 0) << 24)) >>> 0;
        regenerated = (v >>> 4) & 0x3fff;
        compressed = v >>> 18;
        p += 4;
      } else {
        streams = 4;
        const b3 = src[start + 3] ?? 0;
        const b4 = src[start + 4] ?? 0;
        regenerated = (b0 >> 4) | (b1 << 4) | ((b2 & 0x3f) << 12);
        compressed = (b2 >> 6) | (b3 << 2) | (b4 << 10);
        p += 5;
      }
    }
    if (p > end) corrupt('zstd literals header is truncated');
    if (regenerated > MAX_BLOCK) corrupt('zstd literals exceed the block size');

    let lit: Uint8Array;
    let litPos: number;
    if (litType === 0) {
      if (p + regenerated > end) corrupt('zstd raw literals are truncated');
      lit = src;
      litPos = p;
      p += regenerated;
    } else if (litType === 1) {
      if (p + 1 > end) corrupt('zstd RLE literals are truncated');
      lit = this.literalBuffer(regenerated);
      lit.fill(src[p] as number, 0, regenerated);
      litPos = 0;
      p += 1;
    } else {
      const stop = p + compressed;
      if (stop > end) corrupt('zstd Huffman literals are truncated');
      let table = this.huffman;
      let streamStart = p;
      if (litType === 2) {
        [table, streamStart] = readHuffmanTable(src, p, stop);
        this.huffman = table;
      } else if (!table) {
        corrupt('zstd treeless literals without a previous Huffman table');
      }
      lit = this.literalBuffer(regenerated);
      litPos = 0;
      decodeHuffmanLiterals(src, streamStart, stop, streams, table, lit, regenerated);
      p = stop;
    }
    this.sequences(p, end, lit, litPos, litPos + regenerated);
  }

  private literalBuffer(size: number): Uint8Array {
    if (this.literals.length < size) this.literals = new Uint8Array(Math.max(size, 4096));
    return this.literals;
  }

  private sequences(start: number, end: number, lit: Uint8Array, litStart: number, litEnd: number): void {
    const src = this.src;
    const out = this.out;
    if (start >= end) corrupt('zstd sequences section is missing');
    let p = start;
    const b0 = src[p++] as number;
    let count: number;
    if (b0 < 128) count = b0;
    else if (b0 < 255) count = ((b0 - 128) << 8) + (src[p++] ?? 0);
    else {
      count = (src[p] ?? 0) + ((src[p + 1] ?? 0) << 8) + 0x7f00;
      p += 2;
    }
    if (p > end) corrupt('zstd sequences header is truncated');
    let op = this.outPos;
    let litPos = litStart;
    if (count > 0) {
      if (p >= end) corrupt('zstd sequences header is truncated');
      const modes = src[p++] as number;
      if (modes & 3) corrupt('zstd sequence modes use reserved bits');
      let table: FseTable;
      [table, p] = this.sequenceTable(modes >> 6, p, end, LL_DEFAULT, this.llTable, LL_MAX_SYMBOL, 9);
      const ll = (this.llTable = table);
      [table, p] = this.sequenceTable((modes >> 4) & 3, p, end, OF_DEFAULT, this.ofTable, OF_MAX_SYMBOL, 8);
      const of = (this.ofTable = table);
      [table, p] = this.sequenceTable((modes >> 2) & 3, p, end, ML_DEFAULT, this.mlTable, ML_MAX_SYMBOL, 9);
      const ml = (this.mlTable = table);

      const bits = new BackwardBits(src, p, end);
      let llState = bits.read(ll.log);
      let ofState = bits.read(of.log);
      let mlState = bits.read(ml.log);
      let rep1 = this.rep1;
      let rep2 = this.rep2;
      let rep3 = this.rep3;
      const outEnd = out.length;
      const frameStart = this.frameStart;
      for (let i = 0; i < count; i++) {
        const llCode = ll.symbol[llState] as number;
        const ofCode = of.symbol[ofState] as number;
        const mlCode = ml.symbol[mlState] as number;
        if (llCode > LL_MAX_SYMBOL || mlCode > ML_MAX_SYMBOL || ofCode > OF_MAX_SYMBOL) corrupt('zstd sequence code out of range');
        let offsetValue: number;
        if (ofCode <= 24) offsetValue = (1 << ofCode) + bits.read(ofCode);
        else {
          const high = bits.read(ofCode - 16);
          offsetValue = 2 ** ofCode + high * 65536 + bits.read(16);
        }
        const matchLength = (ML_BASE[mlCode] as number) + bits.read(ML_BITS[mlCode] as number);
        const literalLength = (LL_BASE[llCode] as number) + bits.read(LL_BITS[llCode] as number);
        let offset: number;
        if (offsetValue > 3) {
          offset = offsetValue - 3;
          rep3 = rep2;
          rep2 = rep1;
          rep1 = offset;
        } else {
          const index = offsetValue + (literalLength === 0 ? 1 : 0);
          if (index === 1) offset = rep1;
          else if (index === 2) {
            offset = rep2;
            rep2 = rep1;
            rep1 = offset;
          } else if (index === 3) {
            offset = rep3;
            rep3 = rep2;
            rep2 = rep1;
            rep1 = offset;
          } else {
            offset = rep1 - 1;
            rep3 = rep2;
            rep2 = rep1;
            rep1 = offset;
          }
        }
        if (i < count - 1) {
          llState = (ll.newState[llState] as number) + bits.read(ll.nbBits[llState] as number);
          mlState = (ml.newState[mlState] as number) + bits.read(ml.nbBits[mlState] as number);
          ofState = (of.newState[ofState] as number) + bits.read(of.nbBits[ofState] as number);
        }
        // Execute: literals, then the match.
        if (literalLength > litEnd - litPos) corrupt('zstd sequence uses more literals than the block has');
        if (literalLength + matchLength > outEnd - op) corrupt('zstd frame decodes to more than the cluster size');
        if (literalLength < 32) {
          for (let k = 0; k < literalLength; k++) out[op + k] = lit[litPos + k] as number;
        } else {
          out.set(lit.subarray(litPos, litPos + literalLength), op);
        }
        op += literalLength;
        litPos += literalLength;
        if (offset <= 0 || offset > op - frameStart) corrupt(`zstd match offset ${offset} reaches before the frame`);
        const from = op - offset;
        if (offset >= matchLength) {
          if (matchLength < 32) for (let k = 0; k < matchLength; k++) out[op + k] = out[from + k] as number;
          else out.copyWithin(op, from, from + matchLength);
        } else if (offset === 1) {
          out.fill(out[from] as number, op, op + matchLength);
        } else if (matchLength < 32) {
          for (let k = 0; k < matchLength; k++) out[op + k] = out[from + k] as number;
        } else {
          // Overlapping: the pattern of period `offset` doubles with each copy.
          let dst = op;
          const stop = op + matchLength;
          let period = offset;
          while (dst < stop) {
            const n = Math.min(period, stop - dst);
            out.copyWithin(dst, from, from + n);
            dst += n;
            period += n;
          }
        }
        op += matchLength;
      }
      if (bits.pos !== 0) corrupt('zstd sequence bitstream is not fully consumed');
      this.rep1 = rep1;
      this.rep2 = rep2;
      this.rep3 = rep3;
    } else if (p !== end) {
      corrupt('zstd block has bytes after an empty sequences section');
    }
    const rest = litEnd - litPos;
    if (rest > out.length - op) corrupt('zstd frame decodes to more than the cluster size');
    out.set(lit.subarray(litPos, litEnd), op);
    op += rest;
    if (op - this.outPos > MAX_BLOCK) corrupt('zstd block decodes to more than 128 KiB');
    this.outPos = op;
  }

  private sequenceTable(mode: number, p: number, end: number, predefined: FseTable, previous: FseTable | undefined, maxSymbol: number, maxLog: number): [FseTable, number] {
    switch (mode) {
      case 0:
        return [predefined, p];
      case 1: {
        if (p >= end) corrupt('zstd RLE sequence table is truncated');
        const symbol = this.src[p] as number;
        if (symbol > maxSymbol) corrupt('zstd RLE sequence symbol out of range');
        return [rleFseTable(symbol), p + 1];
      }
      case 2:
        return readFseTable(this.src, p, end, maxSymbol, maxLog);
      default:
        if (!previous) corrupt('zstd repeat sequence table without a previous table');
        return [previous, p];
    }
  }
}

/** Huffman-coded literals: one stream, or four with a 6-byte jump table. */
function decodeHuffmanLiterals(src: Uint8Array, start: number, end: number, streams: number, table: HuffmanTable, lit: Uint8Array, regenerated: number): void {
  if (streams === 1) {
    decodeHuffmanStream(src, start, end, table, lit, 0, regenerated);
    return;
  }
  if (start + 6 > end) corrupt('zstd Huffman jump table is truncated');
  const size1 = (src[start] as number) | ((src[start + 1] as number) << 8);
  const size2 = (src[start + 2] as number) | ((src[start + 3] as number) << 8);
  const size3 = (src[start + 4] as number) | ((src[start + 5] as number) << 8);
  const s1 = start + 6;
  const s2 = s1 + size1;
  const s3 = s2 + size2;
  const s4 = s3 + size3;
  if (s4 > end) corrupt('zstd Huffman streams exceed the literals section');
  const segment = Math.ceil(regenerated / 4);
  const last = regenerated - 3 * segment;
  if (last < 0) corrupt('zstd Huffman literals too short for four streams');
  decodeHuffmanStream(src, s1, s2, table, lit, 0, segment);
  decodeHuffmanStream(src, s2, s3, table, lit, segment, segment);
  decodeHuffmanStream(src, s3, s4, table, lit, 2 * segment, segment);
  decodeHuffmanStream(src, s4, end, table, lit, 3 * segment, last);
}

function decodeHuffmanStream(src: Uint8Array, start: number, end: number, table: HuffmanTable, lit: Uint8Array, at: number, count: number): void {
  const bits = new BackwardBits(src, start, end);
  const { log, symbol, nbBits } = table;
  const mask = (1 << log) - 1;
  let pos = bits.pos;
  let i = 0;
  // Fast path while a whole table index lies inside the stream.
  for (; i < count && pos >= log; i++) {
    const p = pos - log;
    const b = start + (p >>> 3);
    const index = (((src[b] as number) | ((src[b + 1] ?? 0) << 8) | ((src[b + 2] ?? 0) << 16)) >>> (p & 7)) & mask;
    lit[at + i] = symbol[index] as number;
    pos -= nbBits[index] as number;
  }
  for (; i < count; i++) {
    const index = bits.peekBelowStart(pos - log, log); // fewer than `log` bits left: zeros below the start
    lit[at + i] = symbol[index] as number;
    pos -= nbBits[index] as number;
  }
  if (pos !== 0) corrupt('zstd Huffman stream is not fully consumed');
}

// ---------------------------------------------------------------------------
// The decoder pool: this module is its own worker script.

const WORKER_ROLE = 'diskconv-decoder';

/**
 * Cores left for decoder workers: the main thread and the libuv threads that
 * copy file data in and out keep about two busy. Measured on 2 cores, workers
 * only added their startup and copies (zstd: 0.75 s wall inline, 0.9-1.3 s with two).
 */
const ZSTD_WORKERS = availableParallelism() - 2;

let pool: DecodePool | null | undefined;

/** The shared pool, or null where it would not pay or this module cannot run as a worker (e.g. under a TypeScript loader). */
function zstdPool(): DecodePool | null {
  if (pool !== undefined) return pool;
  const script = new URL(import.meta.url);
  pool =
    ZSTD_WORKERS >= 1 && script.protocol === 'file:' && fileURLToPath(script).endsWith('.js')
      ? new DecodePool(script, { role: WORKER_ROLE }, ZSTD_WORKERS, decodeClusterSync)
      : null;
  return pool;
}

function isDecoderWorkerData(data: unknown): boolean {
  return typeof data === 'object' && data !== null && (data as { role?: unknown }).role === WORKER_ROLE;
}

// Started with the role above, this module serves decode requests.
if (!isMainThread && parentPort && isDecoderWorkerData(workerData)) serveDecodeRequests(parentPort, decodeClusterSync);
