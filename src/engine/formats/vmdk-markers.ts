/**
 * A streamOptimized VMDK read by walking its grain markers, for a source whose
 * bytes are still arriving in order (a service upload converted while it
 * arrives). Its grain directory and tables sit in the footer, so the ordinary
 * reader (vmdk.ts) can map nothing before the last byte; but every grain carries
 * a marker with its guest LBA, and VMware and qemu write the grains in guest order.
 *
 * The walk starts at the header's overHead and reads one marker after another:
 *   grain     u64 lba (sectors), u32 size > 0, then `size` bytes of zlib data; next marker at the next sector
 *   metadata  u64 sectors, u32 0, u32 type (0 end of stream, 1 grain table, 2 grain directory, 3 footer), padded to
 *             a sector, then `sectors` sectors of metadata (skipped)
 * and maps each grain as the compressed entry the directory reader would give
 * it (the same fileOffset: the marker), zeros between them.
 *
 * qemu reads such an image through its grain directory, not its markers. So
 * once the end-of-stream marker is reached (every byte is in by then), the
 * directory is read the ordinary way and its allocated grains compared with the
 * walked ones: a digest of (guest offset, file offset) over both, in guest order.
 * Any disagreement (a grain the tables do not point to, a table pointing
 * elsewhere, another capacity or grain size in the footer, grains out of order,
 * an unknown marker) throws StreamLayoutMismatchError before the walk's map
 * ends; the caller then converts again with the directory reader. The walk never
 * decides the bytes alone.
 */
import { nodeCrypto } from '../crypto/node-crypto.js';
import { DiskconvError, throwIfAborted } from '../errors.js';
import { readExact, type RandomAccessSource } from '../source.js';
import type { DiskImage, MapEntry } from '../types.js';

const SECTOR = 512;
const MARKER_END_OF_STREAM = 0;
const MARKER_GRAIN_TABLE = 1;
const MARKER_GRAIN_DIRECTORY = 2;
const MARKER_FOOTER = 3;

/** A source whose bytes arrive in order while it is read (reads of later bytes wait for them). */
export interface ArrivingSource extends RandomAccessSource {
  readonly arriving: boolean;
}

/** Whether `source` says its bytes are still arriving. */
export function isArriving(source: RandomAccessSource): boolean {
  return (source as Partial<ArrivingSource>).arriving === true;
}

/**
 * The markers disagree with the grain directory (or cannot be walked in guest
 * order): the walk's output must be thrown away and the image converted again
 * with the directory reader. Not the image's fault: the directory reader decides.
 */
export class StreamLayoutMismatchError extends DiskconvError {
  readonly code = 'STREAM_LAYOUT_MISMATCH';
  readonly deterministic = false;
}

export interface MarkerWalkLayout {
  virtualSize: number;
  grainBytes: number;
  /** Where the first marker is (the header's overHead, in bytes). */
  firstMarker: number;
  /** The image opened the ordinary way (footer, directory), once every byte is in. */
  openDirectory: () => Promise<DiskImage>;
}

/** Guest-ordered map entries from the markers; verified against the directory before the last one. */
export async function* walkMarkers(source: RandomAccessSource, layout: MarkerWalkLayout, signal?: AbortSignal): AsyncGenerator<MapEntry> {
  const { virtualSize, grainBytes } = layout;
  const name = source.name;
  const walked = nodeCrypto().createHash('sha256');
  const mismatch = (what: string): StreamLayoutMismatchError => new StreamLayoutMismatchError(`${name}: ${what}; converted again from the grain directory`);
  let next = 0; // guest offset the map has reached
  let pos = layout.firstMarker;
  for (;;) {
    throwIfAborted(signal);
    if (pos + SECTOR > source.size) throw mismatch(`no end-of-stream marker before the end of the file (at offset ${pos})`);
    const head = await readExact(source, pos, 16, `${name}: stream marker at offset ${pos}`, signal);
    const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
    const value = Number(view.getBigUint64(0, true));
    const size = view.getUint32(8, true);
    if (size === 0) {
      const type = view.getUint32(12, true);
      if (type === MARKER_END_OF_STREAM) break;
      if (type !== MARKER_GRAIN_TABLE && type !== MARKER_GRAIN_DIRECTORY && type !== MARKER_FOOTER) throw mismatch(`unknown marker type ${type} at offset ${pos}`);
      if (!Number.isSafeInteger(value) || value > source.size / SECTOR) throw mismatch(`marker at offset ${pos} says ${value} sectors follow`);
      pos += SECTOR + value * SECTOR;
      continue;
    }
    const offset = value * SECTOR;
    // Grains in guest order, grain-aligned, inside the disk, of a size the decoder takes (up to two grains, as qemu).
    if (!Number.isSafeInteger(offset) || offset % grainBytes !== 0 || offset < next || offset >= virtualSize) {
      throw mismatch(`grain marker at offset ${pos} for guest offset ${offset} is out of order or outside the disk`);
    }
    if (size > 2 * grainBytes - 12 || pos + 12 + size > source.size) throw mismatch(`grain marker at offset ${pos} says ${size} bytes follow`);
    if (offset > next) yield { kind: 'zero', offset: next, length: offset - next };
    const length = Math.min(grainBytes, virtualSize - offset);
    walked.update(`${offset}:${pos};`);
    yield { kind: 'compressed', offset, length, fileOffset: pos, readLength: 12 + size, codec: 'vmdk-grain', decodedLength: grainBytes, decodedOffset: 0 };
    next = offset + length;
    pos += Math.ceil((12 + size) / SECTOR) * SECTOR;
  }

  // Every byte is in: what qemu would read, from the directory.
  const directory = await layout.openDirectory();
  try {
    if (directory.virtualSize !== virtualSize) throw mismatch(`the footer gives a capacity of ${directory.virtualSize} bytes, the header ${virtualSize}`);
    const listed = nodeCrypto().createHash('sha256');
    for await (const entry of directory.map(signal)) {
      if (entry.kind === 'zero') continue;
      if (entry.kind !== 'compressed' || entry.length !== Math.min(grainBytes, virtualSize - entry.offset)) throw mismatch(`the directory maps guest offset ${entry.offset} otherwise than by a compressed grain`);
      listed.update(`${entry.offset}:${entry.fileOffset};`);
    }
    if (listed.digest('hex') !== walked.digest('hex')) throw mismatch('the grain directory points to other grains than the markers hold');
  } finally {
    await directory.close();
  }
  if (next < virtualSize) yield { kind: 'zero', offset: next, length: virtualSize - next };
}
