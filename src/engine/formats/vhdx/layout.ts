/**
 * VHDX on-disk structures ("VHDX Format Specification" v1.00, Microsoft), all
 * little-endian: the 1 MiB header section (file identifier, two headers, two
 * region tables), the metadata region and the BAT. GUIDs are in the Microsoft
 * mixed-endian byte order as stored in the file.
 */
import { ascii } from '../../bytes.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export const FILE_SIGNATURE = 'vhdxfile';
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const HEADER_BYTES = 4 * KiB;
export const HEADER_SIGNATURE = 'head';
export const REGION_TABLE_OFFSET = 192 * KiB;
export const REGION_TABLE_BYTES = 64 * KiB;
export const REGION_SIGNATURE = 'regi';
/** The spec's maximum region table entry count (qemu's too). */
export const REGION_MAX_ENTRIES = 2047;
export const HEADER_SECTION_BYTES = MiB;
export const METADATA_TABLE_BYTES = 64 * KiB;
export const METADATA_SIGNATURE = 'metadata';
export const BLOCK_SIZE_MIN = MiB;
export const BLOCK_SIZE_MAX = 256 * MiB;
/** The spec's 2^23 sectors described by one sector bitmap block. */
export const MAX_SECTORS_PER_BLOCK = 2 ** 23;
export const LOG_SECTOR_BYTES = 4 * KiB;
export const LOG_ALIGNMENT = MiB;

/** Header fields. */
export const H = { signature: 0, checksum: 4, sequenceNumber: 8, logGuid: 48, logVersion: 64, version: 66, logLength: 68, logOffset: 72 } as const;
/** Region table header and entries. */
export const R = { signature: 0, checksum: 4, entryCount: 8, entries: 16, entryBytes: 32, guid: 0, fileOffset: 16, length: 24, required: 28 } as const;
/** Metadata table header and entries. */
export const M = { signature: 0, entryCount: 10, entries: 32, entryBytes: 32, itemId: 0, offset: 16, length: 20, flags: 24 } as const;
export const METADATA_FLAG_REQUIRED = 0x04;
export const FILE_PARAMS_HAS_PARENT = 0x02;

/** BAT entry: state in bits 0-2, file offset in MiB units in bits 20-63. */
export const BAT_STATE_MASK = 0x7;
export const STATE = {
  NOT_PRESENT: 0,
  UNDEFINED: 1,
  ZERO: 2,
  UNMAPPED: 3,
  /** The 0.95 draft's value for UNMAPPED; qemu reads it as zeros too. */
  UNMAPPED_V095: 5,
  FULLY_PRESENT: 6,
  PARTIALLY_PRESENT: 7,
} as const;
/** Sector bitmap block entry state that has a block in the file. */
export const SB_BLOCK_PRESENT = 6;

/** GUID text (8-4-4-4-12) to the bytes stored in the file. */
export function guidBytes(text: string): Uint8Array {
  const h = text.replace(/-/g, '');
  const b = Uint8Array.from({ length: 16 }, (_, i) => parseInt(h.slice(2 * i, 2 * i + 2), 16));
  // data1 (u32), data2 and data3 (u16) are little-endian on disk.
  return Uint8Array.from([b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], ...b.subarray(8)] as number[]);
}

export const GUID = {
  bat: guidBytes('2dc27766-f623-4200-9d64-115e9bfd4a08'),
  metadata: guidBytes('8b7ca206-4790-4b9a-b8fe-575f050f886e'),
  fileParameters: guidBytes('caa16737-fa36-4d43-b3b6-33f0aa44e76b'),
  virtualDiskSize: guidBytes('2fa54224-cd1b-4876-b211-5dbed83bf4b8'),
  page83: guidBytes('beca12ab-b2e6-4523-93ef-c309e000c746'),
  logicalSectorSize: guidBytes('8141bf1d-a96f-4709-ba47-f233a8faab5f'),
  physicalSectorSize: guidBytes('cda348c7-445d-4471-9cc9-e9885251c556'),
  parentLocator: guidBytes('a8d35f2d-b30b-454d-abf7-d3d84834ab0c'),
} as const;

export function guidAt(bytes: Uint8Array, offset: number, guid: Uint8Array): boolean {
  for (let i = 0; i < 16; i++) if (bytes[offset + i] !== guid[i]) return false;
  return true;
}

export function isZeroGuid(bytes: Uint8Array, offset: number): boolean {
  for (let i = 0; i < 16; i++) if (bytes[offset + i] !== 0) return false;
  return true;
}

export function signatureAt(bytes: Uint8Array, offset: number, signature: string): boolean {
  return ascii(bytes, offset, signature.length) === signature;
}
