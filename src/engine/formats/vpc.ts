/**
 * VHD (qemu's `vpc`), as qemu 7.2 reads it (block/vpc.c), from the Virtual Hard
 * Disk Image Format Specification: a 512-byte big-endian footer ("conectix") at the
 * end of the file, and for dynamic disks a copy of it at offset 0, a dynamic disk
 * header ("cxsparse") and a Block Allocation Table of u32 sector numbers, each
 * pointing at a sector bitmap followed by the block's data.
 *
 * What qemu does, and so do we:
 * - A footer at offset 0 makes the image dynamic; a footer only at the end makes it
 *   fixed. qemu probes only offset 0, so a fixed VHD probes as raw (as in `qemu-img
 *   info`) and is read as a VHD only when declared (`-f vpc`).
 * - The footer checksum must be right ("Incorrect header checksum").
 * - The virtual size comes from the CHS geometry, except for creator apps that use
 *   the footer's current size ('win ', 'qem2', 'd2v ', 'CTXS', 'tap\0') and for the
 *   maximum geometry 65535x16x255 (iotest 146).
 * - Sector bitmaps are not consulted: an allocated block is read whole, as qemu does.
 * Beyond qemu: a BAT entry whose block overlaps the footer copy, the dynamic header
 * or the BAT, and data past the end of the file, are refused instead of read.
 * Differencing disks (type 4) are refused: their parent is another file.
 */
import { FormatMismatchError, ImageCorruptError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../errors.js';
import { ascii } from '../bytes.js';
import { enforceLimit, toSafeNumber } from '../limits.js';
import { readExact, type RandomAccessSource } from '../source.js';
import { mapFileRanges } from './raw.js';
import type { DiskImage, FormatDriver, FormatInfo, MapEntry, OpenOptions } from '../types.js';

const FOOTER_BYTES = 512;
const DYN_HEADER_BYTES = 1024;
/** qemu reads the first sector of the dynamic header; every field we use lies there. */
const DYN_HEADER_READ = 512;
const SECTOR = 512;
const COOKIE = 'conectix';
const DYN_COOKIE = 'cxsparse';
const TYPE_FIXED = 2;
const TYPE_DYNAMIC = 3;
const TYPE_DIFFERENCING = 4;
const UNALLOCATED = 0xffffffff;
/** qemu's VHD_MAX_SECTORS (2040 GiB) and VHD_MAX_GEOMETRY (65535 x 16 x 255). */
export const VHD_MAX_SECTORS = 0xff000000;
export const VHD_MAX_GEOMETRY = 65535 * 16 * 255;
/** Creator apps whose disks take their size from the footer's current size (qemu's table). */
const CURRENT_SIZE_CREATORS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

/** Footer fields (big-endian), VHD specification "Hard Disk Footer Format". */
const F = {
  cookie: 0,
  dataOffset: 16,
  creatorApp: 28,
  currentSize: 48,
  cylinders: 56,
  heads: 58,
  sectorsPerTrack: 59,
  diskType: 60,
  checksum: 64,
} as const;
/** Dynamic disk header fields (big-endian), "Dynamic Disk Header Format". */
const D = { cookie: 0, tableOffset: 16, maxTableEntries: 28, blockSize: 32 } as const;

const hex = (n: number): string => `0x${n.toString(16)}`;

/** One's complement of the byte sum, the checksum field itself taken as zero. */
export function vhdChecksum(footer: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < FOOTER_BYTES; i++) if (i < F.checksum || i >= F.checksum + 4) sum += footer[i] as number;
  return ~sum >>> 0;
}

export interface VhdFooter {
  diskType: number;
  dataOffset: bigint;
  creatorApp: string;
  currentSize: bigint;
  /** Virtual size in bytes, by qemu's rules. */
  virtualSize: number;
}

/** Validates a footer (cookie and checksum) and derives the virtual size as qemu does. */
export function parseVhdFooter(bytes: Uint8Array, name: string): VhdFooter {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (ascii(bytes, F.cookie, 8) !== COOKIE) throw new FormatMismatchError(`${name}: not a VHD image (no "${COOKIE}" footer)`);
  const stored = view.getUint32(F.checksum);
  const computed = vhdChecksum(bytes);
  if (stored !== computed) {
    throw new ImageCorruptError(`${name}: incorrect VHD footer checksum ${hex(stored)} (computed ${hex(computed)}); qemu-img refuses it too ("Incorrect header checksum")`);
  }
  const creatorApp = ascii(bytes, F.creatorApp, 4);
  const currentSize = view.getBigUint64(F.currentSize);
  const chsSectors = view.getUint16(F.cylinders) * (bytes[F.heads] as number) * (bytes[F.sectorsPerTrack] as number);
  const useChs = !CURRENT_SIZE_CREATORS.includes(creatorApp);
  let sectors = chsSectors;
  if (!useChs || chsSectors === VHD_MAX_GEOMETRY) {
    const s = currentSize / BigInt(SECTOR);
    if (s > BigInt(VHD_MAX_SECTORS)) {
      throw new UnsupportedFeatureError(`${name}: VHD current size ${currentSize} exceeds the format's maximum of 2040 GiB (qemu refuses it too)`);
    }
    sectors = Number(s);
  }
  if (sectors > VHD_MAX_SECTORS) {
    throw new UnsupportedFeatureError(`${name}: VHD size ${sectors} sectors exceeds the format's maximum of 2040 GiB (qemu refuses it too)`);
  }
  return { diskType: view.getUint32(F.diskType), dataOffset: view.getBigUint64(F.dataOffset), creatorApp, currentSize, virtualSize: sectors * SECTOR };
}

export function isVhdFooter(bytes: Uint8Array | undefined): boolean {
  return bytes !== undefined && ascii(bytes, 0, 8) === COOKIE;
}

function differencing(name: string): UnsafeImageError {
  return new UnsafeImageError(
    `${name}: differencing VHD (disk type 4): its unallocated blocks live in a parent image, which is never opened; a bundle with the parent is not yet supported`,
  );
}

export const vpcDriver: FormatDriver = {
  id: 'vpc',
  probe(head: Uint8Array): boolean {
    return ascii(head, 0, 8) === COOKIE;
  },

  async open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> {
    const { limits, signal } = options;
    const name = source.name;
    if (source.size < FOOTER_BYTES) throw new FormatMismatchError(`${name}: not a VHD image (${source.size} bytes, too short for a footer)`);
    const head = await readExact(source, 0, FOOTER_BYTES, 'VHD footer copy', signal);
    // As qemu: a footer at 0 means dynamic; otherwise the footer at the end means fixed.
    const dynamic = isVhdFooter(head);
    const footerBytes = dynamic ? head : await readExact(source, source.size - FOOTER_BYTES, FOOTER_BYTES, 'VHD footer', signal);
    const footer = parseVhdFooter(footerBytes, name);
    enforceLimit('maxVirtualSize', footer.virtualSize, limits, `${name}: VHD virtual size`);
    const { virtualSize } = footer;
    if (footer.diskType === TYPE_DIFFERENCING) throw differencing(name);

    if (!dynamic) {
      if (footer.diskType !== TYPE_FIXED) {
        throw new ImageCorruptError(`${name}: VHD footer at the end says disk type ${footer.diskType}, but only a fixed disk (2) has no footer copy at offset 0`);
      }
      const dataEnd = source.size - FOOTER_BYTES;
      if (virtualSize > dataEnd) {
        throw new ImageCorruptError(`${name}: fixed VHD of ${virtualSize} bytes holds only ${dataEnd} bytes of data before its footer; the image is truncated or corrupt`);
      }
      return {
        format: 'vpc',
        virtualSize,
        // The data area is the disk, as a raw file's bytes are: its holes are never read.
        map: (mapSignal?: AbortSignal): AsyncGenerator<MapEntry> => mapFileRanges(source, virtualSize, mapSignal ?? signal),
        // qemu prints no cluster size for a fixed VHD.
        info: (): FormatInfo => ({ dirty: false }),
        close: async () => {},
      };
    }

    if (footer.diskType !== TYPE_DYNAMIC) {
      throw new UnsupportedFeatureError(`${name}: VHD with a footer copy at offset 0 and disk type ${footer.diskType} (only dynamic, 3, has one)`);
    }
    const dataOffset = toSafeNumber(footer.dataOffset, `${name}: VHD dynamic header offset`);
    if (dataOffset < FOOTER_BYTES || dataOffset + DYN_HEADER_READ > source.size) {
      throw new ImageCorruptError(`${name}: VHD dynamic header offset ${hex(dataOffset)} is not within the file (${source.size} bytes) after the footer copy`);
    }
    const dyn = await readExact(source, dataOffset, DYN_HEADER_READ, 'VHD dynamic header', signal);
    if (ascii(dyn, D.cookie, 8) !== DYN_COOKIE) {
      throw new ImageCorruptError(`${name}: VHD dynamic header at ${hex(dataOffset)} has no "${DYN_COOKIE}" cookie (qemu: "Invalid header magic")`);
    }
    const dv = new DataView(dyn.buffer, dyn.byteOffset, dyn.byteLength);
    const blockSize = dv.getUint32(D.blockSize);
    if (blockSize < SECTOR || (blockSize & (blockSize - 1)) !== 0) {
      throw new ImageCorruptError(`${name}: invalid VHD block size ${blockSize} (a power of two of at least 512 bytes)`);
    }
    // qemu's bitmap size: one bit per sector, rounded up to whole sectors.
    const bitmapBytes = (Math.floor(blockSize / (8 * SECTOR)) + 511) & ~511;
    const maxTableEntries = dv.getUint32(D.maxTableEntries);
    if (Math.floor(virtualSize / blockSize) > 0xffffffff) throw new ImageCorruptError(`${name}: too many VHD blocks`);
    if (maxTableEntries * blockSize < virtualSize) {
      throw new ImageCorruptError(`${name}: VHD block table of ${maxTableEntries} entries of ${blockSize} bytes is too small for ${virtualSize} bytes ("Page table too small")`);
    }
    if (maxTableEntries > 0x1fffffff) {
      throw new ImageCorruptError(`${name}: VHD Max Table Entries too large (${maxTableEntries}); qemu-img refuses it too`);
    }
    const batBytes = maxTableEntries * 4;
    enforceLimit('maxTopTableBytes', batBytes, limits, `${name}: VHD block allocation table size`);
    const batOffset = toSafeNumber(dv.getBigUint64(D.tableOffset), `${name}: VHD BAT offset`);
    if (batOffset < FOOTER_BYTES || batOffset + batBytes > source.size) {
      throw new ImageCorruptError(`${name}: VHD BAT at ${hex(batOffset)} (${batBytes} bytes) is not within the file (${source.size} bytes); the image is truncated or corrupt`);
    }
    if (batOffset < dataOffset + DYN_HEADER_BYTES && dataOffset < batOffset + batBytes) {
      throw new ImageCorruptError(`${name}: VHD BAT at ${hex(batOffset)} overlaps the dynamic header at ${hex(dataOffset)}`);
    }
    const batRaw = batBytes > 0 ? await readExact(source, batOffset, batBytes, 'VHD block allocation table', signal) : new Uint8Array(0);
    const bat = new DataView(batRaw.buffer, batRaw.byteOffset, batRaw.byteLength);

    // qemu's truncation check covers every entry, used by the disk or not.
    const blocksInDisk = Math.ceil(virtualSize / blockSize);
    const metadata: Array<[string, number, number]> = [
      ['the footer copy', 0, FOOTER_BYTES],
      ['the dynamic header', dataOffset, DYN_HEADER_BYTES],
      ['the BAT', batOffset, batBytes],
    ];
    for (let i = 0; i < maxTableEntries; i++) {
      if (i % 65536 === 0) throwIfAborted(signal);
      const entry = bat.getUint32(i * 4);
      if (entry === UNALLOCATED) continue;
      const start = entry * SECTOR;
      const end = start + bitmapBytes + blockSize;
      if (end > source.size) {
        throw new ImageCorruptError(
          `${name}: VHD BAT entry ${i} points at sector ${entry}, whose block ends at ${hex(end)}, after the end of the file (${source.size} bytes); the image is truncated or corrupt`,
        );
      }
      if (i >= blocksInDisk) continue;
      for (const [what, mStart, mLength] of metadata) {
        if (start < mStart + mLength && mStart < end) {
          throw new ImageCorruptError(`${name}: VHD block ${i} at ${hex(start)} overlaps ${what} at ${hex(mStart)}`);
        }
      }
    }

    async function* map(mapSignal?: AbortSignal): AsyncGenerator<MapEntry> {
      let run: MapEntry | undefined;
      for (let block = 0; block < blocksInDisk; block++) {
        if (block % 65536 === 0) throwIfAborted(mapSignal ?? signal);
        const offset = block * blockSize;
        const length = Math.min(blockSize, virtualSize - offset);
        const entry = block < maxTableEntries ? bat.getUint32(block * 4) : UNALLOCATED;
        if (entry === UNALLOCATED) {
          if (run?.kind === 'zero') {
            run.length += length;
            continue;
          }
          if (run) yield run;
          run = { kind: 'zero', offset, length };
          continue;
        }
        const fileOffset = entry * SECTOR + bitmapBytes;
        if (run?.kind === 'stored' && run.fileOffset + run.length === fileOffset) {
          run.length += length;
          continue;
        }
        if (run) yield run;
        run = { kind: 'stored', offset, length, fileOffset };
      }
      if (run) yield run;
    }

    return {
      format: 'vpc',
      virtualSize,
      map,
      info: (): FormatInfo => ({ clusterSize: blockSize, dirty: false }),
      close: async () => {},
    };
  },
};
