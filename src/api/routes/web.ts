/**
 * The web page (GET / and its static files, from the package's web/ folder via
 * @fastify/static), the headers that keep it safe, GET /v1/service (what the page
 * needs to know: auth, output targets, limits) and POST /v1/jobs/{id}/output/link
 * (a signed, short-lived download link).
 */
import { fileURLToPath } from 'node:url';
import fastifyStatic from '@fastify/static';
import type { FastifyInstance } from 'fastify';
import { SOURCE_FORMATS } from '../bodies.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import type { LinkSigner } from '../signed-links.js';
import { findJob } from './jobs.js';
import { outputServable } from './output.js';

/** web/ sits at the package root, next to dist/ and src/. */
export const WEB_ROOT = fileURLToPath(new URL('../../../web/', import.meta.url));

/** No inline script or style, nothing from another origin, never framed. */
export const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "connect-src 'self'",
  "form-action 'self'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
].join('; ');

export interface OutputTarget {
  /** `store`, or `rbd:POOL`. */
  id: string;
  label: string;
  kind: 'store' | 'rbd';
  /** For an RBD target: the pool (one of RBD_POOLS), sent as output_target=rbd & rbd_pool. */
  pool?: string;
}

/** Where a job's output can go: the store always, and each RBD pool RBD_POOLS allows. */
export function outputTargets(ctx: Pick<ApiContext, 'config'>): OutputTarget[] {
  const pools = ctx.config.rbd?.pools ?? [];
  return [
    { id: 'store', label: 'This service (download)', kind: 'store' },
    ...pools.map((pool): OutputTarget => ({ id: `rbd:${pool}`, label: `Ceph RBD pool ${pool}`, kind: 'rbd', pool })),
  ];
}

export async function webRoutes(app: FastifyInstance, ctx: ApiContext, links: LinkSigner): Promise<void> {
  const securityHeaders = {
    'x-content-type-options': 'nosniff',
    'content-security-policy': CONTENT_SECURITY_POLICY,
    'x-frame-options': 'DENY',
    'referrer-policy': 'no-referrer',
  };
  // A callback hook: it runs for every response, status polls included.
  app.addHook('onSend', (_request, reply, payload, done) => {
    reply.headers(securityHeaders);
    done(null, payload);
  });

  await app.register(fastifyStatic, {
    root: WEB_ROOT,
    prefix: '/',
    wildcard: false,
    index: ['index.html'],
    serveDotFiles: false,
    cacheControl: true,
    maxAge: 0,
  });

  const readLimit = { rateLimit: { max: ctx.config.rateLimit.reads, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } };

  app.get('/v1/service', { config: readLimit }, async () => ({
    auth: ctx.config.apiTokens.length > 0,
    source_formats: SOURCE_FORMATS,
    targets: outputTargets(ctx),
    max_upload_bytes: ctx.config.maxUploadBytes,
    webhooks: ctx.config.webhooks.secret !== undefined,
    /** The page offers the Glance fields only when the service publishes into Glance. */
    glance: ctx.config.glance !== undefined,
    uploads: '/v1/uploads',
    link_ttl_seconds: ctx.config.links.ttlSeconds,
  }));

  app.post('/v1/jobs/:id/output/link', { config: readLimit }, async (request) => {
    const rec = await findJob(ctx, request);
    // The same jobs GET .../output serves (a Glance failure keeps the converted image).
    if (!outputServable(rec)) throw new ApiError('JOB_NOT_READY', `the job is ${rec.state}; its output exists once it has succeeded`);
    const link = links.sign(rec.id, rec.tenant);
    return { href: link.href, expires_at: new Date(link.expiresAt).toISOString() };
  });
}
