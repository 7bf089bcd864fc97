/**
 * The API in-process (fastify inject) over real parts: a real Redis, the real
 * BullMQ queue (no worker: jobs stay queued), a real local store.
 */
import { randomBytes } from 'node:crypto';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/api/app.js';
import { REDACT_PATHS } from '../../src/log.js';
import { loadConfig, type Config } from '../../src/config.js';
import { BufferSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { ConversionQueue } from '../../src/queue/queue.js';
import { JobRecords } from '../../src/queue/records.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { makeTempDir, qemuImg, qemuIo, seededBytes } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

const TOKEN_A = 'token-a-0123456789abcdef';
const TOKEN_B = 'token-b-0123456789abcdef';

export function multipartBody(parts: Array<{ name: string; value: string | Buffer; filename?: string }>): { body: Buffer; contentType: string } {
  const boundary = `----diskconv${randomBytes(8).toString('hex')}`;
  const chunks: Buffer[] = [];
  for (const p of parts) {
    const disposition = `form-data; name="${p.name}"${p.filename !== undefined ? `; filename="${p.filename}"` : ''}`;
    const type = p.filename !== undefined ? 'Content-Type: application/octet-stream\r\n' : '';
    chunks.push(Buffer.from(`--${boundary}\r\nContent-Disposition: ${disposition}\r\n${type}\r\n`));
    chunks.push(typeof p.value === 'string' ? Buffer.from(p.value) : p.value);
    chunks.push(Buffer.from('\r\n'));
  }
  chunks.push(Buffer.from(`--${boundary}--\r\n`));
  return { body: Buffer.concat(chunks), contentType: `multipart/form-data; boundary=${boundary}` };
}

interface Setup {
  app: FastifyInstance;
  config: Config;
  records: JobRecords;
  queue: ConversionQueue;
  stores: Stores;
  logs: string[];
}

describe('API', () => {
  let redis: TestRedis;
  let client: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  const setups: Setup[] = [];
  let main: Setup;
  let qcow2: Buffer;

  async function setup(env: Record<string, string> = {}): Promise<Setup> {
    const config = loadConfig({
      DATA_DIR: join(dir, `data-${setups.length}`),
      QUEUE_NAME: uniqueQueueName('api'),
      API_TOKENS: `${TOKEN_A},${TOKEN_B}`,
      MAX_UPLOAD_BYTES: '1M',
      LOG_LEVEL: 'trace',
      ...env,
    });
    const stores = await openStores(config);
    const records = new JobRecords(client, config.queueName);
    const queue = new ConversionQueue(redis.url, config);
    const logs: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        logs.push(chunk.toString());
        done();
      },
    });
    const logger = pino({ level: 'trace', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, sink);
    const app = await buildApp(config, { records, queue, stores, redis: client }, { logger });
    await app.ready();
    const s = { app, config, records, queue, stores, logs };
    setups.push(s);
    return s;
  }

  const auth = (token = TOKEN_A) => ({ authorization: `Bearer ${token}` });

  async function createJob(s: Setup, body: Buffer, token = TOKEN_A, query = ''): Promise<{ id: string; status: number; json: Record<string, unknown> }> {
    const res = await s.app.inject({ method: 'POST', url: `/v1/jobs${query}`, headers: { ...auth(token), 'content-type': 'application/octet-stream' }, payload: body });
    const json = res.json() as Record<string, unknown>;
    return { id: json.id as string, status: res.statusCode, json };
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-api-'));
    redis = await startRedis();
    client = new Redis(redis.url);
    const path = join(dir, 'small.qcow2');
    await qemuImg('create', '-f', 'qcow2', path, '4M');
    await qemuIo('-c', 'write -P 0x42 64k 128k', path);
    qcow2 = await import('node:fs/promises').then((fs) => fs.readFile(path));
    main = await setup();
  });

  afterAll(async () => {
    for (const s of setups) {
      await s.app.close();
      await s.queue.close();
    }
    client.disconnect();
    await redis.stop();
    await cleanup();
  });

  describe('auth and tenants', () => {
    it('refuses /v1 without a token or with a wrong one (401 problem+json), leaves /healthz open', async () => {
      const none = await main.app.inject({ method: 'GET', url: '/v1/jobs' });
      expect(none.statusCode).toBe(401);
      expect(none.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(none.headers['www-authenticate']).toMatch(/^Bearer/);
      expect(none.json()).toMatchObject({ status: 401, code: 'UNAUTHORIZED', type: expect.any(String), title: expect.any(String), detail: expect.any(String) });
      for (const header of ['Bearer wrong-token-0123456789', `Basic ${TOKEN_A}`, 'Bearer', `Bearer ${TOKEN_A}x`, `Bearer ${TOKEN_A.slice(0, -1)}`]) {
        const res = await main.app.inject({ method: 'GET', url: '/v1/jobs', headers: { authorization: header } });
        expect(res.statusCode, header).toBe(401);
      }
      // Percent-encoded spellings route to the same handlers and need the same token.
      for (const url of ['/%761/jobs', '/v1/%6aobs', '/%76%31/jobs?state=queued']) {
        const res = await main.app.inject({ method: 'GET', url });
        expect(res.statusCode, url).toBe(401);
      }
      // An unauthenticated upload is refused before its body is read.
      const upload = await main.app.inject({ method: 'POST', url: '/v1/jobs', headers: { 'content-type': 'application/octet-stream' }, payload: qcow2 });
      expect(upload.statusCode).toBe(401);
      expect((await main.app.inject({ method: 'GET', url: '/healthz' })).statusCode).toBe(200);
    });

    it('gives each token only its own jobs: another token gets 404 everywhere', async () => {
      const { id, status, json } = await createJob(main, qcow2);
      expect(status).toBe(202);
      expect(json.state).toBe('queued');
      expect(id).toMatch(/^[A-Za-z0-9_-]{22}$/);
      const mine = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}`, headers: auth() });
      expect(mine.statusCode).toBe(200);
      for (const [method, url] of [
        ['GET', `/v1/jobs/${id}`],
        ['GET', `/v1/jobs/${id}/output`],
        ['HEAD', `/v1/jobs/${id}/output`],
        ['DELETE', `/v1/jobs/${id}`],
      ] as const) {
        const res = await main.app.inject({ method, url, headers: auth(TOKEN_B) });
        expect(res.statusCode, `${method} ${url}`).toBe(404);
      }
      const listB = (await main.app.inject({ method: 'GET', url: '/v1/jobs', headers: auth(TOKEN_B) })).json() as { jobs: { id: string }[] };
      expect(listB.jobs.map((j) => j.id)).not.toContain(id);
      const listA = (await main.app.inject({ method: 'GET', url: '/v1/jobs', headers: auth() })).json() as { jobs: { id: string }[] };
      expect(listA.jobs.map((j) => j.id)).toContain(id);
      // The job is still there for its owner.
      expect((await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}`, headers: auth() })).statusCode).toBe(200);
    });

    it('never logs a token', async () => {
      await main.app.inject({ method: 'GET', url: '/v1/jobs', headers: auth() });
      await main.app.inject({ method: 'GET', url: '/v1/jobs', headers: { authorization: 'Bearer not-a-valid-token-xyz' } });
      const text = main.logs.join('');
      expect(text.length).toBeGreaterThan(0);
      expect(text).not.toContain(TOKEN_A);
      expect(text).not.toContain(TOKEN_B);
      expect(text).not.toContain('not-a-valid-token-xyz');
    });

    it('makes unguessable, distinct job ids', async () => {
      const ids = new Set<string>();
      for (let i = 0; i < 5; i++) ids.add((await createJob(main, qcow2, TOKEN_B)).id);
      expect(ids.size).toBe(5);
      for (const id of ids) expect(Buffer.from(id, 'base64url')).toHaveLength(16);
    });
  });

  describe('bodies and errors', () => {
    const post = (s: Setup, headers: Record<string, string>, payload?: string | Buffer, url = '/v1/jobs') =>
      s.app.inject({ method: 'POST', url, headers: { ...auth(), ...headers }, ...(payload !== undefined ? { payload } : {}) });

    it('answers each bad request with its own 4xx code, never a 500', async () => {
      const cases: Array<[string, () => Promise<{ statusCode: number; json: () => unknown }>, number, string]> = [
        ['unknown route', () => main.app.inject({ method: 'GET', url: '/v1/nope', headers: auth() }), 404, 'NOT_FOUND'],
        ['unknown method', () => main.app.inject({ method: 'PUT', url: '/v1/jobs', headers: auth() }), 404, 'NOT_FOUND'],
        ['unknown top-level route', () => main.app.inject({ method: 'GET', url: '/etc/passwd' }), 404, 'NOT_FOUND'],
        ['wrong content type', () => post(main, { 'content-type': 'text/plain' }, 'hello'), 415, 'UNSUPPORTED_MEDIA_TYPE'],
        ['no content type', () => post(main, {}), 415, 'UNSUPPORTED_MEDIA_TYPE'],
        ['invalid JSON', () => post(main, { 'content-type': 'application/json' }, '{"source": '), 400, 'INVALID_JSON'],
        ['empty JSON', () => post(main, { 'content-type': 'application/json' }, ''), 400, 'INVALID_JSON'],
        ['JSON without source', () => post(main, { 'content-type': 'application/json' }, '{}'), 400, 'VALIDATION_FAILED'],
        ['JSON unknown field', () => post(main, { 'content-type': 'application/json' }, '{"source":{"url":"https://example.com/a"},"extra":1}'), 400, 'VALIDATION_FAILED'],
        ['JSON bad format', () => post(main, { 'content-type': 'application/json' }, '{"source":{"url":"https://example.com/a"},"source_format":"vhd"}'), 400, 'VALIDATION_FAILED'],
        ['JSON bad sha256', () => post(main, { 'content-type': 'application/json' }, '{"source":{"url":"https://example.com/a"},"expected_sha256":"abc"}'), 400, 'VALIDATION_FAILED'],
        ['JSON too large', () => post(main, { 'content-type': 'application/json' }, JSON.stringify({ source: { url: 'https://e.com/' + 'a'.repeat(100_000) } })), 413, 'PAYLOAD_TOO_LARGE'],
        ['octet-stream empty', () => post(main, { 'content-type': 'application/octet-stream' }, Buffer.alloc(0)), 400, 'EMPTY_BODY'],
        ['octet-stream over MAX_UPLOAD_BYTES', () => post(main, { 'content-type': 'application/octet-stream' }, Buffer.alloc(2 * 2 ** 20)), 413, 'PAYLOAD_TOO_LARGE'],
        ['octet-stream bad query', () => post(main, { 'content-type': 'application/octet-stream' }, qcow2, '/v1/jobs?source_format=iso'), 400, 'VALIDATION_FAILED'],
        ['octet-stream unknown query', () => post(main, { 'content-type': 'application/octet-stream' }, qcow2, '/v1/jobs?path=/etc/passwd'), 400, 'VALIDATION_FAILED'],
        ['octet-stream checksum', () => post(main, { 'content-type': 'application/octet-stream' }, qcow2, `/v1/jobs?expected_sha256=${'0'.repeat(64)}`), 422, 'CHECKSUM_MISMATCH'],
        ['list bad state', () => main.app.inject({ method: 'GET', url: '/v1/jobs?state=done', headers: auth() }), 400, 'VALIDATION_FAILED'],
        ['list bad limit', () => main.app.inject({ method: 'GET', url: '/v1/jobs?limit=0', headers: auth() }), 400, 'VALIDATION_FAILED'],
        ['list bad cursor', () => main.app.inject({ method: 'GET', url: '/v1/jobs?cursor=zzz', headers: auth() }), 400, 'INVALID_CURSOR'],
        ['malformed job id', () => main.app.inject({ method: 'GET', url: '/v1/jobs/..%2F..%2Fetc', headers: auth() }), 404, 'NOT_FOUND'],
      ];
      for (const [what, run, status, code] of cases) {
        const res = await run();
        expect(res.statusCode, what).toBe(status);
        expect(res.json(), what).toMatchObject({ status, code });
      }
    });

    it('answers multipart mistakes with their own codes', async () => {
      const cases: Array<[string, Parameters<typeof multipartBody>[0], number, string]> = [
        ['no file', [{ name: 'source_format', value: 'qcow2' }], 400, 'MISSING_FILE'],
        ['two files', [{ name: 'file', value: qcow2, filename: 'a.qcow2' }, { name: 'file', value: qcow2, filename: 'b.qcow2' }], 400, 'TOO_MANY_FILES'],
        ['file under another name', [{ name: 'image', value: qcow2, filename: 'a.qcow2' }], 400, 'TOO_MANY_FILES'],
        ['bad field', [{ name: 'source_format', value: 'iso' }, { name: 'file', value: qcow2, filename: 'a.qcow2' }], 400, 'VALIDATION_FAILED'],
        ['unknown field', [{ name: 'path', value: '/etc' }, { name: 'file', value: qcow2, filename: 'a.qcow2' }], 400, 'VALIDATION_FAILED'],
        ['too many fields', Array.from({ length: 12 }, (_, i) => ({ name: `f${i}`, value: 'x' })), 400, 'TOO_MANY_FIELDS'],
        ['file too large', [{ name: 'file', value: Buffer.alloc(2 ** 20 + 10), filename: 'big.raw' }], 413, 'PAYLOAD_TOO_LARGE'],
      ];
      for (const [what, parts, status, code] of cases) {
        const { body, contentType } = multipartBody(parts);
        const res = await main.app.inject({ method: 'POST', url: '/v1/jobs', headers: { ...auth(), 'content-type': contentType }, payload: body });
        expect(res.statusCode, what).toBe(status);
        expect(res.json(), what).toMatchObject({ code });
      }
      const bad = await main.app.inject({ method: 'POST', url: '/v1/jobs', headers: { ...auth(), 'content-type': 'multipart/form-data; boundary=zzz' }, payload: 'not multipart at all' });
      expect(bad.statusCode).toBeGreaterThanOrEqual(400);
      expect(bad.statusCode).toBeLessThan(500);
      // None of the refused uploads stayed in the store.
      const inputs = await readdir(join(main.config.dataDir, 'store', 'input'));
      const jobs = (await main.app.inject({ method: 'GET', url: '/v1/jobs?limit=100', headers: auth() })).json() as { jobs: { id: string }[] };
      const bJobs = (await main.app.inject({ method: 'GET', url: '/v1/jobs?limit=100', headers: auth(TOKEN_B) })).json() as { jobs: { id: string }[] };
      expect(inputs.sort()).toEqual([...jobs.jobs, ...bJobs.jobs].map((j) => j.id).sort());
      expect(await readdir(join(main.config.dataDir, 'store', 'tmp'))).toEqual([]);
    });

    it('accepts a multipart upload with fields before or after the file; the file name is metadata only', async () => {
      const { body, contentType } = multipartBody([
        { name: 'file', value: qcow2, filename: '../../etc/evil\u0001.qcow2' },
        { name: 'source_format', value: 'qcow2' },
      ]);
      const res = await main.app.inject({ method: 'POST', url: '/v1/jobs', headers: { ...auth(), 'content-type': contentType }, payload: body });
      expect(res.statusCode).toBe(202);
      expect(res.headers.location).toMatch(/^\/v1\/jobs\/[A-Za-z0-9_-]{22}$/);
      const job = res.json() as { id: string; source_format: string; source: { filename: string; size: number; sha256: string } };
      expect(job.source_format).toBe('qcow2');
      expect(job.source.filename).toBe('evil.qcow2');
      expect(job.source.size).toBe(qcow2.length);
      expect(await readdir(join(main.config.dataDir, 'store', 'input'))).toContain(job.id);
    });

    it('refuses URLs that break the URL import rules at POST time (URL_REFUSED)', async () => {
      for (const url of ['http://127.0.0.1/disk.qcow2', 'http://169.254.169.254/latest', 'ftp://example.com/x', 'http://2130706433/', 'http://user:pw@example.com/x', 'http://[::1]/x', 'http://10.0.0.1:8080/x']) {
        const res = await post(main, { 'content-type': 'application/json' }, JSON.stringify({ source: { url } }));
        expect(res.statusCode, url).toBe(422);
        expect(res.json(), url).toMatchObject({ code: 'URL_REFUSED' });
      }
    });

    it('hides internals on 5xx', async () => {
      const s = await setup();
      await rm(join(s.config.dataDir, 'store'), { recursive: true, force: true });
      const res = await s.app.inject({ method: 'GET', url: '/readyz' });
      expect(res.statusCode).toBe(503);
      const problem = res.json() as { code: string; detail: string };
      expect(problem.code).toBe('NOT_READY');
      expect(JSON.stringify(problem)).not.toContain(s.config.dataDir);
      expect(problem).toMatchObject({ checks: { redis: 'ok', store: expect.stringMatching(/^unavailable/) } });
      const upload = await post(s, { 'content-type': 'application/octet-stream' }, qcow2);
      expect(upload.statusCode).toBe(503);
      expect(upload.json()).toMatchObject({ code: 'STORE_UNAVAILABLE', detail: 'The store is unavailable' });
      expect(JSON.stringify(upload.json())).not.toContain(s.config.dataDir);
    });
  });

  describe('jobs', () => {
    it('cancels a queued job (its input goes, the queue forgets it), then deletes it', async () => {
      const { id } = await createJob(main, qcow2);
      expect(await main.stores.staging.stat(id)).toBeDefined();
      expect(await main.queue.queue.getJob(id)).toBeDefined();
      const del = await main.app.inject({ method: 'DELETE', url: `/v1/jobs/${id}`, headers: auth() });
      expect(del.statusCode).toBe(200);
      expect(del.json()).toMatchObject({ id, state: 'cancelled' });
      expect(await main.stores.staging.stat(id)).toBeUndefined();
      expect(await main.queue.queue.getJob(id)).toBeUndefined();
      const again = await main.app.inject({ method: 'DELETE', url: `/v1/jobs/${id}`, headers: auth() });
      expect(again.statusCode).toBe(204);
      expect((await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}`, headers: auth() })).statusCode).toBe(404);
    });

    it('serves a succeeded job’s output with ETag, Content-Length, ranges (206/416), HEAD and 304', async () => {
      const { id } = await createJob(main, qcow2);
      const notReady = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: auth() });
      expect(notReady.statusCode).toBe(409);
      expect(notReady.json()).toMatchObject({ code: 'JOB_NOT_READY' });

      // Stand in for the worker: put an output in the store and mark the job succeeded.
      const data = Buffer.concat([seededBytes(10_000, 5), Buffer.alloc(5000)]);
      const source = new BufferSource(data);
      const image = await openImage(source, { format: 'raw' });
      const writer = await main.stores.output.create(id, image.virtualSize);
      const result = await convertToRaw(image, source, writer, { sha256: true });
      const stored = await writer.commit();
      await main.records.transition(id, 'succeeded', ['queued'], { output: { format: 'raw', size: stored.size, sha256: result.sha256 as string, data_bytes: 1 } });
      const size = stored.size;
      const full = data.length < size ? Buffer.concat([data, Buffer.alloc(size - data.length)]) : data;

      const res = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: auth() });
      expect(res.statusCode).toBe(200);
      expect(res.headers.etag).toBe(`"${result.sha256}"`);
      expect(res.headers['content-length']).toBe(String(size));
      expect(res.headers['accept-ranges']).toBe('bytes');
      expect(res.rawPayload.equals(full)).toBe(true);

      const range = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: { ...auth(), range: 'bytes=100-199' } });
      expect(range.statusCode).toBe(206);
      expect(range.headers['content-range']).toBe(`bytes 100-199/${size}`);
      expect(range.rawPayload.equals(full.subarray(100, 200))).toBe(true);

      const suffix = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: { ...auth(), range: 'bytes=-10' } });
      expect(suffix.statusCode).toBe(206);
      expect(suffix.rawPayload.equals(full.subarray(size - 10))).toBe(true);

      const open = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: { ...auth(), range: `bytes=${size - 5}-` } });
      expect(open.statusCode).toBe(206);
      expect(open.rawPayload).toHaveLength(5);

      const bad = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: { ...auth(), range: `bytes=${size}-` } });
      expect(bad.statusCode).toBe(416);
      expect(bad.headers['content-range']).toBe(`bytes */${size}`);
      expect(bad.json()).toMatchObject({ code: 'RANGE_NOT_SATISFIABLE' });

      const stale = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: { ...auth(), range: 'bytes=0-9', 'if-range': '"other"' } });
      expect(stale.statusCode).toBe(200);

      const head = await main.app.inject({ method: 'HEAD', url: `/v1/jobs/${id}/output`, headers: auth() });
      expect(head.statusCode).toBe(200);
      expect(head.headers['content-length']).toBe(String(size));
      expect(head.headers.etag).toBe(`"${result.sha256}"`);
      expect(head.rawPayload).toHaveLength(0);

      const cached = await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}/output`, headers: { ...auth(), 'if-none-match': `"${result.sha256}"` } });
      expect(cached.statusCode).toBe(304);

      const job = (await main.app.inject({ method: 'GET', url: `/v1/jobs/${id}`, headers: auth() })).json() as { output: { href: string; sha256: string } };
      expect(job.output).toMatchObject({ sha256: result.sha256, href: `/v1/jobs/${id}/output` });

      // Deleting a finished job removes its output.
      expect((await main.app.inject({ method: 'DELETE', url: `/v1/jobs/${id}`, headers: auth() })).statusCode).toBe(204);
      expect(await main.stores.output.stat(id)).toBeUndefined();
    });

    it('lists with state, limit and cursor', async () => {
      const s = await setup();
      const ids: string[] = [];
      for (let i = 0; i < 5; i++) ids.push((await createJob(s, qcow2)).id);
      await s.app.inject({ method: 'DELETE', url: `/v1/jobs/${ids[1]}`, headers: auth() });
      const page1 = (await s.app.inject({ method: 'GET', url: '/v1/jobs?limit=2', headers: auth() })).json() as { jobs: { id: string }[]; next_cursor: string };
      expect(page1.jobs.map((j) => j.id)).toEqual([ids[4], ids[3]]);
      const page2 = (await s.app.inject({ method: 'GET', url: `/v1/jobs?limit=2&cursor=${page1.next_cursor}`, headers: auth() })).json() as { jobs: { id: string }[]; next_cursor: string | null };
      expect(page2.jobs.map((j) => j.id)).toEqual([ids[2], ids[1]]);
      const cancelled = (await s.app.inject({ method: 'GET', url: '/v1/jobs?state=cancelled', headers: auth() })).json() as { jobs: { id: string }[] };
      expect(cancelled.jobs.map((j) => j.id)).toEqual([ids[1]]);
    });

    it('exposes metrics in the Prometheus text format', async () => {
      const res = await main.app.inject({ method: 'GET', url: '/metrics' });
      expect(res.statusCode).toBe(200);
      expect(res.headers['content-type']).toMatch(/^text\/plain; version=0\.0\.4/);
      expect(res.body).toMatch(/^diskconv_jobs\{state="queued"\} [1-9]\d*$/m);
      expect(res.body).toMatch(/^diskconv_queue_depth\{state="waiting"\} [1-9]\d*$/m);
      expect(res.body).toMatch(/^diskconv_converted_bytes_total 0$/m);
      expect(res.body).toMatch(/^diskconv_conversion_seconds_bucket\{le="\+Inf"\} 0$/m);
    });
  });

  describe('inspect', () => {
    const inspect = (s: Setup, payload: Buffer, query = '') =>
      s.app.inject({ method: 'POST', url: `/v1/inspect${query}`, headers: { ...auth(), 'content-type': 'application/octet-stream' }, payload });

    it('describes an image without converting it or keeping it', async () => {
      const res = await inspect(main, qcow2, '?filename=small.qcow2');
      expect(res.statusCode).toBe(200);
      const body = res.json() as Record<string, unknown>;
      expect(body).toMatchObject({ safe: true, format: 'qcow2', virtual_size: 4 * 2 ** 20, info: { format: 'qcow2', 'virtual-size': 4 * 2 ** 20, filename: 'small.qcow2' } });
      expect(body.allocation).toMatchObject({ data_bytes: expect.any(Number) });
      expect((await readdir(join(main.config.dataDir, 'store', 'input'))).filter((n) => n.startsWith('inspect-'))).toEqual([]);
    });

    it('gives a verdict on refused images: corrupt, declared-format mismatch', async () => {
      const corrupt = Buffer.from(qcow2);
      corrupt.writeBigUInt64BE(0xffffff000n, 40); // l1_table_offset far past the end
      const bad = (await inspect(main, corrupt)).json() as { safe: boolean; error: { code: string } };
      expect(bad.safe).toBe(false);
      expect(['IMAGE_CORRUPT', 'UNSAFE_IMAGE']).toContain(bad.error.code);
      const mismatch = (await inspect(main, qcow2, '?source_format=vmdk')).json() as { safe: boolean; error: { code: string } };
      expect(mismatch).toMatchObject({ safe: false, error: { code: 'FORMAT_MISMATCH' } });
    });

    it('is rate limited per token (429 problem+json with Retry-After)', async () => {
      const s = await setup({ RATE_LIMIT_INSPECT: '2', RATE_LIMIT_JOBS: '2' });
      for (let i = 0; i < 2; i++) expect((await inspect(s, qcow2)).statusCode).toBe(200);
      const limited = await inspect(s, qcow2);
      expect(limited.statusCode).toBe(429);
      expect(limited.json()).toMatchObject({ code: 'RATE_LIMITED', status: 429 });
      expect(limited.headers['retry-after']).toBeDefined();
      // Job creation has its own budget, and another token its own.
      for (let i = 0; i < 2; i++) expect((await createJob(s, qcow2)).status).toBe(202);
      expect((await createJob(s, qcow2)).status).toBe(429);
      expect((await createJob(s, qcow2, TOKEN_B)).status).toBe(202);
    });
  });

  it('is rate limited per address when auth is off', async () => {
    const s = await setup({ API_TOKENS: '', RATE_LIMIT_JOBS: '1' });
    const first = await s.app.inject({ method: 'POST', url: '/v1/jobs', headers: { 'content-type': 'application/octet-stream' }, payload: qcow2, remoteAddress: '10.1.1.1' });
    expect(first.statusCode).toBe(202);
    const second = await s.app.inject({ method: 'POST', url: '/v1/jobs', headers: { 'content-type': 'application/octet-stream' }, payload: qcow2, remoteAddress: '10.1.1.1' });
    expect(second.statusCode).toBe(429);
    const other = await s.app.inject({ method: 'POST', url: '/v1/jobs', headers: { 'content-type': 'application/octet-stream' }, payload: qcow2, remoteAddress: '10.1.1.2' });
    expect(other.statusCode).toBe(202);
  });
});
