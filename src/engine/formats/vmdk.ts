/**
 * VMDK: hosted sparse extents ("KDMV", createType monolithicSparse) and
 * stream-optimized images, read as VMware's "Virtual Disk Format 5.0" describes
 * them and as qemu 7.2 (block/vmdk.c) reads them.
 *
 * Only single-file images are converted. A descriptor that names other files
 * (flat or split extents, VMFS, a parent disk) is refused: no path found in an
 * image is ever opened or stat'ed.
 */
import { FormatMismatchError, ImageCorruptError, UnsafeImageError, UnsupportedFeatureError, isDiskconvError, throwIfAborted } from '../errors.js';
import { enforceLimit, toSafeNumber, type Limits } from '../limits.js';
import { Pacer } from '../pace.js';
import { readExact, type RandomAccessSource } from '../source.js';
import type { CheckReport, DiskImage, FormatDriver, FormatInfo, LayerEntry, MapEntry, OpenOptions, ParentLink } from '../types.js';
import { isArriving, walkMarkers, type MarkerWalkLayout } from './vmdk-markers.js';
import { isVmdk, looksLikeDescriptorFile } from './signatures.js';

const SECTOR = 512;
const SPARSE_MAGIC = 0x4b444d56; // "KDMV"
const VMFS_SPARSE_MAGIC = 0x434f5744; // "COWD" (ESX 2.x vmfsSparse)
const GD_AT_END = 0xffffffffffffffffn;

const FLAG_REDUNDANT_GD = 1 << 1;
const FLAG_ZEROED_GRAIN = 1 << 2;
const FLAG_MARKERS = 1 << 17;
const COMPRESSION_NONE = 0;
const COMPRESSION_DEFLATE = 1;

const MARKER_END_OF_STREAM = 0;
const MARKER_FOOTER = 3;
/** A grain marker: u64 lba, u32 compressed size, then the zlib stream. */
const GRAIN_MARKER_BYTES = 12;

/** qemu refuses grains over 0x200000 sectors (1 GiB) and grain tables over 512 entries. */
const MAX_GRAIN_SECTORS = 0x200000n;
const MAX_GTES_PER_GT = 512;
/** A compressed grain is decoded whole in memory; VMware and qemu write 64 KiB grains. */
const MAX_COMPRESSED_GRAIN_BYTES = 2 * 2 ** 20;
/** Upper bound of one merged 'stored' entry, so the map keeps flowing on huge contiguous disks. */
const MAX_MERGED_STORED_BYTES = 64 * 2 ** 20;
/** Largest single read of contiguous grain tables. */
const MAX_TABLE_RUN_BYTES = 2 ** 20;
/** Findings listed by check(); the count keeps going past it. */
const MAX_CHECK_MESSAGES = 100;

/** Extent types whose data lives in another file (or device) than the descriptor's. */
const EXTERNAL_CREATE_TYPES = new Set([
  'monolithicFlat',
  'twoGbMaxExtentSparse',
  'twoGbMaxExtentFlat',
  'vmfs',
  'vmfsSparse',
  'vmfsThin',
  'vmfsPreallocated',
  'vmfsEagerZeroedThick',
  'vmfsRaw',
  'vmfsRDM',
  'vmfsRDMP',
  'seSparse',
  'vsanSparse',
  'fullDevice',
  'partitionedDevice',
  'custom',
]);
const SINGLE_FILE_CREATE_TYPES = new Set(['monolithicSparse', 'streamOptimized']);

interface SparseHeader {
  version: number;
  flags: number;
  /** All sizes and offsets are in sectors, as on disk. */
  capacity: bigint;
  grainSize: bigint;
  descriptorOffset: bigint;
  descriptorSize: bigint;
  numGTEsPerGT: number;
  rgdOffset: bigint;
  gdOffset: bigint;
  overHead: bigint;
  compressAlgorithm: number;
}

interface ExtentLine {
  lineNumber: number;
  access: string;
  sectors: bigint;
  type: string;
  fileName: string | undefined;
  /** FLAT extents: where the extent's data starts in its file (sectors). */
  offset: bigint;
}

interface Descriptor {
  /** Top-level `key=value` pairs (quotes removed), ddb.* included. */
  values: Map<string, string>;
  extents: ExtentLine[];
  /** Lines that are none of comment, blank, key=value or extent (1-based numbers). */
  badLines: Array<{ lineNumber: number; text: string }>;
  text: string;
}

export const vmdkDriver: FormatDriver = {
  id: 'vmdk',
  probe: isVmdk,
  async open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> {
    const { limits, signal } = options;
    const head = await readExact(source, 0, Math.min(4, source.size), `${source.name}: VMDK magic`, signal);
    const magic = head.length === 4 ? readU32BE(head, 0) : undefined;
    if (magic === SPARSE_MAGIC) return openSparse(source, limits, signal, false, options.backingSupplied === true);
    if (magic === VMFS_SPARSE_MAGIC) {
      throw new UnsupportedFeatureError(`${source.name}: VMFS sparse (COWD) extents from ESX 2.x are not supported`);
    }
    const text = await readExact(source, 0, Math.min(source.size, limits.maxDescriptorBytes), `${source.name}: VMDK descriptor file`, signal);
    if (!looksLikeDescriptorFile(text)) throw new FormatMismatchError(`${source.name}: not a VMDK image (no sparse magic, no descriptor)`);
    return refuseDescriptorFile(source.name, parseDescriptor(decodeText(text)), 'is a VMDK descriptor file');
  },
};

/**
 * Opens one hosted sparse extent of a split VMDK (twoGbMaxExtentSparse): a KDMV
 * file that qemu writes without an embedded descriptor, since the descriptor file
 * is the disk's. Used by src/engine/archive/ for members of the same bundle.
 */
export function openSparseExtent(source: RandomAccessSource, limits: Limits, signal?: AbortSignal, options: { ofChild?: boolean } = {}): Promise<DiskImage> {
  return openSparse(source, limits, signal, true, false, false, options.ofChild === true);
}

/**
 * `layered`: the caller (a bundle holding the parent) resolves a child disk's
 * parentFileNameHint itself; the image then names it in info() and serves
 * layerMap(), while map() still refuses it.
 */
async function openSparse(
  source: RandomAccessSource,
  limits: Limits,
  signal: AbortSignal | undefined,
  asExtent = false,
  layered = false,
  directoryOnly = false,
  /** An extent of a split child disk (its descriptor file names the parent): never-written grains are the parent's. */
  extentOfChild = false,
): Promise<DiskImage> {
  const name = source.name;
  const first = await readExact(source, 0, SECTOR, `${name}: VMDK sparse header`, signal);
  let header = parseSparseHeader(first, `${name}: sparse header`);

  if (header.capacity === 0n && header.descriptorOffset !== 0n && !asExtent) {
    // qemu reads such a file as a descriptor file whose extents are other files.
    const offset = sectorsToBytes(header.descriptorOffset, 'descriptor offset');
    if (offset >= source.size) {
      throw new ImageCorruptError(`${name}: descriptor at offset ${offset} lies beyond the end of the file (${source.size} bytes)`);
    }
    const text = await readExact(source, offset, Math.min(source.size - offset, limits.maxDescriptorBytes), `${name}: VMDK descriptor`, signal);
    return refuseDescriptorFile(name, parseDescriptor(decodeText(text)), 'has a zero-capacity sparse header with a descriptor', true);
  }

  // A compressed streamOptimized image still arriving is walked by its grain markers (vmdk-markers.ts), checked against its directory at the end.
  const walk =
    !directoryOnly && !asExtent && !layered && header.gdOffset === GD_AT_END && isArriving(source) && header.compressAlgorithm === COMPRESSION_DEFLATE && (header.flags & FLAG_MARKERS) !== 0;
  if (header.gdOffset === GD_AT_END && !walk) header = await readFooter(source, header, signal);

  if (header.compressAlgorithm !== COMPRESSION_NONE && header.compressAlgorithm !== COMPRESSION_DEFLATE) {
    throw new UnsupportedFeatureError(`${name}: unknown grain compression algorithm ${header.compressAlgorithm} (only 1, deflate, is defined)`);
  }
  const compressed = header.compressAlgorithm === COMPRESSION_DEFLATE;
  const hasMarkers = (header.flags & FLAG_MARKERS) !== 0;
  if (compressed && !hasMarkers) {
    throw new UnsupportedFeatureError(`${name}: compressed grains without grain markers are not supported`);
  }
  if (header.numGTEsPerGT === 0 || header.numGTEsPerGT > MAX_GTES_PER_GT) {
    throw new ImageCorruptError(`${name}: ${header.numGTEsPerGT} entries per grain table is invalid (1 to ${MAX_GTES_PER_GT})`);
  }
  if (header.grainSize === 0n || header.grainSize > MAX_GRAIN_SECTORS || (header.grainSize & (header.grainSize - 1n)) !== 0n) {
    throw new ImageCorruptError(`${name}: grain size of ${header.grainSize} sectors is invalid (a power of two up to ${MAX_GRAIN_SECTORS})`);
  }
  const grainBytes = Number(header.grainSize) * SECTOR;
  if (compressed && grainBytes > MAX_COMPRESSED_GRAIN_BYTES) {
    throw new UnsupportedFeatureError(`${name}: compressed grains of ${grainBytes} bytes are larger than the ${MAX_COMPRESSED_GRAIN_BYTES} supported`);
  }
  enforceLimit('maxVirtualSize', header.capacity * BigInt(SECTOR), limits, `${name}: VMDK capacity`);
  const virtualSize = Number(header.capacity) * SECTOR;

  const sectorsPerTable = BigInt(header.numGTEsPerGT) * header.grainSize;
  const tableCount = (header.capacity + sectorsPerTable - 1n) / sectorsPerTable;
  // qemu's "L1 size too big": the grain directory is loaded whole, so bound it first.
  enforceLimit('maxTopTableBytes', tableCount * 4n, limits, `${name}: VMDK grain directory size`);
  const grainDirectoryEntries = Number(tableCount);

  // qemu: "File truncated, expecting at least N bytes" when grains would start past the end.
  const fileSectors = Math.ceil(source.size / SECTOR);
  if (header.overHead > BigInt(fileSectors)) {
    throw new ImageCorruptError(
      `${name}: file truncated: the header places grain data at ${header.overHead * BigInt(SECTOR)} bytes but the file has ${source.size} bytes`,
    );
  }

  let cid = 0;
  let parentCid = 0xffffffff;
  let parentHint: string | undefined;
  if (!asExtent) {
    const descriptor = await readEmbeddedDescriptor(source, header, limits, signal);
    ({ cid, parentCid, parentHint } = validateEmbeddedDescriptor(name, descriptor, header.capacity, layered));
  }

  let grainDirectory: Uint32Array = new Uint32Array(0);
  if (grainDirectoryEntries > 0 && !walk) {
    if (header.gdOffset === 0n) throw new ImageCorruptError(`${name}: grain directory offset is 0`);
    const gdOffset = sectorsToBytes(header.gdOffset, 'grain directory offset');
    const gdBytes = await readExact(source, gdOffset, grainDirectoryEntries * 4, `${name}: grain directory (${grainDirectoryEntries} entries)`, signal);
    grainDirectory = decodeU32LE(gdBytes);
    // qemu reads the redundant directory too (and fails where it cannot); one
    // past the end of the file is a truncated or forged image.
    if (header.flags & FLAG_REDUNDANT_GD && header.rgdOffset !== 0n) {
      const rgdOffset = sectorsToBytes(header.rgdOffset, 'redundant grain directory offset');
      if (rgdOffset + grainDirectoryEntries * 4 > source.size) {
        throw new ImageCorruptError(`${name}: redundant grain directory at offset ${rgdOffset} lies beyond the end of the file (${source.size} bytes)`);
      }
    }
  }

  return new VmdkSparseImage(source, limits, {
    virtualSize,
    grainBytes,
    gtes: header.numGTEsPerGT,
    grainDirectory,
    compressed,
    zeroedGrains: (header.flags & FLAG_ZEROED_GRAIN) !== 0,
    cid,
    parentCid,
    ...(parentHint !== undefined ? { parentHint } : {}),
    ...(extentOfChild ? { extentOfChild: true } : {}),
    ...(walk ? { walk: { firstMarker: Number(header.overHead) * SECTOR, openDirectory: () => openSparse(source, limits, signal, false, false, true) } } : {}),
  });
}

function parseSparseHeader(sector: Uint8Array, where: string): SparseHeader {
  // Magic and version first: nothing else means anything without them.
  const magic = readU32BE(sector, 0);
  if (magic !== SPARSE_MAGIC) throw new ImageCorruptError(`${where}: bad magic 0x${magic.toString(16)} (expected "KDMV")`);
  const view = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  const version = view.getUint32(4, true);
  if (version < 1 || version > 3) {
    throw new UnsupportedFeatureError(`${where}: unsupported VMDK sparse header version ${version} (1 to 3 are supported)`);
  }
  return {
    version,
    flags: view.getUint32(8, true),
    capacity: view.getBigUint64(12, true),
    grainSize: view.getBigUint64(20, true),
    descriptorOffset: view.getBigUint64(28, true),
    descriptorSize: view.getBigUint64(36, true),
    numGTEsPerGT: view.getUint32(44, true),
    rgdOffset: view.getBigUint64(48, true),
    gdOffset: view.getBigUint64(56, true),
    overHead: view.getBigUint64(64, true),
    compressAlgorithm: view.getUint16(77, true),
  };
}

/**
 * Stream-optimized images written front to back put the grain directory at the
 * end; the header says GD_AT_END and a copy of it, with the real offsets, sits
 * in the footer: footer marker, footer header, end-of-stream marker, in the last
 * three sectors (qemu reads them at the same place).
 */
async function readFooter(source: RandomAccessSource, header: SparseHeader, signal: AbortSignal | undefined): Promise<SparseHeader> {
  const name = source.name;
  const end = Math.ceil(source.size / SECTOR) * SECTOR;
  if (end < 4 * SECTOR) {
    throw new ImageCorruptError(`${name}: the header says the grain directory is in the footer, but the file (${source.size} bytes) is too small to hold one`);
  }
  const at = end - 3 * SECTOR;
  const bytes = await readExact(source, at, 3 * SECTOR, `${name}: stream footer`, signal);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const footerMarkerOk = view.getUint32(8, true) === 0 && view.getUint32(12, true) === MARKER_FOOTER;
  const eos = 2 * SECTOR;
  const eosOk = view.getBigUint64(eos, true) === 0n && view.getUint32(eos + 8, true) === 0 && view.getUint32(eos + 12, true) === MARKER_END_OF_STREAM;
  if (!footerMarkerOk || !eosOk || readU32BE(bytes, SECTOR) !== SPARSE_MAGIC) {
    throw new ImageCorruptError(`${name}: invalid stream footer at offset ${at} (expected footer marker, header copy and end-of-stream marker)`);
  }
  const footer = parseSparseHeader(bytes.subarray(SECTOR, 2 * SECTOR), `${name}: footer header at offset ${at + SECTOR}`);
  if (footer.version !== header.version) {
    throw new ImageCorruptError(`${name}: footer header version ${footer.version} disagrees with the header's ${header.version}`);
  }
  if (footer.descriptorOffset !== header.descriptorOffset || footer.descriptorSize !== header.descriptorSize) {
    throw new ImageCorruptError(
      `${name}: footer places the descriptor at sector ${footer.descriptorOffset} (${footer.descriptorSize} sectors), the header at sector ${header.descriptorOffset} (${header.descriptorSize} sectors)`,
    );
  }
  if (footer.gdOffset === GD_AT_END) throw new ImageCorruptError(`${name}: the footer header does not locate the grain directory either`);
  return footer;
}

async function readEmbeddedDescriptor(source: RandomAccessSource, header: SparseHeader, limits: Limits, signal: AbortSignal | undefined): Promise<Descriptor> {
  const name = source.name;
  if (header.descriptorOffset === 0n || header.descriptorSize === 0n) {
    throw new ImageCorruptError(`${name}: the sparse extent has no embedded descriptor (offset ${header.descriptorOffset}, ${header.descriptorSize} sectors)`);
  }
  // Hosted sparse extents keep their descriptor right after the header; anywhere
  // else it could overlap grain tables or grains (issue 4's vmdk rule).
  if (header.descriptorOffset !== 1n) {
    throw new ImageCorruptError(`${name}: the embedded descriptor is at sector ${header.descriptorOffset}, not sector 1 where sparse extents keep it`);
  }
  enforceLimit('maxDescriptorBytes', header.descriptorSize * BigInt(SECTOR), limits, `${name}: embedded descriptor size`);
  const offset = sectorsToBytes(header.descriptorOffset, 'descriptor offset');
  const length = Number(header.descriptorSize) * SECTOR;
  // The descriptor area is padded to whole sectors; a file may end within the padding.
  if (offset >= source.size) {
    throw new ImageCorruptError(`${name}: embedded descriptor at offset ${offset} lies beyond the end of the file (${source.size} bytes)`);
  }
  const bytes = await readExact(source, offset, Math.min(length, source.size - offset), `${name}: embedded descriptor`, signal);
  return parseDescriptor(decodeText(bytes));
}

/** Text up to the first NUL, byte for byte (descriptors are ASCII; comments may hold anything). */
function decodeText(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return Buffer.from(bytes.buffer, bytes.byteOffset, nul < 0 ? bytes.length : nul).toString('latin1');
}

const EXTENT_LINE = /^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/;
const KEY_VALUE_LINE = /^\s*([A-Za-z_][A-Za-z0-9_.:-]*)\s*=\s*(.*?)\s*$/;

function parseDescriptor(text: string): Descriptor {
  const values = new Map<string, string>();
  const extents: ExtentLine[] = [];
  const badLines: Array<{ lineNumber: number; text: string }> = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = (lines[i] as string).replace(/\r$/, '');
    const lineNumber = i + 1;
    if (/^\s*$/.test(line) || /^\s*#/.test(line)) continue;
    const extent = EXTENT_LINE.exec(line);
    if (extent) {
      extents.push({
        lineNumber,
        access: extent[1] as string,
        sectors: BigInt(extent[2] as string),
        type: (extent[3] as string).toUpperCase(),
        fileName: extent[4],
        offset: BigInt(extent[5] ?? '0'),
      });
      continue;
    }
    const kv = KEY_VALUE_LINE.exec(line);
    if (kv) {
      let value = kv[2] as string;
      if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1);
      const key = kv[1] as string;
      if (!values.has(key)) values.set(key, value);
      continue;
    }
    badLines.push({ lineNumber, text: line });
  }
  return { values, extents, badLines, text };
}

/** Refuses a descriptor whose extents are other files, saying what it names. */
function refuseDescriptorFile(name: string, descriptor: Descriptor, what: string, zeroCapacity = false): never {
  const createType = descriptor.values.get('createType');
  const files = descriptor.extents.filter((e) => e.fileName !== undefined).map((e) => `${e.type} "${e.fileName}"`);
  const names = files.length > 0 ? `names ${files.length === 1 ? 'extent' : 'extents'} ${files.slice(0, 4).join(', ')}${files.length > 4 ? ', ...' : ''}` : 'names no extent file';
  const kind = createType !== undefined ? `createType "${createType}"` : 'no createType';
  if (zeroCapacity && createType !== undefined && SINGLE_FILE_CREATE_TYPES.has(createType)) {
    // What `qemu-img create -f vmdk x 0` writes; qemu refuses it ("Unsupported image type").
    throw new UnsupportedFeatureError(`${name}: ${what} (${kind}) describes an empty disk, which qemu refuses too`);
  }
  throw new UnsafeImageError(
    `${name}: ${what} (${kind}) that ${names}; images whose data lives in other files are refused, and files named inside an image are never opened (convert a monolithicSparse or streamOptimized VMDK instead)`,
  );
}

/**
 * The safety rules for the descriptor of a single-file image: nothing in it may
 * point at another file or a parent disk.
 */
function validateEmbeddedDescriptor(name: string, descriptor: Descriptor, capacity: bigint, allowParent: boolean): { cid: number; parentCid: number; parentHint?: string } {
  const where = `${name}: embedded descriptor`;
  if (descriptor.values.size === 0 && descriptor.extents.length === 0 && descriptor.badLines.length === 0) {
    throw new ImageCorruptError(`${where} is empty`);
  }
  const bad = descriptor.badLines[0];
  if (bad) {
    throw new ImageCorruptError(`${where} line ${bad.lineNumber} is not a comment, a key=value pair or an extent line: ${JSON.stringify(bad.text.slice(0, 80))}`);
  }
  const createType = descriptor.values.get('createType');
  if (createType === undefined) throw new ImageCorruptError(`${where} has no createType`);
  if (!SINGLE_FILE_CREATE_TYPES.has(createType)) {
    const why = EXTERNAL_CREATE_TYPES.has(createType) ? 'stores its data in other files' : 'is not a known single-file type';
    throw new UnsafeImageError(`${where}: createType "${createType}" ${why}; only monolithicSparse and streamOptimized images are converted`);
  }
  const parentHint = parentFileNameHint(descriptor.text, where);
  if (parentHint !== undefined && !allowParent) {
    throw new UnsafeImageError(
      `${where} names a parent disk (parentFileNameHint="${parentHint.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 120)}"); a child disk is read only from a bundle (tar or zip) that holds its parent, and the named file is never opened`,
    );
  }
  const cidText = descriptor.values.get('CID');
  const parentText = descriptor.values.get('parentCID');
  if (cidText === undefined) throw new ImageCorruptError(`${where} has no CID`);
  if (parentText === undefined) throw new ImageCorruptError(`${where} has no parentCID`);
  const cid = parseCid(cidText, `${where}: CID`);
  const parentCid = parseCid(parentText, `${where}: parentCID`);
  if (parentCid !== 0xffffffff && parentHint === undefined) {
    throw new UnsafeImageError(`${where}: parentCID=${parentText} marks a differencing (child) disk whose data depends on a parent file, but it names none; it is refused`);
  }
  if (descriptor.extents.length === 0) throw new ImageCorruptError(`${where} has no extent line`);
  if (descriptor.extents.length > 1) {
    throw new UnsafeImageError(`${where} lists ${descriptor.extents.length} extents; only a single extent stored in this file is supported`);
  }
  const extent = descriptor.extents[0] as ExtentLine;
  const at = `${where} line ${extent.lineNumber}`;
  if (extent.type !== 'SPARSE') {
    throw new UnsafeImageError(`${at}: extent type ${extent.type}${extent.fileName !== undefined ? ` "${extent.fileName}"` : ''} is not this file's sparse extent; it is refused`);
  }
  if (extent.fileName === undefined) throw new ImageCorruptError(`${at}: SPARSE extent without a file name`);
  if (/[/\\]/.test(extent.fileName)) {
    throw new UnsafeImageError(`${at}: extent file name "${extent.fileName}" is a path; files named inside an image are never opened`);
  }
  if (extent.sectors !== capacity) {
    throw new ImageCorruptError(`${at}: extent of ${extent.sectors} sectors disagrees with the header's capacity of ${capacity} sectors`);
  }
  return { cid, parentCid, ...(parentHint !== undefined ? { parentHint } : {}) };
}

/**
 * The parent's name as qemu finds it (vmdk_parent_open): the first
 * `parentFileNameHint` anywhere in the descriptor text, then `="`, the name, `"`.
 */
function parentFileNameHint(text: string, where: string): string | undefined {
  const at = text.indexOf('parentFileNameHint');
  if (at < 0) return undefined;
  const start = at + 'parentFileNameHint'.length;
  if (text.slice(start, start + 2) !== '="') throw new ImageCorruptError(`${where}: parentFileNameHint is not followed by ="name"`);
  const end = text.indexOf('"', start + 2);
  if (end < 0) throw new ImageCorruptError(`${where}: parentFileNameHint has no closing quote`);
  const name = text.slice(start + 2, end);
  if (name === '') throw new ImageCorruptError(`${where}: parentFileNameHint is empty`);
  return name;
}

/** A 32-bit hex number, as qemu reads it with sscanf("%x"). */
function parseCid(text: string, what: string): number {
  const m = /^\s*(?:0[xX])?([0-9a-fA-F]{1,8})\s*$/.exec(text);
  if (!m) throw new ImageCorruptError(`${what} "${text.slice(0, 40)}" is not a 32-bit hexadecimal number`);
  return parseInt(m[1] as string, 16) >>> 0;
}

interface SparseLayout {
  virtualSize: number;
  grainBytes: number;
  /** Grain table entries per grain table. */
  gtes: number;
  /** Sector offsets of the grain tables; 0 = table not allocated. */
  grainDirectory: Uint32Array;
  compressed: boolean;
  zeroedGrains: boolean;
  cid: number;
  parentCid: number;
  /** A child disk's parent (only when opened layered): unallocated grains are the parent's. */
  parentHint?: string;
  /** An extent of a split child disk: its layerMap() gives never-written grains as 'backing'. */
  extentOfChild?: boolean;
  /** Mapped by walking the grain markers while the bytes arrive (no directory read yet). */
  walk?: Pick<MarkerWalkLayout, 'firstMarker' | 'openDirectory'>;
}

class VmdkSparseImage implements DiskImage {
  readonly format = 'vmdk' as const;
  readonly virtualSize: number;
  private readonly tableBytes: number;
  /** Distance between consecutive grain tables laid out back to back (sector aligned). */
  private readonly tableStride: number;
  private readonly grainCount: number;
  /** Grain tables by sector offset, least recently used first. */
  private readonly tableCache = new Map<number, Uint32Array>();
  private readonly tableCacheLimit: number;

  constructor(
    private readonly source: RandomAccessSource,
    limits: Limits,
    private readonly layout: SparseLayout,
  ) {
    this.virtualSize = layout.virtualSize;
    this.tableBytes = layout.gtes * 4;
    this.tableStride = Math.ceil(this.tableBytes / SECTOR) * SECTOR;
    this.grainCount = Math.ceil(layout.virtualSize / layout.grainBytes);
    this.tableCacheLimit = Math.max(1, Math.floor(limits.tableCacheBytes / this.tableBytes));
  }

  info(): FormatInfo {
    const { grainBytes, compressed, cid, parentCid, parentHint } = this.layout;
    return {
      clusterSize: grainBytes,
      dirty: false,
      // qemu's vmdk_parent_open names the backing format "vmdk" with the parent's name: info prints both.
      ...(parentHint !== undefined ? { backingFilename: parentHint, backingFilenameFormat: 'vmdk' } : {}),
      formatSpecific: {
        type: 'vmdk',
        data: {
          cid,
          'parent-cid': parentCid,
          // qemu names the type from the header's compression, not the descriptor.
          'create-type': compressed ? 'streamOptimized' : 'monolithicSparse',
          extents: [
            {
              ...(compressed ? { compressed: true } : {}),
              'virtual-size': this.virtualSize,
              filename: this.source.name,
              'cluster-size': grainBytes,
              format: '',
            },
          ],
        },
      },
    };
  }

  get parent(): ParentLink | undefined {
    const { parentHint, parentCid } = this.layout;
    if (parentHint === undefined) return undefined;
    return vmdkParentLink(parentHint, parentCid);
  }

  readable(): void {
    if (this.layout.parentHint !== undefined) {
      throw new UnsafeImageError(`${this.source.name}: VMDK child disk of "${this.layout.parentHint}": its data depends on a parent file, which is never opened`);
    }
  }

  map(signal?: AbortSignal): AsyncGenerator<MapEntry> {
    this.readable();
    return this.entries(signal, false) as AsyncGenerator<MapEntry>;
  }

  /** Never-written grains as 'backing' (the parent's data), for a bundle that holds the parent. */
  layerMap(signal?: AbortSignal): AsyncGenerator<LayerEntry> {
    return this.entries(signal, this.layout.parentHint !== undefined || this.layout.extentOfChild === true);
  }

  private async *entries(signal: AbortSignal | undefined, layered: boolean): AsyncGenerator<LayerEntry> {
    const { walk } = this.layout;
    if (walk) {
      yield* walkMarkers(this.source, { ...walk, virtualSize: this.virtualSize, grainBytes: this.layout.grainBytes }, signal);
      return;
    }
    const { grainBytes, gtes, grainDirectory, compressed } = this.layout;
    const size = this.source.size;
    const virtualSize = this.virtualSize;
    let pending: LayerEntry | undefined;
    // Never written: zeros, or the parent's data in a layered child.
    const unwritten = (offset: number, length: number): LayerEntry | undefined => {
      if (layered) {
        if (pending?.kind === 'backing') {
          pending.length += length;
          return undefined;
        }
        const previous = pending;
        pending = { kind: 'backing', offset, length };
        return previous;
      }
      if (pending?.kind === 'zero' && pending.status === undefined) {
        pending.length += length;
        return undefined;
      }
      const previous = pending;
      pending = { kind: 'zero', offset, length };
      return previous;
    };

    // A huge empty image is a long loop over grain tables with no I/O: give the event loop turns.
    const pacer = new Pacer(signal, undefined, 64);
    for (let table = 0; table < grainDirectory.length; table++) {
      throwIfAborted(signal);
      if (pacer.due()) await pacer.yield();
      const firstGrain = table * gtes;
      const grains = Math.min(gtes, this.grainCount - firstGrain);
      const entries = await this.grainTable(table, signal);
      if (!entries) {
        const offset = firstGrain * grainBytes;
        const length = Math.min(grains * grainBytes, virtualSize - offset);
        const done = unwritten(offset, length);
        if (done) yield done;
        continue;
      }
      for (let i = 0; i < grains; i++) {
        const offset = (firstGrain + i) * grainBytes;
        const length = Math.min(grainBytes, virtualSize - offset);
        const sector = entries[i] as number;
        if (!this.isAllocated(sector)) {
          const zeroed = sector !== 0; // a zeroed grain (qemu's VMDK_ZEROED), not a never-written one
          if (!zeroed) {
            const done = unwritten(offset, length);
            if (done) yield done;
          } else if (pending?.kind === 'zero' && (pending.status === 'zeroed') === zeroed) pending.length += length;
          else {
            if (pending) yield pending;
            pending = zeroed ? { kind: 'zero', offset, length, status: 'zeroed' } : { kind: 'zero', offset, length };
          }
          continue;
        }
        const fileOffset = sector * SECTOR;
        const problem = this.grainProblem(fileOffset, length);
        if (problem) throw new ImageCorruptError(`${this.source.name}: ${this.grainWhere(offset, table, i, fileOffset)} ${problem} (${size} bytes)`);
        if (compressed) {
          if (pending) yield pending;
          pending = undefined;
          yield {
            kind: 'compressed',
            offset,
            length,
            fileOffset,
            // qemu accepts compressed data up to two grains long.
            readLength: 2 * grainBytes,
            codec: 'vmdk-grain',
            // The last grain may hold only the bytes inside the disk (qemu) or a whole grain (VMware).
            decodedLength: grainBytes,
            decodedOffset: 0,
          };
          continue;
        }
        if (pending?.kind === 'stored' && pending.fileOffset + pending.length === fileOffset && pending.length + length <= MAX_MERGED_STORED_BYTES) {
          pending.length += length;
        } else {
          if (pending) yield pending;
          pending = { kind: 'stored', offset, length, fileOffset };
        }
      }
    }
    if (pending) yield pending;
  }

  /**
   * qemu's vmdk check: every allocated grain must start inside the file. We also
   * report what convert refuses: grain tables and grain data that end past EOF.
   */
  async check(signal?: AbortSignal): Promise<CheckReport> {
    const { grainBytes, gtes, grainDirectory } = this.layout;
    const report: CheckReport = { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
    const note = (message: string, counter: 'corruptions' | 'checkErrors' = 'corruptions'): void => {
      report[counter]++;
      if (report.messages.length < MAX_CHECK_MESSAGES) report.messages.push(message);
    };
    // A huge empty image is a long loop over grain tables with no I/O: give the event loop turns.
    const pacer = new Pacer(signal, undefined, 64);
    for (let table = 0; table < grainDirectory.length; table++) {
      throwIfAborted(signal);
      if (pacer.due()) await pacer.yield();
      let entries: Uint32Array | null;
      try {
        entries = await this.grainTable(table, signal);
      } catch (err) {
        if (isDiskconvError(err) && err.code === 'ABORTED') throw err;
        note(`ERROR: ${(err as Error).message}`, err instanceof ImageCorruptError ? 'corruptions' : 'checkErrors');
        continue;
      }
      if (!entries) continue;
      const firstGrain = table * gtes;
      const grains = Math.min(gtes, this.grainCount - firstGrain);
      for (let i = 0; i < grains; i++) {
        const sector = entries[i] as number;
        if (!this.isAllocated(sector)) continue;
        const offset = (firstGrain + i) * grainBytes;
        const fileOffset = sector * SECTOR;
        const problem = this.grainProblem(fileOffset, Math.min(grainBytes, this.virtualSize - offset));
        if (problem) note(`ERROR: ${this.grainWhere(offset, table, i, fileOffset)} ${problem}`);
      }
    }
    // qemu's check stops at the first grain past the end and fails ("Check
    // failed", exit 1); a corrupt image fails ours the same way.
    if (report.corruptions > 0 && report.checkErrors === 0) report.checkErrors = 1;
    return report;
  }

  async close(): Promise<void> {
    this.tableCache.clear();
  }

  private isAllocated(sector: number): boolean {
    // 0: never written: zeros, or the parent's data in a child disk read from a bundle.
    // 1 with the zeroed-grain flag: explicitly zeroed.
    return sector !== 0 && !(sector === 1 && this.layout.zeroedGrains);
  }

  private grainProblem(fileOffset: number, length: number): string | undefined {
    const size = this.source.size;
    if (fileOffset >= size) return 'points after the end of the file';
    const needed = this.layout.compressed ? GRAIN_MARKER_BYTES : length;
    if (fileOffset + needed > size) return 'runs past the end of the file';
    return undefined;
  }

  private grainWhere(guestOffset: number, table: number, index: number, fileOffset: number): string {
    return `grain for guest offset ${guestOffset} (grain table ${table}, entry ${index}) at file offset 0x${fileOffset.toString(16)}`;
  }

  /**
   * The grain table for one directory entry, or null when it is not allocated.
   * Tables laid out back to back (as qemu and VMware's hosted sparse format do)
   * are read together, up to MAX_TABLE_RUN_BYTES, and kept in a bounded LRU cache.
   */
  private async grainTable(index: number, signal: AbortSignal | undefined): Promise<Uint32Array | null> {
    const directory = this.layout.grainDirectory;
    const sector = directory[index] as number;
    if (sector === 0) return null;
    const cached = this.tableCache.get(sector);
    if (cached) {
      this.tableCache.delete(sector);
      this.tableCache.set(sector, cached);
      return cached;
    }
    const start = sector * SECTOR;
    if (start + this.tableBytes > this.source.size) {
      throw new ImageCorruptError(
        `${this.source.name}: grain table for grain directory entry ${index} at offset 0x${start.toString(16)} lies beyond the end of the file (${this.source.size} bytes)`,
      );
    }
    const maxTables = Math.max(1, Math.min(this.tableCacheLimit, Math.floor(MAX_TABLE_RUN_BYTES / this.tableStride)));
    let count = 1;
    while (count < maxTables && index + count < directory.length) {
      const next = directory[index + count] as number;
      const nextStart = next * SECTOR;
      if (nextStart !== start + count * this.tableStride || nextStart + this.tableBytes > this.source.size || this.tableCache.has(next)) break;
      count++;
    }
    const length = (count - 1) * this.tableStride + this.tableBytes;
    const bytes = await readExact(this.source, start, length, `${this.source.name}: grain table for grain directory entry ${index}`, signal);
    let wanted: Uint32Array | undefined;
    for (let k = 0; k < count; k++) {
      const rel = k * this.tableStride;
      const table = decodeU32LE(bytes.subarray(rel, rel + this.tableBytes));
      if (k === 0) wanted = table;
      this.remember(sector + (k * this.tableStride) / SECTOR, table);
    }
    return wanted as Uint32Array;
  }

  private remember(sector: number, table: Uint32Array): void {
    this.tableCache.set(sector, table);
    while (this.tableCache.size > this.tableCacheLimit) {
      const oldest = this.tableCache.keys().next().value as number;
      this.tableCache.delete(oldest);
    }
  }
}

function decodeU32LE(bytes: Uint8Array): Uint32Array {
  const out = new Uint32Array(bytes.length >>> 2);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < out.length; i++) out[i] = view.getUint32(i * 4, true);
  return out;
}

function readU32BE(bytes: Uint8Array, offset: number): number {
  return (((bytes[offset] as number) << 24) | ((bytes[offset + 1] as number) << 16) | ((bytes[offset + 2] as number) << 8) | (bytes[offset + 3] as number)) >>> 0;
}


function sectorsToBytes(sectors: bigint, what: string): number {
  return toSafeNumber(sectors * BigInt(SECTOR), what);
}

/** How a VMDK child (monolithic, or a split descriptor file) names its parent. */
export function vmdkParentLink(parentHint: string, parentCid: number): ParentLink {
  return {
    names: [{ name: parentHint, how: 'path', from: 'parentFileNameHint' }],
    // qemu opens a VMDK's parent as a VMDK (and refuses to create one over anything else).
    format: 'vmdk',
    // qemu reads a parent's grains only when the parent is a VMDK whose CID is the child's parentCID (vmdk_is_cid_valid).
    mismatch: (image: DiskImage): string | undefined => {
      if (image.format !== 'vmdk') return `the parent is a ${image.format} image; qemu reads a VMDK child's parent only when it is a VMDK whose CID matches`;
      const cid = image.info().formatSpecific?.data.cid;
      return cid === parentCid ? undefined : `the child's parentCID is ${parentCid.toString(16).padStart(8, '0')} but the parent's CID is ${typeof cid === 'number' ? cid.toString(16).padStart(8, '0') : 'unknown'}; the parent was changed after the child was made (qemu-img refuses to read it too)`;
    },
  };
}

/** One extent line of a descriptor file, for a bundle that holds the file it names. */
export interface VmdkExtentRef {
  lineNumber: number;
  type: 'SPARSE' | 'FLAT' | 'ZERO';
  /** Guest sectors the extent covers. */
  sectors: number;
  fileName?: string;
  /** FLAT: where the data starts in the file (bytes). */
  fileOffset: number;
}

export interface VmdkDescriptorFile {
  createType: string;
  cid: number;
  /** 0xffffffff unless a child. */
  parentCid: number;
  /** A child's parentFileNameHint (only with `allowParent`). */
  parentHint?: string;
  extents: VmdkExtentRef[];
}

/** createTypes whose extents are hosted files a bundle can carry. */
const BUNDLE_CREATE_TYPES = new Set(['monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'monolithicSparse', 'streamOptimized']);

/**
 * A text descriptor file's extents (a split or flat VMDK), validated; undefined
 * when the source is a sparse extent (KDMV) rather than a descriptor. Nothing
 * named is opened: the caller (src/engine/archive/) resolves the names against
 * the members of its bundle, and only those.
 */
export async function readVmdkDescriptorFile(
  source: RandomAccessSource,
  limits: Limits,
  signal?: AbortSignal,
  /** A split child disk is read only from a bundle holding its parent, which the caller resolves among its members. */
  { allowParent = false }: { allowParent?: boolean } = {},
): Promise<VmdkDescriptorFile | undefined> {
  const name = source.name;
  const head = await readExact(source, 0, Math.min(4, source.size), `${name}: VMDK magic`, signal);
  if (head.length === 4 && (readU32BE(head, 0) === SPARSE_MAGIC || readU32BE(head, 0) === VMFS_SPARSE_MAGIC)) return undefined;
  enforceLimit('maxDescriptorBytes', source.size, limits, `${name}: VMDK descriptor file size`);
  const text = await readExact(source, 0, source.size, `${name}: VMDK descriptor file`, signal);
  if (!looksLikeDescriptorFile(text)) throw new FormatMismatchError(`${name}: not a VMDK descriptor`);
  const descriptor = parseDescriptor(decodeText(text));
  const where = `${name}: descriptor`;
  const bad = descriptor.badLines[0];
  if (bad) throw new ImageCorruptError(`${where} line ${bad.lineNumber} is not a comment, a key=value pair or an extent line: ${JSON.stringify(bad.text.slice(0, 80))}`);
  const createType = descriptor.values.get('createType');
  if (createType === undefined) throw new ImageCorruptError(`${where} has no createType`);
  if (!BUNDLE_CREATE_TYPES.has(createType)) {
    throw new UnsupportedFeatureError(`${where}: createType "${createType}" is not supported (monolithicFlat, twoGbMaxExtentSparse and twoGbMaxExtentFlat descriptors are read with their extents)`);
  }
  const parentHint = parentFileNameHint(descriptor.text, where);
  if (parentHint !== undefined && !allowParent) {
    throw new UnsafeImageError(`${where} names a parent disk (parentFileNameHint); differencing (child) VMDKs are refused`);
  }
  const cidText = descriptor.values.get('CID');
  const parentText = descriptor.values.get('parentCID');
  if (cidText === undefined) throw new ImageCorruptError(`${where} has no CID`);
  const parentCid = parentText !== undefined ? parseCid(parentText, `${where}: parentCID`) : 0xffffffff;
  if (parentCid !== 0xffffffff && parentHint === undefined) {
    throw new UnsafeImageError(`${where}: parentCID=${parentText ?? ''} marks a differencing (child) disk whose data depends on a parent file${allowParent ? ', but it names none' : ''}; it is refused`);
  }
  const cid = parseCid(cidText, `${where}: CID`);
  if (descriptor.extents.length === 0) throw new ImageCorruptError(`${where} has no extent line`);
  enforceLimit('maxArchiveMembers', descriptor.extents.length, limits, `${where}: extent lines`);
  let total = 0n;
  const extents = descriptor.extents.map((e): VmdkExtentRef => {
    const at = `${where} line ${e.lineNumber}`;
    if (e.access === 'NOACCESS') throw new UnsupportedFeatureError(`${at}: NOACCESS extents are not supported`);
    if (e.type !== 'SPARSE' && e.type !== 'FLAT' && e.type !== 'ZERO') {
      throw new UnsupportedFeatureError(`${at}: extent type ${e.type} is not supported (SPARSE, FLAT and ZERO extents are)`);
    }
    if (e.type !== 'ZERO' && e.fileName === undefined) throw new ImageCorruptError(`${at}: ${e.type} extent without a file name`);
    if (e.sectors === 0n) throw new ImageCorruptError(`${at}: extent of 0 sectors`);
    total += e.sectors;
    return {
      lineNumber: e.lineNumber,
      type: e.type,
      sectors: toSafeNumber(e.sectors, `${at}: extent size`),
      ...(e.fileName !== undefined ? { fileName: e.fileName } : {}),
      fileOffset: sectorsToBytes(e.offset, `${at}: extent offset`),
    };
  });
  enforceLimit('maxVirtualSize', total * BigInt(SECTOR), limits, `${where}: VMDK capacity`);
  return { createType, cid, parentCid, ...(parentHint !== undefined ? { parentHint } : {}), extents };
}
