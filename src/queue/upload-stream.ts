/**
 * Conversion that overlaps the upload: the API creates the job when an upload
 * starts (not when it ends) and says in Redis how the upload goes; a worker,
 * possibly another process on another host of the same filesystem, reads the
 * staging file while it grows.
 *
 *   <prefix>upstream:<id>   JSON mark, with a TTL:
 *     {state:'receiving', token, size}          bytes arriving into the staging write `token`
 *     {state:'receiving', token, size, parts}   the same into a bucket: parts.ready parts of parts.bytes readable
 *                                               as objects of their own (upload-parts.ts)
 *     {state:'received', token, size, sha256}   every byte written (not yet durable; `parts` as above)
 *     {state:'committed', size, sha256}         the staged copy is committed: open it as any upload
 *     {state:'failed', code, message}           the upload failed: the job fails with this error
 *
 * A read of bytes that have not arrived waits (polling the file's size) until
 * they have, or until the upload ends. It never waits longer than the upload
 * itself: an upload that sends nothing for UPLOAD_IDLE_TIMEOUT_MS is failed by
 * the API, and an API that dies stops renewing the upload's lease, which the
 * reader checks. Bytes past the size the client declared are never waited for:
 * the source's size is that declared size, and the engine bounds every read by it.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { DelayedError, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import { DiskconvError, ImageCorruptError, SourceUnavailableError, readThroughReadInto, throwIfAborted, type RandomAccessSource } from '../engine/index.js';
import { sleep } from '../engine/ranged-source.js';
import type { InputStaging } from '../store/index.js';
import type { Leases } from './leases.js';
import type { JobRecords } from './records.js';
import { openPartObjects, PartObjectsSource, readableParts } from './upload-parts.js';

/**
 * A resumable (tus) upload's terms for the worker that follows it: a client may stop and resume hours later, so
 * a worker converts along only while bytes keep coming. `idleMs`: no new byte for this long and the worker gives
 * its slot back (the job waits, queued, until the upload resumes or completes); `expires`: when the unfinished
 * upload is removed (ms since the epoch). `patch` counts the PATCHes begun, so a parked job sees a resume.
 */
export interface ResumableTerms {
  idleMs: number;
  expires: number;
  patch: number;
}

/** A write staged in a bucket whose parts are readable as they arrive (InputStaging.readPart): `ready` parts of `bytes`. */
export interface ReadableParts {
  bytes: number;
  ready: number;
}

export type UploadMark =
  | { state: 'receiving'; token: string; size: number; resumable?: ResumableTerms; parts?: ReadableParts }
  | { state: 'received'; token: string; size: number; sha256: string; parts?: ReadableParts }
  | { state: 'committed'; size: number; sha256: string }
  | { state: 'failed'; code: string; message: string };

/** How long a mark outlives its upload (longer than any job waits in the queue). */
const MARK_TTL_SECONDS = 7 * 86400;

/** KEYS[1] the mark; ARGV: the new mark (JSON), its TTL. Replaces a `receiving` mark only. */
const ADVANCE = `
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, decoded = pcall(cjson.decode, current)
if not ok or type(decoded) ~= 'table' or decoded.state ~= 'receiving' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
`;

export class UploadMarks {
  private readonly prefix: string;
  constructor(
    private readonly redis: Redis,
    queueName: string,
  ) {
    this.prefix = `diskconv:${queueName}:upstream:`;
  }

  async set(id: string, mark: UploadMark): Promise<void> {
    await this.redis.set(this.prefix + id, JSON.stringify(mark), 'EX', MARK_TTL_SECONDS);
  }

  /**
   * Progress of an upload still arriving (a bucket's parts announced as they become readable): written only
   * while the mark says `receiving`, so an announcement that comes late never undoes a `failed` (or a
   * `received`) written meanwhile. Returns whether it was written.
   */
  async advance(id: string, mark: Extract<UploadMark, { state: 'receiving' }>): Promise<boolean> {
    const written = await this.redis.eval(ADVANCE, 1, this.prefix + id, JSON.stringify(mark), String(MARK_TTL_SECONDS));
    return written === 1;
  }

  async delete(id: string): Promise<void> {
    await this.redis.del(this.prefix + id);
  }

  async get(id: string): Promise<UploadMark | undefined> {
    const raw = await this.redis.get(this.prefix + id);
    if (raw === null) return undefined;
    try {
      return JSON.parse(raw) as UploadMark;
    } catch {
      return undefined;
    }
  }
}

/** The upload a job was converting from failed (or stopped): deterministic, a retry cannot get the bytes either. */
export class UploadFailedError extends DiskconvError {
  readonly deterministic = true;
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * A resumable upload sent nothing for its idle bound while the worker waited for bytes: the attempt gives its
 * slot back (parkUntilResumed) instead of failing. Never the job's error: the processor parks the job with it.
 */
export class UploadPausedError extends DiskconvError {
  readonly code = 'UPLOAD_PAUSED' as const;
  readonly deterministic = false;
  constructor(
    message: string,
    /** The mark's PATCH count when the worker last looked: a later one means the upload resumed meanwhile. */
    readonly seenPatch: number,
  ) {
    super(message);
  }
}

/** How often the file's size is looked at while a read waits. */
const SIZE_POLL_MS = 10;
/** How often Redis is asked how the upload goes while a read waits. */
const MARK_POLL_MS = 100;

export interface GrowingSourceDeps {
  marks: UploadMarks;
  leases: Pick<Leases, 'held'>;
  id: string;
}

/**
 * How the bytes' arrival goes when it is not told through Redis: a download that
 * runs in this process (a URL import from a server without ranges, src/net's
 * `follow` option) says it here, synchronously.
 */
export interface ArrivalFeed {
  state(): { state: 'arriving' } | { state: 'complete'; size: number; sha256: string } | { state: 'failed'; error: Error };
}

/**
 * The upload's mark as a source that follows it asks for it (GrowingFileSource here, PartObjectsSource in
 * upload-parts.ts): at most every `pollMs` unless asked `now`, one question at a time (a caller that needs an
 * answer newer than the one under way asks twice); a failed question (Redis briefly away) is asked again at the
 * next check. What a mark means is the source's `apply`: the file store's upload is complete once received,
 * a bucket's only once committed.
 */
export class MarkWatch {
  private last = 0;
  private asking: Promise<void> | undefined;
  constructor(
    private readonly deps: GrowingSourceDeps,
    private readonly pollMs: number,
    private readonly apply: (mark: UploadMark | undefined, watch: MarkWatch) => Promise<void>,
  ) {}

  check(now = false): Promise<void> {
    if (this.asking) return this.asking;
    if (!now && Date.now() - this.last < this.pollMs) return Promise.resolve();
    this.last = Date.now();
    this.asking = (async () => this.apply(await this.deps.marks.get(this.deps.id), this))()
      .catch(() => {})
      .finally(() => {
        this.asking = undefined;
      });
    return this.asking;
  }

  /**
   * `mark` (none, or one that says the bytes still arrive) seen while no API may hold the upload: whether the API
   * process receiving it went away, that is the lease is not held and the mark, read again, still says
   * `stillArriving` (or is gone). When it moved on meanwhile, the mark as it is now.
   */
  async abandoned(mark: UploadMark | undefined, stillArriving: (again: UploadMark | undefined) => boolean): Promise<{ gone: boolean; now?: UploadMark }> {
    if (mark !== undefined && (await this.deps.leases.held(this.deps.id))) return { gone: false };
    const again = await this.deps.marks.get(this.deps.id);
    return stillArriving(again) ? { gone: true } : { gone: false, ...(again ? { now: again } : {}) };
  }
}

/**
 * A staging file still being written by the API, read by the engine as any
 * source: reads wait for their bytes; the upload's failure fails them.
 */
export class GrowingFileSource implements RandomAccessSource {
  private available = 0;
  private final: { size: number; sha256: string } | undefined;
  private failure: Error | undefined;
  private readonly marks: MarkWatch | undefined;
  private closed = false;
  /** When the file last grew (or the source opened): a resumable upload idle past its bound parks the job. */
  private lastGrowth = Date.now();
  /** Reads that had to wait for bytes (for the tests and the logs). */
  waits = 0;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly name: string,
    private readonly deps: GrowingSourceDeps | { feed: ArrivalFeed },
    private resumable: ResumableTerms | undefined,
  ) {
    if (!('feed' in deps)) this.marks = new MarkWatch(deps, MARK_POLL_MS, (mark, watch) => this.apply(mark, watch));
  }

  static async open(path: string, size: number, name: string, deps: GrowingSourceDeps | { feed: ArrivalFeed }, resumable?: ResumableTerms): Promise<GrowingFileSource> {
    const handle = await open(path, 'r');
    const source = new GrowingFileSource(handle, size, name, deps, resumable);
    source.available = (await handle.stat()).size;
    return source;
  }

  /** A resumable upload that sent nothing for its idle bound: the attempt gives the worker slot back. */
  private checkIdle(): void {
    const terms = this.resumable;
    if (!terms || this.final || this.failure) return;
    if (Date.now() - this.lastGrowth < terms.idleMs) return;
    this.failure = new UploadPausedError(`${this.name}: the resumable upload sent nothing for ${terms.idleMs} ms; the job waits for it to resume`, terms.patch);
  }

  /** The file's size now; notes growth. */
  private async grow(): Promise<void> {
    const size = (await this.handle.stat()).size;
    if (size > this.available) {
      this.available = size;
      this.lastGrowth = Date.now();
    }
  }

  /** Bytes still arriving (the engine's vmdk-markers.ts walks a streamOptimized image's markers then). */
  get arriving(): boolean {
    return this.final === undefined;
  }

  /** Whether every byte has arrived (the upload's sha256 is known). */
  get complete(): { size: number; sha256: string } | undefined {
    return this.final;
  }

  /** Asks how the upload goes: Redis (at most every MARK_POLL_MS, one question at a time), or the in-process feed. */
  private checkMark(): Promise<void> {
    if ('feed' in this.deps) return this.checkFeed(this.deps.feed);
    return this.marks?.check() ?? Promise.resolve();
  }

  /** What a mark says, applied: received (or committed) is every byte in the file. */
  private async apply(mark: UploadMark | undefined, watch: MarkWatch): Promise<void> {
    if (mark?.state === 'failed') {
      this.failure = new UploadFailedError(mark.code, `the upload failed while it was converted: ${mark.message}`);
    } else if (mark?.state === 'received' || mark?.state === 'committed') {
      await this.ended({ size: mark.size, sha256: mark.sha256 }, 'upload', 'declared');
    } else if (mark?.state === 'receiving' && mark.resumable) {
      // A resumable upload is never failed for its client or its API going away: idle too long, the job parks (checkIdle).
      this.resumable = mark.resumable;
    } else if (mark === undefined || mark.state === 'receiving') {
      // No mark, or still receiving while nobody holds the upload: the API process went away.
      const verdict = await watch.abandoned(mark, (again) => again === undefined || again.state === 'receiving');
      if (verdict.gone) this.failure = new UploadFailedError('INCOMPLETE_BODY', 'the upload stopped before its last byte: the API process receiving it went away');
    }
  }

  /** The in-process download's state (no Redis, no throttle: it is a variable's read). */
  private async checkFeed(feed: ArrivalFeed): Promise<void> {
    const now = feed.state();
    if (now.state === 'failed') {
      this.failure = now.error;
    } else if (now.state === 'complete') {
      await this.ended({ size: now.size, sha256: now.sha256 }, 'download', 'announced');
    }
  }

  /** The transfer says it is complete: every byte it reported must be in the file, as many as were declared. */
  private async ended(final: { size: number; sha256: string }, what: 'upload' | 'download', declared: 'declared' | 'announced'): Promise<void> {
    const size = (await this.handle.stat()).size;
    if (final.size !== this.size || size < this.size) {
      this.failure = new SourceUnavailableError(`${this.name}: the ${what} ended with ${final.size} bytes (${size} staged), ${this.size} ${declared}`);
    } else {
      this.available = size;
      this.final = final;
    }
  }

  /** Waits until bytes [0, end) are in the file, or the upload fails. */
  private async arrive(end: number, signal?: AbortSignal): Promise<void> {
    if (end <= this.available) return;
    this.waits++;
    for (;;) {
      throwIfAborted(signal);
      if (this.closed) throw new SourceUnavailableError(`${this.name}: read after close`);
      if (this.failure) throw this.failure;
      await this.grow();
      if (end <= this.available) return;
      if (this.final) throw new ImageCorruptError(`${this.name}: a read up to byte ${end} lies past the uploaded ${this.final.size} bytes`);
      await this.checkMark();
      this.checkIdle();
      if (this.failure || this.final) continue;
      await sleep(SIZE_POLL_MS, signal);
    }
  }

  /** Waits until the upload has delivered every byte (its sha256 known), or fails. */
  async completion(signal?: AbortSignal): Promise<{ size: number; sha256: string }> {
    for (;;) {
      if (this.final) return this.final;
      if (this.failure) throw this.failure;
      throwIfAborted(signal);
      await this.checkMark();
      if (this.resumable) await this.grow();
      this.checkIdle();
      if (this.final || this.failure) continue;
      await sleep(MARK_POLL_MS / 2, signal);
    }
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
      const { bytesRead } = await this.handle.read(target, done, want - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  /** The staged file's allocation once complete (qemu's actual-size); unknown while it grows. */
  async allocatedSize(): Promise<number | undefined> {
    if (!this.final) return undefined;
    return (await this.handle.stat()).blocks * 512;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }
}


/**
 * An upload job's source: the committed staged copy, or, while the API still
 * receives it, the growing staging file. The mark decides; a staging write that
 * was committed between the two looks is opened committed.
 */
export async function openUploadSource(
  staging: InputStaging,
  deps: GrowingSourceDeps,
  displayName: string,
): Promise<RandomAccessSource> {
  const mark = await deps.marks.get(deps.id);
  if (mark?.state === 'failed') throw new UploadFailedError(mark.code, `the upload failed: ${mark.message}`);
  if (mark?.state === 'receiving' && mark.resumable && mark.resumable.expires <= Date.now()) {
    throw new UploadFailedError('UPLOAD_EXPIRED', 'the resumable upload was not finished before it expired (UPLOAD_TTL_SECONDS)');
  }
  // Staged into a bucket part by part (S3_STAGING_OVERLAP): the parts are read as objects of their own.
  const parts = readableParts(staging, mark);
  if (parts && (mark?.state === 'receiving' || mark?.state === 'received')) return openPartObjects(staging, parts, mark.size, displayName, deps);
  if (mark?.state === 'receiving' || mark?.state === 'received') {
    const path = staging.followPath?.(deps.id, mark.token);
    if (path !== undefined) {
      try {
        return await GrowingFileSource.open(path, mark.size, displayName, deps, mark.state === 'receiving' ? mark.resumable : undefined);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new SourceUnavailableError(`cannot follow the upload: ${(err as Error).message}`, { cause: err });
        const now = await deps.marks.get(deps.id);
        if (now?.state === 'failed') throw new UploadFailedError(now.code, `the upload failed: ${now.message}`);
        // Renamed into place meanwhile: the committed object below.
      }
    }
  }
  return staging.open(deps.id, displayName);
}

/** A source still arriving that the worker follows: it succeeds only once `completion()` says every byte is in. */
export function followedSource(source: RandomAccessSource | undefined): GrowingFileSource | PartObjectsSource | undefined {
  return source instanceof GrowingFileSource || source instanceof PartObjectsSource ? source : undefined;
}

/** What parkUntilResumed needs of BullMQ's job and of the records. */
export interface ParkDeps {
  job: Pick<Job, 'moveToDelayed' | 'promote'>;
  token: string;
  records: Pick<JobRecords, 'transition'>;
  owner: string;
  marks: UploadMarks;
  id: string;
}

/**
 * A resumable upload paused (UploadPausedError): the job goes back to `queued`, delayed in BullMQ until the
 * upload would expire, and this worker's slot is free. The API promotes it when a PATCH begins or the upload
 * completes (routes/uploads.ts); after the move, the mark is read again, so a resume that came in between (whose
 * promote found the job still active) is not missed. A job left delayed past the expiry fails `UPLOAD_EXPIRED`
 * (openUploadSource). Throws BullMQ's DelayedError, which costs no attempt.
 */
export async function parkUntilResumed(err: UploadPausedError, deps: ParkDeps): Promise<never> {
  const { job, token, records, owner, marks, id } = deps;
  const mark = await marks.get(id);
  const expires = mark?.state === 'receiving' && mark.resumable ? mark.resumable.expires : Date.now();
  await records.transition(id, 'queued', ['running'], { progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null }, attempt_id: undefined }, { owner });
  await job.moveToDelayed(Math.max(Date.now() + 1000, expires + 1000), token);
  const now = await marks.get(id);
  const resumed = now === undefined || now.state !== 'receiving' || (now.resumable?.patch ?? 0) !== err.seenPatch;
  if (resumed) await job.promote().catch(() => {});
  throw new DelayedError();
}

/** The size and sha256 of an upload whose staged copy is committed (its mark says so); undefined otherwise. */
export async function committedUpload(marks: UploadMarks, id: string): Promise<{ size: number; sha256: string } | undefined> {
  const mark = await marks.get(id).catch(() => undefined);
  return mark?.state === 'committed' ? { size: mark.size, sha256: mark.sha256 } : undefined;
}
