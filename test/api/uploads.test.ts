/**
 * tus resumable uploads at /v1/uploads with real processes: a tus-js-client
 * process is cut off mid-upload (SIGKILL), another process resumes it, and the
 * job converts to exactly what qemu-img writes. Also: exactly one job per upload,
 * the checksum extension, termination, tenants, metadata rules, expiry.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuRawSha256, writeRaw } from '../helpers/qemu.js';
import { freePort } from '../../src/cli/redis-server.js';
import { ServiceHarness, spawnDiskconv, waitFor, type JobJson } from '../helpers/service.js';

const TOKEN_A = 'tus-token-aaaaaaaaaaaaaaaaaaaa';
const TOKEN_B = 'tus-token-bbbbbbbbbbbbbbbbbbbb';
const CLIENT = resolve('test/helpers/tus-client.mjs');
const MiB = 2 ** 20;

interface ClientEvent {
  event: string;
  [k: string]: unknown;
}

function runClient(args: string[]): Promise<{ events: ClientEvent[]; code: number | null; signal: string | null }> {
  return new Promise((done) => {
    const child = execFile(process.execPath, [CLIENT, ...args], { maxBuffer: 4 * MiB }, (_err, stdout) => {
      const events = stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as ClientEvent);
      done({ events, code: child.exitCode, signal: child.signalCode });
    });
  });
}

const tusHeaders = (token: string, extra: Record<string, string> = {}) => ({ 'tus-resumable': '1.0.0', authorization: `Bearer ${token}`, ...extra });
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('tus uploads', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  let image = '';
  let imageBytes: Buffer;
  let rawSha = '';

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-tus-'));
    await writeRaw(join(dir, 'base.raw'), 8 * MiB, 31);
    image = join(dir, 'disk.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), image);
    imageBytes = await readFile(image);
    rawSha = await qemuRawSha256(image, dir);
    svc = await ServiceHarness.create('tus', { API_TOKENS: `${TOKEN_A},${TOKEN_B}`, UPLOAD_TTL_SECONDS: '3600' });
    await svc.startApi();
    await svc.startWorker();
  });
  afterAll(async () => {
    await svc?.close();
    await cleanup?.();
  });

  it('an upload cut off mid-way is resumed by another process and converts exactly once', async () => {
    expect(imageBytes.length).toBeGreaterThan(4 * MiB);
    const endpoint = `${svc.apiUrl}/v1/uploads`;
    const meta = JSON.stringify({ filename: 'disk.qcow2', source_format: 'qcow2' });
    const first = await runClient(['start', endpoint, image, TOKEN_A, String(MiB), '2', meta]);
    expect(first.signal).toBe('SIGKILL');
    const url = first.events.find((e) => e.event === 'url')?.url as string;
    expect(url).toMatch(/\/v1\/uploads\/[0-9a-f]{32}$/);
    expect(first.events.some((e) => e.event === 'success')).toBe(false);
    expect(first.events.filter((e) => e.event === 'chunk')).toHaveLength(2);

    // The server kept what arrived.
    const head = await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_A) });
    expect(head.status).toBe(200);
    const offset = Number(head.headers.get('upload-offset'));
    expect(offset).toBeGreaterThanOrEqual(2 * MiB);
    expect(offset).toBeLessThan(imageBytes.length);
    expect(Number(head.headers.get('upload-length'))).toBe(imageBytes.length);

    const second = await runClient(['resume', url, image, TOKEN_A, String(MiB)]);
    expect(second.events.find((e) => e.event === "error"), JSON.stringify(second.events)).toBeUndefined();
    // The cut-off PATCH may still have been landing bytes when we asked: the resume starts at or after that offset.
    const resumedAt = second.events.find((e) => e.event === 'head')?.offset as number;
    expect(resumedAt).toBeGreaterThanOrEqual(offset);
    expect(resumedAt).toBeLessThan(imageBytes.length);
    expect((second.events.find((e) => e.event === 'patch') as ClientEvent).offset).toBe(resumedAt); // resumed, not restarted
    expect(second.events.some((e) => e.event === 'success')).toBe(true);
    const jobPath = second.events.find((e) => e.event === 'job')?.job as string;
    expect(jobPath).toMatch(/^\/v1\/jobs\/[\w-]{22}$/);

    const id = jobPath.split('/').pop() as string;
    const job = await svc.waitForFinal(id, { token: TOKEN_A });
    expect(job.state).toBe('succeeded');
    expect(job.source.filename).toBe('disk.qcow2');
    expect(job.source.sha256).toBe(createHash('sha256').update(imageBytes).digest('hex'));
    expect(job.output?.sha256).toBe(rawSha);

    // Exactly once: HEAD and a repeated final PATCH name the same job; the tenant has one such job.
    const again = await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_A) });
    expect(again.status).toBe(200);
    expect(again.headers.get('upload-offset')).toBe(String(imageBytes.length));
    expect(again.headers.get('diskconv-job')).toBe(jobPath);
    const patch = await fetch(url, { method: 'PATCH', headers: tusHeaders(TOKEN_A, { 'upload-offset': String(imageBytes.length), 'content-type': 'application/offset+octet-stream' }), body: new Uint8Array(0) });
    expect(patch.status).toBe(204);
    expect(patch.headers.get('diskconv-job')).toBe(jobPath);
    const list = (await (await svc.request('/v1/jobs?limit=100', { token: TOKEN_A })).json()) as { jobs: JobJson[] };
    expect(list.jobs.filter((j) => j.source.sha256 === job.source.sha256)).toHaveLength(1);
    // Another tenant sees nothing of it.
    expect((await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_B) })).status).toBe(404);
    // Each of those was answered once (the completed-upload answer used to fall through to tus, which answered again).
    expect(svc.logs()).not.toMatch(/already sent|FST_ERR_REP_ALREADY_SENT|"level":(50|60)/);
  });

  async function create(token: string, length: number, metadata: Record<string, string> = {}): Promise<Response> {
    const meta = Object.entries(metadata).map(([k, v]) => `${k} ${b64(v)}`).join(',');
    return fetch(`${svc.apiUrl}/v1/uploads`, { method: 'POST', headers: tusHeaders(token, { 'upload-length': String(length), ...(meta ? { 'upload-metadata': meta } : {}) }) });
  }

  it('checksum extension: a PATCH whose Upload-Checksum does not match is refused with 460 and not written', async () => {
    const options = await fetch(`${svc.apiUrl}/v1/uploads`, { method: 'OPTIONS', headers: tusHeaders(TOKEN_A) });
    expect(options.headers.get('tus-extension')?.split(',')).toEqual(expect.arrayContaining(['creation', 'termination', 'checksum', 'expiration']));
    expect(options.headers.get('tus-checksum-algorithm')).toContain('sha256');

    const res = await create(TOKEN_A, 1000, { filename: 'c.raw' });
    expect(res.status).toBe(201);
    const url = new URL(res.headers.get('location') as string, svc.apiUrl).toString();
    const part = Buffer.alloc(400, 7);
    const good = createHash('sha256').update(part).digest('base64');
    const bad = createHash('sha256').update(Buffer.alloc(400, 8)).digest('base64');
    const patch = (checksum: string) =>
      fetch(url, { method: 'PATCH', headers: tusHeaders(TOKEN_A, { 'upload-offset': '0', 'content-type': 'application/offset+octet-stream', 'upload-checksum': checksum }), body: part });
    expect((await patch(`sha256 ${bad}`)).status).toBe(460);
    expect((await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_A) })).headers.get('upload-offset')).toBe('0');
    expect((await patch('crc32 AAAA')).status).toBe(400);
    const ok = await patch(`sha256 ${good}`);
    expect(ok.status).toBe(204);
    expect(ok.headers.get('upload-offset')).toBe('400');
  });

  it('termination, tenants, metadata rules', async () => {
    const res = await create(TOKEN_A, 5000);
    const url = new URL(res.headers.get('location') as string, svc.apiUrl).toString();
    expect((await fetch(url, { method: 'DELETE', headers: tusHeaders(TOKEN_B) })).status).toBe(404);
    expect((await fetch(url, { method: 'HEAD', headers: { 'tus-resumable': '1.0.0' } })).status).toBe(401);
    expect((await fetch(url, { method: 'DELETE', headers: tusHeaders(TOKEN_A) })).status).toBe(204);
    expect([404, 410]).toContain((await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_A) })).status);

    expect((await create(TOKEN_A, 10, { tenant: 'someone-else' })).status).toBe(400);
    expect((await create(TOKEN_A, 10, { source_format: 'iso' })).status).toBe(400);
    const refused = await create(TOKEN_A, 10, { callback_url: 'http://169.254.169.254/' });
    expect(refused.status).toBe(400); // WEBHOOK_SECRET is not set here
    expect(await refused.text()).toContain('WEBHOOK_SECRET');
  });

  it('unfinished uploads are removed after UPLOAD_TTL_SECONDS', async () => {
    // Last, so its short TTL cuts off nothing else: a second API process on the same data with UPLOAD_TTL_SECONDS=2.
    const port = await freePort();
    const short = spawnDiskconv('api-short-ttl', 'serve', svc.env({ PORT: String(port), UPLOAD_TTL_SECONDS: '2' }));
    svc.processes.push(short);
    await waitFor('the second API', async () => (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200, 20_000);
    const res = await create(TOKEN_A, 10_000);
    const url = new URL(res.headers.get('location') as string, svc.apiUrl).toString();
    await fetch(url, { method: 'PATCH', headers: tusHeaders(TOKEN_A, { 'upload-offset': '0', 'content-type': 'application/offset+octet-stream' }), body: Buffer.alloc(100) });
    expect((await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_A) })).status).toBe(200);
    await waitFor('the expired upload to go', async () => [404, 410].includes((await fetch(url, { method: 'HEAD', headers: tusHeaders(TOKEN_A) })).status), 20_000, 250);
  });
});
