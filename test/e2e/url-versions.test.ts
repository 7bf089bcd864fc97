/**
 * URL imports never stitch a disk from two versions of a file (issue 11): a
 * server that names no version is staged whole; one that does is read by ranges
 * with If-Range, and when the file changes mid-read the attempt fails with
 * SOURCE_CHANGED and the retry converts the new version whole. Real `diskconv
 * serve` + `diskconv worker`, a loopback server, curl, qemu-img as the reference.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256 } from '../helpers/qemu.js';
import { curl, ServiceHarness, type JobJson } from '../helpers/service.js';
import { fileHandler, routes, startServer, type TestServer } from '../net/servers.js';

const TOKEN = 'versions-token-0123456789abcdef';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];

describe('URL imports and changing files', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let server: TestServer;
  const versions: Array<{ bytes: Buffer; reference: string; etag: string }> = [];
  /** Answers given to range requests that carried If-Range, as "status etag". */
  const answers: string[] = [];

  const createJob = async (url: string): Promise<JobJson> =>
    JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', JSON.stringify({ source: { url } }), `${svc.apiUrl}/v1/jobs`])) as JobJson;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-versions-'));
    for (const [i, etag] of ['"v1"', '"v2"'].entries()) {
      const raw = join(dir, `v${i}.raw`);
      await writeFile(raw, mixedContent(6 * 2 ** 20, 100 + i));
      const qcow2 = join(dir, `v${i}.qcow2`);
      await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
      versions.push({ bytes: await readFile(qcow2), reference: await qemuRawSha256(qcow2, dir), etag });
    }
    // /changing: v1 for the first probe and one range read after it, then v2 (a new ETag).
    let served = 0;
    let current = 0;
    const changing = (req: Parameters<Parameters<typeof startServer>[0]>[0], res: Parameters<Parameters<typeof startServer>[0]>[1], index: number): void => {
      const v = versions[current] as (typeof versions)[number];
      const handler = fileHandler(v.bytes, { ranges: true, etag: v.etag });
      const ifRange = req.headers['if-range'];
      res.on('finish', () => {
        if (ifRange !== undefined) answers.push(`${res.statusCode} ${v.etag}`);
      });
      handler(req, res, index);
      if (req.headers.range !== undefined && ++served === 2) current = 1;
    };
    server = await startServer(
      routes({
        '/changing/disk.qcow2': changing,
        '/noetag/disk.qcow2': (req, res, i) => fileHandler((versions[0] as (typeof versions)[number]).bytes, { ranges: true })(req, res, i),
      }),
    );
    svc = await ServiceHarness.create('versions', {
      API_TOKENS: TOKEN,
      MAX_UPLOAD_BYTES: '64M',
      URL_IMPORT_ALLOW: '127.0.0.1',
      URL_IMPORT_PORTS: `80,443,${server.port}`,
      JOB_ATTEMPTS: '3',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    await server?.close();
    await cleanup?.();
  });

  it('stages a range-capable server without ETag or Last-Modified instead of reading it by ranges', async () => {
    const created = await createJob(`${server.origin}/noetag/disk.qcow2`);
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.source).toMatchObject({ mode: 'staged', size: versions[0]?.bytes.length });
    expect(done.output?.sha256).toBe(versions[0]?.reference);
    const paths = server.requests.filter((r) => r.path.startsWith('/noetag/'));
    expect(paths.map((r) => r.range)).toEqual(['bytes=0-9', undefined]);
  });

  it('fails the attempt with SOURCE_CHANGED when the file changes mid-read, and converts the new version whole on the retry', async () => {
    const created = await createJob(`${server.origin}/changing/disk.qcow2`);
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.attempts).toBe(2);
    expect(done.source).toMatchObject({ mode: 'range' });
    // The new version's conversion, never a mixture of the two.
    expect(done.output?.sha256).toBe(versions[1]?.reference);
    // Every range read carried If-Range; the first one after the change was answered whole by v2.
    const guarded = server.requests.filter((r) => r.path.startsWith('/changing/') && r.range !== undefined && r.range !== 'bytes=0-9');
    expect(guarded.every((r) => r.ifRange === '"v1"' || r.ifRange === '"v2"')).toBe(true);
    expect(answers).toContain('200 "v2"');
    expect(svc.logs()).toMatch(/SOURCE_CHANGED/);
  });
});
