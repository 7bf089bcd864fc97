import { createRequire } from 'node:module';

/**
 * diskconv's optional native helper (native/seek, built by node-gyp at
 * `npm ci` and `npm run build`): SEEK_DATA/SEEK_HOLE, which Node lacks, and
 * batched reads, writes and file-to-file copies (native/seek/io.c). Where it did not build or cannot load,
 * callers fall back to reading holes and to fs/promises writes.
 */
export interface SeekHelper {
  /** Data ranges of [offset, end) as [start0, end0, start1, end1, ...], at most `max` ranges; throws (code ENOTSUP) where the filesystem cannot tell. */
  dataExtents(fd: number, offset: number, end: number, max: number): number[];
  /**
   * Writes `views[i]` at `positions[i]` for every i, in one trip to the libuv
   * threadpool; with `block` > 0, blocks of `block` bytes (aligned to the file
   * offset) that are all zero are skipped. Resolves with the bytes written;
   * rejects with an fs-style error (.code ENOSPC, EIO, ...). The views must not
   * change until it settles. Absent from a helper built before it existed.
   */
  writeExtents?(fd: number, views: Uint8Array[], positions: number[], block: number): Promise<number>;
  /**
   * Fills `views[i]` from `positions[i]` for every i in one threadpool trip;
   * resolves with the bytes read into each (fewer only at the end of the file).
   */
  readExtents?(fd: number, views: Uint8Array[], positions: number[]): Promise<number[]>;
  /**
   * sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) on the threadpool: starts the
   * writeback of that range without waiting for it. Resolves false where the descriptor cannot
   * take it (a pipe, a filesystem without it); rejects with an fs-style error (.code EIO, ...).
   */
  syncRange?(fd: number, offset: number, length: number): Promise<boolean>;
  /**
   * For every i, reads `lengths[i]` bytes at `fileOffsets[i]` of `inFd` and writes them at
   * `positions[i]` of `outFd`, `chunk` bytes at a time through one buffer (each chunk written
   * while it is still in the CPU's caches), zero blocks of `block` skipped as writeExtents does;
   * one threadpool trip. Resolves with the bytes read (fewer only where `inFd` ended early);
   * rejects with an fs-style error whose .syscall is "pread" or "pwrite".
   */
  copyExtents?(inFd: number, outFd: number, fileOffsets: number[], lengths: number[], positions: number[], block: number, chunk: number): Promise<number>;
}

let helper: SeekHelper | null | undefined;

/** Loads the addon native/NAME, or null where it was not built or lacks `entry` (the JavaScript paths stand in). */
export function loadAddon<T>(name: string, entry: keyof T & string): T | null {
  try {
    // From src/engine or dist/engine alike: two levels below the package root.
    const loaded = createRequire(import.meta.url)(`../../native/${name}/build/Release/${name}.node`) as Partial<T>;
    return typeof loaded[entry] === 'function' ? (loaded as T) : null;
  } catch {
    return null;
  }
}

export function seekHelper(): SeekHelper | null {
  if (helper === undefined) helper = loadAddon<SeekHelper>('seek', 'dataExtents');
  return helper;
}

/** The batched reader of the native helper, or null where it is not available. */
export function nativeReader(): NonNullable<SeekHelper['readExtents']> | null {
  const h = seekHelper();
  return h && typeof h.readExtents === 'function' ? h.readExtents.bind(h) : null;
}

/** The batched writer of the native helper, or null where it is not available. */
export function nativeWriter(): NonNullable<SeekHelper['writeExtents']> | null {
  const h = seekHelper();
  return h && typeof h.writeExtents === 'function' ? h.writeExtents.bind(h) : null;
}

/** The native helper's fused read-and-write of file ranges, or null where it is not available. */
export function nativeCopier(): NonNullable<SeekHelper['copyExtents']> | null {
  const h = seekHelper();
  return h && typeof h.copyExtents === 'function' ? h.copyExtents.bind(h) : null;
}

/** The native helper's sync_file_range, or null where it is not available (flushed outputs are then written back at the end only). */
export function nativeSyncRange(): NonNullable<SeekHelper['syncRange']> | null {
  const h = seekHelper();
  return h && typeof h.syncRange === 'function' ? h.syncRange.bind(h) : null;
}
