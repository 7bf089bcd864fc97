/**
 * A job's record from what a request asked for: the one place POST /v1/jobs (all
 * three kinds of body) and a finished tus upload (routes/uploads.ts) both build
 * and submit a job, so every option either path accepts lands in the record the
 * same way.
 */
import type { JobRecord } from '../queue/records.js';
import { checkCallbackUrl, initialCallback } from '../queue/webhooks.js';
import type { JobOptions, ReceivedSource } from './bodies.js';
import type { ApiContext } from './context.js';
import { ApiError } from './errors.js';

/**
 * What the options need from the service beyond their schema: Glance configured
 * when asked for, callback_url allowed by the webhook URL rules. Returns the
 * record's callback fields (delivery state starting out pending).
 */
export async function checkJobOptions(ctx: Pick<ApiContext, 'config'>, options: JobOptions): Promise<Pick<JobRecord, 'callback_url' | 'callback'>> {
  if (options.glance && !ctx.config.glance) throw new ApiError('GLANCE_NOT_CONFIGURED', 'this service does not publish into Glance (GLANCE_URL is not set)');
  if (options.callback_url === undefined) return {};
  await checkCallbackUrl(options.callback_url, ctx.config);
  return { callback_url: options.callback_url, callback: initialCallback() };
}

export function newJobRecord(
  id: string,
  tenant: string,
  source: ReceivedSource,
  options: JobOptions,
  callback: Pick<JobRecord, 'callback_url' | 'callback'>,
  now = Date.now(),
): JobRecord {
  return {
    id,
    tenant,
    state: 'queued',
    source_format: options.source_format,
    output_format: options.output_format,
    ...(options.expected_sha256 ? { expected_sha256: options.expected_sha256 } : {}),
    ...(options.destination ? { destination: options.destination } : {}),
    ...(options.glance ? { glance: options.glance } : {}),
    ...(options.disk !== undefined ? { disk: options.disk } : {}),
    created_at: now,
    updated_at: now,
    attempts: 0,
    source:
      source.kind === 'upload'
        ? {
            kind: 'upload',
            size: source.size,
            sha256: source.sha256,
            ...(source.filename ? { filename: source.filename } : {}),
            ...(source.wrapper ? { wrapper: source.wrapper, unwrapped_size: source.unwrapped_size } : {}),
          }
        : { kind: 'url', url: source.url },
    progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null },
    ...callback,
  };
}

/**
 * Stores the record (and the passphrase in its own key), then enqueues. On a
 * failure the record and the staged input are removed again and the error is
 * rethrown: no half-made job stays behind.
 */
export async function submitJob(ctx: Pick<ApiContext, 'records' | 'queue' | 'stores'>, record: JobRecord, passphrase?: string): Promise<void> {
  try {
    await ctx.records.create(record);
    // Before the enqueue, so the worker finds it; its own key with a TTL, never in the record.
    if (passphrase !== undefined) await ctx.records.putPassphrase(record.id, passphrase);
    await ctx.queue.enqueue(record.id);
  } catch (err) {
    await ctx.records.remove(record).catch(() => {});
    await ctx.stores.staging.delete(record.id).catch(() => {});
    throw err;
  }
}
