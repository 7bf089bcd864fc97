/**
 * The `rbd import-diff` stream (format "rbd diff v1", doc/dev/rbd-diff.rst in
 * Ceph): a header, the image size, then records in any order:
 *   'w' le64 offset, le64 length, data   bytes to write
 *   'z' le64 offset, le64 length         a range to zero (discard)
 *   'e'                                  end
 * Extents of a conversion become 'w' records of their non-zero 4 KiB blocks;
 * holes and zero blocks never travel, since a new image already reads zeros.
 */
import { isAllZero } from '../../engine/index.js';

export const DIFF_HEADER = Buffer.from('rbd diff v1\n', 'ascii');
/** The granularity at which zeros are skipped inside data extents (qemu-img's default -S 4k). */
export const ZERO_BLOCK = 4096;

export function sizeRecord(size: number): Buffer {
  const b = Buffer.alloc(9);
  b.write('s', 0, 'ascii');
  b.writeBigUInt64LE(BigInt(size), 1);
  return b;
}

export function writeHeader(offset: number, length: number): Buffer {
  const b = Buffer.alloc(17);
  b.write('w', 0, 'ascii');
  b.writeBigUInt64LE(BigInt(offset), 1);
  b.writeBigUInt64LE(BigInt(length), 9);
  return b;
}

export function zeroRecord(offset: number, length: number): Buffer {
  const b = Buffer.alloc(17);
  b.write('z', 0, 'ascii');
  b.writeBigUInt64LE(BigInt(offset), 1);
  b.writeBigUInt64LE(BigInt(length), 9);
  return b;
}

export const END_RECORD = Buffer.from('e', 'ascii');

/** Runs of non-zero 4 KiB blocks (aligned to the guest offset) of `data` at `offset`. */
export function* nonZeroRuns(data: Uint8Array, offset: number): Generator<{ offset: number; data: Uint8Array }> {
  if (isAllZero(data)) return;
  let runStart = -1;
  for (let pos = 0; pos < data.length; ) {
    const next = Math.min(data.length, pos + ZERO_BLOCK - ((offset + pos) % ZERO_BLOCK));
    if (isAllZero(data.subarray(pos, next))) {
      if (runStart >= 0) yield { offset: offset + runStart, data: data.subarray(runStart, pos) };
      runStart = -1;
    } else if (runStart < 0) runStart = pos;
    pos = next;
  }
  if (runStart >= 0) yield { offset: offset + runStart, data: data.subarray(runStart) };
}
