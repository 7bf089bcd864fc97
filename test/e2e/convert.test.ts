/**
 * End to end, real parts only: redis-server, `diskconv serve` and `diskconv
 * worker` as separate processes, curl as the client, images made by qemu-img,
 * outputs compared with `qemu-img convert -O raw`.
 */
import { readdir, writeFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, type JobJson } from '../helpers/service.js';
import { startFileServer, type FileServer } from './http-files.js';

const TOKEN = 'e2e-token-0123456789abcdef';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];

interface Fixture {
  name: string;
  path: string;
  format: string;
  /** sha256 of qemu-img's raw conversion. */
  sha256: string;
  /** sha256 of the image file itself. */
  fileSha256: string;
}

describe('service end to end', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let files: FileServer;
  const fixtures: Fixture[] = [];

  const fixture = (name: string): Fixture => {
    const f = fixtures.find((x) => x.name === name);
    if (!f) throw new Error(`no fixture ${name}`);
    return f;
  };

  async function download(job: JobJson): Promise<string> {
    const out = join(dir, `out-${job.id}.raw`);
    await curl([...AUTH, '-o', out, `${svc.apiUrl}${job.output?.href}`]);
    return sha256File(out);
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-e2e-'));
    const base = join(dir, 'base.raw');
    await writeRaw(base, 6 * 2 ** 20, 11);
    const make = async (name: string, format: string, options: string[] = []): Promise<void> => {
      const path = join(dir, name);
      await qemuImg('convert', '-f', 'raw', '-O', format, ...options, base, path);
      fixtures.push({ name, path, format, sha256: await qemuRawSha256(path, dir), fileSha256: await sha256File(path) });
    };
    await make('disk.qcow2', 'qcow2');
    await make('disk-compressed.qcow2', 'qcow2', ['-c']);
    await make('disk.vmdk', 'vmdk');
    await make('disk-stream.vmdk', 'vmdk', ['-o', 'subformat=streamOptimized']);
    await make('disk.vdi', 'vdi');
    await make('disk.raw', 'raw');
    // A qcow2 whose L1 table points past the end of the file.
    const corrupt = join(dir, 'corrupt.qcow2');
    await qemuImg('create', '-f', 'qcow2', corrupt, '8M');
    await qemuIo('-c', 'write -P 0x11 0 1M', corrupt);
    const bytes = await readFile(corrupt);
    bytes.writeBigUInt64BE(BigInt(bytes.length) * 64n, 40);
    await writeFile(corrupt, bytes);
    await writeFile(join(dir, 'big.bin'), Buffer.alloc(9 * 2 ** 20, 7));

    files = await startFileServer(dir);
    svc = await ServiceHarness.create('e2e', {
      API_TOKENS: TOKEN,
      MAX_UPLOAD_BYTES: '8M',
      ...files.importEnv,
      JOB_ATTEMPTS: '3',
      WORKER_CONCURRENCY: '2',
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    await files?.close();
    await cleanup();
  });

  it('converts multipart uploads of qcow2, vmdk and vdi made by qemu-img, byte-identical to qemu-img', async () => {
    const names = ['disk.qcow2', 'disk-compressed.qcow2', 'disk.vmdk', 'disk-stream.vmdk', 'disk.vdi'];
    const jobs = await Promise.all(
      names.map(async (name) => {
        const f = fixture(name);
        const created = JSON.parse(await curl([...AUTH, '-F', `file=@${f.path}`, '-F', `source_format=${f.format}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
        expect(created.state).toBe('queued');
        expect(created.source).toMatchObject({ kind: 'upload', filename: name });
        return { f, created };
      }),
    );
    for (const { f, created } of jobs) {
      const done = await svc.waitForFinal(created.id, { token: TOKEN });
      expect(done.state, `${f.name}: ${JSON.stringify(done.error)}`).toBe('succeeded');
      expect(done.source).toMatchObject({ format: f.format, virtual_size: 6 * 2 ** 20, info: { format: f.format, filename: f.name } });
      expect(done.progress).toMatchObject({ phase: 'done', percent: 100 });
      expect(done.output?.sha256).toBe(f.sha256);
      expect(await download(done)).toBe(f.sha256);
    }
  });

  it('converts an application/octet-stream body', async () => {
    const f = fixture('disk.vmdk');
    const created = JSON.parse(
      await curl([...AUTH, '--data-binary', `@${f.path}`, '-H', 'Content-Type: application/octet-stream', `${svc.apiUrl}/v1/jobs?filename=disk.vmdk&source_format=vmdk`]),
    ) as JobJson;
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state).toBe('succeeded');
    expect(await download(done)).toBe(f.sha256);
    // Ranged download with curl.
    const part = join(dir, 'part.bin');
    await curl([...AUTH, '-r', '512-1023', '-o', part, `${svc.apiUrl}${done.output?.href}`]);
    const whole = await readFile(join(dir, `out-${done.id}.raw`));
    expect((await readFile(part)).equals(whole.subarray(512, 1024))).toBe(true);
  });

  it('imports by URL: range requests, a server without ranges, a redirect, dropped connections', async () => {
    const cases: Array<[string, string, 'range' | 'staged' | undefined, string | undefined]> = [
      ['range', 'disk.qcow2', 'range', undefined],
      ['plain', 'disk.vdi', 'staged', undefined],
      ['redirect', 'disk-stream.vmdk', undefined, undefined],
      // Cut mid-body: a range read is retried; a download (forced by expected_sha256) resumes with a range request.
      ['drop', 'disk-compressed.qcow2', 'range', undefined],
      ['drop', 'disk.vmdk', 'staged', fixture('disk.vmdk').fileSha256],
    ];
    for (const [mode, name, expectedMode, expectedSha] of cases) {
      const f = fixture(name);
      const body = JSON.stringify({ source: { url: `${files.url}/${mode}/${name}` }, source_format: 'auto', ...(expectedSha ? { expected_sha256: expectedSha } : {}) });
      const created = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as JobJson;
      expect(created.source).toMatchObject({ kind: 'url', url: `${files.url}/${mode}/${name}` });
      const done = await svc.waitForFinal(created.id, { token: TOKEN });
      expect(done.state, `${mode}: ${JSON.stringify(done.error)}`).toBe('succeeded');
      if (expectedMode) expect(done.source.mode).toBe(expectedMode);
      expect(done.attempts, `${mode} ${name}: resumed within the attempt`).toBe(1);
      expect(done.output?.sha256, mode).toBe(f.sha256);
      expect(await download(done)).toBe(f.sha256);
    }
    expect([...files.dropped].sort()).toEqual(['disk-compressed.qcow2', 'disk.vmdk']);
  });

  it('inspects uploads and URLs without converting them', async () => {
    const f = fixture('disk-stream.vmdk');
    const upload = JSON.parse(await curl([...AUTH, '-F', `file=@${f.path}`, `${svc.apiUrl}/v1/inspect`])) as Record<string, unknown>;
    expect(upload).toMatchObject({ safe: true, format: 'vmdk', virtual_size: 6 * 2 ** 20, info: { format: 'vmdk', filename: 'disk-stream.vmdk' } });
    const body = JSON.stringify({ source: { url: `${files.url}/range/disk.qcow2?secret=1` } });
    const byUrl = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/inspect`])) as Record<string, unknown>;
    expect(byUrl).toMatchObject({ safe: true, format: 'qcow2', source: { kind: 'url', mode: 'range' }, info: { filename: `${files.url}/range/disk.qcow2` } });
    const corrupt = JSON.stringify({ source: { url: `${files.url}/plain/corrupt.qcow2` } });
    const refused = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', corrupt, `${svc.apiUrl}/v1/inspect`])) as Record<string, unknown>;
    expect(refused).toMatchObject({ safe: false, error: { code: 'IMAGE_CORRUPT' } });
    expect(await readdir(join(svc.dataDir, 'work'))).toEqual([]);
  });

  it('verifies expected_sha256 of a URL source', async () => {
    const body = JSON.stringify({ source: { url: `${files.url}/plain/disk.raw` }, expected_sha256: 'ab'.repeat(32) });
    const created = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as JobJson;
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('CHECKSUM_MISMATCH');
    expect(done.attempts).toBe(1);
  });

  it('ends bad inputs in their documented codes, without retries for deterministic errors', async () => {
    const post = async (args: string[]): Promise<JobJson> => JSON.parse(await curl([...AUTH, ...args, `${svc.apiUrl}/v1/jobs`])) as JobJson;

    const corrupt = await svc.waitForFinal((await post(['-F', `file=@${join(dir, 'corrupt.qcow2')}`])).id, { token: TOKEN });
    expect(corrupt).toMatchObject({ state: 'failed', attempts: 1, error: { code: 'IMAGE_CORRUPT' } });
    expect(corrupt.error?.message).not.toContain(svc.dataDir);

    const mismatch = await svc.waitForFinal((await post(['-F', `file=@${fixture('disk.qcow2').path}`, '-F', 'source_format=vdi'])).id, { token: TOKEN });
    expect(mismatch).toMatchObject({ state: 'failed', attempts: 1, error: { code: 'FORMAT_MISMATCH' } });

    const asRaw = await svc.waitForFinal((await post(['-F', `file=@${fixture('disk.qcow2').path}`, '-F', 'source_format=raw'])).id, { token: TOKEN });
    expect(asRaw).toMatchObject({ state: 'failed', error: { code: 'FORMAT_MISMATCH' } });

    // Bytes that are no image format are a raw disk (as for qemu-img): they convert.
    const notImage = join(dir, 'notes.txt');
    await writeFile(notImage, 'just some text, not a disk image\n'.repeat(100));
    const text = await svc.waitForFinal((await post(['-F', `file=@${notImage}`])).id, { token: TOKEN });
    expect(text).toMatchObject({ state: 'succeeded', source: { format: 'raw' } });

    // Connection refused is transient: retried JOB_ATTEMPTS times, then failed.
    const dead = JSON.stringify({ source: { url: 'http://127.0.0.1:9/nothing-listens-here' } });
    const deadJob = await svc.waitForFinal((await post(['-H', 'Content-Type: application/json', '-d', dead])).id, { token: TOKEN });
    expect(deadJob).toMatchObject({ state: 'failed', attempts: 3, error: { code: 'SOURCE_UNAVAILABLE' } });

    // Failed jobs leave nothing behind.
    for (const id of [corrupt.id, mismatch.id, asRaw.id, deadJob.id]) {
      expect(await readdir(join(svc.dataDir, 'store', 'input'))).not.toContain(id);
      expect(await readdir(join(svc.dataDir, 'store', 'output'))).not.toContain(id);
    }
    expect((await svc.request(`/v1/jobs/${corrupt.id}/output`, { token: TOKEN })).status).toBe(409);
  });

  it('refuses an upload over MAX_UPLOAD_BYTES with 413, with or without Content-Length, keeping nothing', async () => {
    const big = join(dir, 'big.bin');
    for (const extra of [[], ['-H', 'Transfer-Encoding: chunked']]) {
      const out = await curl([...AUTH, ...extra, '-o', '/dev/null', '-w', '%{http_code}', '--data-binary', `@${big}`, '-H', 'Content-Type: application/octet-stream', `${svc.apiUrl}/v1/jobs`]).catch(
        (err: Error) => err.message, // curl may see the connection close while it is still sending
      );
      expect(out).toMatch(/413|Connection reset|Broken pipe|Send failure|Failed sending/);
    }
    const multipart = await curl([...AUTH, '-o', '/dev/null', '-w', '%{http_code}', '-F', `file=@${big}`, `${svc.apiUrl}/v1/jobs`]).catch((err: Error) => err.message);
    expect(multipart).toMatch(/413|Connection reset|Broken pipe|Send failure|Failed sending/);
    const res = await svc.request('/v1/jobs', { method: 'POST', token: TOKEN, headers: { 'content-type': 'application/octet-stream' }, body: await readFile(big) }).catch(() => undefined);
    if (res) expect(await res.json()).toMatchObject({ status: 413, code: 'PAYLOAD_TOO_LARGE' });
    expect(await readdir(join(svc.dataDir, 'store', 'tmp'))).toEqual([]);
  });

  it('answers 401 to curl without a token and 404 to another token', async () => {
    const noToken = await curl(['-o', '/dev/null', '-w', '%{http_code}', `${svc.apiUrl}/v1/jobs`]);
    expect(noToken).toBe('401');
    const list = JSON.parse(await curl([...AUTH, `${svc.apiUrl}/v1/jobs?state=succeeded&limit=2`])) as { jobs: JobJson[]; next_cursor: string | null };
    expect(list.jobs).toHaveLength(2);
    expect(list.jobs.every((j) => j.state === 'succeeded')).toBe(true);
    expect(list.next_cursor).not.toBeNull();
  });

  it('reports metrics and readiness', async () => {
    const metrics = await curl([`${svc.apiUrl}/metrics`]);
    expect(metrics).toMatch(/^diskconv_jobs\{state="succeeded"\} [1-9]\d*$/m);
    expect(metrics).toMatch(/^diskconv_jobs\{state="failed"\} [1-9]\d*$/m);
    expect(metrics).toMatch(/^diskconv_converted_bytes_total [1-9]\d*$/m);
    expect(metrics).toMatch(/^diskconv_conversion_seconds_count [1-9]\d*$/m);
    expect(JSON.parse(await curl([`${svc.apiUrl}/readyz`]))).toMatchObject({ status: 'ready' });
    const logs = svc.logs();
    expect(logs).not.toContain(TOKEN);
    // No leaked file handles, listener leaks or crashes along the way.
    expect(logs).not.toMatch(/Warning:|"level":(50|60)/);
  });
});
