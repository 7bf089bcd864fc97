/**
 * VirtualBox VDI (version 1.1), as qemu 7.2 reads it: a 512-byte header, a block
 * map of little-endian u32 entries (one per 1 MiB block), then the data blocks in
 * allocation order. Dynamic images allocate blocks on write; static (fixed) images
 * have every block allocated up front. Differencing images (a parent or link UUID)
 * are refused: their content lives partly in another file we never open.
 */
import { FormatMismatchError, ImageCorruptError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../errors.js';
import { enforceLimit, toSafeNumber, type Limits } from '../limits.js';
import { readExact, type RandomAccessSource } from '../source.js';
import { isVdi } from './signatures.js';
import type { CheckReport, DiskImage, FormatDriver, FormatInfo, MapEntry, OpenOptions } from '../types.js';

const SIGNATURE = 0xbeda107f;
const SIGNATURE_OFFSET = 0x40;
const VERSION_1_1 = 0x00010001;
/** The header struct qemu reads: pre-header (text, signature, version) plus the v1 header, padded to a sector. */
const HEADER_BYTES = 512;
/** Where the v1 header (the part `header_size` measures) starts. */
const V1_HEADER_START = 0x48;
/** sizeof(VDIHEADER1): every field we read lies within it. VirtualBox writes 0x190 (VDIHEADER1PLUS), qemu 0x180. */
const V1_HEADER_MIN = 0x180;
const TYPE_DYNAMIC = 1;
const TYPE_STATIC = 2;
const SECTOR = 512;
/** The only block size qemu accepts. */
const BLOCK_SIZE = 2 ** 20;
/** qemu's VDI_BLOCKS_IN_IMAGE_MAX and VDI_DISK_SIZE_MAX. */
const BLOCKS_IN_IMAGE_MAX = 0x3fffffff;
const DISK_SIZE_MAX = BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE;
/** Block map entries with these values have no data block; qemu reads both as zeros. */
const UNALLOCATED = 0xffffffff;
const DISCARDED = 0xfffffffe;
/** Block map bytes read at once (64 Ki entries, 64 GiB of guest space). */
const BMAP_CHUNK_BYTES = 256 * 1024;

const OFF = {
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  offsetBmap: 0x154,
  offsetData: 0x158,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blockExtra: 0x17c,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
} as const;

export interface VdiHeader {
  imageType: number;
  offsetBmap: number;
  offsetData: number;
  /** disk_size rounded up to whole sectors, as qemu does for VBoxManage's odd sizes. */
  virtualSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
}

const hex = (n: number): string => `0x${n.toString(16)}`;

function isNullUuid(bytes: Uint8Array, offset: number): boolean {
  for (let i = offset; i < offset + 16; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** Parses and validates the header; every later use of a field relies on these checks. */
export function parseVdiHeader(bytes: Uint8Array, fileSize: number, limits: Limits, name: string): VdiHeader {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u32 = (off: number): number => view.getUint32(off, true);

  // Signature and version first: nothing else means anything without them.
  const signature = u32(OFF.signature);
  if (signature !== SIGNATURE) {
    throw new FormatMismatchError(`${name}: not a VDI image (signature ${hex(signature)} at offset ${hex(SIGNATURE_OFFSET)}, expected ${hex(SIGNATURE)})`);
  }
  const version = u32(OFF.version);
  if (version !== VERSION_1_1) {
    throw new UnsupportedFeatureError(`${name}: unsupported VDI version ${version >>> 16}.${version & 0xffff} (only 1.1 is read)`);
  }
  const headerSize = u32(OFF.headerSize);
  if (headerSize < V1_HEADER_MIN) {
    throw new ImageCorruptError(`${name}: VDI header size ${hex(headerSize)} at offset ${hex(OFF.headerSize)} is smaller than the version 1.1 header (${hex(V1_HEADER_MIN)})`);
  }

  // A parent or link UUID makes this a differencing image (a snapshot) whose
  // unallocated blocks come from another file: refused before the
  // remaining fields are judged (link first, as qemu reports it).
  if (!isNullUuid(bytes, OFF.uuidLink)) {
    throw new UnsafeImageError(`${name}: VDI differencing image (non-null link UUID); its parent image is never opened`);
  }
  if (!isNullUuid(bytes, OFF.uuidParent)) {
    throw new UnsafeImageError(`${name}: VDI differencing image (non-null parent UUID); its parent image is never opened`);
  }

  const imageType = u32(OFF.imageType);
  if (imageType !== TYPE_DYNAMIC && imageType !== TYPE_STATIC) {
    throw new UnsupportedFeatureError(`${name}: unsupported VDI image type ${imageType} (only 1 dynamic and 2 static are read)`);
  }
  const sectorSize = u32(OFF.sectorSize);
  if (sectorSize !== SECTOR) {
    throw new UnsupportedFeatureError(`${name}: unsupported VDI sector size ${sectorSize} at offset ${hex(OFF.sectorSize)} (only ${SECTOR})`);
  }
  const blockSize = u32(OFF.blockSize);
  if (blockSize !== BLOCK_SIZE) {
    throw new UnsupportedFeatureError(`${name}: unsupported VDI block size ${blockSize} at offset ${hex(OFF.blockSize)} (only ${BLOCK_SIZE})`);
  }
  // Extra per-block bytes would shift every data block; qemu ignores the field, so we refuse it instead of misreading.
  const blockExtra = u32(OFF.blockExtra);
  if (blockExtra !== 0) {
    throw new UnsupportedFeatureError(`${name}: unsupported VDI block extra data size ${blockExtra} at offset ${hex(OFF.blockExtra)} (only 0)`);
  }

  const rawDiskSize = view.getBigUint64(OFF.diskSize, true);
  enforceLimit('maxVirtualSize', rawDiskSize, limits, `${name}: VDI disk size`);
  const diskSize = toSafeNumber(rawDiskSize, `${name}: VDI disk size`);
  if (diskSize > DISK_SIZE_MAX) {
    throw new UnsupportedFeatureError(`${name}: VDI disk size ${diskSize} exceeds the format's maximum ${DISK_SIZE_MAX}`);
  }
  const virtualSize = Math.ceil(diskSize / SECTOR) * SECTOR;

  const blocksInImage = u32(OFF.blocksInImage);
  const blocksAllocated = u32(OFF.blocksAllocated);
  if (blocksInImage > BLOCKS_IN_IMAGE_MAX) {
    throw new ImageCorruptError(`${name}: VDI block count ${blocksInImage} exceeds the format's maximum ${BLOCKS_IN_IMAGE_MAX}`);
  }
  enforceLimit('maxTopTableBytes', blocksInImage * 4, limits, `${name}: VDI block map size`);
  if (virtualSize > blocksInImage * blockSize) {
    throw new ImageCorruptError(`${name}: VDI disk size ${virtualSize} exceeds what its ${blocksInImage} blocks of ${blockSize} bytes hold`);
  }
  if (blocksAllocated > blocksInImage) {
    throw new ImageCorruptError(`${name}: VDI header claims ${blocksAllocated} allocated blocks but the image has only ${blocksInImage}`);
  }

  const offsetBmap = u32(OFF.offsetBmap);
  const offsetData = u32(OFF.offsetData);
  if (offsetBmap % SECTOR !== 0 || offsetData % SECTOR !== 0) {
    throw new ImageCorruptError(`${name}: VDI block map offset ${hex(offsetBmap)} or data offset ${hex(offsetData)} is not sector aligned`);
  }
  if (offsetBmap < V1_HEADER_START + headerSize) {
    throw new ImageCorruptError(`${name}: VDI block map at offset ${hex(offsetBmap)} overlaps the header (${hex(V1_HEADER_START + headerSize)} bytes)`);
  }
  const bmapEnd = offsetBmap + blocksInImage * 4;
  if (bmapEnd > offsetData) {
    throw new ImageCorruptError(`${name}: VDI block map at offset ${hex(offsetBmap)} (${blocksInImage} entries) overlaps the data area at offset ${hex(offsetData)}`);
  }
  if (bmapEnd > fileSize) {
    throw new ImageCorruptError(
      `${name}: VDI block map at offset ${hex(offsetBmap)} (${blocksInImage * 4} bytes) lies beyond the end of the file (${fileSize} bytes); the image is truncated or corrupt`,
    );
  }
  if (offsetData > fileSize) {
    throw new ImageCorruptError(`${name}: VDI data area at offset ${hex(offsetData)} lies beyond the end of the file (${fileSize} bytes); the image is truncated or corrupt`);
  }

  return { imageType, offsetBmap, offsetData, virtualSize, blockSize, blocksInImage, blocksAllocated };
}

/** Reads block map entries [first, first + count) in bounded chunks. */
async function* bmapChunks(
  source: RandomAccessSource,
  header: VdiHeader,
  count: number,
  signal: AbortSignal | undefined,
): AsyncGenerator<{ first: number; entries: DataView; length: number }> {
  const perChunk = BMAP_CHUNK_BYTES / 4;
  for (let first = 0; first < count; first += perChunk) {
    throwIfAborted(signal);
    const length = Math.min(perChunk, count - first);
    const offset = header.offsetBmap + first * 4;
    const bytes = await readExact(source, offset, length * 4, `VDI block map entries ${first}..${first + length - 1}`, signal);
    yield { first, entries: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), length };
  }
}

export const vdiDriver: FormatDriver = {
  id: 'vdi',
  probe: isVdi,

  async open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> {
    // A header too short to hold the signature is not VDI at all; past that, a short header is a truncated image.
    if (source.size < SIGNATURE_OFFSET + 4) {
      throw new FormatMismatchError(`${source.name}: not a VDI image (${source.size} bytes, too short for the signature)`);
    }
    const signatureBytes = await readExact(source, SIGNATURE_OFFSET, 4, 'VDI signature', options.signal);
    const signature = new DataView(signatureBytes.buffer, signatureBytes.byteOffset, 4).getUint32(0, true);
    if (signature !== SIGNATURE) {
      throw new FormatMismatchError(`${source.name}: not a VDI image (signature ${hex(signature)} at offset ${hex(SIGNATURE_OFFSET)}, expected ${hex(SIGNATURE)})`);
    }
    const headerBytes = await readExact(source, 0, HEADER_BYTES, 'VDI header', options.signal);
    const header = parseVdiHeader(headerBytes, source.size, options.limits, source.name);
    const { blockSize, virtualSize, offsetData, blocksAllocated, blocksInImage } = header;
    const blocksInDisk = Math.ceil(virtualSize / blockSize);

    async function* map(signal?: AbortSignal): AsyncGenerator<MapEntry> {
      // One pending run, extended while blocks stay of one kind (and, for data, contiguous in the file).
      let run: MapEntry | undefined;
      for await (const chunk of bmapChunks(source, header, blocksInDisk, signal ?? options.signal)) {
        for (let i = 0; i < chunk.length; i++) {
          const block = chunk.first + i;
          const entry = chunk.entries.getUint32(i * 4, true);
          const offset = block * blockSize;
          const length = Math.min(blockSize, virtualSize - offset);
          if (entry === UNALLOCATED || entry === DISCARDED) {
            if (run?.kind === 'zero') {
              run.length += length;
              continue;
            }
            if (run) yield run;
            run = { kind: 'zero', offset, length };
            continue;
          }
          if (entry >= blocksAllocated) {
            throw new ImageCorruptError(
              `${source.name}: VDI block map entry ${block} points at data block ${entry}, but only ${blocksAllocated} blocks are allocated`,
            );
          }
          const fileOffset = offsetData + entry * blockSize;
          if (fileOffset + length > source.size) {
            throw new ImageCorruptError(
              `${source.name}: data of VDI block ${block} at offset ${hex(fileOffset)} lies beyond the end of the file (${source.size} bytes); the image is truncated or corrupt`,
            );
          }
          if (run?.kind === 'stored' && run.fileOffset + run.length === fileOffset) {
            run.length += length;
            continue;
          }
          if (run) yield run;
          run = header.imageType === TYPE_STATIC ? { kind: 'stored', offset, length, fileOffset, preallocated: true } : { kind: 'stored', offset, length, fileOffset };
        }
      }
      if (run) yield run;
    }

    async function check(signal?: AbortSignal): Promise<CheckReport> {
      const messages: string[] = [];
      let corruptions = 0;
      let counted = 0;
      // For each data block, the guest block that first referenced it (+1; 0 = none). Bounded by maxTopTableBytes.
      const owner = new Uint32Array(blocksInImage);
      for await (const chunk of bmapChunks(source, header, blocksInImage, signal ?? options.signal)) {
        for (let i = 0; i < chunk.length; i++) {
          const block = chunk.first + i;
          const entry = chunk.entries.getUint32(i * 4, true);
          if (entry === UNALLOCATED || entry === DISCARDED) continue;
          if (entry >= blocksInImage) {
            corruptions++;
            messages.push(`block map entry ${block} points at data block ${entry}, beyond the ${blocksInImage} blocks of the image`);
            continue;
          }
          counted++;
          const first = owner[entry] as number;
          if (first !== 0) {
            corruptions++;
            messages.push(`data block ${entry} is used by block map entries ${first - 1} and ${block}`);
            continue;
          }
          owner[entry] = block + 1;
          // Beyond what qemu checks: convert refuses these, so check reports them too.
          if (entry >= blocksAllocated) {
            corruptions++;
            messages.push(`block map entry ${block} points at data block ${entry}, beyond the ${blocksAllocated} allocated blocks`);
          } else if (block < blocksInDisk) {
            const dataEnd = offsetData + entry * blockSize + Math.min(blockSize, virtualSize - block * blockSize);
            if (dataEnd > source.size) {
              corruptions++;
              messages.push(`data of block map entry ${block} (data block ${entry}) ends at ${hex(dataEnd)}, beyond the end of the file (${source.size} bytes)`);
            }
          }
        }
      }
      if (counted !== blocksAllocated) {
        corruptions++;
        messages.push(`allocated blocks mismatch: the block map references ${counted}, the header says ${blocksAllocated}`);
      }
      return { corruptions, leaks: 0, checkErrors: 0, messages, fields: {} };
    }

    return {
      format: 'vdi',
      virtualSize,
      map,
      info: (): FormatInfo => ({ clusterSize: blockSize, dirty: false }),
      check,
      close: async () => {},
    };
  },
};
