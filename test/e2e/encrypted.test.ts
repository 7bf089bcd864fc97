/**
 * Encrypted qcow2 through the service, real parts only (redis-server, `diskconv
 * serve` and `diskconv worker`, curl): the passphrase comes in a multipart field
 * or the JSON body, lives only in its own Redis key with a TTL until the job
 * ends, never appears in a job record, a log line or the data directory.
 */
import { execFile } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, mixedContent, qemuImg, sha256File } from '../helpers/qemu.js';
import { curl, ServiceHarness, type JobJson } from '../helpers/service.js';
import { startFileServer, type FileServer } from './http-files.js';

const TOKEN = 'e2e-crypt-token-0123456789abcdef';
const AUTH = ['-H', `Authorization: Bearer ${TOKEN}`];
const PASSPHRASE = 'service secret \u00e9 9f3c';

function runAllowingFailure(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * 2 ** 20 }, (err, _stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stderr }));
  });
}

/** All files under dir, recursively. */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []);
  return entries.filter((e) => e.isFile()).map((e) => join(e.parentPath ?? (e as unknown as { path: string }).path, e.name));
}

describe('encrypted qcow2 through the service', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let files: FileServer;
  let redis: Redis;
  const images: Record<string, { path: string; sha256: string }> = {};
  const secretKey = (id: string) => `diskconv:${svc.queueName}:secret:${id}`;

  const upload = async (name: string, passphrase?: string): Promise<JobJson> =>
    JSON.parse(await curl([...AUTH, '-F', `file=@${images[name]?.path}`, ...(passphrase !== undefined ? ['-F', `passphrase=${passphrase}`] : []), `${svc.apiUrl}/v1/jobs`])) as JobJson;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-e2e-crypt-'));
    const raw = join(dir, 'base.raw');
    await writeFile(raw, mixedContent(4 * 2 ** 20 + 4096, 21));
    const secret = ['--object', `secret,id=sec0,data=${PASSPHRASE}`];
    for (const [name, format] of [
      ['luks.qcow2', 'luks'],
      ['aes.qcow2', 'aes'],
    ] as const) {
      const path = join(dir, name);
      // qemu-img times its PBKDF2 and can fail to on a loaded machine: retry (see e285a49).
      let made = { code: 1, stderr: '' };
      for (let attempt = 0; attempt < 6 && made.code !== 0; attempt++) {
        if (attempt > 0) await new Promise((done) => setTimeout(done, 250 * attempt));
        made = await runAllowingFailure('qemu-img', ['convert', ...secret, '-f', 'raw', '-O', 'qcow2', '-o', `encrypt.format=${format},encrypt.key-secret=sec0${format === 'luks' ? ',encrypt.iter-time=10' : ''}`, raw, path]);
      }
      expect(made.code, made.stderr).toBe(0);
      const ref = join(dir, `${name}.ref`);
      await qemuImg('convert', ...secret, '--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`, '-O', 'raw', ref);
      images[name] = { path, sha256: await sha256File(ref) };
    }
    files = await startFileServer(dir);
    svc = await ServiceHarness.create('e2e-crypt', {
      API_TOKENS: TOKEN,
      MAX_UPLOAD_BYTES: '16M',
      ...files.importEnv,
      JOB_ATTEMPTS: '3',
      LOG_LEVEL: 'debug',
    });
    redis = new Redis(svc.redis.url, { maxRetriesPerRequest: 1 });
    await svc.startApi();
  });

  afterAll(async () => {
    redis?.disconnect();
    await svc?.close();
    await files?.close();
    await cleanup?.();
  });

  it('multipart passphrase: kept in its own Redis key with a TTL while queued, then converted and dropped', async () => {
    // No worker yet: the job waits, and its passphrase is where it should be (and nowhere else).
    const created = await upload('luks.qcow2', PASSPHRASE);
    expect(created.state).toBe('queued');
    expect(JSON.stringify(created)).not.toContain(PASSPHRASE);
    expect(await redis.get(secretKey(created.id))).toBe(PASSPHRASE);
    const ttl = await redis.ttl(secretKey(created.id));
    expect(ttl).toBeGreaterThan(0);
    // The job record and the BullMQ job hold no trace of it.
    const keys = await redis.keys(`*${svc.queueName}*`);
    for (const key of keys) {
      if (key === secretKey(created.id)) continue;
      const type = await redis.type(key);
      const dump = type === 'hash' ? JSON.stringify(await redis.hgetall(key)) : type === 'string' ? ((await redis.get(key)) ?? '') : '';
      expect(dump, key).not.toContain(PASSPHRASE);
    }

    await svc.startWorker();
    const done = await svc.waitForFinal(created.id, { token: TOKEN });
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.output?.sha256).toBe(images['luks.qcow2']?.sha256);
    expect(done.source).toMatchObject({ format: 'qcow2', info: { encrypted: true } });
    expect(JSON.stringify(done)).not.toContain(PASSPHRASE);
    expect(await redis.exists(secretKey(created.id))).toBe(0);
  });

  it('JSON body passphrase with a URL import; legacy AES by multipart', async () => {
    const body = JSON.stringify({ source: { url: `${files.url}/range/luks.qcow2` }, passphrase: PASSPHRASE });
    const byUrl = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/jobs`])) as JobJson;
    const aes = await upload('aes.qcow2', PASSPHRASE);
    for (const [job, name] of [
      [byUrl, 'luks.qcow2'],
      [aes, 'aes.qcow2'],
    ] as const) {
      const done = await svc.waitForFinal(job.id, { token: TOKEN });
      expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
      expect(done.output?.sha256).toBe(images[name]?.sha256);
      expect(await redis.exists(secretKey(job.id))).toBe(0);
    }
  });

  it('a wrong passphrase fails the job once with WRONG_PASSPHRASE; none at all is UNSUPPORTED_FEATURE', async () => {
    const wrong = await upload('luks.qcow2', 'not the passphrase');
    const none = await upload('luks.qcow2');
    const failed = await svc.waitForFinal(wrong.id, { token: TOKEN });
    expect(failed.state).toBe('failed');
    expect(failed.error?.code).toBe('WRONG_PASSPHRASE');
    expect(failed.attempts).toBe(1); // deterministic: not retried
    // A terminal phase that says where it stopped (issue 11): the key is checked while probing.
    expect(failed.progress).toMatchObject({ phase: 'failed', ended_in: 'probing' });
    expect(JSON.stringify(failed)).not.toContain('not the passphrase');
    expect(await redis.exists(secretKey(wrong.id))).toBe(0);
    const refused = await svc.waitForFinal(none.id, { token: TOKEN });
    expect(refused.error?.code).toBe('UNSUPPORTED_FEATURE');
    expect(refused.error?.message).toMatch(/a passphrase is needed/);
  });

  it('a passphrase in the query string is refused (query strings are logged)', async () => {
    const res = await curl([
      ...AUTH,
      '-s',
      '-w',
      '\n%{http_code}',
      '--data-binary',
      `@${images['luks.qcow2']?.path}`,
      '-H',
      'Content-Type: application/octet-stream',
      `${svc.apiUrl}/v1/jobs?passphrase=x`,
    ]);
    expect(res.trim().split('\n').pop()).toBe('400');
  });

  it('POST /v1/inspect takes the passphrase (multipart field or JSON body): the info of the unlocked image, never echoed (issue 9)', async () => {
    const inspectUpload = async (passphrase?: string): Promise<Record<string, unknown>> =>
      JSON.parse(
        await curl([...AUTH, '-F', `file=@${images['luks.qcow2']?.path}`, ...(passphrase !== undefined ? ['-F', `passphrase=${passphrase}`] : []), `${svc.apiUrl}/v1/inspect`]),
      ) as Record<string, unknown>;
    const unlocked = await inspectUpload(PASSPHRASE);
    expect(unlocked, JSON.stringify(unlocked)).toMatchObject({ safe: true, format: 'qcow2', virtual_size: 4 * 2 ** 20 + 4096, info: { encrypted: true } });
    expect((unlocked.allocation as { data_bytes: number }).data_bytes).toBeGreaterThan(0);
    expect(JSON.stringify(unlocked)).not.toContain(PASSPHRASE);

    const wrong = await inspectUpload('not the passphrase');
    expect(wrong).toMatchObject({ safe: false, error: { code: 'WRONG_PASSPHRASE' } });
    expect(JSON.stringify(wrong)).not.toContain('not the passphrase');
    const none = await inspectUpload();
    expect(none).toMatchObject({ safe: false, error: { code: 'UNSUPPORTED_FEATURE' } });

    // By URL, with the passphrase in the JSON body.
    const body = JSON.stringify({ source: { url: `${files.url}/range/luks.qcow2` }, passphrase: PASSPHRASE });
    const byUrl = JSON.parse(await curl([...AUTH, '-H', 'Content-Type: application/json', '-d', body, `${svc.apiUrl}/v1/inspect`])) as Record<string, unknown>;
    expect(byUrl, JSON.stringify(byUrl)).toMatchObject({ safe: true, format: 'qcow2', info: { encrypted: true } });
    expect(JSON.stringify(byUrl)).not.toContain(PASSPHRASE);
    // Not in the query string (logged), and nothing kept in Redis for an inspection.
    const query = await curl([...AUTH, '-s', '-o', '/dev/null', '-w', '%{http_code}', '--data-binary', `@${images['luks.qcow2']?.path}`, '-H', 'Content-Type: application/octet-stream', `${svc.apiUrl}/v1/inspect?passphrase=x`]);
    expect(query.trim()).toBe('400');
    for (const key of await redis.keys(`*${svc.queueName}*`)) {
      const type = await redis.type(key);
      const dump = type === 'hash' ? JSON.stringify(await redis.hgetall(key)) : type === 'string' ? ((await redis.get(key)) ?? '') : '';
      expect(dump, key).not.toContain(PASSPHRASE);
    }
  });

  it('the passphrase is in no log line and no file of the data directory', async () => {
    expect(svc.logs()).not.toContain(PASSPHRASE);
    expect(svc.logs()).not.toContain('not the passphrase');
    for (const file of await filesUnder(svc.dataDir)) {
      const bytes = await readFile(file);
      expect(bytes.includes(Buffer.from(PASSPHRASE)), file).toBe(false);
    }
  });
});
