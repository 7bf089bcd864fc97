/**
 * Staging a compressed archive member (a deflated zip member, a gzip'd OVF
 * file) into a scratch file, so the image inside is read at random as usual.
 *
 * Bounded on every side: the decompressed size by `maxVirtualSize`, the data
 * written (zero blocks stay holes, so not the size) by the free space of the
 * scratch folder less a reserve, read again as it fills, a zip member's size by its own
 * declared size (more bytes, or fewer, is a size that lies: IMAGE_CORRUPT, and
 * so is a CRC-32 that differs), a declared size no deflate stream can reach
 * from its compressed size refused before a byte is inflated. A truncated or
 * corrupt stream is IMAGE_CORRUPT, never a short disk. The scratch folder is
 * created mode 0700 with files 0600, written sparse (zero blocks are skipped),
 * and removed when the archive is closed, on failure too.
 */
import { mkdtemp, open, rm, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, type Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { AbortedError, ImageCorruptError, InsufficientSpaceError, LimitExceededError, throwIfAborted } from '../errors.js';
import { FileSource, type RandomAccessSource } from '../source.js';

/** Left free in the scratch folder's filesystem while staging. */
export const SCRATCH_RESERVE = 64 * 2 ** 20;
/** deflate's best ratio is 1032:1; a zip member declaring more than this from its compressed size lies. */
const DEFLATE_MAX_RATIO = 1032;
const READ_CHUNK = 2 ** 20;
const SPARSE_BLOCK = 64 * 1024;
const ZEROS = Buffer.alloc(SPARSE_BLOCK);
/** Free space is read again after this many bytes of data written. */
const SPACE_RECHECK = 64 * 2 ** 20;

export interface StageRequest {
  /** The compressed bytes: a range of `source`. */
  source: RandomAccessSource;
  offset: number;
  length: number;
  codec: 'deflate-raw' | 'gzip';
  /** For a zip member: the uncompressed size and CRC-32 its directory declares, checked exactly. */
  expect?: { size: number; crc32: number };
  /** Names the member in messages. */
  what: string;
  maxVirtualSize: number;
  signal?: AbortSignal;
}

/** One archive's scratch folder, made on first use. */
export class Scratch {
  private dir: string | undefined;
  private count = 0;
  constructor(
    private readonly parent: string = tmpdir(),
    private readonly prefix = 'diskconv-archive-',
    /** Bytes left free in the scratch filesystem (SCRATCH_RESERVE unless told). */
    private readonly reserve = SCRATCH_RESERVE,
  ) {}

  /** Decompresses the request into a new scratch file and opens it. */
  async stage(req: StageRequest): Promise<FileSource> {
    const { what } = req;
    if (req.expect) {
      const { size } = req.expect;
      if (size > req.maxVirtualSize) throw new LimitExceededError('maxVirtualSize', size, req.maxVirtualSize, `${what}: declared uncompressed size`);
      if (size > req.length * DEFLATE_MAX_RATIO + 1024) {
        throw new ImageCorruptError(`${what}: declares ${size} uncompressed bytes from ${req.length} compressed, more than deflate can produce (a zip entry whose sizes lie)`);
      }
    }
    this.dir ??= await mkdtemp(join(this.parent, this.prefix));
    const path = join(this.dir, `member-${this.count++}`);
    // The bound is the space the file takes: zero blocks are left as holes (writeSparse), so a
    // member's size is not what it needs (a 20 GiB disk of 1 GiB data needs 1 GiB). Counted as
    // the data blocks written, each rounded up to the filesystem's block; the free space is
    // read again every SPACE_RECHECK bytes, so other writers to the same filesystem count too.
    // The size itself stays bounded by maxVirtualSize (a bomb of zeros writes nothing but stops there).
    const { reserve } = this;
    const fs = await statfs(this.dir);
    const blockSize = Math.max(512, fs.bsize);
    const free = Math.max(0, fs.bavail * fs.bsize - reserve);
    const noSpace = (have: number): InsufficientSpaceError =>
      new InsufficientSpaceError(`${what}: its data needs more than the ${have} bytes free for scratch space in ${this.parent} (less a ${reserve}-byte reserve)`);
    const handle = await open(path, 'wx', 0o600);
    let size = 0;
    let allocated = 0;
    let recheckAt = SPACE_RECHECK;
    let crc = 0;
    try {
      const decoder: Transform = req.codec === 'gzip' ? zlib.createGunzip({ chunkSize: 256 * 1024 }) : zlib.createInflateRaw({ chunkSize: 256 * 1024 });
      // The first error of the writing end is the one to report (pipeline may say ABORT_ERR of the stages it tore down).
      let failure: unknown;
      const writeOut = async (chunks: AsyncIterable<Buffer>): Promise<void> => {
        try {
          await writeAll(chunks);
        } catch (err) {
          failure ??= err;
          throw err;
        }
      };
      const writeAll = async (chunks: AsyncIterable<Buffer>): Promise<void> => {
        for await (const chunk of chunks) {
          throwIfAborted(req.signal);
          const next = size + chunk.length;
          if (req.expect && next > req.expect.size) {
            throw new ImageCorruptError(`${what}: inflates to more than the ${req.expect.size} bytes its zip entry declares (a zip entry whose sizes lie, or a deflate bomb)`);
          }
          if (next > req.maxVirtualSize) throw new LimitExceededError('maxVirtualSize', next, req.maxVirtualSize, `${what}: decompressed size`);
          if (req.expect) crc = crc32(chunk, crc);
          allocated += await writeSparse(handle, chunk, size, blockSize, free - allocated, () => noSpace(free));
          size = next;
          if (allocated >= recheckAt) {
            recheckAt = allocated + SPACE_RECHECK;
            const now = await statfs(this.dir as string);
            if (now.bavail * now.bsize < reserve) throw noSpace(free);
          }
        }
      };
      await pipeline(Readable.from(rangeChunks(req.source, req.offset, req.length, req.signal)), decoder, writeOut, ...(req.signal ? [{ signal: req.signal }] : [])).catch((err: unknown) => {
        throw failure ?? err;
      });
      if (req.expect && size !== req.expect.size) {
        throw new ImageCorruptError(`${what}: inflates to ${size} bytes, its zip entry declares ${req.expect.size} (a zip entry whose sizes lie)`);
      }
      if (req.expect && crc >>> 0 !== req.expect.crc32 >>> 0) {
        throw new ImageCorruptError(`${what}: CRC-32 ${hex(crc)} of the inflated bytes differs from the zip entry's ${hex(req.expect.crc32)}; the member is damaged`);
      }
      if (size === 0 && req.codec === 'gzip') throw new ImageCorruptError(`${what}: the gzip stream holds no data`);
      await handle.truncate(size);
    } catch (err) {
      await handle.close().catch(() => {});
      throw asCorrupt(err, what, req.codec);
    }
    await handle.close();
    return FileSource.open(path, what);
  }

  /** Removes the folder and everything staged in it. */
  async remove(): Promise<void> {
    const dir = this.dir;
    this.dir = undefined;
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  }
}

const hex = (n: number): string => (n >>> 0).toString(16).padStart(8, '0');

async function* rangeChunks(source: RandomAccessSource, offset: number, length: number, signal?: AbortSignal): AsyncGenerator<Uint8Array> {
  for (let done = 0; done < length; ) {
    throwIfAborted(signal);
    const want = Math.min(READ_CHUNK, length - done);
    const bytes = await source.read(offset + done, want, signal);
    if (bytes.length !== want) throw new ImageCorruptError(`${source.name}: short read at offset ${offset + done} (${bytes.length} of ${want} bytes)`);
    yield bytes;
    done += want;
  }
}

/**
 * Writes `chunk` at `at`, leaving 64 KiB blocks of zeros as holes; returns the bytes of
 * filesystem blocks it wrote (each piece rounded up to `blockSize`: an upper bound of what it
 * allocates). A piece that would take more than `budget` is not written: `refuse()` is thrown.
 */
async function writeSparse(handle: Awaited<ReturnType<typeof open>>, chunk: Buffer, at: number, blockSize: number, budget: number, refuse: () => Error): Promise<number> {
  let p = 0;
  let allocated = 0;
  while (p < chunk.length) {
    const blockEnd = Math.min(chunk.length, p + SPARSE_BLOCK - ((at + p) % SPARSE_BLOCK));
    const piece = chunk.subarray(p, blockEnd);
    if (!piece.equals(ZEROS.subarray(0, piece.length))) {
      // Pieces start on 64 KiB boundaries or run on from the previous chunk's piece of the same block.
      const first = Math.floor((at + p) / blockSize);
      const last = Math.floor((at + blockEnd - 1) / blockSize);
      const cost = (last - first + 1) * blockSize;
      if (allocated + cost > budget) throw refuse();
      allocated += cost;
      for (let w = 0; w < piece.length; ) {
        const { bytesWritten } = await handle.write(piece, w, piece.length - w, at + p + w);
        w += bytesWritten;
      }
    }
    p = blockEnd;
  }
  return allocated;
}

function asCorrupt(err: unknown, what: string, codec: StageRequest['codec']): unknown {
  const e = err as { code?: unknown; message?: unknown; name?: unknown };
  if (e.name === 'AbortError' && !(err instanceof AbortedError)) return new AbortedError();
  if (typeof e.code === 'string' && e.code.startsWith('Z_')) {
    return new ImageCorruptError(`${what}: the ${codec === 'gzip' ? 'gzip' : 'deflate'} stream is truncated or corrupt (${String(e.message)})`);
  }
  return err;
}

const TABLE = ((): Uint32Array => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (zip's, ISO 3309): node:zlib's where it has one (Node >= 20.15), a table otherwise. */
export function crc32(data: Uint8Array, previous = 0): number {
  const native = (zlib as { crc32?: (d: Uint8Array, v?: number) => number }).crc32;
  if (native) return native(data, previous);
  let c = ~previous >>> 0;
  for (const b of data) c = (TABLE[(c ^ b) & 0xff] as number) ^ (c >>> 8);
  return ~c >>> 0;
}
