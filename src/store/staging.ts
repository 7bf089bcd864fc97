/**
 * Input staging: the API streams an upload in (invisible until committed), any
 * worker on any host reads it back with random access. Implementations: a local
 * directory (file/), a bucket (s3/).
 */
import type { Writable } from 'node:stream';
import type { RandomAccessSource } from '../engine/index.js';
import type { ObjectStat, OwnerCheck } from './common.js';

/** An upload being staged. */
export interface StagedWrite {
  readonly stream: Writable;
  /** After `stream` has finished: makes the object durable and visible. */
  commit(): Promise<ObjectStat>;
  /** Removes everything written so far. Safe to call at any point, and twice. */
  abort(): Promise<void>;
  /** Names this write for followPath (stores whose uncommitted writes can be read while they grow). */
  readonly followToken?: string;
}

export interface InputStaging {
  /** 'file' or 's3', for logs and /readyz. */
  readonly kind: string;
  create(key: string): Promise<StagedWrite>;
  /**
   * Where another process can read the uncommitted write `token` (StagedWrite.followToken) while
   * it grows; absent when the store cannot (S3: a multipart part is unreadable until the upload completes).
   */
  followPath?(key: string, token: string): string | undefined;
  /** Random access to a committed object; throws StoreObjectMissingError when absent. */
  open(key: string, name?: string): Promise<RandomAccessSource>;
  stat(key: string): Promise<ObjectStat | undefined>;
  /** Removes the object and its uncommitted writes. Absent objects are fine. */
  delete(key: string): Promise<void>;
  /** Committed objects, for the orphan sweep. */
  list(): AsyncIterable<ObjectStat>;
  /** Removes uncommitted writes last touched before `olderThan` whose key no live owner holds; returns how many. */
  sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number>;
  /** Bytes that can still be written, when the store knows (a filesystem does, S3 does not). */
  freeBytes(): Promise<number | undefined>;
  /** Throws when staging is not usable (readiness), with a message saying why. */
  ping(): Promise<void>;
}
