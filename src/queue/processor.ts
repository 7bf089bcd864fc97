/**
 * One conversion attempt: open the job's source (staged upload or URL), open the
 * image through the engine, check limits and free space, convert into the store
 * with sha256 in the same pass, commit, record. Every way out leaves the store
 * clean: no partial output, no staged input of a finished job.
 */
import { randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { UnrecoverableError, WaitingError, type Job } from 'bullmq';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import {
  convertToRaw,
  imageInfo,
  InsufficientSpaceError,
  isDiskconvError,
  openImage,
  StreamLayoutMismatchError,
  type ConvertResult,
  type DiskImage,
  type FormatId,
  type RandomAccessSource,
} from '../engine/index.js';
import { estimateAllocation, scrubMessage } from './inspect.js';
import { displayUrl, openImportUrlFollowing, urlPolicy, type OpenedUrlSource } from './url-import.js';
import type { DestinationResult, DestinationWriter, OutputWriter, Stores } from '../store/index.js';
import { GLANCE_HASHES, Publisher } from '../publish/publish.js';
import { rbdExport } from '../publish/rbd-export.js';
import { throttleUpload } from '../publish/throttle.js';
import type { AbortReason, CancelWatcher } from './cancel.js';
import type { Reservation, SpaceReservations } from './space.js';
import type { ConvertJobData } from './queue.js';
import type { GlanceOutput, JobError, JobOutput, JobProgress, JobRecord, JobRecords } from './records.js';
import { ThrottledSource } from './throttle.js';
import { committedUpload, followedSource, openUploadSource, parkUntilResumed, UploadPausedError, type UploadMarks } from './upload-stream.js';
import type { Leases } from './leases.js';

const digests = (r: ConvertResult): { sha512?: string; md5?: string } => ({ ...(r.sha512 ? { sha512: r.sha512 } : {}), ...(r.md5 ? { md5: r.md5 } : {}) });

/** Space kept free in the store beyond the estimate, for metadata and other writers. */
const FREE_SPACE_RESERVE = 64 * 2 ** 20;

export interface ProcessorDeps {
  config: Config;
  records: JobRecords;
  stores: Stores;
  cancels: CancelWatcher;
  logger: Logger;
  /** Worker-local scratch space (URL downloads staged whole). */
  scratchDir: string;
  /** Shared reservations of the store's free space (space.ts); without it, each job checks alone. */
  space?: SpaceReservations;
  /** Uploads converted while they arrive (upload-stream.ts); without it, every upload is read once committed. */
  uploads?: { marks: UploadMarks; leases: Pick<Leases, 'held'> };
}

export type ProcessResult = { outcome: 'succeeded' | 'cancelled' | 'skipped' };

/**
 * Why a write of this attempt was refused: the job was cancelled or deleted (a
 * cancel), or it is no longer this attempt's (another attempt owns it, or moved it
 * back to queued): that is not a cancel, and this attempt must leave the job, its
 * record and its input alone. Undefined when Redis could not tell.
 */
async function whyLost(records: JobRecords, id: string): Promise<AbortReason | undefined> {
  const state = await records.getState(id).then(
    (s) => s ?? 'deleted',
    () => undefined,
  );
  if (state === undefined) return undefined;
  return state === 'deleted' || state === 'cancelled' ? 'cancel' : 'superseded';
}

/** Writes progress at most once per interval and never more than one write at a time. */
class ProgressReporter {
  private pending: Promise<unknown> | undefined;
  private last = 0;
  /**
   * The newest report the interval (or a write still under way) held back, written once the interval is over: a
   * conversion that waits for bytes still arriving (an upload or download followed as it grows) shows what it has
   * done, instead of the last report before the wait (the forced 0 of its phase when it waits soon after starting).
   */
  private held: JobProgress | undefined;
  private timer: NodeJS.Timeout | undefined;
  constructor(
    private readonly records: JobRecords,
    private readonly id: string,
    private readonly owner: string,
    private readonly intervalMs: number,
    private readonly onLost: (reason: AbortReason) => void,
  ) {}

  report(progress: JobProgress, force = false): void {
    const now = Date.now();
    if (this.pending || (!force && now - this.last < this.intervalMs)) {
      this.held = progress;
      if (!this.timer) {
        this.timer = setTimeout(() => {
          this.timer = undefined;
          const held = this.held;
          this.held = undefined;
          if (held) this.report(held);
        }, Math.max(10, this.intervalMs - (now - this.last)));
        this.timer.unref();
      }
      return;
    }
    this.held = undefined;
    this.last = now;
    this.pending = this.records
      .update(this.id, ['running'], { progress }, { owner: this.owner })
      .then(async (stillOurs) => {
        if (stillOurs) return;
        const reason = await whyLost(this.records, this.id);
        if (reason) this.onLost(reason);
      })
      .catch(() => {})
      .finally(() => {
        this.pending = undefined;
      });
  }

  /** Waits for the write under way; a held report is dropped (the caller reports its next phase, or the end). */
  async flush(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.held = undefined;
    await this.pending;
  }
}

const percent = (done: number, total: number | null | undefined): number | null =>
  total ? Math.min(100, Math.floor((10000 * done) / total) / 100) : null;

export function createProcessor(deps: ProcessorDeps) {
  const { config, records, cancels, logger } = deps;
  const { staging, output, destinations } = deps.stores;
  const policy = urlPolicy(config);
  const publisher = config.glance ? new Publisher(config.glance) : undefined;

  /** The publish step (src/publish): the record shows the output and the Glance image while it goes active. */
  async function publishOutput(
    rec: JobRecord,
    converted: JobOutput,
    rbd: DestinationResult | undefined,
    owner: string,
    signal: AbortSignal,
    log: Logger,
    mustOwn: (ok: boolean) => Promise<void>,
    onGlance: (g: GlanceOutput) => void,
  ): Promise<{ output: JobOutput } | { output: JobOutput; error: JobError }> {
    const id = rec.id;
    const previous = rec.output?.glance;
    await records.update(
      id,
      ['running'],
      { output: { ...converted, ...(previous ? { glance: previous } : {}) }, progress: { phase: 'publishing', bytes_done: 0, bytes_total: converted.size, percent: null } },
      { owner },
    );
    let glance: GlanceOutput | undefined = previous;
    const publishStart = Date.now();
    if (!publisher) {
      return { output: converted, error: { code: 'GLANCE_UNAVAILABLE', message: 'this worker has no GLANCE_URL configured' } };
    }
    try {
      glance = await publisher.publish({
        request: rec.glance ?? {},
        output: { size: converted.size, md5: converted.md5 as string, sha512: converted.sha512 as string },
        ...(rbd ? { rbd: { pool: rbd.pool, location: rbd.location }, beforeLocation: () => destinations.handOver(rbd) } : {}),
        openOutput: async () => throttleUpload(rbd ? await rbdExport(rbd) : await output.read(id), config.glance?.uploadBytesPerSecond ?? 0),
        ...(previous ? { previous } : {}),
        onUpdate: async (g) => {
          glance = g;
          onGlance(g);
          await mustOwn(await records.update(id, ['running'], { output: { ...converted, glance: g } }, { owner }));
        },
        signal,
        log,
      });
      log.info({ image: glance.image_id, method: glance.method, seconds: (Date.now() - publishStart) / 1000 }, 'published into Glance');
      return { output: { ...converted, glance } };
    } catch (err) {
      if (signal.aborted) throw err;
      const error: JobError = isDiskconvError(err) ? { code: err.code, message: err.message } : { code: 'GLANCE_UNAVAILABLE', message: 'publishing into Glance failed' };
      if (!isDiskconvError(err)) log.error({ err }, 'publishing failed with an internal error');
      return { output: { ...converted, ...(glance ? { glance } : {}) }, error };
    }
  }

  /** A cancelled job's Glance image (the one it recorded as created) is deleted; the cancelled record says so. */
  /** Returns whether no image of the job is left in Glance. */
  async function discardGlance(rec: Pick<JobRecord, 'id' | 'output'>, glance: GlanceOutput, log: Logger): Promise<boolean> {
    if (glance.status === 'deleted') return true;
    if (!publisher) return false;
    const gone = await publisher.discard(glance, log);
    const current = await records.get(rec.id).catch(() => undefined);
    if (gone && current?.state === 'cancelled' && current.output) {
      await records.update(rec.id, ['cancelled'], { output: { ...current.output, glance: gone } }).catch(() => {});
    }
    return gone !== undefined;
  }

  return async function processConversion(job: Job<ConvertJobData>, token?: string, bullSignal?: AbortSignal): Promise<ProcessResult> {
    const id = job.data.id;
    const log = logger.child({ job: id, attempt: job.attemptsMade + 1 });
    const rec = await records.get(id);
    if (!rec || rec.state === 'succeeded' || rec.state === 'failed' || rec.state === 'cancelled') {
      // Cancelled while no attempt ran it (its worker died mid-publish): the Glance image it created goes.
      if (rec?.state === 'cancelled' && rec.output?.glance) await discardGlance(rec, rec.output.glance, log);
      log.info({ state: rec?.state }, 'job no longer wanted; skipped');
      return { outcome: 'skipped' };
    }
    const controller = cancels.track(id);
    const signal = bullSignal ? AbortSignal.any([controller.signal, bullSignal]) : controller.signal;
    // This attempt's name: every record write below carries it (see JobRecord.attempt_id).
    const owner = randomUUID();
    const lost = (reason: AbortReason): void => {
      if (!controller.signal.aborted) controller.abort(reason);
    };
    const progress = new ProgressReporter(records, id, owner, config.worker.progressIntervalMs, lost);
    /** A record write of this attempt that was refused: stop, for the reason the record gives. */
    const mustOwn = async (ok: boolean): Promise<void> => {
      if (ok) return;
      lost((await whyLost(records, id)) ?? 'superseded');
      throw controller.signal.reason;
    };
    const started = await records.transition(id, 'running', ['queued', 'running'], {
      started_at: rec.started_at ?? Date.now(),
      attempts: (rec.attempts ?? 0) + 1,
      attempt_id: owner,
      progress: { phase: 'probing', bytes_done: 0, bytes_total: null, percent: null },
    });
    if (!started.moved) {
      cancels.untrack(id);
      return { outcome: 'skipped' };
    }

    const displayName = rec.source.filename ?? (rec.source.url ? displayUrl(rec.source.url) : 'upload');
    // Per attempt: two attempts of one job on one host never share (or remove) each other's download.
    const stagingPath = join(deps.scratchDir, `${id}.${owner}.download`);
    let opened: OpenedUrlSource | undefined;
    let source: RandomAccessSource | undefined;
    let image: DiskImage | undefined;
    let writer: OutputWriter | DestinationWriter | undefined;
    let committed = false;
    /** An RBD image this attempt finished (snapshot made): removed again if the job does not succeed after all. */
    let published: DestinationResult | undefined;
    /** The Glance image this job recorded as its own (publishing), for a cancel to delete. */
    let glanceNow: GlanceOutput | undefined = rec.output?.glance;
    let reservation: Reservation | undefined;
    /** Closes the image and its source and removes this attempt's download (once; again in `finally` is a no-op). */
    const releaseSource = async (): Promise<void> => {
      const [img, src, url] = [image, source, opened];
      image = undefined;
      source = undefined;
      opened = undefined;
      await img?.close().catch(() => {});
      await (url ? url.close() : src?.close())?.catch(() => {});
      await rm(stagingPath, { force: true }).catch(() => {});
    };
    let sourceName: string | undefined;
    const t0 = Date.now();
    try {
      // Nothing of a previous attempt is removed here: a live one (whose lock lapsed)
      // may still be writing its own temporary output. Each attempt removes only what
      // its own writer created; stale temporaries of dead workers are the sweeper's.

      if (rec.source.kind === 'url' && rec.source.url) {
        progress.report({ phase: 'downloading', bytes_done: 0, bytes_total: null, percent: null }, true);
        // A download converted while it grows (url-import.ts) goes on after this returns: its progress is the conversion's then.
        let downloading = true;
        opened = await openImportUrlFollowing(rec.source.url, policy, {
          signal,
          stagingPath,
          ...(rec.expected_sha256 ? { expectedSha256: rec.expected_sha256 } : {}),
          maxUnwrappedBytes: config.maxVirtualSize,
          onProgress: (done, total) => {
            if (downloading) progress.report({ phase: 'downloading', bytes_done: done, bytes_total: total ?? null, percent: percent(done, total) });
          },
        });
        downloading = false;
        source = opened.source;
        await mustOwn(
          await records.update(
            id,
            ['running'],
            { source: { ...rec.source, final_url: opened.finalUrl, size: opened.size, mode: opened.mode, ...(opened.sha256 ? { sha256: opened.sha256 } : {}), ...(opened.wrapper ? { wrapper: opened.wrapper, unwrapped_size: opened.unwrappedSize } : {}) } },
            { owner },
          ),
        );
      } else {
        source = deps.uploads ? await openUploadSource(staging, { ...deps.uploads, id }, displayName) : await staging.open(id, displayName);
      }
      sourceName = source.name;
      const readSource = config.worker.readBytesPerSecond > 0 ? new ThrottledSource(source, config.worker.readBytesPerSecond) : source;

      await progress.flush();
      progress.report({ phase: 'probing', bytes_done: 0, bytes_total: null, percent: null }, true);
      const declared = rec.source_format === 'auto' ? 'auto' : (rec.source_format as FormatId);
      const passphrase = await records.getPassphrase(id);
      const open = (): Promise<DiskImage> =>
        openImage(readSource, {
          format: declared,
          limits: { maxVirtualSize: config.maxVirtualSize },
          signal,
          ...(passphrase !== undefined ? { passphrase: Buffer.from(passphrase, 'utf8') } : {}),
          ...(rec.disk !== undefined ? { disk: rec.disk } : {}),
          scratchDir: deps.scratchDir, // an archive's deflated or gzip'd members are staged there
          scratchOwner: id, // named after the job, so the scratch sweep leaves it alone while the job runs
        });
      image = await open();
      let info = { ...(await imageInfo(image, readSource)), filename: displayName };
      const free = rec.destination ? undefined : await output.freeBytes();
      // While the upload still arrives, walking the whole map would wait for its last table: the virtual size bounds it.
      const stillArriving = followedSource(source)?.complete === undefined && followedSource(source) !== undefined;
      const arriving = stillArriving && (free === undefined || image.virtualSize + FREE_SPACE_RESERVE <= free);
      let allocation = arriving ? { dataBytes: image.virtualSize, zeroBytes: 0 } : await estimateAllocation(image, readSource, signal);
      if (free !== undefined && allocation.dataBytes + FREE_SPACE_RESERVE > free) {
        throw new InsufficientSpaceError(`the output needs up to ${allocation.dataBytes} bytes; the store has ${free} bytes free`);
      }
      if (free !== undefined && deps.space) {
        // Reserve what was checked for, so concurrent jobs do not all pass the same check.
        let got = await deps.space.reserve(owner, allocation.dataBytes, free, FREE_SPACE_RESERVE);
        if (!('reservation' in got) && arriving) {
          // The virtual size was only a bound while the upload arrives; beside running jobs' reservations it
          // does not fit, so wait for the whole map and reserve what the image really holds.
          allocation = await estimateAllocation(image, readSource, signal);
          got = await deps.space.reserve(owner, allocation.dataBytes, free, FREE_SPACE_RESERVE);
        }
        if (!('reservation' in got)) {
          throw new InsufficientSpaceError(`the output needs up to ${allocation.dataBytes} bytes; the store has ${free} bytes free, ${got.others} of them reserved by running jobs`);
        }
        reservation = got.reservation;
      }
      const current = (await records.get(id))?.source ?? rec.source;
      await mustOwn(
        await records.update(id, ['running'], { source: { ...current, format: image.format, virtual_size: image.virtualSize, info: info as unknown as Record<string, unknown> } }, { owner }),
      );

      await progress.flush();
      const total = image.virtualSize;
      progress.report({ phase: 'converting', bytes_done: 0, bytes_total: total, percent: 0 }, true);
      // An RBD target is created at the virtual size (a clash fails here, before a byte is written).
      let active: OutputWriter | DestinationWriter;
      const convertOnce = async (from: DiskImage): Promise<ConvertResult> => {
        active = rec.destination ? await destinations.create(rec.destination, from.virtualSize, id) : await output.create(id, from.virtualSize);
        writer = active;
        return convertToRaw(from, readSource, active, {
          signal,
          sha256: true,
          hashes: [...config.outputHashes, ...(rec.glance ? GLANCE_HASHES : [])],
          progressIntervalMs: config.worker.progressIntervalMs,
          onProgress: (p) => progress.report({ phase: 'converting', bytes_done: p.bytesDone, bytes_total: p.bytesTotal, percent: percent(p.bytesDone, p.bytesTotal) }),
        });
      };
      const tConvert = Date.now();
      let result: ConvertResult;
      try {
        result = await convertOnce(image);
      } catch (err) {
        if (!(err instanceof StreamLayoutMismatchError)) throw err;
        // A streamOptimized vmdk walked by its markers while it arrived disagrees with its grain directory:
        // its partial output is gone (convertToRaw aborted the writer); convert again the ordinary way, now that every byte is in.
        log.warn({ reason: err.message }, 'the grain markers disagree with the grain directory; converting again from the directory');
        writer = undefined;
        await followedSource(source)?.completion(signal);
        await image.close().catch(() => {});
        image = await open();
        result = await convertOnce(image);
      }
      await progress.flush();
      if (signal.aborted) throw signal.reason;
      const tConverted = Date.now();
      const followed = followedSource(source);
      if (followed) {
        // Read while it arrived: succeed only once the upload is whole (and hashed); its info has its actual size now.
        const arrived = await followed.completion(signal);
        info = { ...(await imageInfo(image, readSource)), filename: displayName };
        const now = (await records.get(id))?.source ?? rec.source;
        await mustOwn(await records.update(id, ['running'], { source: { ...now, size: arrived.size, sha256: arrived.sha256, info: info as unknown as Record<string, unknown> } }, { owner }));
      } else if (deps.uploads && rec.source.kind === 'upload' && !rec.source.sha256) {
        // A resumable upload's job parked while it arrived and ran again from the committed copy: its sha256 is in the mark.
        const arrived = await committedUpload(deps.uploads.marks, id);
        const now = (await records.get(id))?.source ?? rec.source;
        if (arrived && !now.sha256) await mustOwn(await records.update(id, ['running'], { source: { ...now, size: arrived.size, sha256: arrived.sha256 } }, { owner }));
      }
      // Only the attempt that still owns the job publishes: a superseded one must not clobber.
      await mustOwn(await records.update(id, ['running'], { progress: { phase: 'committing', bytes_done: total, bytes_total: total, percent: 100 } }, { owner }));
      const tArrived = Date.now();
      const stored = await active!.commit();
      const tCommitted = Date.now();
      writer = undefined;
      committed = true;
      // The source is not read again: free it (and this attempt's download) before the job is seen to end.
      await releaseSource();
      if ('target' in stored) published = stored;
      let jobOutput: JobOutput = {
        format: 'raw',
        size: stored.size,
        sha256: result.sha256 as string,
        ...digests(result),
        data_bytes: result.dataBytes,
        ...(stored.location ? { location: stored.location } : {}),
        ...('target' in stored ? { target: stored.target, pool: stored.pool, image: stored.image, snapshot: stored.snapshot } : {}),
      };
      if (rec.glance) {
        const glanced = await publishOutput(rec, jobOutput, 'target' in stored ? stored : undefined, owner, signal, log, mustOwn, (g) => {
          glanceNow = g;
        });
        if ('error' in glanced) {
          // The conversion stands: the output stays downloadable; only publishing failed.
          await records.transition(
            id,
            'failed',
            ['running'],
            { output: glanced.output, error: glanced.error, last_error: undefined, attempt_id: undefined, duration_seconds: (Date.now() - t0) / 1000 },
            { owner },
          );
          await staging.delete(id).catch(() => {});
          log.info({ code: glanced.error.code }, `publishing failed: ${glanced.error.message}`);
          throw new UnrecoverableError(`${glanced.error.code}: ${glanced.error.message}`);
        }
        jobOutput = glanced.output;
        // Registered in place: Glance owns the RBD image from now on; nothing here may remove it.
        if (jobOutput.glance?.method === 'location') published = undefined;
      }
      const seconds = (Date.now() - t0) / 1000;
      const done = await records.transition(
        id,
        'succeeded',
        ['running'],
        {
          output: jobOutput,
          progress: { phase: 'done', bytes_done: total, bytes_total: total, percent: 100 },
          duration_seconds: seconds,
          last_error: undefined,
          attempt_id: undefined,
        },
        { owner },
      );
      if (!done.moved) {
        if ((await whyLost(records, id)) === 'superseded') {
          log.info('superseded by another attempt as it finished; left the job to it');
          return { outcome: 'skipped' };
        }
        // Cancelled (or deleted) between the last check and the commit: unpublish. A Glance
        // image registered in place owns the RBD image: deleting the Glance image removes both.
        // If Glance still has it (the delete failed), the RBD image under it stays.
        const glanceGone = glanceNow ? await discardGlance(rec, glanceNow, log) : true;
        if ('target' in stored && (glanceGone || glanceNow?.method !== 'location')) {
          await destinations.remove(stored).catch((err: unknown) => log.warn({ err }, 'could not remove the cancelled RBD image'));
        }
        await output.delete(id);
        await staging.delete(id);
        log.info('cancelled as it finished; output removed');
        return { outcome: 'cancelled' };
      }
      await staging.delete(id).catch((err: unknown) => log.warn({ err }, 'could not remove the staged input; the sweeper will'));
      await records.recordConversion(result.virtualSize, seconds).catch(() => {});
      const ms = (a: number, b: number): number => b - a;
      log.info(
        {
          virtual_size: result.virtualSize,
          data_bytes: result.dataBytes,
          seconds,
          // Where the time went (ms): open and probe, the conversion, waiting for the upload's end, the commit, the record.
          timings: { open: ms(t0, tConvert), convert: ms(tConvert, tConverted), upload_end: ms(tConverted, tArrived), commit: ms(tArrived, tCommitted), record: ms(tCommitted, Date.now()) },
        },
        'converted',
      );
      return { outcome: 'succeeded' };
    } catch (err) {
      // This attempt's own partial output only; never another attempt's.
      if (err instanceof UnrecoverableError) throw err; // a failed publish, already recorded
      await writer?.abort().catch(() => {});
      const reason = controller.signal.aborted ? (controller.signal.reason as AbortReason) : undefined;
      if (reason === 'superseded') {
        log.warn('the job is no longer this attempt\'s (another attempt owns it or moved it back to queued); stopped, leaving it alone');
        return { outcome: 'skipped' };
      }
      if (reason === 'cancel' || (await records.getState(id).catch(() => undefined)) === 'cancelled') {
        // The job is over for every attempt: everything under its key goes.
        const glanceGone = glanceNow ? await discardGlance(rec, glanceNow, log) : true;
        if (published && (glanceGone || glanceNow?.method !== 'location')) await destinations.remove(published).catch(() => {});
        await output.delete(id).catch(() => {});
        await staging.delete(id).catch(() => {});
        log.info('cancelled');
        return { outcome: 'cancelled' };
      }
      if (reason === 'shutdown' && token) {
        // Hand the job back untouched: another worker (or this one, restarted) starts it again.
        await records
          .transition(id, 'queued', ['running'], { progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null }, attempt_id: undefined }, { owner })
          .catch(() => {});
        await job.moveToWait(token);
        log.info('handed back on shutdown');
        throw new WaitingError();
      }
      if (err instanceof UploadPausedError && token && deps.uploads) {
        log.info('the resumable upload paused; the job waits queued for it, the worker slot is free');
        await parkUntilResumed(err, { job, token, records, owner, marks: deps.uploads.marks, id });
      }
      const error = describeError(err, sourceName ?? source?.name, displayName);
      const deterministic = isDiskconvError(err) && err.deterministic;
      const attempts = job.opts.attempts ?? 1;
      const lastAttempt = deterministic || job.attemptsMade + 1 >= attempts;
      if (lastAttempt) {
        const failed = await records.transition(id, 'failed', ['running'], { error, last_error: undefined, attempt_id: undefined }, { owner });
        if (!failed.moved) {
          log.warn({ code: error.code }, `attempt failed after losing the job to another attempt; left it alone: ${error.message}`);
          throw new UnrecoverableError(`${error.code}: ${error.message}`);
        }
        // The job is over: its input, and any output (committed, or another attempt's leftovers), go.
        await staging.delete(id).catch(() => {});
        await output.delete(id).catch(() => {});
        if (published) await destinations.remove(published).catch(() => {});
        if (isDiskconvError(err)) log.info({ code: error.code }, `failed: ${error.message}`);
        else log.error({ err }, 'failed with an internal error');
        throw new UnrecoverableError(`${error.code}: ${error.message}`);
      }
      if (committed) await output.delete(id).catch(() => {}); // published but not recorded: the retry writes it again
      if (published) await destinations.remove(published).catch(() => {});
      await records.transition(
        id,
        'queued',
        ['running'],
        { last_error: error, progress: { phase: 'retrying', bytes_done: 0, bytes_total: null, percent: null }, attempt_id: undefined },
        { owner },
      );
      log.warn({ code: error.code, err: isDiskconvError(err) ? undefined : err }, `attempt failed, will retry: ${error.message}`);
      throw err instanceof Error ? err : new Error(String(err));
    } finally {
      await reservation?.release();
      cancels.untrack(id);
      await progress.flush();
      await releaseSource();
    }
  };
}

/** A client-safe error: stable code, a message without server paths or internals. */
export function describeError(err: unknown, internalName: string | undefined, displayName: string): JobError {
  if (isDiskconvError(err)) {
    const message = internalName ? scrubMessage(err.message, internalName, displayName) : err.message;
    if (err.code === 'STORE_UNAVAILABLE') return { code: err.code, message: 'the store is unavailable' };
    return { code: err.code, message };
  }
  return { code: 'INTERNAL_ERROR', message: 'internal error' };
}

/** Marks a job failed when BullMQ gives up on it outside the processor (stalled too often). */
export async function failIfUnfinished(records: JobRecords, id: string, error: JobError): Promise<JobRecord | undefined> {
  const moved = await records.transition(id, 'failed', ['queued', 'running'], { error });
  return moved.moved ? records.get(id) : undefined;
}
