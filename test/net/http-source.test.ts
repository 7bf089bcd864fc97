/**
 * URL import against real HTTP servers on 127.0.0.1: range mode and staged mode,
 * dropped connections, redirects, size limits, timeouts, checksums, abort. The
 * converted output is compared with `qemu-img convert -O raw` of the served file.
 */
import { execFile, execFileSync as execFileSyncNode } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { mkdir, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AbortedError, SourceUnavailableError } from '../../src/engine/errors.js';
import { FileSource, RawFileSink, convertToRaw, openImage, type RandomAccessSource } from '../../src/engine/index.js';
import { ChecksumMismatchError, SourceChangedError, SourceTooLargeError, UrlFetchError } from '../../src/net/errors.js';
import { openUrlSource, type OpenedUrlSource } from '../../src/net/http-source.js';
import { HttpRangeSource } from '../../src/net/range-source.js';
import { DEFAULT_URL_POLICY, type UrlPolicy } from '../../src/net/url-policy.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { fileHandler, redirect, routes, startBlackhole, startServer, type TestServer } from './servers.js';
import { canMountTmpfs } from '../helpers/tmpfs.js';

const execFileP = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
const servers: TestServer[] = [];

interface Fixture {
  path: string;
  bytes: Buffer;
  sha256: string;
  /** sha256 of qemu-img convert -O raw of the file. */
  reference: string;
}
const fixtures: Record<string, Fixture> = {};

const policy: UrlPolicy = { ...DEFAULT_URL_POLICY, allow: ['127.0.0.1'], idleTimeoutMs: 5_000, connectTimeoutMs: 5_000 };

async function serve(handler: Parameters<typeof startServer>[0]): Promise<TestServer> {
  const server = await startServer(handler);
  servers.push(server);
  return server;
}

function staging(): string {
  return join(dir, `staged-${randomBytes(6).toString('hex')}`);
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Converts through the engine and returns the sha256 of the raw output file. */
async function convertThrough(source: RandomAccessSource): Promise<string> {
  const image = await openImage(source);
  const out = join(dir, `out-${randomBytes(6).toString('hex')}.raw`);
  try {
    const sink = await RawFileSink.create(out, { removeOnAbort: true });
    const result = await convertToRaw(image, source, sink, { sha256: true });
    const onDisk = await sha256File(out);
    expect(result.sha256).toBe(onDisk);
    return onDisk;
  } finally {
    await image.close();
    await rm(out, { force: true });
  }
}

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-net-'));
  const base = join(dir, 'base.raw');
  await writeFile(base, mixedContent(3 * 2 ** 20 + 4096, 42));
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', base, join(dir, 'disk.qcow2'));
  await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', join(dir, 'disk.qcow2'), join(dir, 'disk.raw'));
  await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', base, join(dir, 'disk.vmdk'));
  await qemuImg('convert', '-f', 'raw', '-O', 'vdi', base, join(dir, 'disk.vdi'));
  await writeFile(join(dir, 'odd.raw'), mixedContent(1_000_001, 7)); // not a whole number of sectors
  for (const name of ['disk.raw', 'disk.qcow2', 'disk.vmdk', 'disk.vdi', 'odd.raw']) {
    const path = join(dir, name);
    const bytes = await readFile(path);
    fixtures[name] = { path, bytes, sha256: createHash('sha256').update(bytes).digest('hex'), reference: await qemuRawSha256(path, dir) };
  }
});

afterAll(async () => {
  await Promise.all(servers.map((s) => s.close()));
  await cleanup();
});

const fx = (name: string): Fixture => fixtures[name] as Fixture;

describe('range mode', () => {
  for (const name of ['disk.raw', 'odd.raw', 'disk.vmdk', 'disk.vdi', 'disk.qcow2']) {
    it(`reads ${name} through range requests and converts it like qemu-img`, async () => {
      const f = fx(name);
      const server = await serve(fileHandler(f.bytes, { ranges: true, etag: '"v1"' }));
      const stagingPath = staging();
      const opened = await openUrlSource(`${server.origin}/${name}`, policy, { stagingPath });
      try {
        expect(opened.mode).toBe('range');
        expect(opened.size).toBe(f.bytes.length);
        expect(opened.sha256).toBeUndefined();
        expect(opened.source).toBeInstanceOf(HttpRangeSource);
        expect(await convertThrough(opened.source)).toBe(f.reference);
        // Every request was a range request; nothing was staged.
        expect(server.requests.every((r) => r.range !== undefined)).toBe(true);
        expect(server.requests.slice(1).every((r) => r.ifRange === '"v1"')).toBe(true);
        expect(await exists(stagingPath)).toBe(false);
        const stats = (opened.source as HttpRangeSource).stats;
        expect(stats.bytesFetched).toBeLessThan(2 * f.bytes.length);
      } finally {
        await opened.close();
      }
    });
  }

  it('serves small neighbouring reads from one cached block', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true, etag: '"v1"' }));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging() });
    try {
      const before = server.requests.length;
      const a = await opened.source.read(0, 512);
      const b = await opened.source.read(512, 4096);
      const c = await opened.source.read(100_000, 100);
      expect(server.requests.length - before).toBe(1);
      expect(Buffer.from(a)).toEqual(f.bytes.subarray(0, 512));
      expect(Buffer.from(b)).toEqual(f.bytes.subarray(512, 4608));
      expect(Buffer.from(c)).toEqual(f.bytes.subarray(100_000, 100_100));
      // A read across a block boundary and one past the end.
      const d = await opened.source.read(256 * 1024 - 10, 20);
      expect(Buffer.from(d)).toEqual(f.bytes.subarray(256 * 1024 - 10, 256 * 1024 + 10));
      const tail = await opened.source.read(f.bytes.length - 5, 100);
      expect(Buffer.from(tail)).toEqual(f.bytes.subarray(f.bytes.length - 5));
      expect((await opened.source.read(f.bytes.length, 10)).length).toBe(0);
      // A large read goes straight to the server.
      const big = await opened.source.read(1_000_000, 1_500_000);
      expect(Buffer.from(big).equals(f.bytes.subarray(1_000_000, 2_500_000))).toBe(true);
    } finally {
      await opened.close();
    }
  });

  it('retries range requests that drop mid-body; the result is byte-identical', async () => {
    const f = fx('disk.raw');
    // Requests 1 and 4 (the probe is 0) lose their connection after 1000 bytes.
    const server = await serve(fileHandler(f.bytes, { ranges: true, etag: '"v1"', dropAfter: { bytes: 1000, requests: [1, 4] } }));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), rangeTuning: { retryDelayMs: 10 } });
    try {
      expect(opened.mode).toBe('range');
      expect(await convertThrough(opened.source)).toBe(f.reference);
      // Both dropped requests happened and were retried.
      expect(server.requests.length).toBeGreaterThanOrEqual(6);
      expect(server.requests.length).toBe(1 + (opened.source as HttpRangeSource).stats.requests);
    } finally {
      await opened.close();
    }
  });

  it('fails with SOURCE_UNAVAILABLE when a range keeps failing', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true, etag: '"v1"', dropAfter: { bytes: 10, requests: [1, 2, 3, 4, 5] } }));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), rangeTuning: { retryDelayMs: 10 } });
    try {
      const err = await opened.source.read(0, 4 * 2 ** 20).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SourceUnavailableError);
      expect(server.requests.length).toBe(4); // the probe and three attempts
    } finally {
      await opened.close();
    }
  });

  it('refuses to mix versions when the remote file changes', async () => {
    const f = fx('disk.raw');
    let etag = '"v1"';
    const server = await serve((req, res, i) => fileHandler(f.bytes, { ranges: true, etag })(req, res, i));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), rangeTuning: { retryDelayMs: 10 } });
    try {
      etag = '"v2"'; // If-Range no longer matches: the server answers 200 with everything
      const err = await opened.source.read(0, 512).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SourceChangedError);
      expect(err).toMatchObject({ code: 'SOURCE_CHANGED', deterministic: false });
      expect((err as Error).message).toMatch(/changed/);
      // Not retried within the read: one more request after the probe, carrying If-Range.
      expect(server.requests.length).toBe(2);
      expect(server.requests[1]?.ifRange).toBe('"v1"');
    } finally {
      await opened.close();
    }
  });

  it('honours an abort signal on reads', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true, etag: '"v1"' }));
    const controller = new AbortController();
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), signal: controller.signal });
    try {
      const local = new AbortController();
      local.abort();
      await expect(opened.source.read(0, 512, local.signal)).rejects.toBeInstanceOf(AbortedError);
      controller.abort();
      await expect(opened.source.read(0, 512)).rejects.toBeInstanceOf(AbortedError);
    } finally {
      await opened.close();
    }
  });
});

describe('staged mode', () => {
  for (const name of ['disk.raw', 'odd.raw', 'disk.vmdk', 'disk.qcow2']) {
    it(`stages ${name} from a server without range support and converts it like qemu-img`, async () => {
      const f = fx(name);
      const server = await serve(fileHandler(f.bytes, { ranges: false }));
      const stagingPath = staging();
      const progress: Array<[number, number | undefined]> = [];
      const opened = await openUrlSource(`${server.origin}/${name}`, policy, { stagingPath, onProgress: (d, t) => progress.push([d, t]) });
      try {
        expect(opened.mode).toBe('staged');
        expect(opened.size).toBe(f.bytes.length);
        expect(opened.sha256).toBe(f.sha256);
        expect(await sha256File(stagingPath)).toBe(f.sha256);
        expect(server.requests.length).toBe(1); // the probe's answer was the download
        expect(progress.at(-1)).toEqual([f.bytes.length, f.bytes.length]);
        expect(await convertThrough(opened.source)).toBe(f.reference);
      } finally {
        await opened.close();
      }
      expect(await exists(stagingPath)).toBe(false);
    });
  }

  it('stages a chunked body of unknown length', async () => {
    const f = fx('disk.vmdk');
    const server = await serve(fileHandler(f.bytes, { ranges: false, chunked: true }));
    const opened = await openUrlSource(`${server.origin}/disk.vmdk`, policy, { stagingPath: staging() });
    try {
      expect(opened.mode).toBe('staged');
      expect(opened.sha256).toBe(f.sha256);
      expect(await convertThrough(opened.source)).toBe(f.reference);
    } finally {
      await opened.close();
    }
  });

  it('stages an empty file', async () => {
    const server = await serve(fileHandler(Buffer.alloc(0), { ranges: true }));
    const opened = await openUrlSource(`${server.origin}/empty`, policy, { stagingPath: staging() });
    try {
      expect(opened.mode).toBe('staged');
      expect(opened.size).toBe(0);
    } finally {
      await opened.close();
    }
  });

  it('verifies expectedSha256 (staging even when ranges are offered)', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true }));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), expectedSha256: f.sha256.toUpperCase() });
    try {
      expect(opened.mode).toBe('staged');
      expect(opened.sha256).toBe(f.sha256);
      expect(await convertThrough(opened.source)).toBe(f.reference);
    } finally {
      await opened.close();
    }
  });

  it('refuses a wrong expectedSha256 with CHECKSUM_MISMATCH and removes the staged file', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true }));
    const stagingPath = staging();
    const wrong = createHash('sha256').update('something else').digest('hex');
    const err = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath, expectedSha256: wrong }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChecksumMismatchError);
    expect((err as ChecksumMismatchError).code).toBe('CHECKSUM_MISMATCH');
    expect((err as ChecksumMismatchError).deterministic).toBe(true);
    expect((err as ChecksumMismatchError).actual).toBe(f.sha256);
    expect(await exists(stagingPath)).toBe(false);
    await expect(openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath, expectedSha256: 'abc' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });

  it('resumes a dropped connection with a range request; the result is byte-identical', async () => {
    const f = fx('disk.raw');
    // The first two GETs break after 700 kB and 10 bytes more.
    const server = await serve(fileHandler(f.bytes, { ranges: true, etag: '"abc"', dropAfter: { bytes: 700_000, requests: [0, 1] } }));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), expectedSha256: f.sha256 });
    try {
      expect(opened.mode).toBe('staged');
      expect(opened.sha256).toBe(f.sha256);
      expect(server.requests.map((r) => r.range)).toEqual([undefined, 'bytes=700000-', 'bytes=1400000-']);
      expect(server.requests.slice(1).every((r) => r.ifRange === '"abc"')).toBe(true);
      expect(await convertThrough(opened.source)).toBe(f.reference);
    } finally {
      await opened.close();
    }
  });

  it('starts over when the file changed between the drop and the resume', async () => {
    const f = fx('odd.raw');
    let etag = '"one"';
    const drop = fileHandler(f.bytes, { ranges: true, etag: '"one"', dropAfter: { bytes: 300_000, requests: [0] } });
    const server = await serve((req, res, i) => {
      if (i === 0) return drop(req, res, i);
      etag = '"two"';
      return fileHandler(f.bytes, { ranges: true, etag })(req, res, i);
    });
    const opened = await openUrlSource(`${server.origin}/odd.raw`, policy, { stagingPath: staging(), expectedSha256: f.sha256 });
    try {
      expect(server.requests.map((r) => r.range)).toEqual([undefined, 'bytes=300000-']);
      expect(opened.sha256).toBe(f.sha256);
    } finally {
      await opened.close();
    }
  });

  it('fails with SOURCE_UNAVAILABLE when the connection drops and the server cannot resume', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: false, dropAfter: { bytes: 500_000, requests: [0] } }));
    const stagingPath = staging();
    const err = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceUnavailableError);
    expect((err as SourceUnavailableError).deterministic).toBe(false);
    expect(await exists(stagingPath)).toBe(false);
  });

  it('gives up resuming when a resumed request brings nothing', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true, dropAfter: { bytes: 0, requests: [0, 1, 2, 3, 4, 5, 6, 7, 8] } }));
    const stagingPath = staging();
    const err = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath, expectedSha256: f.sha256 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceUnavailableError);
    expect(server.requests.length).toBe(4); // the first GET and three stalled resumes
    expect(await exists(stagingPath)).toBe(false);
  });

  it('aborts mid-download, removes the staged file and raises ABORTED', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: false, trickle: { chunk: 64 * 1024, everyMs: 20 } }));
    const stagingPath = staging();
    const controller = new AbortController();
    let sawProgress = 0;
    const err = await openUrlSource(`${server.origin}/disk.raw`, policy, {
      stagingPath,
      signal: controller.signal,
      onProgress: (done) => {
        if (done > 0) {
          sawProgress = done;
          controller.abort();
        }
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortedError);
    expect(sawProgress).toBeGreaterThan(0);
    expect(sawProgress).toBeLessThan(f.bytes.length);
    expect(await exists(stagingPath)).toBe(false);
    expect((await readdir(dir)).filter((n) => n.startsWith('staged-'))).toEqual([]);
  });

  it('does not start when the signal is already aborted', async () => {
    const server = await serve(fileHandler(fx('odd.raw').bytes, { ranges: false }));
    const controller = new AbortController();
    controller.abort();
    await expect(openUrlSource(`${server.origin}/odd.raw`, policy, { stagingPath: staging(), signal: controller.signal })).rejects.toBeInstanceOf(AbortedError);
    expect(server.requests.length).toBe(0);
  });
});

describe('limits and failures', () => {
  it('refuses a Content-Length over maxBytes before reading the body', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: false }));
    const stagingPath = staging();
    const small = { ...policy, maxBytes: 1_000_000 };
    const err = await openUrlSource(`${server.origin}/disk.raw`, small, { stagingPath }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceTooLargeError);
    expect((err as SourceTooLargeError).code).toBe('SOURCE_TOO_LARGE');
    expect((err as SourceTooLargeError).deterministic).toBe(true);
    expect(await exists(stagingPath)).toBe(false);
  });

  it('refuses a Content-Range size over maxBytes (range mode)', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true }));
    const err = await openUrlSource(`${server.origin}/disk.raw`, { ...policy, maxBytes: 1_000_000 }, { stagingPath: staging() }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceTooLargeError);
    expect(server.requests.length).toBe(1);
  });

  it('aborts a body of unknown length that streams past maxBytes', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: false, chunked: true }));
    const stagingPath = staging();
    const err = await openUrlSource(`${server.origin}/disk.raw`, { ...policy, maxBytes: 1_000_000 }, { stagingPath }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceTooLargeError);
    expect(await exists(stagingPath)).toBe(false);
  });

  it('fires the idle timeout on a server that stops sending (bounded)', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: false, stallAfter: 100_000 }));
    const stagingPath = staging();
    const err = await openUrlSource(`${server.origin}/disk.raw`, { ...policy, idleTimeoutMs: 300 }, { stagingPath }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceUnavailableError);
    expect((err as Error).message).toMatch(/idle timeout/);
    expect(await exists(stagingPath)).toBe(false);
  });

  it('fires the idle timeout on a server that never answers', async () => {
    const server = await serve(() => {
      /* never answers */
    });
    const err = await openUrlSource(`${server.origin}/x`, { ...policy, idleTimeoutMs: 300 }, { stagingPath: staging() }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceUnavailableError);
    expect((err as Error).message).toMatch(/idle timeout/);
  });

  it('fires the connect timeout when the TCP handshake does not complete (bounded)', async () => {
    const blackhole = await startBlackhole();
    try {
      const url = `http://127.0.0.1:${blackhole.port}/disk.raw`;
      const err = await openUrlSource(url, { ...policy, connectTimeoutMs: 300, idleTimeoutMs: 60_000 }, { stagingPath: staging() }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SourceUnavailableError);
      expect((err as Error).message).toMatch(/timed out after 300 ms/);
    } finally {
      await blackhole.close();
    }
  });

  it('reports a refused connection as SOURCE_UNAVAILABLE', async () => {
    const server = await startServer(() => {});
    const origin = server.origin;
    await server.close();
    const err = await openUrlSource(`${origin}/x`, policy, { stagingPath: staging() }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceUnavailableError);
  });

  it('maps 4xx to URL_FETCH_FAILED and 5xx/429 to SOURCE_UNAVAILABLE', async () => {
    const server = await serve((req, res) => {
      const status = Number((req.url ?? '/500').slice(1));
      res.writeHead(status).end('no');
    });
    for (const [status, code, deterministic] of [
      [404, 'URL_FETCH_FAILED', true],
      [403, 'URL_FETCH_FAILED', true],
      [429, 'SOURCE_UNAVAILABLE', false],
      [500, 'SOURCE_UNAVAILABLE', false],
      [503, 'SOURCE_UNAVAILABLE', false],
    ] as const) {
      const err = await openUrlSource(`${server.origin}/${status}`, policy, { stagingPath: staging() }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code, deterministic });
      if (status < 500 && status !== 429) expect(err).toBeInstanceOf(UrlFetchError);
    }
  });

  it('refuses an encoded body', async () => {
    const server = await serve((_req, res) => {
      res.writeHead(200, { 'content-encoding': 'gzip', 'content-length': 3 }).end('abc');
    });
    await expect(openUrlSource(`${server.origin}/x`, policy, { stagingPath: staging() })).rejects.toMatchObject({ code: 'URL_FETCH_FAILED' });
  });

  it('follows redirects to the image and reports the final URL', async () => {
    const f = fx('disk.vmdk');
    const server = await serve(
      routes({
        '/start': redirect('/hop?x=1', 301),
        '/hop': redirect('/files/disk.vmdk?token=secret', 307),
        '/files/disk.vmdk': fileHandler(f.bytes, { ranges: true, etag: '"v1"' }),
      }),
    );
    const opened = await openUrlSource(`${server.origin}/start`, policy, { stagingPath: staging() });
    try {
      expect(opened.mode).toBe('range');
      expect(opened.finalUrl).toBe(`${server.origin}/files/disk.vmdk?token=secret`);
      expect(opened.source.name).toBe(`${server.origin}/files/disk.vmdk`); // no query in names (presigned secrets)
      expect(await convertThrough(opened.source)).toBe(f.reference);
    } finally {
      await opened.close();
    }
  });
});

describe('validators and If-Range', () => {
  it('stages a range-capable server that names no version (no ETag, no Last-Modified)', async () => {
    const f = fx('disk.qcow2');
    const server = await serve(fileHandler(f.bytes, { ranges: true }));
    const stagingPath = staging();
    const opened = await openUrlSource(`${server.origin}/disk.qcow2`, policy, { stagingPath });
    try {
      expect(opened.mode).toBe('staged');
      expect(opened.sha256).toBe(f.sha256);
      expect(await exists(stagingPath)).toBe(true);
      expect(await convertThrough(opened.source)).toBe(f.reference);
      // The probe, then one whole GET; nothing read by ranges afterwards.
      expect(server.requests.map((r) => r.range)).toEqual(['bytes=0-9', undefined]);
    } finally {
      await opened.close();
    }
    expect(await exists(stagingPath)).toBe(false);
  });

  it('stages a server whose only validator is a weak ETag (If-Range cannot use it)', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: true, etag: 'W/"v1"' }));
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging() });
    try {
      expect(opened.mode).toBe('staged');
    } finally {
      await opened.close();
    }
  });

  it('reads by ranges with If-Range: <Last-Modified> when that is the validator, and refuses a newer file', async () => {
    const f = fx('disk.raw');
    let lastModified = 'Tue, 01 Apr 2025 10:00:00 GMT';
    const server = await serve((req, res) => {
      const stale = req.headers['if-range'] !== undefined && req.headers['if-range'] !== lastModified;
      const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
      if (!m || stale) {
        res.writeHead(200, { 'content-length': f.bytes.length, 'accept-ranges': 'bytes', 'last-modified': lastModified }).end(f.bytes);
        return;
      }
      const start = Number(m[1]);
      const end = m[2] ? Math.min(Number(m[2]), f.bytes.length - 1) : f.bytes.length - 1;
      res.writeHead(206, { 'content-range': `bytes ${start}-${end}/${f.bytes.length}`, 'content-length': end - start + 1, 'last-modified': lastModified });
      res.end(f.bytes.subarray(start, end + 1));
    });
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging() });
    try {
      expect(opened.mode).toBe('range');
      expect(await convertThrough(opened.source)).toBe(f.reference);
      expect(server.requests.slice(1).every((r) => r.ifRange === 'Tue, 01 Apr 2025 10:00:00 GMT')).toBe(true);
      lastModified = 'Wed, 02 Apr 2025 10:00:00 GMT';
      const err = await opened.source.read(2 * 2 ** 20, 600_000).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SourceChangedError);
    } finally {
      await opened.close();
    }
  });

  it('refuses a range answer from another version (ETag differs) as SOURCE_CHANGED', async () => {
    const f = fx('disk.raw');
    let etag = '"v1"';
    // A server that ignores If-Range but tells its ETag: the answer itself gives the change away.
    const server = await serve((req, res) => {
      const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
      const start = Number(m?.[1] ?? 0);
      const end = m?.[2] ? Math.min(Number(m[2]), f.bytes.length - 1) : f.bytes.length - 1;
      res.writeHead(206, { 'content-range': `bytes ${start}-${end}/${f.bytes.length}`, 'content-length': end - start + 1, etag });
      res.end(f.bytes.subarray(start, end + 1));
    });
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging() });
    try {
      expect(opened.mode).toBe('range');
      expect(Buffer.from(await opened.source.read(0, 512)).equals(f.bytes.subarray(0, 512))).toBe(true);
      etag = '"v2"';
      await expect(opened.source.read(1_000_000, 512)).rejects.toMatchObject({ code: 'SOURCE_CHANGED' });
    } finally {
      await opened.close();
    }
  });
});

describe('compressed wrappers', () => {
  const TOOLS = { gzip: 'gzip', xz: 'xz', bzip2: 'bzip2', zstd: 'zstd' } as const;
  const wrapped: Record<string, Buffer> = {};
  beforeAll(async () => {
    for (const [w, tool] of Object.entries(TOOLS)) {
      const { stdout } = await execFileP(tool, ['-c', fx('disk.qcow2').path], { encoding: 'buffer', maxBuffer: 64 * 2 ** 20 });
      wrapped[w] = stdout;
    }
  });

  for (const w of Object.keys(TOOLS)) {
    it(`${w}: a range-capable server with a validator is still staged, unwrapped as it arrives`, async () => {
      const bytes = wrapped[w] as Buffer;
      const server = await serve(fileHandler(bytes, { ranges: true, etag: '"v1"' }));
      const stagingPath = staging();
      const opened = await openUrlSource(`${server.origin}/disk`, policy, { stagingPath });
      try {
        expect(opened.mode).toBe('staged');
        expect(opened.wrapper).toBe(w);
        expect(opened.size).toBe(bytes.length);
        expect(opened.sha256).toBe(createHash('sha256').update(bytes).digest('hex'));
        expect(opened.unwrappedSize).toBe(fx('disk.qcow2').bytes.length);
        // The staged file is the inner image itself; no compressed copy lies beside it.
        expect((await readFile(stagingPath)).equals(fx('disk.qcow2').bytes)).toBe(true);
        expect((await readdir(dir)).filter((n) => n.startsWith(stagingPath.split('/').pop() as string))).toEqual([stagingPath.split('/').pop()]);
        expect(await convertThrough(opened.source)).toBe(fx('disk.qcow2').reference);
      } finally {
        await opened.close();
      }
      expect(await exists(stagingPath)).toBe(false);
    });
  }

  it('resumes a dropped download into the same decompressor', async () => {
    const bytes = wrapped.xz as Buffer;
    const server = await serve(fileHandler(bytes, { ranges: true, etag: '"v1"', dropAfter: { bytes: Math.floor(bytes.length / 3), requests: [1] } }));
    const opened = await openUrlSource(`${server.origin}/disk`, policy, { stagingPath: staging() });
    try {
      expect(opened.wrapper).toBe('xz');
      expect(server.requests.at(-1)?.range).toBe(`bytes=${Math.floor(bytes.length / 3)}-`);
      expect(await convertThrough(opened.source)).toBe(fx('disk.qcow2').reference);
    } finally {
      await opened.close();
    }
  });

  it('stops a decompression bomb at maxUnwrappedBytes (LIMIT_EXCEEDED) and removes the staged file', async () => {
    const { stdout: bomb } = await execFileP('sh', ['-c', 'head -c 67108864 /dev/zero | gzip -c'], { encoding: 'buffer', maxBuffer: 16 * 2 ** 20 });
    const server = await serve(fileHandler(bomb, { ranges: true, etag: '"v1"' }));
    const stagingPath = staging();
    const err = await openUrlSource(`${server.origin}/bomb`, policy, { stagingPath, maxUnwrappedBytes: 8 * 2 ** 20 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'LIMIT_EXCEEDED', limit: 'MAX_VIRTUAL_SIZE' });
    expect(await exists(stagingPath)).toBe(false);
  });

  it('refuses a truncated wrapper with IMAGE_CORRUPT and removes the staged file', async () => {
    for (const w of ['gzip', 'zstd', 'bzip2']) {
      const whole = wrapped[w] as Buffer;
      const server = await serve(fileHandler(whole.subarray(0, Math.floor(whole.length / 2)), { ranges: true, etag: '"v1"' }));
      const stagingPath = staging();
      const err = await openUrlSource(`${server.origin}/cut`, policy, { stagingPath }).catch((e: unknown) => e);
      expect(err, w).toMatchObject({ code: 'IMAGE_CORRUPT' });
      expect(await exists(stagingPath)).toBe(false);
    }
  });

  it('bounds what may be staged (stagingLimit): refused by Content-Length first, and while decompressing', async () => {
    const f = fx('disk.raw');
    const plain = await serve(fileHandler(f.bytes, { ranges: false }));
    const stagingPath = staging();
    const limit = { maxBytes: 2 * 2 ** 20, limitName: 'INSPECT_MAX_BYTES' };
    await expect(openUrlSource(`${plain.origin}/disk.raw`, policy, { stagingPath, stagingLimit: limit })).rejects.toMatchObject({ code: 'LIMIT_EXCEEDED', limit: 'INSPECT_MAX_BYTES' });
    const packed = await serve(fileHandler(wrapped.gzip as Buffer, { ranges: true, etag: '"v1"' }));
    expect((wrapped.gzip as Buffer).length).toBeLessThan(limit.maxBytes);
    await expect(openUrlSource(`${packed.origin}/disk`, policy, { stagingPath, stagingLimit: limit })).rejects.toMatchObject({ code: 'LIMIT_EXCEEDED', limit: 'INSPECT_MAX_BYTES' });
    expect(await exists(stagingPath)).toBe(false);
    // A range-readable plain image is not staged, so the bound does not apply.
    const ranged = await serve(fileHandler(f.bytes, { ranges: true, etag: '"v1"' }));
    const opened = await openUrlSource(`${ranged.origin}/disk.raw`, policy, { stagingPath, stagingLimit: limit });
    await opened.close();
    expect(opened.mode).toBe('range');
  });

  it('takes a staging slot before staging and gives it back when the staged file is gone', async () => {
    const f = fx('disk.raw');
    const server = await serve(fileHandler(f.bytes, { ranges: false }));
    const events: string[] = [];
    const stagingSlot = async (): Promise<() => void> => {
      events.push('acquire');
      return () => events.push('release');
    };
    const opened = await openUrlSource(`${server.origin}/disk.raw`, policy, { stagingPath: staging(), stagingSlot });
    expect(events).toEqual(['acquire']);
    await opened.close();
    await opened.close();
    expect(events).toEqual(['acquire', 'release']);
    const failed = await serve(fileHandler(f.bytes, { ranges: false }));
    await expect(openUrlSource(`${failed.origin}/disk.raw`, policy, { stagingPath: staging(), stagingSlot, expectedSha256: 'ab'.repeat(32) })).rejects.toMatchObject({ code: 'CHECKSUM_MISMATCH' });
    expect(events).toEqual(['acquire', 'release', 'acquire', 'release']);
  });
});


describe('free space while unwrapping', () => {
  it.skipIf(!canMountTmpfs() && process.env.CI !== 'true')('a wrapper that decompresses past the free space is INSUFFICIENT_SPACE (retried), not the image\'s fault; nothing stays', async () => {
    const mnt = join(dir, 'small-fs');
    await mkdir(mnt);
    execFileSyncNode('mount', ['-t', 'tmpfs', '-o', 'size=72m', 'tmpfs', mnt]);
    try {
      const { stdout: packed } = await execFileP('sh', ['-c', 'head -c 33554432 /dev/zero | gzip -c'], { encoding: 'buffer', maxBuffer: 16 * 2 ** 20 });
      const server = await serve(fileHandler(packed, { ranges: false }));
      const stagingPath = join(mnt, 'staged');
      // 72 MiB free minus the 64 MiB kept free: about 8 MiB to decompress into, far under MAX_VIRTUAL_SIZE.
      const err = await openUrlSource(`${server.origin}/packed`, policy, { stagingPath }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'INSUFFICIENT_SPACE', deterministic: false });
      expect(await readdir(mnt)).toEqual([]);
    } finally {
      execFileSyncNode('umount', ['-l', mnt]);
    }
  });
});
