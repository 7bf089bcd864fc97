/**
 * The HTTP API as a fastify plugin, built from the configuration and its
 * dependencies (records, queue, store, Redis). server.ts only adds a logger, a
 * listening socket and a graceful close; tests build it with their own deps.
 */
import { randomUUID } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import multipart from '@fastify/multipart';
import rateLimit from '@fastify/rate-limit';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyPluginAsync, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Config } from '../config.js';
import { Leases } from '../queue/leases.js';
import { UploadMarks } from '../queue/upload-stream.js';
import { urlPolicy } from '../queue/url-import.js';
import { createAuthenticator } from './auth.js';
import type { ApiContext, AppDeps } from './context.js';
import { IdempotencyKeys } from './idempotency.js';
import { RateCounters } from './rate-counters.js';
import { ApiError, clientErrorProblem, errorHandler, problemFor, sendProblem } from './errors.js';
import { eventRoutes } from './routes/events.js';
import { inspectRoutes } from './routes/inspect.js';
import { jobRoutes } from './routes/jobs.js';
import { opsRoutes } from './routes/ops.js';
import { outputRoutes } from './routes/output.js';
import { uploadRoutes } from './routes/uploads.js';
import { webRoutes } from './routes/web.js';
import { createLinkSigner } from './signed-links.js';

export type { AppDeps } from './context.js';

/** JSON bodies are small requests, never images. */
export const JSON_BODY_LIMIT = 64 * 1024;

/** Multipart limits: one file part, a few small fields. */
export const MULTIPART_LIMITS = { files: 1, fields: 8, fieldSize: 1024, fieldNameSize: 64, parts: 10, headerPairs: 64 } as const;

export function diskconvApp(config: Config, deps: AppDeps): FastifyPluginAsync {
  const plugin: FastifyPluginAsync = async (app) => {
    const scratchDir = join(config.dataDir, 'work');
    await mkdir(scratchDir, { recursive: true, mode: 0o750 });
    const ctx: ApiContext = { ...deps, config, policy: urlPolicy(config), scratchDir,
      leases: new Leases(deps.redis, config.queueName),
      uploadMarks: new UploadMarks(deps.redis, config.queueName),
      idempotency: new IdempotencyKeys(deps.redis, config.queueName, config.idempotency.ttlSeconds),
    };

    app.setErrorHandler(errorHandler);
    app.setNotFoundHandler((request, reply) => {
      const path = request.url.split('?')[0] ?? '';
      sendProblem(reply, problemFor('NOT_FOUND', `no route ${request.method} ${path.slice(0, 200)}`));
    });

    const authenticate = createAuthenticator(config.apiTokens);
    // A signed download link (?expires=&sig=) stands in for the token on the output route.
    const links = createLinkSigner(config.links, deps.records);
    app.decorateRequest('tenant', '');
    const authFailures = new WeakMap<object, unknown>();
    // Decided by the matched route, not the raw URL: `/%761/jobs` routes to /v1/jobs too.
    // A refused token is answered only after the rate limit (a route-level onRequest
    // hook, so after this one) has counted the request against the caller's address:
    // guessing tokens costs rate limit like anything else.
    // Callback hooks, not async ones: every status poll passes here, and a promise per hook is a cost it need not pay.
    const check = (request: FastifyRequest): void => {
      try {
        authenticate(request);
      } catch (err) {
        authFailures.set(request, err);
      }
    };
    app.addHook('onRequest', (request, _reply, done) => {
      const route = request.routeOptions.url;
      if (route === undefined || (route !== '/v1' && !route.startsWith('/v1/'))) return done();
      if (!links.offered(request)) {
        check(request);
        return done();
      }
      links.authenticate(request).then(
        (ok) => {
          if (!ok) check(request);
          done();
        },
        (err: unknown) => {
          authFailures.set(request, err);
          done();
        },
      );
    });
    app.addHook('preParsing', (request, _reply, payload, done) => {
      const failure = authFailures.get(request);
      if (failure !== undefined) done(failure as Error);
      else done(null, payload);
    });

    // Images arrive as a stream the route handler reads into the store.
    app.addContentTypeParser('application/octet-stream', (_request, payload, done) => done(null, payload));
    await app.register(multipart, { limits: { ...MULTIPART_LIMITS, fileSize: config.maxUploadBytes }, throwFileSizeLimit: true });
    // Counted here first and settled with Redis in batches (rate-counters.ts says within what bound).
    const counters = new RateCounters(deps.redis, { namespace: `diskconv:${config.queueName}:ratelimit:`, localPercent: config.rateLimit.localPercent, settleMs: config.rateLimit.settleMs });
    // What is still counted here is sent on close, not waited for: a Redis that does not answer must not hold the shutdown.
    app.addHook('onClose', (_instance, done) => {
      void counters.close();
      done();
    });
    await app.register(rateLimit, {
      global: false,
      store: counters.storeClass(),
      // After authentication (a global onRequest hook runs before this route-level one), so a
      // valid token is counted as its tenant, anything else as its address; before the body is read.
      hook: 'onRequest',
      keyGenerator: (request) => (request.tenant && request.tenant !== 'anonymous' ? `t:${request.tenant}` : `ip:${request.ip}`),
      errorResponseBuilder: (_request, context) => new ApiError('RATE_LIMITED', `rate limit of ${context.max} requests exceeded; retry in ${context.after}`),
    });

    await opsRoutes(app, ctx);
    await jobRoutes(app, ctx);
    await outputRoutes(app, ctx);
    await inspectRoutes(app, ctx);
    await eventRoutes(app, ctx);
    await webRoutes(app, ctx, links);
    await uploadRoutes(app, ctx);
  };
  // Like fastify-plugin: the handlers and hooks above apply to the whole instance.
  (plugin as unknown as Record<symbol, boolean>)[Symbol.for('skip-override')] = true;
  return plugin;
}

/**
 * Fastify's request lines, except for reads that succeed: a GET or HEAD answered
 * below 400 (a status poll, a download) is logged at debug, and a read that fails
 * gets one info line (its outcome) instead of two. At LOG_LEVEL=info the two lines
 * of every poll cost more than answering it (58 -> 90 us of API CPU per poll).
 */
export class RequestLog extends LogController {
  override incomingRequest(request: FastifyRequest, reply: FastifyReply, metadata?: Record<string, unknown>): void {
    if (request.method === 'GET' || request.method === 'HEAD') {
      if (!this.isLogDisabled(request)) request.log.debug({ req: request }, 'incoming request');
      return;
    }
    super.incomingRequest(request, reply, metadata);
  }

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply, metadata?: Record<string, unknown>): void {
    if (!error && reply.statusCode < 400 && (request.method === 'GET' || request.method === 'HEAD')) {
      if (!this.isLogDisabled(request)) reply.log.debug({ res: reply, responseTime: reply.elapsedTime }, 'request completed');
      return;
    }
    super.requestCompleted(error, request, reply, metadata);
  }
}

export async function buildApp(config: Config, deps: AppDeps, options: { logger?: FastifyBaseLogger } = {}): Promise<FastifyInstance> {
  const app = Fastify({
    ...(options.logger ? { loggerInstance: options.logger } : { logger: false }),
    logController: new RequestLog(),
    bodyLimit: JSON_BODY_LIMIT,
    trustProxy: config.trustProxy,
    exposeHeadRoutes: false,
    return503OnClosing: true,
    genReqId: () => randomUUID(),
    // Fastify's own refusals (bad URL encoding, an over-long path parameter) are problem+json too.
    frameworkErrors: (err, _request, reply) => {
      const code = (err as { code?: string }).code;
      if (code === 'FST_ERR_MAX_PARAM_LENGTH') {
        // Never echo the URL: it is long by definition and may carry anything.
        return sendProblem(reply, problemFor('URI_TOO_LONG', 'a path segment is longer than allowed'));
        return sendProblem(reply, { ...problemFor('BAD_REQUEST', 'a path segment is longer than allowed'), status: 414, title: 'URI too long', code: 'URI_TOO_LONG' });
      }
      return sendProblem(reply, problemFor('BAD_REQUEST', code === 'FST_ERR_BAD_URL' ? 'the URL is malformed' : 'the request is malformed'));
    },
    clientErrorHandler: clientErrorProblem,
  });
  await app.register(diskconvApp(config, deps));
  return app;
}
