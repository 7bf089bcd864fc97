/**
 * An upload staged in a bucket, read while it arrives (S3_STAGING_OVERLAP): the
 * API PUTs each part as an object of its own (src/store/s3/part-objects.ts)
 * and says in the upload's mark how many are readable; a worker on any host
 * reads them here. The failure semantics are GrowingFileSource's: a failed
 * upload (client gone: INCOMPLETE_BODY, stalled: UPLOAD_TIMEOUT, ...) fails the
 * read, a receiving mark whose API no longer holds the lease fails it too, and
 * a read past the uploaded bytes is IMAGE_CORRUPT. Unlike the file store's, the
 * upload is complete only once the staged object is committed (the mark says
 * `committed`): the part objects go then, so reads go to the committed object.
 *
 * Memory: CACHE_BLOCKS blocks of BLOCK_BYTES (an 8 MiB part is two), the
 * AHEAD_BLOCKS fetched ahead among them: 16 MiB, each byte fetched once. Three
 * blocks of 8 MiB (one ahead) were 24 MiB and the worker converting an upload
 * as it arrived peaked at 198-205 MiB; four of 4 MiB, 176-191. Three of 4 MiB
 * with one ahead converted slower (half the bytes in flight: the tail at
 * 50 MB/s 2.5 s against 1.4), with two ahead they were too few for the
 * reader's reads in flight (up to 73 % of the bytes fetched twice).
 * bench/results/2026-12-03-session11-s3mem.md. The blocks' memory is page-mapped
 * and recycled, and once committed the staged object is read straight into the
 * blocks too: 176 MiB (173-187) against 195 (2026-12-04-session12-s3mem.md).
 */
import { ImageCorruptError, SourceUnavailableError, readThroughReadInto, throwIfAborted, type RandomAccessSource } from '../engine/index.js';
import { alignedBuffer } from '../engine/aligned.js';
import { sleep } from '../engine/ranged-source.js';
import { StoreObjectMissingError, type InputStaging } from '../store/index.js';
import { MarkWatch, UploadFailedError, type GrowingSourceDeps, type ReadableParts, type UploadMark } from './upload-stream.js';

const BLOCK_BYTES = 4 * 2 ** 20;
const CACHE_BLOCKS = 4;
/** Blocks fetched ahead of the one a read is in (as far as the upload has arrived), among the CACHE_BLOCKS. */
const AHEAD_BLOCKS = 2;
/** How often Redis is asked how the upload goes while a read waits. */
const MARK_POLL_MS = 50;

/**
 * A block of the cache: its bytes land in `memory`, page-mapped and recycled from block to block. A fresh buffer
 * per GET was garbage the collector freed only every 64 MiB or so of it (V8's external-memory trigger): up to
 * 80 MiB of dead blocks in malloc's heap at the worker's peak.
 */
interface Block {
  memory: Buffer;
  bytes: Promise<Buffer>;
  /** Reads copying out of it now (-1 once its memory is back among the spares). */
  users: number;
  /** Its fetch is over (done or failed): nothing writes into `memory` any more. */
  settled: boolean;
  /** Still among the cached blocks. */
  kept: boolean;
}

type PartReader = Required<Pick<InputStaging, 'readPart' | 'readRange'>>;

export class PartObjectsSource implements RandomAccessSource {
  private ready: number;
  private final: { size: number; sha256: string } | undefined;
  private failure: Error | undefined;
  private closed = false;
  private readonly marks: MarkWatch;
  /** Blocks by their first byte, oldest first (Map keeps insertion order). */
  private readonly blocks = new Map<number, Block>();
  /** Fetches under way. */
  private fetching = 0;
  /** Memory of blocks let go, for the next fetches. */
  private spare: Buffer[] = [];
  /** Reads that had to wait for a part (for the logs and the tests). */
  waits = 0;

  constructor(
    private readonly staging: PartReader,
    readonly size: number,
    private readonly partBytes: number,
    ready: number,
    readonly name: string,
    private readonly deps: GrowingSourceDeps,
  ) {
    this.ready = ready;
    this.marks = new MarkWatch(deps, MARK_POLL_MS, (mark) => this.apply(mark));
  }

  /** Bytes still arriving (the engine's vmdk-markers.ts walks a streamOptimized image's markers then). */
  get arriving(): boolean {
    return this.final === undefined;
  }

  /** Set once the staged object is committed (its sha256 known). */
  get complete(): { size: number; sha256: string } | undefined {
    return this.final;
  }

  private get parts(): number {
    return Math.ceil(this.size / this.partBytes);
  }

  /** Bytes [0, n) readable from part objects now. */
  private get available(): number {
    return Math.min(this.size, this.ready * this.partBytes);
  }

  /** What a mark says, applied. */
  private async apply(mark: UploadMark | undefined): Promise<void> {
    if (mark?.state === 'failed') {
      this.failure = new UploadFailedError(mark.code, `the upload failed while it was converted: ${mark.message}`);
      return;
    }
    if (mark !== undefined && mark.size !== this.size) {
      this.failure = new SourceUnavailableError(`${this.name}: the upload ended with ${mark.size} bytes, ${this.size} declared`);
      return;
    }
    if (mark?.state === 'committed') {
      this.ready = this.parts;
      this.final = { size: mark.size, sha256: mark.sha256 };
      return;
    }
    if (mark?.state === 'receiving' || mark?.state === 'received') {
      if (mark.state === 'received') {
        this.ready = this.parts;
      } else if (mark.parts) {
        this.ready = Math.max(this.ready, mark.parts.ready);
      }
    }
    // No mark, or receiving (or received, not yet committed) while nobody holds the upload: the API process went away.
    const verdict = await this.marks.abandoned(mark, (again) => again === undefined || again.state === 'receiving' || again.state === 'received');
    if (verdict.gone) {
      this.failure = new UploadFailedError('INCOMPLETE_BODY', 'the upload stopped before its staged copy was committed: the API process receiving it went away');
    } else if (verdict.now) {
      await this.apply(verdict.now); // committed or failed meanwhile
    }
  }

  /** Asks Redis (at most every MARK_POLL_MS unless `now`, one question at a time) how the upload goes. */
  private checkMark(now = false): Promise<void> {
    return this.marks.check(now);
  }

  /** Waits until bytes [0, end) are readable, or the upload fails. */
  private async arrive(end: number, signal?: AbortSignal): Promise<void> {
    if (end <= this.available) return;
    this.waits++;
    for (;;) {
      throwIfAborted(signal);
      if (this.closed) throw new SourceUnavailableError(`${this.name}: read after close`);
      if (this.failure) throw this.failure;
      if (end <= this.available) return;
      if (this.final) throw new ImageCorruptError(`${this.name}: a read up to byte ${end} lies past the uploaded ${this.final.size} bytes`);
      await this.checkMark();
      if (this.failure || end <= this.available) continue;
      await sleep(MARK_POLL_MS / 2, signal);
    }
  }

  /** Waits until the staged object is committed (every byte in, its sha256 known), or the upload fails. */
  async completion(signal?: AbortSignal): Promise<{ size: number; sha256: string }> {
    for (;;) {
      if (this.final) return this.final;
      if (this.failure) throw this.failure;
      throwIfAborted(signal);
      await this.checkMark();
      if (this.final || this.failure) continue;
      await sleep(MARK_POLL_MS, signal);
    }
  }

  /** The block holding byte `at`: [start, end) within one part. */
  private blockOf(at: number): { part: number; start: number; end: number } {
    const part = Math.floor(at / this.partBytes);
    const partStart = part * this.partBytes;
    const partEnd = Math.min(this.size, partStart + this.partBytes);
    const start = partStart + Math.floor((at - partStart) / BLOCK_BYTES) * BLOCK_BYTES;
    return { part, start, end: Math.min(partEnd, start + BLOCK_BYTES) };
  }

  private async fetchBlock(part: number, start: number, into: Buffer, signal?: AbortSignal): Promise<Buffer> {
    const partStart = part * this.partBytes;
    if (!this.final) {
      try {
        await this.staging.readPart(this.deps.id, part, start - partStart, into, signal);
        return into;
      } catch (err) {
        if (!(err instanceof StoreObjectMissingError)) throw err;
        // Gone: the staged object was committed and its parts removed (or the upload failed and they went with it).
        // Asked afresh (a question already under way may predate the mark that explains the absence).
        await this.checkMark(true);
        if (!this.failure && !this.final) await this.checkMark(true);
        if (this.failure) throw this.failure;
        if (!this.final) throw new SourceUnavailableError(`${this.name}: part ${part} is not in the bucket while the upload is still receiving`, { cause: err });
      }
    }
    // Committed: the part objects are gone, the staged object holds every byte.
    await this.staging.readRange(this.deps.id, start, into, signal);
    return into;
  }

  /** The block, fetched once and kept among the last CACHE_BLOCKS; the next AHEAD_BLOCKS readable ones fetched ahead. */
  private block(at: number, signal?: AbortSignal): Block {
    const b = this.blockOf(at);
    let got = this.blocks.get(b.start);
    if (got) {
      this.blocks.delete(b.start);
      this.blocks.set(b.start, got);
    } else {
      got = this.fetch(b, signal);
    }
    // Ahead only while few fetches are under way: reads all over the upload at once never pile up fetches (and memory).
    for (let ahead = 0, end = b.end; ahead < AHEAD_BLOCKS && this.fetching < CACHE_BLOCKS && end < this.size && end + 1 <= this.available; ahead++) {
      const next = this.blockOf(end);
      // Not the read's signal: the fetch ahead outlives the read that started it.
      if (!this.blocks.has(next.start)) this.fetch(next).bytes.catch(() => {});
      end = next.end;
    }
    return got;
  }

  /** A block fetched into recycled memory and kept; the oldest beyond CACHE_BLOCKS let go. */
  private fetch(b: { part: number; start: number; end: number }, signal?: AbortSignal): Block {
    const memory = this.spare.pop() ?? alignedBuffer(BLOCK_BYTES);
    const block: Block = { memory, bytes: this.fetchBlock(b.part, b.start, memory.subarray(0, b.end - b.start), signal), users: 0, settled: false, kept: true };
    this.fetching++;
    this.blocks.set(b.start, block);
    block.bytes.then(
      () => this.settle(block),
      () => {
        // A failed fetch is not kept: the next read asks again (and sees why it failed).
        if (this.blocks.get(b.start) === block) this.blocks.delete(b.start);
        block.kept = false;
        this.settle(block);
      },
    );
    while (this.blocks.size > CACHE_BLOCKS) {
      const oldest = this.blocks.keys().next().value as number;
      const evicted = this.blocks.get(oldest) as Block;
      this.blocks.delete(oldest);
      evicted.kept = false;
      this.recycle(evicted);
    }
    return block;
  }

  private settle(block: Block): void {
    block.settled = true;
    this.fetching--;
    this.recycle(block);
  }

  /** A block's memory goes back for the next fetch once nothing writes or reads it: let go, its fetch over, no reader copying from it. */
  private recycle(block: Block): void {
    // users is -1 once returned: a second call for the same block returns nothing twice.
    if (block.kept || !block.settled || block.users !== 0 || this.closed) return;
    block.users = -1;
    this.spare.push(block.memory);
  }

  read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    return readThroughReadInto(this, offset, length, signal);
  }

  async readInto(target: Uint8Array, offset: number, signal?: AbortSignal): Promise<number> {
    throwIfAborted(signal);
    const want = Math.max(0, Math.min(target.length, this.size - offset));
    if (want === 0) return 0;
    await this.arrive(offset + want, signal);
    let done = 0;
    while (done < want) {
      const at = offset + done;
      const b = this.blockOf(at);
      const block = this.block(at, signal);
      block.users++;
      try {
        const bytes = await block.bytes;
        const n = Math.min(want - done, b.end - at);
        target.set(bytes.subarray(at - b.start, at - b.start + n), done);
        done += n;
      } finally {
        block.users--;
        this.recycle(block);
      }
    }
    return done;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.blocks.clear();
    this.spare = [];
  }
}

/** The mark's part terms, when the upload is staged part by part into a bucket this staging can read. */
export function readableParts(staging: InputStaging, mark: UploadMark | undefined): ReadableParts | undefined {
  if (!staging.readPart || !staging.readRange) return undefined;
  if (mark?.state !== 'receiving' && mark?.state !== 'received') return undefined;
  return mark.parts;
}

/** A source over the part objects of an upload still arriving (the mark says `parts`). */
export function openPartObjects(staging: InputStaging, parts: ReadableParts, size: number, displayName: string, deps: GrowingSourceDeps): PartObjectsSource {
  const { readPart, readRange } = staging;
  if (!readPart || !readRange) throw new Error('the staging store cannot read parts');
  return new PartObjectsSource({ readPart: readPart.bind(staging), readRange: readRange.bind(staging) }, size, parts.bytes, parts.ready, displayName, deps);
}
