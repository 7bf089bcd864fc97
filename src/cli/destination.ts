/**
 * Where `convert` and `create` write, decided before a byte is written, so no
 * command destroys what it did not create:
 * - the source itself (same device and inode, through hard links and symlinks,
 *   or another node of the same device) is refused (`SAME_FILE`);
 * - a block device is written in place: never truncated, never unlinked, checked
 *   to be large enough first, zeros written where the image reads zeros;
 * - a character device or a FIFO is written in place, in order, every byte;
 * - a regular file is written under a temporary name beside it and renamed over
 *   the destination only when complete: a failure leaves an existing destination
 *   exactly as it was and removes only the temporary file;
 * - `-n` writes into an existing file in place (qemu-img's meaning), never
 *   resizing it, and refuses one smaller than the image.
 * The sink itself (RawFileSink in the engine) only writes into the handle it is given.
 */
import { constants } from 'node:fs';
import { lstat, open, readFile, realpath, rename, stat, statfs, unlink, chmod, chown, type FileHandle } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { InsufficientSpaceError } from '../engine/errors.js';
import { RawFileSink, type ExtentSink } from '../engine/convert.js';
import type { DirectTarget } from '../engine/native-decoder.js';
import type { Extent } from '../engine/types.js';
import { destinationError, DestinationUnwritableError, SameFileError } from './errors.js';

/** qemu-img's cache modes (`-t`). Only when the data is flushed differs here: `unsafe` never, the others at the end. */
export const CACHE_MODES = ['writeback', 'unsafe', 'none', 'directsync', 'writethrough'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

export type DestinationKind = 'new-file' | 'replace-file' | 'existing-file' | 'block-device' | 'char-device';

export interface DestinationRequest {
  /** DST as the user named it. */
  path: string;
  /** The source's path: refused as a destination. */
  sourcePath?: string;
  virtualSize: number;
  /**
   * Upper bound of the bytes a new file allocates: checked against the free space before writing.
   * A function is called only when the free space is below what the file could hold at most
   * (its virtual size), so a conversion with room to spare never walks the image's map twice.
   */
  allocatedBytes: number | (() => Promise<number>);
  /** `-n`: the destination exists and is written in place, never created or resized. */
  noCreate?: boolean;
  /** `--target-is-zero` (with `-n`): the destination reads as zeros, so zeros need not be written. */
  targetIsZero?: boolean;
  /** `-S` in bytes: zero blocks of this size stay holes in a new file; 0 = fully allocated. */
  sparseBlock: number;
  /** `-t`; undefined is qemu-img convert's default (`unsafe`), except that replacing an existing file flushes first. */
  cache?: CacheMode;
}

function sameFile(a: Stats, b: Stats): boolean {
  if (a.dev === b.dev && a.ino === b.ino) return true;
  const device = (s: Stats) => s.isBlockDevice() || s.isCharacterDevice();
  return device(a) && device(b) && a.isBlockDevice() === b.isBlockDevice() && a.rdev === b.rdev;
}

async function statOrUndefined(path: string, follow: boolean): Promise<Stats | undefined> {
  try {
    return follow ? await stat(path) : await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw destinationError(path, 'cannot stat', err);
  }
}

/** A block device's size from sysfs (fstat reports 0 for devices; Node has no BLKGETSIZE64). */
export async function blockDeviceSize(path: string): Promise<number> {
  const st = await stat(path, { bigint: true });
  const rdev = st.rdev;
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  try {
    const sectors = Number((await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim());
    if (!Number.isSafeInteger(sectors)) throw new Error(`unreadable size '${sectors}'`);
    return sectors * 512;
  } catch (err) {
    throw new DestinationUnwritableError(`${path}: cannot determine the size of block device ${major}:${minor}: ${(err as Error).message}`, { cause: err });
  }
}

/** Refuses the source as the destination, through any link. */
export async function refuseSameFile(sourcePath: string, destPath: string): Promise<void> {
  const [src, dst] = await Promise.all([stat(sourcePath).catch(() => undefined), statOrUndefined(destPath, true)]);
  if (src && dst && sameFile(src, dst)) {
    throw new SameFileError(`${destPath} is the source ${sourcePath} (the same file${dst.isFile() ? `, inode ${dst.ino}` : ' or device'}); refusing to overwrite the image being read`);
  }
}

async function openExisting(path: string, flags: number): Promise<FileHandle> {
  try {
    return await open(path, flags);
  } catch (err) {
    throw destinationError(path, 'cannot open for writing', err);
  }
}

async function checkFreeSpace(dir: string, needed: number | (() => Promise<number>), most: number, shown: string): Promise<void> {
  let free: number;
  try {
    const fs = await statfs(dir);
    free = fs.bavail * fs.bsize;
  } catch (err) {
    throw destinationError(dir, 'cannot read free space', err);
  }
  if (typeof needed === 'function') {
    if (most <= free) return;
    needed = await needed();
  }
  if (needed > free) throw new InsufficientSpaceError(`${shown}: the output needs up to ${needed} bytes; ${dir} has ${free} bytes free`);
}

/** A sink onto the destination; finish() commits (renames into place), abort() removes only what it created. */
export class DestinationSink implements ExtentSink {
  private done = false;

  private constructor(
    readonly path: string,
    readonly kind: DestinationKind,
    private readonly inner: RawFileSink,
    /** The temporary file renamed over `target` at the end; undefined when writing in place. */
    private readonly temp: { path: string; target: string; mode?: number; uid?: number; gid?: number; syncDir: boolean } | undefined,
  ) {}

  static async open(req: DestinationRequest): Promise<DestinationSink> {
    const { path } = req;
    if (req.sourcePath !== undefined) await refuseSameFile(req.sourcePath, path);
    const link = await statOrUndefined(path, false);
    const st = link ? await statOrUndefined(path, true) : undefined;
    if (link && !st) throw new DestinationUnwritableError(`${path} is a symbolic link to a missing file`);
    const sync = req.cache !== undefined && req.cache !== 'unsafe';
    const zeroTarget = req.targetIsZero === true;

    if (st?.isDirectory()) throw new DestinationUnwritableError(`${path} is a directory`);
    if (st?.isBlockDevice()) {
      const size = await blockDeviceSize(path);
      if (size < req.virtualSize) {
        throw new InsufficientSpaceError(`${path}: the block device holds ${size} bytes, smaller than the image's virtual size ${req.virtualSize}; nothing was written`);
      }
      const handle = await openExisting(path, constants.O_WRONLY);
      const sink = RawFileSink.fromHandle(handle, path, { sparseBlock: zeroTarget ? req.sparseBlock : 0, setSize: false, datasync: sync });
      return new DestinationSink(path, 'block-device', sink, undefined);
    }
    if (st?.isCharacterDevice() || st?.isFIFO()) {
      const handle = await openExisting(path, constants.O_WRONLY);
      const sink = RawFileSink.fromHandle(handle, path, { sparseBlock: 0, setSize: false, sequential: true });
      return new DestinationSink(path, 'char-device', sink, undefined);
    }
    if (st && !st.isFile()) throw new DestinationUnwritableError(`${path} is neither a regular file nor a device`);

    if (req.noCreate) {
      if (!st) throw new DestinationUnwritableError(`${path}: -n needs an existing destination: No such file or directory`);
      if (st.size < req.virtualSize) {
        throw new InsufficientSpaceError(`${path}: output file is smaller than input file (${st.size} < ${req.virtualSize} bytes); nothing was written`);
      }
      const handle = await openExisting(path, constants.O_WRONLY);
      const sink = RawFileSink.fromHandle(handle, path, { sparseBlock: zeroTarget ? req.sparseBlock : 0, setSize: false, datasync: sync });
      return new DestinationSink(path, 'existing-file', sink, undefined);
    }

    // A new file, or a replacement for an existing one (through a symlink, the file it names): a temporary file beside it.
    const target = st ? await realpath(path) : path;
    const dir = dirname(target);
    const dirSt = await statOrUndefined(dir, true);
    if (!dirSt) throw new DestinationUnwritableError(`${path}: the directory ${dir} does not exist`);
    if (!dirSt.isDirectory()) throw new DestinationUnwritableError(`${path}: ${dir} is not a directory`);
    await checkFreeSpace(dir, req.sparseBlock === 0 ? req.virtualSize : req.allocatedBytes, req.virtualSize, path);
    // O_EXCL makes the name ours; Math.random only keeps two runs from picking the same one (node:crypto
    // would add ~6 ms to every start for it).
    const tempPath = join(dir, `.${basename(target)}.diskconv-${Math.floor(Math.random() * 2 ** 32).toString(16).padStart(8, '0')}`);
    let handle: FileHandle;
    try {
      handle = await open(tempPath, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o644);
    } catch (err) {
      throw destinationError(path, `cannot create a file in ${dir}`, err);
    }
    try {
      // As qemu's file driver does on creation (allocate_first_block): the first 4 KiB are written, so both allocate alike.
      const first = Math.min(4096, req.virtualSize);
      if (first > 0) await handle.write(Buffer.alloc(first), 0, first, 0);
    } catch (err) {
      await handle.close().catch(() => {});
      await unlink(tempPath).catch(() => {});
      throw destinationError(path, 'writing the first block', err);
    }
    const sink = RawFileSink.fromHandle(handle, tempPath, { sparseBlock: req.sparseBlock, setSize: true, datasync: sync || (st !== undefined && req.cache === undefined) });
    return new DestinationSink(path, st ? 'replace-file' : 'new-file', sink, {
      path: tempPath,
      target,
      ...(st ? { mode: st.mode & 0o7777, uid: st.uid, gid: st.gid } : {}),
      syncDir: sync,
    });
  }

  async write(extent: Extent): Promise<void> {
    try {
      await this.inner.write(extent);
    } catch (err) {
      throw destinationError(this.path, `writing at offset ${extent.offset}`, err);
    }
  }

  /** The file's own, for compressed clusters written by the decoding threads; their write errors read as this sink's. */
  directTarget(): DirectTarget | undefined {
    const target = this.inner.directTarget();
    return target && { ...target, writeError: (err, offset) => destinationError(this.path, `writing at offset ${offset}`, err) };
  }

  async writeBatch(extents: readonly Extent[]): Promise<void> {
    try {
      await this.inner.writeBatch(extents);
    } catch (err) {
      throw destinationError(this.path, `writing at offset ${extents[0]?.offset ?? 0}`, err);
    }
  }

  async finish(virtualSize: number): Promise<void> {
    try {
      await this.inner.finish(virtualSize);
      if (this.temp) {
        const { path, target, mode, uid, gid } = this.temp;
        if (mode !== undefined) await chmod(path, mode);
        if (uid !== undefined && gid !== undefined && process.getuid?.() === 0) await chown(path, uid, gid).catch(() => {});
        await rename(path, target);
        if (this.temp.syncDir) {
          const dir = await open(dirname(target), 'r');
          await dir.sync().finally(() => dir.close());
        }
      }
      this.done = true;
    } catch (err) {
      throw destinationError(this.path, 'finishing the output', err);
    }
  }

  /** Closes the destination; removes the temporary file, never the destination or a device. */
  async abort(): Promise<void> {
    await this.inner.abort().catch(() => {});
    if (this.temp && !this.done) await unlink(this.temp.path).catch(() => {});
  }
}
