/**
 * One HTTP exchange with a checked URL: connects to the checked address only
 * (the request's DNS lookup is pinned to it, Host and SNI keep the name), with
 * connect and idle timeouts and an AbortSignal; and the redirect loop on top,
 * which re-checks every Location.
 */
import http, { type ClientRequest, type IncomingMessage } from 'node:http';
import https from 'node:https';
import { isIP, type LookupFunction } from 'node:net';
import { AbortedError, DiskconvError, SourceUnavailableError } from '../engine/errors.js';
import { UrlFetchError, UrlRefusedError } from './errors.js';
import { checkRedirect, type CheckedUrl, type UrlPolicy } from './url-policy.js';

export const USER_AGENT = 'diskconv-url-import/1';

const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);

/** TLS verification failures will fail the same way next time. */
const TLS_CERT_CODES = new Set([
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'ERR_TLS_CERT_ALTNAME_INVALID',
  'CERT_REVOKED',
  'CERT_UNTRUSTED',
]);

export interface Agents {
  http: http.Agent;
  https: https.Agent;
}

/** Keep-alive agents for a series of requests to the same server (range reads). */
export function createAgents(maxSockets: number): Agents {
  return {
    http: new http.Agent({ keepAlive: true, maxSockets }),
    https: new https.Agent({ keepAlive: true, maxSockets }),
  };
}

export function destroyAgents(agents: Agents): void {
  agents.http.destroy();
  agents.https.destroy();
}

export interface RequestSpec {
  /** GET unless given (webhook deliveries POST). */
  method?: 'GET' | 'POST';
  /** Sent whole, with its Content-Length. */
  body?: Buffer;
  headers?: Record<string, string>;
  signal?: AbortSignal;
  agents?: Agents;
}

/** A URL for messages and source names: no query (presigned URLs carry secrets there), no fragment. */
export function displayUrl(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname}`;
}

function mapNetworkError(err: unknown, what: string): DiskconvError {
  if (err instanceof DiskconvError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  const message = err instanceof Error ? err.message : String(err);
  if (code !== undefined && TLS_CERT_CODES.has(code)) return new UrlFetchError(`${what}: TLS certificate refused (${code}): ${message}`, undefined, { cause: err });
  return new SourceUnavailableError(`${what}: ${message}${code && !message.includes(code) ? ` (${code})` : ''}`, { cause: err });
}

/** A response whose body is read through `body()`, which reports failures as typed errors. */
export class Exchange {
  private failure: DiskconvError | undefined;
  private finished = false;
  private cleanups: Array<() => void> = [];

  constructor(
    private readonly request: ClientRequest,
    readonly response: IncomingMessage,
    readonly checked: CheckedUrl,
    failure: DiskconvError | undefined,
  ) {
    this.failure = failure;
  }

  get status(): number {
    return this.response.statusCode ?? 0;
  }

  header(name: string): string | undefined {
    const value = this.response.headers[name.toLowerCase()];
    return Array.isArray(value) ? value[0] : value;
  }

  /** @internal */
  setFailure(err: DiskconvError): void {
    this.failure ??= err;
  }

  /** @internal */
  onFinish(cleanup: () => void): void {
    if (this.finished) cleanup();
    else this.cleanups.push(cleanup);
  }

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    for (const cleanup of this.cleanups.splice(0)) cleanup();
  }

  /** The body's chunks; a dropped connection, timeout or abort is thrown as a typed error. */
  async *body(): AsyncGenerator<Buffer> {
    try {
      for await (const chunk of this.response) yield chunk as Buffer;
      if (this.failure) throw this.failure;
      if (!this.response.complete) throw new SourceUnavailableError(`connection to ${this.checked.url.host} closed before the body was complete`);
    } catch (err) {
      throw this.failure ?? mapNetworkError(err, `reading from ${displayUrl(this.checked.url)}`);
    } finally {
      this.finish();
      if (!this.response.complete) this.request.destroy();
    }
  }

  /** Drops the response without reading it (closes the connection). */
  discard(): void {
    this.finish();
    this.request.destroy();
  }

  /** Throws the typed error for a status outside `ok` (after discarding the body). */
  expectStatus(ok: readonly number[]): void {
    const status = this.status;
    if (ok.includes(status)) return;
    this.discard();
    const where = displayUrl(this.checked.url);
    if (status === 408 || status === 429 || status >= 500) {
      throw new SourceUnavailableError(`${where} answered ${status} ${this.response.statusMessage ?? ''}`.trimEnd());
    }
    throw new UrlFetchError(`${where} answered ${status} ${this.response.statusMessage ?? ''}`.trimEnd(), status);
  }
}

function pinnedLookup(checked: CheckedUrl): LookupFunction {
  // Node calls this instead of DNS: the connection goes to addresses we checked
  // and to nothing else, whatever the name resolves to by now.
  const all = checked.addresses && checked.addresses.length > 0 ? checked.addresses : [{ address: checked.address, family: checked.family }];
  return ((_hostname: string, options: { all?: boolean }, callback: (...args: unknown[]) => void) => {
    if (options?.all) callback(null, all.map((a) => ({ address: a.address, family: a.family })));
    else callback(null, checked.address, checked.family);
  }) as unknown as LookupFunction;
}

/** Sends one GET to the checked address and waits for the response headers. */
export function sendRequest(checked: CheckedUrl, policy: UrlPolicy, spec: RequestSpec = {}): Promise<Exchange> {
  const { url } = checked;
  const secure = url.protocol === 'https:';
  const hostname = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  const where = displayUrl(url);
  const signal = spec.signal;
  if (signal?.aborted) return Promise.reject(new AbortedError());

  return new Promise<Exchange>((resolve, reject) => {
    const options: https.RequestOptions = {
      method: spec.method ?? 'GET',
      hostname,
      port: url.port === '' ? (secure ? 443 : 80) : Number(url.port),
      path: `${url.pathname}${url.search}`,
      headers: { 'user-agent': USER_AGENT, 'accept-encoding': 'identity', ...(spec.body ? { 'content-length': String(spec.body.length) } : {}), ...spec.headers },
      lookup: pinnedLookup(checked),
      agent: spec.agents ? (secure ? spec.agents.https : spec.agents.http) : false,
    };
    if (secure && isIP(hostname) === 0) options.servername = hostname;
    const request = (secure ? https : http).request(options);

    let failure: DiskconvError | undefined;
    let exchange: Exchange | undefined;
    const fail = (err: DiskconvError): void => {
      failure ??= err;
      exchange?.setFailure(err);
      request.destroy(err);
    };

    let connectTimer: NodeJS.Timeout | undefined = setTimeout(
      () => fail(new SourceUnavailableError(`connecting to ${url.host} (${checked.address}) timed out after ${policy.connectTimeoutMs} ms`)),
      policy.connectTimeoutMs,
    );
    const clearConnect = (): void => {
      if (connectTimer) clearTimeout(connectTimer);
      connectTimer = undefined;
    };
    request.on('socket', (socket) => {
      if (socket.connecting) socket.once('connect', clearConnect);
      else clearConnect(); // a kept-alive socket
    });
    request.setTimeout(policy.idleTimeoutMs, () => fail(new SourceUnavailableError(`no data from ${where} for ${policy.idleTimeoutMs} ms (idle timeout)`)));

    const onAbort = (): void => fail(new AbortedError());
    signal?.addEventListener('abort', onAbort, { once: true });
    const cleanup = (): void => {
      clearConnect();
      signal?.removeEventListener('abort', onAbort);
    };

    request.on('error', (err) => {
      cleanup();
      reject(failure ?? mapNetworkError(err, `requesting ${where}`));
    });
    request.on('close', cleanup);
    request.on('response', (response) => {
      clearConnect();
      exchange = new Exchange(request, response, checked, failure);
      exchange.onFinish(cleanup);
      resolve(exchange);
    });
    request.end(spec.body);
  });
}

/**
 * Sends a GET and follows redirects (each Location re-checked by the URL policy)
 * up to policy.maxRedirects; one more is refused. Returns the final exchange.
 */
export async function fetchFollowing(start: CheckedUrl, policy: UrlPolicy, spec: RequestSpec = {}): Promise<Exchange> {
  let checked = start;
  for (let hops = 0; ; hops++) {
    const exchange = await sendRequest(checked, policy, spec);
    if (!REDIRECT_STATUSES.has(exchange.status)) return exchange;
    const location = exchange.header('location');
    exchange.discard();
    if (location === undefined || location === '') {
      throw new UrlFetchError(`${displayUrl(checked.url)} answered ${exchange.status} without a Location`, exchange.status);
    }
    if (hops >= policy.maxRedirects) {
      throw new UrlRefusedError(`more than ${policy.maxRedirects} redirects (starting at ${displayUrl(start.url)})`, 'too-many-redirects');
    }
    checked = await checkRedirect(location, checked.url, policy);
  }
}

/** Parses `Content-Range: bytes a-b/n` (n may be '*'). */
export function parseContentRange(value: string | undefined): { start: number; end: number; total: number | undefined } | undefined {
  if (value === undefined) return undefined;
  const m = /^bytes\s+([0-9]{1,16})-([0-9]{1,16})\/([0-9]{1,16}|\*)\s*$/i.exec(value.trim());
  if (!m) return undefined;
  const start = Number(m[1]);
  const end = Number(m[2]);
  const total = m[3] === '*' ? undefined : Number(m[3]);
  if (end < start || (total !== undefined && end >= total)) return undefined;
  return { start, end, total };
}

/** Parses Content-Length strictly (digits only). */
export function parseContentLength(value: string | undefined): number | undefined {
  if (value === undefined || !/^[0-9]{1,16}$/.test(value.trim())) return undefined;
  return Number(value.trim());
}

/** The engine's abortable sleep, for the URL fetchers and the Glance publisher. */
export { sleep } from '../engine/ranged-source.js';
