/**
 * POST /v1/jobs octet-stream uploads staged into the bucket (the shared test Ceph's RGW) and converted while they
 * arrive (S3_STAGING_OVERLAP: src/store/s3/part-objects.ts, src/queue/upload-parts.ts), as real processes: the
 * API, and a worker with a DATA_DIR of its own (another host: it reads nothing but the bucket and Redis). The
 * test paces the body and holds the rest back until it sees what it wants (no timing assertions): the job
 * converting while half the body is still with the client, part objects in the bucket meanwhile; the output what
 * qemu-img writes, the source's sha256 the body's, the staged object committed (the mark says so) and no part
 * object or multipart upload left; a client that drops mid-body fails the job with INCOMPLETE_BODY and leaves no
 * part object; an API killed mid-body fails the job once its lease lapses, nothing left; a worker killed while it
 * follows, and the job still converts.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { request as httpRequest, type ClientRequest } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { S3Client } from '@aws-sdk/client-s3';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, useCeph, type CephEnv } from '../helpers/ceph.js';
import { makeTempDir, qemuImg, qemuRawSha256, writeRaw } from '../helpers/qemu.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { freePort } from '../../src/cli/redis-server.js';
import { ServiceHarness, spawnDiskconv, waitFor, type JobJson } from '../helpers/service.js';

const TOKEN = 's3-overlap-token-0123456789abcdef';
const MiB = 2 ** 20;
const PREFIX = 'svc/';
const CHUNK = 256 * 1024;

/** An upload the test paces: `send(upTo)` writes the body up to that byte, `end()` finishes, `abort()` drops the connection. */
function pacedUpload(url: string, body: Buffer) {
  let sent = 0;
  const req: ClientRequest = httpRequest(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/octet-stream', 'content-length': String(body.length) },
  });
  const response = new Promise<{ status: number; body: string }>((resolve, reject) => {
    req.on('response', (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      res.on('error', reject);
    });
    req.on('error', reject);
  });
  response.catch(() => {});
  return {
    response,
    async send(upTo: number) {
      while (sent < Math.min(upTo, body.length)) {
        const end = Math.min(upTo, sent + CHUNK);
        const ok = req.write(body.subarray(sent, end));
        sent = end;
        if (!ok) await new Promise((r) => req.once('drain', r));
        await sleep(1);
      }
    },
    async end() {
      await this.send(body.length);
      req.end();
      return response;
    },
    abort() {
      req.destroy();
    },
  };
}

describe.skipIf(!cephAvailable)('octet-stream uploads staged in S3 convert while they arrive (S3_STAGING_OVERLAP)', () => {
  let env: CephEnv;
  let client: S3Client;
  let redis: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image: Buffer;
  let imageSha = '';
  let rawSha = '';
  const bucket = uniqueBucket('s3overlap');
  const auth = { token: TOKEN };

  beforeAll(async () => {
    env = await useCeph();
    client = testS3Client(env);
    await createBucket(client, bucket);
    ({ dir, cleanup } = await makeTempDir('diskconv-s3-overlap-'));
    // 48 MiB of mixed data in a qcow2 as qemu-img writes it (tables first, clusters in guest order): several 8 MiB parts.
    await writeRaw(join(dir, 'base.raw'), 48 * MiB, 61);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'disk.qcow2'));
    image = await readFile(join(dir, 'disk.qcow2'));
    imageSha = createHash('sha256').update(image).digest('hex');
    rawSha = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    svc = await ServiceHarness.create('s3-overlap', { ...s3Env(env, bucket, PREFIX), API_TOKENS: TOKEN, S3_STAGING_OVERLAP: 'true', UPLOAD_IDLE_TIMEOUT_MS: '20000' });
    redis = new Redis(svc.redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    await redis.connect();
    await svc.startApi();
    await svc.startWorker({ DATA_DIR: join(dir, 'worker-data') });
  }, 300_000);
  afterAll(async () => {
    redis?.disconnect();
    await svc?.close();
    if (client) await removeBucket(client, bucket).catch(() => {});
    await cleanup?.();
  });

  /** The one running or queued job, once it shows up. */
  async function theJob(): Promise<JobJson> {
    return waitFor('the job to be listed', async () => {
      const { jobs } = (await (await svc.request('/v1/jobs?limit=100', auth)).json()) as { jobs: JobJson[] };
      return jobs.find((j) => j.state === 'queued' || j.state === 'running');
    }, 60_000);
  }

  async function outputSha256(job: JobJson): Promise<string> {
    const res = await svc.request(`/v1/jobs/${job.id}/output`, auth);
    expect(res.status).toBe(200);
    const hash = createHash('sha256');
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) hash.update(chunk);
    return hash.digest('hex');
  }

  const partObjects = (id: string): Promise<string[]> => objectKeys(client, bucket, `${PREFIX}input/${id}.parts/`);
  const mark = async (id: string): Promise<Record<string, unknown> | undefined> => {
    const raw = await redis.get(`diskconv:${svc.queueName}:upstream:${id}`);
    return raw === null ? undefined : (JSON.parse(raw) as Record<string, unknown>);
  };

  it('the job converts while half the body is still with the client, from part objects; identical to qemu-img; the staged object committed, no part object left', async () => {
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs?filename=disk.qcow2`, image);
    await upload.send(Math.floor(image.length / 2));
    const listed = await theJob();
    const converting = await svc
      .waitForJob(listed.id, (j) => j.state === 'running' && j.progress.phase === 'converting' && (j.progress.bytes_done ?? 0) > 0, { ...auth, timeoutMs: 90_000 })
      .catch(async (e) => {
        console.log(JSON.stringify(await svc.getJob(listed.id, TOKEN)), svc.logs().slice(-6000));
        throw e;
      });
    expect(converting.source.sha256).toBeUndefined();
    // What the worker reads: the parts' own objects (the multipart upload's parts cannot be read yet), announced in the mark.
    expect((await partObjects(listed.id)).length).toBeGreaterThan(0);
    expect(await objectKeys(client, bucket, `${PREFIX}input/${listed.id}`)).not.toContain(`${PREFIX}input/${listed.id}`);
    expect((await mark(listed.id))?.parts).toMatchObject({ bytes: 8 * MiB });

    const answer = await upload.end();
    expect(answer.status, answer.body).toBe(202);
    const created = JSON.parse(answer.body) as JobJson;
    expect(created.id).toBe(listed.id);
    expect(created.source.sha256).toBe(imageSha);
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.source.sha256).toBe(imageSha);
    expect(done.source.size).toBe(image.length);
    expect(await outputSha256(done)).toBe(rawSha);
    // The staged object was completed (CompleteMultipartUpload) before the job succeeded: the mark says committed.
    expect(await mark(listed.id)).toMatchObject({ state: 'committed', size: image.length, sha256: imageSha });
    await waitFor('the part objects and the staged input to go', async () => (await partObjects(listed.id)).length === 0 && (await uploadsInProgress(client, bucket, `${PREFIX}input/`)).length === 0, 30_000);
  }, 180_000);

  it('a client that drops mid-body fails the job with INCOMPLETE_BODY and leaves no part object', async () => {
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, image);
    await upload.send(Math.floor(image.length / 2));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.state === 'running' && j.progress.phase === 'converting', { ...auth, timeoutMs: 90_000 });
    expect((await partObjects(listed.id)).length).toBeGreaterThan(0);
    upload.abort();
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('INCOMPLETE_BODY');
    expect(done.output).toBeNull();
    await waitFor('the part objects and the multipart upload to go', async () => (await partObjects(listed.id)).length === 0 && (await uploadsInProgress(client, bucket, `${PREFIX}input/`)).length === 0, 30_000);
    expect(await objectKeys(client, bucket, `${PREFIX}input/`)).toEqual([]);
  }, 180_000);

  it('a client that stalls with bytes still owed: the upload times out, the following job fails UPLOAD_TIMEOUT, nothing left', async () => {
    const port = await freePort();
    const quick = spawnDiskconv('api-quick-idle', 'serve', svc.env({ PORT: String(port), UPLOAD_IDLE_TIMEOUT_MS: '1500' }));
    svc.processes.push(quick);
    const url = `http://127.0.0.1:${port}`;
    await waitFor('the quick-idle API', async () => (await fetch(`${url}/readyz`).catch(() => undefined))?.status === 200, 20_000);
    const upload = pacedUpload(`${url}/v1/jobs`, image);
    await upload.send(Math.floor(image.length / 2));
    const listed = await theJob();
    // Nothing more is sent: the API drops the body after its idle bound.
    const done = await svc.waitForFinal(listed.id, { ...auth, timeoutMs: 90_000 });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('UPLOAD_TIMEOUT');
    upload.abort();
    await waitFor('the part objects and the multipart upload to go', async () => (await partObjects(listed.id)).length === 0 && (await uploadsInProgress(client, bucket, `${PREFIX}input/`)).length === 0, 30_000);
    await quick.stop('SIGTERM');
  }, 180_000);

  it('an API that dies mid-body: its lease lapses, the following job fails INCOMPLETE_BODY, and nothing of the upload stays in the bucket', async () => {
    const port = await freePort();
    const doomed = spawnDiskconv('api-doomed', 'serve', svc.env({ PORT: String(port) }));
    svc.processes.push(doomed);
    const url = `http://127.0.0.1:${port}`;
    await waitFor('the second API', async () => (await fetch(`${url}/readyz`).catch(() => undefined))?.status === 200, 20_000);
    const upload = pacedUpload(`${url}/v1/jobs`, image);
    await upload.send(Math.floor(image.length / 2));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.state === 'running' && j.progress.phase === 'converting', { ...auth, timeoutMs: 90_000 });
    await doomed.stop('SIGKILL');
    upload.abort();
    const done = await svc.waitForFinal(listed.id, { ...auth, timeoutMs: 120_000 });
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('INCOMPLETE_BODY');
    expect(done.error?.message).toMatch(/went away/);
    await waitFor('the part objects and the multipart upload to go', async () => (await partObjects(listed.id)).length === 0 && (await uploadsInProgress(client, bucket, `${PREFIX}input/`)).length === 0, 60_000);
  }, 240_000);

  // Last: it kills the worker.
  it('a worker killed while it follows: another picks the job up, follows the rest, and it converts identically', async () => {
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, image);
    await upload.send(Math.floor(image.length * 0.4));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.state === 'running' && j.progress.phase === 'converting', { ...auth, timeoutMs: 90_000 });
    const worker = svc.processes.find((p) => p.name.startsWith('worker'));
    expect(worker).toBeDefined();
    await worker?.stop('SIGKILL');
    await svc.startWorker({ DATA_DIR: join(dir, 'worker-data-2') });
    // The new worker's attempt follows the parts while the rest is still held back.
    await svc.waitForJob(listed.id, (j) => j.attempts >= 2 && j.state === 'running' && j.progress.phase === 'converting', { ...auth, timeoutMs: 90_000 });
    expect((await mark(listed.id))?.state).toBe('receiving');
    const answer = await upload.end();
    expect(answer.status, answer.body).toBe(202);
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.source.sha256).toBe(imageSha);
    expect(await outputSha256(done)).toBe(rawSha);
    await waitFor('the part objects to go', async () => (await partObjects(listed.id)).length === 0, 30_000);
  }, 180_000);
});
