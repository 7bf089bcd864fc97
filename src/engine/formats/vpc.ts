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
 *
 * Differencing disks (type 4): qemu 7.2 reads one as a dynamic disk and never
 * opens its parent, so its output lacks the parent's data. We refuse one alone
 * (UNSAFE_IMAGE naming the parent it names); opened with `backingSupplied` (a
 * bundle holding the parent, src/engine/archive/) it names its parent by the
 * dynamic header's parent locators and Unicode name, is verified against the
 * parent's unique id, and maps as the specification reads it: an unallocated
 * block, and every sector whose bit in the block's sector bitmap is clear, are
 * the parent's.
 */
import { FormatMismatchError, ImageCorruptError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../errors.js';
import { ascii } from '../bytes.js';
import { enforceLimit, toSafeNumber } from '../limits.js';
import { readExact, type RandomAccessSource } from '../source.js';
import { mapFileRanges } from './raw.js';
import { layerRuns } from '../layer-runs.js';
import { isVhdFooter, isVpc } from './signatures.js';
import type { DiskImage, FormatDriver, FormatInfo, LayerEntry, MapEntry, OpenOptions, ParentLink } from '../types.js';

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
const D = { cookie: 0, tableOffset: 16, maxTableEntries: 28, blockSize: 32, parentUniqueId: 40, parentTimeStamp: 56, parentUnicodeName: 64, parentLocators: 576 } as const;
/** Footer: the disk's unique id, which a child's dynamic header names its parent by. */
const FOOTER_UNIQUE_ID = 68;
const PARENT_NAME_BYTES = 512;
const LOCATOR_ENTRIES = 8;
const LOCATOR_BYTES = 24;
/** A parent locator's path is at most 32767 UTF-16 units (Windows' longest path). */
const MAX_LOCATOR_BYTES = 65536;
/** Platform codes of parent locators whose data is a path (the spec's table); 'Mac ' (an alias record) is skipped. */
const LOCATOR_CODES: Record<string, 'utf16le' | 'latin1' | 'utf8'> = { W2ru: 'utf16le', W2ku: 'utf16le', Wi2r: 'latin1', Wi2k: 'latin1', MacX: 'utf8' };

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

export { isVhdFooter };

const hexOf = (b: Uint8Array): string => Buffer.from(b).toString('hex');
const shownName = (n: string): string => n.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 200);

/** The names a differencing VHD gives its parent: locator paths (in entry order), then the parent's Unicode name. */
async function readParentNames(source: RandomAccessSource, dyn: Uint8Array, signal?: AbortSignal): Promise<ParentLink['names']> {
  const name = source.name;
  const dv = new DataView(dyn.buffer, dyn.byteOffset, dyn.byteLength);
  const names: ParentLink['names'] = [];
  for (let i = 0; i < LOCATOR_ENTRIES; i++) {
    const at = D.parentLocators + i * LOCATOR_BYTES;
    const code = ascii(dyn, at, 4);
    const encoding = LOCATOR_CODES[code];
    const length = dv.getUint32(at + 8);
    if (!encoding || length === 0) continue;
    const offset = toSafeNumber(dv.getBigUint64(at + 16), `${name}: VHD parent locator ${i} offset`);
    if (length > MAX_LOCATOR_BYTES) throw new ImageCorruptError(`${name}: VHD parent locator ${i} (${code}) is ${length} bytes long (at most ${MAX_LOCATOR_BYTES})`);
    if (offset < FOOTER_BYTES || offset + length > source.size) {
      throw new ImageCorruptError(`${name}: VHD parent locator ${i} (${code}) at ${hex(offset)} (${length} bytes) lies outside the file (${source.size} bytes)`);
    }
    const bytes = await readExact(source, offset, length, `${name}: VHD parent locator ${i}`, signal);
    const text = Buffer.from(bytes).toString(encoding).replace(/\0+$/, '');
    if (text !== '') names.push({ name: text, how: 'locator', from: `${code} locator` });
  }
  // The Unicode name: UTF-16 big-endian, NUL-terminated.
  const raw = dyn.subarray(D.parentUnicodeName, D.parentUnicodeName + PARENT_NAME_BYTES);
  const swapped = Buffer.from(raw);
  swapped.swap16();
  const unicode = swapped.toString('utf16le').split('\0')[0] ?? '';
  if (unicode !== '') names.push({ name: unicode, how: 'locator', from: 'parent Unicode name' });
  return names;
}

export const vpcDriver: FormatDriver = {
  id: 'vpc',
  probe: isVpc,

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
    const identity = hexOf(footerBytes.subarray(FOOTER_UNIQUE_ID, FOOTER_UNIQUE_ID + 16));

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
        info: (): FormatInfo => ({ dirty: false, identity }),
        close: async () => {},
      };
    }

    if (footer.diskType !== TYPE_DYNAMIC && footer.diskType !== TYPE_DIFFERENCING) {
      throw new UnsupportedFeatureError(`${name}: VHD with a footer copy at offset 0 and disk type ${footer.diskType} (only dynamic, 3, and differencing, 4, have one)`);
    }
    const isDifferencing = footer.diskType === TYPE_DIFFERENCING;
    const dataOffset = toSafeNumber(footer.dataOffset, `${name}: VHD dynamic header offset`);
    if (dataOffset < FOOTER_BYTES || dataOffset + DYN_HEADER_READ > source.size) {
      throw new ImageCorruptError(`${name}: VHD dynamic header offset ${hex(dataOffset)} is not within the file (${source.size} bytes) after the footer copy`);
    }
    const dyn = await readExact(source, dataOffset, DYN_HEADER_READ, 'VHD dynamic header', signal);
    if (ascii(dyn, D.cookie, 8) !== DYN_COOKIE) {
      throw new ImageCorruptError(`${name}: VHD dynamic header at ${hex(dataOffset)} has no "${DYN_COOKIE}" cookie (qemu: "Invalid header magic")`);
    }
    const dv = new DataView(dyn.buffer, dyn.byteOffset, dyn.byteLength);
    let parent: ParentLink | undefined;
    if (isDifferencing) {
      // The locators lie in the second half of the header; read it whole.
      if (dataOffset + DYN_HEADER_BYTES > source.size) throw new ImageCorruptError(`${name}: VHD dynamic header at ${hex(dataOffset)} runs past the end of the file`);
      const full = await readExact(source, dataOffset, DYN_HEADER_BYTES, 'VHD dynamic header', signal);
      const names = await readParentNames(source, full, signal);
      const parentId = hexOf(full.subarray(D.parentUniqueId, D.parentUniqueId + 16));
      if (!options.backingSupplied) {
        const named = names.length > 0 ? `naming its parent by ${names.map((n) => `${n.from} "${shownName(n.name)}"`).join(', ')}` : 'that names no parent';
        throw new UnsafeImageError(
          `${name}: differencing VHD (disk type 4) ${named}: its unallocated sectors are the parent's, which is never opened from a path inside the image; convert a tar or zip bundle holding both files (qemu-img reads it without its parent, as zeros)`,
        );
      }
      parent = {
        names,
        format: 'vpc',
        mismatch: (image: DiskImage): string | undefined => {
          if (image.format !== 'vpc') return `the parent is a ${image.format} image, and a differencing VHD's parent is a VHD`;
          const got = image.info().identity;
          return got === parentId ? undefined : `the child names parent unique id ${parentId}, the parent's footer has ${got ?? 'none'}`;
        },
      };
    }
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

    /** A differencing disk's map: sectors whose bitmap bit is clear, and unallocated blocks, are the parent's. */
    async function* layers(mapSignal?: AbortSignal): AsyncGenerator<LayerEntry> {
      const runs = layerRuns();
      for (let block = 0; block < blocksInDisk; block++) {
        throwIfAborted(mapSignal ?? signal);
        const offset = block * blockSize;
        const length = Math.min(blockSize, virtualSize - offset);
        const entry = block < maxTableEntries ? bat.getUint32(block * 4) : UNALLOCATED;
        if (entry === UNALLOCATED) {
          yield* runs.add({ kind: 'backing', offset, length });
          continue;
        }
        const sectors = length / SECTOR;
        const bitmap = await readExact(source, entry * SECTOR, Math.ceil(sectors / 8), `${name}: VHD sector bitmap of block ${block}`, mapSignal ?? signal);
        const data = entry * SECTOR + bitmapBytes;
        for (let s = 0; s < sectors; ) {
          // Bit 7 of byte 0 is the block's first sector (the most significant bit first).
          const present = (((bitmap[s >> 3] as number) >> (7 - (s & 7))) & 1) === 1;
          let e = s + 1;
          while (e < sectors && ((((bitmap[e >> 3] as number) >> (7 - (e & 7))) & 1) === 1) === present) e++;
          const at = offset + s * SECTOR;
          const bytes = (e - s) * SECTOR;
          yield* runs.add(present ? { kind: 'stored', offset: at, length: bytes, fileOffset: data + s * SECTOR } : { kind: 'backing', offset: at, length: bytes });
          s = e;
        }
      }
      yield* runs.end();
    }

    async function* map(mapSignal?: AbortSignal): AsyncGenerator<MapEntry> {
      if (parent) throw new UnsafeImageError(`${name}: differencing VHD: its parent's data is needed, and the parent is never opened`);
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
      ...(parent ? { parent, layerMap: layers } : {}),
      info: (): FormatInfo => ({ clusterSize: blockSize, dirty: false, identity }),
      close: async () => {},
    };
  },
};
