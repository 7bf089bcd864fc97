/** Job records as clients see them (snake_case JSON; the OpenAPI schema `Job`). */
import type { JobRecord } from '../queue/records.js';

/** Recent timestamps' ISO text: a polled job shows the same created_at/started_at (and often updated_at) every time. */
const isoSeen = new Map<number, string>();
const iso = (ms: number | undefined): string | null => {
  if (ms === undefined) return null;
  let text = isoSeen.get(ms);
  if (text === undefined) {
    if (isoSeen.size >= 1024) isoSeen.clear();
    text = new Date(ms).toISOString();
    isoSeen.set(ms, text);
  }
  return text;
};

export function jobPath(id: string): string {
  return `/v1/jobs/${id}`;
}

/** A stored JSON field passed through as its text (presentJobJson). */
class StoredJson {
  constructor(readonly json: string) {}
}

/** The record fields presentJob shows exactly as stored: their stored JSON text is the answer's. */
const AS_STORED = new Set(['source', 'progress', 'error', 'last_error', 'callback', 'glance', 'destination']);

/** For JobRecords.getForTenantPassing: keeps the fields presentJob shows as they are as text. */
export const passStored = (field: string, json: string): unknown => (AS_STORED.has(field) && json !== 'null' ? new StoredJson(json) : undefined);

/**
 * presentJob's answer as JSON text, from a record read with passStored: the
 * fields shown as stored are spliced in as their stored text instead of being
 * parsed and serialised again (a status poll's main cost after the Redis round
 * trip). Equal, byte for byte, to JSON.stringify(presentJob(decoded record)).
 */
export function presentJobJson(rec: JobRecord): string {
  const shown = presentJob(rec);
  let out = '{';
  for (const [key, value] of Object.entries(shown)) {
    if (value === undefined) continue;
    if (out.length > 1) out += ',';
    out += `${JSON.stringify(key)}:${value instanceof StoredJson ? value.json : JSON.stringify(value)}`;
  }
  return `${out}}`;
}

export function presentJob(rec: JobRecord): Record<string, unknown> {
  return {
    id: rec.id,
    state: rec.state,
    source_format: rec.source_format,
    output_format: rec.output_format,
    ...(rec.disk !== undefined ? { disk: rec.disk } : {}),
    ...(rec.expected_sha256 ? { expected_sha256: rec.expected_sha256 } : {}),
    ...(rec.glance ? { glance: rec.glance } : {}),
    created_at: iso(rec.created_at),
    updated_at: iso(rec.updated_at),
    started_at: iso(rec.started_at),
    finished_at: iso(rec.finished_at),
    attempts: rec.attempts,
    progress: rec.progress,
    source: rec.source,
    output: rec.output
      ? rec.output.target
        ? // Written to a destination (RBD): where it is, never an href (it is not served by the API).
          {
            format: rec.output.format,
            target: rec.output.target,
            pool: rec.output.pool,
            image: rec.output.image,
            snapshot: rec.output.snapshot,
            size: rec.output.size,
            sha256: rec.output.sha256,
            ...(rec.output.sha512 ? { sha512: rec.output.sha512 } : {}),
            ...(rec.output.md5 ? { md5: rec.output.md5 } : {}),
            data_bytes: rec.output.data_bytes,
            location: rec.output.location,
            ...(rec.output.glance ? { glance: rec.output.glance } : {}),
          }
        : {
            format: rec.output.format,
            size: rec.output.size,
            sha256: rec.output.sha256,
            ...(rec.output.sha512 ? { sha512: rec.output.sha512 } : {}),
            ...(rec.output.md5 ? { md5: rec.output.md5 } : {}),
            data_bytes: rec.output.data_bytes,
            ...(rec.output.location ? { location: rec.output.location } : {}),
            ...(rec.output.glance ? { glance: rec.output.glance } : {}),
            href: `${jobPath(rec.id)}/output`,
          }
      : null,
    ...(rec.destination ? { destination: rec.destination } : {}),
    error: rec.error ?? null,
    ...(rec.last_error ? { last_error: rec.last_error } : {}),
    ...(rec.duration_seconds !== undefined ? { duration_seconds: rec.duration_seconds } : {}),
    ...(rec.callback_url ? { callback_url: rec.callback_url, callback: rec.callback ?? null } : {}),
    links: { self: jobPath(rec.id), output: `${jobPath(rec.id)}/output` },
  };
}
