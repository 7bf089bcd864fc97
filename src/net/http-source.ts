/**
 * Opens a URL as a RandomAccessSource for the engine.
 *
 * The probe is a GET of the first bytes (`Range: bytes=0-9`, not HEAD: presigned
 * URLs are often signed for GET only, and a server without range support answers
 * it with the whole body, which we then stage without a second request).
 * - 206 with a Content-Range size, a validator (a strong ETag or Last-Modified),
 *   no compressed wrapper in the first bytes and no expectedSha256: mode 'range',
 *   the engine reads through range requests (HttpRangeSource), each carrying
 *   If-Range, so a changed file is SOURCE_CHANGED rather than a disk stitched
 *   from two versions.
 * - otherwise: mode 'staged', the body is streamed to `stagingPath`, hashed on
 *   the way (a server without a validator cannot tell us when the file changes
 *   between two range requests, and a wrapper cannot be read at random); a
 *   gzip/xz/bzip2/zstd wrapper (by its magic bytes) is decompressed as it arrives,
 *   bounded by `maxUnwrappedBytes` and the free space there, so the staged file
 *   is the inner image and no compressed copy is kept. A connection dropped
 *   mid-body is resumed with `Range: bytes=N-` when the server supports ranges
 *   (If-Range guards against a changed file: a 200 answer restarts from zero),
 *   else the import fails with SOURCE_UNAVAILABLE and the queue retries the job.
 *   Then the sha256 (of the bytes as downloaded) is verified and a FileSource
 *   over the staged file is returned.
 * onProgress is called while staging (at most every 200 ms, and at the end); in
 * range mode there is no download phase and it is not called.
 */
import { createHash, type Hash } from 'node:crypto';
import { once } from 'node:events';
import { createWriteStream } from 'node:fs';
import { open, rm, statfs, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { PassThrough } from 'node:stream';
import { DiskconvError, InsufficientSpaceError, InvalidArgumentError, LimitExceededError, SourceUnavailableError, throwIfAborted } from '../engine/errors.js';
import { DEFAULT_LIMITS } from '../engine/limits.js';
import { FileSource, type RandomAccessSource } from '../engine/source.js';
import { decompressTo, detectWrapper, WRAPPER_PROBE_BYTES, type WrapperFormat } from '../engine/wrappers/index.js';
import { ChecksumMismatchError, SourceChangedError, SourceTooLargeError, UrlFetchError } from './errors.js';
import { DEFAULT_RANGE_TUNING, HttpRangeSource, ifRangeOf, type RangeSourceTuning, type RemoteValidator } from './range-source.js';
import {
  createAgents,
  destroyAgents,
  displayUrl,
  fetchFollowing,
  parseContentLength,
  parseContentRange,
  sleep,
  type Agents,
  type Exchange,
} from './request.js';
import { checkUrl, validateUrlPolicy, type UrlPolicy } from './url-policy.js';

export interface UrlSourceOptions {
  signal?: AbortSignal;
  /** Where the body is staged when range reads are not possible; removed on failure and by close(). */
  stagingPath: string;
  /** Lower-case or upper-case hex; forces staging so every byte is hashed. */
  expectedSha256?: string;
  onProgress?: (bytesDone: number, bytesTotal: number | undefined) => void;
  /** Range-mode tuning (tests); defaults are DEFAULT_RANGE_TUNING. */
  rangeTuning?: Partial<RangeSourceTuning>;
  /** Most bytes a wrapper may decompress to (MAX_VIRTUAL_SIZE; the engine's default limit when absent). */
  maxUnwrappedBytes?: number;
  /**
   * A bound on what may be staged at all (downloaded, and decompressed): POST
   * /v1/inspect keeps the API host's disk small with it. Past it: LIMIT_EXCEEDED
   * naming `limitName`.
   */
  stagingLimit?: { maxBytes: number; limitName: string };
  /**
   * Called before anything is staged; staging waits for it, and the function it
   * resolves to is called once the staged file is gone (a concurrency limit).
   */
  stagingSlot?: (signal: AbortSignal | undefined) => Promise<() => void>;
  /**
   * Convert while the download grows: for a plain body (no wrapper) of known
   * length, staged because the server cannot be read by ranges, openUrlSource
   * returns as soon as the first bytes are staged, with the source this function
   * makes of the growing file (the worker's GrowingFileSource, which waits for
   * bytes not yet written). The download goes on and is hashed as before; `feed`
   * says how it goes: complete with its sha256 (after expectedSha256 is checked),
   * or failed (a dropped connection that cannot be resumed, a file that changed,
   * a checksum mismatch, an abort). close() stops it and removes the staged file.
   */
  follow?: (path: string, size: number, name: string, feed: DownloadFeed) => Promise<RandomAccessSource>;
}

/** How a followed download goes (UrlSourceOptions.follow). */
export interface DownloadFeed {
  state(): { state: 'arriving' } | { state: 'complete'; size: number; sha256: string } | { state: 'failed'; error: Error };
}

export interface OpenedUrlSource {
  source: RandomAccessSource;
  mode: 'range' | 'staged';
  /** The URL after redirects (with its query; not for logs, see source.name). */
  finalUrl: string;
  size: number;
  /** sha256 of the downloaded bytes (staged mode only; of the wrapped bytes when a wrapper was removed). */
  sha256?: string;
  /** The compressed wrapper that was removed while staging. */
  wrapper?: WrapperFormat;
  /** Size of the staged image inside the wrapper. */
  unwrappedSize?: number;
  /** Closes the source and removes the staged file. */
  close(): Promise<void>;
}

/** Failed attempts in a row without any new byte (the first request's included) tolerated before giving up. */
const MAX_STALLED_RESUMES = 3;
/** Resumes in total for one download. */
const MAX_RESUMES = 20;
const PROGRESS_INTERVAL_MS = 200;
const WRITE_BATCH_BYTES = 2 ** 20;
/** Also bounded by count: a server dribbling tiny chunks must not pile up buffer objects. */
const WRITE_BATCH_CHUNKS = 256;
/** The probe's body is a few bytes; anything much longer means the server ignored the range. */
const MAX_PROBE_BODY = 1024;
/** The decompression bound that is the free space beside the staged file. */
const FREE_SPACE_LIMIT = 'free space in the scratch directory';
/** Space left free beside a staged download. */
const STAGING_RESERVE = 64 * 2 ** 20;

function refuseEncoding(exchange: Exchange): void {
  const encoding = exchange.header('content-encoding');
  if (encoding !== undefined && encoding.trim().toLowerCase() !== 'identity') {
    exchange.discard();
    throw new UrlFetchError(`${displayUrl(exchange.checked.url)} sent Content-Encoding '${encoding}'; the image bytes are needed as they are`);
  }
}

function refuseTooLarge(size: number, policy: UrlPolicy, where: string): void {
  if (size > policy.maxBytes) {
    throw new SourceTooLargeError(`${where} is ${size} bytes, more than the ${policy.maxBytes} bytes allowed`, policy.maxBytes);
  }
}

function validatorOf(exchange: Exchange): RemoteValidator {
  const etag = exchange.header('etag');
  const lastModified = exchange.header('last-modified');
  return { ...(etag !== undefined ? { etag } : {}), ...(lastModified !== undefined ? { lastModified } : {}) };
}


export async function openUrlSource(url: string, policy: UrlPolicy, options: UrlSourceOptions): Promise<OpenedUrlSource> {
  validateUrlPolicy(policy);
  const expected = options.expectedSha256?.toLowerCase();
  if (expected !== undefined && !/^[0-9a-f]{64}$/.test(expected)) {
    throw new InvalidArgumentError(`expected sha256 '${options.expectedSha256}' is not 64 hex digits`);
  }
  throwIfAborted(options.signal);
  // A followed download runs on after this returns: its close() stops it through this signal.
  const closer = options.follow ? new AbortController() : undefined;
  const signal = closer ? (options.signal ? AbortSignal.any([options.signal, closer.signal]) : closer.signal) : options.signal;
  if (closer) options = { ...options, ...(signal ? { signal } : {}) };
  const tuning: RangeSourceTuning = { ...DEFAULT_RANGE_TUNING, ...options.rangeTuning };
  const checked = await checkUrl(url, policy);
  const agents = createAgents(tuning.concurrency);
  const spec = { ...(signal ? { signal } : {}), agents };
  try {
    if (expected === undefined) {
      const probe = await fetchFollowing(checked, policy, { ...spec, headers: { range: `bytes=0-${WRAPPER_PROBE_BYTES - 1}` } });
      const where = displayUrl(probe.checked.url);
      if (probe.status === 206) {
        refuseEncoding(probe);
        const range = parseContentRange(probe.header('content-range'));
        if (range && range.start === 0 && range.total !== undefined) {
          refuseTooLarge(range.total, policy, where);
          const head: Buffer[] = [];
          let received = 0;
          for await (const chunk of probe.body()) {
            received += chunk.length;
            if (received > MAX_PROBE_BODY) throw new UrlFetchError(`${where}: the answer to a ${WRAPPER_PROBE_BYTES}-byte range request is longer than ${MAX_PROBE_BODY} bytes`);
            head.push(chunk);
          }
          const validator = validatorOf(probe);
          // Read by ranges only what ranges can read faithfully: a known version of a plain image.
          if (ifRangeOf(validator) !== undefined && detectWrapper(Buffer.concat(head)) === undefined) {
            const source = new HttpRangeSource(probe.checked, range.total, where, validator, policy, agents, signal, tuning);
            return { source, mode: 'range', finalUrl: probe.checked.url.href, size: range.total, close: () => source.close() };
          }
        } else {
          // A 206 we cannot use for ranges (no size): fetch the whole body.
          probe.discard();
        }
      } else if (probe.status === 200) {
        return await stage(probe, policy, options, expected, agents, closer);
      } else if (probe.status === 416) {
        probe.discard(); // an empty resource: no range of it is satisfiable
      } else {
        probe.expectStatus([200, 206]);
      }
    }
    const whole = await fetchFollowing(checked, policy, spec);
    return await stage(whole, policy, options, expected, agents, closer);
  } catch (err) {
    destroyAgents(agents);
    throw err;
  }
}

/** Where the downloaded bytes go: the staging file as they are, or through a decompressor into it. */
interface StageSink {
  /** Appends the batch (in order). */
  write(batch: Buffer[]): Promise<void>;
  /** All written: returns the staged file's size. */
  finish(): Promise<number>;
  /** Stops; the caller removes the file. */
  abort(): Promise<void>;
}

/** Failures of the staging file itself: never answered by resuming the download. */
const stagingFailures = new WeakSet<Error>();

function writeFailure(err: unknown, where: string, stagingPath: string): DiskconvError {
  if (err instanceof DiskconvError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  const failure =
    code === 'ENOSPC' || code === 'EDQUOT'
      ? new InsufficientSpaceError(`no space left to stage ${where} at ${stagingPath}`, { cause: err })
      : new SourceUnavailableError(`cannot write the staged copy of ${where}: ${(err as Error).message}`, { cause: err });
  stagingFailures.add(failure);
  return failure;
}

/** The bytes as they are, one writev per batch. */
async function plainSink(stagingPath: string, where: string): Promise<StageSink> {
  const handle: FileHandle = await open(stagingPath, 'w', 0o600);
  let written = 0;
  let closed = false;
  return {
    async write(batch) {
      try {
        const { bytesWritten } = await handle.writev(batch, written);
        const expected = batch.reduce((sum, b) => sum + b.length, 0);
        if (bytesWritten !== expected) throw new Error(`short write (${bytesWritten} of ${expected} bytes)`);
        written += expected;
      } catch (err) {
        throw writeFailure(err, where, stagingPath);
      }
    },
    async finish() {
      closed = true;
      await handle.close();
      return written;
    },
    async abort() {
      if (!closed) await handle.close().catch(() => {});
      closed = true;
    },
  };
}

/** Through the wrapper's decompressor (bounded) into the staging file, as the bytes arrive. */
function unwrapSink(format: WrapperFormat, stagingPath: string, where: string, bound: { maxBytes: number; limitName: string }, signal: AbortSignal | undefined): StageSink {
  const input = new PassThrough({ highWaterMark: WRITE_BATCH_BYTES });
  const output = createWriteStream(stagingPath, { mode: 0o600 });
  let failure: DiskconvError | undefined;
  const done = decompressTo(format, input, output, { ...bound, ...(signal ? { signal } : {}) }).catch((err: unknown) => {
    // Past the free space is the host's state, not the image's fault: retried (perhaps elsewhere), not refused.
    failure =
      err instanceof LimitExceededError && err.limit === FREE_SPACE_LIMIT
        ? new InsufficientSpaceError(`${where} decompresses to more than the ${err.maximum} bytes free to stage it`)
        : writeFailure(err, where, stagingPath);
    throw failure;
  });
  const settled = done.then(
    () => {},
    () => {},
  );
  return {
    async write(batch) {
      for (const chunk of batch) {
        if (failure) throw failure;
        if (!input.write(chunk)) await Promise.race([once(input, 'drain').catch(() => {}), settled]);
      }
      if (failure) throw failure;
    },
    async finish() {
      input.end();
      return await done;
    },
    async abort() {
      input.destroy();
      await settled;
      output.destroy();
    },
  };
}

/** Streams a 200 response to the staging file, resuming dropped connections with range requests. */
async function stage(
  first: Exchange,
  policy: UrlPolicy,
  options: UrlSourceOptions,
  expected: string | undefined,
  agents: Agents,
  closer?: AbortController,
): Promise<OpenedUrlSource> {
  first.expectStatus([200]);
  const { signal, stagingPath } = options;
  const target = first.checked;
  const where = displayUrl(target.url);
  const rangeCapable = (first.header('accept-ranges') ?? '').toLowerCase().split(/\s*,\s*/).includes('bytes');
  const validator = validatorOf(first);
  const limit = options.stagingLimit;

  let release: (() => void) | undefined;
  const releaseOnce = (): void => {
    const r = release;
    release = undefined;
    r?.();
  };
  let sink: StageSink | undefined;
  let exchange: Exchange | undefined = first;
  /** The followed download (options.follow): announced once its first bytes are staged. */
  let following: { opened: OpenedUrlSource; feed: { now: ReturnType<DownloadFeed['state']> } } | undefined;
  let announce: ((opened: OpenedUrlSource) => void) | undefined;
  const announced = new Promise<OpenedUrlSource>((resolve) => (announce = resolve));
  let downloaded: Promise<OpenedUrlSource> | undefined;
  const startFollowing = async (follow: NonNullable<UrlSourceOptions['follow']>, size: number): Promise<void> => {
    const feed: { now: ReturnType<DownloadFeed['state']> } = { now: { state: 'arriving' } };
    const source = await follow(stagingPath, size, where, { state: () => feed.now });
    const opened: OpenedUrlSource = {
      source,
      mode: 'staged',
      finalUrl: target.url.href,
      size,
      close: async () => {
        closer?.abort();
        await downloaded?.catch(() => {});
        await source.close().catch(() => {});
        await rm(stagingPath, { force: true });
        releaseOnce();
      },
    };
    following = { opened, feed };
    announce?.(opened);
  };
  downloaded = (async (): Promise<OpenedUrlSource> => {
  try {
    if (options.stagingSlot) release = await options.stagingSlot(signal);
    const free = await statfs(dirname(stagingPath)).then(
      (fs) => Math.max(0, fs.bavail * fs.bsize - STAGING_RESERVE),
      () => undefined,
    );
    // What a wrapper may decompress to: the virtual size limit, the staging limit, the free space.
    const bounds: Array<{ maxBytes: number; limitName: string }> = [{ maxBytes: options.maxUnwrappedBytes ?? DEFAULT_LIMITS.maxVirtualSize, limitName: 'MAX_VIRTUAL_SIZE' }];
    if (limit) bounds.push(limit);
    if (free !== undefined) bounds.push({ maxBytes: free, limitName: FREE_SPACE_LIMIT });
    const unwrapBound = bounds.reduce((a, b) => (b.maxBytes < a.maxBytes ? b : a));
    const refuseStaging = (bytes: number, known: boolean): void => {
      if (limit && bytes > limit.maxBytes) {
        throw new LimitExceededError(limit.limitName, bytes, limit.maxBytes, `${where} must be staged${known ? '' : ' and passed'}`);
      }
      if (known && free !== undefined && bytes > free) {
        throw new InsufficientSpaceError(`${where} is ${bytes} bytes; ${free} bytes are free to stage it`);
      }
    };

    let hash: Hash = createHash('sha256');
    let done = 0;
    let total: number | undefined;
    let resumes = 0;
    let stalled = 0;
    let lastReport = 0;
    let wrapper: WrapperFormat | undefined;
    // Chunks are written in batches (one writev per MiB rather than one write per socket read).
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    /** Writes what is pending; the sink is chosen by the first bytes (held back until there are enough to tell, or the end). */
    const flush = async (atEnd: boolean): Promise<void> => {
      if (!sink) {
        if (pendingBytes < WRAPPER_PROBE_BYTES && !atEnd) return;
        const head = pending.length === 1 ? (pending[0] as Buffer) : Buffer.concat(pending);
        wrapper = detectWrapper(head.subarray(0, WRAPPER_PROBE_BYTES));
        sink = wrapper ? unwrapSink(wrapper, stagingPath, where, unwrapBound, signal) : await plainSink(stagingPath, where);
        // A plain body of known length: converted while it grows, where asked for.
        if (!wrapper && options.follow && total !== undefined && total > 0 && !following) await startFollowing(options.follow, total);
      }
      if (pendingBytes === 0) return;
      const batch = pending;
      pending = [];
      pendingBytes = 0;
      await sink.write(batch);
    };
    const report = (force: boolean): void => {
      const now = Date.now();
      if (!options.onProgress || (!force && now - lastReport < PROGRESS_INTERVAL_MS)) return;
      lastReport = now;
      options.onProgress(done, total);
    };

    for (;;) {
      const before = done;
      try {
        if (!exchange) {
          const headers: Record<string, string> = { range: `bytes=${done}-` };
          const ifRange = ifRangeOf(validator);
          if (ifRange !== undefined) headers['if-range'] = ifRange;
          exchange = await fetchFollowing(target, policy, { headers, ...(signal ? { signal } : {}), agents });
        }
        const current: Exchange = exchange;
        refuseEncoding(current);
        if (current.status === 206 && current !== first) {
          const range = parseContentRange(current.header('content-range'));
          if (!range || range.start !== done || (total !== undefined && range.total !== undefined && range.total !== total)) {
            current.discard();
            throw new SourceUnavailableError(`${where}: resuming at byte ${done}, got Content-Range '${current.header('content-range') ?? ''}'`);
          }
          total ??= range.total;
        } else {
          current.expectStatus([200]);
          if (following && done > 0) {
            // The bytes staged so far are being converted: they cannot be replaced by another version's.
            current.discard();
            throw new SourceChangedError(`${where}: resuming at byte ${done}, the server sent the whole file again (it changed, or ignored the range); the bytes converted so far may be of another version`);
          }
          if (done > 0 || sink) {
            // The server sent the whole resource again (it changed, or ignored the range): start over.
            hash = createHash('sha256');
            done = 0;
            pending = [];
            pendingBytes = 0;
            await sink?.abort();
            sink = undefined;
          }
          total = parseContentLength(current.header('content-length'));
        }
        if (total !== undefined) {
          refuseTooLarge(total, policy, where);
          refuseStaging(total, true);
        }
        report(true);

        for await (const chunk of current.body()) {
          if (done + chunk.length > policy.maxBytes) {
            current.discard();
            throw new SourceTooLargeError(`${where}: the download passed the ${policy.maxBytes} bytes allowed`, policy.maxBytes);
          }
          if (total !== undefined && done + chunk.length > total) {
            current.discard();
            throw new SourceUnavailableError(`${where}: the body is longer than the ${total} bytes announced`);
          }
          if (total === undefined) refuseStaging(done + chunk.length, false);
          hash.update(chunk);
          pending.push(chunk);
          pendingBytes += chunk.length;
          done += chunk.length;
          if (pendingBytes >= WRITE_BATCH_BYTES || pending.length >= WRITE_BATCH_CHUNKS) await flush(false);
          report(false);
        }
        if (total !== undefined && done < total) {
          throw new SourceUnavailableError(`${where}: the body ended after ${done} of ${total} bytes`);
        }
        await flush(true);
        break;
      } catch (err) {
        exchange?.discard();
        exchange = undefined;
        // Only a dropped or failed connection is resumed; a write, decompression or limit failure is final.
        if (!(err instanceof SourceUnavailableError) || stagingFailures.has(err)) throw err;
        await flush(false); // what arrived before the drop is good; resume after it
        if (!rangeCapable || total === undefined) {
          throw new SourceUnavailableError(`${err.message}; the server does not offer range requests to resume`, { cause: err });
        }
        stalled = done > before ? 0 : stalled + 1;
        resumes++;
        if (stalled > MAX_STALLED_RESUMES || resumes > MAX_RESUMES) {
          throw new SourceUnavailableError(`${err.message}; gave up after ${resumes - 1} resumed requests`, { cause: err });
        }
        await sleep(Math.min(2000, 100 * 2 ** stalled), signal);
      }
    }
    report(true);
    const staged = await (sink as StageSink | undefined)?.finish();
    sink = undefined;
    destroyAgents(agents);

    const sha256 = hash.digest('hex');
    if (expected !== undefined && sha256 !== expected) throw new ChecksumMismatchError(expected, sha256, where);
    if (following) {
      following.feed.now = { state: 'complete', size: done, sha256 };
      return following.opened;
    }
    const source = await FileSource.open(stagingPath, where);
    let released = false;
    return {
      source,
      mode: 'staged',
      finalUrl: target.url.href,
      size: done,
      sha256,
      ...(wrapper ? { wrapper, unwrappedSize: staged ?? 0 } : {}),
      close: async () => {
        await source.close().catch(() => {});
        await rm(stagingPath, { force: true });
        if (!released) release?.();
        released = true;
      },
    };
  } catch (err) {
    exchange?.discard();
    await sink?.abort().catch(() => {});
    await rm(stagingPath, { force: true });
    releaseOnce();
    if (following) {
      // Already handed out: the reader learns of the failure through the feed.
      destroyAgents(agents);
      following.feed.now = { state: 'failed', error: err instanceof Error ? err : new Error(String(err)) };
    }
    throw err;
  }
  })();
  if (!options.follow) return downloaded;
  // Handed out as the download goes on: a later failure reaches the reader through the feed, not here.
  downloaded.catch(() => {});
  return Promise.race([announced, downloaded]);
}
