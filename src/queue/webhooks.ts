/**
 * Completion webhooks. A job created with `callback_url` is, once it reaches a
 * terminal state, put on the `<prefix>webhooks:due` zset (records.ts does that
 * in the same place every state change goes through). A delivery loop in each
 * worker process claims due ids (a lease: the score moves into the future, so a
 * worker that dies mid-delivery only delays it), POSTs the job's JSON and records
 * the outcome in the job's `callback` field; failures are retried with
 * exponential backoff up to WEBHOOK_ATTEMPTS. The loop is not the conversion: a
 * dead or slow receiver never holds up or fails a job.
 *
 * The request: `POST <callback_url>`, `Content-Type: application/json`, the job
 * as GET /v1/jobs/{id} shows it, and
 *   X-Diskconv-Timestamp: <unix seconds>
 *   X-Diskconv-Signature: sha256=<hex HMAC-SHA256(WEBHOOK_SECRET, "<timestamp>.<body>")>
 *   X-Diskconv-Delivery: <job id>.<attempt>
 * Any 2xx is a delivery; redirects are not followed. The URL obeys the URL import
 * rules (src/net/url-policy.ts) with WEBHOOK_ALLOW and WEBHOOK_PORTS, checked when
 * the job is created and again before every delivery.
 */
import { createHmac } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { presentJob } from '../api/present.js';
import type { Config } from '../config.js';
import { InvalidArgumentError, isDiskconvError } from '../engine/errors.js';
import { checkUrl, type UrlPolicy } from '../net/index.js';
import { sendRequest } from '../net/request.js';
import type { JobCallback, JobRecords } from './records.js';

export const SIGNATURE_HEADER = 'x-diskconv-signature';
export const TIMESTAMP_HEADER = 'x-diskconv-timestamp';
export const USER_AGENT = 'diskconv-webhook/1';

/** The URL rules for callbacks: the import rules with their own allow list and ports, no redirects. */
export function webhookPolicy(config: Pick<Config, 'webhooks' | 'urlImport'>): UrlPolicy {
  return {
    allow: config.webhooks.allow,
    allowedPorts: config.webhooks.ports,
    connectTimeoutMs: Math.min(config.urlImport.connectTimeoutMs, config.webhooks.timeoutMs),
    idleTimeoutMs: config.webhooks.timeoutMs,
    maxBytes: 64 * 1024,
    maxRedirects: 0,
  };
}

/** At job creation: webhooks configured, and the URL allowed (throws URL_REFUSED or INVALID_ARGUMENT). */
export async function checkCallbackUrl(url: string, config: Pick<Config, 'webhooks' | 'urlImport'>): Promise<void> {
  if (!config.webhooks.secret) throw new InvalidArgumentError('callback_url needs webhooks to be configured on the service (WEBHOOK_SECRET)');
  await checkUrl(url, webhookPolicy(config));
}

/** `sha256=<hex>` over `<timestamp>.<body>`. */
export function signWebhook(secret: string, timestamp: string, body: string | Buffer): string {
  return `sha256=${createHmac('sha256', secret).update(`${timestamp}.`).update(body).digest('hex')}`;
}

export const initialCallback = (): JobCallback => ({ state: 'pending', attempts: 0, last_status: null, last_error: null });

/** Claims up to ARGV[3] ids due by ARGV[1] by moving them to ARGV[2] (the lease). */
const CLAIM = `
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
`;

export interface WebhookLoop {
  stop(): Promise<void>;
}

export interface WebhookDeps {
  config: Config;
  redis: Redis;
  records: JobRecords;
  logger: Logger;
  /** How often the due set is looked at. */
  pollMs?: number;
  /** Deliveries in flight at once per process. */
  concurrency?: number;
}

export function startWebhookLoop(deps: WebhookDeps): WebhookLoop {
  const { config, redis, records, logger } = deps;
  const pollMs = deps.pollMs ?? 500;
  const concurrency = deps.concurrency ?? 4;
  const secret = config.webhooks.secret;
  const policy = webhookPolicy(config);
  const lease = config.webhooks.timeoutMs + policy.connectTimeoutMs + 5000;
  const inFlight = new Set<Promise<void>>();
  const controller = new AbortController();
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;

  const deliver = async (id: string): Promise<void> => {
    const rec = await records.get(id);
    if (!rec || !rec.callback_url) {
      await redis.zrem(records.webhooksDueKey, id);
      return;
    }
    const previous = rec.callback ?? initialCallback();
    if (previous.state !== 'pending') {
      await redis.zrem(records.webhooksDueKey, id);
      return;
    }
    const attempt = previous.attempts + 1;
    const pending: JobCallback = { ...previous, attempts: attempt };
    const body = Buffer.from(JSON.stringify(presentJob({ ...rec, callback: pending })));
    const timestamp = String(Math.floor(Date.now() / 1000));
    let status: number | null = null;
    let error: string | null = null;
    try {
      if (!secret) throw new InvalidArgumentError('WEBHOOK_SECRET is not set on this worker');
      const checked = await checkUrl(rec.callback_url, policy);
      const exchange = await sendRequest(checked, policy, {
        method: 'POST',
        body,
        signal: AbortSignal.any([controller.signal, AbortSignal.timeout(config.webhooks.timeoutMs)]),
        headers: {
          'content-type': 'application/json',
          'user-agent': USER_AGENT,
          [TIMESTAMP_HEADER]: timestamp,
          [SIGNATURE_HEADER]: signWebhook(secret, timestamp, body),
          'x-diskconv-delivery': `${id}.${attempt}`,
        },
      });
      status = exchange.status;
      exchange.discard();
      if (status < 200 || status > 299) error = `the receiver answered ${status}`;
    } catch (err) {
      error = isDiskconvError(err) ? `${err.code}: ${err.message}` : 'internal error';
      if (!isDiskconvError(err)) logger.error({ err, job: id }, 'webhook delivery failed with an internal error');
    }
    if (stopped && error !== null && controller.signal.aborted) return; // shutting down: the lease runs out, another worker retries
    if (error === null) {
      await records.setCallback(id, { state: 'delivered', attempts: attempt, last_status: status, last_error: null });
      await redis.zrem(records.webhooksDueKey, id);
      logger.info({ job: id, attempt, status }, 'webhook delivered');
      return;
    }
    // A refused URL is refused next time too.
    const final = attempt >= config.webhooks.attempts || error.startsWith('URL_REFUSED');
    await records.setCallback(id, { state: final ? 'failed' : 'pending', attempts: attempt, last_status: status, last_error: error });
    if (final) {
      await redis.zrem(records.webhooksDueKey, id);
      logger.warn({ job: id, attempt, status, error }, 'webhook failed; giving up');
    } else {
      const delay = config.webhooks.backoffMs * 2 ** (attempt - 1);
      await redis.zadd(records.webhooksDueKey, 'XX', Date.now() + delay, id);
      logger.info({ job: id, attempt, status, error, retry_in_ms: delay }, 'webhook failed; will retry');
    }
  };

  const tick = async (): Promise<void> => {
    if (stopped) return;
    const room = concurrency - inFlight.size;
    if (room > 0) {
      const now = Date.now();
      const ids = (await redis.eval(CLAIM, 1, records.webhooksDueKey, String(now), String(now + lease), String(room))) as string[];
      for (const id of ids) {
        const p = deliver(id)
          .catch((err: unknown) => logger.warn({ err, job: id }, 'webhook bookkeeping failed; retried after the lease'))
          .finally(() => inFlight.delete(p));
        inFlight.add(p);
      }
    }
  };

  const schedule = (): void => {
    if (stopped) return;
    timer = setTimeout(() => {
      tick()
        .catch((err: unknown) => logger.warn({ err: (err as Error).message }, 'webhook loop: redis error'))
        .finally(schedule);
    }, pollMs);
    timer.unref();
  };
  schedule();

  return {
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      controller.abort();
      await Promise.allSettled([...inFlight]);
    },
  };
}
