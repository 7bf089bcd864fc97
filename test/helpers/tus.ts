/** A small tus 1.0 client over fetch for tests that need to see every request (tus-js-client is in tus-client.mjs). */
import { createHash } from 'node:crypto';

export const tusHeaders = (token: string | undefined, extra: Record<string, string> = {}): Record<string, string> => ({
  'tus-resumable': '1.0.0',
  ...(token ? { authorization: `Bearer ${token}` } : {}),
  ...extra,
});

/** Upload-Metadata: `key base64(value)` pairs; a null value is a key alone. */
export function encodeMetadata(metadata: Record<string, string | null>): string {
  return Object.entries(metadata)
    .map(([k, v]) => (v === null ? k : `${k} ${Buffer.from(v).toString('base64')}`))
    .join(',');
}

export async function tusCreate(base: string, token: string | undefined, length: number, metadata: Record<string, string | null> = {}): Promise<Response> {
  const meta = encodeMetadata(metadata);
  return fetch(`${base}/v1/uploads`, { method: 'POST', headers: tusHeaders(token, { 'upload-length': String(length), ...(meta ? { 'upload-metadata': meta } : {}) }) });
}

export async function tusPatch(url: string, token: string | undefined, offset: number, bytes: Uint8Array, checksum = false): Promise<Response> {
  const extra: Record<string, string> = { 'upload-offset': String(offset), 'content-type': 'application/offset+octet-stream' };
  if (checksum) extra['upload-checksum'] = `sha256 ${createHash('sha256').update(bytes).digest('base64')}`;
  return fetch(url, { method: 'PATCH', headers: tusHeaders(token, extra), body: bytes });
}

/**
 * HEAD is idempotent, and an HTTP client may send it again when a kept-alive
 * connection turns out closed as it was reused (RFC 9110 9.2.2), as tus clients
 * do; fetch does not, so this does, once. A server that is down still fails
 * (the second attempt opens a new connection).
 */
export async function tusHead(url: string, token: string | undefined): Promise<Response> {
  try {
    return await fetch(url, { method: 'HEAD', headers: tusHeaders(token) });
  } catch (err) {
    const code = (err as { cause?: { code?: string } }).cause?.code;
    if (code !== 'ECONNRESET' && code !== 'UND_ERR_SOCKET') throw err;
    return fetch(url, { method: 'HEAD', headers: tusHeaders(token) });
  }
}

export class TusRefused extends Error {
  constructor(
    readonly status: number,
    readonly body: string,
    readonly step: string,
  ) {
    super(`tus ${step}: ${status} ${body}`);
  }
  json(): Record<string, unknown> {
    return JSON.parse(this.body) as Record<string, unknown>;
  }
}

/**
 * Creates an upload and sends `bytes` in `chunk`-sized PATCHes; resolves with the
 * upload URL and the job path the final PATCH names. Any refusal rejects with TusRefused.
 */
export async function tusUpload(
  base: string,
  token: string | undefined,
  bytes: Uint8Array,
  metadata: Record<string, string | null> = {},
  options: { chunk?: number; beforeLast?: (url: string) => Promise<void> } = {},
): Promise<{ url: string; job: string; jobId: string }> {
  const created = await tusCreate(base, token, bytes.length, metadata);
  if (created.status !== 201) throw new TusRefused(created.status, await created.text(), 'POST');
  const url = new URL(created.headers.get('location') as string, base).toString();
  const chunk = options.chunk ?? 4 * 2 ** 20;
  let job = '';
  for (let offset = 0; offset < bytes.length; offset += chunk) {
    const end = Math.min(bytes.length, offset + chunk);
    if (end === bytes.length && options.beforeLast) await options.beforeLast(url);
    const res = await tusPatch(url, token, offset, bytes.subarray(offset, end));
    if (res.status !== 204) throw new TusRefused(res.status, await res.text(), `PATCH at ${offset}`);
    if (Number(res.headers.get('upload-offset')) !== end) throw new Error(`PATCH at ${offset}: offset ${res.headers.get('upload-offset')}, expected ${end}`);
    job = res.headers.get('diskconv-job') ?? job;
  }
  if (!job) throw new Error('the final PATCH named no job');
  return { url, job, jobId: job.split('/').pop() as string };
}
