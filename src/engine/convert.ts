import type { Hash } from 'node:crypto';
import { open, rm, type FileHandle } from 'node:fs/promises';
import { nodeCrypto } from './crypto/node-crypto.js';
import { throwIfAborted } from './errors.js';
import { Pacer } from './pace.js';
import { nativeSyncRange, nativeWriter } from './native.js';
import { readExtentBatches, type ReadOptions } from './reader.js';
import type { DirectTarget } from './decompress.js';
import type { RandomAccessSource } from './source.js';
import type { DiskImage, Extent } from './types.js';
import { EarlyWriteback } from './writeback.js';

/** Consumes a guest-ordered extent stream. Local files, object stores and RBD implement it. */
export interface ExtentSink {
  /**
   * Consumes one extent. The extent's bytes belong to the reader's recycled
   * buffers: the sink is done with them (written or copied) when this resolves.
   */
  write(extent: Extent): Promise<void>;
  /**
   * Optional: consumes several extents at once (guest-ordered, contiguous, as
   * write() would see them one by one), so a sink can hand them to the kernel
   * in one call. The bytes are the reader's until this resolves, as for write().
   * convertToRaw uses it when present; a sink without it gets write() per extent.
   */
  writeBatch?(extents: readonly Extent[]): Promise<void>;
  /**
   * Optional: a local file the reader may write compressed clusters to itself,
   * from the threads that decode them (ReadOptions.directWrite); the sink then
   * also gets `written` extents, whose bytes are already there, and skips them.
   * convertToRaw asks only when it hashes nothing.
   */
  directTarget?(): DirectTarget | undefined;
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
  /** Digests of the whole raw output to compute in the same pass (holes hashed as zeros); adds to `sha256`. */
  hashes?: readonly HashAlgorithm[];
}

/** Digests the conversion can compute on the way: sha256 (ours), md5 and sha512 (Glance's checksum and os_hash_value). */
export const HASH_ALGORITHMS = ['sha256', 'sha512', 'md5'] as const;
export type HashAlgorithm = (typeof HASH_ALGORITHMS)[number];

export interface ConvertResult {
  virtualSize: number;
  /** Guest bytes that were data (not holes) in the source map. */
  dataBytes: number;
  sha256?: string;
  sha512?: string;
  md5?: string;
}

export const ZERO_BLOCK = 4096;
const ZEROS = Buffer.alloc(4 * 2 ** 20);
const STAGING_BYTES = 4 * 2 ** 20;

/** True when every byte is zero. Compares natively against a zero buffer. */
export function isAllZero(data: Uint8Array): boolean {
  return isZeroRange(data, 0, data.length);
}

/** True when data[start, end) is all zero; compares in place (no subarray, so no garbage per block). */
function isZeroRange(data: Uint8Array, start: number, end: number): boolean {
  for (let off = start; off < end; off += ZEROS.length) {
    const len = Math.min(ZEROS.length, end - off);
    if (ZEROS.compare(data, off, off + len, 0, len) !== 0) return false;
  }
  return true;
}

/** Zero bytes hashed between two checks of the pacer (about 10 ms of sha256). */
const ZERO_SLICE = 4 * ZEROS.length;

/**
 * Feeds `length` zero bytes to a hash from one shared zero buffer, in slices:
 * between slices the event loop gets a turn (through `pacer`) and the abort signal
 * is checked, so a hole of a terabyte (about 0.7 s per GiB) never pins the
 * process. `onSlice` sees how many zero bytes are hashed so far.
 */
export async function hashZeros(hash: Hash, length: number, options: { pacer?: Pacer; signal?: AbortSignal; onSlice?: (done: number) => void } = {}): Promise<void> {
  const pacer = options.pacer ?? new Pacer(options.signal);
  let done = 0;
  while (done < length) {
    const slice = Math.min(ZERO_SLICE, length - done);
    for (let off = 0; off < slice; off += ZEROS.length) hash.update(ZEROS.subarray(0, Math.min(ZEROS.length, slice - off)));
    done += slice;
    options.onSlice?.(done);
    if (done < length) await pacer.pace();
  }
}

/** Streams an image into a sink as raw. The one conversion loop for every format and sink. */
export async function convertToRaw(image: DiskImage, source: RandomAccessSource, sink: ExtentSink, options: ConvertOptions = {}): Promise<ConvertResult> {
  const wanted = new Set<HashAlgorithm>(options.hashes ?? []);
  if (options.sha256) wanted.add('sha256');
  const hashes = [...wanted].map((algorithm) => ({ algorithm, hash: nodeCrypto().createHash(algorithm) }));
  const interval = options.progressIntervalMs ?? 250;
  let lastReport = 0;
  let dataBytes = 0;
  let bytesDone = 0;
  const pacer = new Pacer(options.signal);
  const report = (done: number): void => {
    const now = Date.now();
    if (options.onProgress && now - lastReport >= interval) {
      lastReport = now;
      options.onProgress({ bytesDone: done, bytesTotal: image.virtualSize });
    }
  };
  const batched = typeof sink.writeBatch === 'function';
  // Hashes need every byte here; otherwise compressed clusters may go to the file from the decoding threads.
  const direct = batched && hashes.length === 0 ? sink.directTarget?.() : undefined;
  try {
    for await (const batch of readExtentBatches(image, source, direct ? { ...options, directWrite: direct } : options)) {
      for (const extent of batch) {
        throwIfAborted(options.signal);
        for (const { hash } of hashes) {
          if (extent.kind === 'data') hash.update(extent.data);
          else await hashZeros(hash, extent.length, { pacer, onSlice: (done) => report(extent.offset + done) });
        }
        if (extent.kind === 'data') dataBytes += extent.length;
        if (batched) continue;
        await sink.write(extent);
        bytesDone = extent.offset + extent.length;
        report(bytesDone);
        // Extents that cost no I/O (holes, cached data) would otherwise follow each other in microtasks only.
        await pacer.pace();
      }
      if (!batched || batch.length === 0) continue;
      throwIfAborted(options.signal);
      await (sink.writeBatch as NonNullable<ExtentSink['writeBatch']>)(batch);
      const last = batch[batch.length - 1] as Extent;
      bytesDone = last.offset + last.length;
      report(bytesDone);
      await pacer.pace();
    }
    throwIfAborted(options.signal);
    await sink.finish(image.virtualSize);
  } catch (err) {
    await sink.abort().catch(() => {});
    throw err;
  }
  options.onProgress?.({ bytesDone: image.virtualSize, bytesTotal: image.virtualSize });
  const digests: Partial<Record<HashAlgorithm, string>> = {};
  for (const { algorithm, hash } of hashes) digests[algorithm] = hash.digest('hex');
  return { virtualSize: image.virtualSize, dataBytes, ...digests };
}

export interface RawFileSinkOptions {
  /** abort() removes the file at `path` (only for a file the sink's caller created). */
  removeOnAbort?: boolean;
  /**
   * Zero blocks of this size (aligned to the guest offset) stay holes, as qemu-img's -S.
   * 0 writes every byte, zeros included: a fully allocated file, or a target
   * (a device, an existing file) whose unwritten ranges do not read as zeros. Default 4096.
   */
  sparseBlock?: number;
  /** finish() sets the size to the virtual size (a regular file). false for a device or a larger existing file. Default true. */
  setSize?: boolean;
  /**
   * finish() flushes the data to stable storage before closing. The writeback of the data
   * then starts while the conversion runs (sync_file_range every 32 MiB written, through
   * the native helper where it loaded), so finish() waits for the last stretch only.
   */
  datasync?: boolean;
  /** Writes go at the current position, in guest order (a character device or a pipe); needs sparseBlock 0. */
  sequential?: boolean;
  /**
   * writeBatch() hands a whole batch to the native helper (one threadpool trip,
   * zero blocks found in C) when it loaded; false keeps fs/promises writes
   * (tests prove both paths write the same file). Default true.
   */
  nativeWrites?: boolean;
}

/**
 * Writes a raw image to a local file, leaving holes where the guest reads zeros
 * (at 4 KiB granularity, as qemu-img's default -S 4k), so its disk usage is no
 * larger than qemu-img's output.
 */
export class RawFileSink implements ExtentSink {
  /** Small extents (compressed clusters) are gathered here so one write covers many. */
  private readonly staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  private stagedBytes = 0;
  private stagedOffset = 0;

  private readonly removeOnAbort: boolean;
  private readonly sparseBlock: number;
  private readonly setSize: boolean;
  private readonly datasync: boolean;
  private readonly sequential: boolean;

  private constructor(
    private readonly handle: FileHandle,
    readonly path: string,
    options: RawFileSinkOptions,
  ) {
    this.removeOnAbort = options.removeOnAbort ?? false;
    this.sparseBlock = options.sparseBlock ?? ZERO_BLOCK;
    this.setSize = options.setSize ?? true;
    this.datasync = options.datasync ?? false;
    this.sequential = options.sequential ?? false;
    this.writer = options.nativeWrites === false || this.sequential ? null : nativeWriter();
    this.writeback = this.datasync && !this.sequential ? earlyWriteback(handle) : undefined;
  }

  /** Starts the writeback of what was written as the output grows; only for an output finish() flushes. */
  private readonly writeback: EarlyWriteback | undefined;

  /** The native batched writer, or null (JS path). */
  private readonly writer: ReturnType<typeof nativeWriter>;

  static async create(path: string, options: RawFileSinkOptions = {}): Promise<RawFileSink> {
    return new RawFileSink(await open(path, 'w'), path, options);
  }

  /** Writes into a handle the caller opened (a device, a temporary file); the sink closes it. */
  static fromHandle(handle: FileHandle, path: string, options: RawFileSinkOptions = {}): RawFileSink {
    return new RawFileSink(handle, path, options);
  }

  /** Compressed clusters may be written straight here by the decoding threads (with the native writer, at guest offsets). */
  directTarget(): DirectTarget | undefined {
    return this.writer && !this.sequential ? { fd: this.handle.fd, block: this.sparseBlock } : undefined;
  }

  async write(extent: Extent): Promise<void> {
    if (extent.kind === 'data' && extent.written) {
      this.writeback?.wrote(extent.offset, extent.length);
      return;
    }
    if (extent.kind === 'zero') {
      if (this.sparseBlock > 0) return;
      if (this.stagedBytes > 0) await this.flushStaged();
      for (let done = 0; done < extent.length; done += ZEROS.length) {
        await this.writeAll(ZEROS.subarray(0, Math.min(ZEROS.length, extent.length - done)), extent.offset + done);
      }
      return;
    }
    const { data, offset } = extent;
    const contiguous = this.stagedBytes > 0 && this.stagedOffset + this.stagedBytes === offset;
    if (this.stagedBytes > 0 && (!contiguous || this.stagedBytes + data.length > STAGING_BYTES)) await this.flushStaged();
    if (data.length >= STAGING_BYTES / 4) return this.writeNonZero(data, offset);
    if (this.stagedBytes === 0) this.stagedOffset = offset;
    this.staging.set(data, this.stagedBytes);
    this.stagedBytes += data.length;
  }

  /**
   * Writes a batch of extents. With the native helper: every data extent in
   * one call (skipping zero blocks of sparseBlock as write() does); holes stay
   * holes. Without it, or where zeros must be written (sparseBlock 0), extent by extent.
   */
  async writeBatch(extents: readonly Extent[]): Promise<void> {
    if (!this.writer || this.sparseBlock === 0) {
      for (const extent of extents) await this.write(extent);
      return;
    }
    if (this.stagedBytes > 0) await this.flushStaged();
    const views: Uint8Array[] = [];
    const positions: number[] = [];
    for (const extent of extents) {
      if (extent.kind !== 'data' || extent.length === 0 || extent.written) continue;
      views.push(extent.data.length === extent.length ? extent.data : extent.data.subarray(0, extent.length));
      positions.push(extent.offset);
    }
    if (views.length > 0) await this.writer(this.handle.fd, views, positions, this.sparseBlock);
    // Written extents were written by the decoding threads before the reader handed them over: they count too.
    if (this.writeback) for (const extent of extents) if (extent.kind === 'data') this.writeback.wrote(extent.offset, extent.length);
  }

  private async flushStaged(): Promise<void> {
    const bytes = this.stagedBytes;
    this.stagedBytes = 0;
    await this.writeNonZero(this.staging.subarray(0, bytes), this.stagedOffset);
  }

  /**
   * Writes runs of non-zero 4 KiB blocks (aligned to the guest offset); zero
   * blocks stay holes. One write at a time: writes to one file serialize on its
   * inode lock anyway, and concurrent ones only spin on it (measured: 6% of CPU).
   */
  private async writeNonZero(data: Uint8Array, offset: number): Promise<void> {
    const block = this.sparseBlock;
    if (block === 0) return this.writeAll(data, offset);
    if (isAllZero(data)) return;
    let runStart = -1;
    for (let pos = 0; pos < data.length; ) {
      const next = Math.min(data.length, pos + block - ((offset + pos) % block));
      if (isZeroRange(data, pos, next)) {
        if (runStart >= 0) await this.writeAll(data.subarray(runStart, pos), offset + runStart);
        runStart = -1;
      } else if (runStart < 0) runStart = pos;
      pos = next;
    }
    if (runStart >= 0) await this.writeAll(data.subarray(runStart), offset + runStart);
  }

  private async writeAll(bytes: Uint8Array, position: number): Promise<void> {
    for (let done = 0; done < bytes.length; ) {
      const at = this.sequential ? null : position + done;
      const { bytesWritten } = await this.handle.write(bytes, done, bytes.length - done, at);
      done += bytesWritten;
    }
    this.writeback?.wrote(position, bytes.length);
  }

  async finish(virtualSize: number): Promise<void> {
    if (this.stagedBytes > 0) await this.flushStaged();
    if (this.setSize) await this.handle.truncate(virtualSize);
    // Before the fdatasync: an early writeback's I/O error may have been reported to it alone.
    await this.writeback?.settle();
    if (this.datasync) await this.handle.datasync();
    await this.handle.close();
  }

  async abort(): Promise<void> {
    // No writeback call may still use the descriptor when it is closed (its number could be reused at once).
    await this.writeback?.stop();
    await this.handle.close().catch(() => {});
    if (this.removeOnAbort) await rm(this.path, { force: true });
  }
}

/**
 * Early writeback of a flushed output: sync_file_range through the native helper, or none where it did not
 * load (the closing fdatasync then writes it all back). Not a background fdatasync every 32 MiB (the file
 * store's WriteBehind): measured side by side on the bench's flushed pair, that also beat a single closing
 * fdatasync but ran twice as long in some rounds (each one also commits the journal and flushes the device's
 * cache, and waits), where sync_file_range only starts the writeback.
 */
function earlyWriteback(handle: FileHandle): EarlyWriteback | undefined {
  const syncRange = nativeSyncRange();
  return syncRange ? new EarlyWriteback((start, end) => syncRange(handle.fd, start, end - start)) : undefined;
}
