/**
 * `diskconv up` on a single machine: without REDIS_URL it runs its own
 * redis-server, the API and a worker in one command, prints the URL, and stops
 * all of it on SIGTERM. Default configuration otherwise: URL import to loopback
 * is refused.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, startPrivateRedis } from '../../src/cli/redis-server.js';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256 } from '../helpers/qemu.js';
import { curl, spawnDiskconv, waitFor, type JobJson, type ServiceProcess } from '../helpers/service.js';

describe('diskconv up', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let up: ServiceProcess;
  let url: string;
  let redisUrl: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-up-'));
    const port = await freePort();
    up = spawnDiskconv('up', 'up', { DATA_DIR: join(dir, 'data'), PORT: String(port), QUEUE_NAME: 'up-test' });
    const line = await waitFor('the URL line', async () => /diskconv is up: (http:\S+).*redis at (redis:\S+);/.exec(up.output()) ?? undefined, 20_000);
    url = line[1] as string;
    redisUrl = line[2] as string;
  });

  afterAll(async () => {
    if (up.child.exitCode === null) await up.stop('SIGKILL');
    await cleanup();
  });

  it('prints the URL and serves, with its own redis-server', async () => {
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(redisUrl).toMatch(/^redis:\/\/127\.0\.0\.1:\d+$/);
    expect(JSON.parse(await curl([`${url}/readyz`]))).toMatchObject({ status: 'ready' });
  });

  it('converts an upload', async () => {
    const image = join(dir, 'disk.vdi');
    await qemuImg('create', '-f', 'vdi', image, '16M');
    await qemuIo('-f', 'vdi', '-c', 'write -P 0x7e 1M 2M', image);
    const created = JSON.parse(await curl(['-F', `file=@${image}`, `${url}/v1/jobs`])) as JobJson;
    const done = await waitFor('the job', async () => {
      const job = JSON.parse(await curl([`${url}/v1/jobs/${created.id}`])) as JobJson;
      return job.state === 'succeeded' || job.state === 'failed' ? job : undefined;
    });
    expect(done.state).toBe('succeeded');
    expect(done.output?.sha256).toBe(await qemuRawSha256(image, dir));
  });

  it('refuses a URL to 127.0.0.1 when URL_IMPORT_ALLOW is unset', async () => {
    const body = JSON.stringify({ source: { url: `${url}/openapi.yaml` } });
    const out = await curl(['-w', '\n%{http_code}', '-H', 'Content-Type: application/json', '-d', body, `${url}/v1/jobs`]);
    const [json, status] = out.split('\n');
    expect(status).toBe('422');
    expect(JSON.parse(json as string)).toMatchObject({ code: 'URL_REFUSED' });
  });

  it('stops everything, its redis-server included, on SIGTERM', async () => {
    expect(await up.stop('SIGTERM')).toBe(0);
    const client = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    client.on('error', () => {});
    await expect(client.connect()).rejects.toThrow();
    client.disconnect();
  });

  it('killed (SIGKILL), it takes its redis-server with it; a server left on its data folder is stopped before the next one starts', async () => {
    const data = join(dir, 'killed');
    const pidFile = join(data, 'redis', 'redis.pid');
    const alive = (pid: number): boolean => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    const first = spawnDiskconv('up-killed', 'up', { DATA_DIR: data, PORT: '0', QUEUE_NAME: 'up-killed' });
    await waitFor('the URL line', async () => /diskconv is up/.test(first.output()) || undefined, 20_000);
    const pid = Number(await readFile(pidFile, 'utf8'));
    expect(alive(pid)).toBe(true);
    await first.stop('SIGKILL');
    await waitFor('the orphaned redis-server to end', async () => !alive(pid) || undefined, 15_000);

    // One that outlived its parent anyway (started by hand here, as a killed up without setpriv leaves it):
    // the next up on that folder stops it (it is ours: same folder, its pid file) instead of sharing the AOF.
    const stray = await startPrivateRedis(join(data, 'redis'));
    const next = spawnDiskconv('up-next', 'up', { DATA_DIR: data, PORT: '0', QUEUE_NAME: 'up-killed' });
    try {
      await waitFor('the URL line', async () => /diskconv is up/.test(next.output()) || undefined, 30_000);
      expect(stray.process.exitCode ?? stray.process.signalCode).not.toBeNull();
      const nextPid = Number(await readFile(pidFile, 'utf8'));
      expect(nextPid).not.toBe(stray.process.pid);
      expect(alive(nextPid)).toBe(true);
    } finally {
      expect(await next.stop('SIGTERM')).toBe(0);
      await stray.stop();
    }
  });
});
