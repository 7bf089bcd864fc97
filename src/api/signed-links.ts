/**
 * Signed download links: `/v1/jobs/{id}/output?expires=<unix s>&sig=<base64url>`,
 * sig = HMAC-SHA256(LINK_SECRET, "diskconv-output-v1\n<job id>\n<tenant>\n<expires>").
 * Bound to the job and its tenant and short-lived (LINK_TTL_SECONDS), so a browser can
 * hand the URL to its own download manager without the bearer token ever being in a URL.
 * The output route accepts such a query instead of an Authorization header.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { FastifyRequest } from 'fastify';
import type { JobRecords } from '../queue/records.js';
import { ApiError } from './errors.js';

export interface LinkSigner {
  sign(id: string, tenant: string, now?: number): { href: string; expiresAt: number };
  /** For a request carrying `expires` and `sig`: sets request.tenant and returns true, or throws 401. False when the query has no signature. */
  authenticate(request: FastifyRequest): Promise<boolean>;
  /** Whether the request offers a signed link at all (what `authenticate` looks at first, synchronously). */
  offered(request: FastifyRequest): boolean;
}

const OUTPUT_ROUTE = '/v1/jobs/:id/output';

export function createLinkSigner(options: { secret: string | undefined; ttlSeconds: number }, records: JobRecords): LinkSigner {
  const secret = options.secret ?? randomBytes(32).toString('hex');
  const mac = (id: string, tenant: string, expires: number): Buffer =>
    createHmac('sha256', secret).update(`diskconv-output-v1\n${id}\n${tenant}\n${expires}`).digest();

  return {
    sign(id, tenant, now = Date.now()) {
      const expires = Math.floor(now / 1000) + options.ttlSeconds;
      const sig = mac(id, tenant, expires).toString('base64url');
      return { href: `/v1/jobs/${id}/output?expires=${expires}&sig=${sig}`, expiresAt: expires * 1000 };
    },
    offered(request) {
      if (request.routeOptions.url !== OUTPUT_ROUTE || (request.method !== 'GET' && request.method !== 'HEAD')) return false;
      const q = (request.query ?? {}) as Record<string, unknown>;
      return q.sig !== undefined || q.expires !== undefined;
    },
    async authenticate(request) {
      if (!this.offered(request)) return false;
      const q = (request.query ?? {}) as Record<string, unknown>;
      const refuse = (why: string): never => {
        throw new ApiError('UNAUTHORIZED', `the download link is ${why}; ask for a new one`, { 'www-authenticate': 'Bearer realm="diskconv"' });
      };
      if (typeof q.sig !== 'string' || typeof q.expires !== 'string' || !/^\d{1,12}$/.test(q.expires) || !/^[A-Za-z0-9_-]{43}$/.test(q.sig)) refuse('malformed');
      const expires = Number(q.expires);
      if (expires * 1000 < Date.now()) refuse('expired');
      const { id } = request.params as { id: string };
      const rec = /^[A-Za-z0-9_-]{22}$/.test(id) ? await records.get(id) : undefined;
      // An unknown job and a bad signature look alike.
      const expected = mac(id, rec?.tenant ?? '', expires);
      const given = Buffer.from(q.sig as string, 'base64url');
      if (!rec || given.length !== expected.length || !timingSafeEqual(given, expected)) refuse('invalid');
      request.tenant = (rec as { tenant: string }).tenant;
      return true;
    },
  };
}
