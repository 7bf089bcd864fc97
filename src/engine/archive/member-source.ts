import { AbortedError } from '../errors.js';
import type { RandomAccessSource } from '../source.js';

/**
 * One archive member's bytes as a source of their own: a window [offset,
 * offset + size) of the archive. Tar (and stored zip) members are kept
 * verbatim, so random access needs no extraction; nothing outside the window
 * is ever read through it.
 */
export class MemberSource implements RandomAccessSource {
  constructor(
    private readonly archive: RandomAccessSource,
    /** Where the member's bytes start in the archive. */
    readonly offset: number,
    readonly size: number,
    readonly name: string,
  ) {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(size) || offset < 0 || size < 0 || offset + size > archive.size) {
      throw new RangeError(`member ${name} [${offset}, +${size}) lies outside the archive (${archive.size} bytes)`);
    }
    // Announcements go on to an archive that fetches ahead (a tar on a URL); decided here, once, so that a
    // source present only when its archive has one never asks the archive again (sources can nest in cycles).
    const ahead = archive.willRead?.bind(archive);
    if (ahead) {
      this.willRead = (start, end) => {
        const from = Math.max(0, Math.min(start, this.size));
        const to = Math.max(from, Math.min(end, this.size));
        if (to > from) ahead(this.offset + from, this.offset + to);
      };
    }
  }

  /** Present when the archive has one (RandomAccessSource.willRead). */
  readonly willRead?: (start: number, end: number) => void;

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (signal?.aborted) throw new AbortedError();
    const start = Math.max(0, Math.min(offset, this.size));
    const end = Math.max(start, Math.min(this.size, offset + length));
    if (end === start) return new Uint8Array(0);
    return this.archive.read(this.offset + start, end - start, signal);
  }

  async readInto(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number> {
    const want = Math.max(0, Math.min(target.length, this.size - offset));
    if (want === 0) return 0;
    const window = target.subarray(0, want);
    if (this.archive.readInto) return this.archive.readInto(window, this.offset + offset, signal);
    const bytes = await this.archive.read(this.offset + offset, want, signal);
    window.set(bytes);
    return bytes.length;
  }

  async dataRanges(offset: number, end: number, max: number): Promise<number[] | undefined> {
    if (!this.archive.dataRanges) return undefined;
    const ranges = await this.archive.dataRanges(this.offset + offset, this.offset + Math.min(end, this.size), max);
    return ranges?.map((r) => Math.min(this.size, Math.max(0, r - this.offset)));
  }

  /** The archive is closed by whoever opened it. */
  async close(): Promise<void> {}
}
