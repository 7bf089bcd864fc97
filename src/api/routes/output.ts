/** GET and HEAD /v1/jobs/{id}/output: the raw image, with ETag (its sha256) and single byte ranges. */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ByteRange } from '../../store/index.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { findJob } from './jobs.js';

/**
 * Parses a Range header against `size`. Returns undefined to serve the whole
 * object (no header, a syntax we ignore, several ranges), a range, or 'unsatisfiable'.
 */
export function parseRange(header: string | undefined, size: number): ByteRange | 'unsatisfiable' | undefined {
  if (!header) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m) return undefined; // multiple or malformed ranges: RFC 9110 lets us send the whole representation
  const [, a = '', b = ''] = m;
  if (a === '' && b === '') return undefined;
  if (a === '') {
    const suffix = Number(b);
    if (suffix === 0 || size === 0) return 'unsatisfiable';
    return { start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(a);
  const end = b === '' ? size - 1 : Math.min(Number(b), size - 1);
  if (start >= size || (b !== '' && Number(b) < start)) return 'unsatisfiable';
  return { start, end };
}

/** A job that converted: succeeded, or failed only in publishing into Glance (its output kept). */
export function outputServable(rec: { state: string; error?: { code: string } | null | undefined }): boolean {
  return rec.state === 'succeeded' || (rec.state === 'failed' && rec.error?.code.startsWith('GLANCE_') === true);
}

export async function outputRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  const serve = async (request: FastifyRequest, reply: FastifyReply, withBody: boolean): Promise<FastifyReply> => {
    const rec = await findJob(ctx, request);
    if (rec.destination) throw new ApiError('OUTPUT_ELSEWHERE', `the job writes to ${rec.destination.target} ${rec.destination.pool}/${rec.destination.image}; it is not served here`);
    if (!outputServable(rec) || !rec.output) throw new ApiError('JOB_NOT_READY', `the job is ${rec.state}; its output exists once it has succeeded`);
    const obj = await ctx.stores.output.stat(rec.id);
    if (!obj) throw new ApiError('NOT_FOUND', 'the output is no longer stored');
    const etag = `"${rec.output.sha256}"`;
    reply
      .header('etag', etag)
      .header('accept-ranges', 'bytes')
      .header('last-modified', new Date(rec.finished_at ?? obj.modifiedAt).toUTCString())
      .header('content-disposition', `attachment; filename="${rec.id}.raw"`)
      .header('cache-control', 'private, no-transform');
    const inm = request.headers['if-none-match'];
    // If-None-Match compares weakly (RFC 9110 13.1.2): W/"x" matches "x".
    if (typeof inm === 'string' && inm.split(',').some((t) => t.trim() === '*' || t.trim().replace(/^W\//, '') === etag)) return reply.code(304).send();

    const ifRange = request.headers['if-range'];
    const rangeHeader = ifRange === undefined || ifRange === etag ? request.headers.range : undefined;
    const range = parseRange(rangeHeader, obj.size);
    if (range === 'unsatisfiable') {
      throw new ApiError('RANGE_NOT_SATISFIABLE', `the output is ${obj.size} bytes`, { 'content-range': `bytes */${obj.size}` });
    }
    reply.type('application/octet-stream');
    if (range) {
      reply
        .code(206)
        .header('content-range', `bytes ${range.start}-${range.end}/${obj.size}`)
        .header('content-length', String(range.end - range.start + 1));
    } else {
      reply.header('content-length', String(obj.size));
    }
    if (!withBody || obj.size === 0) return reply.send();
    const presign = ctx.config.output.redirect === 'presigned' ? ctx.stores.output.presignedUrl?.bind(ctx.stores.output) : undefined;
    if (presign) {
      // The client fetches the bytes from the store itself (Range and all); the URL expires.
      const url = await presign(rec.id, ctx.config.output.presignedTtlSeconds);
      reply.removeHeader('content-length').removeHeader('content-range').removeHeader('content-type');
      return reply.code(307).header('location', url).header('cache-control', 'private, no-store').send();
    }
    return reply.send(await ctx.stores.output.read(rec.id, range));
  };

  const readLimit = { rateLimit: { max: ctx.config.rateLimit.reads, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } };
  app.get('/v1/jobs/:id/output', { config: readLimit, exposeHeadRoute: false }, (request, reply) => serve(request, reply, true));
  app.head('/v1/jobs/:id/output', { config: readLimit }, (request, reply) => serve(request, reply, false));
}
