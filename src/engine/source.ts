import { open, type FileHandle } from 'node:fs/promises';
import { AbortedError, ImageCorruptError, SourceUnavailableError } from './errors.js';
import { nativeCopier, nativeReader, seekHelper } from './native.js';
import type { DirectTarget } from './native-decoder.js';

/**
 * Random-access bytes: a local file, an HTTP resource read with range requests,
 * a staged upload. Format drivers see nothing else.
 */
export interface RandomAccessSource {
  /** Total size in bytes. */
  readonly size: number;
  /** A name for messages and `info.filename`. */
  readonly name: string;
  /**
   * Reads up to `length` bytes at `offset`; the result is shorter only when it
   * reaches the end of the source. Never returns bytes beyond `size`.
   */
  read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array>;
  /**
   * Optional: fills `target` from `offset` (stopping only at the end of the source)
   * and returns the bytes read; lets the reader recycle its buffers.
   */
  readInto?(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number>;
  /**
   * Optional: fills `targets[i]` from `offsets[i]` for every i (each stopping only
   * at the end of the source) and returns the bytes read into each: many reads at
   * the cost of one (a local file through the native helper).
   */
  readIntoMany?(targets: Uint8Array[], offsets: number[], signal?: AbortSignal): Promise<number[]>;
  /**
   * Optional: copies runs of the source straight into a local file, each piece written right
   * after it is read (a local file, through the native helper): for every i, `lengths[i]` bytes
   * from `fileOffsets[i]` go to `positions[i]` of `target.fd`, zero blocks of `target.block`
   * left as holes. Returns the bytes read, fewer only where the source ended early. The reader
   * copies stored data this way when it writes to a ReadOptions.directWrite.
   */
  copyToFile?(target: DirectTarget, fileOffsets: number[], lengths: number[], positions: number[], signal?: AbortSignal): Promise<number>;
  /**
   * Optional: the caller will read the file range [start, end) soon, in the order
   * announced (the reader announces the reads of the batches it has cut from the
   * map, before it reads them). A remote source fetches announced ranges ahead, in
   * that order and within a bounded window, and nothing else ahead; a read need not
   * have been announced, and an announcement never makes a read wait.
   */
  willRead?(start: number, end: number): void;
  /** Bytes the source occupies on its storage (qemu's actual-size), when known. */
  allocatedSize?(): Promise<number | undefined>;
  /**
   * Optional: where data lies, as the filesystem tells it (SEEK_DATA/SEEK_HOLE):
   * up to `max` data ranges of [offset, end), in order, flat as
   * [start0, end0, start1, end1, ...]; everything between them reads as zeros.
   * Fewer than `max` ranges means there are no more before `end`. Undefined
   * when the source cannot tell; callers then read everything.
   */
  dataRanges?(offset: number, end: number, max: number): Promise<number[] | undefined>;
  close(): Promise<void>;
}

/**
 * Reads exactly `length` bytes or refuses: qemu reads past end-of-file as zeros,
 * we call it corruption, so a truncated upload never becomes a zero-filled disk.
 */
export async function readExact(
  source: RandomAccessSource,
  offset: number,
  length: number,
  what: string,
  signal?: AbortSignal,
): Promise<Uint8Array> {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new ImageCorruptError(`${what}: invalid range offset=${offset} length=${length}`);
  }
  if (offset + length > source.size) {
    throw new ImageCorruptError(
      `${what} at offset ${offset} (${length} bytes) lies beyond the end of the file (${source.size} bytes); the image is truncated or corrupt`,
    );
  }
  const data = await source.read(offset, length, signal);
  if (data.length !== length) {
    throw new ImageCorruptError(`${what}: short read at offset ${offset} (${data.length} of ${length} bytes)`);
  }
  return data;
}

/** `read` for a source whose reads are its `readInto`: a new buffer of what lies within the source, trimmed to what was read. */
export async function readThroughReadInto(
  source: { readonly size: number; readInto(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number> },
  offset: number,
  length: number,
  signal?: AbortSignal,
): Promise<Uint8Array> {
  const end = Math.min(source.size, offset + length);
  const buf = Buffer.allocUnsafe(Math.max(0, end - offset));
  const done = await source.readInto(buf, offset, signal);
  return done === buf.length ? buf : buf.subarray(0, done);
}

/**
 * The piece copyToFile reads and then writes: a quarter of this machine's 1 MiB L2, so it is still
 * there for the write's copy; 128 KiB to 1 MiB measured the same (session 11, sparse raw).
 */
const COPY_CHUNK = 256 * 2 ** 10;

/** A local file opened read-only. */
export class FileSource implements RandomAccessSource {
  /** Present where the native helper loaded: a batch of reads in one threadpool trip. */
  readonly readIntoMany?: (targets: Uint8Array[], offsets: number[], signal?: AbortSignal) => Promise<number[]>;
  /** Present where the native helper loaded: runs read and written in one threadpool trip. */
  readonly copyToFile?: (target: DirectTarget, fileOffsets: number[], lengths: number[], positions: number[], signal?: AbortSignal) => Promise<number>;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly name: string,
    private readonly blocks: number,
  ) {
    const native = nativeReader();
    if (native) {
      this.readIntoMany = async (targets, offsets, signal) => {
        if (signal?.aborted) throw new AbortedError();
        // Never past the end of the file (as readInto): the views are trimmed, the counts say so.
        const views = targets.map((t, i) => t.subarray(0, Math.max(0, Math.min(t.length, this.size - (offsets[i] as number)))));
        return native(this.handle.fd, views, offsets);
      };
    }
    const copier = nativeCopier();
    if (copier) {
      this.copyToFile = async (target, fileOffsets, lengths, positions, signal) => {
        if (signal?.aborted) throw new AbortedError();
        return copier(this.handle.fd, target.fd, fileOffsets, lengths, positions, target.block, COPY_CHUNK);
      };
    }
  }

  static async open(path: string, name = path): Promise<FileSource> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (err) {
      throw new SourceUnavailableError(`cannot open ${name}: ${(err as Error).message}`, { cause: err });
    }
    const st = await handle.stat();
    if (!st.isFile() && !st.isBlockDevice()) {
      await handle.close();
      throw new SourceUnavailableError(`${name} is not a regular file`);
    }
    return new FileSource(handle, st.size, name, st.blocks);
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (signal?.aborted) throw new AbortedError();
    return readThroughReadInto(this, offset, length, signal);
  }

  async readInto(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number> {
    if (signal?.aborted) throw new AbortedError();
    const want = Math.max(0, Math.min(target.length, this.size - offset));
    let done = 0;
    while (done < want) {
      const { bytesRead } = await this.handle.read(target, done, want - done, offset + done);
      if (bytesRead === 0) break; // the file shrank under us; callers report the short read
      done += bytesRead;
    }
    return done;
  }

  async allocatedSize(): Promise<number> {
    return this.blocks * 512;
  }

  /** SEEK_DATA/SEEK_HOLE through the native helper, when it loaded and the filesystem answers. */
  async dataRanges(offset: number, end: number, max: number): Promise<number[] | undefined> {
    const helper = seekHelper();
    if (!helper || this.seekUnsupported) return undefined;
    try {
      return helper.dataExtents(this.handle.fd, offset, Math.min(end, this.size), max);
    } catch (err) {
      if ((err as { code?: unknown }).code === 'ENOTSUP') {
        this.seekUnsupported = true;
        return undefined;
      }
      throw new SourceUnavailableError(`cannot map data of ${this.name}: ${(err as Error).message}`, { cause: err });
    }
  }
  private seekUnsupported = false;

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** Bytes in memory; for tests and small inspections. */
export class BufferSource implements RandomAccessSource {
  readonly size: number;
  constructor(
    private readonly bytes: Uint8Array,
    readonly name = 'buffer',
  ) {
    this.size = bytes.length;
  }
  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (signal?.aborted) throw new AbortedError();
    return this.bytes.subarray(offset, Math.min(this.size, offset + length));
  }
  async close(): Promise<void> {}
}
