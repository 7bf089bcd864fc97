/**
 * Bearer tokens (API_TOKENS). Each token is a tenant: it sees only the jobs it
 * created. Tokens are compared in constant time, as sha256 digests so lengths
 * leak nothing either, against every configured token without an early exit.
 * Without API_TOKENS the API is open and everyone is the tenant "anonymous".
 */
import { hash, timingSafeEqual } from 'node:crypto';
import type { FastifyRequest } from 'fastify';
import { tenantOf } from '../queue/records.js';
import { ApiError } from './errors.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Who is asking: a hash of the bearer token, or "anonymous" when auth is off. */
    tenant: string;
  }
}

// One-shot hash: no Hash object per request (a status poll hashes the presented token every time).
const digest = (s: string): Buffer => hash('sha256', s, 'buffer');

export function createAuthenticator(tokens: readonly string[]): (request: FastifyRequest) => void {
  const digests = tokens.map(digest);
  // The tenant of each configured token, worked out once (a status poll would hash the token a second time per request).
  const tenants = tokens.map(tenantOf);
  return (request) => {
    if (digests.length === 0) {
      request.tenant = tenantOf(undefined);
      return;
    }
    const header = request.headers.authorization;
    const m = typeof header === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
    if (!m) throw new ApiError('UNAUTHORIZED', 'missing bearer token', { 'www-authenticate': 'Bearer realm="diskconv"' });
    const presented = digest(m[1] as string);
    let matched = -1;
    for (let i = 0; i < digests.length; i++) if (timingSafeEqual(digests[i] as Buffer, presented)) matched = i;
    if (matched < 0) throw new ApiError('UNAUTHORIZED', 'invalid bearer token', { 'www-authenticate': 'Bearer realm="diskconv", error="invalid_token"' });
    request.tenant = tenants[matched] as string;
  };
}
