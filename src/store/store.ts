/**
 * Where staged inputs and converted outputs live. The API writes inputs, the
 * workers read them and write outputs, the API serves outputs: the store and Redis
 * are all the two processes share. A local directory implements it now
 * (local.ts); an S3 or RBD store implements the same contract later:
 *
 * - objects appear atomically: a writer's bytes are invisible until `commit()`,
 *   and `abort()` leaves nothing behind;
 * - outputs are written as an extent stream (the engine's ExtentSink), so a store
 *   can skip holes (sparse file, RBD discard, S3 multipart of data parts);
 * - inputs are read back with random access (the engine's RandomAccessSource),
 *   outputs with byte ranges (HTTP Range).
 *
 * Keys are chosen by the service (job ids), never by clients; every
 * implementation still refuses a key that is not a plain token.
 */
import type { Readable, Writable } from 'node:stream';
import type { ExtentSink, RandomAccessSource } from '../engine/index.js';
import { DiskconvError, InvalidArgumentError } from '../engine/errors.js';

export type ObjectKind = 'input' | 'output';

export interface ObjectStat {
  key: string;
  size: number;
  /** Last modification, ms since the epoch. */
  modifiedAt: number;
}

/** Streams bytes into a new object (uploads). */
export interface StreamWriter {
  readonly stream: Writable;
  /** After `stream` has finished: makes the object durable and visible. */
  commit(): Promise<ObjectStat>;
  /** Removes everything written so far. Safe to call at any point, and twice. */
  abort(): Promise<void>;
}

/** Receives a converted image as extents (outputs). `finish()` is called by the converter. */
export interface ExtentWriter extends ExtentSink {
  /** After `finish()`: makes the object durable and visible under its key. */
  commit(): Promise<ObjectStat>;
}

export interface ByteRange {
  /** Inclusive first byte. */
  start: number;
  /** Inclusive last byte. */
  end: number;
}

export interface Store {
  readonly kind: string;
  createStreamWriter(kind: ObjectKind, key: string): Promise<StreamWriter>;
  createExtentWriter(kind: ObjectKind, key: string): Promise<ExtentWriter>;
  /** Random access to a committed object; throws StoreObjectMissingError when absent. */
  openSource(kind: ObjectKind, key: string, name?: string): Promise<RandomAccessSource>;
  stat(kind: ObjectKind, key: string): Promise<ObjectStat | undefined>;
  /** The object's bytes, or a range of them; throws StoreObjectMissingError when absent. */
  createReadStream(kind: ObjectKind, key: string, range?: ByteRange): Promise<Readable>;
  /** Removes the object and any uncommitted writes for the key. Absent objects are fine. */
  delete(kind: ObjectKind, key: string): Promise<void>;
  /** Committed objects, for retention sweeps. */
  list(kind: ObjectKind): AsyncIterable<ObjectStat>;
  /** Removes uncommitted writes last touched before `olderThan` (ms since the epoch); returns how many. */
  sweepUncommitted(olderThan: number): Promise<number>;
  /** Bytes that can still be written, when the store knows (a local filesystem does, S3 does not). */
  freeBytes(): Promise<number | undefined>;
  /** Throws when the store is not usable (readiness). */
  ping(): Promise<void>;
}

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
