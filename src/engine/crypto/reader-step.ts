/**
 * The reader's decryption step for encrypted stored entries, kept apart from
 * the reader's batching: an encrypted entry is read in whole cipher sectors and
 * decrypted into the batch's decode arena (never in place: a hostile map may
 * point two guest ranges at one host range, and the read buffer is shared).
 */
import type { Extent, MapEntry } from '../types.js';
import type { SectorCipher } from './sector-cipher.js';

type StoredEntry = Extract<MapEntry, { kind: 'stored' }>;

/** The sector-aligned file range [start, end) an encrypted entry needs. */
export function encryptedFileRange(entry: StoredEntry, cipher: SectorCipher): [start: number, end: number] {
  const s = cipher.sectorSize;
  return [Math.floor(entry.fileOffset / s) * s, Math.ceil((entry.fileOffset + entry.length) / s) * s];
}

/** Bytes of decrypted output an encrypted entry needs (its whole sectors). */
export function encryptedBytes(entry: StoredEntry, cipher: SectorCipher): number {
  const [start, end] = encryptedFileRange(entry, cipher);
  return end - start;
}

/**
 * Decrypts the sectors under `entry` from `bytes` (a read of the file starting at
 * `bytesStart`) into `target` when it is big enough, else into a new buffer.
 */
export function decryptEntry(entry: StoredEntry, cipher: SectorCipher, bytes: Uint8Array, bytesStart: number, target: Uint8Array | undefined): Extent {
  const [start, end] = encryptedFileRange(entry, cipher);
  const input = bytes.subarray(start - bytesStart, end - bytesStart);
  const output = target && target.length >= input.length ? target.subarray(0, input.length) : Buffer.allocUnsafe(input.length);
  const lead = entry.fileOffset - start;
  // The IV numbers the first whole sector by the file offset (qcow2 LUKS) or by the guest offset (legacy AES).
  const firstSector = cipher.ivFrom === 'file' ? start / cipher.sectorSize : (entry.offset - lead) / cipher.sectorSize;
  if (!Number.isInteger(firstSector)) throw new RangeError(`encrypted entry at guest ${entry.offset} is not sector aligned with its file offset ${entry.fileOffset}`);
  cipher.decrypt(input, output, firstSector);
  return { kind: 'data', offset: entry.offset, length: entry.length, data: output.subarray(lead, lead + entry.length) };
}
