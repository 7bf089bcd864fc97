/**
 * The shared tus locker (src/api/tus-locker.ts) with two real API processes on
 * one Redis and one upload store, as behind a balancer: while a PATCH holds an
 * upload on API 1, a PATCH for the same upload on API 2 first makes API 1 end
 * its request (the release request travels through Redis), and only then
 * writes; the upload's bytes stay exactly what was sent, and it converts to
 * what qemu-img writes. With per-process locks the second PATCH would write
 * beside the first one, still open.
 */
import { request as httpRequest, type ClientRequest } from 'node:http';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { makeTempDir, qemuRawSha256, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, spawnDiskconv, waitFor } from '../helpers/service.js';
import { tusCreate, tusHead, tusHeaders, tusPatch } from '../helpers/tus.js';

const TOKEN = 'tus-locker-token-0123456789abcdef';
const MiB = 2 ** 20;

describe('tus uploads behind a balancer: one lock per upload across API processes', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let second = '';
  let redis: Redis;
  let bytes: Buffer;
  let rawSha = '';

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-tus-locker-'));
    await writeRaw(join(dir, 'disk.raw'), 4 * MiB, 57);
    bytes = await readFile(join(dir, 'disk.raw'));
    rawSha = await qemuRawSha256(join(dir, 'disk.raw'), dir);
    svc = await ServiceHarness.create('tus-locker', { API_TOKENS: TOKEN, UPLOAD_TTL_SECONDS: '3600' });
    await svc.startApi();
    const port = await freePort();
    const api2 = spawnDiskconv('api2', 'serve', svc.env({ PORT: String(port) }));
    svc.processes.push(api2);
    second = `http://127.0.0.1:${port}`;
    await waitFor('the second API', async () => (await fetch(`${second}/readyz`)).status === 200, 20_000);
    await svc.startWorker();
    redis = new Redis(svc.redis.url, { maxRetriesPerRequest: 1 });
  });
  afterAll(async () => {
    redis?.disconnect();
    await svc?.close();
    await cleanup?.();
  });

  it('a PATCH on API 2 ends the PATCH API 1 holds before it writes; the bytes stay exact', async () => {
    const created = await tusCreate(svc.apiUrl, TOKEN, bytes.length, { filename: 'disk.raw', source_format: 'raw' });
    expect(created.status).toBe(201);
    const path = created.headers.get('location') as string;
    const id = path.split('/').pop() as string;
    const file = join(svc.dataDir, 'uploads', id);

    // PATCH A on API 1: declares the whole image, sends 1 MiB, then stalls with the request open.
    let aEnded: number | undefined;
    let aStatus: number | undefined;
    const a: ClientRequest = httpRequest(`${svc.apiUrl}${path}`, {
      method: 'PATCH',
      headers: tusHeaders(TOKEN, { 'upload-offset': '0', 'content-type': 'application/offset+octet-stream', 'content-length': String(bytes.length) }),
    });
    const aDone = new Promise<void>((resolve) => {
      a.on('response', (res) => {
        aStatus = res.statusCode;
        res.resume();
        res.on('end', () => {
          aEnded ??= Date.now();
          resolve();
        });
      });
      a.on('error', () => {
        aEnded ??= Date.now();
        resolve();
      });
      a.on('close', () => {
        aEnded ??= Date.now();
        resolve();
      });
    });
    a.write(bytes.subarray(0, MiB));
    await waitFor('the first MiB on disk', async () => (await stat(file)).size === MiB, 20_000);
    // API 1 holds the upload's lock in Redis, for every API process to see.
    expect(await redis.keys(`*tus-lock:${id}`)).toHaveLength(1);
    expect(aEnded).toBeUndefined();

    // PATCH B on API 2, at the offset the store has now.
    const b = await tusPatch(`${second}${path}`, TOKEN, MiB, bytes.subarray(MiB, 2 * MiB));
    const bAnswered = Date.now();
    expect(b.status, await b.clone().text()).toBe(204);
    expect(b.headers.get('upload-offset')).toBe(String(2 * MiB));
    // A had been made to let go before B wrote (with per-process locks it would still be open here).
    await Promise.race([aDone, new Promise((r) => setTimeout(r, 100))]);
    expect(aEnded, 'the PATCH on API 1 was still open when API 2 had written').toBeDefined();
    expect(aEnded as number).toBeLessThanOrEqual(bAnswered);
    a.destroy();
    void aStatus;

    // The rest through API 1 again; the upload is exactly the image, and converts to qemu-img's bytes.
    const head = await tusHead(`${svc.apiUrl}${path}`, TOKEN);
    expect(head.headers.get('upload-offset')).toBe(String(2 * MiB));
    expect((await readFile(file)).equals(bytes.subarray(0, 2 * MiB))).toBe(true);
    const last = await tusPatch(`${svc.apiUrl}${path}`, TOKEN, 2 * MiB, bytes.subarray(2 * MiB));
    expect(last.status).toBe(204);
    const jobId = (last.headers.get('diskconv-job') as string).split('/').pop() as string;
    const job = await svc.waitForFinal(jobId, { token: TOKEN });
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.output?.sha256).toBe(rawSha);
    // Nothing stays locked.
    expect(await redis.keys(`*tus-lock:${id}`)).toHaveLength(0);
  });

  it('concurrent PATCHes for one upload through both APIs never interleave: each offset is written once', async () => {
    const created = await tusCreate(svc.apiUrl, TOKEN, bytes.length, { source_format: 'raw' });
    const path = created.headers.get('location') as string;
    const chunk = 256 * 1024;
    // Each client sends the chunk at the offset it believes in, retrying on 409 from the offset HEAD reports.
    const client = async (base: string): Promise<number> => {
      let writes = 0;
      for (;;) {
        const head = await tusHead(`${base}${path}`, TOKEN);
        if (head.status !== 200) throw new Error(`HEAD ${head.status}`);
        const offset = Number(head.headers.get('upload-offset'));
        if (offset >= bytes.length) return writes;
        const res = await tusPatch(`${base}${path}`, TOKEN, offset, bytes.subarray(offset, Math.min(bytes.length, offset + chunk)));
        if (res.status === 204) writes++;
        else if (![409, 400, 500].includes(res.status)) throw new Error(`PATCH ${res.status} ${await res.text()}`);
      }
    };
    const [w1, w2] = await Promise.all([client(svc.apiUrl), client(second)]);
    expect(w1 + w2).toBeGreaterThanOrEqual(bytes.length / chunk);
    const head = await tusHead(`${svc.apiUrl}${path}`, TOKEN);
    const jobId = (head.headers.get('diskconv-job') as string).split('/').pop() as string;
    const job = await svc.waitForFinal(jobId, { token: TOKEN });
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.source.size).toBe(bytes.length);
    expect(job.output?.sha256).toBe(rawSha);
  });
});
