/**
 * POST /v1/inspect: the same three kinds of body as POST /v1/jobs, answered at
 * once with the engine's info and its safety verdict; nothing is converted and
 * nothing is kept.
 */
import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { Limiter, type FormatId, type RandomAccessSource } from '../../engine/index.js';
import { inspectSource } from '../../queue/inspect.js';
import { displayUrl, openImportUrl, type OpenedUrlSource } from '../../queue/url-import.js';
import { receiveBody } from '../bodies.js';
import type { ApiContext } from '../context.js';

export async function inspectRoutes(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  // A URL that cannot be read by ranges is staged on this host: bounded in bytes
  // (INSPECT_MAX_BYTES, and the free space there) and in inspections at once; range reads by the same byte bound.
  const stagingSlots = new Limiter(ctx.config.inspect.stagingConcurrency);
  app.post('/v1/inspect', { config: { rateLimit: { max: ctx.config.rateLimit.inspect, timeWindow: ctx.config.rateLimit.windowSeconds * 1000 } } }, async (request, reply) => {
    const key = `inspect-${randomBytes(12).toString('base64url')}`;
    const controller = new AbortController();
    reply.raw.on('close', () => {
      if (!reply.raw.writableFinished) controller.abort(); // the client went away
    });
    // The lease keeps the sweeps off this inspection's staged upload and scratch download.
    const lease = await ctx.leases.hold(key);
    try {
      return await inspect(request, key, controller);
    } finally {
      await lease.release();
    }
  });

  const inspect = async (request: FastifyRequest, key: string, controller: AbortController): Promise<Record<string, unknown>> => {
    const received = await receiveBody(request, key, { config: ctx.config, staging: ctx.stores.staging, destinations: ctx.stores.destinations, policy: ctx.policy });
    const src = received.source;
    const stagingPath = join(ctx.scratchDir, `${key}.download`);
    let opened: OpenedUrlSource | undefined;
    let source: RandomAccessSource | undefined;
    try {
      let summary: Record<string, unknown>;
      if (src.kind === 'upload') {
        const displayName = src.filename ?? 'upload';
        source = await ctx.stores.staging.open(key, displayName);
        summary = { kind: 'upload', ...(src.filename ? { filename: src.filename } : {}), size: src.size, sha256: src.sha256, ...(src.wrapper ? { wrapper: src.wrapper, unwrapped_size: src.unwrapped_size } : {}) };
      } else {
        opened = await openImportUrl(src.url, ctx.policy, {
          signal: controller.signal,
          stagingPath,
          ...(received.options.expected_sha256 ? { expectedSha256: received.options.expected_sha256 } : {}),
          maxUnwrappedBytes: ctx.config.maxVirtualSize,
          stagingLimit: { maxBytes: ctx.config.inspect.maxBytes, limitName: 'INSPECT_MAX_BYTES' },
          stagingSlot: (signal) => stagingSlots.acquire(signal),
          // Range reads of metadata only: no read-ahead, and the same byte bound as staging.
          rangeTuning: { readAhead: false, maxFetchBytes: ctx.config.inspect.maxBytes, fetchLimitName: 'INSPECT_MAX_BYTES' },
        });
        source = opened.source;
        summary = {
          kind: 'url',
          url: src.url,
          final_url: opened.finalUrl,
          size: opened.size,
          mode: opened.mode,
          ...(opened.sha256 ? { sha256: opened.sha256 } : {}),
          ...(opened.wrapper ? { wrapper: opened.wrapper, unwrapped_size: opened.unwrappedSize } : {}),
        };
      }
      const displayName = src.kind === 'upload' ? (src.filename ?? 'upload') : displayUrl(src.url);
      const format = received.options.source_format === 'auto' ? 'auto' : (received.options.source_format as FormatId);
      // An encrypted image's passphrase (JSON body or multipart field): for this request only, never kept or echoed.
      const passphrase = received.passphrase !== undefined ? Buffer.from(received.passphrase, 'utf8') : undefined;
      const inspection = await inspectSource(source, {
        format,
        maxVirtualSize: ctx.config.maxVirtualSize,
        signal: controller.signal,
        displayName,
        ...(passphrase ? { passphrase } : {}),
        // An archive's compressed members are staged in DATA_DIR/work as the worker's are (its free-space
        // bound, and removed on close), under this inspection's key, which the lease keeps off the sweep.
        scratchDir: ctx.scratchDir,
        scratchOwner: key,
      });
      return { source: summary, ...inspection };
    } finally {
      // A URL source is closed through its opener, which also drops its connections.
      await (opened ? opened.close() : source?.close())?.catch(() => {});
      await rm(stagingPath, { force: true }).catch(() => {});
      if (src.kind === 'upload') await ctx.stores.staging.delete(key).catch(() => {});
    }
  };
}
