/**
 * VHDX, as qemu 7.2 reads it (block/vhdx.c, block/vhdx-log.c), from the VHDX
 * Format Specification v1.00: the file identifier, two headers (CRC-32C, the
 * higher sequence number wins; identical headers with equal numbers are accepted
 * as Disk2VHD writes them), the region table (BAT and metadata regions, checked
 * for overlaps with each other and the log), the metadata items (file parameters,
 * virtual disk size, logical and physical sector size, page 83), and the BAT:
 * payload block entries with a sector bitmap entry after every `chunk ratio` of them.
 *
 * Block states read as qemu reads them: NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED (and
 * the 0.95 draft's UNMAPPED) as zeros, FULLY_PRESENT from the file. PARTIALLY_PRESENT
 * (which needs a parent's data) and the undefined state 4 fail qemu's reads with EIO;
 * we refuse them when the map reaches them, so `info` still works as qemu's does.
 *
 * Differencing images (HasParent): qemu 7.2 refuses them. Alone we refuse them too
 * (UNSAFE_IMAGE naming the parent locator's paths); opened with `backingSupplied` (a
 * bundle holding the parent, src/engine/archive/) they name the parent by the
 * locator's relative_path, volume_path and absolute_win32_path, are verified by
 * parent_linkage (or parent_linkage2) against the parent's DataWriteGuid and by their
 * logical sector size (a child has its parent's: the sector bitmap counts its sectors), and map as
 * the specification reads them: NOT_PRESENT and UNDEFINED blocks, and the sectors of
 * a PARTIALLY_PRESENT block whose bit (least significant first) in the sector bitmap
 * is clear, are the parent's; ZERO and UNMAPPED blocks read as zeros.
 *
 * Refused: a log that needs replay (qemu refuses a read-only open; we never write to
 * an input), unknown required
 * regions or metadata items. Logical sectors of 4096 bytes are read per the
 * specification, where qemu 7.2 refuses them (ENOTSUP).
 * Beyond qemu: regions and payload blocks must lie inside the file and outside the
 * 1 MiB header section, and metadata items inside the metadata region.
 */
import { ImageCorruptError, FormatMismatchError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../../errors.js';
import { crc32cWithZeroedField } from '../../crc32c.js';
import { enforceLimit, toSafeNumber } from '../../limits.js';
import { readExact, type RandomAccessSource } from '../../source.js';
import type { CheckReport, DiskImage, FormatDriver, FormatInfo, LayerEntry, MapEntry, OpenOptions, ParentLink } from '../../types.js';
import {
  BAT_STATE_MASK,
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  FILE_PARAMS_HAS_PARENT,
  FILE_SIGNATURE,
  GUID,
  H,
  HEADER_BYTES,
  HEADER_OFFSETS,
  HEADER_SECTION_BYTES,
  HEADER_SIGNATURE,
  LOG_ALIGNMENT,
  M,
  MAX_SECTORS_PER_BLOCK,
  METADATA_FLAG_REQUIRED,
  METADATA_SIGNATURE,
  METADATA_TABLE_BYTES,
  MiB,
  R,
  REGION_MAX_ENTRIES,
  REGION_SIGNATURE,
  REGION_TABLE_BYTES,
  REGION_TABLE_OFFSET,
  SB_BLOCK_PRESENT,
  STATE,
  guidAt,
  isZeroGuid,
  signatureAt,
} from './layout.js';
import { scanLog } from './log.js';
import { layerRuns } from '../../layer-runs.js';
import { isVhdx } from '../signatures.js';

const hex = (n: number): string => `0x${n.toString(16)}`;
const u32 = (b: Uint8Array, off: number): number => new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(off, true);
const u64 = (b: Uint8Array, off: number): bigint => new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off, true);
/** BAT entries read at once (64 Ki entries). */
const BAT_CHUNK_ENTRIES = 65536;

interface Region {
  what: string;
  start: number;
  end: number;
}

export interface VhdxGeometry {
  blockSize: number;
  logicalSectorSize: number;
  /** Payload blocks per sector bitmap block. */
  chunkRatio: number;
  /** Bytes of the virtual disk. */
  virtualSize: number;
  /** Payload blocks covering the disk. */
  dataBlocks: number;
  /** BAT entries qemu reads: payload entries and the sector bitmap entries between them. */
  batEntries: number;
}

/** The VHDX parent locator type ({B04AEFB7-D19E-4A81-B789-25B8E9445913}, as stored). */
const VHDX_LOCATOR_TYPE = Uint8Array.from([0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13]);
/** A parent locator item larger than this is refused (its keys and values are short paths and GUIDs). */
const MAX_LOCATOR_BYTES = 256 * 1024;
const SECTOR_BITMAP_BYTES = MiB;
/** The header's DataWriteGuid: what a child's parent_linkage names. */
const DATA_WRITE_GUID = 32;

/** A GUID as stored (mixed-endian) in its canonical lowercase text, without braces. */
function guidText(b: Uint8Array, at: number): string {
  const h = (i: number): string => (b[at + i] as number).toString(16).padStart(2, '0');
  const part = (idx: number[]): string => idx.map(h).join('');
  return `${part([3, 2, 1, 0])}-${part([5, 4])}-${part([7, 6])}-${part([8, 9])}-${part([10, 11, 12, 13, 14, 15])}`;
}

/** The parent locator item's key/value pairs (UTF-16LE), bounds-checked against the item. */
function parseParentLocator(item: Uint8Array, name: string): Map<string, string> {
  const where = `${name}: VHDX parent locator`;
  if (item.length < 20) throw new ImageCorruptError(`${where} is ${item.length} bytes, too short for its header`);
  for (let i = 0; i < 16; i++) {
    if (item[i] !== VHDX_LOCATOR_TYPE[i]) throw new UnsupportedFeatureError(`${where} has locator type {${guidText(item, 0)}}, not the VHDX parent locator`);
  }
  const v = new DataView(item.buffer, item.byteOffset, item.byteLength);
  const count = v.getUint16(18, true);
  if (20 + count * 12 > item.length) throw new ImageCorruptError(`${where} claims ${count} entries, more than its ${item.length} bytes hold`);
  const out = new Map<string, string>();
  const text = (offset: number, length: number, what: string): string => {
    if (offset + length > item.length || length % 2 !== 0) throw new ImageCorruptError(`${where}: ${what} at ${offset} (${length} bytes) lies outside the item`);
    return Buffer.from(item.subarray(offset, offset + length)).toString('utf16le');
  };
  for (let i = 0; i < count; i++) {
    const at = 20 + i * 12;
    const key = text(v.getUint32(at, true), v.getUint16(at + 8, true), `key ${i}`);
    const value = text(v.getUint32(at + 4, true), v.getUint16(at + 10, true), `value ${i}`);
    if (out.has(key)) throw new ImageCorruptError(`${where} lists the key "${key.replace(/[\x00-\x1f]/g, '?').slice(0, 60)}" twice`);
    out.set(key, value);
  }
  return out;
}

/** BAT index of payload block `block`: a sector bitmap entry follows every `chunkRatio` payload entries. */
export function batIndex(block: number, chunkRatio: number): number {
  return block + Math.floor(block / chunkRatio);
}

export const vhdxDriver: FormatDriver = {
  id: 'vhdx',
  probe: isVhdx,

  async open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> {
    const { limits, signal } = options;
    const name = source.name;
    const fileSize = source.size;
    if (fileSize < 8) throw new FormatMismatchError(`${name}: not a VHDX image (${fileSize} bytes)`);
    const ident = await readExact(source, 0, 8, 'VHDX file identifier', signal);
    if (!signatureAt(ident, 0, FILE_SIGNATURE)) throw new FormatMismatchError(`${name}: not a VHDX image (no "${FILE_SIGNATURE}" signature)`);
    if (fileSize < REGION_TABLE_OFFSET + REGION_TABLE_BYTES) {
      throw new ImageCorruptError(`${name}: VHDX file of ${fileSize} bytes ends inside its header section; the image is truncated or corrupt`);
    }

    // --- headers: CRC-32C over 4 KiB, signature, version 1; the higher sequence number wins.
    const headers: Array<{ bytes: Uint8Array; valid: boolean; seq: bigint }> = [];
    for (const offset of HEADER_OFFSETS) {
      const bytes = await readExact(source, offset, HEADER_BYTES, 'VHDX header', signal);
      const valid =
        crc32cWithZeroedField(bytes, H.checksum) === u32(bytes, H.checksum) &&
        signatureAt(bytes, H.signature, HEADER_SIGNATURE) &&
        new DataView(bytes.buffer, bytes.byteOffset).getUint16(H.version, true) === 1;
      headers.push({ bytes, valid, seq: u64(bytes, H.sequenceNumber) });
    }
    const [h1, h2] = headers as [(typeof headers)[0], (typeof headers)[0]];
    let header: Uint8Array;
    if (h1.valid && !h2.valid) header = h1.bytes;
    else if (!h1.valid && h2.valid) header = h2.bytes;
    else if (!h1.valid && !h2.valid) throw new ImageCorruptError(`${name}: no valid VHDX header found (bad signature, version or CRC-32C in both)`);
    else if (h1.seq > h2.seq) header = h1.bytes;
    else if (h2.seq > h1.seq) header = h2.bytes;
    else if (Buffer.from(h1.bytes).equals(Buffer.from(h2.bytes))) header = h1.bytes;
    else throw new ImageCorruptError(`${name}: both VHDX headers are valid with the same sequence number ${h1.seq} but differ`);

    // --- log (qemu's vhdx_parse_log): registered as a region whether or not it is active.
    const logOffset = toSafeNumber(u64(header, H.logOffset), `${name}: VHDX log offset`);
    const logLength = u32(header, H.logLength);
    if (logOffset < LOG_ALIGNMENT || logOffset % LOG_ALIGNMENT !== 0) {
      throw new ImageCorruptError(`${name}: VHDX log offset ${hex(logOffset)} is not a multiple of 1 MiB past the header section`);
    }
    const logVersion = new DataView(header.buffer, header.byteOffset).getUint16(H.logVersion, true);
    if (logVersion !== 0) throw new ImageCorruptError(`${name}: VHDX log version ${logVersion} (only 0 exists)`);
    if (!isZeroGuid(header, H.logGuid) && logLength !== 0) {
      if (logLength % LOG_ALIGNMENT !== 0) throw new ImageCorruptError(`${name}: VHDX log length ${logLength} is not a multiple of 1 MiB`);
      enforceLimit('maxLogBytes', logLength, limits, `${name}: VHDX log length`);
      const log = await readExact(source, logOffset, logLength, 'VHDX log', signal);
      const verdict = scanLog(log, header.subarray(H.logGuid, H.logGuid + 16), name);
      if (verdict.replay) {
        throw new UnsupportedFeatureError(
          `${name}: VHDX image contains a log that needs to be replayed (entry ${verdict.sequenceNumber} at log offset ${verdict.offset}); qemu-img refuses it read-only too, and diskconv never writes to its input. Replaying writes the image: qemu-img check -r all on a copy`,
        );
      }
    }
    const regions: Region[] = [{ what: 'the log', start: logOffset, end: logOffset + logLength }];
    const overlapping = (start: number, end: number): Region | undefined => regions.find((r) => start < r.end && r.start < end);

    // --- region table (the first copy, as qemu reads it).
    const rt = await readExact(source, REGION_TABLE_OFFSET, REGION_TABLE_BYTES, 'VHDX region table', signal);
    if (crc32cWithZeroedField(rt, R.checksum) !== u32(rt, R.checksum)) throw new ImageCorruptError(`${name}: VHDX region table CRC-32C mismatch`);
    if (!signatureAt(rt, R.signature, REGION_SIGNATURE)) throw new ImageCorruptError(`${name}: VHDX region table has no "${REGION_SIGNATURE}" signature`);
    const regionCount = u32(rt, R.entryCount);
    if (regionCount > REGION_MAX_ENTRIES) throw new ImageCorruptError(`${name}: VHDX region table has ${regionCount} entries (at most ${REGION_MAX_ENTRIES})`);
    let bat: { offset: number; length: number } | undefined;
    let meta: { offset: number; length: number } | undefined;
    for (let i = 0; i < regionCount; i++) {
      const at = R.entries + i * R.entryBytes;
      const offset = toSafeNumber(u64(rt, at + R.fileOffset), `${name}: VHDX region ${i} offset`);
      const length = u32(rt, at + R.length);
      const clash = overlapping(offset, offset + length);
      if (clash) throw new ImageCorruptError(`${name}: VHDX region ${i} at ${hex(offset)} (${length} bytes) overlaps ${clash.what} at ${hex(clash.start)}`);
      const isBat = guidAt(rt, at + R.guid, GUID.bat);
      const isMeta = guidAt(rt, at + R.guid, GUID.metadata);
      regions.push({ what: isBat ? 'the BAT' : isMeta ? 'the metadata region' : `region ${i}`, start: offset, end: offset + length });
      if (isBat || isMeta) {
        if ((isBat && bat) || (isMeta && meta)) throw new ImageCorruptError(`${name}: VHDX region table lists the ${isBat ? 'BAT' : 'metadata'} region twice`);
        if (offset < HEADER_SECTION_BYTES || offset + length > fileSize) {
          throw new ImageCorruptError(`${name}: VHDX ${isBat ? 'BAT' : 'metadata'} region at ${hex(offset)} (${length} bytes) is not inside the file (${fileSize} bytes) past the header section`);
        }
        if (isBat) bat = { offset, length };
        else meta = { offset, length };
        continue;
      }
      if ((u32(rt, at + R.required) & 1) !== 0) throw new UnsupportedFeatureError(`${name}: VHDX region ${i} is required but unknown to this reader (and qemu)`);
    }
    if (!bat || !meta) throw new ImageCorruptError(`${name}: VHDX region table lacks the ${bat ? 'metadata' : 'BAT'} region`);

    // --- metadata table and items.
    if (meta.length < METADATA_TABLE_BYTES) throw new ImageCorruptError(`${name}: VHDX metadata region of ${meta.length} bytes cannot hold its 64 KiB table`);
    const mt = await readExact(source, meta.offset, METADATA_TABLE_BYTES, 'VHDX metadata table', signal);
    if (!signatureAt(mt, M.signature, METADATA_SIGNATURE)) throw new ImageCorruptError(`${name}: VHDX metadata table has no "${METADATA_SIGNATURE}" signature`);
    const itemCount = new DataView(mt.buffer, mt.byteOffset).getUint16(M.entryCount, true);
    if (itemCount * M.entryBytes > METADATA_TABLE_BYTES - M.entries) throw new ImageCorruptError(`${name}: VHDX metadata table claims ${itemCount} entries`);
    const KNOWN = ['fileParameters', 'virtualDiskSize', 'page83', 'logicalSectorSize', 'physicalSectorSize', 'parentLocator'] as const;
    const items = new Map<(typeof KNOWN)[number], { offset: number; length: number }>();
    for (let i = 0; i < itemCount; i++) {
      const at = M.entries + i * M.entryBytes;
      const known = KNOWN.find((k) => guidAt(mt, at + M.itemId, GUID[k]));
      if (!known) {
        if ((u32(mt, at + M.flags) & METADATA_FLAG_REQUIRED) !== 0) throw new UnsupportedFeatureError(`${name}: VHDX metadata item ${i} is required but unknown to this reader (and qemu)`);
        continue;
      }
      if (items.has(known)) throw new ImageCorruptError(`${name}: VHDX metadata lists the ${known} item twice`);
      items.set(known, { offset: u32(mt, at + M.offset), length: u32(mt, at + M.length) });
    }
    const readItem = async (key: (typeof KNOWN)[number], bytes: number): Promise<Uint8Array> => {
      const item = items.get(key);
      if (!item) throw new ImageCorruptError(`${name}: VHDX metadata lacks the required ${key} item`);
      if (item.offset + bytes > meta.length) throw new ImageCorruptError(`${name}: VHDX ${key} metadata item at ${hex(item.offset)} lies outside the metadata region`);
      return readExact(source, meta.offset + item.offset, bytes, `VHDX ${key} metadata item`, signal);
    };
    for (const required of KNOWN.slice(0, 5)) if (!items.has(required)) throw new ImageCorruptError(`${name}: VHDX metadata lacks the required ${required} item`);
    const params = await readItem('fileParameters', 8);
    const blockSize = u32(params, 0);
    const identity = guidText(header, DATA_WRITE_GUID);
    let parent: ParentLink | undefined;
    if ((u32(params, 4) & FILE_PARAMS_HAS_PARENT) !== 0) {
      const locatorItem = items.get('parentLocator');
      if (!locatorItem) throw new ImageCorruptError(`${name}: VHDX file parameters say it has a parent, but there is no parent locator`);
      if (locatorItem.length > MAX_LOCATOR_BYTES) throw new ImageCorruptError(`${name}: VHDX parent locator of ${locatorItem.length} bytes (at most ${MAX_LOCATOR_BYTES})`);
      let locator: Map<string, string>;
      try {
        locator = parseParentLocator(await readItem('parentLocator', locatorItem.length), name);
      } catch (err) {
        // Alone, a differencing image is refused as such, whatever its locator holds.
        if (options.backingSupplied) throw err;
        throw new UnsafeImageError(
          `${name}: differencing VHDX (its parent locator is unreadable: ${(err as Error).message}): its blocks not present here are a parent's, which is never opened; qemu-img refuses a differencing VHDX`,
        );
      }
      const names: ParentLink['names'] = [];
      for (const key of ['relative_path', 'volume_path', 'absolute_win32_path']) {
        const value = locator.get(key);
        if (value !== undefined && value !== '') names.push({ name: value, how: 'locator', from: key });
      }
      const linkages = ['parent_linkage', 'parent_linkage2'].flatMap((k) => {
        const value = locator.get(k);
        return value !== undefined ? [value.replace(/^\{|\}$/g, '').toLowerCase()] : [];
      });
      if (linkages.length === 0) throw new ImageCorruptError(`${name}: VHDX parent locator has no parent_linkage`);
      if (!options.backingSupplied) {
        const named = names.length > 0 ? names.map((n) => `${n.from} "${n.name.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 200)}"`).join(', ') : 'no path';
        throw new UnsafeImageError(
          `${name}: differencing VHDX whose parent is named by ${named}: its blocks not present here are the parent's, which is never opened from a path inside the image; convert a tar or zip bundle holding both files (qemu-img refuses a differencing VHDX)`,
        );
      }
      parent = {
        names,
        format: 'vhdx',
        mismatch: (image: DiskImage): string | undefined => {
          if (image.format !== 'vhdx') return `the parent is a ${image.format} image, and a differencing VHDX's parent is a VHDX`;
          const { identity: got, logicalSectorSize: parentSectors } = image.info();
          if (got === undefined || !linkages.includes(got)) return `the child's parent_linkage is {${linkages[0]}}, the parent's DataWriteGuid is {${got ?? 'unknown'}}`;
          // The sector bitmap has a bit per logical sector, the parent's sectors fill the clear ones:
          // a child has its parent's logical sector size (Hyper-V's New-VHD -Differencing takes none, it
          // inherits it). qemu 7.2 reads no differencing VHDX, so there is no qemu behaviour to match.
          if (parentSectors !== logicalSectorSize) {
            return `the child's logical sector size is ${logicalSectorSize} bytes, the parent's ${parentSectors ?? 'unknown'}; a differencing VHDX has its parent's logical sector size`;
          }
          return undefined;
        },
      };
    }
    const rawSize = u64(await readItem('virtualDiskSize', 8), 0);
    const logicalSectorSize = u32(await readItem('logicalSectorSize', 4), 0);
    await readItem('physicalSectorSize', 4);
    if (blockSize < BLOCK_SIZE_MIN || blockSize > BLOCK_SIZE_MAX || (blockSize & (blockSize - 1)) !== 0) {
      throw new ImageCorruptError(`${name}: VHDX block size ${blockSize} is not a power of two from 1 MiB to 256 MiB`);
    }
    if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) throw new ImageCorruptError(`${name}: VHDX logical sector size ${logicalSectorSize} (512 or 4096)`);
    enforceLimit('maxVirtualSize', rawSize, limits, `${name}: VHDX virtual disk size`);
    // qemu: total sectors = size >> log2(logical sector size); the spec makes the size a multiple of it.
    const virtualSize = Math.floor(Number(rawSize) / logicalSectorSize) * logicalSectorSize;
    const chunkRatio = (MAX_SECTORS_PER_BLOCK * logicalSectorSize) / blockSize;
    const dataBlocks = Math.ceil(virtualSize / blockSize);
    // qemu counts the BAT from the size before rounding to sectors, and checks all of it.
    const qemuDataBlocks = Math.ceil(Number(rawSize) / blockSize);
    // A differencing image also needs the sector bitmap entry after the last chunk (the spec's total).
    const batEntries = qemuDataBlocks === 0 ? 0 : parent ? Math.ceil(qemuDataBlocks / chunkRatio) * (chunkRatio + 1) : batIndex(qemuDataBlocks - 1, chunkRatio) + 1;
    // An empty dynamic disk reads nothing from its BAT, but qemu counts it in 32-bit arithmetic, 0 + ((0 - 1) >>
    // log2(chunk ratio)): the region must hold that many entries, or qemu refuses the image (EINVAL). qemu-img
    // create makes such a region (64 MiB for 8 MiB blocks); an image whose size was set to 0 afterwards has not.
    const qemuBatEntries = qemuDataBlocks === 0 && !parent ? 0xffffffff >>> Math.log2(chunkRatio) : batEntries;
    const geometry: VhdxGeometry = { blockSize, logicalSectorSize, chunkRatio, virtualSize, dataBlocks, batEntries };
    if (qemuBatEntries * 8 > bat.length) throw new ImageCorruptError(`${name}: VHDX BAT region of ${bat.length} bytes cannot hold ${qemuBatEntries} entries`);
    enforceLimit('maxTopTableBytes', batEntries * 8, limits, `${name}: VHDX BAT size`);

    // --- BAT, checked entry by entry (qemu's vhdx_check_bat_entries, plus the header section).
    const batBytes = batEntries > 0 ? await readExact(source, bat.offset, batEntries * 8, 'VHDX BAT', signal) : new Uint8Array(0);
    const batView = new DataView(batBytes.buffer, batBytes.byteOffset, batBytes.byteLength);
    const entry = (index: number): { state: number; fileOffset: number } => {
      const lo = batView.getUint32(index * 8, true);
      const hi = batView.getUint32(index * 8 + 4, true);
      // File offset in MiB units: bits 20..63.
      return { state: lo & BAT_STATE_MASK, fileOffset: hi * 2 ** 32 + (lo & 0xfff00000) };
    };
    for (let i = 0; i < batEntries; i++) {
      if (i % BAT_CHUNK_ENTRIES === 0) throwIfAborted(signal);
      const isBitmap = (i + 1) % (chunkRatio + 1) === 0;
      const { state, fileOffset } = entry(i);
      if (isBitmap) {
        if (state === SB_BLOCK_PRESENT && fileOffset >= fileSize) {
          throw new ImageCorruptError(`${name}: VHDX sector bitmap entry ${i} points at ${hex(fileOffset)}, after the end of the file (${fileSize} bytes)`);
        }
        if (parent && state === SB_BLOCK_PRESENT) {
          if (fileOffset < HEADER_SECTION_BYTES || fileOffset + SECTOR_BITMAP_BYTES > fileSize) {
            throw new ImageCorruptError(`${name}: VHDX sector bitmap block (BAT entry ${i}) at ${hex(fileOffset)} is not inside the file (${fileSize} bytes) past the header section`);
          }
          const clash = overlapping(fileOffset, fileOffset + SECTOR_BITMAP_BYTES);
          if (clash) throw new ImageCorruptError(`${name}: VHDX sector bitmap block (BAT entry ${i}) at ${hex(fileOffset)} overlaps ${clash.what} at ${hex(clash.start)}`);
        }
        continue;
      }
      if (state !== STATE.FULLY_PRESENT && !(parent && state === STATE.PARTIALLY_PRESENT)) continue;
      const block = i - Math.floor(i / (chunkRatio + 1));
      const length = Math.max(0, Math.min(blockSize, virtualSize - block * blockSize));
      // qemu measures the last block with the BAT index, not the block number; refuse what either measure finds truncated.
      const qemuRemainder = virtualSize - i * blockSize;
      const qemuLength = qemuRemainder < 0 ? blockSize : Math.min(blockSize, qemuRemainder);
      if (fileOffset < HEADER_SECTION_BYTES) {
        throw new ImageCorruptError(`${name}: VHDX BAT entry ${i} (block ${block}) points at ${hex(fileOffset)}, inside the 1 MiB header section`);
      }
      if (!Number.isSafeInteger(fileOffset + blockSize) || fileOffset >= fileSize || fileOffset + Math.max(length, qemuLength) > fileSize) {
        throw new ImageCorruptError(
          `${name}: VHDX BAT entry ${i} (block ${block}) at ${hex(fileOffset)} ends after the end of the file (${fileSize} bytes); the image has probably been truncated`,
        );
      }
      const clash = overlapping(fileOffset, fileOffset + blockSize);
      if (clash) throw new ImageCorruptError(`${name}: VHDX block ${block} at ${hex(fileOffset)} overlaps ${clash.what} at ${hex(clash.start)}`);
    }

    async function* map(mapSignal?: AbortSignal): AsyncGenerator<MapEntry> {
      if (parent) throw new UnsafeImageError(`${name}: differencing VHDX: its parent's data is needed, and the parent is never opened`);
      let run: MapEntry | undefined;
      for (let block = 0; block < dataBlocks; block++) {
        if (block % BAT_CHUNK_ENTRIES === 0) throwIfAborted(mapSignal ?? signal);
        const offset = block * blockSize;
        const length = Math.min(blockSize, virtualSize - offset);
        const { state, fileOffset } = entry(batIndex(block, chunkRatio));
        switch (state) {
          case STATE.NOT_PRESENT:
          case STATE.UNDEFINED:
          case STATE.ZERO:
          case STATE.UNMAPPED:
          case STATE.UNMAPPED_V095:
            if (run?.kind === 'zero') {
              run.length += length;
              continue;
            }
            if (run) yield run;
            run = { kind: 'zero', offset, length };
            continue;
          case STATE.FULLY_PRESENT:
            if (run?.kind === 'stored' && run.fileOffset + run.length === fileOffset) {
              run.length += length;
              continue;
            }
            if (run) yield run;
            run = { kind: 'stored', offset, length, fileOffset };
            continue;
          default:
            throw new ImageCorruptError(
              state === STATE.PARTIALLY_PRESENT
                ? `${name}: VHDX block ${block} is PARTIALLY_PRESENT, which only a differencing image may use (its other sectors are the parent's); qemu-img fails to read it too`
                : `${name}: VHDX block ${block} has the undefined block state ${state}; qemu-img fails to read it too`,
            );
        }
      }
      if (run) yield run;
    }

    const sectorsPerBlock = blockSize / logicalSectorSize;
    /** A differencing image's map: what is not present here is 'backing' (the parent's). */
    async function* layers(mapSignal?: AbortSignal): AsyncGenerator<LayerEntry> {
      const runs = layerRuns();
      for (let block = 0; block < dataBlocks; block++) {
        if (block % BAT_CHUNK_ENTRIES === 0) throwIfAborted(mapSignal ?? signal);
        const offset = block * blockSize;
        const length = Math.min(blockSize, virtualSize - offset);
        const { state, fileOffset } = entry(batIndex(block, chunkRatio));
        switch (state) {
          case STATE.NOT_PRESENT:
          case STATE.UNDEFINED:
            yield* runs.add({ kind: 'backing', offset, length });
            continue;
          case STATE.ZERO:
          case STATE.UNMAPPED:
          case STATE.UNMAPPED_V095:
            yield* runs.add({ kind: 'zero', offset, length });
            continue;
          case STATE.FULLY_PRESENT:
            yield* runs.add({ kind: 'stored', offset, length, fileOffset });
            continue;
          case STATE.PARTIALLY_PRESENT: {
            const chunk = Math.floor(block / chunkRatio);
            const sb = entry((chunk + 1) * (chunkRatio + 1) - 1);
            if (sb.state !== SB_BLOCK_PRESENT) {
              throw new ImageCorruptError(`${name}: VHDX block ${block} is PARTIALLY_PRESENT but the sector bitmap block of its chunk ${chunk} is not present (state ${sb.state})`);
            }
            const sectors = Math.ceil(length / logicalSectorSize);
            const first = (block % chunkRatio) * sectorsPerBlock;
            const bitmap = await readExact(source, sb.fileOffset + first / 8, Math.ceil(sectors / 8), `${name}: VHDX sector bitmap of block ${block}`, mapSignal ?? signal);
            const bit = (i: number): boolean => ((((bitmap[i >> 3] as number) >> (i & 7)) & 1) === 1);
            for (let i = 0; i < sectors; ) {
              const present = bit(i);
              let j = i + 1;
              while (j < sectors && bit(j) === present) j++;
              const at = offset + i * logicalSectorSize;
              const bytes = Math.min(j * logicalSectorSize, length) - i * logicalSectorSize;
              yield* runs.add(present ? { kind: 'stored', offset: at, length: bytes, fileOffset: fileOffset + i * logicalSectorSize } : { kind: 'backing', offset: at, length: bytes });
              i = j;
            }
            continue;
          }
          default:
            throw new ImageCorruptError(`${name}: VHDX block ${block} has the undefined block state ${state}`);
        }
      }
      yield* runs.end();
    }

    /** qemu's check is its BAT entry check, which open() has already passed. */
    async function check(): Promise<CheckReport> {
      return { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
    }

    return {
      format: 'vhdx',
      virtualSize,
      map,
      ...(parent ? { parent, layerMap: layers } : {}),
      info: (): FormatInfo => ({ clusterSize: blockSize, dirty: false, identity, logicalSectorSize }),
      check,
      close: async () => {},
    };
  },
};

export { scanLog } from './log.js';
export { MiB };
