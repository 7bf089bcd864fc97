import { AbortedError } from '../errors.js';
import type { RandomAccessSource } from '../source.js';

interface Segment {
  /** Where the segment starts in the joined address space. */
  at: number;
  source: RandomAccessSource;
  /** Closed (and for a scratch file, removed by its owner) with the joined source. */
  owned: boolean;
}

/**
 * Several sources laid one after another in one address space: the archive
 * itself at [0, archive.size), then whatever an archive member needs beside it
 * (a deflated zip member or a gzip'd OVF file staged into a scratch file, an
 * OVF file split in chunks read as one). Every member then has one place in one
 * source, so drivers read members through a MemberSource over it, and the one
 * reader reads every image's data from it, with the extent contract unchanged.
 *
 * Bytes between segments (alignment padding) read as zeros; nothing maps there,
 * since every entry is bounded to its member (compose.ts).
 */
export class JoinedSource implements RandomAccessSource {
  private readonly segments: Segment[] = [];
  private end = 0;

  constructor(
    readonly name: string,
    first?: RandomAccessSource,
  ) {
    if (first) this.append(first, { owned: false, align: 1 });
  }

  get size(): number {
    return this.end;
  }

  /** True once anything beyond the first source was added. */
  get extended(): boolean {
    return this.segments.length > 1;
  }

  /** Adds `source` after everything so far, at a multiple of `align`; returns where it starts. */
  append(source: RandomAccessSource, { owned, align = 4096 }: { owned: boolean; align?: number }): number {
    const at = Math.ceil(this.end / align) * align;
    if (!Number.isSafeInteger(at + source.size)) throw new RangeError(`${this.name}: joined source would exceed 2^53 bytes`);
    this.segments.push({ at, source, owned });
    this.end = at + source.size;
    // Present from the first segment that fetches ahead; each announcement goes to the segments it covers.
    if (source.willRead && !this.willRead) this.willRead = (start, end) => this.announce(start, end);
    return at;
  }

  /** Present once a segment has one (RandomAccessSource.willRead). */
  willRead?: (start: number, end: number) => void;

  private announce(start: number, end: number): void {
    for (let i = this.find(start); i < this.segments.length; i++) {
      const s = this.segments[i] as Segment;
      if (s.at >= end) break;
      const from = Math.max(start, s.at);
      const to = Math.min(end, s.at + s.source.size);
      if (to > from) s.source.willRead?.(from - s.at, to - s.at);
    }
  }

  /** The segment holding `offset`, or the index of the first one after it. */
  private find(offset: number): number {
    let lo = 0;
    let hi = this.segments.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const s = this.segments[mid] as Segment;
      if (s.at + s.source.size <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (signal?.aborted) throw new AbortedError();
    const end = Math.min(this.end, offset + length);
    if (end <= offset) return new Uint8Array(0);
    const i = this.find(offset);
    const s = this.segments[i];
    // The common case, one segment: its own bytes, no copy.
    if (s && s.at <= offset && end <= s.at + s.source.size) return s.source.read(offset - s.at, end - offset, signal);
    const out = Buffer.alloc(end - offset);
    const got = await this.readInto(out, offset, signal);
    return got === out.length ? out : out.subarray(0, got);
  }

  async readInto(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number> {
    if (signal?.aborted) throw new AbortedError();
    const want = Math.max(0, Math.min(target.length, this.end - offset));
    let done = 0;
    for (let i = this.find(offset); done < want; ) {
      const pos = offset + done;
      const s = this.segments[i];
      if (!s) break;
      if (pos < s.at) {
        // Padding before segment i; then segment i itself.
        const gap = Math.min(want - done, s.at - pos);
        target.fill(0, done, done + gap);
        done += gap;
        continue;
      }
      i++;
      const take = Math.min(want - done, s.at + s.source.size - pos);
      const window = target.subarray(done, done + take);
      let got: number;
      if (s.source.readInto) got = await s.source.readInto(window, pos - s.at, signal);
      else {
        const bytes = await s.source.read(pos - s.at, take, signal);
        window.set(bytes);
        got = bytes.length;
      }
      done += got;
      if (got < take) break; // the segment's source ended early: the caller reports the short read
    }
    return done;
  }

  async readIntoMany(targets: Uint8Array[], offsets: number[], signal?: AbortSignal): Promise<number[]> {
    // One segment with a batched reader takes the whole batch (the archive file through the native helper).
    const first = offsets.length > 0 ? this.segments[this.find(offsets[0] as number)] : undefined;
    const inOne = first && targets.every((t, i) => (offsets[i] as number) >= first.at && (offsets[i] as number) + t.length <= first.at + first.source.size);
    if (first && inOne && first.source.readIntoMany) return first.source.readIntoMany(targets, offsets.map((o) => o - first.at), signal);
    const out: number[] = [];
    for (let i = 0; i < targets.length; i++) out.push(await this.readInto(targets[i] as Uint8Array, offsets[i] as number, signal));
    return out;
  }

  /** The first source's allocation (the archive's, as qemu's actual-size of the file given). */
  async allocatedSize(): Promise<number | undefined> {
    return this.segments[0]?.source.allocatedSize?.();
  }

  async dataRanges(offset: number, end: number, max: number): Promise<number[] | undefined> {
    const s = this.segments[this.find(offset)];
    if (!s || offset < s.at || end > s.at + s.source.size || !s.source.dataRanges) return undefined;
    const ranges = await s.source.dataRanges(offset - s.at, end - s.at, max);
    return ranges?.map((r) => r + s.at);
  }

  /** Closes the sources it owns; the first (the archive) belongs to whoever opened it. */
  async close(): Promise<void> {
    const owned = this.segments.filter((s) => s.owned);
    this.segments.length = Math.min(this.segments.length, 1);
    this.end = this.segments[0]?.source.size ?? 0;
    let failure: unknown;
    for (const s of owned) await s.source.close().catch((err: unknown) => (failure ??= err));
    if (failure !== undefined) throw failure;
  }
}
