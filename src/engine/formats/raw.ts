import type { RandomAccessSource } from '../source.js';
import { enforceLimit } from '../limits.js';
import type { DiskImage, FormatDriver, FormatInfo, MapEntry, OpenOptions } from '../types.js';

const SECTOR = 512;

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
      async *map(): AsyncGenerator<MapEntry> {
        if (source.size > 0) yield { kind: 'stored', offset: 0, length: source.size, fileOffset: 0 };
        if (virtualSize > source.size) yield { kind: 'zero', offset: source.size, length: virtualSize - source.size };
      },
      close: async () => {},
    };
  },
};
