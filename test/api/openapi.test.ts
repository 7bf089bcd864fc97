import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import SwaggerParser from '@apidevtools/swagger-parser';
import Fastify from 'fastify';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { diskconvApp } from '../../src/api/app.js';
import { ERROR_CODES } from '../../src/api/errors.js';
import { OPENAPI_URL } from '../../src/api/routes/ops.js';
import { loadConfig } from '../../src/config.js';
import { JobRecords } from '../../src/queue/records.js';
import { openStores } from '../../src/store/index.js';
import { makeTempDir } from '../helpers/qemu.js';

const METHODS = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'] as const;

describe('openapi.yaml', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let redis: Redis;
  const routes: Array<{ method: string; url: string }> = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-openapi-'));
    // Only the route table is needed: nothing here talks to Redis or a queue.
    redis = new Redis({ lazyConnect: true });
    const config = loadConfig({ DATA_DIR: join(dir, 'data') });
    const stores = await openStores({ dataDir: join(dir, 'data'), store: { kind: 'file', root: undefined } });
    const app = Fastify({ exposeHeadRoutes: false });
    app.addHook('onRoute', (route) => {
      for (const method of [route.method].flat()) routes.push({ method: method.toLowerCase(), url: route.url });
    });
    const queue = { enqueue: async () => {}, removeWaiting: async () => {}, depth: async () => ({ waiting: 0, delayed: 0, active: 0 }) };
    await app.register(diskconvApp(config, { records: new JobRecords(redis, 'openapi'), queue, stores, redis }));
    await app.ready();
    await app.close();
  });
  afterAll(async () => {
    redis.disconnect();
    await cleanup();
  });

  it('is valid OpenAPI 3', async () => {
    const api = (await SwaggerParser.validate(OPENAPI_URL.pathname)) as { openapi: string };
    expect(api.openapi).toMatch(/^3\./);
  });

  it('describes every route the app registers, and nothing it does not', async () => {
    const doc = parse(await readFile(OPENAPI_URL, 'utf8')) as { paths: Record<string, Record<string, unknown>> };
    expect(routes.length).toBeGreaterThan(5);
    const registered = new Set(routes.map((r) => `${r.method} ${r.url.replace(/:(\w+)/g, '{$1}')}`));
    const documented = new Set(
      Object.entries(doc.paths).flatMap(([path, item]) => METHODS.filter((m) => m in item).map((m) => `${m} ${path}`)),
    );
    expect([...registered].filter((r) => !documented.has(r))).toEqual([]);
    expect([...documented].filter((d) => !registered.has(d))).toEqual([]);
  });

  it('names every error code the API answers with', async () => {
    const text = await readFile(OPENAPI_URL, 'utf8');
    const missing = Object.keys(ERROR_CODES).filter((code) => !['BAD_REQUEST', 'INTERNAL_ERROR', 'INVALID_ARGUMENT', 'STORE_OBJECT_MISSING', 'ABORTED'].includes(code) && !text.includes(code));
    expect(missing).toEqual([]);
  });
});
