/**
 * Completion webhooks with real processes (API, worker, redis-server) and real
 * receivers on 127.0.0.1 that verify the signature the way the README shows.
 */
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { makeTempDir, qemuImg, qemuRawSha256, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';
import { startReceiver, type Delivery } from '../helpers/webhook-receiver.js';

const SECRET = 'webhook-secret-0123456789abcdef0123456789';



describe('completion webhooks', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image: Buffer;
  let rawSha = '';

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-webhooks-'));
    await writeRaw(join(dir, 'base.raw'), 2 * 2 ** 20, 9);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'disk.qcow2'));
    image = await readFile(join(dir, 'disk.qcow2'));
    rawSha = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    svc = await ServiceHarness.create('webhooks', {
      WEBHOOK_SECRET: SECRET,
      WEBHOOK_ALLOW: '127.0.0.1',
      WEBHOOK_ATTEMPTS: '3',
      WEBHOOK_BACKOFF_MS: '100',
      WEBHOOK_TIMEOUT_MS: '3000',
    });
    await svc.startApi();
    await svc.startWorker();
  });
  afterAll(async () => {
    await svc?.close();
    await cleanup?.();
  });

  async function create(callbackUrl: string): Promise<Response> {
    return svc.request(`/v1/jobs?filename=disk.qcow2&callback_url=${encodeURIComponent(callbackUrl)}`, {
      method: 'POST',
      body: image,
      headers: { 'content-type': 'application/octet-stream' },
    });
  }

  const callbackSettled = (id: string) =>
    waitFor(`the callback of ${id}`, async () => {
      const job = await svc.getJob(id);
      const cb = job.callback as { state: string } | undefined;
      return cb && cb.state !== 'pending' ? job : undefined;
    }, 30_000);

  it('POSTs the finished job, signed, to a receiver that verifies the signature', async () => {
    const receiver = await startReceiver(SECRET);
    try {
      const res = await create(receiver.url);
      expect(res.status).toBe(202);
      const created = (await res.json()) as JobJson;
      expect(created.callback_url).toBe(receiver.url);
      expect(created.callback).toEqual({ state: 'pending', attempts: 0, last_status: null, last_error: null });
      const job = await callbackSettled(created.id);
      expect(job.state).toBe('succeeded');
      expect(job.callback).toEqual({ state: 'delivered', attempts: 1, last_status: 200, last_error: null });
      expect(receiver.deliveries).toHaveLength(1);
      const d = receiver.deliveries[0] as Delivery;
      expect(d.verified).toBe(true);
      expect(d.headers['content-type']).toBe('application/json');
      expect(d.headers['x-diskconv-delivery']).toBe(`${created.id}.1`);
      const body = JSON.parse(d.body) as JobJson;
      expect(body.id).toBe(created.id);
      expect(body.state).toBe('succeeded');
      expect(body.output?.sha256).toBe(rawSha);
    } finally {
      await receiver.close();
    }
  });

  it('retries a failing receiver with backoff and records each attempt', async () => {
    const receiver = await startReceiver(SECRET, [500, 503]);
    try {
      const created = (await (await create(receiver.url)).json()) as JobJson;
      const job = await callbackSettled(created.id);
      expect(job.callback).toEqual({ state: 'delivered', attempts: 3, last_status: 200, last_error: null });
      expect(receiver.deliveries.map((d) => d.headers['x-diskconv-delivery'])).toEqual([1, 2, 3].map((n) => `${created.id}.${n}`));
      expect(receiver.deliveries.every((d) => d.verified)).toBe(true);
      // Each attempt carries the attempt count so far.
      expect(receiver.deliveries.map((d) => (JSON.parse(d.body) as { callback: { attempts: number } }).callback.attempts)).toEqual([1, 2, 3]);
    } finally {
      await receiver.close();
    }
  });

  it('a dead receiver neither blocks nor fails the conversion; the callback ends failed', async () => {
    const port = await freePort(); // nothing listens there
    const created = (await (await create(`http://127.0.0.1:${port}/hook`)).json()) as JobJson;
    const finished = await svc.waitForFinal(created.id);
    expect(finished.state).toBe('succeeded');
    expect(finished.output?.sha256).toBe(rawSha);
    const job = await callbackSettled(created.id);
    expect(job.state).toBe('succeeded');
    const cb = job.callback as { state: string; attempts: number; last_status: number | null; last_error: string };
    expect(cb.state).toBe('failed');
    expect(cb.attempts).toBe(3);
    expect(cb.last_status).toBeNull();
    expect(cb.last_error).toMatch(/^SOURCE_UNAVAILABLE: .*(ECONNREFUSED|refused)/);
    // Meanwhile other jobs ran: the one after it converts as usual.
    const next = (await (await svc.request('/v1/jobs?filename=x.qcow2', { method: 'POST', body: image, headers: { 'content-type': 'application/octet-stream' } })).json()) as JobJson;
    expect((await svc.waitForFinal(next.id)).state).toBe('succeeded');
  });

  it('refuses a disallowed callback address when the job is created', async () => {
    for (const url of ['http://169.254.169.254/latest/meta-data', 'http://10.1.2.3/hook', 'http://127.0.0.2/hook', 'ftp://127.0.0.1/hook', 'http://user:pw@127.0.0.1/hook']) {
      const res = await create(url);
      expect(res.status, url).toBe(422);
      expect(((await res.json()) as { code: string }).code, url).toBe('URL_REFUSED');
    }
    // Nothing was kept: no job, no staged upload.
    const list = (await (await svc.request('/v1/jobs?limit=100')).json()) as { jobs: JobJson[] };
    expect(list.jobs.filter((j) => String(j.callback_url ?? '').includes('169.254'))).toEqual([]);
  });

  it('checks the address again at delivery (a worker whose rules refuse it)', async () => {
    const receiver = await startReceiver(SECRET);
    try {
      // Replace the worker with one whose allow list no longer covers 127.0.0.1.
      const worker = svc.processes.find((p) => p.name.startsWith('worker'));
      await worker?.stop('SIGTERM');
      await svc.startWorker({ WEBHOOK_ALLOW: '192.0.2.1' });
      const created = (await (await create(receiver.url)).json()) as JobJson;
      const job = await callbackSettled(created.id);
      expect(job.state).toBe('succeeded');
      const cb = job.callback as { state: string; attempts: number; last_error: string };
      expect(cb.state).toBe('failed');
      expect(cb.attempts).toBe(1); // refused is final, not retried
      expect(cb.last_error).toMatch(/^URL_REFUSED: /);
      expect(receiver.deliveries).toEqual([]);
    } finally {
      await receiver.close();
    }
  });
});
