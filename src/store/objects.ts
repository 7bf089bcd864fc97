/**
 * The part input staging and the output store have in common: a set of
 * committed objects of one kind, with uncommitted writes beside them. Each
 * implementation (file/objects.ts, s3/objects.ts) provides it once as an
 * `ObjectSet`; `ObjectStoreBase` answers the shared half of both interfaces
 * (stat, delete, list, sweepUncommitted, freeBytes, ping) from it, so the
 * staging and output classes only add what differs: how a write is made and
 * how a committed object is read.
 */
import type { ObjectStat, OwnerCheck } from './common.js';

export interface ObjectSet {
  stat(key: string): Promise<ObjectStat | undefined>;
  /** Removes the object and its uncommitted writes. Absent objects are fine. */
  delete(key: string): Promise<void>;
  /** Committed objects. */
  list(): AsyncIterable<ObjectStat>;
  /** Removes uncommitted writes last touched before `olderThan` whose key no live owner holds; returns how many. */
  sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number>;
  /** Bytes that can still be written, when the backend knows (a filesystem does, S3 does not). */
  freeBytes(): Promise<number | undefined>;
  /** Throws when the backend is not usable, with a message saying why. */
  ping(): Promise<void>;
}

export abstract class ObjectStoreBase<S extends ObjectSet> {
  abstract readonly kind: string;
  protected constructor(protected readonly objects: S) {}

  stat(key: string): Promise<ObjectStat | undefined> {
    return this.objects.stat(key);
  }
  delete(key: string): Promise<void> {
    return this.objects.delete(key);
  }
  list(): AsyncIterable<ObjectStat> {
    return this.objects.list();
  }
  sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number> {
    return this.objects.sweepUncommitted(olderThan, owned);
  }
  freeBytes(): Promise<number | undefined> {
    return this.objects.freeBytes();
  }
  ping(): Promise<void> {
    return this.objects.ping();
  }
}
