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
 * Refused: a log that needs replay (qemu refuses a read-only open; we never write to
 * an input), differencing images (a parent is another file), unknown required
 * regions or metadata items. Logical sectors of 4096 bytes are read per the
 * specification, where qemu 7.2 refuses them (ENOTSUP).
 * Beyond qemu: regions and payload blocks must lie inside the file and outside the
 * 1 MiB header section, and metadata items inside the metadata region.
 */
import { ImageCorruptError, FormatMismatchError, UnsafeImageError, UnsupportedFeatureError, throwIfAborted } from '../../errors.js';
import { crc32cWithZeroedField } from '../../crc32c.js';
import { enforceLimit, toSafeNumber } from '../../limits.js';
import { readExact, type RandomAccessSource } from '../../source.js';
import type { CheckReport, DiskImage, FormatDriver, FormatInfo, MapEntry, OpenOptions } from '../../types.js';
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

/** BAT index of payload block `block`: a sector bitmap entry follows every `chunkRatio` payload entries. */
export function batIndex(block: number, chunkRatio: number): number {
  return block + Math.floor(block / chunkRatio);
}

export const vhdxDriver: FormatDriver = {
  id: 'vhdx',
  probe(head: Uint8Array): boolean {
    return signatureAt(head, 0, FILE_SIGNATURE);
  },

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
    if ((u32(params, 4) & FILE_PARAMS_HAS_PARENT) !== 0) {
      if (!items.has('parentLocator')) throw new ImageCorruptError(`${name}: VHDX file parameters say it has a parent, but there is no parent locator`);
      throw new UnsafeImageError(
        `${name}: differencing VHDX: its unallocated blocks live in a parent image, which is never opened; a bundle with the parent is not yet supported`,
      );
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
    // An empty disk reads nothing from its BAT: qemu's huge count for it is not checked.
    const qemuDataBlocks = Math.ceil(Number(rawSize) / blockSize);
    const batEntries = qemuDataBlocks === 0 ? 0 : batIndex(qemuDataBlocks - 1, chunkRatio) + 1;
    const geometry: VhdxGeometry = { blockSize, logicalSectorSize, chunkRatio, virtualSize, dataBlocks, batEntries };
    if (batEntries * 8 > bat.length) throw new ImageCorruptError(`${name}: VHDX BAT region of ${bat.length} bytes cannot hold ${batEntries} entries`);
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
        continue;
      }
      if (state !== STATE.FULLY_PRESENT) continue;
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

    /** qemu's check is its BAT entry check, which open() has already passed. */
    async function check(): Promise<CheckReport> {
      return { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
    }

    return {
      format: 'vhdx',
      virtualSize,
      map,
      info: (): FormatInfo => ({ clusterSize: blockSize, dirty: false }),
      check,
      close: async () => {},
    };
  },
};

export { scanLog } from './log.js';
export { MiB };
