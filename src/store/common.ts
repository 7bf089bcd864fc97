/**
 * What the three store interfaces share: object metadata, byte ranges, keys and
 * the store's own errors.
 *
 * - input staging (staging.ts): uploads streamed in by the API, read back with
 *   random access by any worker;
 * - the output store (output.ts): converted raw images, served over HTTP,
 *   removed by retention;
 * - per-job destinations (destination.ts): an image a job writes into a
 *   user's own pool (RBD), never served, never touched by retention.
 *
 * Keys are chosen by the service (job ids), never by clients; every
 * implementation still refuses a key that is not a plain token.
 */
import { DiskconvError, InvalidArgumentError } from '../engine/errors.js';

export interface ObjectStat {
  key: string;
  size: number;
  /** Last modification, ms since the epoch. */
  modifiedAt: number;
}

export interface ByteRange {
  /** Inclusive first byte. */
  start: number;
  /** Inclusive last byte. */
  end: number;
}

/**
 * Asked by a sweep before it removes an uncommitted write: true while a live
 * job or upload owns `key` (a lease, or the job's state), so the write is kept
 * however old it looks.
 */
export type OwnerCheck = (key: string) => Promise<boolean>;

export class StoreObjectMissingError extends DiskconvError {
  readonly code = 'STORE_OBJECT_MISSING' as const;
  readonly deterministic = true;
}

/** The store itself failed (I/O error, unreachable backend): transient. */
export class StoreError extends DiskconvError {
  readonly code = 'STORE_UNAVAILABLE' as const;
  readonly deterministic = false;
}

const KEY = /^[A-Za-z0-9_-]{1,128}$/;

/** Keys are service-made tokens; anything else is a programming error, refused before touching storage. */
export function assertKey(key: string): void {
  if (!KEY.test(key)) throw new InvalidArgumentError(`invalid store key ${JSON.stringify(key.slice(0, 40))}`);
}
