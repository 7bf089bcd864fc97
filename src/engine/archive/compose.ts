/**
 * Images made of archive members, presented as one DiskImage whose map points
 * into the archive itself. Tar members are stored verbatim, so a member's byte
 * at `x` is the archive's byte at `member.offset + x`: drivers read their member
 * through a MemberSource, and the one reader reads every member's data from the
 * archive source, with the extent contract unchanged.
 *
 * - memberImage: one driver's image, its map shifted into the archive.
 * - layeredImage: an overlay over its backing image (a qcow2 chain), flattened
 *   as qemu-img convert flattens it.
 * - concatImage: extents one after another (a split VMDK).
 */
import { ImageCorruptError, UnsupportedFeatureError, throwIfAborted } from '../errors.js';
import { encryptedFileRange } from '../crypto/reader-step.js';
import type { SectorCipher } from '../crypto/sector-cipher.js';
import type { ArchiveInfo, CheckReport, DiskImage, FormatId, FormatInfo, LayerEntry, MapEntry } from '../types.js';
import type { MemberSource } from './member-source.js';

/** Maps a driver's entry (member coordinates) to archive coordinates, refusing anything outside the member. */
function shiftEntry<E extends LayerEntry>(entry: E, member: MemberSource): E {
  if (entry.kind === 'zero' || entry.kind === 'backing') return entry;
  const at = `${member.name}: data for guest offset ${entry.offset} at member offset ${entry.fileOffset}`;
  if (!Number.isSafeInteger(entry.fileOffset) || entry.fileOffset < 0 || entry.fileOffset >= member.size) {
    throw new ImageCorruptError(`${at} lies beyond the end of the member (${member.size} bytes)`);
  }
  if (entry.kind === 'stored') {
    const stored: Extract<MapEntry, { kind: 'stored' }> = entry;
    const end = entry.cipher ? encryptedFileRange(entry, entry.cipher)[1] : entry.fileOffset + entry.length;
    if (end > member.size) throw new ImageCorruptError(`${at} (${entry.length} bytes) runs past the end of the member (${member.size} bytes)`);
    const moved = { ...stored, fileOffset: stored.fileOffset + member.offset };
    if (stored.cipher) moved.cipher = shiftCipher(stored.cipher, member.offset);
    return moved as E;
  }
  // A compressed read is an upper bound: clamp it to the member, never into the next one.
  return { ...entry, fileOffset: entry.fileOffset + member.offset, readLength: Math.min(entry.readLength, member.size - entry.fileOffset) };
}

const shiftedCiphers = new WeakMap<SectorCipher, Map<number, SectorCipher>>();

/** A cipher whose IVs number sectors by the file offset keeps numbering them from the member's start. */
function shiftCipher(cipher: SectorCipher, memberOffset: number): SectorCipher {
  if (cipher.ivFrom !== 'file') return cipher;
  if (memberOffset % cipher.sectorSize !== 0) throw new UnsupportedFeatureError(`an encrypted member that does not start on a ${cipher.sectorSize}-byte boundary of the archive`);
  let byOffset = shiftedCiphers.get(cipher);
  if (!byOffset) shiftedCiphers.set(cipher, (byOffset = new Map()));
  let shifted = byOffset.get(memberOffset);
  if (!shifted) {
    const base = memberOffset / cipher.sectorSize;
    shifted = { sectorSize: cipher.sectorSize, ivFrom: 'file', decrypt: (input, output, firstSector) => cipher.decrypt(input, output, firstSector - base) };
    byOffset.set(memberOffset, shifted);
  }
  return shifted;
}

async function* shifted<E extends LayerEntry>(entries: AsyncIterable<E>, member: MemberSource): AsyncGenerator<E> {
  for await (const entry of entries) yield shiftEntry(entry, member);
}

/** The part of `e` inside [start, end), or undefined. */
function clipEntry<E extends LayerEntry>(e: E, start: number, end: number): E | undefined {
  const s = Math.max(e.offset, start);
  const t = Math.min(e.offset + e.length, end);
  if (t <= s) return undefined;
  const cut = s - e.offset;
  if (e.kind === 'stored') return { ...e, offset: s, length: t - s, fileOffset: e.fileOffset + cut };
  if (e.kind === 'compressed') return { ...e, offset: s, length: t - s, decodedOffset: e.decodedOffset + cut };
  return { ...e, offset: s, length: t - s };
}

/** Moves every entry by `delta` guest bytes. */
function moveEntry<E extends LayerEntry>(e: E, delta: number): E {
  return { ...e, offset: e.offset + delta };
}

abstract class ComposedImage implements DiskImage {
  abstract readonly format: FormatId;
  abstract readonly virtualSize: number;
  archive?: ArchiveInfo;
  abstract map(signal?: AbortSignal): AsyncIterable<MapEntry>;
  abstract info(): FormatInfo;
  abstract close(): Promise<void>;
}

/** A single member's image, its map in archive coordinates. */
export class MemberImage extends ComposedImage {
  readonly format: FormatId;
  readonly virtualSize: number;
  constructor(
    readonly inner: DiskImage,
    readonly member: MemberSource,
  ) {
    super();
    this.format = inner.format;
    this.virtualSize = inner.virtualSize;
  }
  map(signal?: AbortSignal): AsyncIterable<MapEntry> {
    return shifted(this.inner.map(signal), this.member);
  }
  /** For an overlay opened with backingSupplied. */
  layerMap(signal?: AbortSignal): AsyncIterable<LayerEntry> {
    if (!this.inner.layerMap) return this.map(signal);
    return shifted(this.inner.layerMap(signal), this.member);
  }
  info(): FormatInfo {
    return this.inner.info();
  }
  readable(): void {
    this.inner.readable?.();
  }
  async check(signal?: AbortSignal): Promise<CheckReport> {
    if (this.inner.check) return this.inner.check(signal);
    return { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/**
 * An overlay over its backing image: where the overlay holds nothing, the
 * backing image's data shows through, and past the end of a shorter backing
 * image the disk reads as zeros (qemu's rule).
 */
export class LayeredImage extends ComposedImage {
  readonly format: FormatId;
  readonly virtualSize: number;
  constructor(
    /** The child: one member's image, or a split VMDK child (its descriptor file names the parent). */
    readonly top: MemberImage | ConcatImage,
    readonly backing: DiskImage,
  ) {
    super();
    this.format = top.format;
    this.virtualSize = top.virtualSize;
  }

  async *map(signal?: AbortSignal): AsyncGenerator<MapEntry> {
    const below = this.backing.map(signal)[Symbol.asyncIterator]();
    let held: MapEntry | undefined; // the backing entry under the cursor
    let belowDone = false;
    const backingSize = this.backing.virtualSize;
    try {
      for await (const entry of this.top.layerMap(signal)) {
        if (entry.kind !== 'backing') {
          yield entry;
          continue;
        }
        const start = entry.offset;
        const end = entry.offset + entry.length;
        let pos = start;
        while (pos < end && pos < backingSize) {
          throwIfAborted(signal);
          if (!held || held.offset + held.length <= pos) {
            if (belowDone) break;
            const step = await below.next();
            if (step.done) {
              belowDone = true;
              break;
            }
            held = step.value;
            continue;
          }
          const piece = clipEntry(held, pos, Math.min(end, backingSize));
          if (!piece) throw new ImageCorruptError(`backing image map is not contiguous at guest offset ${pos}`);
          yield piece;
          pos = piece.offset + piece.length;
        }
        if (pos < end) {
          if (pos < backingSize) throw new ImageCorruptError(`the backing image's map ends at guest offset ${pos}, before its size ${backingSize}`);
          yield { kind: 'zero', offset: pos, length: end - pos };
        }
      }
    } finally {
      await below.return?.(undefined);
    }
  }

  info(): FormatInfo {
    return this.top.info();
  }

  /**
   * Every layer is checked (qemu-img check looks at the top image only; a bundle has
   * no qemu equivalent): counts are summed, each finding names its member, and the
   * top's fields (image end offset, clusters) are kept.
   */
  async check(signal?: AbortSignal): Promise<CheckReport> {
    // Each finding is prefixed with its member's source name (`archive/member`).
    const named = (r: CheckReport, source: string): string[] => r.messages.map((m) => (m.startsWith(`${source}: `) ? m : `${source}: ${m}`));
    // A split VMDK's findings already name their extent members.
    const topMessages = (r: CheckReport): string[] => (this.top instanceof MemberImage ? named(r, this.top.member.name) : r.messages);
    const top = await this.top.check(signal);
    const below = this.backing.check ? await this.backing.check(signal) : undefined;
    if (!below) return { ...top, messages: topMessages(top) };
    return {
      corruptions: top.corruptions + below.corruptions,
      leaks: top.leaks + below.leaks,
      checkErrors: top.checkErrors + below.checkErrors,
      messages: [...topMessages(top), ...(this.backing instanceof MemberImage ? named(below, this.backing.member.name) : below.messages)],
      fields: top.fields,
    };
  }

  async close(): Promise<void> {
    await this.top.close();
    await this.backing.close();
  }
}

export interface ConcatPart {
  /** Guest bytes the part covers. */
  length: number;
  /** The part's map (archive coordinates, guest offsets from the part's start); undefined reads as zeros. */
  image?: DiskImage;
  /** A stored run instead of an image (a FLAT extent): archive offset of its first byte. */
  storedAt?: number;
  name?: string;
}

/** Parts one after another on the guest (a split VMDK's extents). */
export class ConcatImage extends ComposedImage {
  readonly virtualSize: number;
  constructor(
    readonly format: FormatId,
    readonly parts: ConcatPart[],
    private readonly formatInfo: FormatInfo,
  ) {
    super();
    this.virtualSize = parts.reduce((sum, p) => sum + p.length, 0);
  }

  map(signal?: AbortSignal): AsyncGenerator<MapEntry> {
    return this.entries(signal, false) as AsyncGenerator<MapEntry>;
  }

  /** For a split child: its extents' never-written grains as 'backing' (LayeredImage fills them from the parent). */
  layerMap(signal?: AbortSignal): AsyncGenerator<LayerEntry> {
    return this.entries(signal, true);
  }

  private async *entries(signal: AbortSignal | undefined, layered: boolean): AsyncGenerator<LayerEntry> {
    let base = 0;
    for (const part of this.parts) {
      throwIfAborted(signal);
      if (part.storedAt !== undefined) {
        yield { kind: 'stored', offset: base, length: part.length, fileOffset: part.storedAt };
      } else if (!part.image) {
        yield { kind: 'zero', offset: base, length: part.length };
      } else {
        // The descriptor's extent size rules: the extent's own disk is cut or padded to it.
        let pos = 0;
        const image = part.image;
        const entries: AsyncIterable<LayerEntry> = layered && image instanceof MemberImage ? image.layerMap(signal) : image.map(signal);
        for await (const entry of entries) {
          const piece = clipEntry(entry, 0, part.length);
          if (!piece) break;
          yield moveEntry(piece, base);
          pos = piece.offset + piece.length;
        }
        if (pos < part.length) yield { kind: 'zero', offset: base + pos, length: part.length - pos };
      }
      base += part.length;
    }
  }

  info(): FormatInfo {
    return this.formatInfo;
  }

  /**
   * As qemu's vmdk check walks every extent of a split VMDK: each sparse extent's
   * grain tables are checked (the same check as a monolithic VMDK's), a flat
   * extent's range was bounded by its member when the image was opened, a ZERO
   * extent has nothing to check. Counts are summed; each finding names its extent
   * member and where that extent starts on the guest (qemu numbers the disk's sectors).
   */
  async check(signal?: AbortSignal): Promise<CheckReport> {
    const report: CheckReport = { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], fields: {} };
    let base = 0;
    for (const part of this.parts) {
      throwIfAborted(signal);
      const image = part.image;
      if (image?.check) {
        const r = await image.check(signal);
        const source = image instanceof MemberImage ? image.member.name : (part.name ?? 'extent');
        report.corruptions += r.corruptions;
        report.leaks += r.leaks;
        report.checkErrors += r.checkErrors;
        for (const m of r.messages) report.messages.push(`${source} (extent at guest offset ${base}): ${m}`);
      }
      base += part.length;
    }
    return report;
  }

  async close(): Promise<void> {
    for (const part of this.parts) await part.image?.close();
  }
}
