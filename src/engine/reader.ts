import { decode } from './decompress.js';
import { ImageCorruptError, throwIfAborted } from './errors.js';
import { readExact, type RandomAccessSource } from './source.js';
import type { DiskImage, Extent, MapEntry } from './types.js';

export interface ReadOptions {
  signal?: AbortSignal;
  /** Guest bytes gathered into one batch; two batches are in memory at most (one being consumed, one prefetched). */
  batchBytes?: number;
  /** Largest single read from the source. */
  maxReadBytes?: number;
  /** Reads in flight at once within a batch. */
  readConcurrency?: number;
  /** Optional guest range; defaults to the whole disk. */
  start?: number;
  end?: number;
}

const DEFAULTS = { batchBytes: 16 * 2 ** 20, maxReadBytes: 4 * 2 ** 20, readConcurrency: 4 };

type ReadEntry = Exclude<MapEntry, { kind: 'zero' }>;
interface ReadGroup {
  start: number;
  end: number;
  /** Reading past the end of the file is allowed only for compressed upper-bound reads. */
  mustEnd: number;
}
interface Batch {
  entries: MapEntry[];
  groups: ReadGroup[];
  /** For each entry, index of its group (or -1 for zero entries). */
  groupOf: number[];
}

/**
 * Turns a driver's map into data extents, written once for every format: holes
 * are never read, contiguous stored ranges are read in large coalesced reads with
 * several in flight, compressed clusters decode in parallel, and the next batch is
 * prefetched while the current one is consumed. Memory stays bounded by batchBytes.
 */
export async function* readExtents(image: DiskImage, source: RandomAccessSource, options: ReadOptions = {}): AsyncGenerator<Extent> {
  const batchBytes = options.batchBytes ?? DEFAULTS.batchBytes;
  const maxReadBytes = options.maxReadBytes ?? DEFAULTS.maxReadBytes;
  const readConcurrency = options.readConcurrency ?? DEFAULTS.readConcurrency;
  const { signal } = options;
  const rangeStart = options.start ?? 0;
  const rangeEnd = options.end ?? image.virtualSize;

  const iterator = clip(splitLarge(image.map(signal), maxReadBytes), rangeStart, rangeEnd)[Symbol.asyncIterator]();
  let exhausted = false;
  let expectedOffset = rangeStart;

  const nextBatch = async (): Promise<Batch | null> => {
    if (exhausted) return null;
    const entries: MapEntry[] = [];
    const groups: ReadGroup[] = [];
    const groupOf: number[] = [];
    let guestBytes = 0;
    while (guestBytes < batchBytes) {
      const step = await iterator.next();
      if (step.done) {
        exhausted = true;
        break;
      }
      const entry = step.value;
      if (entry.offset !== expectedOffset || entry.length <= 0) {
        throw new ImageCorruptError(`image map is not contiguous at guest offset ${expectedOffset} (got entry at ${entry.offset}, length ${entry.length})`);
      }
      expectedOffset += entry.length;
      const prev = entries[entries.length - 1];
      if (entry.kind === 'zero' && prev?.kind === 'zero') {
        prev.length += entry.length; // merge runs of holes
        guestBytes += entry.length;
        continue;
      }
      entries.push(entry);
      guestBytes += entry.length;
      if (entry.kind === 'zero') {
        groupOf.push(-1);
        continue;
      }
      const [start, end, mustEnd] = fileRange(entry, source.size);
      const last = groups[groups.length - 1];
      // Coalesce with the previous read when the file ranges touch or overlap.
      if (last && start >= last.start && start <= last.end && Math.max(end, last.end) - last.start <= maxReadBytes) {
        last.end = Math.max(last.end, end);
        last.mustEnd = Math.max(last.mustEnd, mustEnd);
      } else {
        groups.push({ start, end, mustEnd });
      }
      groupOf.push(groups.length - 1);
    }
    if (entries.length === 0) return null;
    return { entries, groups, groupOf };
  };

  const materialize = async (batch: Batch): Promise<Extent[]> => {
    throwIfAborted(signal);
    const buffers = await mapLimited(batch.groups, readConcurrency, async (g) => {
      if (g.mustEnd > source.size) {
        throw new ImageCorruptError(
          `data at file offset ${g.start}..${g.mustEnd} lies beyond the end of the file (${source.size} bytes); the image is truncated or corrupt`,
        );
      }
      return readExact(source, g.start, g.end - g.start, 'image data', signal);
    });
    return Promise.all(
      batch.entries.map(async (entry, i): Promise<Extent> => {
        if (entry.kind === 'zero') return { kind: 'zero', offset: entry.offset, length: entry.length };
        const gi = batch.groupOf[i] as number;
        const group = batch.groups[gi] as ReadGroup;
        const buf = buffers[gi] as Uint8Array;
        const rel = entry.fileOffset - group.start;
        if (entry.kind === 'stored') {
          return { kind: 'data', offset: entry.offset, length: entry.length, data: buf.subarray(rel, rel + entry.length) };
        }
        const input = buf.subarray(rel, Math.min(buf.length, rel + entry.readLength));
        const decoded = await decode(entry.codec, input, entry.decodedLength, `compressed data at file offset ${entry.fileOffset}`);
        if (decoded.length < entry.decodedOffset + entry.length) {
          throw new ImageCorruptError(
            `compressed data at file offset ${entry.fileOffset} decodes to ${decoded.length} bytes, fewer than the ${entry.decodedOffset + entry.length} needed`,
          );
        }
        return {
          kind: 'data',
          offset: entry.offset,
          length: entry.length,
          data: decoded.subarray(entry.decodedOffset, entry.decodedOffset + entry.length),
        };
      }),
    );
  };

  const fetchNext = (): Promise<Extent[] | null> => nextBatch().then((b) => (b ? materialize(b) : null));
  let pending = fetchNext();
  try {
    for (;;) {
      const extents = await pending;
      if (!extents) break;
      pending = fetchNext(); // prefetch while the caller consumes this batch
      pending.catch(() => {}); // surfaced when awaited
      for (const extent of extents) yield extent;
    }
    if (expectedOffset !== rangeEnd) {
      throw new ImageCorruptError(`image map ends at ${expectedOffset}, expected ${rangeEnd}`);
    }
  } finally {
    await iterator.return?.(undefined);
  }
}

function fileRange(entry: ReadEntry, fileSize: number): [start: number, end: number, mustEnd: number] {
  if (entry.kind === 'stored') {
    const end = entry.fileOffset + entry.length;
    return [entry.fileOffset, end, end];
  }
  // Compressed sizes are upper bounds (sector-rounded); clamp to the file, but the
  // first byte must exist.
  const end = Math.min(fileSize, entry.fileOffset + entry.readLength);
  return [entry.fileOffset, Math.max(end, entry.fileOffset + 1), entry.fileOffset + 1];
}

/** Splits stored entries larger than maxBytes so a single read stays bounded. */
async function* splitLarge(entries: AsyncIterable<MapEntry>, maxBytes: number): AsyncGenerator<MapEntry> {
  for await (const e of entries) {
    if (e.kind !== 'stored' || e.length <= maxBytes) {
      yield e;
      continue;
    }
    for (let done = 0; done < e.length; done += maxBytes) {
      const length = Math.min(maxBytes, e.length - done);
      yield { kind: 'stored', offset: e.offset + done, length, fileOffset: e.fileOffset + done };
    }
  }
}

/** Restricts a map to [start, end). */
async function* clip(entries: AsyncIterable<MapEntry>, start: number, end: number): AsyncGenerator<MapEntry> {
  for await (const e of entries) {
    const s = Math.max(e.offset, start);
    const t = Math.min(e.offset + e.length, end);
    if (e.offset >= end) return;
    if (t <= s) continue;
    const cut = s - e.offset;
    if (e.kind === 'zero') yield { kind: 'zero', offset: s, length: t - s };
    else if (e.kind === 'stored') yield { kind: 'stored', offset: s, length: t - s, fileOffset: e.fileOffset + cut };
    else yield { ...e, offset: s, length: t - s, decodedOffset: e.decodedOffset + cut };
  }
}

async function mapLimited<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i] as T);
    }
  });
  await Promise.all(workers);
  return results;
}
