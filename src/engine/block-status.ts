/**
 * An image's block status as qemu sees it (`qemu-img map`, `qemu-img compare -s`),
 * from the driver's map, which is metadata only: nothing is read but tables
 * (and, where qemu asks the filesystem, its holes).
 *
 * The drivers say what their metadata says (stored, compressed, zero and why:
 * `ZeroStatus`); what follows here is qemu's block layer, not format parsing:
 * - qemu's qcow2 and vmdk drivers read unallocated ranges from a backing file, so
 *   there they are zeros but not `present`; its vdi and vpc drivers have no backing
 *   files, so an unallocated block is a present zero block;
 * - qemu's vhdx driver has no block status: the block layer calls the whole disk
 *   present data, at no host offset;
 * - raw images and fixed VHDs pass through to the file: its holes are present zeros
 *   with an offset (the drivers map them as `hole`);
 * - a static VDI's data is checked against the file's holes (qemu's
 *   BDRV_BLOCK_RECURSE): data over a hole also reads as zero;
 * - compressed and encrypted data have no host offset.
 */
import { mapFileRanges } from './formats/raw.js';
import type { RandomAccessSource } from './source.js';
import type { DiskImage, FormatId, MapEntry } from './types.js';

export interface BlockStatus {
  offset: number;
  length: number;
  /** qemu's `data`: the bytes are stored (BDRV_BLOCK_DATA). */
  data: boolean;
  /** qemu's `zero`: the bytes read as zeros (BDRV_BLOCK_ZERO). */
  zero: boolean;
  /** qemu's `present`: this image, not a backing file, decides the bytes (BDRV_BLOCK_ALLOCATED). */
  present: boolean;
  /** qemu's `offset`: where the bytes lie in the image file (BDRV_BLOCK_OFFSET_VALID). */
  hostOffset?: number;
  /** Compressed data (qemu 8's `compressed`; 7.2 does not print it). */
  compressed?: boolean;
}

/**
 * The span that one answer of qemu's driver never crosses for such a run (its
 * block status comes a grain, block or L2 slice at a time); undefined where it
 * answers for the whole run. `compare -s` needs it: qemu compares its
 * end-of-file flag too, which is set only on an answer that reaches the end.
 */
export function qemuStatusSpan(image: DiskImage, status: BlockStatus): number | undefined {
  const info = image.info();
  const cs = info.clusterSize;
  if (cs === undefined) return undefined;
  switch (image.format) {
    case 'qcow2': {
      if (status.compressed) return cs;
      const extended = (info.formatSpecific?.data as { 'extended-l2'?: boolean } | undefined)?.['extended-l2'] === true;
      return cs * (cs / (extended ? 16 : 8));
    }
    case 'vmdk':
    case 'vdi':
      return cs;
    case 'vpc':
      return status.data ? cs : undefined;
    default:
      return undefined;
  }
}

const QEMU_HAS_BACKING: ReadonlySet<FormatId> = new Set(['qcow2', 'vmdk']);

/** Guest-ordered, contiguous statuses covering [0, virtualSize). Throws the image's readable() error (a backing file). */
export async function* blockStatus(image: DiskImage, opened: RandomAccessSource, signal?: AbortSignal): AsyncGenerator<BlockStatus> {
  image.readable?.();
  const source = image.readsFrom ?? opened; // an archive with staged members (archive/joined-source.ts)
  if (image.format === 'vhdx') {
    if (image.virtualSize > 0) yield { offset: 0, length: image.virtualSize, data: true, zero: false, present: true };
    return;
  }
  const encrypted = image.info().encrypted === true;
  const host = (fileOffset: number | undefined): { hostOffset?: number } => (fileOffset === undefined || encrypted ? {} : { hostOffset: fileOffset });
  for await (const entry of image.map(signal)) {
    const { offset, length } = entry;
    if (entry.kind === 'compressed') {
      yield { offset, length, data: true, zero: false, present: true, compressed: true };
    } else if (entry.kind === 'stored') {
      if (entry.preallocated) yield* overFileHoles(entry, source, signal);
      else yield { offset, length, data: true, zero: false, present: true, ...host(entry.cipher ? undefined : entry.fileOffset) };
    } else {
      const present = (entry.status ?? 'unallocated') !== 'unallocated' || !QEMU_HAS_BACKING.has(image.format);
      yield { offset, length, data: false, zero: true, present, ...host(entry.fileOffset) };
    }
  }
}

/** Preallocated data split where the file has holes under it: those parts are data that reads as zero. */
async function* overFileHoles(entry: Extract<MapEntry, { kind: 'stored' }>, source: RandomAccessSource, signal?: AbortSignal): AsyncGenerator<BlockStatus> {
  const delta = entry.offset - entry.fileOffset;
  for await (const part of mapFileRanges(source, entry.fileOffset + entry.length, signal, entry.fileOffset)) {
    yield { offset: part.offset + delta, length: part.length, data: true, zero: part.kind === 'zero', present: true, hostOffset: part.offset };
  }
}
