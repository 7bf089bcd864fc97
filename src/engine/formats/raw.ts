import type { RandomAccessSource } from '../source.js';
import { SourceUnavailableError, throwIfAborted } from '../errors.js';
import { enforceLimit } from '../limits.js';
import type { DiskImage, FormatDriver, FormatInfo, MapEntry, OpenOptions } from '../types.js';

const SECTOR = 512;
/** Data ranges asked of the filesystem at once. */
const RANGES_PER_CALL = 4096;

/**
 * Raw: the bytes are the disk. qemu rounds the size up to whole sectors and reads
 * the tail of the last sector as zeros; we do the same, since that tail is not
 * past the end of any structure, just an unaligned file.
 */
export const rawDriver: FormatDriver = {
  id: 'raw',
  probe: () => true,
  async open(source: RandomAccessSource, options: OpenOptions): Promise<DiskImage> {
    const virtualSize = Math.ceil(source.size / SECTOR) * SECTOR;
    enforceLimit('maxVirtualSize', virtualSize, options.limits, 'raw image size');
    return {
      format: 'raw',
      virtualSize,
      info: (): FormatInfo => ({ dirty: false }),
      async *map(signal?: AbortSignal): AsyncGenerator<MapEntry> {
        yield* mapFileRanges(source, source.size, signal);
        // The rest of the last sector, past the end of the file: a hole, as qemu's map shows it.
        if (virtualSize > source.size) yield { kind: 'zero', offset: source.size, length: virtualSize - source.size, status: 'hole', fileOffset: source.size };
      },
      close: async () => {},
    };
  },
};

/**
 * The file's first `size` bytes as stored entries (guest offset = file offset),
 * and its holes as zero entries (`hole`) where the filesystem tells them
 * (SEEK_DATA/SEEK_HOLE, as qemu-img asks): holes are then never read. Where it
 * cannot tell, the whole range is one stored run (read, and scanned for zeros by
 * the sink). Raw images and fixed VHDs map through it; `from` starts later in the file.
 */
export async function* mapFileRanges(source: RandomAccessSource, size: number, signal?: AbortSignal, from = 0): AsyncGenerator<MapEntry> {
  let pos = from;
  while (pos < size) {
    throwIfAborted(signal);
    const ranges = source.dataRanges ? await source.dataRanges(pos, size, RANGES_PER_CALL) : undefined;
    if (!ranges) {
      yield { kind: 'stored', offset: pos, length: size - pos, fileOffset: pos };
      return;
    }
    for (let i = 0; i + 1 < ranges.length; i += 2) {
      const start = ranges[i] as number;
      if (start >= size) break; // the helper clips at `size`; this only guards a range past it
      const end = Math.min(size, ranges[i + 1] as number);
      if (!(start >= pos && end > start)) throw new SourceUnavailableError(`${source.name}: the filesystem reported data ranges out of order`);
      if (start > pos) yield { kind: 'zero', offset: pos, length: start - pos, status: 'hole', fileOffset: pos };
      yield { kind: 'stored', offset: start, length: end - start, fileOffset: start };
      pos = end;
    }
    if (ranges.length / 2 < RANGES_PER_CALL) break;
  }
  if (pos < size) yield { kind: 'zero', offset: pos, length: size - pos, status: 'hole', fileOffset: pos };
}
