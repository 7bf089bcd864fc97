/**
 * Redis SIGKILLed under a running API and worker (issue 11): the API answers at
 * once with 503 problem+json QUEUE_UNAVAILABLE and Retry-After (never a 500 after
 * ioredis has retried for 10-15 s), and the first SIGTERM still stops both
 * processes. Also `diskconv up` with its port taken says which variable to change
 * and exits instead of hanging.
 */
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, writeRaw } from '../helpers/qemu.js';
import { curl, ServiceHarness, spawnDiskconv, type JobJson, type ServiceProcess } from '../helpers/service.js';

/** The exit status, or 'still running' after `ms` (bounded only to fail rather than hang). */
const exitWithin = (p: ServiceProcess, ms: number): Promise<number | NodeJS.Signals | 'still running'> =>
  Promise.race([p.exited, new Promise<'still running'>((r) => setTimeout(() => r('still running'), ms))]);

describe('Redis down', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let image: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-redis-down-'));
    const raw = join(dir, 'base.raw');
    await writeRaw(raw, 16 * 2 ** 20, 3);
    image = join(dir, 'disk.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, image);
  });
  afterAll(async () => cleanup());

  it('the API answers 503 QUEUE_UNAVAILABLE at once, and SIGTERM stops API and worker', async () => {
    const svc = await ServiceHarness.create('redis-down', { SHUTDOWN_GRACE_MS: '2000' });
    try {
      const api = await svc.startApi();
      const worker = await svc.startWorker({ WORKER_READ_BYTES_PER_SECOND: '2M' });
      const { id } = JSON.parse(await curl(['-F', `file=@${image}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
      await svc.waitForJob(id, (j) => j.state === 'running' && j.progress.phase === 'converting', { timeoutMs: 30_000 });

      svc.redis.kill('SIGKILL');
      for (const [method, path] of [['GET', `/v1/jobs/${id}`], ['GET', '/v1/jobs'], ['POST', '/v1/jobs']] as const) {
        const t0 = Date.now();
        const res = await svc.request(path, {
          method,
          signal: AbortSignal.timeout(20_000),
          ...(method === 'POST' ? { body: Buffer.alloc(4096), headers: { 'content-type': 'application/octet-stream' } } : {}),
        });
        const ms = Date.now() - t0;
        expect(res.status, `${method} ${path}: ${await res.clone().text()}`).toBe(503);
        expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
        expect(res.headers.get('retry-after')).toMatch(/^\d+$/);
        expect(((await res.json()) as { code: string }).code).toBe('QUEUE_UNAVAILABLE');
        expect(ms, `${method} ${path} took ${ms} ms`).toBeLessThan(3000); // issue 11: "at once", not after 10-15 s
      }
      expect((await svc.request('/readyz', { signal: AbortSignal.timeout(20_000) })).status).toBe(503);

      // SHUTDOWN_GRACE_MS is 2 s: both must be gone well within 30 s although Redis never returns.
      worker.child.kill('SIGTERM');
      api.child.kill('SIGTERM');
      expect(await exitWithin(api, 30_000)).toBe(0);
      expect(await exitWithin(worker, 30_000)).not.toBe('still running');
    } finally {
      await svc.close();
    }
  }, 180_000);

  it('`diskconv up` with its port taken says to change PORT and exits', async () => {
    const blocker: Server = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const address = blocker.address();
    const port = typeof address === 'object' && address ? address.port : 0;
    const up = spawnDiskconv('up', 'up', { DATA_DIR: join(dir, 'up-data'), PORT: String(port), QUEUE_NAME: 'redis-down-up', SHUTDOWN_GRACE_MS: '1000' });
    try {
      const exit = await exitWithin(up, 30_000);
      expect(exit, up.output()).not.toBe('still running');
      expect(exit).not.toBe(0);
      expect(up.output()).toMatch(/PORT/);
      expect(up.output()).toMatch(new RegExp(`port ${port}.*in use`));
    } finally {
      if (up.child.exitCode === null && up.child.signalCode === null) up.child.kill('SIGKILL');
      await new Promise((r) => blocker.close(r));
    }
  }, 60_000);
});
