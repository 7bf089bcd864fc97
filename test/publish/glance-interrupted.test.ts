/**
 * Publishing interrupted, against the real test Glance: a job cancelled while its
 * bytes go into Glance, a worker SIGKILLed mid-upload (then the job cancelled, or
 * finished by another worker). Each case has a decoy: an image of the same name that
 * the job did not create, which must survive. The first worker's uploads are slowed
 * (GLANCE_UPLOAD_BYTES_PER_SECOND) so the upload is under way when the test acts;
 * the test waits for Glance to report the image `saving`, not for a time.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  fetchDigests,
  glanceApi,
  haveGlance,
  imagesNamed,
  qcow2WithReference,
  startGlance,
  submitJson,
  useGlance,
  type Digests,
  type GlanceJob,
  type TestGlance,
} from '../helpers/glance.js';
import { makeTempDir } from '../helpers/qemu.js';
import { ServiceHarness, waitFor, type ServiceProcess } from '../helpers/service.js';
import { startFileServer, type FileServer } from '../e2e/http-files.js';

const TOKEN = 'glance-interrupted-token-0123456789';
const SIZE = 8 * 2 ** 20;
/** 8 MiB at 1 MiB/s: the upload takes about 8 s, long enough to act on while Glance says `saving`. */
const SLOW = { GLANCE_UPLOAD_BYTES_PER_SECOND: String(2 ** 20) };

describe.skipIf(!haveGlance)('a publish that is interrupted', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let glance: TestGlance;
  let raw: Digests;
  const decoys: string[] = [];
  const services: ServiceHarness[] = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-interrupted-'));
    raw = await qcow2WithReference(dir, SIZE, 77);
    files = await startFileServer(dir);
    glance = await useGlance();
  });

  afterAll(async () => {
    for (const s of services) await s.close();
    for (const id of decoys) await glanceApi(glance, `/v2/images/${id}`, { method: 'DELETE' }).catch(() => {});
    await files?.close();
    await cleanup?.();
  });

  const service = async (): Promise<ServiceHarness> => {
    const s = await ServiceHarness.create('glance-interrupted', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_STORE: 'fs',
      GLANCE_PUBLISH_BACKOFF_MS: '200',
    });
    services.push(s);
    await s.startApi();
    return s;
  };

  /** An image of `name` that no job created (queued, as an unfinished one of ours would be). */
  const decoy = async (name: string): Promise<string> => {
    const { status, body } = await glanceApi<{ id: string }>(glance, '/v2/images', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name, disk_format: 'raw', container_format: 'bare' }),
    });
    expect(status).toBe(201);
    decoys.push(body.id);
    return body.id;
  };

  /** Submits a publishing job and waits until Glance reports its image `saving` (bytes going in). */
  const submitAndWaitSaving = async (s: ServiceHarness, name: string): Promise<{ id: string; imageId: string }> => {
    const created = await submitJson(s, TOKEN, { source: { url: `${files.url}/range/disk.qcow2` }, glance: { name } });
    const imageId = await waitFor(
      'the Glance image to be saving',
      async () => {
        const job = (await s.getJob(created.id, TOKEN)) as GlanceJob;
        if (['succeeded', 'failed', 'cancelled'].includes(job.state)) throw new Error(`the job ended ${job.state} before the upload was caught`);
        const id = job.output?.glance?.image_id;
        if (typeof id !== 'string') return undefined;
        const { body } = await glanceApi(glance, `/v2/images/${id}`);
        return body.status === 'saving' ? id : undefined;
      },
      90_000,
      100,
    );
    return { id: created.id, imageId };
  };

  const kill = async (worker: ServiceProcess): Promise<void> => {
    expect(await worker.stop('SIGKILL')).toBe('SIGKILL');
  };

  it('cancelled while uploading: the job deletes the image it created, and not the other image of that name', async () => {
    const s = await service();
    await s.startWorker(SLOW);
    const name = `cancel-live-${process.pid}`;
    const other = await decoy(name);
    const { id, imageId } = await submitAndWaitSaving(s, name);
    const res = await s.request(`/v1/jobs/${id}`, { method: 'DELETE', token: TOKEN });
    expect(res.status).toBe(200);
    const done = (await s.waitForJob(id, (j) => (j as GlanceJob).output?.glance?.status === 'deleted', { token: TOKEN })) as GlanceJob;
    expect(done.state).toBe('cancelled');
    expect(done.output?.glance).toMatchObject({ image_id: imageId, status: 'deleted', method: 'upload' });
    expect((await glanceApi(glance, `/v2/images/${imageId}`)).status).toBe(404);
    expect((await imagesNamed(glance, name)).map((i) => i.id)).toEqual([other]);
    expect(s.logs()).toContain('deleted the Glance image this job created');
  });

  it('the worker SIGKILLed mid-upload, then the job cancelled: the next worker to see it deletes that image, and only that one', async () => {
    const s = await service();
    const worker = await s.startWorker(SLOW);
    const name = `cancel-dead-${process.pid}`;
    const other = await decoy(name);
    const { id, imageId } = await submitAndWaitSaving(s, name);
    await kill(worker);
    const res = await s.request(`/v1/jobs/${id}`, { method: 'DELETE', token: TOKEN });
    expect(res.status).toBe(200);
    expect(((await res.json()) as GlanceJob).state).toBe('cancelled');
    // Nobody has deleted it yet: the worker that made it is dead.
    expect((await glanceApi(glance, `/v2/images/${imageId}`)).status).toBe(200);
    await s.startWorker();
    const done = (await s.waitForJob(id, (j) => (j as GlanceJob).output?.glance?.status === 'deleted', { token: TOKEN })) as GlanceJob;
    expect(done.state).toBe('cancelled');
    expect((await glanceApi(glance, `/v2/images/${imageId}`)).status).toBe(404);
    expect((await imagesNamed(glance, name)).map((i) => i.id)).toEqual([other]);
  });

  it('the worker SIGKILLed mid-upload: the next attempt publishes into that same image; one active image, the other image of that name untouched', async () => {
    const s = await service();
    const worker = await s.startWorker(SLOW);
    const name = `crash-${process.pid}`;
    const other = await decoy(name);
    const { id, imageId } = await submitAndWaitSaving(s, name);
    await kill(worker);
    await s.startWorker();
    const done = (await s.waitForFinal(id, { token: TOKEN, timeoutMs: 120_000 })) as GlanceJob;
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.attempts).toBeGreaterThanOrEqual(2);
    const g = done.output?.glance as Record<string, unknown>;
    expect(g).toMatchObject({ status: 'active', method: 'upload', checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    // Glance put the image of the cut-off upload back to queued; the next attempt filled it
    // (or, had Glance still called it saving, deleted it and made one): either way one image.
    const named = await imagesNamed(glance, name);
    expect(named.map((i) => i.id).sort()).toEqual([other, String(g.image_id)].sort());
    const ours = named.find((i) => i.id === g.image_id) as Record<string, unknown>;
    expect(ours).toMatchObject({ status: 'active', size: SIZE, checksum: raw.md5, os_hash_value: raw.sha512 });
    expect(named.find((i) => i.id === other)).toMatchObject({ status: 'queued' });
    if (g.image_id !== imageId) expect((await glanceApi(glance, `/v2/images/${imageId}`)).status).toBe(404);
    expect(await fetchDigests(`${glance.url}/v2/images/${String(g.image_id)}/file`, { 'x-auth-token': glance.token })).toEqual({ size: SIZE, ...raw });
    decoys.push(String(g.image_id));
  });
});

/**
 * The narrowest window: the create request sent, Glance's answer not yet read. A
 * Glance of this file's own is held with SIGSTOP (the kernel still accepts the
 * connection and buffers the request), so the request is in flight for as long as
 * the test wants; SIGCONT lets Glance create the image after the worker is gone
 * or the job is cancelled. Only a job that recorded the id before asking knows
 * that image is its own.
 */
describe.skipIf(!haveGlance)('a publish interrupted while Glance is creating the image', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let files: FileServer;
  let glance: Awaited<ReturnType<typeof startGlance>>;
  let raw: Digests;
  let glancePid: number;
  let port: string;
  const services: ServiceHarness[] = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-creating-'));
    raw = await qcow2WithReference(dir, 2 * 2 ** 20, 78);
    files = await startFileServer(dir);
    glance = await startGlance();
    glancePid = Number((await readFile(join(glance.dir, 'glance-api.pid'), 'utf8')).trim());
    port = new URL(glance.url).port;
  });

  afterAll(async () => {
    for (const s of services) await s.close();
    if (glancePid) process.kill(glancePid, 'SIGCONT');
    await glance?.down();
    await files?.close();
    await cleanup?.();
  });

  const service = async (): Promise<ServiceHarness> => {
    const s = await ServiceHarness.create('glance-creating', {
      API_TOKENS: TOKEN,
      ...files.importEnv,
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_PUBLISH_BACKOFF_MS: '200',
    });
    services.push(s);
    await s.startApi();
    return s;
  };

  /** Bytes waiting unread in Glance's connections (its process is stopped). */
  const unread = async (): Promise<number> => {
    const out = await new Promise<string>((resolve, reject) =>
      execFile('ss', ['-Htn', 'state', 'established', `( sport = :${port} )`], (err, stdout) => (err ? reject(err) : resolve(stdout))),
    );
    return out
      .split('\n')
      .filter((l) => l.trim() !== '')
      .reduce((sum, l) => sum + Number(l.trim().split(/\s+/)[0]), 0);
  };

  /** With Glance stopped: submits, waits until the job recorded the id and the create request sits in Glance's socket. */
  const submitAndHoldCreate = async (s: ServiceHarness, name: string): Promise<{ id: string; imageId: string }> => {
    process.kill(glancePid, 'SIGSTOP');
    const created = await submitJson(s, TOKEN, { source: { url: `${files.url}/range/disk.qcow2` }, glance: { name } });
    const imageId = await waitFor(
      'the job to record the image it is creating',
      async () => {
        const g = ((await s.getJob(created.id, TOKEN)) as GlanceJob).output?.glance;
        return g?.status === 'creating' && typeof g.image_id === 'string' ? g.image_id : undefined;
      },
      60_000,
      50,
    );
    await waitFor('the create request to reach Glance', async () => (await unread()) > 0, 20_000, 50);
    return { id: created.id, imageId };
  };

  it('the worker SIGKILLed before Glance answered the create: the next attempt finds that image by the recorded id; one image in the end', async () => {
    const s = await service();
    const worker = await s.startWorker();
    const name = `creating-crash-${process.pid}`;
    const { id, imageId } = await submitAndHoldCreate(s, name);
    expect(await worker.stop('SIGKILL')).toBe('SIGKILL');
    process.kill(glancePid, 'SIGCONT');
    // Glance still creates it: the request was whole in its socket.
    await waitFor('Glance to create the image', async () => (await glanceApi(glance, `/v2/images/${imageId}`)).status === 200, 30_000, 100);
    await s.startWorker();
    const done = (await s.waitForFinal(id, { token: TOKEN, timeoutMs: 120_000 })) as GlanceJob;
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.output?.glance).toMatchObject({ image_id: imageId, status: 'active', checksum: raw.md5, os_hash_value: raw.sha512 });
    const named = await imagesNamed(glance, name);
    expect(named.map((i) => i.id)).toEqual([imageId]);
    expect(await fetchDigests(`${glance.url}/v2/images/${imageId}/file`, { 'x-auth-token': glance.token })).toEqual({ size: 2 * 2 ** 20, ...raw });
  });

  it('cancelled before Glance answered the create: the image Glance then creates is deleted by the job', async () => {
    const s = await service();
    await s.startWorker();
    const name = `creating-cancel-${process.pid}`;
    const { id, imageId } = await submitAndHoldCreate(s, name);
    const res = await s.request(`/v1/jobs/${id}`, { method: 'DELETE', token: TOKEN });
    expect(res.status).toBe(200);
    process.kill(glancePid, 'SIGCONT');
    const done = (await s.waitForJob(id, (j) => (j as GlanceJob).output?.glance?.status === 'deleted', { token: TOKEN, timeoutMs: 60_000 })) as GlanceJob;
    expect(done.state).toBe('cancelled');
    expect((await glanceApi(glance, `/v2/images/${imageId}`)).status).toBe(404);
    expect(await imagesNamed(glance, name)).toEqual([]);
  });
});
