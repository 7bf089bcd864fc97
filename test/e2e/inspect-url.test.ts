/**
 * POST /v1/inspect by URL stays small on the API host (issue 11): range reads
 * wherever they are faithful, bounded by INSPECT_MAX_BYTES; sources that must be
 * staged (no validator, a wrapper) bounded by the same, and by
 * INSPECT_STAGING_CONCURRENCY. A real `diskconv serve`, real loopback servers, curl.
 */
import { watch } from 'node:fs';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { makeTempDir, mixedContent, qemuImg } from '../helpers/qemu.js';
import { curl, ServiceHarness } from '../helpers/service.js';
import { fileHandler, routes, startServer, type TestServer } from '../net/servers.js';

const TOKEN = 'inspect-url-token-0123456789abcdef';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];

describe('inspect by URL is bounded', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let server: TestServer;
  let big: Buffer;
  let small: Buffer;

  const inspect = async (url: string): Promise<Record<string, unknown>> =>
    JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url } }), `${svc.apiUrl}/v1/inspect`])) as Record<string, unknown>;
  const scratch = (): Promise<string[]> => readdir(join(svc.dataDir, 'work')).catch(() => []);

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-inspect-url-'));
    big = mixedContent(4 * 2 ** 20, 5); // a raw image larger than the bound
    small = mixedContent(512 * 1024, 6);
    // A qcow2 whose metadata alone is larger than the bound: 512-byte clusters and a byte of data every 32 KiB,
    // so each of its 3072 L2 tables (1.5 MiB of them) is allocated.
    const sparse = join(dir, 'sparse.raw');
    const sparseBytes = Buffer.alloc(96 * 2 ** 20);
    for (let o = 0; o < sparseBytes.length; o += 32 * 1024) sparseBytes[o] = 1;
    await writeFile(sparse, sparseBytes);
    const meta = join(dir, 'meta.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', sparse, meta);
    const metaBytes = await readFile(meta);
    const plainQcow2 = join(dir, 'plain.qcow2');
    await writeFile(join(dir, 'small.raw'), small);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'small.raw'), plainQcow2);
    const qcow2 = await readFile(plainQcow2);
    server = await startServer(
      routes({
        // Range requests, but no ETag and no Last-Modified: must be staged.
        '/noetag/big.raw': fileHandler(big, { ranges: true }),
        '/noetag/small.raw': fileHandler(small, { ranges: true }),
        // No Content-Length: the bound is enforced while it streams.
        '/chunked/big.raw': fileHandler(big, { ranges: false, chunked: true }),
        // Slow, staged: two at once must take turns with one staging slot.
        '/slow/a.raw': fileHandler(small, { ranges: false, trickle: { chunk: 128 * 1024, everyMs: 300 } }),
        '/slow/b.raw': fileHandler(small, { ranges: false, trickle: { chunk: 128 * 1024, everyMs: 300 } }),
        // Range-readable with a validator.
        '/etag/big.raw': fileHandler(big, { ranges: true, etag: '"b1"' }),
        '/etag/plain.qcow2': fileHandler(qcow2, { ranges: true, etag: '"q1"' }),
        '/etag/meta.qcow2': fileHandler(metaBytes, { ranges: true, etag: '"m1"' }),
      }),
    );
    svc = await ServiceHarness.create('inspect-url', {
      API_TOKENS: TOKEN,
      MAX_UPLOAD_BYTES: '1G',
      URL_IMPORT_ALLOW: '127.0.0.1',
      URL_IMPORT_PORTS: `80,443,${server.port}`,
      INSPECT_MAX_BYTES: '1M',
      INSPECT_STAGING_CONCURRENCY: '1',
    });
    await svc.startApi();
  });

  afterAll(async () => {
    await svc?.close();
    await server?.close();
    await cleanup?.();
  });

  it('refuses to stage a validator-less source past INSPECT_MAX_BYTES (by Content-Length, and while streaming), keeping nothing', async () => {
    for (const path of ['/noetag/big.raw', '/chunked/big.raw']) {
      const answer = await inspect(`${server.origin}${path}`);
      expect(answer, path).toMatchObject({ status: 422, code: 'LIMIT_EXCEEDED' });
      expect(String(answer.detail)).toMatch(/INSPECT_MAX_BYTES/);
      expect(await scratch()).toEqual([]);
    }
  });

  it('stages a small validator-less source, answers, and removes it', async () => {
    const answer = await inspect(`${server.origin}/noetag/small.raw`);
    expect(answer).toMatchObject({ safe: true, format: 'raw', source: { kind: 'url', mode: 'staged', size: small.length } });
    expect(await scratch()).toEqual([]);
  });

  it('reads a source with a validator by ranges, whatever its size, within the byte bound', async () => {
    const raw = await inspect(`${server.origin}/etag/big.raw`);
    expect(raw).toMatchObject({ safe: true, format: 'raw', source: { kind: 'url', mode: 'range', size: big.length } });
    const qcow2 = await inspect(`${server.origin}/etag/plain.qcow2`);
    expect(qcow2).toMatchObject({ safe: true, format: 'qcow2', source: { mode: 'range' } });
    expect(await scratch()).toEqual([]);
  });

  it('stops range reads at INSPECT_MAX_BYTES: an image whose metadata is larger is refused, not fetched', async () => {
    const before = server.requests.length;
    const answer = await inspect(`${server.origin}/etag/meta.qcow2`);
    expect(answer).toMatchObject({ safe: false, error: { code: 'LIMIT_EXCEEDED' } });
    expect(String((answer.error as { message: string }).message)).toMatch(/INSPECT_MAX_BYTES/);
    // Range requests of at most 256 KiB blocks or split requests, never past the bound.
    const asked = server.requests.slice(before).reduce((sum, r) => {
      const m = /^bytes=(\d+)-(\d+)$/.exec(r.range ?? '');
      return sum + (m ? Number(m[2]) - Number(m[1]) + 1 : 0);
    }, 0);
    expect(asked).toBeLessThanOrEqual(2 ** 20 + 16);
    expect(server.requests.slice(before).every((r) => r.range !== undefined)).toBe(true);
  });

  it('stages one inspection at a time with INSPECT_STAGING_CONCURRENCY=1', async () => {
    // The staged files as the kernel saw them come and go (inotify, in order), so a file that lives for only a
    // moment is still counted: a 512 KiB source is written out in one batch at its end and removed right after
    // the answer, and sampling the folder every 2 ms missed it once on a loaded machine (most 0).
    const live = new Set<string>();
    const staged = new Set<string>();
    let most = 0;
    const watcher = watch(join(svc.dataDir, 'work'), (event, name) => {
      if (event !== 'rename' || !name?.endsWith('.download')) return;
      if (live.delete(name)) return; // its removal
      live.add(name);
      staged.add(name);
      most = Math.max(most, live.size);
    });
    try {
      const [a, b] = await Promise.all([inspect(`${server.origin}/slow/a.raw`), inspect(`${server.origin}/slow/b.raw`)]);
      expect(a).toMatchObject({ safe: true, source: { mode: 'staged', size: small.length } });
      expect(b).toMatchObject({ safe: true, source: { mode: 'staged', size: small.length } });
      // Both answers are out, so both files were made and removed: wait for their events to be delivered.
      await vi.waitFor(() => expect({ staged: staged.size, live: live.size }).toEqual({ staged: 2, live: 0 }), { timeout: 10_000, interval: 20 });
    } finally {
      watcher.close();
    }
    expect(most).toBe(1);
    expect(await scratch()).toEqual([]);
  });
});
