/**
 * Idempotency-Key on POST /v1/jobs (issue 10), over real HTTP on 127.0.0.1 and a
 * real redis-server: a retry with the same key and body gets the same job, a
 * different body is 422, keys are per tenant, kept in Redis with the configured
 * TTL, and a refused request leaves no key behind.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/api/app.js';
import { IdempotencyKeys } from '../../src/api/idempotency.js';
import { loadConfig, type Config } from '../../src/config.js';
import { ConversionQueue } from '../../src/queue/queue.js';
import { JobRecords, tenantOf } from '../../src/queue/records.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { makeTempDir, qemuImg, qemuIo } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

const TOKEN_A = 'idem-token-a-0123456789abcdef';
const TOKEN_B = 'idem-token-b-0123456789abcdef';
const TTL = 3600;

interface Answer {
  status: number;
  headers: Headers;
  json: Record<string, unknown>;
}

describe('Idempotency-Key on POST /v1/jobs (real HTTP, real Redis)', () => {
  let redis: TestRedis;
  let client: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  let app: FastifyInstance;
  let queue: ConversionQueue;
  let stores: Stores;
  let config: Config;
  let base: string;
  let image: Buffer;
  let other: Buffer;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-idem-'));
    redis = await startRedis();
    client = new Redis(redis.url);
    const path = join(dir, 'a.qcow2');
    await qemuImg('create', '-f', 'qcow2', path, '4M');
    await qemuIo('-c', 'write -P 0x42 64k 128k', path);
    image = await readFile(path);
    await qemuIo('-c', 'write -P 0x43 1M 64k', path);
    other = await readFile(path);
    config = loadConfig({
      DATA_DIR: join(dir, 'data'),
      QUEUE_NAME: uniqueQueueName('idem'),
      API_TOKENS: `${TOKEN_A},${TOKEN_B}`,
      MAX_UPLOAD_BYTES: '8M',
      URL_IMPORT_ALLOW: '127.0.0.1',
      URL_IMPORT_PORTS: '80,443,8999',
      IDEMPOTENCY_TTL_SECONDS: String(TTL),
      LOG_LEVEL: 'silent',
    });
    stores = await openStores(config);
    queue = new ConversionQueue(redis.url, config); // no worker: jobs stay queued
    app = await buildApp(config, { records: new JobRecords(client, config.queueName), queue, stores, redis: client });
    base = await app.listen({ host: '127.0.0.1', port: 0 });
  });

  afterAll(async () => {
    await app?.close();
    await queue?.close();
    client?.disconnect();
    await redis?.stop();
    await cleanup?.();
  });

  const post = async (init: { key?: string; token?: string; body: Buffer | string; type?: string; query?: string }): Promise<Answer> => {
    const res = await fetch(`${base}/v1/jobs${init.query ?? ''}`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${init.token ?? TOKEN_A}`,
        'content-type': init.type ?? 'application/octet-stream',
        ...(init.key !== undefined ? { 'idempotency-key': init.key } : {}),
      },
      body: init.body,
    });
    return { status: res.status, headers: res.headers, json: (await res.json()) as Record<string, unknown> };
  };
  const upload = (key: string | undefined, body = image, extra: { token?: string; query?: string } = {}) => post({ ...(key !== undefined ? { key } : {}), body, ...extra });
  const byUrl = (key: string, body: Record<string, unknown>, token = TOKEN_A) => post({ key, token, body: JSON.stringify(body), type: 'application/json' });
  const stagedInputs = async (): Promise<string[]> => readdir(join(config.dataDir, 'store', 'input')).catch(() => []);
  const list = async (token = TOKEN_A): Promise<string[]> => {
    const res = await fetch(`${base}/v1/jobs?limit=100`, { headers: { authorization: `Bearer ${token}` } });
    return ((await res.json()) as { jobs: Array<{ id: string }> }).jobs.map((j) => j.id);
  };

  it('a retry with the same key and body answers the same job (200, Idempotent-Replayed) and stores nothing new', async () => {
    const first = await upload('retry-1');
    expect(first.status).toBe(202);
    expect(first.headers.get('idempotent-replayed')).toBeNull();
    const id = first.json.id as string;
    const inputs = (await stagedInputs()).length;
    for (let i = 0; i < 3; i++) {
      const again = await upload('retry-1');
      expect(again.status).toBe(200);
      expect(again.json.id).toBe(id);
      expect(again.headers.get('idempotent-replayed')).toBe('true');
      expect(again.headers.get('location')).toBe(`/v1/jobs/${id}`);
      expect(again.json).toMatchObject({ state: 'queued', source: { kind: 'upload', sha256: first.json.source && (first.json.source as { sha256: string }).sha256 } });
    }
    // The retries' copies of the upload were discarded: one staged input, one job.
    expect((await stagedInputs()).length).toBe(inputs);
    expect((await list()).filter((j) => j === id)).toHaveLength(1);
    // Without a key, the same request is a new job, as before.
    const plain = await upload(undefined);
    expect(plain.status).toBe(202);
    expect(plain.json.id).not.toBe(id);
  });

  it('the same key with a different body is 422 IDEMPOTENCY_KEY_REUSED, and leaves the first job alone', async () => {
    const first = await upload('reuse-1');
    expect(first.status).toBe(202);
    const inputs = (await stagedInputs()).length;
    const otherBytes = await upload('reuse-1', other);
    expect(otherBytes.status).toBe(422);
    expect(otherBytes.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(otherBytes.json).toMatchObject({ status: 422, code: 'IDEMPOTENCY_KEY_REUSED' });
    const otherOptions = await upload('reuse-1', image, { query: '?source_format=qcow2' });
    expect(otherOptions.json.code).toBe('IDEMPOTENCY_KEY_REUSED');
    const otherName = await upload('reuse-1', image, { query: '?filename=b.qcow2' });
    expect(otherName.json.code).toBe('IDEMPOTENCY_KEY_REUSED');
    expect((await stagedInputs()).length).toBe(inputs);
    // The original request still replays.
    expect((await upload('reuse-1')).json.id).toBe(first.json.id);
  });

  it('keys are per tenant: another token with the same key and body gets its own job', async () => {
    const a = await upload('tenant-1');
    const b = await upload('tenant-1', image, { token: TOKEN_B });
    expect(a.status).toBe(202);
    expect(b.status).toBe(202);
    expect(b.json.id).not.toBe(a.json.id);
    expect((await upload('tenant-1', image, { token: TOKEN_B })).json.id).toBe(b.json.id);
    expect(await list(TOKEN_B)).not.toContain(a.json.id);
  });

  it('JSON bodies compare by meaning (key order does not matter); the passphrase takes no part and is stored nowhere', async () => {
    const url = 'http://127.0.0.1:8999/disk.qcow2';
    const first = await byUrl('url-1', { source: { url }, source_format: 'qcow2', passphrase: 'first secret passphrase' });
    expect(first.status).toBe(202);
    const again = await byUrl('url-1', { passphrase: 'first secret passphrase', source_format: 'qcow2', source: { url } });
    expect(again.status).toBe(200);
    expect(again.json.id).toBe(first.json.id);
    expect((await byUrl('url-1', { source: { url: `${url}?v=2` }, source_format: 'qcow2' })).json.code).toBe('IDEMPOTENCY_KEY_REUSED');
    expect((await byUrl('url-1', { source: { url }, source_format: 'auto' })).json.code).toBe('IDEMPOTENCY_KEY_REUSED');
    // The key's Redis entry: the job and a fingerprint, with the configured TTL; no passphrase, not the raw key either.
    const keys = new IdempotencyKeys(client, config.queueName, TTL);
    const redisKey = keys.redisKey(tenantOf(TOKEN_A), 'url-1');
    const stored = JSON.parse((await client.get(redisKey)) ?? '{}') as Record<string, unknown>;
    expect(stored).toMatchObject({ job: first.json.id, state: 'created', fp: expect.stringMatching(/^[0-9a-f]{64}$/) });
    const ttl = await client.ttl(redisKey);
    expect(ttl).toBeGreaterThan(TTL - 60);
    expect(ttl).toBeLessThanOrEqual(TTL);
    const all = await client.keys(`diskconv:${config.queueName}:idem:*`);
    for (const k of all) {
      expect(k).not.toContain('url-1');
      expect((await client.get(k)) ?? '').not.toContain('secret passphrase');
    }
  });

  it('concurrent retries with one key make exactly one job', async () => {
    const answers = await Promise.all(Array.from({ length: 6 }, () => upload('race-1')));
    const ids = new Set(answers.map((a) => a.json.id));
    expect(ids.size).toBe(1);
    expect(answers.filter((a) => a.status === 202)).toHaveLength(1);
    expect(answers.filter((a) => a.status === 200)).toHaveLength(5);
    const [id] = [...ids] as string[];
    expect((await list()).filter((j) => j === id)).toHaveLength(1);
  });

  it('every API process shares the keys: a retry that lands on another process gets the same job', async () => {
    const second = await buildApp(config, { records: new JobRecords(client, config.queueName), queue, stores, redis: client });
    try {
      const otherBase = await second.listen({ host: '127.0.0.1', port: 0 });
      const first = await upload('shared-1');
      expect(first.status).toBe(202);
      const res = await fetch(`${otherBase}/v1/jobs`, {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKEN_A}`, 'content-type': 'application/octet-stream', 'idempotency-key': 'shared-1' },
        body: image,
      });
      expect(res.status).toBe(200);
      expect(((await res.json()) as { id: string }).id).toBe(first.json.id);
    } finally {
      await second.close();
    }
  });

  it('a refused request leaves no key: its corrected retry creates the job', async () => {
    const bad = await upload('refused-1', image, { query: '?source_format=floppy' });
    expect(bad.status).toBe(400);
    const refusedUrl = await byUrl('refused-2', { source: { url: 'http://169.254.169.254/latest' } });
    expect(refusedUrl.status).toBe(422);
    expect(refusedUrl.json.code).toBe('URL_REFUSED');
    const keys = new IdempotencyKeys(client, config.queueName, TTL);
    expect(await client.exists(keys.redisKey(tenantOf(TOKEN_A), 'refused-1'), keys.redisKey(tenantOf(TOKEN_A), 'refused-2'))).toBe(0);
    expect((await upload('refused-1')).status).toBe(202);
    expect((await byUrl('refused-2', { source: { url: 'http://127.0.0.1:8999/ok.qcow2' } })).status).toBe(202);
  });

  it('a key whose job was deleted is free again', async () => {
    const first = await upload('deleted-1');
    const id = first.json.id as string;
    const del = (): Promise<Response> => fetch(`${base}/v1/jobs/${id}`, { method: 'DELETE', headers: { authorization: `Bearer ${TOKEN_A}` } });
    expect((await del()).status).toBe(200); // cancelled
    expect((await upload('deleted-1')).json.id).toBe(id); // a cancelled job is still the key's job
    expect((await del()).status).toBe(204); // removed
    const fresh = await upload('deleted-1');
    expect(fresh.status).toBe(202);
    expect(fresh.json.id).not.toBe(id);
  });

  it('refuses a malformed key before reading the body (400 VALIDATION_FAILED)', async () => {
    for (const key of ['has space', 'x'.repeat(256), 'tab\tinside']) {
      const res = await fetch(`${base}/v1/jobs`, {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKEN_A}`, 'content-type': 'application/octet-stream', 'idempotency-key': key },
        body: image,
      });
      expect(res.status).toBe(400);
      expect(((await res.json()) as { code: string; detail: string })).toMatchObject({ code: 'VALIDATION_FAILED', detail: expect.stringMatching(/Idempotency-Key/) });
    }
  });
});
