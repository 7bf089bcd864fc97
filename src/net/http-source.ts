/**
 * Opens a URL as a RandomAccessSource for the engine.
 *
 * The probe is a GET with `Range: bytes=0-0` (not HEAD: presigned URLs are often
 * signed for GET only, and a server without range support answers it with the
 * whole body, which we then stage without a second request).
 * - 206 with a Content-Range size, and no expectedSha256: mode 'range', the
 *   engine reads through range requests (HttpRangeSource).
 * - otherwise: mode 'staged', the body is streamed to `stagingPath`, hashed on
 *   the way; a connection dropped mid-body is resumed with `Range: bytes=N-` when
 *   the server supports ranges (If-Range guards against a changed file: a 200
 *   answer restarts from zero), else the import fails with SOURCE_UNAVAILABLE
 *   and the queue retries the job. Then the sha256 is verified and a FileSource
 *   over the staged file is returned.
 * onProgress is called while staging (at most every 200 ms, and at the end); in
 * range mode there is no download phase and it is not called.
 */
import { createHash, type Hash } from 'node:crypto';
import { open, rm, type FileHandle } from 'node:fs/promises';
import { DiskconvError, InsufficientSpaceError, InvalidArgumentError, SourceUnavailableError, throwIfAborted } from '../engine/errors.js';
import { FileSource, type RandomAccessSource } from '../engine/source.js';
import { ChecksumMismatchError, SourceTooLargeError, UrlFetchError } from './errors.js';
import { DEFAULT_RANGE_TUNING, HttpRangeSource, type RangeSourceTuning, type RemoteValidator } from './range-source.js';
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
}

export interface OpenedUrlSource {
  source: RandomAccessSource;
  mode: 'range' | 'staged';
  /** The URL after redirects (with its query; not for logs, see source.name). */
  finalUrl: string;
  size: number;
  /** sha256 of the staged bytes (staged mode only). */
  sha256?: string;
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
/** The probe's body is one byte; anything much longer means the server ignored the range. */
const MAX_PROBE_BODY = 1024;

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
  const { signal } = options;
  throwIfAborted(signal);
  const tuning: RangeSourceTuning = { ...DEFAULT_RANGE_TUNING, ...options.rangeTuning };
  const checked = await checkUrl(url, policy);
  const agents = createAgents(tuning.concurrency);
  const spec = { ...(signal ? { signal } : {}), agents };
  try {
    if (expected === undefined) {
      const probe = await fetchFollowing(checked, policy, { ...spec, headers: { range: 'bytes=0-0' } });
      const where = displayUrl(probe.checked.url);
      if (probe.status === 206) {
        refuseEncoding(probe);
        const range = parseContentRange(probe.header('content-range'));
        if (range && range.start === 0 && range.total !== undefined) {
          refuseTooLarge(range.total, policy, where);
          let received = 0;
          for await (const chunk of probe.body()) {
            received += chunk.length;
            if (received > MAX_PROBE_BODY) throw new UrlFetchError(`${where}: the answer to a 1-byte range request is longer than ${MAX_PROBE_BODY} bytes`);
          }
          const source = new HttpRangeSource(probe.checked, range.total, where, validatorOf(probe), policy, agents, signal, tuning);
          return { source, mode: 'range', finalUrl: probe.checked.url.href, size: range.total, close: () => source.close() };
        }
        // A 206 we cannot use for ranges (no size): fetch the whole body.
        probe.discard();
      } else if (probe.status === 200) {
        return await stage(probe, policy, options, expected, agents);
      } else if (probe.status === 416) {
        probe.discard(); // an empty resource: nothing satisfies bytes=0-0
      } else {
        probe.expectStatus([200, 206]);
      }
    }
    const whole = await fetchFollowing(checked, policy, spec);
    return await stage(whole, policy, options, expected, agents);
  } catch (err) {
    destroyAgents(agents);
    throw err;
  }
}

/** Streams a 200 response to the staging file, resuming dropped connections with range requests. */
async function stage(first: Exchange, policy: UrlPolicy, options: UrlSourceOptions, expected: string | undefined, agents: Agents): Promise<OpenedUrlSource> {
  first.expectStatus([200]);
  const { signal, stagingPath } = options;
  const target = first.checked;
  const where = displayUrl(target.url);
  const rangeCapable = (first.header('accept-ranges') ?? '').toLowerCase().split(/\s*,\s*/).includes('bytes');
  const validator = validatorOf(first);

  let handle: FileHandle | undefined;
  let exchange: Exchange | undefined = first;
  try {
    handle = await open(stagingPath, 'w', 0o600);
    let hash: Hash = createHash('sha256');
    let done = 0;
    let total: number | undefined;
    let resumes = 0;
    let stalled = 0;
    let lastReport = 0;
    // Chunks are written in batches (one writev per MiB rather than one write per socket read).
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let written = 0;
    let writeFailure: DiskconvError | undefined;
    const flush = async (): Promise<void> => {
      if (pendingBytes === 0) return;
      const batch = pending;
      pending = [];
      pendingBytes = 0;
      try {
        const { bytesWritten } = await (handle as FileHandle).writev(batch, written);
        const expected = batch.reduce((sum, b) => sum + b.length, 0);
        if (bytesWritten !== expected) throw new Error(`short write (${bytesWritten} of ${expected} bytes)`);
        written += expected;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        writeFailure =
          code === 'ENOSPC' || code === 'EDQUOT'
            ? new InsufficientSpaceError(`no space left to stage ${where} at ${stagingPath}`, { cause: err })
            : new SourceUnavailableError(`cannot write the staged copy of ${where}: ${(err as Error).message}`, { cause: err });
        throw writeFailure;
      }
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
          const ifRange = validator.etag !== undefined && !validator.etag.startsWith('W/') ? validator.etag : validator.lastModified;
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
          if (done > 0) {
            // The server sent the whole resource again (it changed, or ignored the range): start over.
            hash = createHash('sha256');
            done = 0;
            written = 0;
            await handle.truncate(0);
          }
          total = parseContentLength(current.header('content-length'));
        }
        if (total !== undefined) refuseTooLarge(total, policy, where);
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
          hash.update(chunk);
          pending.push(chunk);
          pendingBytes += chunk.length;
          done += chunk.length;
          if (pendingBytes >= WRITE_BATCH_BYTES || pending.length >= WRITE_BATCH_CHUNKS) await flush();
          report(false);
        }
        await flush();
        if (total !== undefined && done < total) {
          throw new SourceUnavailableError(`${where}: the body ended after ${done} of ${total} bytes`);
        }
        break;
      } catch (err) {
        exchange?.discard();
        exchange = undefined;
        if (!(err instanceof SourceUnavailableError) || err === writeFailure) throw err;
        await flush(); // what arrived before the drop is good; resume after it
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
    await handle.close();
    handle = undefined;
    destroyAgents(agents);

    const sha256 = hash.digest('hex');
    if (expected !== undefined && sha256 !== expected) throw new ChecksumMismatchError(expected, sha256, where);
    const source = await FileSource.open(stagingPath, where);
    return {
      source,
      mode: 'staged',
      finalUrl: target.url.href,
      size: done,
      sha256,
      close: async () => {
        await source.close().catch(() => {});
        await rm(stagingPath, { force: true });
      },
    };
  } catch (err) {
    exchange?.discard();
    await handle?.close().catch(() => {});
    await rm(stagingPath, { force: true });
    throw err;
  }
}
