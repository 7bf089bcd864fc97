/**
 * The output store on S3 (the run's Ceph RGW, STORE_URL=s3://...) published into the
 * test Glance by upload: the bytes go from the bucket into PUT /v2/images/{id}/file
 * as a stream. Proof that they are not copied to the worker's disk first: while Glance
 * reports the image `saving` (the upload slowed with GLANCE_UPLOAD_BYTES_PER_SECOND),
 * the API's and worker's data directory holds far less than the output.
 */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { S3Client } from '@aws-sdk/client-s3';
import { cephAvailable, useCeph, type CephEnv } from '../helpers/ceph.js';
import { digestsOf, fetchDigests, glanceApi, haveGlance, useGlance, type Digests, type GlanceJob, type TestGlance } from '../helpers/glance.js';
import { makeTempDir, qemuImg, writeRaw } from '../helpers/qemu.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { curl, ServiceHarness, waitFor } from '../helpers/service.js';

const TOKEN = 'glance-s3-token-0123456789';
const SIZE = 12 * 2 ** 20;

async function bytesUnder(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => [])) {
    if (entry.isFile()) total += (await stat(join(entry.parentPath, entry.name)).catch(() => ({ size: 0 }))).size;
  }
  return total;
}

describe.skipIf(!cephAvailable || !haveGlance)('publishing from an S3 output store into Glance', () => {
  let env: CephEnv;
  let glance: TestGlance;
  let s3: S3Client;
  const bucket = uniqueBucket('dc-glance');
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let raw: Digests;
  let imageId: string | undefined;

  beforeAll(async () => {
    env = await useCeph();
    glance = await useGlance();
    s3 = testS3Client(env);
    await createBucket(s3, bucket);
    ({ dir, cleanup } = await makeTempDir('diskconv-glance-s3-'));
    await writeRaw(join(dir, 'base.raw'), SIZE, 91);
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', join(dir, 'base.raw'), join(dir, 'disk.vmdk'));
    await qemuImg('convert', '-O', 'raw', join(dir, 'disk.vmdk'), join(dir, 'ref.raw'));
    raw = await digestsOf(join(dir, 'ref.raw'));
    svc = await ServiceHarness.create('glance-s3', {
      API_TOKENS: TOKEN,
      ...s3Env(env, bucket, 'svc/'),
      GLANCE_URL: glance.url,
      GLANCE_TOKEN: glance.token,
      GLANCE_STORE: 'fs',
      GLANCE_UPLOAD_BYTES_PER_SECOND: String(2 * 2 ** 20),
    });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    await svc?.close();
    if (imageId) await glanceApi(glance, `/v2/images/${imageId}`, { method: 'DELETE' }).catch(() => {});
    if (s3) await removeBucket(s3, bucket).catch(() => {});
    await cleanup?.();
  });

  it('an upload converted into the bucket is streamed from it into Glance: active, qemu-img’s bytes and hashes, nothing copied to local disk', async () => {
    const created = JSON.parse(
      await curl(['-H', `Authorization: Bearer ${TOKEN}`, '-F', `file=@${join(dir, 'disk.vmdk')}`, '-F', `glance=${JSON.stringify({ name: 'from-s3' })}`, `${svc.apiUrl}/v1/jobs`]),
    ) as GlanceJob;
    const saving = await waitFor(
      'Glance to be receiving the bytes',
      async () => {
        const job = (await svc.getJob(created.id, TOKEN)) as GlanceJob;
        if (['succeeded', 'failed', 'cancelled'].includes(job.state)) throw new Error(`the job ended ${job.state} before the upload was caught`);
        const id = job.output?.glance?.image_id;
        if (typeof id !== 'string') return undefined;
        return (await glanceApi(glance, `/v2/images/${id}`)).body.status === 'saving' ? job : undefined;
      },
      90_000,
      100,
    );
    // Mid-upload: the output is in the bucket, not on this machine's disk.
    expect(saving.output?.location).toBe(`s3://${bucket}/svc/output/${created.id}`);
    expect(await objectKeys(s3, bucket, 'svc/output/')).toContain(`svc/output/${created.id}`);
    expect(await bytesUnder(svc.dataDir)).toBeLessThan(2 ** 20);

    const done = (await svc.waitForFinal(created.id, { token: TOKEN, timeoutMs: 120_000 })) as GlanceJob;
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    const g = done.output?.glance as Record<string, unknown>;
    imageId = String(g.image_id);
    expect(done.output).toMatchObject({ sha256: raw.sha256, md5: raw.md5, sha512: raw.sha512, size: SIZE });
    expect(g).toMatchObject({ status: 'active', method: 'upload', checksum: raw.md5, os_hash_algo: 'sha512', os_hash_value: raw.sha512 });
    const { body: image } = await glanceApi(glance, `/v2/images/${imageId}`);
    expect(image).toMatchObject({ status: 'active', name: 'from-s3', disk_format: 'raw', size: SIZE, stores: 'fs', checksum: raw.md5, os_hash_value: raw.sha512 });
    expect(await fetchDigests(`${glance.url}/v2/images/${imageId}/file`, { 'x-auth-token': glance.token })).toEqual({ size: SIZE, ...raw });
    // The output stays in the bucket and downloadable; no staged input or multipart upload is left.
    expect(await objectKeys(s3, bucket, 'svc/input/')).toEqual([]);
    expect(await uploadsInProgress(s3, bucket)).toEqual([]);
    expect(await fetchDigests(`${svc.apiUrl}${done.output?.href}`, { authorization: `Bearer ${TOKEN}` })).toEqual({ size: SIZE, ...raw });
  });
});
