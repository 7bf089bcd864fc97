/**
 * qcow2 (versions 2 and 3), read-only, following qemu 7.2's block/qcow2*.c:
 * header and extension validation, L1/L2 mapping with standard and extended
 * (subcluster) L2 entries, zero clusters, zlib and zstd compressed clusters,
 * internal snapshots, and a refcount-recomputing consistency check.
 *
 * Encrypted images (LUKS in the crypto header extension, legacy AES) open
 * without a key for info and check; with a passphrase their data clusters are
 * mapped with a sector cipher the reader applies (src/engine/crypto/).
 *
 * Refused: backing files and external data files (we never open a file named
 * inside an image), the corrupt bit, unknown incompatible features.
 * The map is built from metadata only; the shared reader reads and decodes data.
 */
import { legacyQcowAesCipher, type SectorCipher } from '../crypto/sector-cipher.js';
import { LUKS_HEADER_BYTES, luksInfoJson, luksRegionEnd, parseLuksHeader, unlockLuks, type LuksHeader } from '../crypto/luks.js';
import { AbortedError, ImageCorruptError, InvalidArgumentError, FormatMismatchError, UnsafeImageError, UnsupportedFeatureError } from '../errors.js';
import { enforceLimit, toSafeNumber, type Limits } from '../limits.js';
import { Pacer } from '../pace.js';
import { isQcow2 } from './signatures.js';
import { readExact, type RandomAccessSource } from '../source.js';
import type {
  CheckReport,
  Codec,
  DiskImage,
  FormatDriver,
  FormatInfo,
  LayerEntry,
  MapEntry,
  OpenOptions,
  QemuSnapshotJson,
  SnapshotSelector,
  ZeroStatus,
} from '../types.js';

const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"
const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 21; // qemu's implementation limit (2 MiB)
const V2_HEADER_LENGTH = 72;
const V3_HEADER_MIN_LENGTH = 104;
const COMPRESSION_TYPE_OFFSET = 104;
const SECTOR = 512;

const INCOMPAT_DIRTY = 1n << 0n;
const INCOMPAT_CORRUPT = 1n << 1n;
const INCOMPAT_DATA_FILE = 1n << 2n;
const INCOMPAT_COMPRESSION = 1n << 3n;
const INCOMPAT_EXTL2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
const AUTOCLEAR_BITMAPS = 1n << 0n;
const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_TABLE = 0x6803f857;
const EXT_BITMAPS = 0x23852875;
const EXT_CRYPTO_HEADER = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

/** QEMU format constants (qcow2.h): tables larger than these are refused by qemu too. */
const QCOW_MAX_REFTABLE_SIZE = 8 * 2 ** 20;
const QCOW_MAX_L1_SIZE = 32 * 2 ** 20;
const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
const SNAPSHOT_HEADER_SIZE = 40;
const QCOW2_MAX_BITMAPS = 65535;
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
const BITMAP_DIR_ENTRY_SIZE = 24;
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_MAX_GRANULARITY_BITS = 31;
const BME_MIN_GRANULARITY_BITS = 9;
const BME_MAX_NAME_SIZE = 1023;
const BME_FLAG_IN_USE = 1;
const BME_FLAG_AUTO = 2;
const BME_RESERVED_FLAGS = 0xfffffffc;
const BACKING_FILE_NAME_MAX = 1023;
const SUBCLUSTERS = 32;

/** check(): table entries visited at most (snapshots can make qemu's walk revisit tables without end). */
const CHECK_WORK_BUDGET = 2 ** 30;
/** check(): host clusters we keep a counter for (2 or 4 bytes each). */
const CHECK_MAX_CLUSTERS = 2 ** 26;
const CHECK_MAX_MESSAGES = 1000;

const hex = (n: number): string => `0x${n.toString(16)}`;

// ---------------------------------------------------------------------------
// Header

interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

interface BitmapInfo {
  name: string;
  flags: number;
  granularityBits: number;
  tableOffset: number;
  tableSize: number;
}

interface BitmapsExtension {
  count: number;
  directorySize: number;
  directoryOffset: number;
}

interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** The header's size field; qemu presents floor(size / 512) * 512. */
  sizeField: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  snapshotCount: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compression: 'zlib' | 'zstd';
  extendedL2: boolean;
  /** 0 none, 1 legacy AES, 2 LUKS. */
  cryptMethod: number;
}

interface CryptoHeaderExtension {
  offset: number;
  length: number;
}

interface Snapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  diskSize: number;
  /** undefined where the entry has no icount field (qemu's -1). */
  icount?: number;
}

function u64(view: DataView, offset: number, what: string): number {
  return toSafeNumber(view.getBigUint64(offset), what);
}

/** Printable, bounded text from image bytes, for messages only. */
function sanitize(bytes: Uint8Array, max = 200): string {
  let s = '';
  for (let i = 0; i < bytes.length && s.length < max; i++) {
    const c = bytes[i] as number;
    s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '?';
  }
  return bytes.length > max ? `${s}...` : s;
}

/** A C string from image bytes (qemu stops at NUL), decoded as UTF-8. */
function cString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return new TextDecoder('utf-8').decode(nul >= 0 ? bytes.subarray(0, nul) : bytes);
}

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Reads a region sequentially in large chunks: snapshot tables and directories are walked entry by entry. */
class SequentialReader {
  private buffer: Uint8Array = new Uint8Array(0);
  private bufferStart = 0;
  constructor(
    private readonly source: RandomAccessSource,
    private readonly what: string,
    private readonly signal?: AbortSignal,
  ) {}

  async bytes(offset: number, length: number): Promise<Uint8Array> {
    const rel = offset - this.bufferStart;
    if (rel >= 0 && rel + length <= this.buffer.length) return this.buffer.subarray(rel, rel + length);
    const chunk = Math.max(length, Math.min(256 * 1024, this.source.size - offset));
    this.buffer = await readExact(this.source, offset, chunk, this.what, this.signal);
    this.bufferStart = offset;
    return this.buffer.subarray(0, length);
  }
}

interface Backing {
  name: string;
  format?: string;
}

async function readHeader(
  source: RandomAccessSource,
  limits: Limits,
  signal?: AbortSignal,
  metadataOnly = false,
): Promise<{ header: Qcow2Header; features: FeatureName[]; bitmapsExt?: BitmapsExtension; cryptoExt?: CryptoHeaderExtension; backing?: Backing }> {
  const fileSize = source.size;
  // Magic and version first: nothing else means anything until they are right.
  const start = viewOf(await readExact(source, 0, 8, 'qcow2 header', signal));
  if (start.getUint32(0) !== QCOW_MAGIC) throw new FormatMismatchError(`${source.name} is not a qcow2 image (bad magic)`);
  const version = start.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedFeatureError(
      version === 1 ? 'qcow version 1 images are not supported (only qcow2 versions 2 and 3)' : `qcow2 version ${version} is not supported (only versions 2 and 3)`,
    );
  }
  const fixed = viewOf(await readExact(source, 0, version === 2 ? V2_HEADER_LENGTH : V3_HEADER_MIN_LENGTH, 'qcow2 header', signal));

  const clusterBits = fixed.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS) throw new ImageCorruptError(`cluster_bits ${clusterBits} is below the minimum of ${MIN_CLUSTER_BITS} (512-byte clusters)`);
  if (clusterBits > MAX_CLUSTER_BITS) {
    throw new UnsupportedFeatureError(`cluster size 2^${clusterBits} is not supported (at most 2^${MAX_CLUSTER_BITS}, as qemu)`);
  }
  const clusterSize = 2 ** clusterBits;

  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    incompatible = fixed.getBigUint64(72);
    compatible = fixed.getBigUint64(80);
    autoclear = fixed.getBigUint64(88);
    refcountOrder = fixed.getUint32(96);
    headerLength = fixed.getUint32(100);
    if (headerLength < V3_HEADER_MIN_LENGTH) throw new ImageCorruptError(`qcow2 header length ${headerLength} is shorter than the version 3 minimum of ${V3_HEADER_MIN_LENGTH}`);
    if (headerLength % 8 !== 0) throw new ImageCorruptError(`qcow2 header length ${headerLength} is not a multiple of 8`);
    if (headerLength > clusterSize) throw new ImageCorruptError(`qcow2 header length ${headerLength} exceeds the cluster size ${clusterSize}`);
  }
  enforceLimit('maxHeaderBytes', headerLength, limits, 'qcow2 header length');

  // Feature bits decide what the rest means, and refusals come before deeper parsing.
  const unknownIncompat = incompatible & ~INCOMPAT_KNOWN;
  if (unknownIncompat !== 0n) {
    const features = await readExtensions(source, headerLength, clusterSize, version, autoclear, 0, limits, signal, true).then(
      (r) => r.features,
      () => [] as FeatureName[],
    );
    const names: string[] = [];
    for (let bit = 0n; bit < 64n; bit++) {
      if (!(unknownIncompat & (1n << bit))) continue;
      const named = features.find((f) => f.type === 0 && BigInt(f.bit) === bit);
      names.push(named ? `${named.name} (bit ${bit})` : `unknown incompatible feature bit ${bit}`);
    }
    throw new UnsupportedFeatureError(`qcow2 image uses unsupported features: ${names.join(', ')}`);
  }
  if (incompatible & INCOMPAT_CORRUPT) {
    throw new ImageCorruptError('qcow2 image is marked corrupt (incompatible feature bit 1); repair it with qemu-img check -r first');
  }
  if (incompatible & INCOMPAT_DATA_FILE) {
    throw new UnsafeImageError('qcow2 image keeps its data in an external data file (incompatible feature bit 2); images that name other files are refused');
  }

  const backingFileOffsetField = fixed.getBigUint64(8);
  let backingName: string | undefined;
  if (backingFileOffsetField !== 0n) {
    // The name is shown (sanitized) only when it lies where qemu would read it; nothing named is ever opened.
    const backingFileOffset = Number(backingFileOffsetField);
    const nameLength = fixed.getUint32(16);
    let shown = '';
    if (nameLength > 0 && nameLength <= BACKING_FILE_NAME_MAX && backingFileOffset + nameLength <= Math.min(fileSize, clusterSize)) {
      const bytes = await readExact(source, backingFileOffset, nameLength, 'backing file name', signal);
      shown = ` "${sanitize(bytes)}"`;
      if (metadataOnly) backingName = sanitize(bytes, BACKING_FILE_NAME_MAX);
    }
    // For info, an image with a readable backing name opens; its data stays refused (readable()).
    if (backingName === undefined) throw new UnsafeImageError(`qcow2 image has a backing file${shown}; images that depend on a backing file are refused (it is never opened)`);
  }

  const cryptMethod = fixed.getUint32(32);
  if (cryptMethod > 2) throw new UnsupportedFeatureError(`unsupported qcow2 encryption method ${cryptMethod}`);

  if (refcountOrder > 6) throw new ImageCorruptError(`refcount_order ${refcountOrder} is too large (refcounts may not exceed 64 bits)`);

  let compression: 'zlib' | 'zstd' = 'zlib';
  if (version === 3 && headerLength > COMPRESSION_TYPE_OFFSET) {
    const type = (await readExact(source, COMPRESSION_TYPE_OFFSET, 1, 'qcow2 compression type', signal))[0] as number;
    if (type > 1) throw new UnsupportedFeatureError(`unknown qcow2 compression type ${type}`);
    compression = type === 1 ? 'zstd' : 'zlib';
  }
  const hasCompressionBit = (incompatible & INCOMPAT_COMPRESSION) !== 0n;
  if (compression === 'zlib' && hasCompressionBit) throw new ImageCorruptError('the compression type feature bit is set but the compression type is zlib');
  if (compression !== 'zlib' && !hasCompressionBit) throw new ImageCorruptError('the compression type is not zlib but the compression type feature bit is not set');

  const extendedL2 = (incompatible & INCOMPAT_EXTL2) !== 0n;
  if (extendedL2 && clusterBits < 14) {
    throw new ImageCorruptError(`extended L2 entries need clusters of at least 16 KiB; this image has ${clusterSize}-byte clusters`);
  }
  if (autoclear & AUTOCLEAR_DATA_FILE_RAW) throw new ImageCorruptError('the raw external data autoclear bit is set without an external data file');

  // Virtual size: the limit first, so an absurd value reads as LIMIT_EXCEEDED.
  const sizeBig = fixed.getBigUint64(24);
  enforceLimit('maxVirtualSize', sizeBig, limits, 'qcow2 virtual size');
  const sizeField = toSafeNumber(sizeBig, 'virtual size');

  const header: Qcow2Header = {
    version,
    clusterBits,
    clusterSize,
    sizeField,
    l1Size: fixed.getUint32(36),
    l1TableOffset: u64(fixed, 40, 'L1 table offset'),
    refcountTableOffset: u64(fixed, 48, 'refcount table offset'),
    refcountTableClusters: fixed.getUint32(56),
    snapshotCount: fixed.getUint32(60),
    snapshotsOffset: u64(fixed, 64, 'snapshot table offset'),
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compression,
    extendedL2,
    cryptMethod,
  };

  const ext = await readExtensions(source, headerLength, clusterSize, version, autoclear, cryptMethod, limits, signal, false);
  const backing = backingName === undefined ? undefined : { name: backingName, ...(ext.backingFormat !== undefined ? { format: ext.backingFormat } : {}) };
  return {
    header,
    features: ext.features,
    ...(ext.bitmaps ? { bitmapsExt: ext.bitmaps } : {}),
    ...(ext.crypto ? { cryptoExt: ext.crypto } : {}),
    ...(backing ? { backing } : {}),
  };
}

/**
 * Header extensions between the header and the end of the first cluster.
 * `lenient` parses only what it can (for naming unknown features).
 */
async function readExtensions(
  source: RandomAccessSource,
  headerLength: number,
  clusterSize: number,
  version: number,
  autoclear: bigint,
  cryptMethod: number,
  limits: Limits,
  signal: AbortSignal | undefined,
  lenient: boolean,
): Promise<{ features: FeatureName[]; bitmaps?: BitmapsExtension; crypto?: CryptoHeaderExtension; backingFormat?: string }> {
  const end = clusterSize;
  const features: FeatureName[] = [];
  let bitmaps: BitmapsExtension | undefined;
  let backingFormat: string | undefined;
  let crypto: CryptoHeaderExtension | undefined;
  let offset = headerLength;
  let consumed = headerLength;
  while (offset < end) {
    if (end - offset < 8) throw new ImageCorruptError(`header extension at offset ${offset} is truncated by the end of the header cluster`);
    const head = viewOf(await readExact(source, offset, 8, `qcow2 header extension at offset ${offset}`, signal));
    const type = head.getUint32(0);
    const length = head.getUint32(4);
    offset += 8;
    if (length > end - offset) {
      throw new ImageCorruptError(`header extension ${hex(type)} at offset ${offset - 8} is ${length} bytes long, past the end of the header cluster`);
    }
    consumed += 8 + length;
    enforceLimit('maxHeaderBytes', consumed, limits, 'qcow2 header and extensions');
    if (type === EXT_END) break;
    switch (type) {
      case EXT_FEATURE_TABLE: {
        const table = await readExact(source, offset, length, 'qcow2 feature name table', signal);
        for (let p = 0; p + 48 <= table.length; p += 48) {
          const field = table.subarray(p + 2, p + 48);
          const nul = field.indexOf(0);
          features.push({ type: table[p] as number, bit: table[p + 1] as number, name: sanitize(nul >= 0 ? field.subarray(0, nul) : field, 46) });
        }
        break;
      }
      case EXT_BITMAPS: {
        if (lenient) break;
        if (length !== 24) throw new ImageCorruptError(`bitmaps extension has length ${length}, expected 24`);
        // Without the autoclear bit the bitmaps are stale and qemu ignores them (v2 has no autoclear bits).
        if (version < 3 || !(autoclear & AUTOCLEAR_BITMAPS)) break;
        const ext = viewOf(await readExact(source, offset, 24, 'bitmaps extension', signal));
        const count = ext.getUint32(0);
        if (ext.getUint32(4) !== 0) throw new ImageCorruptError('bitmaps extension: reserved field is not zero');
        const directorySize = u64(ext, 8, 'bitmap directory size');
        const directoryOffset = u64(ext, 16, 'bitmap directory offset');
        if (count > QCOW2_MAX_BITMAPS) throw new ImageCorruptError(`bitmaps extension lists ${count} bitmaps, more than qemu's maximum of ${QCOW2_MAX_BITMAPS}`);
        if (count === 0) throw new ImageCorruptError('bitmaps extension lists zero bitmaps');
        if (directoryOffset % clusterSize !== 0) throw new ImageCorruptError(`bitmap directory offset ${hex(directoryOffset)} is not cluster aligned`);
        if (directorySize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
          throw new ImageCorruptError(`bitmap directory size ${directorySize} exceeds qemu's maximum of ${QCOW2_MAX_BITMAP_DIRECTORY_SIZE}`);
        }
        bitmaps = { count, directorySize, directoryOffset };
        break;
      }
      case EXT_CRYPTO_HEADER: {
        if (lenient) break;
        if (cryptMethod !== 2) throw new ImageCorruptError('CRYPTO header extension only expected with LUKS encryption method');
        if (length !== 16) throw new ImageCorruptError(`CRYPTO header extension size ${length}, but expected size 16`);
        const ext = viewOf(await readExact(source, offset, 16, 'crypto header extension', signal));
        crypto = { offset: u64(ext, 0, 'crypto header offset'), length: u64(ext, 8, 'crypto header length') };
        if (crypto.offset % clusterSize !== 0) {
          throw new ImageCorruptError(`encryption header offset ${crypto.offset} is not a multiple of cluster size ${clusterSize}`);
        }
        break;
      }
      case EXT_DATA_FILE:
        if (!lenient) throw new UnsafeImageError('qcow2 image names an external data file; images that name other files are refused');
        break;
      case EXT_BACKING_FORMAT:
        // Shown by info only (qemu: at most 16 bytes of a format name).
        if (!lenient && length > 0 && length <= 16) backingFormat = sanitize(await readExact(source, offset, length, 'backing format extension', signal), 16);
        break;
      default:
        break; // unknown extensions may be ignored
    }
    offset += Math.ceil(length / 8) * 8;
  }
  return { features, ...(bitmaps ? { bitmaps } : {}), ...(crypto ? { crypto } : {}), ...(backingFormat !== undefined ? { backingFormat } : {}) };
}

// ---------------------------------------------------------------------------
// Encryption

interface Encryption {
  format: 'aes' | 'luks';
  luks?: LuksHeader;
  region?: CryptoHeaderExtension;
  /** Present once a passphrase opened it. */
  cipher?: SectorCipher;
}

/** The crypto header (LUKS) or legacy AES key; unlocked when a passphrase is given. */
async function openEncryption(
  source: RandomAccessSource,
  header: Qcow2Header,
  cryptoExt: CryptoHeaderExtension | undefined,
  options: OpenOptions,
): Promise<Encryption | undefined> {
  const { passphrase, limits, signal } = options;
  if (header.cryptMethod === 0) return undefined;
  if (header.cryptMethod === 1) {
    return { format: 'aes', ...(passphrase ? { cipher: legacyQcowAesCipher(passphrase) } : {}) };
  }
  if (!cryptoExt) throw new ImageCorruptError('LUKS-encrypted qcow2 image has no crypto header extension');
  const region = cryptoExt;
  if (region.length < LUKS_HEADER_BYTES) throw new ImageCorruptError(`crypto header of ${region.length} bytes is too short for a LUKS header`);
  if (region.offset + region.length > source.size) {
    throw new ImageCorruptError(`crypto header at offset ${hex(region.offset)} (${region.length} bytes) lies beyond the end of the file (${source.size} bytes)`);
  }
  const read = (offset: number, length: number, what: string): Promise<Uint8Array> => {
    if (offset + length > region.length) throw new ImageCorruptError(`${what}: request for data outside of the crypto header (${offset}+${length} > ${region.length})`);
    return readExact(source, region.offset + offset, length, what, signal);
  };
  const luks = parseLuksHeader(await read(0, LUKS_HEADER_BYTES, 'LUKS header'));
  if (luksRegionEnd(luks) > region.length) throw new ImageCorruptError(`LUKS key material extends past the crypto header (${region.length} bytes)`);
  const encryption: Encryption = { format: 'luks', luks, region };
  if (passphrase) encryption.cipher = await unlockLuks(luks, passphrase, read, limits, signal);
  return encryption;
}

// ---------------------------------------------------------------------------
// Snapshots and bitmaps

async function readSnapshots(source: RandomAccessSource, header: Qcow2Header, limits: Limits, virtualSize: number, signal?: AbortSignal): Promise<{ snapshots: Snapshot[]; tableSize: number }> {
  const count = header.snapshotCount;
  enforceLimit('maxSnapshots', count, limits, 'qcow2 snapshot count');
  if (header.snapshotsOffset % header.clusterSize !== 0) {
    throw new ImageCorruptError(`snapshot table offset ${hex(header.snapshotsOffset)} is not cluster aligned`);
  }
  if (count === 0) return { snapshots: [], tableSize: 0 };
  const reader = new SequentialReader(source, 'qcow2 snapshot table', signal);
  const snapshots: Snapshot[] = [];
  let offset = header.snapshotsOffset;
  for (let i = 0; i < count; i++) {
    offset = Math.ceil(offset / 8) * 8;
    const at = offset;
    const h = viewOf(await reader.bytes(offset, SNAPSHOT_HEADER_SIZE));
    const l1TableOffset = u64(h, 0, `snapshot ${i} L1 table offset`);
    const l1Size = h.getUint32(8);
    const idSize = h.getUint16(12);
    const nameSize = h.getUint16(14);
    const dateSec = h.getUint32(16);
    const dateNsec = h.getUint32(20);
    const vmClockNsec = h.getBigUint64(24);
    let vmStateSize = h.getUint32(32);
    const extraSize = h.getUint32(36);
    if (extraSize > QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      throw new ImageCorruptError(`snapshot table entry ${i} at offset ${hex(at)} has ${extraSize} bytes of extra data (qemu allows ${QCOW_MAX_SNAPSHOT_EXTRA_DATA})`);
    }
    offset += SNAPSHOT_HEADER_SIZE;
    const rest = await reader.bytes(offset, extraSize + idSize + nameSize);
    const extra = viewOf(rest.subarray(0, extraSize));
    if (extraSize >= 8) vmStateSize = u64(extra, 0, `snapshot ${i} VM state size`);
    const diskSize = extraSize >= 16 ? u64(extra, 8, `snapshot ${i} disk size`) : virtualSize;
    let icount: number | undefined;
    if (extraSize >= 24) {
      const raw = extra.getBigUint64(16);
      if (raw !== 0xffffffffffffffffn) icount = Number(raw);
    }
    const id = cString(rest.subarray(extraSize, extraSize + idSize));
    const name = cString(rest.subarray(extraSize + idSize, extraSize + idSize + nameSize));
    offset += extraSize + idSize + nameSize;
    enforceLimit('maxSnapshotTableBytes', offset - header.snapshotsOffset, limits, 'qcow2 snapshot table size');
    snapshots.push({
      id,
      name,
      l1TableOffset,
      l1Size,
      dateSec,
      dateNsec,
      vmClockNsec,
      vmStateSize,
      diskSize,
      ...(icount !== undefined ? { icount } : {}),
    });
  }
  return { snapshots, tableSize: offset - header.snapshotsOffset };
}

/** In the key order `qemu-img info --output=json` prints. */
function snapshotJson(s: Snapshot): QemuSnapshotJson {
  return {
    ...(s.icount !== undefined ? { icount: s.icount } : {}),
    'vm-clock-nsec': Number(s.vmClockNsec % 1_000_000_000n),
    name: s.name,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Number(s.vmClockNsec / 1_000_000_000n),
    id: s.id,
    'vm-state-size': s.vmStateSize,
  };
}

/**
 * qemu's lookup: with both id and name it wants an entry matching both, except
 * that a bare `-l X` (given to us as id = name = X) tries the id, then the name
 * (bdrv_snapshot_load_tmp_by_id_or_name).
 */
function findSnapshot(snapshots: Snapshot[], selector: SnapshotSelector): Snapshot {
  const { id, name } = selector;
  let found: Snapshot | undefined;
  if (id !== undefined && name !== undefined) {
    found = id === name ? (snapshots.find((s) => s.id === id) ?? snapshots.find((s) => s.name === name)) : snapshots.find((s) => s.id === id && s.name === name);
  } else if (id !== undefined) {
    found = snapshots.find((s) => s.id === id);
  } else if (name !== undefined) {
    found = snapshots.find((s) => s.name === name);
  } else {
    throw new InvalidArgumentError('a snapshot needs a name or an id');
  }
  if (!found) {
    const what = id !== undefined && name !== undefined && id !== name ? `id '${id}' and name '${name}'` : id !== undefined ? `'${id}'` : `'${name ?? ''}'`;
    throw new InvalidArgumentError(`snapshot ${what} not found (the image has ${snapshots.length} snapshot${snapshots.length === 1 ? '' : 's'})`);
  }
  return found;
}

async function readBitmapDirectory(source: RandomAccessSource, ext: BitmapsExtension, clusterSize: number, virtualSize: number, signal?: AbortSignal): Promise<BitmapInfo[]> {
  if (ext.directorySize === 0) throw new ImageCorruptError('bitmap directory size is zero');
  const dir = await readExact(source, ext.directoryOffset, ext.directorySize, 'bitmap directory', signal);
  const view = viewOf(dir);
  const bitmaps: BitmapInfo[] = [];
  let p = 0;
  while (p < dir.length) {
    if (p + BITMAP_DIR_ENTRY_SIZE > dir.length) throw new ImageCorruptError('bitmap directory is broken (truncated entry)');
    if (bitmaps.length + 1 > ext.count) throw new ImageCorruptError('bitmap directory holds more bitmaps than the bitmaps extension says');
    const tableOffset = u64(view, p, 'bitmap table offset');
    const tableSize = view.getUint32(p + 8);
    const flags = view.getUint32(p + 12);
    const type = view.getUint8(p + 16);
    const granularityBits = view.getUint8(p + 17);
    const nameSize = view.getUint16(p + 18);
    const extraSize = view.getUint32(p + 20);
    const entrySize = Math.ceil((BITMAP_DIR_ENTRY_SIZE + nameSize + extraSize) / 8) * 8;
    if (p + entrySize > dir.length) throw new ImageCorruptError('bitmap directory is broken (entry past its end)');
    if (extraSize !== 0) throw new UnsupportedFeatureError('bitmap extra data is not supported');
    const name = cString(dir.subarray(p + BITMAP_DIR_ENTRY_SIZE, p + BITMAP_DIR_ENTRY_SIZE + nameSize));
    const physBytes = tableSize * clusterSize;
    const bad =
      tableSize === 0 ||
      tableOffset === 0 ||
      tableOffset % clusterSize !== 0 ||
      tableSize > BME_MAX_TABLE_SIZE ||
      granularityBits > BME_MAX_GRANULARITY_BITS ||
      granularityBits < BME_MIN_GRANULARITY_BITS ||
      (flags & BME_RESERVED_FLAGS) !== 0 ||
      nameSize > BME_MAX_NAME_SIZE ||
      type !== 1 ||
      physBytes > BME_MAX_PHYS_SIZE ||
      (!(flags & BME_FLAG_IN_USE) && virtualSize > physBytes * 8 * 2 ** granularityBits);
    if (bad) throw new ImageCorruptError(`bitmap '${sanitize(new TextEncoder().encode(name), 100)}' does not satisfy qcow2's constraints`);
    bitmaps.push({ name, flags, granularityBits, tableOffset, tableSize });
    p += entrySize;
  }
  if (bitmaps.length !== ext.count) throw new ImageCorruptError(`bitmap directory holds ${bitmaps.length} bitmaps, the bitmaps extension says ${ext.count}`);
  return bitmaps;
}

// ---------------------------------------------------------------------------
// L2 tables

/** Least-recently-used cache of L2 tables, bounded by a byte budget. */
class TableCache {
  private readonly tables = new Map<number, DataView>();
  private readonly capacity: number;
  constructor(budgetBytes: number, tableBytes: number) {
    this.capacity = Math.max(1, Math.floor(budgetBytes / tableBytes));
  }
  get(offset: number): DataView | undefined {
    const table = this.tables.get(offset);
    if (table) {
      this.tables.delete(offset);
      this.tables.set(offset, table);
    }
    return table;
  }
  set(offset: number, table: DataView): void {
    this.tables.set(offset, table);
    if (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
  }
  clear(): void {
    this.tables.clear();
  }
}

/** Offset bits 9..55 of an L1/L2 entry, from its two big-endian halves. */
function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
}

// ---------------------------------------------------------------------------
// The image

class Qcow2Image implements DiskImage {
  readonly format = 'qcow2' as const;
  private readonly cache: TableCache;
  private readonly l2EntrySize: number;
  private readonly l2Entries: number;
  private readonly codec: Codec;
  /** Compressed descriptor layout: x = 62 - (cluster_bits - 8). */
  private readonly csizeShift: number;
  private readonly csizeMask: number;

  constructor(
    private readonly source: RandomAccessSource,
    private readonly header: Qcow2Header,
    readonly virtualSize: number,
    /** The L1 table being presented (the active one, or a snapshot's). */
    private readonly l1: DataView,
    private readonly l1Size: number,
    private readonly snapshots: Snapshot[],
    private readonly snapshotTableSize: number,
    private readonly bitmaps: BitmapInfo[] | undefined,
    private readonly bitmapsExt: BitmapsExtension | undefined,
    limits: Limits,
    private readonly encryption?: Encryption,
    /** Set only when opened metadataOnly: the data depends on this file, and is refused. */
    private readonly backing?: Backing,
    /** The caller (a bundle) supplies the backing file: the metadata check needs nothing of it. */
    private readonly backingSupplied = false,
  ) {
    this.l2EntrySize = header.extendedL2 ? 16 : 8;
    this.l2Entries = header.clusterSize / this.l2EntrySize;
    this.cache = new TableCache(limits.tableCacheBytes, header.clusterSize);
    this.codec = header.compression === 'zstd' ? 'zstd' : 'deflate';
    this.csizeShift = 62 - (header.clusterBits - 8);
    this.csizeMask = 2 ** (header.clusterBits - 8) - 1;
  }

  info(): FormatInfo {
    const h = this.header;
    const enc = this.encryption;
    const encrypt = enc ? { encrypt: enc.luks ? luksInfoJson(enc.luks) : { format: 'aes' } } : {};
    let data: Record<string, unknown>;
    if (h.version === 2) {
      data = { compat: '0.10', 'compression-type': h.compression, 'refcount-bits': 2 ** h.refcountOrder, ...encrypt };
    } else {
      data = {
        compat: '1.1',
        'compression-type': h.compression,
        'lazy-refcounts': (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
        ...(this.bitmaps
          ? {
              bitmaps: this.bitmaps.map((b) => ({
                flags: [...(b.flags & BME_FLAG_IN_USE ? ['in-use'] : []), ...(b.flags & BME_FLAG_AUTO ? ['auto'] : [])],
                name: b.name,
                granularity: 2 ** b.granularityBits,
              })),
            }
          : {}),
        'refcount-bits': 2 ** h.refcountOrder,
        ...encrypt,
        corrupt: (h.incompatible & INCOMPAT_CORRUPT) !== 0n,
        'extended-l2': h.extendedL2,
      };
    }
    return {
      clusterSize: h.clusterSize,
      dirty: (h.incompatible & INCOMPAT_DIRTY) !== 0n,
      ...(enc ? { encrypted: true } : {}),
      ...(this.backing ? { backingFilename: this.backing.name } : {}),
      ...(this.backing?.format !== undefined ? { backingFilenameFormat: this.backing.format } : {}),
      ...(this.snapshots.length > 0 ? { snapshots: this.snapshots.map(snapshotJson) } : {}),
      formatSpecific: { type: 'qcow2', data },
    };
  }

  /** The L2 table an L1 entry points to, validated and cached. */
  private async l2Table(l1Index: number, l2Offset: number, signal?: AbortSignal): Promise<DataView> {
    const cached = this.cache.get(l2Offset);
    if (cached) return cached;
    const cs = this.header.clusterSize;
    if (l2Offset % cs !== 0) throw new ImageCorruptError(`L2 table offset ${hex(l2Offset)} for L1 entry ${l1Index} is not aligned to the cluster size`);
    if (l2Offset + cs > this.source.size) {
      throw new ImageCorruptError(`L2 table for L1 entry ${l1Index} at offset ${hex(l2Offset)} lies beyond the end of the file (${this.source.size} bytes)`);
    }
    const table = viewOf(await readExact(this.source, l2Offset, cs, `L2 table for L1 entry ${l1Index}`, signal));
    this.cache.set(l2Offset, table);
    return table;
  }

  readable(): void {
    if (this.backing) {
      throw new UnsafeImageError(`qcow2 image has a backing file "${this.backing.name}"; images that depend on a backing file are refused (it is never opened)`);
    }
  }

  map(signal?: AbortSignal): AsyncGenerator<MapEntry> {
    // Without layering no 'backing' entry is ever made.
    return this.entries(signal, false) as AsyncGenerator<MapEntry>;
  }

  /** The map with the ranges this image does not hold as 'backing' (for a bundle that holds the backing file). */
  layerMap(signal?: AbortSignal): AsyncGenerator<LayerEntry> {
    return this.entries(signal, true);
  }

  /**
   * Unallocated clusters (and subclusters) read as zeros without a backing file;
   * `layered` reports them as 'backing' instead, zero clusters staying zero.
   */
  private async *entries(signal: AbortSignal | undefined, layered: boolean): AsyncGenerator<LayerEntry> {
    if (!layered) this.readable();
    const cs = this.header.clusterSize;
    const fileSize = this.source.size;
    const virtualSize = this.virtualSize;
    const l2Span = this.l2Entries * cs;
    const extended = this.header.extendedL2;
    const subclusterSize = cs / SUBCLUSTERS;
    const enc = this.encryption;
    if (enc && !enc.cipher) {
      throw new UnsupportedFeatureError(
        `encrypted image (qcow2 ${enc.format === 'luks' ? 'LUKS' : 'legacy AES'}): a passphrase is needed to read it (--passphrase-file, or the API's passphrase field)`,
      );
    }
    const cipher = enc?.cipher;
    const ready: LayerEntry[] = [];
    let run: LayerEntry | undefined;

    // Runs of the same kind merge; a zeroed cluster that kept its host cluster
    // (fileOffset) merges only with the next host cluster, as qemu's map shows them.
    const addZero = (offset: number, length: number, status: ZeroStatus = 'unallocated', fileOffset?: number): void => {
      if (
        run?.kind === 'zero' &&
        (run.status ?? 'unallocated') === status &&
        (fileOffset === undefined ? run.fileOffset === undefined : run.fileOffset !== undefined && run.fileOffset + run.length === fileOffset)
      ) {
        run.length += length;
        return;
      }
      if (run) ready.push(run);
      // Literals, not spreads: each of the four has one object shape (primed in reader.ts), so the walk stays optimized.
      if (status === 'unallocated') run = fileOffset === undefined ? { kind: 'zero', offset, length } : { kind: 'zero', offset, length, fileOffset };
      else run = fileOffset === undefined ? { kind: 'zero', offset, length, status } : { kind: 'zero', offset, length, status, fileOffset };
    };
    const addUnallocated = (offset: number, length: number, fileOffset?: number): void => {
      if (!layered) return addZero(offset, length, 'unallocated', fileOffset);
      if (run?.kind === 'backing') {
        run.length += length;
        return;
      }
      if (run) ready.push(run);
      run = { kind: 'backing', offset, length };
    };
    const where = (guest: number, l1Index: number, index: number): string => `for guest offset ${hex(guest)} (L1 index ${l1Index}, L2 index ${index})`;
    const addStored = (offset: number, length: number, fileOffset: number, l1Index: number, index: number): void => {
      if (fileOffset + length > fileSize) {
        throw new ImageCorruptError(
          `data cluster ${where(offset, l1Index, index)} at file offset ${hex(fileOffset)} lies beyond the end of the file (${fileSize} bytes); the image is truncated or corrupt`,
        );
      }
      if (run?.kind === 'stored' && run.fileOffset + run.length === fileOffset) {
        run.length += length;
        return;
      }
      if (run) ready.push(run);
      run = cipher ? { kind: 'stored', offset, length, fileOffset, cipher } : { kind: 'stored', offset, length, fileOffset };
    };

    const addSubclusters = (guest: number, length: number, host: number, zeroBits: number, allocBits: number, l1Index: number, index: number): void => {
      for (let sc = 0; sc < SUBCLUSTERS; sc++) {
        const scStart = sc * subclusterSize;
        if (scStart >= length) break;
        const scLength = Math.min(subclusterSize, length - scStart);
        // Unallocated subclusters read as zeros without a backing file, as the backing's data with one;
        // with a host cluster, zero and unallocated subclusters keep their place in it (qemu's map shows the offset).
        const kept = host === 0 ? undefined : host + scStart;
        if ((allocBits >>> sc) & 1) addStored(guest + scStart, scLength, host + scStart, l1Index, index);
        else if ((zeroBits >>> sc) & 1) addZero(guest + scStart, scLength, 'zeroed', kept);
        else addUnallocated(guest + scStart, scLength, kept);
      }
    };

    // A huge empty image is a long loop over L1 entries with no I/O: give the event loop turns.
    const pacer = new Pacer(signal, undefined, 64);
    for (let guest = 0; guest < virtualSize; ) {
      if (signal?.aborted) throw new AbortedError();
      if (pacer.due()) await pacer.yield();
      const l1Index = Math.floor(guest / l2Span);
      const spanEnd = Math.min(virtualSize, (l1Index + 1) * l2Span);
      let l2Offset = 0;
      if (l1Index < this.l1Size) {
        const hi = this.l1.getUint32(l1Index * 8);
        const lo = this.l1.getUint32(l1Index * 8 + 4);
        l2Offset = entryOffset(hi, lo);
      }
      if (l2Offset === 0) {
        addUnallocated(guest, spanEnd - guest);
        guest = spanEnd;
      } else {
        const table = await this.l2Table(l1Index, l2Offset, signal);
        let index = Math.floor((guest - l1Index * l2Span) / cs);
        for (; guest < spanEnd; index++) {
          const length = Math.min(cs, spanEnd - guest);
          const p = index * this.l2EntrySize;
          const hi = table.getUint32(p);
          const lo = table.getUint32(p + 4);
          if (hi & 0x40000000) {
            // Compressed: offset in bits 0..x-1, additional sectors in bits x..61.
            const hiBits = this.csizeShift - 32;
            const fileOffset = (hi & (2 ** hiBits - 1)) * 2 ** 32 + (lo >>> 0);
            const sectors = ((hi >>> hiBits) & this.csizeMask) + 1;
            const readLength = sectors * SECTOR - (fileOffset % SECTOR);
            if (fileOffset >= fileSize) {
              throw new ImageCorruptError(`compressed cluster ${where(guest, l1Index, index)} at file offset ${hex(fileOffset)} lies beyond the end of the file (${fileSize} bytes)`);
            }
            if (run) ready.push(run);
            run = undefined;
            ready.push({ kind: 'compressed', offset: guest, length, fileOffset, readLength, codec: this.codec, decodedLength: cs, decodedOffset: 0 });
          } else {
            const host = entryOffset(hi, lo);
            if (!extended) {
              if (host % cs !== 0) throw new ImageCorruptError(`cluster offset ${hex(host)} ${where(guest, l1Index, index)} is not aligned to the cluster size`);
              // The zero flag exists from version 3; qemu refuses it in a version 2 image.
              if (lo & 1 && this.header.version < 3) throw new ImageCorruptError(`zero cluster entry ${where(guest, l1Index, index)} in a version 2 image`);
              if (lo & 1) addZero(guest, length, 'zeroed', host === 0 ? undefined : host);
              else if (host === 0) addUnallocated(guest, length);
              else addStored(guest, length, host, l1Index, index);
            } else {
              const zeroBits = table.getUint32(p + 8);
              const allocBits = table.getUint32(p + 12);
              if (host === 0) {
                if (allocBits !== 0) throw new ImageCorruptError(`invalid L2 entry ${where(guest, l1Index, index)}: unallocated cluster with allocated subclusters`);
                if (!layered && zeroBits === 0) addZero(guest, length);
                else if (zeroBits === 0xffffffff) addZero(guest, length, 'zeroed');
                else addSubclusters(guest, length, 0, zeroBits, 0, l1Index, index);
              } else {
                if ((zeroBits & allocBits) !== 0) throw new ImageCorruptError(`invalid L2 entry ${where(guest, l1Index, index)}: subclusters marked both allocated and zero`);
                if (host % cs !== 0) throw new ImageCorruptError(`cluster offset ${hex(host)} ${where(guest, l1Index, index)} is not aligned to the cluster size`);
                if (allocBits === 0xffffffff) addStored(guest, length, host, l1Index, index);
                else if (allocBits === 0 && zeroBits === 0xffffffff) addZero(guest, length, 'zeroed', host);
                else addSubclusters(guest, length, host, zeroBits, allocBits, l1Index, index);
              }
            }
          }
          guest += length;
        }
      }
      if (ready.length > 0) {
        for (const entry of ready) yield entry;
        ready.length = 0;
      }
    }
    if (run) yield run;
  }

  async check(signal?: AbortSignal): Promise<CheckReport> {
    if (!this.backingSupplied) this.readable();
    const bitmaps = this.bitmaps && this.bitmapsExt ? { directory: this.bitmapsExt, bitmaps: this.bitmaps } : undefined;
    return new Qcow2Checker(this.source, this.header, this.virtualSize, this.snapshots, this.snapshotTableSize, bitmaps, signal, this.encryption?.region).run();
  }

  async close(): Promise<void> {
    this.cache.clear();
  }
}

// ---------------------------------------------------------------------------
// check: qemu-img check's refcount recomputation (qcow2_check_refcounts)

class CheckStopped extends Error {}

class Qcow2Checker {
  private readonly report: CheckReport = { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
  private readonly cs: number;
  private readonly fileSize: number;
  private refs: Uint16Array | Uint32Array = new Uint16Array(0);
  private refcountMax = 0;
  /** Clusters covered by the computed refcounts: the file's, grown by references just past its end. */
  private nbClusters = 0;
  private work = 0;
  private allocated = 0;
  private fragmented = 0;
  private compressed = 0;

  constructor(
    private readonly source: RandomAccessSource,
    private readonly h: Qcow2Header,
    private readonly virtualSize: number,
    private readonly snapshots: Snapshot[],
    private readonly snapshotTableSize: number,
    private readonly bitmaps: { directory: BitmapsExtension; bitmaps: BitmapInfo[] } | undefined,
    private readonly signal?: AbortSignal,
    private readonly cryptoRegion?: CryptoHeaderExtension,
  ) {
    this.cs = h.clusterSize;
    this.fileSize = source.size;
  }

  private note(message: string): void {
    if (this.report.messages.length < CHECK_MAX_MESSAGES) this.report.messages.push(message);
    else if (this.report.messages.length === CHECK_MAX_MESSAGES) this.report.messages.push('(further messages omitted)');
  }
  private corruption(message: string): void {
    this.report.corruptions++;
    this.note(message);
  }

  private spend(entries: number): void {
    this.work += entries;
    if (this.work > CHECK_WORK_BUDGET) {
      this.report.checkErrors++;
      this.note(`check stopped: more than ${CHECK_WORK_BUDGET} table entries to visit`);
      throw new CheckStopped();
    }
    if (this.signal?.aborted) throw new AbortedError();
  }

  /** qcow2_inc_refcounts_imrt: counts a reference to every cluster of [offset, offset+size). */
  private inc(offset: number, size: number): void {
    if (size <= 0) return;
    if (offset + size - this.fileSize >= this.cs) {
      this.corruption(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${hex(offset)} size ${hex(size)}`);
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let k = first; k <= last; k++) {
      if (k >= this.nbClusters) this.nbClusters = k + 1;
      const count = this.refs[k] as number;
      if (count >= this.refcountMax) {
        this.corruption(`ERROR: overflow cluster offset=${hex(k * this.cs)}`);
        continue;
      }
      this.refs[k] = count + 1;
    }
  }

  async run(): Promise<CheckReport> {
    const h = this.h;
    const fileClusters = Math.ceil(this.fileSize / this.cs);
    const totalClusters = Math.ceil(this.virtualSize / this.cs);
    if (fileClusters + 2 > CHECK_MAX_CLUSTERS) {
      this.report.checkErrors++;
      this.note(`the file has ${fileClusters} clusters, more than the ${CHECK_MAX_CLUSTERS} a check counts`);
      if (totalClusters > 0) this.report.fields['total-clusters'] = totalClusters;
      return this.report;
    }
    const refcountBits = 2 ** h.refcountOrder;
    // One counter per host cluster of the file, plus the cluster just past its end that qemu tolerates.
    this.refs = refcountBits <= 16 ? new Uint16Array(fileClusters + 2) : new Uint32Array(fileClusters + 2);
    this.refcountMax = Math.min(2 ** refcountBits - 1, refcountBits <= 16 ? 0xffff : 0xffffffff);
    this.nbClusters = fileClusters;
    let completed = false;
    let highest = 0;
    try {
      this.inc(0, this.cs); // header
      await this.checkL1(h.l1TableOffset, h.l1Size, true);
      for (const sn of this.snapshots) {
        if (sn.l1TableOffset % this.cs !== 0) {
          this.corruption(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${hex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
          continue;
        }
        if (sn.l1Size > QCOW_MAX_L1_SIZE / 8) {
          this.corruption(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
          continue;
        }
        await this.checkL1(sn.l1TableOffset, sn.l1Size, false);
      }
      this.inc(h.snapshotsOffset, this.snapshotTableSize);
      this.inc(h.refcountTableOffset, h.refcountTableClusters * this.cs);
      if (this.cryptoRegion) this.inc(this.cryptoRegion.offset, this.cryptoRegion.length);
      await this.checkBitmaps();
      const reftable = await this.checkRefblocks();
      highest = await this.compareRefcounts(reftable, refcountBits);
      await this.checkCopiedFlags(reftable, refcountBits);
      completed = true;
    } catch (err) {
      if (!(err instanceof CheckStopped)) {
        if (err instanceof AbortedError) throw err;
        this.report.checkErrors++;
        this.note(`check failed: ${(err as Error).message}`);
      }
    }
    const fields: Record<string, number> = {};
    // qemu prints each counter only when it is non-zero.
    if (completed) fields['image-end-offset'] = (highest + 1) * this.cs;
    if (totalClusters > 0) fields['total-clusters'] = totalClusters;
    if (this.allocated > 0) fields['allocated-clusters'] = this.allocated;
    if (this.fragmented > 0) fields['fragmented-clusters'] = this.fragmented;
    if (this.compressed > 0) fields['compressed-clusters'] = this.compressed;
    this.report.fields = fields;
    return this.report;
  }

  /** Reads a whole table for the check; ranges past the end of the file are reported and skipped (qemu reads zeros). */
  private async readTable(offset: number, length: number, what: string): Promise<DataView | undefined> {
    if (offset + length > this.fileSize) {
      this.corruption(`ERROR ${what} at offset ${hex(offset)} (${length} bytes) lies beyond the end of the file`);
      return undefined;
    }
    return viewOf(await readExact(this.source, offset, length, what, this.signal));
  }

  private async checkL1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    if (l1Size === 0) return;
    this.inc(l1Offset, l1Size * 8);
    this.spend(l1Size);
    const l1 = await this.readTable(l1Offset, l1Size * 8, active ? 'active L1 table' : 'snapshot L1 table');
    if (!l1) return;
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.getUint32(i * 8);
      const lo = l1.getUint32(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      // L1E_RESERVED_MASK: bits 0..8 and 56..62.
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        this.corruption(`ERROR found L1 entry with reserved bits set: ${hex(hi >>> 0)}${(lo >>> 0).toString(16).padStart(8, '0')}`);
      }
      const l2Offset = entryOffset(hi, lo);
      this.inc(l2Offset, this.cs);
      if (l2Offset % this.cs !== 0) this.corruption(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      await this.checkL2(l2Offset, active);
    }
  }

  private async checkL2(l2Offset: number, active: boolean): Promise<void> {
    const cs = this.cs;
    const extended = this.h.extendedL2;
    const entrySize = extended ? 16 : 8;
    const entries = cs / entrySize;
    this.spend(entries);
    const l2 = await this.readTable(l2Offset, cs, 'L2 table');
    if (!l2) return;
    const csizeShift = 62 - (this.h.clusterBits - 8);
    const hiBits = csizeShift - 32;
    const csizeMask = 2 ** (this.h.clusterBits - 8) - 1;
    let nextContiguous = 0;
    for (let i = 0; i < entries; i++) {
      const p = i * entrySize;
      const hi = l2.getUint32(p);
      const lo = l2.getUint32(p + 4);
      const zeroBits = extended ? l2.getUint32(p + 8) : 0;
      const allocBits = extended ? l2.getUint32(p + 12) : 0;
      const compressed = (hi & 0x40000000) !== 0;
      if (!compressed && ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0)) {
        this.corruption(`ERROR found l2 entry with reserved bits set: ${hex(hi >>> 0)}${(lo >>> 0).toString(16).padStart(8, '0')}`);
      }
      if (compressed) {
        const coffset = (hi & (2 ** hiBits - 1)) * 2 ** 32 + (lo >>> 0);
        if (hi & 0x80000000) this.corruption(`ERROR: coffset=${hex(coffset)}: copied flag must never be set for compressed clusters`);
        if (zeroBits !== 0 || allocBits !== 0) {
          this.corruption(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap`);
          continue;
        }
        const sectors = ((hi >>> hiBits) & csizeMask) + 1;
        this.inc(coffset, sectors * SECTOR - (coffset % SECTOR));
        if (active) {
          this.allocated++;
          this.compressed++;
          this.fragmented++; // compressed clusters are fragmented by nature (qemu)
        }
        continue;
      }
      const offset = entryOffset(hi, lo);
      const zeroFlag = !extended && (lo & 1) !== 0;
      if (offset === 0) {
        // ZERO_PLAIN or UNALLOCATED
        if (extended && allocBits !== 0) this.corruption('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        continue;
      }
      // NORMAL or ZERO_ALLOC
      if ((zeroBits & allocBits) !== 0) this.corruption(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      if (offset % cs !== 0) {
        const containsData = extended ? allocBits !== 0 : !zeroFlag;
        this.corruption(
          containsData
            ? `ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`
            : `ERROR offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
        );
      }
      if (active) {
        this.allocated++;
        if (nextContiguous !== 0 && offset !== nextContiguous) this.fragmented++;
        nextContiguous = offset + cs;
      }
      this.inc(offset, cs);
    }
  }

  private async checkBitmaps(): Promise<void> {
    if (!this.bitmaps) return;
    const { directory, bitmaps } = this.bitmaps;
    this.inc(directory.directoryOffset, directory.directorySize);
    for (const bm of bitmaps) {
      this.inc(bm.tableOffset, bm.tableSize * 8);
      this.spend(bm.tableSize);
      const table = await this.readTable(bm.tableOffset, bm.tableSize * 8, `bitmap table of '${bm.name}'`);
      if (!table) {
        this.report.corruptions++;
        return;
      }
      for (let i = 0; i < bm.tableSize; i++) {
        const hi = table.getUint32(i * 8);
        const lo = table.getUint32(i * 8 + 4);
        const offset = entryOffset(hi, lo);
        // BME_TABLE_ENTRY_RESERVED_MASK: bits 1..8 and 56..63; bit 0 (all ones) only without an offset.
        const bad = (hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0 || (offset !== 0 && ((lo & 1) !== 0 || offset % this.cs !== 0));
        if (bad) {
          this.report.corruptions++;
          continue;
        }
        if (offset !== 0) this.inc(offset, this.cs);
      }
    }
  }

  /** check_refblocks: the refcount blocks themselves; returns the refcount table. */
  private async checkRefblocks(): Promise<DataView> {
    const h = this.h;
    const bytes = h.refcountTableClusters * this.cs;
    this.spend(bytes / 8);
    const reftable = viewOf(await readExact(this.source, h.refcountTableOffset, bytes, 'refcount table', this.signal));
    for (let i = 0; i < bytes / 8; i++) {
      const hi = reftable.getUint32(i * 8);
      const lo = reftable.getUint32(i * 8 + 4);
      if ((lo & 0x1ff) !== 0) {
        this.corruption(`ERROR refcount table entry ${i} has reserved bits set`);
        continue;
      }
      const offset = hi * 2 ** 32 + (lo >>> 0);
      if (offset % this.cs !== 0) {
        this.corruption(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        continue;
      }
      const cluster = Math.floor(offset / this.cs);
      if (cluster >= this.nbClusters) {
        this.corruption(`ERROR refcount block ${i} is outside image`);
        continue;
      }
      if (offset !== 0) {
        this.inc(offset, this.cs);
        const count = this.refs[cluster] as number;
        if (count !== 1) this.corruption(`ERROR refcount block ${i} refcount=${count}`);
      }
    }
    return reftable;
  }

  /** The refcount block for refcount table entry `ti`: its bytes, null when it has none, undefined when unusable. */
  private async refcountBlock(reftable: DataView, ti: number): Promise<DataView | null | undefined> {
    if (ti >= reftable.byteLength / 8) return null;
    const hi = reftable.getUint32(ti * 8);
    const lo = reftable.getUint32(ti * 8 + 4);
    const offset = hi * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
    if (offset === 0) return null;
    if (offset % this.cs !== 0) return undefined;
    // qemu reads a block past the end of the file as zeros; check_refblocks has reported it.
    if (offset + this.cs > this.fileSize) return null;
    return viewOf(await readExact(this.source, offset, this.cs, `refcount block ${ti}`, this.signal));
  }

  /** On-disk refcount at `index` of a refcount block. */
  private static refcountAt(block: DataView, index: number, refcountBits: number): number {
    switch (refcountBits) {
      case 1:
      case 2:
      case 4: {
        const bitPos = index * refcountBits;
        return (block.getUint8(bitPos >>> 3) >> (bitPos & 7)) & (2 ** refcountBits - 1);
      }
      case 8:
        return block.getUint8(index);
      case 16:
        return block.getUint16(index * 2);
      case 32:
        return block.getUint32(index * 4);
      default:
        return block.getUint32(index * 8) * 2 ** 32 + block.getUint32(index * 8 + 4);
    }
  }

  /** Looks up single refcounts, keeping the last block (lookups mostly move forward). */
  private refcountReader(reftable: DataView, refcountBits: number): (cluster: number) => Promise<number | undefined> {
    const perBlock = (this.cs * 8) / refcountBits;
    let blockIndex = -1;
    let block: DataView | null | undefined;
    return async (cluster: number): Promise<number | undefined> => {
      const ti = Math.floor(cluster / perBlock);
      if (ti !== blockIndex) {
        blockIndex = ti;
        block = await this.refcountBlock(reftable, ti);
      }
      if (block === undefined) return undefined;
      if (block === null) return 0;
      return Qcow2Checker.refcountAt(block, cluster % perBlock, refcountBits);
    };
  }

  /** compare_refcounts: on-disk refcounts against the recomputed ones; returns the highest cluster in use. */
  private async compareRefcounts(reftable: DataView, refcountBits: number): Promise<number> {
    const perBlock = (this.cs * 8) / refcountBits;
    let highest = 0;
    this.spend(this.nbClusters);
    for (let first = 0; first < this.nbClusters; first += perBlock) {
      const block = await this.refcountBlock(reftable, first / perBlock);
      const end = Math.min(this.nbClusters, first + perBlock);
      for (let i = first; i < end; i++) {
        if (block === undefined) {
          this.report.checkErrors++;
          this.note(`Can't get refcount for cluster ${i}: refcount block offset is not cluster aligned`);
          continue;
        }
        const onDisk = block === null ? 0 : Qcow2Checker.refcountAt(block, i - first, refcountBits);
        const computed = this.refs[i] as number;
        if (onDisk > 0 || computed > 0) highest = i;
        if (onDisk === computed) continue;
        if (onDisk < computed) {
          this.report.corruptions++;
          this.note(`ERROR cluster ${i} refcount=${onDisk} reference=${computed}`);
        } else {
          this.report.leaks++;
          this.note(`Leaked cluster ${i} refcount=${onDisk} reference=${computed}`);
        }
      }
    }
    return highest;
  }

  /** check_oflag_copied: bit 63 of active L1/L2 entries must say "refcount is exactly one". */
  private async checkCopiedFlags(reftable: DataView, refcountBits: number): Promise<void> {
    const h = this.h;
    if (h.l1Size === 0 || h.l1TableOffset + h.l1Size * 8 > this.fileSize) return;
    const refcountOf = this.refcountReader(reftable, refcountBits);
    // The reader caches one block for sequential use; lookups here jump around, which is only slower.
    const l1 = viewOf(await readExact(this.source, h.l1TableOffset, h.l1Size * 8, 'active L1 table', this.signal));
    const entrySize = h.extendedL2 ? 16 : 8;
    for (let i = 0; i < h.l1Size; i++) {
      const hi = l1.getUint32(i * 8);
      const lo = l1.getUint32(i * 8 + 4);
      const l2Offset = entryOffset(hi, lo);
      if (l2Offset === 0) continue;
      const l2Refcount = await refcountOf(Math.floor(l2Offset / this.cs));
      if (l2Refcount !== undefined && (l2Refcount === 1) !== ((hi & 0x80000000) !== 0)) {
        this.corruption(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(hi >>> 0)}${(lo >>> 0).toString(16).padStart(8, '0')} refcount=${l2Refcount}`);
      }
      if (l2Offset + this.cs > this.fileSize) continue;
      this.spend(this.cs / entrySize);
      const l2 = viewOf(await readExact(this.source, l2Offset, this.cs, 'L2 table', this.signal));
      for (let j = 0; j < this.cs / entrySize; j++) {
        const ehi = l2.getUint32(j * entrySize);
        const elo = l2.getUint32(j * entrySize + 4);
        if (ehi & 0x40000000) continue; // compressed
        const offset = entryOffset(ehi, elo);
        if (offset === 0) continue; // unallocated or zero without allocation
        const refcount = await refcountOf(Math.floor(offset / this.cs));
        if (refcount === undefined) continue;
        if ((refcount === 1) !== ((ehi & 0x80000000) !== 0)) {
          this.corruption(`ERROR OFLAG_COPIED data cluster: l2_entry=${((BigInt(ehi >>> 0) << 32n) | BigInt(elo >>> 0)).toString(16)} refcount=${refcount}`);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Driver

async function readL1(source: RandomAccessSource, offset: number, entries: number, clusterSize: number, limits: Limits, what: string, signal?: AbortSignal): Promise<DataView> {
  enforceLimit('maxTopTableBytes', entries * 8, limits, `${what} size`);
  if (offset % clusterSize !== 0) throw new ImageCorruptError(`${what} offset ${hex(offset)} is not cluster aligned`);
  if (entries === 0) return new DataView(new ArrayBuffer(0));
  if (offset + entries * 8 > source.size) {
    throw new ImageCorruptError(`${what} at offset ${hex(offset)} (${entries} entries) lies beyond the end of the file (${source.size} bytes)`);
  }
  return viewOf(await readExact(source, offset, entries * 8, what, signal));
}

export const qcow2Driver: FormatDriver = {
  id: 'qcow2',
  probe: isQcow2,
  async open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> {
    const { limits, signal } = options;
    const { header, bitmapsExt, cryptoExt, backing } = await readHeader(source, limits, signal, options.metadataOnly === true || options.backingSupplied === true);
    const cs = header.clusterSize;
    const virtualSize = Math.floor(header.sizeField / SECTOR) * SECTOR;

    // L1: bounded, large enough for the disk (qemu: "L1 table is too small"), inside the file.
    enforceLimit('maxTopTableBytes', header.l1Size * 8, limits, 'qcow2 L1 table size');
    const l2Entries = cs / (header.extendedL2 ? 16 : 8);
    const l1Needed = Math.ceil(header.sizeField / (cs * l2Entries));
    if (header.l1Size < l1Needed) {
      throw new ImageCorruptError(`L1 table is too small: ${header.l1Size} entries cannot map a ${header.sizeField}-byte disk (needs ${l1Needed})`);
    }
    const activeL1 = await readL1(source, header.l1TableOffset, header.l1Size, cs, limits, 'L1 table', signal);

    // Refcount table: not needed for reading, but qemu validates it on open.
    if (header.refcountTableClusters === 0) throw new ImageCorruptError('image does not contain a reference count table');
    const reftableBytes = header.refcountTableClusters * cs;
    if (reftableBytes > QCOW_MAX_REFTABLE_SIZE) {
      throw new ImageCorruptError(`refcount table of ${header.refcountTableClusters} clusters exceeds qemu's maximum of ${QCOW_MAX_REFTABLE_SIZE} bytes`);
    }
    if (header.refcountTableOffset % cs !== 0) throw new ImageCorruptError(`refcount table offset ${hex(header.refcountTableOffset)} is not cluster aligned`);
    if (header.refcountTableOffset + reftableBytes > source.size) {
      throw new ImageCorruptError(`refcount table at offset ${hex(header.refcountTableOffset)} (${reftableBytes} bytes) lies beyond the end of the file (${source.size} bytes)`);
    }

    const { snapshots, tableSize } = await readSnapshots(source, header, limits, virtualSize, signal);
    const bitmaps = bitmapsExt ? await readBitmapDirectory(source, bitmapsExt, cs, virtualSize, signal) : undefined;

    // A snapshot replaces the L1 table and keeps the current disk size, as `qemu-img convert -l` does.
    let l1 = activeL1;
    let l1Size = header.l1Size;
    if (options.snapshot) {
      const snapshot = findSnapshot(snapshots, options.snapshot);
      l1 = await readL1(source, snapshot.l1TableOffset, snapshot.l1Size, cs, limits, `L1 table of snapshot ${snapshot.id} (${snapshot.name})`, signal);
      l1Size = snapshot.l1Size;
    }

    const encryption = await openEncryption(source, header, cryptoExt, options);
    const image = new Qcow2Image(source, header, virtualSize, l1, l1Size, snapshots, tableSize, bitmaps, bitmapsExt, limits, encryption, backing, options.backingSupplied === true);
    return image;
  },
};
