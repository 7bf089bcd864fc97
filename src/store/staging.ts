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

/**
 * A write whose parts another host can read before it is committed (S3 with S3_STAGING_OVERLAP: each part is
 * also an object of its own, src/store/s3/part-objects.ts): `readPart` reads part n once announced.
 */
export interface FollowedWrite extends StagedWrite {
  /** Bytes per part (the last one may be shorter). */
  readonly partBytes: number;
  /** After commit, once readers know the object is committed: removes the parts' own objects. */
  removeFollowCopies(): Promise<void>;
}

export interface InputStaging {
  /** 'file' or 's3', for logs and /readyz. */
  readonly kind: string;
  create(key: string): Promise<StagedWrite>;
  /**
   * Where another process can read the uncommitted write `token` (StagedWrite.followToken) while
   * it grows; absent when the store cannot (S3: a multipart part is unreadable until the upload completes;
   * createFollowed writes each part as an object of its own instead).
   */
  followPath?(key: string, token: string): string | undefined;
  /**
   * A write of `size` bytes (a body's declared length) readable part by part while it arrives: `announce(n)` is
   * awaited, in order, each time parts 0..n-1 are readable. Absent when the store does not offer it (or is not
   * switched to: S3_STAGING_OVERLAP).
   */
  createFollowed?(key: string, size: number, announce: (readyParts: number) => Promise<void>): Promise<FollowedWrite>;
  /**
   * Bytes [start, start + target.length) of part `part` of a FollowedWrite of `key`, into `target` (the reader's own
   * recycled memory); StoreObjectMissingError once the part is gone.
   */
  readPart?(key: string, part: number, start: number, target: Uint8Array, signal?: AbortSignal): Promise<void>;
  /**
   * Bytes [start, start + target.length) of the committed object `key`, into `target`, in one request: for a
   * reader with blocks of its own (the part objects' reader once the upload is committed), where open()'s source
   * would cache and read ahead a second time. Offered with readPart.
   */
  readRange?(key: string, start: number, target: Uint8Array, signal?: AbortSignal): Promise<void>;
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
