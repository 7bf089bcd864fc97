import { createHash, type Hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { throwIfAborted } from './errors.js';
import { readExtents, type ReadOptions } from './reader.js';
import type { RandomAccessSource } from './source.js';
import type { DiskImage, Extent } from './types.js';

/** Consumes a guest-ordered extent stream. Local files, object stores and RBD implement it. */
export interface ExtentSink {
  write(extent: Extent): Promise<void>;
  /** Called once after the last extent; the output must then be exactly virtualSize bytes. */
  finish(virtualSize: number): Promise<void>;
  /** Called on failure or cancellation; removes partial output where the sink can. */
  abort(): Promise<void>;
}

export interface Progress {
  bytesDone: number;
  bytesTotal: number;
}

export interface ConvertOptions extends ReadOptions {
  /** Called at most every `progressIntervalMs` and once at the end. */
  onProgress?: (progress: Progress) => void;
  progressIntervalMs?: number;
  /** Compute the sha256 of the whole raw output (holes hashed as zeros). */
  sha256?: boolean;
}

export interface ConvertResult {
  virtualSize: number;
  /** Guest bytes that were data (not holes) in the source map. */
  dataBytes: number;
  sha256?: string;
}

export const ZERO_BLOCK = 4096;
const ZEROS = Buffer.alloc(4 * 2 ** 20);

/** True when every byte is zero. Compares natively against a zero buffer. */
export function isAllZero(data: Uint8Array): boolean {
  for (let off = 0; off < data.length; off += ZEROS.length) {
    const len = Math.min(ZEROS.length, data.length - off);
    if (Buffer.compare(data.subarray(off, off + len), ZEROS.subarray(0, len)) !== 0) return false;
  }
  return true;
}

/** Feeds `length` zero bytes to a hash without allocating them. */
export function hashZeros(hash: Hash, length: number): void {
  for (let left = length; left > 0; left -= ZEROS.length) hash.update(ZEROS.subarray(0, Math.min(left, ZEROS.length)));
}

/** Streams an image into a sink as raw. The one conversion loop for every format and sink. */
export async function convertToRaw(image: DiskImage, source: RandomAccessSource, sink: ExtentSink, options: ConvertOptions = {}): Promise<ConvertResult> {
  const hash = options.sha256 ? createHash('sha256') : undefined;
  const interval = options.progressIntervalMs ?? 250;
  let lastReport = 0;
  let dataBytes = 0;
  let bytesDone = 0;
  try {
    for await (const extent of readExtents(image, source, options)) {
      throwIfAborted(options.signal);
      if (hash) {
        if (extent.kind === 'data') hash.update(extent.data);
        else hashZeros(hash, extent.length);
      }
      if (extent.kind === 'data') dataBytes += extent.length;
      await sink.write(extent);
      bytesDone = extent.offset + extent.length;
      const now = Date.now();
      if (options.onProgress && now - lastReport >= interval) {
        lastReport = now;
        options.onProgress({ bytesDone, bytesTotal: image.virtualSize });
      }
    }
    throwIfAborted(options.signal);
    await sink.finish(image.virtualSize);
  } catch (err) {
    await sink.abort().catch(() => {});
    throw err;
  }
  options.onProgress?.({ bytesDone: image.virtualSize, bytesTotal: image.virtualSize });
  return { virtualSize: image.virtualSize, dataBytes, ...(hash ? { sha256: hash.digest('hex') } : {}) };
}

/**
 * Writes a raw image to a local file, leaving holes where the guest reads zeros
 * (at 4 KiB granularity, as qemu-img's default -S 4k), so its disk usage is no
 * larger than qemu-img's output.
 */
export class RawFileSink implements ExtentSink {
  private inflight: Promise<unknown>[] = [];
  private constructor(
    private readonly handle: FileHandle,
    readonly path: string,
    private readonly removeOnAbort: boolean,
  ) {}

  static async create(path: string, options: { removeOnAbort?: boolean } = {}): Promise<RawFileSink> {
    return new RawFileSink(await open(path, 'w'), path, options.removeOnAbort ?? false);
  }

  async write(extent: Extent): Promise<void> {
    if (extent.kind === 'zero') return;
    const { data, offset } = extent;
    // Write runs of non-zero 4 KiB blocks; skip zero blocks. Blocks are aligned to the guest offset.
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      this.inflight.push(this.handle.write(data, runStart, end - runStart, offset + runStart));
      runStart = -1;
    };
    if (!isAllZero(data)) {
      for (let pos = 0; pos < data.length; ) {
        const next = Math.min(data.length, pos + ZERO_BLOCK - ((offset + pos) % ZERO_BLOCK));
        if (isAllZero(data.subarray(pos, next))) flush(pos);
        else if (runStart < 0) runStart = pos;
        pos = next;
      }
      flush(data.length);
    }
    // A few writes in flight overlap with reading and decoding; wait when too many.
    if (this.inflight.length >= 8) {
      await Promise.all(this.inflight);
      this.inflight = [];
    }
  }

  async finish(virtualSize: number): Promise<void> {
    await Promise.all(this.inflight);
    this.inflight = [];
    await this.handle.truncate(virtualSize);
    await this.handle.close();
  }

  async abort(): Promise<void> {
    await Promise.allSettled(this.inflight);
    await this.handle.close().catch(() => {});
    if (this.removeOnAbort) {
      const { rm } = await import('node:fs/promises');
      await rm(this.path, { force: true });
    }
  }
}
