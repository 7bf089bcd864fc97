/**
 * Signed download links and the page's headers, through inject over a real Redis
 * and a real local store (no worker: the succeeded job is written directly).
 */
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/api/app.js';
import { newJobId } from '../../src/api/routes/jobs.js';
import { createLinkSigner } from '../../src/api/signed-links.js';
import { loadConfig, type Config } from '../../src/config.js';
import { ConversionQueue } from '../../src/queue/queue.js';
import { JobRecords, tenantOf, type JobRecord } from '../../src/queue/records.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { makeTempDir } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

const TOKEN_A = 'links-token-a-0123456789abcdef';
const TOKEN_B = 'links-token-b-0123456789abcdef';
const SECRET = 'links-secret-0123456789abcdef0123456789';
const bearer = (t: string) => ({ authorization: `Bearer ${t}` });

describe('signed download links', () => {
  let redis: TestRedis;
  let client: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  let app: FastifyInstance;
  let config: Config;
  let records: JobRecords;
  let queue: ConversionQueue;
  let stores: Stores;
  const content = Buffer.alloc(70_000, 0x5a);

  async function job(state: JobRecord['state'], token = TOKEN_A): Promise<string> {
    const id = newJobId();
    const now = Date.now();
    await records.create({
      id,
      tenant: tenantOf(token),
      state,
      source_format: 'auto',
      output_format: 'raw',
      created_at: now,
      updated_at: now,
      attempts: 1,
      source: { kind: 'upload', size: 1, sha256: '0'.repeat(64) },
      progress: { phase: 'done', bytes_done: content.length, bytes_total: content.length, percent: 100 },
      ...(state === 'succeeded' ? { output: { format: 'raw' as const, size: content.length, sha256: 'a'.repeat(64), data_bytes: content.length } } : {}),
    });
    if (state === 'succeeded') {
      const w = await stores.output.create(id, content.length);
      await w.write({ kind: 'data', offset: 0, length: content.length, data: content });
      await w.finish(content.length);
      await w.commit();
    }
    return id;
  }

  async function link(id: string, token = TOKEN_A): Promise<{ status: number; href: string; expires_at: string }> {
    const res = await app.inject({ method: 'POST', url: `/v1/jobs/${id}/output/link`, headers: bearer(token) });
    const body = res.json() as { href: string; expires_at: string };
    return { status: res.statusCode, ...body };
  }

  beforeAll(async () => {
    redis = await startRedis();
    client = new Redis(redis.url);
    ({ dir, cleanup } = await makeTempDir('diskconv-links-'));
    config = loadConfig({ DATA_DIR: join(dir, 'data'), QUEUE_NAME: uniqueQueueName('links'), API_TOKENS: `${TOKEN_A},${TOKEN_B}`, LINK_SECRET: SECRET, LINK_TTL_SECONDS: '60' });
    stores = await openStores(config);
    records = new JobRecords(client, config.queueName);
    queue = new ConversionQueue(redis.url, config);
    app = await buildApp(config, { records, queue, stores, redis: client });
    await app.ready();
  });
  afterAll(async () => {
    await app?.close();
    await queue?.close();
    client?.disconnect();
    await stores?.close();
    await redis?.stop();
    await cleanup?.();
  });

  it('a signed link downloads the output without a token, whole or by range', async () => {
    const id = await job('succeeded');
    const l = await link(id);
    expect(l.status).toBe(200);
    expect(l.href).toMatch(new RegExp(`^/v1/jobs/${id}/output\\?expires=\\d+&sig=[A-Za-z0-9_-]{43}$`));
    expect(Date.parse(l.expires_at) - Date.now()).toBeGreaterThan(50_000);
    const res = await app.inject({ method: 'GET', url: l.href });
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(content)).toBe(true);
    const ranged = await app.inject({ method: 'GET', url: l.href, headers: { range: 'bytes=10-19' } });
    expect(ranged.statusCode).toBe(206);
    expect((await app.inject({ method: 'HEAD', url: l.href })).statusCode).toBe(200);
  });

  it('refuses an expired, tampered, foreign or misplaced signature', async () => {
    const id = await job('succeeded');
    const other = await job('succeeded');
    const signer = createLinkSigner({ secret: SECRET, ttlSeconds: 60 }, records);
    const expired = signer.sign(id, tenantOf(TOKEN_A), Date.now() - 120_000).href;
    const r1 = await app.inject({ method: 'GET', url: expired });
    expect(r1.statusCode).toBe(401);
    expect(r1.json().detail).toContain('expired');

    const good = (await link(id)).href;
    const tampered = good.replace(/sig=(.)/, (_m, c: string) => `sig=${c === 'A' ? 'B' : 'A'}`);
    expect((await app.inject({ method: 'GET', url: tampered })).statusCode).toBe(401);
    // Another job's path with this job's signature.
    expect((await app.inject({ method: 'GET', url: good.replace(id, other) })).statusCode).toBe(401);
    // A later expiry with the same signature.
    expect((await app.inject({ method: 'GET', url: good.replace(/expires=\d+/, (m) => `expires=${Number(m.slice(8)) + 1000}`) })).statusCode).toBe(401);
    // Signed for another tenant (with the server's own key): not this job's tenant.
    expect((await app.inject({ method: 'GET', url: signer.sign(id, tenantOf(TOKEN_B)).href })).statusCode).toBe(401);
    // A different secret.
    const stranger = createLinkSigner({ secret: 'x'.repeat(40), ttlSeconds: 60 }, records);
    expect((await app.inject({ method: 'GET', url: stranger.sign(id, tenantOf(TOKEN_A)).href })).statusCode).toBe(401);
    // The signature only opens the output, not the job or its deletion.
    const query = good.slice(good.indexOf('?'));
    expect((await app.inject({ method: 'GET', url: `/v1/jobs/${id}${query}` })).statusCode).toBe(401);
    expect((await app.inject({ method: 'DELETE', url: `/v1/jobs/${id}${query}` })).statusCode).toBe(401);
    expect((await app.inject({ method: 'GET', url: `/v1/jobs/${id}/output?expires=1&sig=short` })).statusCode).toBe(401);
  });

  it('signs only the caller\'s succeeded jobs', async () => {
    const queued = await job('queued');
    expect((await link(queued)).status).toBe(409);
    const mine = await job('succeeded');
    expect((await link(mine, TOKEN_B)).status).toBe(404);
    expect((await app.inject({ method: 'POST', url: `/v1/jobs/${mine}/output/link` })).statusCode).toBe(401);
  });

  it('GET /v1/service tells the page about auth and targets; every answer carries the safety headers', async () => {
    expect((await app.inject({ method: 'GET', url: '/v1/service' })).statusCode).toBe(401);
    const res = await app.inject({ method: 'GET', url: '/v1/service', headers: bearer(TOKEN_A) });
    expect(res.statusCode).toBe(200);
    const body = res.json() as Record<string, unknown>;
    expect(body.auth).toBe(true);
    expect(body.targets).toEqual([{ id: 'store', label: 'This service (download)', kind: 'store' }]);
    for (const url of ['/', '/app.js', '/app.css', '/v1/service', '/nope']) {
      const r = await app.inject({ method: 'GET', url });
      expect(r.headers['x-content-type-options']).toBe('nosniff');
      expect(r.headers['content-security-policy']).toContain("frame-ancestors 'none'");
      expect(r.headers['content-security-policy']).toContain("script-src 'self'");
    }
    const js = await app.inject({ method: 'GET', url: '/app.js' });
    expect(js.headers['content-type']).toMatch(/javascript/);
    // No dot files or anything outside web/.
    expect((await app.inject({ method: 'GET', url: '/../package.json' })).statusCode).toBe(404);
  });
});

describe('callback_url without WEBHOOK_SECRET', () => {
  it('is refused (INVALID_ARGUMENT) and nothing is kept', async () => {
    const redis = await startRedis();
    const client = new Redis(redis.url);
    const { dir, cleanup } = await makeTempDir('diskconv-nohooks-');
    const config = loadConfig({ DATA_DIR: join(dir, 'data'), QUEUE_NAME: uniqueQueueName('nohooks') });
    const stores = await openStores(config);
    const records = new JobRecords(client, config.queueName);
    const queue = new ConversionQueue(redis.url, config);
    const app = await buildApp(config, { records, queue, stores, redis: client });
    try {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/jobs?callback_url=https%3A%2F%2Fexample.org%2Fhook',
        headers: { 'content-type': 'application/octet-stream' },
        payload: Buffer.alloc(4096, 1),
      });
      expect(res.statusCode).toBe(400);
      expect(res.json().code).toBe('INVALID_ARGUMENT');
      expect(res.json().detail).toContain('WEBHOOK_SECRET');
      expect((await app.inject({ method: 'GET', url: '/v1/jobs' })).json().jobs).toEqual([]);
    } finally {
      await app.close();
      await queue.close();
      await stores.close();
      client.disconnect();
      await redis.stop();
      await cleanup();
    }
  });
});
