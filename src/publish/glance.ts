/**
 * A small client for the OpenStack Image API v2 (Glance) and Keystone v3 password
 * auth: just what publishing needs (create, read, delete an image; upload its data;
 * stage + glance-direct import; add a location). Request bodies stream (an image
 * is never held in memory); every request has a connect and an idle timeout.
 */
import http, { type IncomingMessage } from 'node:http';
import https from 'node:https';
import type { Readable } from 'node:stream';
import type { GlanceConfig } from '../config.js';
import { AbortedError, DiskconvError } from '../engine/errors.js';

/** Glance could not be reached, timed out, or answered 5xx: worth trying again later. */
export class GlanceUnavailableError extends DiskconvError {
  readonly code = 'GLANCE_UNAVAILABLE' as const;
  readonly deterministic = false;
}

/** Glance (or Keystone) answered with a 4xx: the message is Glance's own. Trying again gives the same answer. */
export class GlanceRefusedError extends DiskconvError {
  readonly code = 'GLANCE_REFUSED' as const;
  readonly deterministic = true;
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

/** The subset of a Glance image we read. */
export interface GlanceImage {
  id: string;
  status: string;
  name?: string | null;
  size?: number | null;
  virtual_size?: number | null;
  checksum?: string | null;
  os_hash_algo?: string | null;
  os_hash_value?: string | null;
  disk_format?: string | null;
  container_format?: string | null;
  locations?: { url: string; metadata: Record<string, unknown> }[];
  os_glance_failed_import?: string;
  os_glance_importing_to_stores?: string;
  [key: string]: unknown;
}

interface Exchange {
  status: number;
  headers: IncomingMessage['headers'];
  body: string;
}

interface RequestOptions {
  method: string;
  headers?: Record<string, string>;
  /** A JSON value, or a stream of `length` bytes. */
  json?: unknown;
  stream?: { body: Readable; length: number };
  signal?: AbortSignal;
}

/** Largest error or JSON body we read from Glance or Keystone. */
const MAX_RESPONSE = 4 * 2 ** 20;

/** Glance answers errors as small HTML pages (webob); this keeps their message. */
export function glanceMessage(body: string, status: number): string {
  let text = body;
  try {
    const json = JSON.parse(body) as { message?: unknown; error?: { message?: unknown } };
    const m = json.error?.message ?? json.message;
    if (typeof m === 'string') text = m;
  } catch {
    text = body
      .replace(/<title>[\s\S]*?<\/title>/i, '')
      .replace(/<h1>[\s\S]*?<\/h1>/i, '')
      .replace(/<[^>]*>/g, ' ')
      .replace(/&#x27;|&#39;/g, "'")
      .replace(/&quot;/g, '"')
      .replace(/&lt;/g, '<')
      .replace(/&gt;/g, '>')
      .replace(/&amp;/g, '&')
      // webob escapes the HTML of its own templates' messages once more
      .replace(/<[^>]*>/g, ' ');
  }
  text = text.replace(/\s+/g, ' ').trim().slice(0, 500);
  return text === '' ? `HTTP ${status}` : text;
}

/** One HTTP exchange with connect and idle timeouts. Network failures are GlanceUnavailableError. */
function exchange(url: URL, options: RequestOptions, timeouts: { connectTimeoutMs: number; idleTimeoutMs: number }, what: string): Promise<Exchange> {
  return new Promise<Exchange>((resolve, reject) => {
    if (options.signal?.aborted) {
      reject(new AbortedError('aborted'));
      return;
    }
    const headers: Record<string, string> = { 'user-agent': 'diskconv-glance/1', accept: 'application/json', ...options.headers };
    let payload: Buffer | undefined;
    if (options.json !== undefined) {
      payload = Buffer.from(JSON.stringify(options.json));
      headers['content-type'] ??= 'application/json';
      headers['content-length'] = String(payload.length);
    } else if (options.stream) {
      headers['content-type'] ??= 'application/octet-stream';
      headers['content-length'] = String(options.stream.length);
    } else if (options.method !== 'GET' && options.method !== 'HEAD') {
      headers['content-length'] = '0';
    }
    const lib = url.protocol === 'https:' ? https : http;
    let settled = false;
    const fail = (err: Error): void => {
      if (settled) return;
      settled = true;
      cleanup();
      req.destroy();
      options.stream?.body.destroy();
      reject(err);
    };
    const onAbort = (): void => fail(new AbortedError('aborted'));
    const cleanup = (): void => {
      clearTimeout(connectTimer);
      options.signal?.removeEventListener('abort', onAbort);
    };
    const req = lib.request(url, { method: options.method, headers });
    const connectTimer = setTimeout(
      () => fail(new GlanceUnavailableError(`${what}: no connection to ${url.host} within ${timeouts.connectTimeoutMs} ms`)),
      timeouts.connectTimeoutMs,
    );
    req.on('socket', (socket) => {
      if (!socket.connecting) clearTimeout(connectTimer);
      else socket.once('connect', () => clearTimeout(connectTimer));
    });
    req.setTimeout(timeouts.idleTimeoutMs, () => fail(new GlanceUnavailableError(`${what}: ${url.host} was idle for ${timeouts.idleTimeoutMs} ms`)));
    req.on('error', (err: NodeJS.ErrnoException) => fail(new GlanceUnavailableError(`${what}: ${err.code ?? err.message} (${url.host})`, { cause: err })));
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size <= MAX_RESPONSE) chunks.push(chunk);
      });
      res.on('error', (err) => fail(new GlanceUnavailableError(`${what}: ${err.message}`, { cause: err })));
      res.on('end', () => {
        if (settled) return;
        settled = true;
        cleanup();
        // A refusal may arrive before the whole upload was sent: stop sending.
        options.stream?.body.unpipe(req);
        options.stream?.body.destroy();
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') });
      });
    });
    options.signal?.addEventListener('abort', onAbort, { once: true });
    if (payload) req.end(payload);
    else if (options.stream) {
      options.stream.body.on('error', (err) => fail(err instanceof DiskconvError ? err : new GlanceUnavailableError(`${what}: reading the output failed: ${err.message}`, { cause: err })));
      options.stream.body.pipe(req);
    } else req.end();
  });
}

/** Turns a non-2xx answer into the error it means. */
function failure(what: string, ex: Exchange): DiskconvError {
  const message = `${what}: ${glanceMessage(ex.body, ex.status)}`;
  if (ex.status >= 500 || ex.status === 429 || ex.status === 408) return new GlanceUnavailableError(`${message} (HTTP ${ex.status})`);
  return new GlanceRefusedError(message, ex.status);
}

function parseJson<T>(what: string, ex: Exchange): T {
  try {
    return JSON.parse(ex.body) as T;
  } catch {
    throw new GlanceUnavailableError(`${what}: the answer is not JSON (HTTP ${ex.status})`);
  }
}

/** Where tokens come from: a static one, or Keystone v3 password auth (cached until it expires). */
export interface TokenSource {
  token(signal?: AbortSignal): Promise<string>;
  /** The token was refused (401): forget it, so the next call fetches a new one. */
  invalidate(token: string): boolean;
}

export class StaticToken implements TokenSource {
  constructor(private readonly value: string) {}
  async token(): Promise<string> {
    return this.value;
  }
  invalidate(): boolean {
    return false;
  }
}

/** A token refreshed this long before Keystone's expiry. */
const TOKEN_MARGIN_MS = 60_000;

export class KeystonePasswordAuth implements TokenSource {
  private cached: { token: string; expiresAt: number } | undefined;
  private pending: Promise<string> | undefined;

  constructor(
    private readonly auth: Extract<GlanceConfig['auth'], { kind: 'password' }>,
    private readonly timeouts: { connectTimeoutMs: number; idleTimeoutMs: number },
  ) {}

  async token(signal?: AbortSignal): Promise<string> {
    if (this.cached && this.cached.expiresAt - TOKEN_MARGIN_MS > Date.now()) return this.cached.token;
    this.pending ??= this.fetchToken(signal).finally(() => {
      this.pending = undefined;
    });
    return this.pending;
  }

  invalidate(token: string): boolean {
    if (this.cached?.token !== token) return this.cached !== undefined;
    this.cached = undefined;
    return true;
  }

  private async fetchToken(signal?: AbortSignal): Promise<string> {
    const a = this.auth;
    const base = a.authUrl.replace(/\/+$/, '');
    const url = new URL(`${/\/v3$/.test(base) ? base : `${base}/v3`}/auth/tokens`);
    const ex = await exchange(
      url,
      {
        method: 'POST',
        json: {
          auth: {
            identity: { methods: ['password'], password: { user: { name: a.username, domain: { name: a.userDomainName }, password: a.password } } },
            scope: { project: { name: a.projectName, domain: { name: a.projectDomainName } } },
          },
        },
        ...(signal ? { signal } : {}),
      },
      this.timeouts,
      'Keystone token',
    );
    if (ex.status !== 201 && ex.status !== 200) throw failure('Keystone token', ex);
    const token = ex.headers['x-subject-token'];
    if (typeof token !== 'string' || token === '') throw new GlanceUnavailableError('Keystone token: the answer has no X-Subject-Token');
    const body = parseJson<{ token?: { expires_at?: string } }>('Keystone token', ex);
    const expiresAt = Date.parse(body.token?.expires_at ?? '') || Date.now() + 3600_000;
    this.cached = { token, expiresAt };
    return token;
  }
}

export function tokenSource(config: GlanceConfig): TokenSource {
  return config.auth.kind === 'token' ? new StaticToken(config.auth.token) : new KeystonePasswordAuth(config.auth, config);
}

/** What an image is created with: ours (`disk_format` raw, `container_format` bare) plus the job's fields. */
export interface ImageCreate {
  /** The image's id, chosen by us (a UUID), so it is known before Glance answers. */
  id?: string;
  name?: string;
  visibility?: string;
  min_disk?: number;
  min_ram?: number;
  protected?: boolean;
  properties?: Record<string, string>;
}

export class GlanceClient {
  private readonly base: string;
  constructor(
    private readonly config: GlanceConfig,
    private readonly tokens: TokenSource = tokenSource(config),
  ) {
    this.base = config.url;
  }

  /** One authenticated request; a 401 refreshes a Keystone token once and tries again (bodies that are not streams only). */
  private async call(path: string, options: RequestOptions, what: string): Promise<Exchange> {
    for (let attempt = 0; ; attempt++) {
      const token = await this.tokens.token(options.signal);
      const ex = await exchange(new URL(`${this.base}${path}`), { ...options, headers: { ...options.headers, 'x-auth-token': token } }, this.config, what);
      if (ex.status === 401 && attempt === 0 && !options.stream && this.tokens.invalidate(token)) continue;
      return ex;
    }
  }

  /** Checks the token is good before a stream is sent (a stream cannot be sent twice). */
  private async refreshIfRefused(signal?: AbortSignal): Promise<void> {
    const ex = await this.call('/v2/schemas/image', { method: 'GET', ...(signal ? { signal } : {}) }, 'Glance');
    if (ex.status >= 300) throw failure('Glance', ex);
  }

  async createImage(fields: ImageCreate, signal?: AbortSignal): Promise<GlanceImage> {
    const { properties, ...rest } = fields;
    const body = { ...properties, ...rest, disk_format: 'raw', container_format: 'bare' };
    const ex = await this.call('/v2/images', { method: 'POST', json: body, ...(signal ? { signal } : {}) }, 'creating the Glance image');
    if (ex.status !== 201 && ex.status !== 200) throw failure('creating the Glance image', ex);
    return parseJson<GlanceImage>('creating the Glance image', ex);
  }

  /** The image, or undefined when Glance does not know it (404). */
  async getImage(id: string, signal?: AbortSignal): Promise<GlanceImage | undefined> {
    const ex = await this.call(`/v2/images/${encodeURIComponent(id)}`, { method: 'GET', ...(signal ? { signal } : {}) }, 'reading the Glance image');
    if (ex.status === 404) return undefined;
    if (ex.status !== 200) throw failure('reading the Glance image', ex);
    return parseJson<GlanceImage>('reading the Glance image', ex);
  }

  /** Deletes the image; an image already gone is fine. */
  async deleteImage(id: string, signal?: AbortSignal): Promise<void> {
    const ex = await this.call(`/v2/images/${encodeURIComponent(id)}`, { method: 'DELETE', ...(signal ? { signal } : {}) }, 'deleting the Glance image');
    if (ex.status !== 204 && ex.status !== 200 && ex.status !== 404) throw failure('deleting the Glance image', ex);
  }

  /** Sets or clears `protected` (a protected image cannot be deleted). */
  async setProtected(id: string, value: boolean, signal?: AbortSignal): Promise<void> {
    const ex = await this.call(
      `/v2/images/${encodeURIComponent(id)}`,
      {
        method: 'PATCH',
        headers: { 'content-type': 'application/openstack-images-v2.1-json-patch' },
        json: [{ op: 'replace', path: '/protected', value }],
        ...(signal ? { signal } : {}),
      },
      value ? 'protecting the Glance image' : 'unprotecting the Glance image',
    );
    if (ex.status !== 200) throw failure(value ? 'protecting the Glance image' : 'unprotecting the Glance image', ex);
  }

  /** PUT /v2/images/{id}/file: the image's data, streamed. */
  async uploadData(id: string, body: Readable, length: number, signal?: AbortSignal): Promise<void> {
    await this.refreshIfRefused(signal);
    const headers: Record<string, string> = this.config.store ? { 'x-image-meta-store': this.config.store } : {};
    const ex = await this.call(
      `/v2/images/${encodeURIComponent(id)}/file`,
      { method: 'PUT', headers, stream: { body, length }, ...(signal ? { signal } : {}) },
      'uploading to Glance',
    );
    if (ex.status !== 204 && ex.status !== 200) throw failure('uploading to Glance', ex);
  }

  /** PUT /v2/images/{id}/stage: the data into Glance's staging area (interoperable import). */
  async stageData(id: string, body: Readable, length: number, signal?: AbortSignal): Promise<void> {
    await this.refreshIfRefused(signal);
    const ex = await this.call(
      `/v2/images/${encodeURIComponent(id)}/stage`,
      { method: 'PUT', stream: { body, length }, ...(signal ? { signal } : {}) },
      'staging the image in Glance',
    );
    if (ex.status !== 204 && ex.status !== 200) throw failure('staging the image in Glance', ex);
  }

  /** POST /v2/images/{id}/import with glance-direct: Glance moves the staged data into its store. */
  async importStaged(id: string, signal?: AbortSignal): Promise<void> {
    const json: Record<string, unknown> = { method: { name: 'glance-direct' } };
    if (this.config.store) json.stores = [this.config.store];
    const ex = await this.call(`/v2/images/${encodeURIComponent(id)}/import`, { method: 'POST', json, ...(signal ? { signal } : {}) }, 'importing into Glance');
    if (ex.status !== 202 && ex.status !== 200) throw failure('importing into Glance', ex);
  }

  /**
   * Adds a location (e.g. rbd://FSID/POOL/IMAGE/snap) to a queued image, with the
   * hashes Glance records as its own (Glance does not check them against the data).
   */
  async addLocation(id: string, url: string, validation: { checksum: string; os_hash_algo: 'sha512'; os_hash_value: string }, signal?: AbortSignal): Promise<GlanceImage> {
    const ex = await this.call(
      `/v2/images/${encodeURIComponent(id)}`,
      {
        method: 'PATCH',
        headers: { 'content-type': 'application/openstack-images-v2.1-json-patch' },
        json: [{ op: 'add', path: '/locations/-', value: { url, metadata: {}, validation_data: validation } }],
        ...(signal ? { signal } : {}),
      },
      'adding the location to the Glance image',
    );
    if (ex.status !== 200) throw failure('adding the location to the Glance image', ex);
    return parseJson<GlanceImage>('adding the location to the Glance image', ex);
  }
}
