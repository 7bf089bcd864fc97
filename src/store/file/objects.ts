/**
 * Committed objects of one kind in a local directory, with writes in progress
 * beside them:
 *
 *   <root>/<kind>/<key>                 committed objects
 *   <root>/tmp/<kind>.<key>.<random>    writes in progress
 *
 * Commit = fsync the file, rename it into place (atomic on one filesystem),
 * fsync the directory; so a reader sees a whole object or none, even across a
 * crash. Staging (input) and the output store share this, each with its kind.
 */
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { access, mkdir, open, readdir, rename, rm, stat, statfs, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { InsufficientSpaceError, isDiskconvError } from '../../engine/index.js';
import type { ObjectSet } from '../objects.js';
import { assertKey, StoreError, StoreObjectMissingError, type ByteRange, type ObjectStat, type OwnerCheck } from '../common.js';

export type FileKind = 'input' | 'output';

export class FileObjects implements ObjectSet {
  private constructor(
    readonly root: string,
    readonly kind: FileKind,
  ) {}

  static async open(root: string, kind: FileKind): Promise<FileObjects> {
    for (const sub of [kind, 'tmp']) await mkdir(join(root, sub), { recursive: true, mode: 0o750 });
    return new FileObjects(root, kind);
  }

  path(key: string): string {
    assertKey(key);
    return join(this.root, this.kind, key);
  }

  tempPath(key: string): string {
    assertKey(key);
    return join(this.root, 'tmp', `${this.kind}.${key}.${randomBytes(6).toString('hex')}`);
  }

  /**
   * fsync the written temp file, rename it into place, then make the rename itself durable. `synced`: the caller
   * fsynced the file already (WriteBehind.finish, through a descriptor opened before the first write, so it also
   * sees any write error): a second fsync through a new descriptor would only cost time.
   */
  async publish(temp: string, key: string, options: { synced?: boolean } = {}): Promise<ObjectStat> {
    const final = this.path(key);
    try {
      if (!options.synced) await fsyncFile(temp);
      await rename(temp, final);
      await fsyncDir(join(this.root, this.kind));
      const st = await stat(final);
      return { key, size: st.size, modifiedAt: st.mtimeMs };
    } catch (err) {
      await rm(temp, { force: true });
      throw asStoreError(err, `commit of ${this.kind} ${key}`);
    }
  }

  async stat(key: string): Promise<ObjectStat | undefined> {
    try {
      const st = await stat(this.path(key));
      return { key, size: st.size, modifiedAt: st.mtimeMs };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw asStoreError(err, `stat of ${this.kind} ${key}`);
    }
  }

  async read(key: string, range?: ByteRange): Promise<Readable> {
    let handle: FileHandle;
    try {
      handle = await open(this.path(key), 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new StoreObjectMissingError(`${this.kind} ${key} is not in the store`);
      throw asStoreError(err, `read of ${this.kind} ${key}`);
    }
    // The open handle keeps the bytes readable even if the object is deleted meanwhile.
    return handle.createReadStream({ ...(range ? { start: range.start, end: range.end } : {}), highWaterMark: 1 << 20 });
  }

  async delete(key: string): Promise<void> {
    const path = this.path(key);
    try {
      await rm(path, { force: true });
      const prefix = `${this.kind}.${key}.`;
      for (const name of await readdir(join(this.root, 'tmp'))) {
        if (name.startsWith(prefix)) await rm(join(this.root, 'tmp', name), { force: true });
      }
    } catch (err) {
      throw asStoreError(err, `delete of ${this.kind} ${key}`);
    }
  }

  async *list(): AsyncIterable<ObjectStat> {
    const dir = join(this.root, this.kind);
    const names = await readdir(dir).catch((err: unknown) => Promise.reject(asStoreError(err, `listing of ${this.kind}`)));
    for (const name of names) {
      const st = await stat(join(dir, name)).catch(() => undefined);
      if (st?.isFile()) yield { key: name, size: st.size, modifiedAt: st.mtimeMs };
    }
  }

  /** Uncommitted writes of this kind, older than `olderThan`, whose key no live owner holds. */
  async sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number> {
    const dir = join(this.root, 'tmp');
    let removed = 0;
    const names = await readdir(dir).catch((err: unknown) => Promise.reject(asStoreError(err, 'listing of uncommitted writes')));
    const prefix = `${this.kind}.`;
    for (const name of names) {
      if (!name.startsWith(prefix)) continue;
      const key = name.slice(prefix.length, name.lastIndexOf('.'));
      const st = await stat(join(dir, name)).catch(() => undefined);
      if (!st || st.mtimeMs >= olderThan) continue;
      if (key.length > 0 && (await owned(key))) continue;
      await rm(join(dir, name), { force: true });
      removed++;
    }
    return removed;
  }

  async freeBytes(): Promise<number> {
    try {
      const st = await statfs(this.root);
      return st.bavail * st.bsize;
    } catch (err) {
      throw asStoreError(err, 'free space check');
    }
  }

  async ping(): Promise<void> {
    try {
      await access(join(this.root, this.kind), constants.R_OK | constants.W_OK);
      await access(join(this.root, 'tmp'), constants.R_OK | constants.W_OK);
    } catch (err) {
      throw asStoreError(err, `store check (${this.kind})`);
    }
  }
}

/** A writer may have closed its handle; fsync through a new one flushes the same inode. */
async function fsyncFile(path: string): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export function asStoreError(err: unknown, what: string): Error {
  if (isDiskconvError(err)) return err;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOSPC' || code === 'EDQUOT') return new InsufficientSpaceError(`${what}: no space left in the store`, { cause: err });
  return new StoreError(`${what} failed${code ? ` (${code})` : ''}`, { cause: err });
}
