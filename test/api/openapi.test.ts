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

interface OpenApiResponse {
  $ref?: string;
  description?: string;
}
interface OpenApiDoc {
  paths: Record<string, Partial<Record<(typeof METHODS)[number], { responses?: Record<string, OpenApiResponse> }>>>;
  components: { responses: Record<string, OpenApiResponse> };
}

function resolveResponse(doc: OpenApiDoc, response: OpenApiResponse): OpenApiResponse {
  const name = response.$ref?.replace('#/components/responses/', '');
  return name ? (doc.components.responses[name] ?? {}) : response;
}

describe('openapi.yaml', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let redis: Redis;
  const routes: Array<{ method: string; url: string; rateLimited: boolean }> = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-openapi-'));
    // Only the route table is needed: nothing here talks to Redis or a queue.
    redis = new Redis({ lazyConnect: true });
    const config = loadConfig({ DATA_DIR: join(dir, 'data') });
    const stores = await openStores({ dataDir: join(dir, 'data'), store: { kind: 'file', root: undefined } });
    const app = Fastify({ exposeHeadRoutes: false });
    app.addHook('onRoute', (route) => {
      const rateLimited = typeof (route.config as { rateLimit?: unknown } | undefined)?.rateLimit === 'object';
      for (const method of [route.method].flat()) routes.push({ method: method.toLowerCase(), url: route.url, rateLimited });
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

  it('names every error code the API answers with, under a response of its status', async () => {
    const doc = parse(await readFile(OPENAPI_URL, 'utf8')) as OpenApiDoc;
    // status -> the descriptions of every response documented with that status (refs resolved)
    const byStatus = new Map<string, string[]>();
    for (const item of Object.values(doc.paths)) {
      for (const m of METHODS) {
        for (const [status, response] of Object.entries(item[m]?.responses ?? {})) {
          const text = resolveResponse(doc, response).description ?? '';
          byStatus.set(status, [...(byStatus.get(status) ?? []), text]);
        }
      }
    }
    // Answered by Node's HTTP parser before any route (src/api/errors.ts clientErrorProblem): in components only.
    const beforeRouting = { HEADERS_TOO_LARGE: 'HeadersTooLarge' } as Record<string, string>;
    for (const [code, name] of Object.entries(beforeRouting)) expect(doc.components.responses[name]?.description ?? '', code).toContain(code);
    const missing = Object.entries(ERROR_CODES)
      .filter(([code]) => !(code in beforeRouting))
      .filter(([code, info]) => !(byStatus.get(String(info.status)) ?? []).some((d) => new RegExp(`\\b${code}\\b`).test(d)))
      .map(([code, info]) => `${code} (${info.status})`);
    expect(missing).toEqual([]);
  });

  it('lists every status a route can answer: 429 where rate limited, 400/401/414 on /v1, 413 on bodies, 500 and 503 everywhere (issue 11)', async () => {
    const doc = parse(await readFile(OPENAPI_URL, 'utf8')) as OpenApiDoc;
    const gaps: string[] = [];
    for (const route of routes) {
      const path = route.url.replace(/:(\w+)/g, '{$1}');
      const op = doc.paths[path]?.[route.method as (typeof METHODS)[number]];
      if (!op) continue; // the route test above names it
      const want = ['500', '503']; // any handler can fail; every route answers 503 while the process closes
      if (route.rateLimited) want.push('429');
      if (path.startsWith('/v1')) want.push('400', '401'); // a malformed URL; API_TOKENS
      if (path.includes('{')) want.push('414'); // a path parameter over fastify's maxParamLength
      if (route.method === 'post' || route.method === 'patch') want.push('413'); // any body over its limit
      for (const status of want) if (!(status in (op.responses ?? {}))) gaps.push(`${route.method} ${path}: ${status}`);
    }
    expect(routes.filter((r) => r.url.startsWith('/v1') && !r.rateLimited).map((r) => `${r.method} ${r.url}`)).toEqual([]);
    expect(gaps).toEqual([]);
  });

  it('gives every nullable schema a type (OpenAPI 3.0 ignores nullable without one)', async () => {
    const doc = parse(await readFile(OPENAPI_URL, 'utf8')) as unknown;
    const untyped: string[] = [];
    const walk = (node: unknown, where: string): void => {
      if (Array.isArray(node)) return node.forEach((n, i) => walk(n, `${where}[${i}]`));
      if (node === null || typeof node !== 'object') return;
      const o = node as Record<string, unknown>;
      if (o.nullable === true && typeof o.type !== 'string') untyped.push(where);
      for (const [k, v] of Object.entries(o)) walk(v, `${where}.${k}`);
    };
    walk(doc, '$');
    expect(untyped).toEqual([]);
  });

  it('documents the terminal progress phases the records write', async () => {
    const doc = parse(await readFile(OPENAPI_URL, 'utf8')) as { components: { schemas: { Progress: { properties: { phase: { enum: string[] }; ended_in: unknown } } } } };
    expect(doc.components.schemas.Progress.properties.phase.enum).toEqual(expect.arrayContaining(['done', 'failed', 'cancelled']));
    expect(doc.components.schemas.Progress.properties.ended_in).toBeDefined();
  });
});
