/**
 * The VHDX metadata log: does it hold an entry that must be replayed before the
 * image can be read? qemu replays it only when the image is opened read-write and
 * refuses a read-only open otherwise (block/vhdx-log.c, iotest 070). We never write
 * to an input, so we refuse exactly when qemu would have to replay.
 *
 * The scan follows qemu's: walk the circular log from its start one 4 KiB sector at
 * a time; at a sector holding a valid entry header (signature "loge", a length in
 * whole sectors no larger than the log, a non-zero sequence number, the active
 * header's log GUID, descriptors that fit), read its descriptor sectors (an invalid
 * descriptor makes qemu fail the open) and check the CRC-32C over the whole entry.
 * A valid entry means replay; a bad CRC skips the entry. The scan stops once it
 * wraps around, so it reads each byte of the log at most about twice.
 */
import { crc32c } from '../../crc32c.js';
import { ImageCorruptError } from '../../errors.js';
import { LOG_SECTOR_BYTES, guidAt, signatureAt } from './layout.js';

/** Log entry header fields. */
const E = { signature: 0, checksum: 4, entryLength: 8, sequenceNumber: 16, descriptorCount: 24, logGuid: 32, bytes: 64 } as const;
/** Log descriptor fields (32 bytes each, after the entry header). */
const DESC = { signature: 0, zeroLength: 8, fileOffset: 16, sequenceNumber: 24, bytes: 32 } as const;

/** Sectors holding the entry header and `count` descriptors (qemu's vhdx_compute_desc_sectors). */
function descriptorSectors(count: number): number {
  return Math.ceil((count + 2) / 128);
}

export type LogVerdict = { replay: false } | { replay: true; sequenceNumber: bigint; offset: number };

/**
 * `log` is the whole log region (a multiple of 1 MiB); `logGuid` the active header's
 * log GUID. Throws IMAGE_CORRUPT where qemu fails the open (an invalid descriptor).
 */
export function scanLog(log: Uint8Array, logGuid: Uint8Array, name: string): LogVerdict {
  const length = log.length;
  const view = new DataView(log.buffer, log.byteOffset, log.byteLength);
  const next = (index: number): number => (index + LOG_SECTOR_BYTES >= length ? 0 : index + LOG_SECTOR_BYTES);
  /** `count` sectors from `index`, wrapping at the end of the log. */
  const sectors = (index: number, count: number): { bytes: Uint8Array; after: number } => {
    const bytes = new Uint8Array(count * LOG_SECTOR_BYTES);
    let at = index;
    for (let i = 0; i < count; i++) {
      bytes.set(log.subarray(at, at + LOG_SECTOR_BYTES), i * LOG_SECTOR_BYTES);
      at = next(at);
    }
    return { bytes, after: at };
  };

  let read = 0;
  for (;;) {
    const tail = read;
    const entryLength = view.getUint32(read + E.entryLength, true);
    const descriptorCount = view.getUint32(read + E.descriptorCount, true);
    const sequenceNumber = view.getBigUint64(read + E.sequenceNumber, true);
    const headerValid =
      signatureAt(log, read + E.signature, 'loge') &&
      entryLength <= length &&
      entryLength % LOG_SECTOR_BYTES === 0 &&
      sequenceNumber !== 0n &&
      guidAt(log, read + E.logGuid, logGuid) &&
      descriptorCount * DESC.bytes <= entryLength;
    if (!headerValid) {
      read = next(read);
    } else {
      const descSectors = descriptorSectors(descriptorCount);
      const totalSectors = entryLength / LOG_SECTOR_BYTES;
      const desc = sectors(read, descSectors);
      const dv = new DataView(desc.bytes.buffer);
      for (let i = 0; i < descriptorCount; i++) {
        const at = E.bytes + i * DESC.bytes;
        const kind = String.fromCharCode(...desc.bytes.subarray(at, at + 4));
        const ok =
          dv.getBigUint64(at + DESC.sequenceNumber, true) === sequenceNumber &&
          dv.getBigUint64(at + DESC.fileOffset, true) % BigInt(LOG_SECTOR_BYTES) === 0n &&
          ((kind === 'zero' && dv.getBigUint64(at + DESC.zeroLength, true) % BigInt(LOG_SECTOR_BYTES) === 0n) || kind === 'desc');
        if (!ok) {
          throw new ImageCorruptError(`${name}: VHDX log entry at log offset ${read} has an invalid descriptor ${i}; qemu-img cannot open it either`);
        }
      }
      // CRC-32C over the descriptor sectors (checksum field as zero), then the data sectors.
      const stored = dv.getUint32(E.checksum, true);
      desc.bytes.fill(0, E.checksum, E.checksum + 4);
      let crc = crc32c(desc.bytes);
      let after = desc.after;
      if (totalSectors > descSectors) {
        const data = sectors(after, totalSectors - descSectors);
        crc = crc32c(data.bytes, crc);
        after = data.after;
      }
      if (crc === stored) return { replay: true, sequenceNumber, offset: read };
      read = after;
    }
    if (read < tail) return { replay: false };
  }
}
