/**
 * Conversion that overlaps the upload (src/api/streaming-upload.ts,
 * src/queue/upload-stream.ts), end to end with real parts: redis-server, the
 * API and a worker as separate processes, an HTTP client on 127.0.0.1 that sends
 * the image in chunks and holds back the rest until the test has seen what it
 * wants to see (no timing assertions: the upload waits for the job's progress).
 */
import { createHash } from 'node:crypto';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { request as httpRequest, type ClientRequest } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File, writeRaw } from '../helpers/qemu.js';
import { buildStream } from '../helpers/vmware-stream.js';
import { curl, ServiceHarness, waitFor, type JobJson } from '../helpers/service.js';

const TOKEN = 'overlap-token-0123456789abcdef';
const CHUNK = 256 * 1024;

/** An upload the test paces: `send(upTo)` writes the body up to that byte, `end()` finishes, `abort()` drops the connection. */
interface PacedUpload {
  send(upTo: number): Promise<void>;
  end(): Promise<{ status: number; body: string; headers: Record<string, string | string[] | undefined> }>;
  abort(): void;
  response: Promise<{ status: number; body: string; headers: Record<string, string | string[] | undefined> }>;
}

function pacedUpload(url: string, body: Buffer, declaredLength = body.length, headers: Record<string, string> = {}): PacedUpload {
  let sent = 0;
  const req: ClientRequest = httpRequest(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/octet-stream', 'content-length': String(declaredLength), ...headers },
  });
  const response = new Promise<{ status: number; body: string; headers: Record<string, string | string[] | undefined> }>((resolve, reject) => {
    req.on('response', (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, headers: res.headers }));
      res.on('error', reject);
    });
    req.on('error', reject);
  });
  response.catch(() => {});
  return {
    response,
    async send(upTo) {
      while (sent < Math.min(upTo, body.length)) {
        const end = Math.min(upTo, sent + CHUNK);
        const ok = req.write(body.subarray(sent, end));
        sent = end;
        if (!ok) await new Promise((r) => req.once('drain', r));
        await sleep(2);
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

/** A multipart/form-data body serialized by the platform's own FormData (as a browser's would be), fields in the order given. */
async function formBody(parts: Array<[string, string] | ['file', Buffer, string]>): Promise<{ body: Buffer; headers: Record<string, string> }> {
  const fd = new FormData();
  for (const p of parts) {
    if (p.length === 3) fd.append(p[0], new Blob([p[1]]), p[2]);
    else fd.append(p[0], p[1]);
  }
  const res = new Response(fd);
  return { body: Buffer.from(await res.arrayBuffer()), headers: { 'content-type': res.headers.get('content-type') ?? '' } };
}

describe('conversion while the upload arrives', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let svc: ServiceHarness;
  const images: Record<string, { path: string; sha256: string }> = {};

  const auth = { token: TOKEN };

  /** The one running or queued job of this tenant, once it shows up. */
  async function theJob(): Promise<JobJson> {
    return waitFor('the job to be listed', async () => {
      const res = await svc.request('/v1/jobs?limit=100', auth);
      const { jobs } = (await res.json()) as { jobs: JobJson[] };
      return jobs.find((j) => j.state === 'queued' || j.state === 'running');
    });
  }

  async function outputSha256(job: JobJson): Promise<string> {
    const out = join(dir, `out-${job.id}.raw`);
    await curl(['-H', `Authorization: Bearer ${TOKEN}`, '-o', out, `${svc.apiUrl}${job.output?.href}`]);
    return sha256File(out);
  }

  async function leftovers(id: string): Promise<string[]> {
    const tmp = await readdir(join(svc.dataDir, 'store', 'tmp')).catch(() => [] as string[]);
    const input = await readdir(join(svc.dataDir, 'store', 'input')).catch(() => [] as string[]);
    return [...tmp.filter((n) => n.includes(id)), ...input.filter((n) => n === id)];
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-overlap-'));
    const base = join(dir, 'base.raw');
    await writeRaw(base, 40 * 2 ** 20, 5);
    for (const [name, format, opts] of [
      ['disk.qcow2', 'qcow2', []],
      ['disk.vdi', 'vdi', []],
      ['disk-stream.vmdk', 'vmdk', ['-o', 'subformat=streamOptimized']],
    ] as const) {
      const path = join(dir, name);
      await qemuImg('convert', '-f', 'raw', '-O', format, ...opts, base, path);
      images[name] = { path, sha256: await qemuRawSha256(path, dir) };
    }
    // streamOptimized as VMware writes it (grain directory and tables in the footer): converted by walking its grain
    // markers; and one whose grain 31 marker names the LBA of grain 32 (a zero grain, absent from the stream):
    // qemu follows the grain directory, so the walk must notice and convert again from the directory.
    // Large enough that the reader's first batches (8 MiB of guest data each) lie well inside the first 70 % sent.
    const content = mixedContent(48 * 2 ** 20, 8);
    content.fill(0, 2 * 2 ** 20, 4 * 2 ** 20 + 8192);
    for (const [name, bytes] of [
      ['vmware-stream.vmdk', buildStream(content, 'vmware-stream.vmdk')],
      ['moved-marker.vmdk', buildStream(content, 'moved-marker.vmdk', { editGrain: (g, m) => (g === 31 ? (m.writeBigUInt64LE(32n * 128n, 0), m) : m) })],
    ] as const) {
      const path = join(dir, name);
      await writeFile(path, bytes);
      images[name] = { path, sha256: await qemuRawSha256(path, dir) };
    }
    // Hostile: a qcow2 cut at 60 %, sent as if whole: its tables point past every byte that will arrive.
    const whole = await readFile(images['disk.qcow2']!.path);
    await writeFile(join(dir, 'cut.qcow2'), whole.subarray(0, Math.floor(whole.length * 0.6)));
    svc = await ServiceHarness.create('overlap', { API_TOKENS: TOKEN, MAX_UPLOAD_BYTES: '256M', UPLOAD_IDLE_TIMEOUT_MS: '3000', JOB_ATTEMPTS: '2' });
    await svc.startApi();
    await svc.startWorker();
  }, 120_000);

  afterAll(async () => {
    await svc?.close();
    await cleanup?.();
  });

  for (const name of ['disk.qcow2', 'disk.vdi', 'vmware-stream.vmdk'] as const) {
    it(`${name}: the job converts before the upload's last byte is sent; output identical to qemu-img`, async () => {
      const image = images[name]!;
      const body = await readFile(image.path);
      const upload = pacedUpload(`${svc.apiUrl}/v1/jobs?filename=${name}`, body);
      await upload.send(Math.floor(body.length * 0.7));
      const listed = await theJob();
      // Hold back the last 30 % until the worker has converted some of what arrived.
      const converting = await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting' && j.progress.bytes_done > 0, { ...auth, timeoutMs: 60_000 });
      expect(converting.state).toBe('running');
      expect(converting.source.sha256).toBeUndefined(); // not all bytes are in yet
      const answer = await upload.end();
      expect(answer.status).toBe(202);
      const created = JSON.parse(answer.body) as JobJson;
      expect(created.id).toBe(listed.id);
      expect(created.source.sha256).toBe(createHash('sha256').update(body).digest('hex'));
      const done = await svc.waitForFinal(listed.id, auth);
      expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
      expect(done.source.sha256).toBe(created.source.sha256);
      expect(done.source.size).toBe(body.length);
      expect(await outputSha256(done)).toBe(image.sha256);
      await waitFor('the staged input to go', async () => (await leftovers(listed.id)).length === 0);
    }, 120_000);
  }

  /** Uploads a fixture at the paced rate; the job as it ended, which must be a success. */
  async function convertedPaced(image: { path: string }): Promise<JobJson> {
    const answer = await pacedUpload(`${svc.apiUrl}/v1/jobs`, await readFile(image.path)).end();
    expect(answer.status).toBe(202);
    const done = await svc.waitForFinal((JSON.parse(answer.body) as JobJson).id, auth);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    return done;
  }

  it('streamOptimized vmdk as qemu-img writes it (grain directory at the start, tables filled in at close) converts identically', async () => {
    const image = images['disk-stream.vmdk']!;
    expect(await outputSha256(await convertedPaced(image))).toBe(image.sha256);
  }, 120_000);

  it('a streamOptimized vmdk whose markers disagree with its grain directory is converted again from the directory, identically to qemu-img', async () => {
    const image = images['moved-marker.vmdk']!;
    const done = await convertedPaced(image);
    expect(done.attempts).toBe(1); // converted again within the same attempt, not retried
    expect(await outputSha256(done)).toBe(image.sha256);
    // qemu reads grain 31 where the directory says, whatever its marker claims.
    expect(image.sha256).toBe(images['vmware-stream.vmdk']!.sha256);
    expect(svc.logs()).toContain('the grain markers disagree with the grain directory');
  }, 120_000);

  it('an upload with an Idempotency-Key converts while it arrives; the same key and body again replays that job and makes none', async () => {
    const image = images['disk.qcow2']!;
    const body = await readFile(image.path);
    const key = { 'idempotency-key': `overlap-${Date.now()}-a` };
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs?filename=disk.qcow2`, body, body.length, key);
    await upload.send(Math.floor(body.length * 0.7));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting' && j.progress.bytes_done > 0, { ...auth, timeoutMs: 60_000 });
    const answer = await upload.end();
    expect(answer.status).toBe(202);
    expect((JSON.parse(answer.body) as JobJson).id).toBe(listed.id);
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    const count = async (): Promise<number> => ((await (await svc.request('/v1/jobs?limit=100', auth)).json()) as { jobs: JobJson[] }).jobs.length;
    const before = await count();
    // The retry (the answer was lost, say) sends the same body with the same key: that job, not a second one.
    const again = await pacedUpload(`${svc.apiUrl}/v1/jobs?filename=disk.qcow2`, body, body.length, key).end();
    expect(again.status).toBe(200);
    expect(again.headers['idempotent-replayed']).toBe('true');
    expect((JSON.parse(again.body) as JobJson).id).toBe(listed.id);
    expect(await count()).toBe(before);
    expect(await outputSha256(done)).toBe(image.sha256);
  }, 120_000);

  it('an upload with an Idempotency-Key dropped mid-way leaves no job; the retry with the key makes a new one', async () => {
    const image = images['disk.qcow2']!;
    const body = await readFile(image.path);
    const key = { 'idempotency-key': `overlap-${Date.now()}-b` };
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, body, body.length, key);
    await upload.send(Math.floor(body.length * 0.5));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting', auth);
    upload.abort();
    await waitFor('the dropped upload\'s job to go', async () => (await svc.request(`/v1/jobs/${listed.id}`, auth)).status === 404);
    await waitFor('its partial upload to go', async () => (await leftovers(listed.id)).length === 0);
    const retry = await pacedUpload(`${svc.apiUrl}/v1/jobs`, body, body.length, key).end();
    expect(retry.status).toBe(202);
    const id = (JSON.parse(retry.body) as JobJson).id;
    expect(id).not.toBe(listed.id);
    const done = await svc.waitForFinal(id, auth);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(await outputSha256(done)).toBe(image.sha256);
  }, 120_000);

  it('an upload dropped mid-way fails its converting job clearly, leaves nothing staged, and does not hang', async () => {
    const body = await readFile(images['disk.qcow2']!.path);
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, body);
    await upload.send(Math.floor(body.length * 0.5));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting', auth);
    upload.abort();
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('INCOMPLETE_BODY');
    expect(done.output).toBeNull();
    await waitFor('the partial upload to go', async () => (await leftovers(listed.id)).length === 0);
  }, 120_000);

  for (const name of ['disk.qcow2', 'vmware-stream.vmdk'] as const) {
    it(`multipart/form-data as the page sends it (fields, then the file; Idempotency-Key): ${name} converts before the last byte is sent; identical`, async () => {
      const image = images[name]!;
      const file = await readFile(image.path);
      const form = await formBody([['source_format', 'auto'], ['file', file, name]]);
      const key = { 'idempotency-key': `overlap-mp-${name}-${Date.now()}` };
      const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, form.body, form.body.length, { ...form.headers, ...key });
      await upload.send(Math.floor(form.body.length * 0.7));
      const listed = await theJob();
      expect(listed.source.size).toBe(file.length); // the file part's size, predicted from the body's length
      const converting = await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting' && j.progress.bytes_done > 0, { ...auth, timeoutMs: 60_000 });
      expect(converting.state).toBe('running');
      expect(converting.source.sha256).toBeUndefined();
      const answer = await upload.end();
      expect(answer.status, answer.body).toBe(202);
      const created = JSON.parse(answer.body) as JobJson;
      expect(created.id).toBe(listed.id);
      expect(created.source.sha256).toBe(createHash('sha256').update(file).digest('hex'));
      expect(created.source.filename).toBe(name);
      const done = await svc.waitForFinal(listed.id, auth);
      expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
      expect(done.source.size).toBe(file.length);
      expect(await outputSha256(done)).toBe(image.sha256);
      await waitFor('the staged input to go', async () => (await leftovers(listed.id)).length === 0);
      // The page sends the same form with the same key again (its answer was lost): that job, no second one.
      const again = await pacedUpload(`${svc.apiUrl}/v1/jobs`, form.body, form.body.length, { ...form.headers, ...key }).end();
      expect(again.status, again.body).toBe(200);
      expect(again.headers['idempotent-replayed']).toBe('true');
      expect((JSON.parse(again.body) as JobJson).id).toBe(listed.id);
    }, 120_000);
  }

  it('multipart with a field after the file: the job made as the file started goes, the whole request becomes the job (its staged copy, its options)', async () => {
    const image = images['disk.qcow2']!;
    const file = await readFile(image.path);
    const form = await formBody([['file', file, 'late.qcow2'], ['source_format', 'qcow2']]);
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, form.body, form.body.length, form.headers);
    await upload.send(Math.floor(form.body.length * 0.7));
    const early = await theJob();
    expect(early.source_format).toBe('auto'); // made before the field after the file was sent
    const answer = await upload.end();
    expect(answer.status, answer.body).toBe(202);
    const created = JSON.parse(answer.body) as JobJson;
    expect(created.id).not.toBe(early.id);
    expect(created.source_format).toBe('qcow2');
    expect(created.source.size).toBe(file.length);
    expect(created.source.sha256).toBe(createHash('sha256').update(file).digest('hex'));
    await waitFor('the early job to go', async () => (await svc.request(`/v1/jobs/${early.id}`, auth)).status === 404);
    const done = await svc.waitForFinal(created.id, auth);
    expect(done.state, JSON.stringify(done.error)).toBe('succeeded');
    expect(await outputSha256(done)).toBe(image.sha256);
    await waitFor('both staged inputs to go', async () => (await leftovers(early.id)).length === 0 && (await leftovers(created.id)).length === 0);
    expect(svc.logs()).toContain('multipart upload restaged');
  }, 120_000);

  it('a multipart upload dropped mid-file fails its converting job as an octet-stream one does (INCOMPLETE_BODY), nothing staged', async () => {
    const file = await readFile(images['disk.qcow2']!.path);
    const form = await formBody([['source_format', 'qcow2'], ['file', file, 'drop.qcow2']]);
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, form.body, form.body.length, form.headers);
    await upload.send(Math.floor(form.body.length * 0.5));
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting', auth);
    upload.abort();
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('INCOMPLETE_BODY');
    expect(done.output).toBeNull();
    await waitFor('the partial upload to go', async () => (await leftovers(listed.id)).length === 0);
  }, 120_000);

  it('a client that stalls with bytes still owed: the upload times out and the waiting job fails with it', async () => {
    const body = await readFile(images['disk.qcow2']!.path);
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, body);
    await upload.send(Math.floor(body.length * 0.4));
    const listed = await theJob();
    // Sends nothing more: the worker's reads wait for bytes that never come, bounded by UPLOAD_IDLE_TIMEOUT_MS.
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('UPLOAD_TIMEOUT');
    upload.abort();
  }, 120_000);

  it('a hostile image whose tables point past everything that will arrive fails as corrupt', async () => {
    const body = await readFile(join(dir, 'cut.qcow2'));
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, body);
    const answer = await upload.end();
    expect(answer.status).toBe(202);
    const id = (JSON.parse(answer.body) as JobJson).id;
    const done = await svc.waitForFinal(id, auth);
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('IMAGE_CORRUPT');
    expect(done.error?.message).not.toContain(svc.dataDir);
  }, 120_000);

  it('a body that declares more bytes than it sends: the tables wait for them, the short body fails the job', async () => {
    const body = await readFile(join(dir, 'cut.qcow2'));
    const whole = (await readFile(images['disk.qcow2']!.path)).length;
    const upload = pacedUpload(`${svc.apiUrl}/v1/jobs`, body, whole);
    await upload.send(body.length);
    const listed = await theJob();
    await svc.waitForJob(listed.id, (j) => j.progress.phase === 'converting', auth);
    upload.abort(); // the last 40 % never comes
    const done = await svc.waitForFinal(listed.id, auth);
    expect(done.state).toBe('failed');
    expect(done.error?.code).toBe('INCOMPLETE_BODY');
  }, 120_000);
});
