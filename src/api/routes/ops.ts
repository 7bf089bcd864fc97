/** Operations: /healthz (alive), /readyz (Redis and store reachable), /metrics, /openapi.yaml. No auth. */
import { readFile } from 'node:fs/promises';
import type { FastifyInstance } from 'fastify';
import { isDiskconvError } from '../../engine/errors.js';
import type { ApiContext } from '../context.js';
import { problemFor, sendProblem, type Problem } from '../errors.js';
import { renderMetrics } from '../metrics.js';

/** openapi.yaml sits at the package root, next to dist/ and src/. */
export const OPENAPI_URL = new URL('../../../openapi.yaml', import.meta.url);

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} timed out`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

export async function opsRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  const openapi = await readFile(OPENAPI_URL, 'utf8');

  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async (request, reply) => {
    const checks: Record<string, string> = {};
    const [redis, store] = await Promise.allSettled([withTimeout(ctx.redis.ping(), 2000, 'redis ping'), withTimeout(Promise.all([ctx.stores.staging.ping(), ctx.stores.output.ping()]), 2000, 'store check')]);
    checks.redis = redis.status === 'fulfilled' ? 'ok' : 'unreachable';
    // The store's own reason (e.g. "bucket 'x' does not exist") is ours to show; anything else is just 'unavailable'.
    checks.store = store.status === 'fulfilled' ? 'ok' : isDiskconvError(store.reason) ? `unavailable: ${store.reason.message}` : 'unavailable';
    if (redis.status === 'rejected' || store.status === 'rejected') {
      request.log.warn({ checks }, 'not ready');
      // A problem whose `checks` say what is wrong (our own words, never an exception's), e.g. a missing bucket.
      return sendProblem(reply, { ...problemFor('NOT_READY', ''), checks } as Problem);
    }
    return { status: 'ready', checks };
  });

  app.get('/metrics', async (_request, reply) => {
    const [stats, depth] = await Promise.all([ctx.records.stats(), ctx.queue.depth()]);
    return reply.type('text/plain; version=0.0.4; charset=utf-8').send(renderMetrics({ stats, depth }));
  });

  app.get('/openapi.yaml', async (_request, reply) => reply.type('application/yaml; charset=utf-8').send(openapi));
}
