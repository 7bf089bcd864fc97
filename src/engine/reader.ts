import { alignedBuffer, isShared } from './aligned.js';
import type { DirectTarget } from './decompress.js';
import { decryptEntry, encryptedBytes, encryptedFileRange } from './crypto/reader-step.js';
import { ImageCorruptError, throwIfAborted } from './errors.js';
import { mapFileRanges } from './formats/raw.js';
import type { RandomAccessSource } from './source.js';
import type { DiskImage, Extent, MapEntry } from './types.js';

export interface ReadOptions {
  signal?: AbortSignal;
  /** Guest bytes gathered into one batch. */
  batchBytes?: number;
  /** Largest single read from the source. */
  maxReadBytes?: number;
  /** Reads in flight at once within a batch. */
  readConcurrency?: number;
  /** Batches read ahead of the one being consumed. */
  prefetchBatches?: number;
  /**
   * For a source that fetches ahead (RandomAccessSource.willRead): bytes of reads
   * cut from the map and announced to it beyond the batches being read.
   */
  announceBytes?: number;
  /** Optional guest range; defaults to the whole disk. */
  start?: number;
  end?: number;
  /**
   * Compressed clusters are written straight to this file at their guest offset
   * by the thread that decoded them (decompress.ts decodeToFile) and come out as
   * `written` extents with no bytes; the ones it declines come out as ordinary
   * data. For a local raw file sink that asked for it (RawFileSink.directTarget).
   */
  directWrite?: DirectTarget;
}

/**
 * The decoders (decompress.ts: zlib, zstd, the decode pool's worker threads, the
 * native decoder), imported the first time a batch holds a compressed cluster or
 * an encrypted run: an uncompressed conversion never loads them, which is part of
 * the CLI's start-up (measured in bench/results/2026-12-02-session6-uncompressed.md).
 */
type Decoders = typeof import('./decompress.js');
let decoders: Promise<Decoders> | undefined;
const loadDecoders = (): Promise<Decoders> => (decoders ??= import('./decompress.js'));

const DEFAULTS = { batchBytes: 8 * 2 ** 20, maxReadBytes: 4 * 2 ** 20, readConcurrency: 4, prefetchBatches: 2, announceBytes: 32 * 2 ** 20 };

type ReadEntry = Exclude<MapEntry, { kind: 'zero' }>;
/** The `data` of a written extent (ReadOptions.directWrite). */
const NO_BYTES = new Uint8Array(0);
/**
 * Gives every object shape of a map entry and an extent (the literals the drivers
 * and this reader make, property for property) number fields that hold any
 * offset from the start. V8 first stores small integers in a field as such and,
 * when an offset passes 2 GiB, changes the field's representation, which throws
 * away the optimized code of every function that had seen the shape: on the
 * bench's 4 GiB qcow2 that was 9 deoptimizations and the L2 walk compiled three
 * more times ("not a Smi", then "wrong map"), 0.1-0.25 s each on a compiler
 * thread. Made once here, with an offset past 2^32, before any entry exists.
 */
function primeShapes(): void {
  const far = 2 ** 32;
  const shapes: Array<MapEntry | Extent> = [
    { kind: 'zero', offset: far, length: far },
    { kind: 'zero', offset: far, length: far, status: 'zeroed' },
    { kind: 'zero', offset: far, length: far, fileOffset: far },
    { kind: 'zero', offset: far, length: far, status: 'hole', fileOffset: far },
    { kind: 'stored', offset: far, length: far, fileOffset: far },
    { kind: 'stored', offset: far, length: far, fileOffset: far, preallocated: true },
    { kind: 'compressed', offset: far, length: far, fileOffset: far, readLength: far, codec: 'deflate', decodedLength: far, decodedOffset: far },
    { kind: 'data', offset: far, length: far, data: NO_BYTES },
    { kind: 'data', offset: far, length: far, data: NO_BYTES, written: true },
  ];
  shapes.length = 0;
}
primeShapes();

interface ReadGroup {
  start: number;
  end: number;
  /** Reading past the end of the file is allowed only for compressed upper-bound reads. */
  mustEnd: number;
  /** Where the group's bytes go in the batch's buffer. */
  at: number;
}
interface Batch {
  entries: MapEntry[];
  groups: ReadGroup[];
  /** For each entry, index of its group (or -1 for zero entries). */
  groupOf: number[];
  readBytes: number;
}
interface LoadedBatch {
  extents: Extent[];
  buffer: Buffer | undefined;
  /** Where the batch's clusters decoded to, recycled with `buffer`. */
  decoded: Buffer | undefined;
  /** Read and written by the source itself (copyVerbatim): no buffers. */
  copied?: true;
}

/**
 * Turns a driver's map into data extents, written once for every format: holes
 * are never read, contiguous stored ranges are read in large coalesced reads with
 * several in flight, compressed clusters decode in parallel as soon as their read
 * lands, and a few batches are read ahead while the current one is consumed.
 *
 * Read buffers are recycled (no page faults or GC churn per gigabyte), so an
 * extent's `data` is valid only until the next extent is requested: consumers
 * finish with it (write, hash, copy) before asking for more. Memory stays bounded
 * by (prefetchBatches + 2) × 2 × batchBytes.
 */
export async function* readExtents(image: DiskImage, source: RandomAccessSource, options: ReadOptions = {}): AsyncGenerator<Extent> {
  for await (const batch of readExtentBatches(image, source, options)) yield* batch;
}

/**
 * The same extents as readExtents, a batch at a time (one coalesced read's
 * worth, up to `batchBytes` of guest data): for consumers that hand many
 * extents to the kernel at once (RawFileSink.writeBatch). A batch's bytes are
 * valid until the next batch is requested.
 */
export async function* readExtentBatches(image: DiskImage, opened: RandomAccessSource, options: ReadOptions = {}): AsyncGenerator<Extent[]> {
  // An archive with staged members maps into a source of its own (archive/joined-source.ts).
  const source = image.readsFrom ?? opened;
  const batchBytes = options.batchBytes ?? DEFAULTS.batchBytes;
  const maxReadBytes = options.maxReadBytes ?? DEFAULTS.maxReadBytes;
  const readConcurrency = options.readConcurrency ?? DEFAULTS.readConcurrency;
  const prefetchBatches = Math.max(1, options.prefetchBatches ?? DEFAULTS.prefetchBatches);
  // Compressed reads are upper bounds and may exceed the guest bytes they produce.
  const arenaBytes = Math.max(2 * batchBytes, maxReadBytes);
  const { signal } = options;
  const rangeStart = options.start ?? 0;
  const rangeEnd = options.end ?? image.virtualSize;
  // Whether compressed clusters go straight to options.directWrite: known once the decoders are loaded (load()).
  let direct: DirectTarget | undefined;
  let loadedDecoders: Decoders | undefined;

  const iterator = clip(splitLarge(bridgeFileHoles(overFileHoles(image.map(signal), source, signal), source.size), maxReadBytes), rangeStart, rangeEnd)[Symbol.asyncIterator]();
  let exhausted = false;
  let carried: MapEntry | undefined; // pulled from the map but left for the next batch
  let expectedOffset = rangeStart;
  const freeArenas: Buffer[] = [];
  const freeSharedArenas: Buffer[] = [];
  // Clusters decode side by side into a recycled arena (no allocation or GC per
  // cluster), so consecutive ones can leave as one extent.
  const decodedArenaBytes = batchBytes + 2 ** 20;
  const freeDecodedArenas: Buffer[] = [];

  const nextBatch = async (): Promise<Batch | null> => {
    if (exhausted && !carried) return null;
    const entries: MapEntry[] = [];
    const groups: ReadGroup[] = [];
    const groupOf: number[] = [];
    let guestBytes = 0;
    let readBytes = 0;
    while (guestBytes < batchBytes) {
      let entry: MapEntry;
      if (carried) {
        entry = carried;
        carried = undefined;
      } else {
        if (exhausted) break;
        const step = await iterator.next();
        if (step.done) {
          exhausted = true;
          break;
        }
        entry = step.value;
        if (entry.offset !== expectedOffset || entry.length <= 0) {
          throw new ImageCorruptError(`image map is not contiguous at guest offset ${expectedOffset} (got entry at ${entry.offset}, length ${entry.length})`);
        }
        expectedOffset += entry.length;
      }
      const prev = entries[entries.length - 1];
      if (entry.kind === 'zero') {
        if (prev?.kind === 'zero') prev.length += entry.length; // merge runs of holes
        else {
          entries.push({ ...entry });
          groupOf.push(-1);
        }
        guestBytes += entry.length;
        continue;
      }
      const [start, end, mustEnd] = fileRange(entry, source.size);
      const last = groups[groups.length - 1];
      // Coalesce with the previous read when the file ranges touch or overlap.
      const extendsLast = last !== undefined && start >= last.start && start <= last.end && Math.max(end, last.end) - last.start <= maxReadBytes;
      const growth = extendsLast ? Math.max(0, end - last.end) : end - start;
      if (entries.length > 0 && readBytes + growth > arenaBytes) {
        carried = entry; // the batch's buffer is full
        break;
      }
      readBytes += growth;
      if (extendsLast) {
        last.end = Math.max(last.end, end);
        last.mustEnd = Math.max(last.mustEnd, mustEnd);
      } else {
        groups.push({ start, end, mustEnd, at: readBytes - growth });
      }
      entries.push(entry);
      groupOf.push(groups.length - 1);
      guestBytes += entry.length;
    }
    if (entries.length === 0) return null;
    return { entries, groups, groupOf, readBytes };
  };

  const decodeEntry = async (entry: ReadEntry, group: ReadGroup, bytes: Uint8Array, target: Uint8Array | undefined): Promise<Extent> => {
    const rel = entry.fileOffset - group.start;
    if (entry.kind === 'stored') {
      if (entry.cipher) return decryptEntry(entry, entry.cipher, bytes, group.start, target);
      return { kind: 'data', offset: entry.offset, length: entry.length, data: bytes.subarray(rel, rel + entry.length) };
    }
    const input = bytes.subarray(rel, Math.min(bytes.length, rel + entry.readLength));
    const { decode } = loadedDecoders ?? (await loadDecoders());
    const decoded = await decode(entry.codec, input, entry.decodedLength, `compressed data at file offset ${entry.fileOffset}`, target);
    if (decoded.length < entry.decodedOffset + entry.length) {
      throw new ImageCorruptError(
        `compressed data at file offset ${entry.fileOffset} decodes to ${decoded.length} bytes, fewer than the ${entry.decodedOffset + entry.length} needed`,
      );
    }
    return { kind: 'data', offset: entry.offset, length: entry.length, data: decoded.subarray(entry.decodedOffset, entry.decodedOffset + entry.length) };
  };

  /** A compressed cluster written to `direct` by the decoding thread; where that declines, decoded here as any other. */
  const decodeDirect = async (entry: Extract<ReadEntry, { kind: 'compressed' }>, group: ReadGroup, bytes: Uint8Array, target: DirectTarget): Promise<Extent> => {
    const rel = entry.fileOffset - group.start;
    const input = bytes.subarray(rel, Math.min(bytes.length, rel + entry.readLength));
    let written: boolean;
    try {
      const { decodeToFile } = loadedDecoders ?? (await loadDecoders());
      written = await decodeToFile(entry.codec, input, entry.decodedLength, target, entry.offset, entry.decodedOffset, entry.length);
    } catch (err) {
      throw target.writeError ? target.writeError(err, entry.offset) : err;
    }
    if (written) {
      return { kind: 'data', offset: entry.offset, length: entry.length, data: NO_BYTES, written: true };
    }
    return decodeEntry(entry, group, bytes, undefined);
  };

  /**
   * A stored run of a compressed image written to `direct` by threadpool threads, in parallel
   * pieces (decompress.ts writeToFile), while the batch's clusters decode: otherwise the sink
   * writes it on one thread once the whole batch has decoded. Declined: an ordinary data extent.
   */
  const writeDirect = async (entry: Extract<ReadEntry, { kind: 'stored' }>, group: ReadGroup, bytes: Uint8Array, target: DirectTarget): Promise<Extent> => {
    let written: boolean;
    try {
      const { writeToFile } = loadedDecoders ?? (await loadDecoders());
      written = await writeToFile(bytes, target, entry.offset, entry.fileOffset - group.start, entry.length);
    } catch (err) {
      throw target.writeError ? target.writeError(err, entry.offset) : err;
    }
    return written ? { kind: 'data', offset: entry.offset, length: entry.length, data: NO_BYTES, written: true } : decodeEntry(entry, group, bytes, undefined);
  };
  // Set once a batch held a compressed cluster: from then on stored runs go to `direct` too (writeDirect).
  let compressedImage = false;

  /**
   * A batch of plain stored data and holes that nothing decodes or writes on the way (every
   * batch of an uncompressed, unencrypted image): read, then cut into extents. Kept apart from
   * loadDecoding so that V8 compiles this small function for the common path, not the whole
   * decoding one (which took 100-350 ms on a compiler thread under load).
   */
  const loadVerbatim = async (batch: Batch): Promise<LoadedBatch> => {
    const { groups, entries, groupOf } = batch;
    // Page-aligned (aligned.ts): the kernel's copies into them run several times faster.
    const buffer = batch.readBytes === 0 ? undefined : batch.readBytes <= arenaBytes ? (freeArenas.pop() ?? alignedBuffer(arenaBytes)) : alignedBuffer(batch.readBytes);
    const views: Uint8Array[] = new Array(groups.length);
    for (let gi = 0; gi < groups.length; gi++) {
      const group = groups[gi] as ReadGroup;
      // Stored data only here, so end = mustEnd.
      if (group.mustEnd > source.size) throw beyondEnd(group, source.size);
      views[gi] = (buffer as Buffer).subarray(group.at, group.at + (group.end - group.start));
    }
    if (source.readIntoMany && groups.length > 1) {
      // Every read of the batch in one call.
      const got = await source.readIntoMany(views, groups.map((g) => g.start), signal);
      for (let gi = 0; gi < groups.length; gi++) {
        const group = groups[gi] as ReadGroup;
        const want = group.end - group.start;
        if (got[gi] !== want) throw new ImageCorruptError(`image data: short read at offset ${group.start} (${got[gi] ?? 0} of ${want} bytes)`);
      }
    } else {
      await mapLimited(groups, readConcurrency, (group, gi) => readInto(source, views[gi] as Uint8Array, group.start, signal));
    }
    const extents: Extent[] = new Array(entries.length);
    for (let i = 0; i < entries.length; i++) {
      const entry = entries[i] as MapEntry;
      if (entry.kind === 'stored') {
        const rel = entry.fileOffset - (groups[groupOf[i] as number] as ReadGroup).start;
        extents[i] = { kind: 'data', offset: entry.offset, length: entry.length, data: (views[groupOf[i] as number] as Uint8Array).subarray(rel, rel + entry.length) };
      } else {
        extents[i] = { kind: 'zero', offset: entry.offset, length: entry.length };
      }
    }
    return { extents, buffer, decoded: undefined };
  };

  /**
   * A verbatim batch bound for options.directWrite from a source that copies into it (a local
   * file): its stored runs are read and written in one threadpool trip, each piece written while
   * it is still in the CPU's caches (source.copyToFile), and come out as `written` extents. No
   * arena: the bytes never reach JavaScript. The batch's bounds are checked as loadVerbatim's.
   */
  const copying = options.directWrite !== undefined && source.copyToFile ? { target: options.directWrite, copy: source.copyToFile.bind(source) } : undefined;
  const copyVerbatim = async (batch: Batch, { target, copy }: NonNullable<typeof copying>): Promise<LoadedBatch> => {
    const { groups, entries } = batch;
    for (const group of groups) if (group.mustEnd > source.size) throw beyondEnd(group, source.size);
    const fileOffsets: number[] = [];
    const lengths: number[] = [];
    const positions: number[] = [];
    const extents: Extent[] = new Array(entries.length);
    let want = 0;
    for (let i = 0; i < entries.length; i++) {
      const entry = entries[i] as MapEntry;
      if (entry.kind !== 'stored') {
        extents[i] = { kind: 'zero', offset: entry.offset, length: entry.length };
        continue;
      }
      extents[i] = { kind: 'data', offset: entry.offset, length: entry.length, data: NO_BYTES, written: true };
      want += entry.length;
      // One run for entries that follow each other both in the file and on the guest (clusters allocated in order).
      const last = lengths.length - 1;
      if (last >= 0 && (fileOffsets[last] as number) + (lengths[last] as number) === entry.fileOffset && (positions[last] as number) + (lengths[last] as number) === entry.offset) {
        lengths[last] = (lengths[last] as number) + entry.length;
      } else {
        fileOffsets.push(entry.fileOffset);
        lengths.push(entry.length);
        positions.push(entry.offset);
      }
    }
    let got: number;
    try {
      got = await copy(target, fileOffsets, lengths, positions, signal);
    } catch (err) {
      // A failed write is the output's (the sink's words for it); a failed read is the source's, as it is.
      throw (err as { syscall?: unknown }).syscall === 'pwrite' && target.writeError ? target.writeError(err, positions[0] ?? 0) : err;
    }
    if (got !== want) throw new ImageCorruptError(`image data: short read in the file range ${fileOffsets[0] ?? 0}.. (${got} of ${want} bytes); the file shrank or is truncated`);
    return { extents, buffer: undefined, decoded: undefined, copied: true };
  };

  const load = async (batch: Batch): Promise<LoadedBatch> => {
    throwIfAborted(signal);
    let compressed = false;
    let ciphered = false;
    for (const e of batch.entries) {
      if (e.kind === 'compressed') compressed = true;
      else if (e.kind === 'stored' && e.cipher !== undefined) ciphered = true;
    }
    // Stored runs of a compressed image may go to `direct` (writeDirect); otherwise nothing to decode or write here.
    if (!compressed && !ciphered && !(compressedImage && direct)) {
      if (copying && batch.readBytes > 0) return copyVerbatim(batch, copying);
      return loadVerbatim(batch);
    }
    return loadDecoding(batch, compressed, ciphered);
  };

  const loadDecoding = async (batch: Batch, compressed: boolean, ciphered: boolean): Promise<LoadedBatch> => {
    // Shared where decoder threads decode from and into them in place.
    const dec = compressed || ciphered ? (loadedDecoders ??= await loadDecoders()) : undefined;
    if (dec && options.directWrite !== undefined && dec.writesDirect()) direct = options.directWrite;
    const offThread = dec !== undefined && dec.decodesOffThread();
    const shared = { shared: compressed && offThread };
    compressedImage ||= compressed;
    const storedDirect = compressedImage ? direct : undefined;
    const buffer = batch.readBytes === 0 ? undefined : batch.readBytes <= arenaBytes && !shared.shared ? (freeArenas.pop() ?? alignedBuffer(arenaBytes)) : batch.readBytes <= arenaBytes ? (freeSharedArenas.pop() ?? alignedBuffer(arenaBytes, shared)) : alignedBuffer(batch.readBytes, shared);
    // Written directly, compressed clusters need no room for their output here.
    const decoded = (compressed && !direct) || ciphered ? (freeDecodedArenas.pop() ?? alignedBuffer(decodedArenaBytes, { shared: offThread })) : undefined;
    let decodedUsed = 0;
    const results: Array<Promise<Extent>> = new Array(batch.entries.length);
    const byGroup: number[][] = batch.groups.map(() => []);
    batch.entries.forEach((entry, i) => {
      const gi = batch.groupOf[i] as number;
      if (gi < 0) results[i] = Promise.resolve({ kind: 'zero', offset: entry.offset, length: entry.length });
      else (byGroup[gi] as number[]).push(i);
    });
    await mapLimited(batch.groups, readConcurrency, async (group, gi) => {
        if (group.mustEnd > source.size) throw beyondEnd(group, source.size);
        const bytes = (buffer as Buffer).subarray(group.at, group.at + (group.end - group.start));
        await readInto(source, bytes, group.start, signal);
        // Decode this group's clusters now, while the next reads are in flight.
        for (const i of byGroup[gi] as number[]) {
          const entry = batch.entries[i] as ReadEntry;
          if (direct && entry.kind === 'compressed') {
            const p = decodeDirect(entry, group, bytes, direct);
            p.catch(() => {}); // surfaced by Promise.all below
            results[i] = p;
            continue;
          }
          if (storedDirect && entry.kind === 'stored' && !entry.cipher) {
            const p = writeDirect(entry, group, bytes, storedDirect);
            p.catch(() => {}); // surfaced by Promise.all below
            results[i] = p;
            continue;
          }
          let target: Uint8Array | undefined;
          const outBytes = entry.kind === 'compressed' ? entry.decodedLength : entry.cipher ? encryptedBytes(entry, entry.cipher) : 0;
          if (outBytes > 0 && decoded && decodedUsed + outBytes <= decoded.length) {
            target = decoded.subarray(decodedUsed, decodedUsed + outBytes);
            decodedUsed += outBytes;
          }
          const p = decodeEntry(entry, group, bytes, target);
          p.catch(() => {}); // surfaced by Promise.all below
          results[i] = p;
        }
      });
    // On failure the buffer is dropped, not recycled: outstanding decodes may still read it.
    return { extents: await Promise.all(results), buffer, decoded };
  };

  // A source that fetches ahead (a URL, an S3 object) is told the reads of batches cut from the map
  // ahead of those being loaded, so its read-ahead follows the map rather than the file's byte order;
  // the cut batches wait here (their entries, no buffers) until their turn to load.
  const willRead = source.willRead?.bind(source);
  const announceBytes = options.announceBytes ?? DEFAULTS.announceBytes;
  const planned: Batch[] = [];
  let plannedBytes = 0;
  let planError: { error: unknown } | undefined; // the map's failure while cutting ahead: thrown in its turn
  const cutBatch = async (): Promise<Batch | null> => {
    const batch = await nextBatch();
    if (batch && willRead) for (const group of batch.groups) willRead(group.start, group.end);
    return batch;
  };
  const takeBatch = async (): Promise<Batch | null> => {
    const batch = planned.shift();
    if (batch) {
      plannedBytes -= batch.readBytes;
      return batch;
    }
    if (planError) throw planError.error;
    return cutBatch();
  };
  const planAhead = async (): Promise<void> => {
    try {
      while (willRead && !planError && plannedBytes < announceBytes) {
        const batch = await cutBatch();
        if (!batch) return;
        planned.push(batch);
        plannedBytes += batch.readBytes;
      }
    } catch (error) {
      planError = { error };
    }
  };

  // Batches are cut from the map one at a time (the map iterator is sequential); loading overlaps.
  let mapTurn: Promise<unknown> = Promise.resolve();
  const fetchNext = (): Promise<LoadedBatch | null> => {
    const batch = mapTurn.then(takeBatch);
    mapTurn = batch.then(planAhead, () => {});
    const loaded = batch.then((b) => (b ? load(b) : null));
    loaded.catch(() => {}); // surfaced when awaited
    return loaded;
  };
  const ahead: Array<Promise<LoadedBatch | null>> = [];
  for (let i = 0; i < prefetchBatches; i++) ahead.push(fetchNext());
  try {
    for (;;) {
      const loaded = await (ahead.shift() as Promise<LoadedBatch | null>);
      if (!loaded) break;
      // A batch copied file to file holds no arena: one more in flight keeps a copy job on each core while
      // the main thread takes a finished one (sparse raw 0.75 -> 0.73 s, qcow2 0.68 -> 0.64 s, session 11).
      const inFlight = loaded.copied ? prefetchBatches + 1 : prefetchBatches;
      while (ahead.length < inFlight) ahead.push(fetchNext());
      yield [...mergeAdjacent(loaded.extents)];
      // The consumer asked for more, so it is done with this batch's bytes.
      if (loaded.buffer && loaded.buffer.length === arenaBytes) (isShared(loaded.buffer) ? freeSharedArenas : freeArenas).push(loaded.buffer);
      if (loaded.decoded) freeDecodedArenas.push(loaded.decoded);
    }
    if (expectedOffset !== rangeEnd) {
      throw new ImageCorruptError(`image map ends at ${expectedOffset}, expected ${rangeEnd}`);
    }
  } finally {
    await iterator.return?.(undefined);
  }
}

/**
 * Joins data extents that follow each other both on the guest and in memory
 * (clusters decoded side by side, reads of touching file ranges), so consumers
 * see a few large extents rather than one per cluster.
 */
function* mergeAdjacent(extents: Extent[]): Generator<Extent> {
  let pending: Extent | undefined;
  for (const extent of extents) {
    if (pending?.kind === 'data' && extent.kind === 'data' && pending.written && extent.written && pending.offset + pending.length === extent.offset) {
      pending = { ...pending, length: pending.length + extent.length };
      continue;
    }
    if (
      pending?.kind === 'data' &&
      extent.kind === 'data' &&
      !pending.written &&
      !extent.written &&
      pending.offset + pending.length === extent.offset &&
      pending.data.buffer === extent.data.buffer &&
      pending.data.byteOffset + pending.data.length === extent.data.byteOffset
    ) {
      const { data } = pending;
      pending = { kind: 'data', offset: pending.offset, length: pending.length + extent.length, data: Buffer.from(data.buffer as ArrayBuffer, data.byteOffset, data.length + extent.data.length) };
      continue;
    }
    if (pending) yield pending;
    pending = extent;
  }
  if (pending) yield pending;
}

function beyondEnd(group: ReadGroup, fileSize: number): ImageCorruptError {
  return new ImageCorruptError(`data at file offset ${group.start}..${group.mustEnd} lies beyond the end of the file (${fileSize} bytes); the image is truncated or corrupt`);
}

/** Fills `target` from `offset`, through the source's own readInto when it has one. */
async function readInto(source: RandomAccessSource, target: Uint8Array, offset: number, signal: AbortSignal | undefined): Promise<void> {
  if (offset + target.length > source.size) {
    throw new ImageCorruptError(`image data at offset ${offset} (${target.length} bytes) lies beyond the end of the file (${source.size} bytes)`);
  }
  let got: number;
  if (source.readInto) got = await source.readInto(target, offset, signal);
  else {
    const bytes = await source.read(offset, target.length, signal);
    target.set(bytes);
    got = bytes.length;
  }
  if (got !== target.length) throw new ImageCorruptError(`image data: short read at offset ${offset} (${got} of ${target.length} bytes)`);
}

function fileRange(entry: ReadEntry, fileSize: number): [start: number, end: number, mustEnd: number] {
  if (entry.kind === 'stored') {
    if (entry.cipher) {
      const [start, end] = encryptedFileRange(entry, entry.cipher);
      return [start, end, end];
    }
    const end = entry.fileOffset + entry.length;
    return [entry.fileOffset, end, end];
  }
  // Compressed sizes are upper bounds (sector-rounded); clamp to the file, but the
  // first byte must exist.
  const end = Math.min(fileSize, entry.fileOffset + entry.readLength);
  return [entry.fileOffset, Math.max(end, entry.fileOffset + 1), entry.fileOffset + 1];
}

/**
 * Preallocated data (a static VDI) where the file has holes under it reads as
 * zeros: those parts become zero entries, found with SEEK_DATA/SEEK_HOLE as
 * qemu finds them, and are never read. Where the source cannot tell, entries pass unchanged.
 */
async function* overFileHoles(entries: AsyncIterable<MapEntry>, source: RandomAccessSource, signal: AbortSignal | undefined): AsyncGenerator<MapEntry> {
  for await (const e of entries) {
    if (e.kind !== 'stored' || !e.preallocated || !source.dataRanges) {
      yield e;
      continue;
    }
    const delta = e.offset - e.fileOffset;
    for await (const part of mapFileRanges(source, e.fileOffset + e.length, signal, e.fileOffset)) {
      if (part.kind === 'zero') yield { kind: 'zero', offset: part.offset + delta, length: part.length, status: 'hole', fileOffset: part.offset };
      else if (part.kind === 'stored') yield { ...e, offset: part.offset + delta, length: part.length, fileOffset: part.fileOffset };
    }
  }
}

/** File holes up to this long between two stored runs are read (as zeros) rather than splitting the read. */
export const BRIDGE_HOLE_BYTES = 64 * 1024;

/**
 * Joins stored runs that are separated only by a short hole in the file itself
 * (status `hole`: the raw driver's and overFileHoles' zero entries, whose bytes
 * read as zeros from the file): `stored, hole, stored` at consecutive file
 * offsets becomes one stored run that covers the hole. A fragmented raw image
 * or static VDI then costs a few hundred map entries instead of thousands, each
 * of which crossed several async generators, and one read instead of many; the
 * sink still finds the hole's zero blocks and leaves them holes, so the output
 * is the same. Measured on the bench's 4 GiB sparse raw (5655 data ranges, load
 * 15-16, medians of 5): 0.67 -> 0.40 s user CPU, 1.38 -> 1.11 s user+sys; static
 * VDI 0.83 -> 0.49 s user. Only whole runs are joined, never across a cipher or
 * another kind of entry, and never past `fileSize`.
 */
export async function* bridgeFileHoles(entries: AsyncIterable<MapEntry>, fileSize: number, maxHole = BRIDGE_HOLE_BYTES): AsyncGenerator<MapEntry> {
  let run: Extract<MapEntry, { kind: 'stored' }> | undefined; // a plain stored run, still growing
  let hole: Extract<MapEntry, { kind: 'zero' }> | undefined; // a short file hole right after `run`, not yet yielded
  for await (const e of entries) {
    if (run && hole) {
      if (e.kind === 'stored' && !e.cipher && e.fileOffset === run.fileOffset + run.length + hole.length && e.offset === hole.offset + hole.length) {
        run = { ...run, length: run.length + hole.length + e.length };
        hole = undefined;
        continue;
      }
      yield run;
      yield hole;
      run = hole = undefined;
    }
    if (run) {
      if (
        e.kind === 'zero' &&
        e.status === 'hole' &&
        e.length <= maxHole &&
        e.offset === run.offset + run.length &&
        e.fileOffset === run.fileOffset + run.length &&
        e.fileOffset + e.length <= fileSize
      ) {
        hole = e;
        continue;
      }
      yield run;
      run = undefined;
    }
    if (e.kind === 'stored' && !e.cipher) run = e;
    else yield e;
  }
  if (run) yield run;
  if (hole) yield hole;
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
      yield { ...e, offset: e.offset + done, length, fileOffset: e.fileOffset + done };
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
    else if (e.kind === 'stored') yield { ...e, offset: s, length: t - s, fileOffset: e.fileOffset + cut };
    else yield { ...e, offset: s, length: t - s, decodedOffset: e.decodedOffset + cut };
  }
}

async function mapLimited<T, R>(items: T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i] as T, i);
    }
  });
  await Promise.all(workers);
  return results;
}
