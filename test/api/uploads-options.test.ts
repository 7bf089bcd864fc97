/**
 * tus uploads carry every job option POST /v1/jobs takes (one schema for both,
 * bodies.ts `readOptionFields`; one record builder, job-record.ts), each proven
 * through the tus protocol against real processes: filename and source_format,
 * expected_sha256 (kept, and refused on a mismatch), passphrase (a LUKS qcow2
 * converts; the passphrase is in no file of the data directory while the upload
 * waits, nor in any log line or Redis key once the job is done), callback_url
 * (delivered, signed), an RBD output target (real Ceph), glance (real Glance).
 * Bad options are refused at creation, before a byte is sent.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cephAvailable, cephCli, removeRbdImages, useCeph, type CephEnv } from '../helpers/ceph.js';
import { glanceApi, haveGlance, useGlance, type TestGlance } from '../helpers/glance.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';
import { startReceiver } from '../helpers/webhook-receiver.js';
import { tusCreate, tusHead, tusPatch, tusUpload, TusRefused } from '../helpers/tus.js';

const TOKEN = 'tus-options-token-0123456789abcdef';
const SECRET = 'tus-options-webhook-secret-0123456789abcdef';
const PASSPHRASE = 'tus secret \u00e9 5d1a';
const MiB = 2 ** 20;

function runAllowingFailure(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * MiB }, (err, _stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stderr }));
  });
}

async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []);
  return entries.filter((e) => e.isFile()).map((e) => join(e.parentPath ?? (e as unknown as { path: string }).path, e.name));
}



type RichJob = JobJson & { output: (JobJson['output'] & Record<string, unknown>) | null; expected_sha256?: string; destination?: unknown; glance?: unknown };

describe('tus uploads carry the job options', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let redis: Redis;
  let ceph: CephEnv | undefined;
  let glance: TestGlance | undefined;
  const rbdNames: string[] = [];
  let qcow2: Buffer;
  let qcow2Raw = '';
  let luks: Buffer;
  let luksRaw = '';
  let rawMd5 = '';
  let rawSha512 = '';

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-tus-options-'));
    const base = join(dir, 'base.raw');
    await writeRaw(base, 6 * MiB, 41);
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', base, join(dir, 'disk.qcow2'));
    qcow2 = await readFile(join(dir, 'disk.qcow2'));
    qcow2Raw = await qemuRawSha256(join(dir, 'disk.qcow2'), dir);
    const rawBytes = await readFile(base);
    rawMd5 = createHash('md5').update(rawBytes).digest('hex');
    rawSha512 = createHash('sha512').update(rawBytes).digest('hex');

    await writeFile(join(dir, 'plain.raw'), mixedContent(4 * MiB + 4096, 23));
    const secret = ['--object', `secret,id=sec0,data=${PASSPHRASE}`];
    let made = { code: 1, stderr: '' };
    // qemu-img times its PBKDF2 and can fail to on a loaded machine: retry (as test/e2e/encrypted.test.ts does).
    for (let attempt = 0; attempt < 6 && made.code !== 0; attempt++) {
      if (attempt > 0) await new Promise((done) => setTimeout(done, 250 * attempt));
      made = await runAllowingFailure('qemu-img', ['convert', ...secret, '-f', 'raw', '-O', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', join(dir, 'plain.raw'), join(dir, 'luks.qcow2')]);
    }
    expect(made.code, made.stderr).toBe(0);
    luks = await readFile(join(dir, 'luks.qcow2'));
    await qemuImg('convert', ...secret, '--image-opts', `driver=qcow2,file.filename=${join(dir, 'luks.qcow2')},encrypt.key-secret=sec0`, '-O', 'raw', join(dir, 'luks.ref'));
    luksRaw = await sha256File(join(dir, 'luks.ref'));

    const env: Record<string, string> = {
      API_TOKENS: TOKEN,
      UPLOAD_TTL_SECONDS: '3600',
      WEBHOOK_SECRET: SECRET,
      WEBHOOK_ALLOW: '127.0.0.1',
      WEBHOOK_BACKOFF_MS: '100',
      LOG_LEVEL: 'debug',
    };
    if (cephAvailable) {
      ceph = await useCeph();
      Object.assign(env, { RBD_POOLS: 'rbd', CEPH_CONF: ceph.CEPH_CONF, CEPH_ARGS: ceph.CEPH_ARGS });
    }
    if (haveGlance) {
      glance = await useGlance();
      Object.assign(env, { GLANCE_URL: glance.url, GLANCE_TOKEN: glance.token, GLANCE_STORE: 'fs', GLANCE_PUBLISH_BACKOFF_MS: '200' });
    }
    svc = await ServiceHarness.create('tus-options', env);
    redis = new Redis(svc.redis.url, { maxRetriesPerRequest: 1 });
    await svc.startApi();
    await svc.startWorker();
  });

  afterAll(async () => {
    redis?.disconnect();
    await svc?.close();
    if (ceph) await removeRbdImages(ceph, rbdNames);
    await cleanup?.();
  });

  const final = async (jobId: string): Promise<RichJob> => (await svc.waitForFinal(jobId, { token: TOKEN, timeoutMs: 180_000 })) as RichJob;

  it('filename and source_format go into the job (and tus-js-client\'s filetype is ignored)', async () => {
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, qcow2, { filename: 'dir/disk.qcow2', filetype: 'application/octet-stream', source_format: 'qcow2' });
    const job = await final(jobId);
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.source_format).toBe('qcow2');
    expect(job.source.filename).toBe('disk.qcow2');
    expect(job.output?.sha256).toBe(qcow2Raw);
    // A declared format the bytes do not have is the job's error, as for POST /v1/jobs.
    const wrong = await tusUpload(svc.apiUrl, TOKEN, qcow2, { source_format: 'vdi' });
    expect((await final(wrong.jobId)).error?.code).toBe('FORMAT_MISMATCH');
  });

  it('expected_sha256: kept in the job when it matches; a mismatch refuses the final PATCH and makes no job', async () => {
    const sha = createHash('sha256').update(qcow2).digest('hex');
    const ok = await tusUpload(svc.apiUrl, TOKEN, qcow2, { expected_sha256: sha.toUpperCase() });
    const job = await final(ok.jobId);
    expect(job.state).toBe('succeeded');
    expect(job.expected_sha256).toBe(sha);

    const before = ((await (await svc.request('/v1/jobs?limit=100', { token: TOKEN })).json()) as { jobs: JobJson[] }).jobs.length;
    const refused = await tusUpload(svc.apiUrl, TOKEN, qcow2, { expected_sha256: '0'.repeat(64) }).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(refused).toBeInstanceOf(TusRefused);
    expect((refused as TusRefused).status).toBe(422);
    expect((refused as TusRefused).json()).toMatchObject({ code: 'CHECKSUM_MISMATCH' });
    const after = ((await (await svc.request('/v1/jobs?limit=100', { token: TOKEN })).json()) as { jobs: JobJson[] }).jobs.length;
    expect(after).toBe(before);
  });

  it('passphrase: a LUKS qcow2 converts; the passphrase never reaches the upload\'s stored metadata, a log line or Redis', async () => {
    let waiting: string[] = [];
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, luks, { filename: 'luks.qcow2', passphrase: PASSPHRASE }, {
      chunk: 1 * MiB,
      // While the upload waits for its last chunk, the tus store's files hold its metadata: look there.
      beforeLast: async () => {
        waiting = await filesUnder(svc.dataDir);
        for (const file of waiting) expect((await readFile(file)).includes(Buffer.from(PASSPHRASE)), file).toBe(false);
      },
    });
    expect(waiting.some((f) => f.includes(`${join(svc.dataDir, 'uploads')}/`))).toBe(true);
    const job = await final(jobId);
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.output?.sha256).toBe(luksRaw);
    expect(JSON.stringify(job)).not.toContain(PASSPHRASE);
    // A wrong one is the job's WRONG_PASSPHRASE.
    const wrong = await tusUpload(svc.apiUrl, TOKEN, luks, { passphrase: 'not the passphrase' });
    expect((await final(wrong.jobId)).error?.code).toBe('WRONG_PASSPHRASE');
    // Gone everywhere once the jobs are done.
    expect(await redis.exists(`diskconv:${svc.queueName}:secret:${jobId}`, `diskconv:${svc.queueName}:secret:${wrong.jobId}`)).toBe(0);
    for (const key of await redis.keys('*')) {
      const type = await redis.type(key);
      const text = type === 'string' ? await redis.get(key) : type === 'hash' ? JSON.stringify(await redis.hgetall(key)) : '';
      expect(text ?? '', key).not.toContain(PASSPHRASE);
    }
    expect(svc.logs()).not.toContain(PASSPHRASE);
    expect(svc.logs()).not.toContain('not the passphrase');
    for (const file of await filesUnder(svc.dataDir)) expect((await readFile(file)).includes(Buffer.from(PASSPHRASE)), file).toBe(false);
  });

  it('callback_url: the finished job is POSTed, signed', async () => {
    const receiver = await startReceiver(SECRET);
    try {
      const { jobId } = await tusUpload(svc.apiUrl, TOKEN, qcow2, { callback_url: receiver.url });
      const job = await waitFor('the callback', async () => {
        const j = (await svc.getJob(jobId, TOKEN)) as RichJob;
        const cb = j.callback as { state: string } | undefined;
        return cb && cb.state !== 'pending' ? j : undefined;
      }, 60_000, 100);
      expect(job.callback).toEqual({ state: 'delivered', attempts: 1, last_status: 200, last_error: null });
      expect(receiver.deliveries).toHaveLength(1);
      expect(receiver.deliveries[0]?.verified).toBe(true);
      expect(JSON.parse(receiver.deliveries[0]?.body ?? '{}')).toMatchObject({ id: jobId, state: 'succeeded', output: { sha256: qcow2Raw } });
    } finally {
      await receiver.close();
    }
  });

  it('refuses bad options when the upload is created, before a byte is sent', async () => {
    const cases: Array<[Record<string, string | null>, number, string, RegExp?]> = [
      [{ colour: 'blue' }, 400, 'VALIDATION_FAILED', /colour/],
      [{ tenant: 'someone-else' }, 400, 'VALIDATION_FAILED', /tenant/],
      [{ job: 'AAAAAAAAAAAAAAAAAAAAAA' }, 400, 'VALIDATION_FAILED', /job/],
      [{ source_format: 'iso' }, 400, 'VALIDATION_FAILED'],
      [{ expected_sha256: 'abc' }, 400, 'VALIDATION_FAILED'],
      [{ passphrase: '' }, 400, 'VALIDATION_FAILED'],
      [{ glance: '{not json' }, 400, 'VALIDATION_FAILED', /glance/],
      [{ glance: JSON.stringify({ name: 'x', checksum: 'y' }) }, 400, 'VALIDATION_FAILED'],
      [{ glance: JSON.stringify({ properties: { os_hash_value: 'x' } }) }, 400, 'VALIDATION_FAILED', /Glance sets itself/],
      [{ rbd_pool: 'rbd' }, 400, 'VALIDATION_FAILED', /output_target=rbd/],
      [{ output_target: 'rbd' }, 400, 'VALIDATION_FAILED', /pool/],
      [{ output_target: 'rbd', rbd_pool: 'not-allowed' }, 422, 'DESTINATION_REFUSED'],
      [{ callback_url: 'http://169.254.169.254/' }, 422, 'URL_REFUSED'],
    ];
    for (const [metadata, status, code, detail] of cases) {
      const res = await tusCreate(svc.apiUrl, TOKEN, 1000, metadata);
      const body = await res.text();
      expect(res.status, `${JSON.stringify(metadata)}: ${body}`).toBe(status);
      expect(JSON.parse(body), JSON.stringify(metadata)).toMatchObject({ code });
      if (detail) expect(JSON.parse(body).detail).toMatch(detail);
    }
    expect(await readdir(join(svc.dataDir, 'uploads'))).toEqual([]);
  });

  it.skipIf(!cephAvailable)('output_target=rbd: the image and its protected snapshot in the allowed pool', async () => {
    const n = `tus-${process.pid}-${Math.random().toString(36).slice(2, 6)}`;
    rbdNames.push(n);
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, qcow2, { output_target: 'rbd', rbd_pool: 'rbd', rbd_image: n });
    const job = await final(jobId);
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.destination).toEqual({ target: 'rbd', pool: 'rbd', image: n });
    expect(job.output).toMatchObject({ target: 'rbd', pool: 'rbd', image: n, snapshot: 'snap', sha256: qcow2Raw, location: `rbd://${ceph?.CEPH_FSID}/rbd/${n}/snap` });
    const out = join(dir, `${n}.raw`);
    await cephCli(ceph as CephEnv, 'rbd', ['export', '--no-progress', `rbd/${n}@snap`, out]);
    expect(await sha256File(out)).toBe(qcow2Raw);
    // Without rbd_image the image is named after the job, as for POST /v1/jobs.
    const unnamed = await tusUpload(svc.apiUrl, TOKEN, qcow2, { output_target: 'rbd', rbd_pool: 'rbd' });
    rbdNames.push(unnamed.jobId);
    const second = await final(unnamed.jobId);
    expect(second.state, JSON.stringify(second.error)).toBe('succeeded');
    expect(second.destination).toEqual({ target: 'rbd', pool: 'rbd', image: unnamed.jobId });
  });

  it.skipIf(!haveGlance)('glance: the output is published, an active image with our name and hashes', async () => {
    const name = `diskconv-tus-${process.pid}`;
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, qcow2, { glance: JSON.stringify({ name, visibility: 'private', min_disk: 1, properties: { os_distro: 'debian' } }) });
    const job = await final(jobId);
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.glance).toMatchObject({ name, visibility: 'private' });
    expect(job.output).toMatchObject({ sha256: qcow2Raw, md5: rawMd5, sha512: rawSha512 });
    const g = job.output?.glance as Record<string, unknown>;
    expect(g).toMatchObject({ status: 'active', checksum: rawMd5, os_hash_value: rawSha512 });
    const { status, body } = await glanceApi(glance as TestGlance, `/v2/images/${String(g.image_id)}`);
    expect(status).toBe(200);
    expect(body).toMatchObject({ name, visibility: 'private', min_disk: 1, os_distro: 'debian', status: 'active', checksum: rawMd5 });
  });

  it('a gzip-wrapped image is unwrapped on its way into staging, as a POST /v1/jobs body is', async () => {
    const { jobId } = await tusUpload(svc.apiUrl, TOKEN, gzipSync(qcow2), { filename: 'disk.qcow2.gz' });
    const job = await final(jobId);
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.source).toMatchObject({ wrapper: 'gzip', unwrapped_size: qcow2.length, sha256: createHash('sha256').update(gzipSync(qcow2)).digest('hex') });
    expect(job.output?.sha256).toBe(qcow2Raw);
  });

  it('a completed upload answers HEAD with its job, and another PATCH does not make a second one', async () => {
    const { url, job } = await tusUpload(svc.apiUrl, TOKEN, qcow2, { source_format: 'qcow2' });
    const head = await tusHead(url, TOKEN);
    expect(head.headers.get('diskconv-job')).toBe(job);
    const again = await tusPatch(url, TOKEN, qcow2.length, new Uint8Array(0));
    expect(again.status).toBe(204);
    expect(again.headers.get('diskconv-job')).toBe(job);
  });
});
