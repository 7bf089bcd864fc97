/**
 * A staged download followed as it grows (UrlSourceOptions.follow, as the worker
 * opens URLs through openImportUrlFollowing): real HTTP servers on 127.0.0.1,
 * the engine converting the growing file, qemu-img as the reference. Servers
 * that hold back the end of a body let the tests see that the source was handed
 * out before the last byte (no timing assertions).
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SourceUnavailableError } from '../../src/engine/errors.js';
import { RawFileSink, convertToRaw, openImage, type RandomAccessSource } from '../../src/engine/index.js';
import { SourceChangedError } from '../../src/net/errors.js';
import { openUrlSource } from '../../src/net/http-source.js';
import { DEFAULT_URL_POLICY, type UrlPolicy } from '../../src/net/url-policy.js';
import { GrowingFileSource } from '../../src/queue/upload-stream.js';
import { openImportUrlFollowing } from '../../src/queue/url-import.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { fileHandler, startServer, type Handler, type TestServer } from './servers.js';

let dir: string;
let cleanup: () => Promise<void>;
const servers: TestServer[] = [];
let image: { bytes: Buffer; sha256: string; reference: string };
const policy: UrlPolicy = { ...DEFAULT_URL_POLICY, allow: ['127.0.0.1'], idleTimeoutMs: 10_000, connectTimeoutMs: 5_000 };

async function serve(handler: Handler): Promise<TestServer> {
  const server = await startServer(handler);
  servers.push(server);
  return server;
}
const staging = (): string => join(dir, `staged-${randomBytes(6).toString('hex')}`);
const exists = (path: string): Promise<boolean> => stat(path).then(() => true, () => false);

/** Sends the body up to `holdAt`, then waits for `release()`; later requests get `later` (default: the whole body, 200). */
function holding(body: Buffer, holdAt: number, headers: Record<string, string> = {}, later?: Handler): { handler: Handler; held: Promise<void>; release(): void; drop(): void } {
  let onHeld!: () => void;
  const held = new Promise<void>((r) => (onHeld = r));
  let act: ((how: 'release' | 'drop') => void) | undefined;
  let decided: 'release' | 'drop' | undefined;
  const decide = (how: 'release' | 'drop'): void => {
    decided = how;
    act?.(how);
  };
  return {
    held,
    release: () => decide('release'),
    drop: () => decide('drop'),
    handler: (req, res: ServerResponse, index) => {
      if (index > 0) {
        if (later) return later(req, res, index);
        res.writeHead(200, { 'content-length': String(body.length), ...headers }).end(body);
        return;
      }
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(body.length), ...headers });
      res.write(body.subarray(0, holdAt), () => {
        onHeld();
        act = (how) => (how === 'release' ? res.end(body.subarray(holdAt)) : res.socket?.destroy());
        if (decided) act(decided);
      });
    },
  };
}

async function convertThrough(source: RandomAccessSource): Promise<string> {
  const img = await openImage(source);
  const out = join(dir, `out-${randomBytes(6).toString('hex')}.raw`);
  try {
    const sink = await RawFileSink.create(out, { removeOnAbort: true });
    await convertToRaw(img, source, sink, {});
    return await sha256File(out);
  } finally {
    await img.close();
    await rm(out, { force: true });
  }
}

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-follow-'));
  const base = join(dir, 'base.raw');
  await writeFile(base, mixedContent(6 * 2 ** 20, 77));
  const qcow2 = join(dir, 'disk.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', base, qcow2);
  const bytes = await readFile(qcow2);
  image = { bytes, sha256: createHash('sha256').update(bytes).digest('hex'), reference: await qemuRawSha256(qcow2, dir) };
});

afterAll(async () => {
  await Promise.all(servers.map((s) => s.close()));
  await cleanup();
});

describe('a download followed as it grows', () => {
  it('hands out the growing file before the last byte, converts it like qemu-img, and knows its sha256 at the end', async () => {
    const gate = holding(image.bytes, Math.floor(image.bytes.length / 2));
    const server = await serve(gate.handler);
    const stagingPath = staging();
    // Resolves while the server still holds back half of the body.
    const opened = await openImportUrlFollowing(`${server.origin}/disk.qcow2`, policy, { stagingPath });
    try {
      expect(opened.mode).toBe('staged');
      expect(opened.size).toBe(image.bytes.length);
      expect(opened.sha256).toBeUndefined();
      const source = opened.source as GrowingFileSource;
      expect(source).toBeInstanceOf(GrowingFileSource);
      expect(source.complete).toBeUndefined();
      const converted = convertThrough(source);
      await gate.held;
      gate.release();
      expect(await converted).toBe(image.reference);
      expect(await source.completion()).toEqual({ size: image.bytes.length, sha256: image.sha256 });
      expect(await sha256File(stagingPath)).toBe(image.sha256);
      expect(server.requests.map((r) => r.range)).toEqual(['bytes=0-9']);
    } finally {
      await opened.close();
    }
    expect(await exists(stagingPath)).toBe(false);
  });

  it('a dropped connection that cannot be resumed fails the reads with SOURCE_UNAVAILABLE and removes the staged file', async () => {
    const gate = holding(image.bytes, Math.floor(image.bytes.length / 3));
    const server = await serve(gate.handler);
    const stagingPath = staging();
    const opened = await openImportUrlFollowing(`${server.origin}/disk.qcow2`, policy, { stagingPath });
    try {
      const converted = convertThrough(opened.source).catch((e: unknown) => e);
      await gate.held;
      gate.drop();
      const err = await converted;
      expect(err).toBeInstanceOf(SourceUnavailableError);
      await expect((opened.source as GrowingFileSource).completion()).rejects.toBeInstanceOf(SourceUnavailableError);
      expect(await exists(stagingPath)).toBe(false);
    } finally {
      await opened.close();
    }
  });

  it('a resume answered with the whole file again fails with SOURCE_CHANGED instead of starting over under the conversion', async () => {
    // Range-capable but without a validator (so staged, not read by ranges); the resume gets a 200.
    const gate = holding(image.bytes, Math.floor(image.bytes.length / 3), { 'accept-ranges': 'bytes' }, fileHandler(image.bytes, { ranges: false }));
    const server = await serve((req, res, i) => (req.headers.range === 'bytes=0-9' ? fileHandler(image.bytes, { ranges: true })(req, res, i) : gate.handler(req, res, i - 1)));
    const stagingPath = staging();
    const opened = await openImportUrlFollowing(`${server.origin}/disk.qcow2`, policy, { stagingPath });
    try {
      const converted = convertThrough(opened.source).catch((e: unknown) => e);
      await gate.held;
      gate.drop();
      expect(await converted).toBeInstanceOf(SourceChangedError);
      // The probe, the whole GET, and the resume that came back whole.
      expect(server.requests.map((r) => r.range)).toEqual(['bytes=0-9', undefined, expect.stringMatching(/^bytes=\d+-$/)]);
      expect(await exists(stagingPath)).toBe(false);
    } finally {
      await opened.close();
    }
  });

  it('close() stops the download mid-body and removes the staged file', async () => {
    const gate = holding(image.bytes, Math.floor(image.bytes.length / 2));
    const server = await serve(gate.handler);
    const stagingPath = staging();
    const opened = await openImportUrlFollowing(`${server.origin}/disk.qcow2`, policy, { stagingPath });
    await gate.held;
    await opened.close();
    expect(await exists(stagingPath)).toBe(false);
    await expect(opened.source.read(0, 16)).rejects.toThrow();
  });

  it('without follow, a held body is not handed out: openUrlSource waits for the whole download (inspect keeps this)', async () => {
    const gate = holding(image.bytes, Math.floor(image.bytes.length / 2));
    const server = await serve(gate.handler);
    let settled = false;
    const opening = openUrlSource(`${server.origin}/disk.qcow2`, policy, { stagingPath: staging() }).finally(() => (settled = true));
    await gate.held;
    expect(settled).toBe(false);
    gate.release();
    const opened = await opening;
    try {
      expect(opened.sha256).toBe(image.sha256);
      expect(opened.source).not.toBeInstanceOf(GrowingFileSource);
    } finally {
      await opened.close();
    }
  });

  it('a wrapped (gzip) body is staged whole and unwrapped, not followed', async () => {
    const { gzipSync } = await import('node:zlib');
    const gz = gzipSync(image.bytes);
    const server = await serve(fileHandler(gz, { ranges: false }));
    const opened = await openImportUrlFollowing(`${server.origin}/disk.qcow2.gz`, policy, { stagingPath: staging() });
    try {
      expect(opened.source).not.toBeInstanceOf(GrowingFileSource);
      expect(opened.wrapper).toBe('gzip');
      expect(await convertThrough(opened.source)).toBe(image.reference);
    } finally {
      await opened.close();
    }
  });
});
