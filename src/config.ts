/**
 * The service's configuration: one zod-validated object read from the environment.
 * A bad value stops start-up with a message naming the variable.
 */
import { resolve } from 'node:path';
import { z } from 'zod';
import { HASH_ALGORITHMS, type HashAlgorithm } from './engine/convert.js';
import { DiskconvError } from './engine/errors.js';
import { parseAllowList, parsePortList } from './net/url-policy.js';

export class ConfigError extends DiskconvError {
  readonly code = 'CONFIG_INVALID' as const;
  readonly deterministic = true;
}

const UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50 };

/** "1073741824", "64G", "64GiB", "512m", "2T": binary units, as disk sizes usually are. */
export function parseByteSize(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) return undefined;
  const value = Number(m[1]) * (UNITS[(m[2] ?? '').toLowerCase()] ?? NaN);
  return Number.isSafeInteger(Math.floor(value)) ? Math.floor(value) : undefined;
}

const int = (min: number, max: number, fallback: number) =>
  z
    .string()
    .trim()
    .default(String(fallback))
    .transform((s, ctx) => {
      const n = /^\d+$/.test(s) ? Number(s) : NaN;
      if (!Number.isSafeInteger(n) || n < min || n > max) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: `expected an integer from ${min} to ${max}, got '${s}'` });
        return z.NEVER;
      }
      return n;
    });

const bytes = (min: number, fallback: string) =>
  z
    .string()
    .trim()
    .default(fallback)
    .transform((s, ctx) => {
      const n = parseByteSize(s);
      if (n === undefined || n < min) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: `expected a size in bytes of at least ${min} (e.g. 1073741824, 64G, 512MiB), got '${s}'` });
        return z.NEVER;
      }
      return n;
    });

const list = z
  .string()
  .default('')
  .transform((s) =>
    s
      .split(',')
      .map((v) => v.trim())
      .filter((v) => v.length > 0),
  );

const optionalText = z
  .string()
  .trim()
  .optional()
  .transform((s) => (s === '' ? undefined : s));

const bool = (fallback: boolean) =>
  z
    .string()
    .trim()
    .toLowerCase()
    .default(String(fallback))
    .transform((s, ctx) => {
      if (['1', 'true', 'yes', 'on'].includes(s)) return true;
      if (['0', 'false', 'no', 'off', ''].includes(s)) return false;
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: `expected true or false, got '${s}'` });
      return z.NEVER;
    });

/** A server secret: unset, or 32+ printable characters. */
const secret = z
  .string()
  .trim()
  .optional()
  .transform((s) => (s === '' ? undefined : s))
  .refine((s) => s === undefined || (s.length >= 32 && /^[\x21-\x7e]+$/.test(s)), {
    message: 'expected at least 32 printable characters without spaces (e.g. `openssl rand -hex 32`)',
  });

const schema = z.object({
  HOST: z.string().trim().min(1).default('127.0.0.1'),
  PORT: int(0, 65535, 8080),
  REDIS_URL: z
    .string()
    .trim()
    .optional()
    .transform((s) => (s === '' ? undefined : s))
    .refine((s) => s === undefined || /^rediss?:\/\/[^\s]+$/.test(s), { message: 'expected redis://[user:password@]host:port[/db] or rediss://...' }),
  DATA_DIR: z
    .string()
    .trim()
    .min(1)
    .default('./data')
    .transform((s) => resolve(s)),
  API_TOKENS: list.refine((tokens) => tokens.every((t) => t.length >= 16 && /^[\x21-\x7e]+$/.test(t)), {
    message: 'every token must be at least 16 printable characters without spaces (e.g. `openssl rand -hex 32`)',
  }),
  WORKER_CONCURRENCY: int(1, 64, 1),
  MAX_UPLOAD_BYTES: bytes(1, '64G'),
  MAX_VIRTUAL_SIZE: bytes(512, '4T'),
  // The URL rules' own parsers (src/net) validate these, so start-up and import agree.
  URL_IMPORT_ALLOW: z
    .string()
    .default('')
    .transform((s, ctx) => {
      try {
        return parseAllowList(s);
      } catch (err) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
        return z.NEVER;
      }
    }),
  URL_IMPORT_PORTS: z
    .string()
    .default('80,443')
    .transform((s, ctx) => {
      try {
        return parsePortList(s.trim() === '' ? '80,443' : s);
      } catch (err) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
        return z.NEVER;
      }
    }),
  URL_CONNECT_TIMEOUT_MS: int(1, 600_000, 10_000),
  URL_IDLE_TIMEOUT_MS: int(1, 3_600_000, 30_000),
  URL_MAX_REDIRECTS: int(0, 20, 5),
  RESULT_TTL_SECONDS: int(1, 365 * 86400, 86400),
  ORPHAN_TTL_SECONDS: int(1, 365 * 86400, 3600),
  RETENTION_SWEEP_SECONDS: int(1, 86400, 60),
  RATE_LIMIT_WINDOW_SECONDS: int(1, 86400, 60),
  RATE_LIMIT_JOBS: int(1, 1_000_000, 60),
  RATE_LIMIT_INSPECT: int(1, 1_000_000, 60),
  RATE_LIMIT_READS: int(1, 1_000_000, 1200),
  RATE_LIMIT_LOCAL_PERCENT: int(0, 100, 1),
  RATE_LIMIT_SETTLE_MS: int(1, 60_000, 50),
  TRUST_PROXY: bool(false),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  QUEUE_NAME: z
    .string()
    .trim()
    .default('diskconv')
    .refine((s) => /^[A-Za-z0-9_-]{1,64}$/.test(s), { message: 'expected 1-64 characters from A-Z a-z 0-9 _ -' }),
  JOB_ATTEMPTS: int(1, 100, 3),
  JOB_BACKOFF_MS: int(0, 3_600_000, 5000),
  WORKER_LOCK_DURATION_MS: int(1000, 3_600_000, 30_000),
  WORKER_STALLED_INTERVAL_MS: int(500, 3_600_000, 30_000),
  WORKER_MAX_STALLED_COUNT: int(0, 100, 2),
  WORKER_READ_BYTES_PER_SECOND: bytes(0, '0'),
  PROGRESS_INTERVAL_MS: int(50, 60_000, 500),
  SHUTDOWN_GRACE_MS: int(0, 3_600_000, 20_000),
  STORE_URL: z
    .string()
    .trim()
    .default('')
    .transform((s, ctx) => {
      try {
        return parseStoreUrl(s);
      } catch (err) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
        return z.NEVER;
      }
    }),
  S3_ENDPOINT: z
    .string()
    .trim()
    .default('')
    .refine((s) => s === '' || /^https?:\/\/[^\s/]+\/?$/.test(s), { message: 'expected http(s)://host[:port]' })
    .transform((s) => (s === '' ? undefined : s)),
  S3_REGION: z.string().trim().min(1).default('us-east-1'),
  S3_FORCE_PATH_STYLE: bool(false),
  S3_REQUEST_TIMEOUT_MS: int(100, 3_600_000, 60_000),
  // Off by default: following an upload staged in the bucket writes its every byte there twice (bench/s3-part-objects.mjs).
  S3_STAGING_OVERLAP: bool(false),
  OUTPUT_REDIRECT: z.enum(['none', 'presigned']).default('none'),
  OUTPUT_PRESIGNED_TTL_SECONDS: int(1, 7 * 86400, 900),
  // Issue 10: live events, signed links, webhooks, resumable uploads.
  SSE_HEARTBEAT_SECONDS: int(1, 3600, 15),
  LINK_SECRET: secret,
  LINK_TTL_SECONDS: int(10, 7 * 86400, 900),
  WEBHOOK_SECRET: secret,
  WEBHOOK_ALLOW: z
    .string()
    .default('')
    .transform((s, ctx) => {
      try {
        return parseAllowList(s, 'WEBHOOK_ALLOW');
      } catch (err) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
        return z.NEVER;
      }
    }),
  WEBHOOK_PORTS: z
    .string()
    .default('80,443')
    .transform((s, ctx) => {
      try {
        return parsePortList(s.trim() === '' ? '80,443' : s, 'WEBHOOK_PORTS');
      } catch (err) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
        return z.NEVER;
      }
    }),
  WEBHOOK_ATTEMPTS: int(1, 50, 8),
  WEBHOOK_BACKOFF_MS: int(10, 3_600_000, 2000),
  WEBHOOK_TIMEOUT_MS: int(100, 600_000, 10_000),
  UPLOAD_TTL_SECONDS: int(1, 30 * 86400, 86400),
  UPLOAD_IDLE_TIMEOUT_MS: int(100, 3_600_000, 60_000),
  STREAM_UPLOADS: bool(true),
  TUS_OVERLAP_IDLE_MS: int(100, 3_600_000, 5000),
  INSPECT_MAX_BYTES: bytes(65536, '256M'),
  INSPECT_STAGING_CONCURRENCY: int(1, 64, 2),
  RBD_POOLS: list.refine((pools) => pools.every((p) => /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(p)), { message: 'expected pool names separated by commas' }),
  RBD_COMMAND_TIMEOUT_MS: int(1000, 3_600_000, 120_000),
  OUTPUT_HASHES: list.refine((names) => names.every((n) => (HASH_ALGORITHMS as readonly string[]).includes(n.toLowerCase())), {
    message: `expected a comma-separated list of ${HASH_ALGORITHMS.join(', ')}`,
  }),
  // Publishing into Glance (src/publish/glance.ts).
  GLANCE_URL: optionalText.refine((s) => s === undefined || /^https?:\/\/[^\s]+$/.test(s), { message: 'expected http(s)://host[:port][/path] of the image API' }),
  GLANCE_TOKEN: optionalText,
  OS_AUTH_URL: optionalText.refine((s) => s === undefined || /^https?:\/\/[^\s]+$/.test(s), { message: 'expected http(s)://host[:port]/v3 (Keystone)' }),
  OS_USERNAME: optionalText,
  OS_PASSWORD: z.string().optional().transform((s) => (s === '' ? undefined : s)),
  OS_PROJECT_NAME: optionalText,
  OS_USER_DOMAIN_NAME: z.string().trim().default('Default'),
  OS_PROJECT_DOMAIN_NAME: z.string().trim().default('Default'),
  GLANCE_METHOD: z.enum(['direct', 'import']).default('direct'),
  GLANCE_STORE: optionalText,
  GLANCE_RBD_POOLS: list,
  GLANCE_PUBLISH_ATTEMPTS: int(1, 100, 5),
  GLANCE_PUBLISH_BACKOFF_MS: int(0, 3_600_000, 2000),
  GLANCE_UPLOAD_BYTES_PER_SECOND: bytes(0, '0'),
  // Issue 11: an API reachable from other hosts without API_TOKENS only when asked for.
  ALLOW_ANONYMOUS: bool(false),
  // Issue 10: how long an Idempotency-Key of POST /v1/jobs remembers its job.
  IDEMPOTENCY_TTL_SECONDS: int(60, 30 * 86400, 86400),
});

/** Where staged inputs and outputs live: a directory (default: DATA_DIR/store) or a bucket. */
export type StoreLocation = { kind: 'file'; root: string | undefined } | { kind: 's3'; bucket: string; prefix: string };

/** `file:///abs/path` or `s3://BUCKET/PREFIX`; empty means the default directory under DATA_DIR. */
export function parseStoreUrl(text: string): StoreLocation {
  if (text === '') return { kind: 'file', root: undefined };
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Error(`expected file:///absolute/path or s3://BUCKET/PREFIX, got '${text}'`);
  }
  if (url.protocol === 's3:') {
    const bucket = url.hostname;
    if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket) || url.username || url.password || url.port || url.search || url.hash) {
      throw new Error(`expected s3://BUCKET/PREFIX with a valid bucket name, got '${text}'`);
    }
    const path = decodeURIComponent(url.pathname).replace(/^\/+/, '');
    if (path.split('/').some((seg, i, all) => seg === '..' || seg === '.' || (seg === '' && i < all.length - 1))) {
      throw new Error(`the prefix of '${text}' has an empty, '.' or '..' segment`);
    }
    return { kind: 's3', bucket, prefix: path === '' || path.endsWith('/') ? path : `${path}/` };
  }
  if (url.protocol === 'file:') {
    if (url.host !== '' || url.search !== '' || url.hash !== '') throw new Error(`expected file:///absolute/path, got '${text}'`);
    return { kind: 'file', root: decodeURIComponent(url.pathname) };
  }
  throw new Error(`unsupported store '${url.protocol}' in '${text}'; expected file:///absolute/path or s3://BUCKET/PREFIX`);
}

type Env = z.infer<typeof schema>;

export interface Config {
  host: string;
  port: number;
  redisUrl: string | undefined;
  dataDir: string;
  apiTokens: string[];
  workerConcurrency: number;
  maxUploadBytes: number;
  maxVirtualSize: number;
  urlImport: { allow: string[]; ports: number[]; connectTimeoutMs: number; idleTimeoutMs: number; maxRedirects: number };
  retention: { resultTtlSeconds: number; orphanTtlSeconds: number; sweepSeconds: number };
  rateLimit: { windowSeconds: number; jobs: number; inspect: number; reads: number; localPercent: number; settleMs: number };
  trustProxy: boolean;
  logLevel: Env['LOG_LEVEL'];
  queueName: string;
  jobAttempts: number;
  jobBackoffMs: number;
  worker: { lockDurationMs: number; stalledIntervalMs: number; maxStalledCount: number; readBytesPerSecond: number; progressIntervalMs: number };
  shutdownGraceMs: number;
  store: StoreLocation;
  /** `stagingOverlap`: uploads staged in the bucket are converted while they arrive (each part also an object of its own). */
  s3: { endpoint: string | undefined; region: string; forcePathStyle: boolean; requestTimeoutMs: number; stagingOverlap: boolean };
  output: { redirect: 'none' | 'presigned'; presignedTtlSeconds: number };
  /** GET /v1/jobs/{id}/events. */
  events: { heartbeatSeconds: number };
  /** Signed download links (?expires=&sig=); the secret is random per process when LINK_SECRET is unset. */
  links: { secret: string | undefined; ttlSeconds: number };
  webhooks: { secret: string | undefined; allow: string[]; ports: number[]; attempts: number; backoffMs: number; timeoutMs: number };
  /** tus uploads at /v1/uploads. */
  uploads: { ttlSeconds: number };
  /** An upload whose body sends nothing for this long is dropped (its staging file removed). */
  uploadIdleTimeoutMs: number;
  /** Uploads start converting while their bytes arrive (src/api/streaming-upload.ts). */
  streamUploads: boolean;
  /** A worker converting a tus upload as it arrives gives its slot back after this long without a new byte (src/queue/upload-stream.ts). */
  tusOverlapIdleMs: number;
  /** POST /v1/inspect by URL: most bytes one inspection may fetch (by ranges) or stage on the API host, and inspections staging at once. */
  inspect: { maxBytes: number; stagingConcurrency: number };
  rbd: { pools: string[]; commandTimeoutMs: number };
  /** Digests of every output beyond sha256 (always computed). */
  outputHashes: HashAlgorithm[];
  /** Publishing into Glance; undefined when GLANCE_URL is unset. */
  glance: GlanceConfig | undefined;
  /** Serve without API_TOKENS on a non-loopback HOST (checkListenExposure). */
  allowAnonymous: boolean;
  /** POST /v1/jobs with Idempotency-Key. */
  idempotency: { ttlSeconds: number };
}

export interface GlanceConfig {
  /** The image API endpoint, without /v2. */
  url: string;
  auth:
    | { kind: 'token'; token: string }
    | { kind: 'password'; authUrl: string; username: string; password: string; projectName: string; userDomainName: string; projectDomainName: string };
  /** `direct`: PUT /v2/images/{id}/file; `import`: stage, then glance-direct import. */
  method: 'direct' | 'import';
  /** The Glance store (multi-store backend id) uploads go to; Glance's default when unset. */
  store: string | undefined;
  /** RBD pools Glance's RBD store uses: an RBD output in one of them is registered in place (zero copy). */
  rbdPools: string[];
  publishAttempts: number;
  publishBackoffMs: number;
  /** Caps the rate of uploads into Glance (0: no cap). */
  uploadBytesPerSecond: number;
  connectTimeoutMs: number;
  idleTimeoutMs: number;
}

function glanceConfig(e: Env): GlanceConfig | undefined {
  if (!e.GLANCE_URL) return undefined;
  let auth: GlanceConfig['auth'];
  if (e.GLANCE_TOKEN) auth = { kind: 'token', token: e.GLANCE_TOKEN };
  else if (e.OS_AUTH_URL && e.OS_USERNAME && e.OS_PASSWORD && e.OS_PROJECT_NAME) {
    auth = {
      kind: 'password',
      authUrl: e.OS_AUTH_URL,
      username: e.OS_USERNAME,
      password: e.OS_PASSWORD,
      projectName: e.OS_PROJECT_NAME,
      userDomainName: e.OS_USER_DOMAIN_NAME,
      projectDomainName: e.OS_PROJECT_DOMAIN_NAME,
    };
  } else {
    throw new ConfigError('invalid configuration: GLANCE_URL needs GLANCE_TOKEN, or OS_AUTH_URL, OS_USERNAME, OS_PASSWORD and OS_PROJECT_NAME (Keystone v3)');
  }
  return {
    url: e.GLANCE_URL.replace(/\/+$/, '').replace(/\/v2$/, ''),
    auth,
    method: e.GLANCE_METHOD,
    store: e.GLANCE_STORE,
    rbdPools: e.GLANCE_RBD_POOLS,
    publishAttempts: e.GLANCE_PUBLISH_ATTEMPTS,
    publishBackoffMs: e.GLANCE_PUBLISH_BACKOFF_MS,
    uploadBytesPerSecond: e.GLANCE_UPLOAD_BYTES_PER_SECOND,
    connectTimeoutMs: e.URL_CONNECT_TIMEOUT_MS,
    idleTimeoutMs: e.URL_IDLE_TIMEOUT_MS,
  };
}

/** The variables read, for the README table and error messages. */
export const CONFIG_VARIABLES = Object.keys(schema.shape) as (keyof Env)[];

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const input = Object.fromEntries(CONFIG_VARIABLES.filter((k) => env[k] !== undefined).map((k) => [k, env[k]]));
  const parsed = schema.safeParse(input);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `${i.path.join('.') || '(environment)'}: ${i.message}`);
    throw new ConfigError(`invalid configuration: ${lines.join('; ')}`);
  }
  const e = parsed.data;
  return {
    host: e.HOST,
    port: e.PORT,
    redisUrl: e.REDIS_URL,
    dataDir: e.DATA_DIR,
    apiTokens: e.API_TOKENS,
    workerConcurrency: e.WORKER_CONCURRENCY,
    maxUploadBytes: e.MAX_UPLOAD_BYTES,
    maxVirtualSize: e.MAX_VIRTUAL_SIZE,
    urlImport: {
      allow: e.URL_IMPORT_ALLOW,
      ports: e.URL_IMPORT_PORTS,
      connectTimeoutMs: e.URL_CONNECT_TIMEOUT_MS,
      idleTimeoutMs: e.URL_IDLE_TIMEOUT_MS,
      maxRedirects: e.URL_MAX_REDIRECTS,
    },
    retention: { resultTtlSeconds: e.RESULT_TTL_SECONDS, orphanTtlSeconds: e.ORPHAN_TTL_SECONDS, sweepSeconds: e.RETENTION_SWEEP_SECONDS },
    rateLimit: { windowSeconds: e.RATE_LIMIT_WINDOW_SECONDS, jobs: e.RATE_LIMIT_JOBS, inspect: e.RATE_LIMIT_INSPECT, reads: e.RATE_LIMIT_READS, localPercent: e.RATE_LIMIT_LOCAL_PERCENT, settleMs: e.RATE_LIMIT_SETTLE_MS },
    trustProxy: e.TRUST_PROXY,
    logLevel: e.LOG_LEVEL,
    queueName: e.QUEUE_NAME,
    jobAttempts: e.JOB_ATTEMPTS,
    jobBackoffMs: e.JOB_BACKOFF_MS,
    worker: {
      lockDurationMs: e.WORKER_LOCK_DURATION_MS,
      stalledIntervalMs: e.WORKER_STALLED_INTERVAL_MS,
      maxStalledCount: e.WORKER_MAX_STALLED_COUNT,
      readBytesPerSecond: e.WORKER_READ_BYTES_PER_SECOND,
      progressIntervalMs: e.PROGRESS_INTERVAL_MS,
    },
    shutdownGraceMs: e.SHUTDOWN_GRACE_MS,
    store: e.STORE_URL,
    s3: { endpoint: e.S3_ENDPOINT, region: e.S3_REGION, forcePathStyle: e.S3_FORCE_PATH_STYLE, requestTimeoutMs: e.S3_REQUEST_TIMEOUT_MS, stagingOverlap: e.S3_STAGING_OVERLAP },
    output: { redirect: e.OUTPUT_REDIRECT, presignedTtlSeconds: e.OUTPUT_PRESIGNED_TTL_SECONDS },
    events: { heartbeatSeconds: e.SSE_HEARTBEAT_SECONDS },
    links: { secret: e.LINK_SECRET, ttlSeconds: e.LINK_TTL_SECONDS },
    webhooks: {
      secret: e.WEBHOOK_SECRET,
      allow: e.WEBHOOK_ALLOW,
      ports: e.WEBHOOK_PORTS,
      attempts: e.WEBHOOK_ATTEMPTS,
      backoffMs: e.WEBHOOK_BACKOFF_MS,
      timeoutMs: e.WEBHOOK_TIMEOUT_MS,
    },
    uploads: { ttlSeconds: e.UPLOAD_TTL_SECONDS },
    uploadIdleTimeoutMs: e.UPLOAD_IDLE_TIMEOUT_MS,
    streamUploads: e.STREAM_UPLOADS,
    tusOverlapIdleMs: e.TUS_OVERLAP_IDLE_MS,
    inspect: { maxBytes: e.INSPECT_MAX_BYTES, stagingConcurrency: e.INSPECT_STAGING_CONCURRENCY },
    rbd: { pools: e.RBD_POOLS, commandTimeoutMs: e.RBD_COMMAND_TIMEOUT_MS },
    outputHashes: [...new Set(e.OUTPUT_HASHES.map((n) => n.toLowerCase() as HashAlgorithm))].filter((n) => n !== 'sha256'),
    glance: glanceConfig(e),
    allowAnonymous: e.ALLOW_ANONYMOUS,
    idempotency: { ttlSeconds: e.IDEMPOTENCY_TTL_SECONDS },
  };
}

/** 127.0.0.0/8, ::1 (also IPv4-mapped), and the name localhost. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '');
  if (h === 'localhost' || h.endsWith('.localhost')) return true;
  if (h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  const v4 = /^(?:::ffff:)?(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(h);
  return v4 !== null && Number(v4[1]) === 127 && v4.slice(2).every((o) => Number(o) <= 255);
}

/**
 * The API refuses to listen where other hosts can reach it (any HOST that is not
 * loopback: 0.0.0.0, ::, an interface address, a host name) without API_TOKENS,
 * unless ALLOW_ANONYMOUS=true says that an open service is meant (issue 11).
 * Called by `serve` and `up` before anything starts; a worker listens nowhere.
 */
export function checkListenExposure(config: Pick<Config, 'host' | 'apiTokens' | 'allowAnonymous'>): void {
  if (config.apiTokens.length > 0 || config.allowAnonymous || isLoopbackHost(config.host)) return;
  throw new ConfigError(
    `invalid configuration: HOST=${config.host} is reachable from other hosts and API_TOKENS is empty, so anyone who can reach it could use the API; ` +
      'set API_TOKENS (comma-separated tokens of 16+ characters, e.g. from `openssl rand -hex 32`), or HOST=127.0.0.1, ' +
      'or ALLOW_ANONYMOUS=true to serve without tokens on purpose',
  );
}
