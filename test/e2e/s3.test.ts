/**
 * The service on an S3 store (the shared test Ceph's RGW), as real processes:
 * the API streams uploads straight into the bucket (its own disk stays empty),
 * the worker reads them with ranged GETs and publishes a multipart output,
 * which the API serves with Range passthrough or a 307 to a presigned URL.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, useCeph, type CephEnv } from '../helpers/ceph.js';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { curl, ServiceHarness, spawnDiskconv, waitFor, type JobJson } from '../helpers/service.js';
import { freePort } from '../../src/cli/redis-server.js';

describe.skipIf(!cephAvailable)('service on S3 (Ceph RGW)', () => {
  let env: CephEnv;
  let client: S3Client;
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image: string;
  let imageSha: string;
  const bucket = uniqueBucket('e2e');

  beforeAll(async () => {
    env = await useCeph();
    client = testS3Client(env);
    await createBucket(client, bucket);
    ({ dir, cleanup } = await makeTempDir('diskconv-e2e-s3-'));
    image = join(dir, 'disk.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, '40M');
    await qemuIo('-c', 'write -P 0x61 0 3M', '-c', 'write -P 0x62 20M 2M', '-c', 'write -P 0x63 38M 2M', image);
    imageSha = await qemuRawSha256(image, dir);
    svc = await ServiceHarness.create('e2e-s3', s3Env(env, bucket, 'svc/'));
    await svc.startApi();
    await svc.startWorker({ DATA_DIR: join(dir, 'worker-data') });
  });
  afterAll(async () => {
    await svc?.close();
    if (client) await removeBucket(client, bucket);
    await cleanup?.();
  });

  it('converts an upload staged in the bucket and serves the output with ranges; the API host keeps nothing', async () => {
    const job = JSON.parse(await curl(['-F', `file=@${image}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
    const done = await svc.waitForFinal(job.id);
    expect(done).toMatchObject({ state: 'succeeded', output: { sha256: imageSha, size: 40 * 2 ** 20, location: `s3://${bucket}/svc/output/${job.id}` } });
    const out = join(dir, 'out.raw');
    await curl(['-o', out, `${svc.apiUrl}${done.output?.href}`]);
    expect(await sha256File(out)).toBe(imageSha);
    const part = await fetch(`${svc.apiUrl}${done.output?.href}`, { headers: { range: 'bytes=20971520-20971535' } });
    expect(part.status).toBe(206);
    expect(part.headers.get('content-range')).toBe(`bytes 20971520-20971535/${40 * 2 ** 20}`);
    expect(Buffer.from(await part.arrayBuffer())).toEqual(Buffer.alloc(16, 0x62));
    // The staged input is gone, nothing is in progress, the output is the only object.
    expect(await objectKeys(client, bucket, 'svc/')).toEqual([`svc/output/${job.id}`]);
    expect(await uploadsInProgress(client, bucket)).toEqual([]);
    // The API's DATA_DIR holds no store at all.
    expect(await readdir(svc.dataDir)).not.toContain('store');
  });

  it('answers 307 to a presigned URL with OUTPUT_REDIRECT=presigned', async () => {
    const job = JSON.parse(await curl(['-F', `file=@${image}`, `${svc.apiUrl}/v1/jobs`])) as JobJson;
    const done = await svc.waitForFinal(job.id);
    expect(done.state).toBe('succeeded');
    const port = await freePort();
    const api = spawnDiskconv('api-presigned', 'serve', svc.env({ PORT: String(port), OUTPUT_REDIRECT: 'presigned' }));
    try {
      const base = `http://127.0.0.1:${port}`;
      await waitFor('the second API', async () => (await fetch(`${base}/readyz`)).status === 200, 20_000);
      const res = await fetch(`${base}${done.output?.href}`, { redirect: 'manual' });
      expect(res.status).toBe(307);
      const location = res.headers.get('location') ?? '';
      expect(location.startsWith(`${env.S3_ENDPOINT}/${bucket}/svc/output/${job.id}?`)).toBe(true);
      const ranged = await fetch(location, { headers: { range: 'bytes=0-15' } });
      expect(ranged.status).toBe(206);
      expect(Buffer.from(await ranged.arrayBuffer())).toEqual(Buffer.alloc(16, 0x61));
    } finally {
      await api.stop();
    }
  });

  it('says in /readyz that the bucket is missing', async () => {
    const port = await freePort();
    const missing = uniqueBucket('missing');
    const api = spawnDiskconv('api-missing', 'serve', svc.env({ PORT: String(port), ...s3Env(env, missing) }));
    try {
      const body = await waitFor(
        'a not-ready answer',
        async () => {
          const res = await fetch(`http://127.0.0.1:${port}/readyz`);
          return res.status === 503 ? ((await res.json()) as { code: string; checks: Record<string, string> }) : undefined;
        },
        20_000,
      );
      expect(body).toMatchObject({ code: 'NOT_READY', checks: { redis: 'ok', store: `unavailable: bucket '${missing}' does not exist (create it first)` } });
    } finally {
      await api.stop();
    }
  });
});
