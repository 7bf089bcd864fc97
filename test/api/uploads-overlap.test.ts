/**
 * tus uploads converted while their PATCHes arrive (routes/uploads.ts, src/queue/upload-stream.ts), with real
 * processes: redis-server, the API and one worker (WORKER_CONCURRENCY=1) on 127.0.0.1. The test paces the
 * PATCHes itself and waits for what it wants to see (no timing assertions): the job exists and converts before
 * the last byte; a client that stops gives the worker slot back (another job converts meanwhile) and the job,
 * parked `queued`, converts once the upload resumes; a terminated upload fails its job and leaves no staging
 * link behind; the output is what qemu-img writes and the source's sha256 the upload's.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuRawSha256, writeRaw } from '../helpers/qemu.js';
import { freePort } from '../../src/cli/redis-server.js';
import { ServiceHarness, spawnDiskconv, waitFor, type JobJson } from '../helpers/service.js';

const TOKEN = 'tus-overlap-token-0123456789abcdef';
const MiB = 2 ** 20;
const tusHeaders = (extra: Record<string, string> = {}) => ({ 'tus-resumable': '1.0.0', authorization: `Bearer ${TOKEN}`, ...extra });

describe('tus uploads convert while their PATCHes arrive', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image: Buffer;
  let imageSha = '';
  let rawSha = '';
  let small: Buffer;
  let smallRawSha = '';
  /** A second API on the same Redis and data, whose overlapped uploads park after 300 ms without a byte. */
  let quickUrl = '';

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-tus-overlap-'));
    // 24 MiB of mixed data in a 32 MiB qcow2 as qemu-img writes it (tables first, clusters in guest order).
    await writeRaw(join(dir, 'base.raw'), 24 * MiB, 41);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'disk.qcow2'));
    await qemuImg('resize', '-f', 'qcow2', join(dir, 'disk.qcow2'), '32M');
    image = await readFile(join(dir, 'disk.qcow2'));
    imageSha = createHash('sha256').update(image).digest('hex');
    rawSha = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    await writeRaw(join(dir, 'small.raw'), 2 * MiB, 43);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'small.raw'), join(dir, 'small.qcow2'));
    small = await readFile(join(dir, 'small.qcow2'));
    smallRawSha = await qemuRawSha256(join(dir, 'small.qcow2'), dir);
    svc = await ServiceHarness.create('tus-overlap', { API_TOKENS: TOKEN, UPLOAD_TTL_SECONDS: '3600', TUS_OVERLAP_IDLE_MS: '60000', WORKER_CONCURRENCY: '1' });
    await svc.startApi();
    await svc.startWorker();
    const port = await freePort();
    const quick = spawnDiskconv('api-quick-park', 'serve', svc.env({ PORT: String(port), TUS_OVERLAP_IDLE_MS: '300' }));
    svc.processes.push(quick);
    quickUrl = `http://127.0.0.1:${port}`;
    await waitFor('the second API', async () => (await fetch(`${quickUrl}/readyz`).catch(() => undefined))?.status === 200, 20_000);
  }, 120_000);
  afterAll(async () => {
    await svc?.close();
    await cleanup?.();
  });

  async function create(base: string, length: number, metadata: Record<string, string> = { filename: 'disk.qcow2' }): Promise<string> {
    const meta = Object.entries(metadata).map(([k, v]) => `${k} ${Buffer.from(v).toString('base64')}`).join(',');
    const res = await fetch(`${base}/v1/uploads`, { method: 'POST', headers: tusHeaders({ 'upload-length': String(length), 'upload-metadata': meta }) });
    expect(res.status).toBe(201);
    return new URL(res.headers.get('location') as string, base).toString();
  }

  async function patch(url: string, body: Buffer, offset: number): Promise<Response> {
    const res = await fetch(url, { method: 'PATCH', headers: tusHeaders({ 'upload-offset': String(offset), 'content-type': 'application/offset+octet-stream' }), body });
    expect(res.status, await res.clone().text()).toBe(204);
    expect(res.headers.get('upload-offset')).toBe(String(offset + body.length));
    return res;
  }

  const jobOf = (res: Response): string => {
    const path = res.headers.get('diskconv-job');
    expect(path).toMatch(/^\/v1\/jobs\/[\w-]{22}$/);
    return (path as string).split('/').pop() as string;
  };

  it('the job is made by the first PATCH and converts before the last byte; the staged copy is hashed on the way', async () => {
    const url = await create(svc.apiUrl, image.length);
    const half = Math.floor(image.length / 2);
    const first = await patch(url, image.subarray(0, half), 0);
    const id = jobOf(first);
    // Converting while half the upload is still with the client.
    const converting = await svc.waitForJob(id, (j) => j.state === 'running' && j.progress.phase === 'converting' && (j.progress.bytes_done ?? 0) > 0, { token: TOKEN }).catch(async (e) => {
      console.log(JSON.stringify(await svc.getJob(id, TOKEN)), svc.logs().slice(-6000));
      throw e;
    });
    expect(converting.source.sha256).toBeUndefined();
    expect(Number((await fetch(url, { method: 'HEAD', headers: tusHeaders() })).headers.get('upload-offset'))).toBe(half);
    const quarter = Math.floor(image.length / 4);
    const second = await patch(url, image.subarray(half, half + quarter), half);
    expect(jobOf(second)).toBe(id);
    const last = await patch(url, image.subarray(half + quarter), half + quarter);
    expect(jobOf(last)).toBe(id);
    const job = await svc.waitForFinal(id, { token: TOKEN });
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.output?.sha256).toBe(rawSha);
    expect(job.source.sha256).toBe(imageSha);
    expect(job.source.filename).toBe('disk.qcow2');
    // Every byte came through this API: the sha256 was kept on the way, not read back from the file.
    expect(svc.logs()).toContain('tus upload complete; its job converted along');
    expect(svc.logs()).not.toContain('sha256 of a tus upload read back from its file');
    // One job for the upload, and a HEAD names it.
    expect((await fetch(url, { method: 'HEAD', headers: tusHeaders() })).headers.get('diskconv-job')).toBe(`/v1/jobs/${id}`);
    const list = (await (await svc.request('/v1/jobs?limit=100', { token: TOKEN })).json()) as { jobs: JobJson[] };
    expect(list.jobs.filter((j) => j.source.sha256 === imageSha)).toHaveLength(1);
    // Nothing left in staging: the worker removed its input, the API its link.
    await waitFor('staging to be empty', async () => (await readdir(join(svc.dataDir, 'store', 'tmp'))).filter((n) => n.includes(id)).length === 0 && (await readdir(join(svc.dataDir, 'store', 'input'))).length === 0, 10_000);
  }, 120_000);

  it('a client that stops frees the worker slot; the job waits queued and converts once the upload resumes', async () => {
    const url = await create(quickUrl, image.length);
    const part = Math.floor(image.length / 3);
    const id = jobOf(await patch(url, image.subarray(0, part), 0));
    await svc.waitForJob(id, (j) => j.state === 'running', { token: TOKEN });
    // No byte for longer than the bound: the worker gives the job back (queued), not failed.
    const parked = await svc.waitForJob(id, (j) => j.state === 'queued', { token: TOKEN });
    expect(parked.error).toBeFalsy();
    // The one worker slot is free: another job converts while the upload waits.
    const other = await svc.request('/v1/jobs?filename=small.qcow2', { method: 'POST', token: TOKEN, headers: { 'content-type': 'application/octet-stream' }, body: small });
    expect(other.status).toBe(202);
    const otherJob = await svc.waitForFinal(((await other.json()) as JobJson).id, { token: TOKEN });
    expect(otherJob.state).toBe('succeeded');
    expect(otherJob.output?.sha256).toBe(smallRawSha);
    expect((await svc.getJob(id, TOKEN)).state).toBe('queued');
    // The resume (through the other API: any process serves any upload) runs the job again; it converts along and succeeds.
    const resumed = url.replace(quickUrl, svc.apiUrl);
    await patch(resumed, image.subarray(part, 2 * part), part);
    const last = await patch(resumed, image.subarray(2 * part), 2 * part);
    expect(jobOf(last)).toBe(id);
    const job = await svc.waitForFinal(id, { token: TOKEN });
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.output?.sha256).toBe(rawSha);
    expect(job.source.sha256).toBe(imageSha);
    expect(svc.logs()).toContain('the resumable upload paused; the job waits queued for it');
  }, 120_000);

  it('a terminated upload fails its job and leaves nothing in staging', async () => {
    const url = await create(svc.apiUrl, image.length);
    const id = jobOf(await patch(url, image.subarray(0, 4 * MiB), 0));
    await svc.waitForJob(id, (j) => j.state === 'running', { token: TOKEN });
    expect((await fetch(url, { method: 'DELETE', headers: tusHeaders() })).status).toBe(204);
    const job = await svc.waitForFinal(id, { token: TOKEN });
    expect(job.state).toBe('failed');
    expect(job.error?.code).toBe('UPLOAD_TERMINATED');
    await waitFor('staging to be empty', async () => (await readdir(join(svc.dataDir, 'store', 'tmp'))).filter((n) => n.includes(id)).length === 0, 10_000);
    expect(await readdir(join(svc.dataDir, 'uploads'))).not.toContain(url.split('/').pop());
  }, 120_000);

  // Last: it kills the worker.
  it('a worker killed while it follows, and a PATCH cut off mid-body: nothing is lost, the job converts once the upload completes', async () => {
    const url = await create(svc.apiUrl, image.length);
    const part = Math.floor(image.length / 3);
    const id = jobOf(await patch(url, image.subarray(0, part), 0));
    await svc.waitForJob(id, (j) => j.state === 'running' && j.progress.phase === 'converting', { token: TOKEN });
    const worker = svc.processes.find((p) => p.name.startsWith('worker'));
    expect(worker).toBeDefined();
    await worker?.stop('SIGKILL');
    await svc.startWorker();
    // A PATCH whose connection drops after a few MiB: tus keeps what arrived.
    await new Promise<void>((resolve) => {
      const req = httpRequest(url, { method: 'PATCH', headers: tusHeaders({ 'upload-offset': String(part), 'content-type': 'application/offset+octet-stream', 'content-length': String(image.length - part) }) });
      req.on('error', () => resolve());
      req.write(image.subarray(part, part + 3 * MiB), () => setTimeout(() => {
        req.destroy();
        resolve();
      }, 300));
    });
    // Resumed from the offset the server has (asked again if the cut-off PATCH was still landing bytes: 409).
    await waitFor('the resume to be taken', async () => {
      const head = await fetch(url, { method: 'HEAD', headers: tusHeaders() });
      const at = Number(head.headers.get('upload-offset'));
      if (head.status !== 200 || at < part || at >= image.length) return undefined;
      const res = await fetch(url, { method: 'PATCH', headers: tusHeaders({ 'upload-offset': String(at), 'content-type': 'application/offset+octet-stream' }), body: image.subarray(at) });
      if (res.status === 409) return undefined;
      expect(res.status, await res.text()).toBe(204);
      return true;
    }, 60_000, 200);
    const job = await svc.waitForFinal(id, { token: TOKEN });
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.output?.sha256).toBe(rawSha);
    expect(job.source.sha256).toBe(imageSha);
  }, 120_000);
});

describe.skipIf(process.getuid?.() !== 0)('space for uploads still arriving', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let mnt = '';
  let svc: ServiceHarness | undefined;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-tus-space-'));
    const { execFileSync } = await import('node:child_process');
    const { mkdtemp } = await import('node:fs/promises');
    const { tmpdir } = await import('node:os');
    mnt = await mkdtemp(join(tmpdir(), 'diskconv-tus-space-mnt-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=400m', 'tmpfs', mnt]);
  });
  afterAll(async () => {
    await svc?.close();
    if (mnt) {
      const { execFileSync } = await import('node:child_process');
      execFileSync('umount', ['-l', mnt]);
      await import('node:fs/promises').then((fs) => fs.rm(mnt, { recursive: true, force: true }));
    }
    await cleanup?.();
  });

  it('two arriving uploads whose virtual sizes do not fit together, but whose data does, both convert: the second reserves what its map holds instead of being refused', async () => {
    // 256 MiB virtual, 2 MiB of data each, on a 400 MiB store: while an upload arrives its job reserves the
    // virtual size, and two such bounds (plus the 64 MiB margin) exceed the store; the data fits many times.
    const images: Buffer[] = [];
    const rawShas: string[] = [];
    for (const seed of [51, 52]) {
      await writeRaw(join(dir, `s${seed}.raw`), 2 * MiB, seed);
      await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, `s${seed}.raw`), join(dir, `s${seed}.qcow2`));
      await qemuImg('resize', '-f', 'qcow2', join(dir, `s${seed}.qcow2`), '256M');
      images.push(await readFile(join(dir, `s${seed}.qcow2`)));
      rawShas.push(await qemuRawSha256(join(dir, `s${seed}.qcow2`), dir));
    }
    svc = await ServiceHarness.create('tus-space', { DATA_DIR: mnt, API_TOKENS: TOKEN, UPLOAD_TTL_SECONDS: '3600', TUS_OVERLAP_IDLE_MS: '60000', WORKER_CONCURRENCY: '2', JOB_ATTEMPTS: '1' });
    await svc.startApi();
    await svc.startWorker();
    const harness = svc;
    const create = async (length: number, filename: string): Promise<string> => {
      const res = await fetch(`${harness.apiUrl}/v1/uploads`, {
        method: 'POST',
        headers: tusHeaders({ 'upload-length': String(length), 'upload-metadata': `filename ${Buffer.from(filename).toString('base64')}` }),
      });
      expect(res.status, await res.clone().text()).toBe(201);
      return new URL(res.headers.get('location') as string, harness.apiUrl).toString();
    };
    const patch = async (url: string, body: Buffer, offset: number): Promise<string> => {
      const res = await fetch(url, { method: 'PATCH', headers: tusHeaders({ 'upload-offset': String(offset), 'content-type': 'application/offset+octet-stream' }), body });
      expect(res.status, await res.clone().text()).toBe(204);
      return (res.headers.get('diskconv-job') as string).split('/').pop() as string;
    };
    const [a, b] = images as [Buffer, Buffer];
    const urlA = await create(a.length, 'a.qcow2');
    const urlB = await create(b.length, 'b.qcow2');
    // The first job converts while its upload arrives, holding its virtual size (1 MiB holds the tables).
    const head = 1 * MiB;
    const idA = await patch(urlA, a.subarray(0, head), 0);
    await harness.waitForJob(idA, (j) => j.state === 'running' && j.progress.phase === 'converting', { token: TOKEN });
    // The second one's bound does not fit beside it: it reserves what its map holds instead of failing.
    const idB = await patch(urlB, b.subarray(0, head), 0);
    await harness.waitForJob(idB, (j) => (j.state === 'running' && j.progress.phase === 'converting') || j.state === 'failed', { token: TOKEN });
    await patch(urlB, b.subarray(head), head);
    const jobB = await harness.waitForFinal(idB, { token: TOKEN });
    expect(jobB.state, JSON.stringify(jobB.error)).toBe('succeeded');
    expect(jobB.output?.sha256).toBe(rawShas[1]);
    // The first one was never starved of its reservation meanwhile.
    await patch(urlA, a.subarray(head), head);
    const jobA = await harness.waitForFinal(idA, { token: TOKEN });
    expect(jobA.state, JSON.stringify(jobA.error)).toBe('succeeded');
    expect(jobA.output?.sha256).toBe(rawShas[0]);
  }, 120_000);
});
