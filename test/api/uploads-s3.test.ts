/**
 * tus uploads straight into the bucket (STORE_URL=s3://..., the shared test
 * Ceph's RGW), as real processes: an upload cut off mid-way (tus-js-client,
 * SIGKILL) is resumed from another process through another API, and converts
 * to what qemu-img writes; the multipart upload lives under the job's staging
 * key from the first byte (no copy at the end); the API's DATA_DIR never holds
 * a byte of it; a checksummed PATCH that does not match leaves nothing;
 * a gzip'd image is staged unwrapped; an expired upload's multipart upload is aborted.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdir, readFile, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { gzipSync } from 'node:zlib';
import type { S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/cli/redis-server.js';
import { cephAvailable, useCeph, type CephEnv } from '../helpers/ceph.js';
import { makeTempDir, qemuImg, qemuRawSha256, seededBytes } from '../helpers/qemu.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { ServiceHarness, spawnDiskconv, waitFor, type JobJson } from '../helpers/service.js';
import { tusCreate, tusHead, tusPatch, tusUpload } from '../helpers/tus.js';

const TOKEN = 'tus-s3-token-aaaaaaaaaaaaaaaaaaaa';
const CLIENT = resolve('test/helpers/tus-client.mjs');
const MiB = 2 ** 20;
const PREFIX = 'svc/';

interface ClientEvent {
  event: string;
  [k: string]: unknown;
}

function runClient(args: string[]): Promise<{ events: ClientEvent[]; signal: string | null }> {
  return new Promise((done) => {
    const child = execFile(process.execPath, [CLIENT, ...args], { maxBuffer: 4 * MiB }, (_err, stdout) => {
      done({ events: stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as ClientEvent), signal: child.signalCode });
    });
  });
}

/** Every regular file under `dir` with its size (the API's DATA_DIR must hold no upload bytes). */
async function filesUnder(dir: string): Promise<{ path: string; size: number }[]> {
  const out: { path: string; size: number }[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const path = join(entry.parentPath, entry.name);
    out.push({ path, size: (await stat(path)).size });
  }
  return out;
}

describe.skipIf(!cephAvailable)('tus uploads into S3 (Ceph RGW)', () => {
  let env: CephEnv;
  let client: S3Client;
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let secondApi = '';
  let secondProc: ReturnType<typeof spawnDiskconv>;
  let image = '';
  let imageBytes: Buffer;
  let rawSha = '';
  const bucket = uniqueBucket('tus');

  beforeAll(async () => {
    env = await useCeph();
    client = testS3Client(env);
    await createBucket(client, bucket);
    ({ dir, cleanup } = await makeTempDir('diskconv-tus-s3-'));
    // 20 MiB of incompressible data: a qcow2 of three 8 MiB parts' worth, the last one short.
    await import('node:fs/promises').then((fs) => fs.writeFile(join(dir, 'base.raw'), seededBytes(20 * MiB, 77)));
    image = join(dir, 'disk.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), image);
    imageBytes = await readFile(image);
    rawSha = await qemuRawSha256(image, dir);
    svc = await ServiceHarness.create('tus-s3', { ...s3Env(env, bucket, PREFIX), API_TOKENS: TOKEN, UPLOAD_TTL_SECONDS: '3600' });
    await svc.startApi();
    await svc.startWorker({ DATA_DIR: join(dir, 'worker-data') });
    // A second API process on the same Redis and bucket (its own port), as behind a balancer.
    const port = await freePort();
    secondProc = spawnDiskconv('api-2', 'serve', svc.env({ PORT: String(port) }));
    svc.processes.push(secondProc);
    secondApi = `http://127.0.0.1:${port}`;
    await waitFor('the second API', async () => (await fetch(`${secondApi}/readyz`).catch(() => undefined))?.status === 200, 20_000);
  });
  afterAll(async () => {
    await svc?.close();
    if (client) await removeBucket(client, bucket).catch(() => {});
    await cleanup?.();
  });

  it('an upload cut off mid-way is resumed from another process through another API, into the bucket only, and converts', async () => {
    expect(imageBytes.length).toBeGreaterThan(20 * MiB);
    const meta = JSON.stringify({ filename: 'disk.qcow2', source_format: 'qcow2' });
    // 3 MiB PATCHes, killed after four: 12 MiB sent, one 8 MiB part and a 4 MiB tail in the bucket.
    const first = await runClient(['start', `${svc.apiUrl}/v1/uploads`, image, TOKEN, String(3 * MiB), '4', meta]);
    expect(first.signal).toBe('SIGKILL');
    const url = first.events.find((e) => e.event === 'url')?.url as string;
    expect(url).toMatch(/\/v1\/uploads\/[0-9a-f]{32}$/);
    const id = url.split('/').pop() as string;

    const head = await tusHead(url, TOKEN);
    expect(head.status).toBe(200);
    const offset = Number(head.headers.get('upload-offset'));
    expect(offset).toBeGreaterThanOrEqual(12 * MiB);
    expect(offset).toBeLessThan(imageBytes.length);

    // The bytes are in the bucket: a multipart upload under a staging key, and the tail past its last whole part.
    const inProgress = await uploadsInProgress(client, bucket, PREFIX);
    expect(inProgress).toHaveLength(1);
    expect(inProgress[0]).toMatch(new RegExp(`^${PREFIX}input/[\\w-]{22}$`));
    const tails = await objectKeys(client, bucket, `${PREFIX}tus/`);
    expect(tails).toHaveLength(offset % (8 * MiB) === 0 ? 0 : 1);
    for (const t of tails) expect(t.startsWith(`${PREFIX}tus/${id}.tail.`)).toBe(true);
    // ... and none on the API host: no upload folder, no file with a byte in it.
    expect(await readdir(svc.dataDir)).not.toContain('uploads');
    expect((await filesUnder(svc.dataDir)).filter((f) => f.size > 0)).toEqual([]);

    // Resumed by another process, through the other API (which never saw a byte of it: it reads the object back for the sha256).
    const resumeUrl = `${secondApi}${new URL(url).pathname}`;
    const second = await runClient(['resume', resumeUrl, image, TOKEN, String(3 * MiB)]);
    expect(second.events.find((e) => e.event === 'error'), JSON.stringify(second.events)).toBeUndefined();
    const resumedAt = second.events.find((e) => e.event === 'head')?.offset as number;
    expect(resumedAt).toBe(offset);
    expect((second.events.find((e) => e.event === 'patch') as ClientEvent).offset).toBe(resumedAt);
    expect(second.events.some((e) => e.event === 'success')).toBe(true);
    const jobPath = second.events.find((e) => e.event === 'job')?.job as string;
    expect(jobPath).toMatch(/^\/v1\/jobs\/[\w-]{22}$/);
    const jobId = jobPath.split('/').pop() as string;
    // The upload was written under this job's staging key from its first byte: its completion is the staged input.
    expect(inProgress[0]).toBe(`${PREFIX}input/${jobId}`);
    // API 2 never saw the first bytes: it read the object back once for the sha256.
    expect(secondProc.output()).toContain('sha256 of a tus upload read back from the bucket');

    const job = await svc.waitForFinal(jobId, { token: TOKEN });
    expect(job.state).toBe('succeeded');
    expect(job.source.filename).toBe('disk.qcow2');
    expect(job.source.sha256).toBe(createHash('sha256').update(imageBytes).digest('hex'));
    expect(job.output?.sha256).toBe(rawSha);

    // Exactly once, asked on either API; nothing left in progress, no tail, no input once converted.
    for (const base of [svc.apiUrl, secondApi]) {
      const again = await tusHead(`${base}${new URL(url).pathname}`, TOKEN);
      expect(again.headers.get('upload-offset')).toBe(String(imageBytes.length));
      expect(again.headers.get('diskconv-job')).toBe(jobPath);
    }
    expect(await uploadsInProgress(client, bucket, PREFIX)).toEqual([]);
    expect(await objectKeys(client, bucket, `${PREFIX}tus/`)).toEqual([]);
    await waitFor('the staged input to go', async () => (await objectKeys(client, bucket, `${PREFIX}input/`)).length === 0, 20_000, 200);
    expect((await filesUnder(svc.dataDir)).filter((f) => f.size > 0)).toEqual([]);
  });

  it('an upload through one API keeps its sha256 as the parts arrive, and a checksummed PATCH that does not match leaves nothing', async () => {
    const bytes = seededBytes(10 * MiB + 3 * 512, 5);
    const created = await tusCreate(svc.apiUrl, TOKEN, bytes.length, { filename: 'plain.raw', source_format: 'raw' });
    expect(created.status).toBe(201);
    const url = new URL(created.headers.get('location') as string, svc.apiUrl).toString();
    const first = await tusPatch(url, TOKEN, 0, bytes.subarray(0, 6 * MiB), true);
    expect(first.status).toBe(204);
    expect(first.headers.get('upload-offset')).toBe(String(6 * MiB));
    // The rest with a checksum of other bytes: 460, and the offset stays (no part, no tail of it committed).
    const rest = bytes.subarray(6 * MiB);
    const wrong = Buffer.from(rest);
    wrong[0] = (wrong[0] as number) ^ 0xff;
    const refused = await fetch(url, {
      method: 'PATCH',
      headers: {
        'tus-resumable': '1.0.0',
        authorization: `Bearer ${TOKEN}`,
        'upload-offset': String(6 * MiB),
        'content-type': 'application/offset+octet-stream',
        'upload-checksum': `sha256 ${createHash('sha256').update(wrong).digest('base64')}`,
      },
      body: rest,
    });
    expect(refused.status).toBe(460);
    expect((await tusHead(url, TOKEN)).headers.get('upload-offset')).toBe(String(6 * MiB));
    const tails = await objectKeys(client, bucket, `${PREFIX}tus/`);
    expect(tails).toHaveLength(1); // the first PATCH's 6 MiB, still the only tail
    const last = await tusPatch(url, TOKEN, 6 * MiB, rest, true);
    expect(last.status).toBe(204);
    const jobPath = last.headers.get('diskconv-job') as string;
    const job = await svc.waitForFinal(jobPath.split('/').pop() as string, { token: TOKEN });
    expect(job.state).toBe('succeeded');
    const sha = createHash('sha256').update(bytes).digest('hex');
    expect(job.source.sha256).toBe(sha);
    expect(job.output?.sha256).toBe(sha); // raw in, the same raw out
    // Every byte came through this API: its sha256 came from the hash kept as the parts arrived, with no read back.
    expect(svc.processes.find((p) => p.name === 'api')?.output()).not.toContain('read back from the bucket');
    expect(await objectKeys(client, bucket, `${PREFIX}tus/`)).toEqual([]);
  });

  it('a gzip-wrapped image uploaded with tus is staged unwrapped and converts', async () => {
    const gz = gzipSync(imageBytes, { level: 1 });
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, gz, { filename: 'disk.qcow2.gz' }, { chunk: 9 * MiB });
    const job = (await svc.waitForFinal(jobId, { token: TOKEN })) as JobJson & { source: { wrapper?: string } };
    expect(job.state).toBe('succeeded');
    expect(job.source.sha256).toBe(createHash('sha256').update(gz).digest('hex'));
    expect(job.source.wrapper).toBe('gzip');
    expect(job.output?.sha256).toBe(rawSha);
  });

  it('concurrent PATCHes for one upload through both APIs (the shared Redis lock) leave exact bytes and the right sha256', async () => {
    const bytes = seededBytes(18 * MiB + 7 * 512, 9);
    const created = await tusCreate(svc.apiUrl, TOKEN, bytes.length, { filename: 'raced.raw', source_format: 'raw' });
    expect(created.status).toBe(201);
    const path = created.headers.get('location') as string;
    const chunk = 3 * MiB;
    // Each client sends the chunk at the offset HEAD reports, through its own API, until the upload is complete.
    const sender = async (base: string): Promise<number> => {
      let writes = 0;
      for (let round = 0; round < 200; round++) {
        const head = await tusHead(`${base}${path}`, TOKEN);
        if (head.status !== 200) throw new Error(`HEAD ${head.status}`);
        const offset = Number(head.headers.get('upload-offset'));
        if (offset >= bytes.length) return writes;
        const res = await tusPatch(`${base}${path}`, TOKEN, offset, bytes.subarray(offset, Math.min(bytes.length, offset + chunk)));
        if (res.status === 204) writes++;
        else if (![409, 400, 500].includes(res.status)) throw new Error(`PATCH ${res.status} ${await res.text()}`);
      }
      throw new Error('the upload did not complete in 200 rounds');
    };
    const [w1, w2] = await Promise.all([sender(svc.apiUrl), sender(secondApi)]);
    expect(w1 + w2).toBeGreaterThanOrEqual(Math.ceil(bytes.length / chunk));
    const head = await tusHead(`${svc.apiUrl}${path}`, TOKEN);
    const jobId = (head.headers.get('diskconv-job') as string).split('/').pop() as string;
    const job = await svc.waitForFinal(jobId, { token: TOKEN });
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.source.size).toBe(bytes.length);
    const sha = createHash('sha256').update(bytes).digest('hex');
    expect(job.source.sha256).toBe(sha);
    expect(job.output?.sha256).toBe(sha);
    expect(await uploadsInProgress(client, bucket, PREFIX)).toEqual([]);
  });

  it('an unfinished upload expires: its multipart upload is aborted and its tail removed', async () => {
    // Last: its own API with UPLOAD_TTL_SECONDS=2 on the same Redis and bucket.
    const port = await freePort();
    svc.processes.push(spawnDiskconv('api-short-ttl', 'serve', svc.env({ PORT: String(port), UPLOAD_TTL_SECONDS: '2' })));
    const base = `http://127.0.0.1:${port}`;
    await waitFor('the short-TTL API', async () => (await fetch(`${base}/readyz`).catch(() => undefined))?.status === 200, 20_000);
    const created = await tusCreate(base, TOKEN, 20 * MiB, { source_format: 'raw' });
    expect(created.status).toBe(201);
    const url = new URL(created.headers.get('location') as string, base).toString();
    const id = url.split('/').pop() as string;
    const patched = await tusPatch(url, TOKEN, 0, seededBytes(9 * MiB, 3));
    expect(patched.status).toBe(204);
    const inProgress = await uploadsInProgress(client, bucket, `${PREFIX}input/`);
    const tails = await objectKeys(client, bucket, `${PREFIX}tus/${id}.`);
    expect(tails).toHaveLength(1);
    expect(inProgress).toHaveLength(1);
    await waitFor(
      'the expired upload to be aborted',
      async () => (await uploadsInProgress(client, bucket, `${PREFIX}input/`)).length === 0 && (await objectKeys(client, bucket, `${PREFIX}tus/`)).length === 0,
      30_000,
      250,
    );
    expect([404, 410]).toContain((await tusHead(url, TOKEN)).status);
  });
});
