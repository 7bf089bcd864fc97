/**
 * # URL imports: which URLs the service will fetch
 *
 * A URL given by a client is fetched from the machine that runs the worker, so
 * it must not reach what that machine can reach and the client cannot (SSRF):
 * the loopback interface, the private network, the cloud metadata endpoint.
 *
 * Rules, applied to the URL a client gives and again to every redirect target:
 * - Schemes `http` and `https` only. A redirect from https to http is refused.
 * - No user-info (`http://user:pass@host/`, even an empty `http://@host/`).
 * - IPv4 literals must be written in canonical dotted decimal. Decimal
 *   (`http://2130706433/`), hex (`http://0x7f.1/`), octal
 *   (`http://017700000001/`), short (`http://127.1/`), percent-encoded or
 *   full-width spellings are refused outright (reason `ipv4-spelling`), even when
 *   the address they stand for would be allowed: the raw host text is compared
 *   with what the WHATWG parser normalises it to.
 * - The host is resolved (every address, `dns.lookup` with `all: true`) and the URL
 *   is refused when ANY address is forbidden (see `isForbiddenAddress`: loopback,
 *   RFC 1918 private, link-local incl. 169.254.169.254, CGNAT 100.64/10, 0/8,
 *   broadcast, multicast, 240/4, benchmarking 198.18/15, documentation ranges,
 *   IPv6 ::1, ::, fc00::/7, fe80::/10, fec0::/10, ff00::/8, IPv4-mapped and
 *   IPv4-compatible, NAT64 64:ff9b::/96 and 6to4 2002::/16 with a forbidden
 *   embedded IPv4, Teredo, anything outside 2000::/3), unless an `allow` entry
 *   covers it. The connection then goes to the checked address (the request's
 *   DNS lookup is pinned to it), so DNS rebinding gets no second lookup.
 * - Ports: `allowedPorts` (default 80 and 443). A destination covered by an
 *   `allow` entry may use any port, unless the entry names one.
 * - At most `maxRedirects` redirects (301, 302, 303, 307, 308); one more is refused.
 * - Bounded: `connectTimeoutMs` to establish TCP, `idleTimeoutMs` of socket
 *   inactivity (headers or body), `maxBytes` in total (a Content-Length or
 *   Content-Range size above it is refused before any body is read, a body that
 *   streams past it is aborted: SOURCE_TOO_LARGE).
 *
 * `allow` entries (URL_IMPORT_ALLOW, comma or space separated):
 * - `host.name` — that host name, whatever it resolves to, any port;
 * - `10.1.2.3`, `10.0.0.0/8`, `fd00::/8`, `::1` — addresses in that network, any port;
 * - `host.name:8080`, `10.0.0.0/8:8080`, `[fd00::/8]:8080`, `[::1]:8080` — the same, on that port only.
 * An allowed host name exempts all its addresses (the operator trusts that name);
 * an allowed network exempts only the addresses inside it. Entries are matched
 * against the host as the URL names it (lower-cased, without a trailing dot).
 *
 * Errors: URL_REFUSED (rules above; deterministic), SOURCE_TOO_LARGE,
 * CHECKSUM_MISMATCH, URL_FETCH_FAILED (4xx other than 408/429, unusable response,
 * TLS certificate refused, host name does not exist; deterministic),
 * SOURCE_UNAVAILABLE (connect/idle timeout, connection failure, 5xx, 408, 429,
 * DNS failure other than "no such name"; transient, retried by the queue).
 *
 * Environment the service maps onto a UrlPolicy (parse with `parseAllowList` and
 * `parsePortList`, which throw InvalidArgumentError naming the variable):
 * | variable                 | field            | default                      |
 * |--------------------------|------------------|------------------------------|
 * | URL_IMPORT_ALLOW         | allow            | empty (nothing private)      |
 * | URL_IMPORT_PORTS         | allowedPorts     | 80,443                       |
 * | URL_CONNECT_TIMEOUT_MS   | connectTimeoutMs | 10000                        |
 * | URL_IDLE_TIMEOUT_MS      | idleTimeoutMs    | 30000                        |
 * | MAX_UPLOAD_BYTES         | maxBytes         | 16 GiB here; the service's   |
 * | (fixed)                  | maxRedirects     | 5                            |
 */
import { lookup } from 'node:dns/promises';
import { InvalidArgumentError, SourceUnavailableError } from '../engine/errors.js';
import { UrlFetchError, UrlRefusedError } from './errors.js';
import { cidrContains, formatIPv4, inPrefix, parseCidr, parseIPv4, parseIp, type Cidr, type IpBytes } from './ip.js';

export interface UrlPolicy {
  /** Hosts, addresses or CIDRs allowed although private/loopback (URL_IMPORT_ALLOW); empty by default. */
  allow: string[];
  /** Ports allowed for hosts not covered by `allow` (URL_IMPORT_PORTS). */
  allowedPorts: number[];
  /** Time to establish the TCP connection. */
  connectTimeoutMs: number;
  /** Socket inactivity allowed while waiting for headers or body bytes. */
  idleTimeoutMs: number;
  /** Largest download (MAX_UPLOAD_BYTES applies to downloads too). */
  maxBytes: number;
  /** Redirects followed before the URL is refused. */
  maxRedirects: number;
}

export const DEFAULT_URL_POLICY: Readonly<UrlPolicy> = Object.freeze({
  allow: [],
  allowedPorts: [80, 443],
  connectTimeoutMs: 10_000,
  idleTimeoutMs: 30_000,
  maxBytes: 16 * 2 ** 30,
  maxRedirects: 5,
});

export interface CheckedUrl {
  url: URL;
  /** The address the request must connect to (already checked). */
  address: string;
  family: 4 | 6;
  /**
   * Every address the host resolved to, all checked, `address` first; the
   * connection may fall back to these (Node's happy eyeballs) and to nothing else.
   */
  addresses?: ReadonlyArray<{ address: string; family: 4 | 6 }>;
}

/** URLs longer than this are refused (presigned URLs run to a few KiB). */
const MAX_URL_LENGTH = 16 * 1024;

// ---------------------------------------------------------------------------
// Address classes

type Range4 = readonly [network: readonly number[], prefix: number, reason: string];

/** IPv4 special-purpose ranges (RFC 6890 and successors), most specific first. */
const IPV4_FORBIDDEN: readonly Range4[] = [
  [[0, 0, 0, 0], 32, 'unspecified'],
  [[255, 255, 255, 255], 32, 'broadcast'],
  [[0], 8, 'this-network'],
  [[10], 8, 'private'],
  [[100, 64], 10, 'cgnat'],
  [[127], 8, 'loopback'],
  [[169, 254], 16, 'link-local'],
  [[172, 16], 12, 'private'],
  [[192, 0, 0], 24, 'reserved'], // IETF protocol assignments (DS-Lite, NAT64 discovery...)
  [[192, 0, 2], 24, 'documentation'],
  [[192, 88, 99], 24, 'reserved'], // 6to4 relay anycast
  [[192, 168], 16, 'private'],
  [[198, 18], 15, 'benchmarking'],
  [[198, 51, 100], 24, 'documentation'],
  [[203, 0, 113], 24, 'documentation'],
  [[224], 4, 'multicast'],
  [[240], 4, 'reserved'],
];

function ipv4Reason(bytes: Uint8Array): string | undefined {
  for (const [network, prefix, reason] of IPV4_FORBIDDEN) if (inPrefix(bytes, network, prefix)) return reason;
  return undefined;
}

type Range6 = readonly [network: readonly number[], prefix: number, reason: string | ((bytes: Uint8Array) => string | undefined)];

const embeddedAt =
  (offset: number, label: string) =>
  (bytes: Uint8Array): string | undefined => {
    const inner = ipv4Reason(bytes.subarray(offset, offset + 4));
    return inner === undefined ? undefined : `${label}:${inner}`;
  };

const V6_LOOPBACK = [...new Array<number>(15).fill(0), 1];

/** IPv6 special-purpose ranges, most specific first; anything outside 2000::/3 is refused after them. */
const IPV6_FORBIDDEN: readonly Range6[] = [
  [[], 128, 'unspecified'],
  [V6_LOOPBACK, 128, 'loopback'],
  [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff], 96, 'ipv4-mapped'],
  [[], 96, 'ipv4-compatible'],
  [[0, 0x64, 0xff, 0x9b], 96, embeddedAt(12, 'nat64')],
  [[0, 0x64, 0xff, 0x9b, 0, 1], 48, 'nat64-local'],
  [[1, 0, 0, 0, 0, 0, 0, 0], 64, 'reserved'], // discard-only
  [[0x20, 0x01, 0, 0], 32, 'teredo'], // embeds an obfuscated client IPv4
  [[0x20, 0x01, 0, 2, 0, 0], 48, 'benchmarking'],
  [[0x20, 0x01, 0x0d, 0xb8], 32, 'documentation'],
  [[0x20, 0x01, 0], 23, 'reserved'], // IETF protocol assignments
  [[0x20, 0x02], 16, embeddedAt(2, '6to4')],
  [[0x3f, 0xff], 20, 'documentation'],
  [[0x5f, 0x00], 16, 'reserved'], // SRv6 SIDs
  [[0xfc], 7, 'unique-local'],
  [[0xfe, 0x80], 10, 'link-local'],
  [[0xfe, 0xc0], 10, 'site-local'],
  [[0xff], 8, 'multicast'],
];

function ipv6Reason(bytes: Uint8Array): string | undefined {
  for (const [network, prefix, reason] of IPV6_FORBIDDEN) {
    if (!inPrefix(bytes, network, prefix)) continue;
    return typeof reason === 'string' ? reason : reason(bytes);
  }
  if (!inPrefix(bytes, [0x20], 3)) return 'reserved'; // not global unicast
  return undefined;
}

/**
 * Why the address may not be fetched from without an allow entry: 'loopback',
 * 'private', 'link-local', 'cgnat', 'unique-local', 'ipv4-mapped', 'multicast',
 * 'unspecified', 'reserved', 'nat64:<reason>', '6to4:<reason>'...; undefined
 * for a public address. Anything that is not an address is 'not-an-address'.
 */
export function isForbiddenAddress(address: string): string | undefined {
  const ip = parseIp(address);
  if (!ip) return 'not-an-address';
  return ip.family === 4 ? ipv4Reason(ip.bytes) : ipv6Reason(ip.bytes);
}

// ---------------------------------------------------------------------------
// Allow entries and port lists

interface AllowEntry {
  text: string;
  host?: string;
  cidr?: Cidr;
  port?: number;
}

function parsePort(text: string, what: string): number {
  if (!/^[0-9]{1,5}$/.test(text) || Number(text) < 1 || Number(text) > 65535) {
    throw new InvalidArgumentError(`${what}: '${text}' is not a port (1-65535)`);
  }
  return Number(text);
}

function normalizeHost(host: string): string {
  const lower = host.toLowerCase();
  return lower.endsWith('.') ? lower.slice(0, -1) : lower;
}

function parseAllowEntry(raw: string, what: string): AllowEntry {
  const text = raw.trim();
  if (text === '') throw new InvalidArgumentError(`${what}: empty entry`);
  let target = text;
  let port: number | undefined;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0) throw new InvalidArgumentError(`${what}: '${text}' has no closing ']'`);
    target = text.slice(1, close);
    const rest = text.slice(close + 1);
    if (rest !== '') {
      if (!rest.startsWith(':')) throw new InvalidArgumentError(`${what}: '${text}' has text after ']'`);
      port = parsePort(rest.slice(1), what);
    }
  } else if (text.split(':').length === 2) {
    const colon = text.indexOf(':');
    target = text.slice(0, colon);
    port = parsePort(text.slice(colon + 1), what);
  }
  const cidr = parseCidr(target);
  if (cidr) return { text, cidr, ...(port !== undefined ? { port } : {}) };
  if (target.includes('/') || target.includes(':')) {
    throw new InvalidArgumentError(`${what}: '${text}' is not an address, CIDR or host name`);
  }
  let hostname: string;
  try {
    hostname = new URL(`http://${target}/`).hostname;
  } catch {
    throw new InvalidArgumentError(`${what}: '${text}' is not an address, CIDR or host name`);
  }
  if (parseIPv4(hostname)) {
    throw new InvalidArgumentError(`${what}: '${text}' is a non-canonical IPv4 spelling; write it as ${hostname}`);
  }
  return { text, host: normalizeHost(hostname), ...(port !== undefined ? { port } : {}) };
}

/** Splits and validates URL_IMPORT_ALLOW (comma or whitespace separated). */
export function parseAllowList(value: string, variable = 'URL_IMPORT_ALLOW'): string[] {
  const entries = value.split(/[\s,]+/).filter((e) => e !== '');
  for (const entry of entries) parseAllowEntry(entry, variable);
  return entries;
}

/** Splits and validates URL_IMPORT_PORTS (comma or whitespace separated). */
export function parsePortList(value: string, variable = 'URL_IMPORT_PORTS'): number[] {
  const ports = value
    .split(/[\s,]+/)
    .filter((p) => p !== '')
    .map((p) => parsePort(p, variable));
  if (ports.length === 0) throw new InvalidArgumentError(`${variable}: no port given`);
  return ports;
}

/** Throws InvalidArgumentError naming the first bad field. */
export function validateUrlPolicy(policy: UrlPolicy): void {
  for (const entry of policy.allow) parseAllowEntry(entry, 'allow');
  for (const port of policy.allowedPorts) parsePort(String(port), 'allowedPorts');
  const positive: Array<keyof UrlPolicy> = ['connectTimeoutMs', 'idleTimeoutMs', 'maxBytes'];
  for (const key of positive) {
    const value = policy[key];
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
      throw new InvalidArgumentError(`${key}: ${String(value)} is not a positive integer`);
    }
  }
  if (!Number.isSafeInteger(policy.maxRedirects) || policy.maxRedirects < 0 || policy.maxRedirects > 20) {
    throw new InvalidArgumentError(`maxRedirects: ${policy.maxRedirects} is not an integer in 0-20`);
  }
}

function covers(entry: AllowEntry, host: string, ip: IpBytes, port: number): boolean {
  if (entry.port !== undefined && entry.port !== port) return false;
  if (entry.host !== undefined) return entry.host === host;
  return entry.cidr !== undefined && cidrContains(entry.cidr, ip);
}

// ---------------------------------------------------------------------------
// URL checks

/**
 * WHATWG's preprocessing: leading/trailing C0 controls and spaces go, tabs and
 * newlines anywhere go. Done before looking at the raw host so we see what the
 * parser sees.
 */
function preprocess(raw: string): string {
  return raw.replace(/^[\u0000-\u0020]+|[\u0000-\u0020]+$/g, '').replace(/[\t\n\r]/g, '');
}

/**
 * The host exactly as written in the URL text (before percent-decoding, IDNA
 * mapping and IPv4 number parsing), or undefined when the text has no authority
 * and the host comes from the base. Follows WHATWG's rules for special schemes:
 * any run of '/' or '\' introduces the authority, except that a relative
 * reference (or one with the base's scheme) needs at least two.
 */
function rawHostText(input: string, base: URL | undefined): { host: string; hasUserinfo: boolean } | undefined {
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(input);
  let rest: string;
  if (scheme) {
    rest = input.slice(scheme[0].length);
    const sameAsBase = base !== undefined && base.protocol === `${(scheme[1] as string).toLowerCase()}:`;
    if (sameAsBase && !/^[/\\]{2}/.test(rest)) return undefined;
  } else {
    if (!/^[/\\]{2}/.test(input)) return undefined;
    rest = input;
  }
  rest = rest.replace(/^[/\\]*/, '');
  const authority = rest.split(/[/\\?#]/, 1)[0] ?? '';
  const at = authority.lastIndexOf('@');
  const hostPort = at >= 0 ? authority.slice(at + 1) : authority;
  let host: string;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    host = close >= 0 ? hostPort.slice(0, close + 1) : hostPort;
  } else {
    const colon = hostPort.indexOf(':');
    host = colon >= 0 ? hostPort.slice(0, colon) : hostPort;
  }
  return { host, hasUserinfo: at >= 0 };
}

function describe(url: URL): string {
  return `${url.protocol}//${url.host}`;
}

interface ResolvedAddress {
  address: string;
  family: 4 | 6;
}

async function resolve(hostname: string): Promise<ResolvedAddress[]> {
  try {
    const found = await lookup(hostname, { all: true, verbatim: true });
    return found.map((a) => ({ address: a.address, family: a.family === 6 ? 6 : 4 }));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTFOUND') throw new UrlFetchError(`cannot resolve ${hostname}: no such host`, undefined, { cause: err });
    throw new SourceUnavailableError(`cannot resolve ${hostname}: ${(err as Error).message}`, { cause: err });
  }
}

async function check(raw: string, policy: UrlPolicy, base: URL | undefined): Promise<CheckedUrl> {
  if (raw.length > MAX_URL_LENGTH) throw new UrlRefusedError(`URL is longer than ${MAX_URL_LENGTH} characters`, 'too-long');
  const input = preprocess(raw);
  let url: URL;
  try {
    url = new URL(input, base);
  } catch {
    throw new UrlRefusedError(`'${input.slice(0, 200)}' is not a valid URL`, 'invalid');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new UrlRefusedError(`scheme ${url.protocol} is not allowed (only http and https)`, 'scheme');
  }
  if (base?.protocol === 'https:' && url.protocol === 'http:') {
    throw new UrlRefusedError(`redirect from https to http (${describe(url)}) is not allowed`, 'scheme-downgrade');
  }
  const written = rawHostText(input, base);
  if (url.username !== '' || url.password !== '' || written?.hasUserinfo) {
    throw new UrlRefusedError(`user-info in URLs is not allowed (${describe(url)})`, 'userinfo');
  }
  const hostname = url.hostname;
  if (hostname === '') throw new UrlRefusedError('URL has no host', 'invalid');
  // WHATWG turns decimal, hex, octal and short IPv4 forms into dotted decimal; so
  // when the parsed host is an IPv4 address, it must have been written that way.
  if (parseIPv4(hostname) && written !== undefined && written.host !== hostname) {
    throw new UrlRefusedError(`IPv4 address written as '${written.host}'; only dotted decimal (${hostname}) is accepted`, 'ipv4-spelling');
  }
  const port = url.port === '' ? (url.protocol === 'https:' ? 443 : 80) : Number(url.port);
  const entries = policy.allow.map((e) => parseAllowEntry(e, 'allow'));
  const portAllowed = policy.allowedPorts.includes(port);
  if (!portAllowed && entries.length === 0) {
    throw new UrlRefusedError(`port ${port} is not allowed (allowed: ${policy.allowedPorts.join(', ')})`, 'port');
  }

  const literal = hostname.startsWith('[') ? hostname.slice(1, -1) : parseIPv4(hostname) ? hostname : undefined;
  const addresses: ResolvedAddress[] = literal !== undefined ? [{ address: literal, family: literal.includes(':') ? 6 : 4 }] : await resolve(hostname);
  if (addresses.length === 0) throw new SourceUnavailableError(`cannot resolve ${hostname}: no addresses`);

  const host = normalizeHost(hostname);
  let allCovered = true;
  for (const { address } of addresses) {
    const ip = parseIp(address);
    const reason = ip ? (ip.family === 4 ? ipv4Reason(ip.bytes) : ipv6Reason(ip.bytes)) : 'not-an-address';
    const covered = ip !== undefined && entries.some((e) => covers(e, host, ip, port));
    if (!covered) allCovered = false;
    if (reason !== undefined && !covered) {
      const shown = ip?.family === 6 && reason === 'ipv4-mapped' ? `${address} (${formatIPv4(ip.bytes.subarray(12))})` : address;
      const via = literal !== undefined ? '' : `${hostname} resolves to `;
      throw new UrlRefusedError(`${via}${shown}, a ${reason} address; not allowed for URL import (${describe(url)})`, reason);
    }
  }
  if (!portAllowed && !allCovered) {
    throw new UrlRefusedError(`port ${port} is not allowed for ${hostname} (allowed: ${policy.allowedPorts.join(', ')})`, 'port');
  }
  const first = addresses[0] as ResolvedAddress;
  return { url, address: first.address, family: first.family, addresses };
}

/** Parses, resolves and classifies a URL given by a client; throws UrlRefusedError. */
export async function checkUrl(raw: string, policy: UrlPolicy): Promise<CheckedUrl> {
  return check(raw, policy, undefined);
}

/** The same checks for a redirect's Location, resolved against the URL that answered. */
export async function checkRedirect(location: string, base: URL, policy: UrlPolicy): Promise<CheckedUrl> {
  return check(location, policy, base);
}
