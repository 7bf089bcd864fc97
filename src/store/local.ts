/**
 * The store as a local directory (one machine, or a shared filesystem mounted by
 * the API and every worker):
 *
 *   <root>/input/<key>    committed staged uploads
 *   <root>/output/<key>   committed raw images (sparse files)
 *   <root>/tmp/<kind>.<key>.<random>   writes in progress
 *
 * Commit = fsync the file, rename it into place (atomic on one filesystem), fsync
 * the directory; so a reader sees a whole object or none, even across a crash.
 */
import { randomBytes } from 'node:crypto';
import { constants, createWriteStream } from 'node:fs';
import { access, mkdir, open, readdir, rename, rm, stat, statfs, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { FileSource, InsufficientSpaceError, isDiskconvError, RawFileSink, type Extent, type RandomAccessSource } from '../engine/index.js';
import {
  assertKey,
  StoreError,
  StoreObjectMissingError,
  type ByteRange,
  type ExtentWriter,
  type ObjectKind,
  type ObjectStat,
  type Store,
  type StreamWriter,
} from './store.js';

const KINDS: readonly ObjectKind[] = ['input', 'output'];

export class LocalStore implements Store {
  readonly kind = 'local';
  private constructor(readonly root: string) {}

  static async open(root: string): Promise<LocalStore> {
    for (const sub of [...KINDS, 'tmp']) await mkdir(join(root, sub), { recursive: true, mode: 0o750 });
    return new LocalStore(root);
  }

  private path(kind: ObjectKind, key: string): string {
    assertKey(key);
    return join(this.root, kind, key);
  }

  private tempPath(kind: ObjectKind, key: string): string {
    assertKey(key);
    return join(this.root, 'tmp', `${kind}.${key}.${randomBytes(6).toString('hex')}`);
  }

  /** rename into place, then make the rename itself durable. */
  private async publish(temp: string, kind: ObjectKind, key: string): Promise<ObjectStat> {
    const final = this.path(kind, key);
    try {
      await rename(temp, final);
      await fsyncDir(join(this.root, kind));
      const st = await stat(final);
      return { key, size: st.size, modifiedAt: st.mtimeMs };
    } catch (err) {
      await rm(temp, { force: true });
      throw asStoreError(err, `commit of ${kind} ${key}`);
    }
  }

  async createStreamWriter(kind: ObjectKind, key: string): Promise<StreamWriter> {
    const temp = this.tempPath(kind, key);
    const stream = createWriteStream(temp, { flags: 'wx', mode: 0o640, highWaterMark: 1 << 20 });
    await new Promise<void>((resolve, reject) => {
      stream.once('open', () => resolve());
      stream.once('error', (err) => reject(asStoreError(err, `create ${kind} ${key}`)));
    });
    return {
      stream,
      commit: async () => {
        if (!stream.writableFinished) throw new StoreError(`commit of ${kind} ${key} before the stream finished`);
        await fsyncFile(temp).catch(async (err: unknown) => {
          await rm(temp, { force: true });
          throw asStoreError(err, `commit of ${kind} ${key}`);
        });
        return this.publish(temp, kind, key);
      },
      abort: async () => {
        stream.destroy();
        await rm(temp, { force: true });
      },
    };
  }

  async createExtentWriter(kind: ObjectKind, key: string): Promise<ExtentWriter> {
    const temp = this.tempPath(kind, key);
    let sink: RawFileSink;
    try {
      sink = await RawFileSink.create(temp, { removeOnAbort: true });
    } catch (err) {
      throw asStoreError(err, `create ${kind} ${key}`);
    }
    let finished = false;
    return {
      write: (extent: Extent) => sink.write(extent).catch((err: unknown) => Promise.reject(asStoreError(err, `write of ${kind} ${key}`))),
      finish: async (virtualSize: number) => {
        try {
          await sink.finish(virtualSize);
        } catch (err) {
          throw asStoreError(err, `write of ${kind} ${key}`);
        }
        finished = true;
      },
      abort: async () => {
        await sink.abort();
        await rm(temp, { force: true });
      },
      commit: async () => {
        if (!finished) throw new StoreError(`commit of ${kind} ${key} before finish`);
        try {
          await fsyncFile(temp);
        } catch (err) {
          await rm(temp, { force: true });
          throw asStoreError(err, `commit of ${kind} ${key}`);
        }
        return this.publish(temp, kind, key);
      },
    };
  }

  async openSource(kind: ObjectKind, key: string, name = `${kind} ${key}`): Promise<RandomAccessSource> {
    const path = this.path(kind, key);
    if (!(await this.stat(kind, key))) throw new StoreObjectMissingError(`${kind} ${key} is not in the store`);
    return FileSource.open(path, name);
  }

  async stat(kind: ObjectKind, key: string): Promise<ObjectStat | undefined> {
    try {
      const st = await stat(this.path(kind, key));
      return { key, size: st.size, modifiedAt: st.mtimeMs };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw asStoreError(err, `stat of ${kind} ${key}`);
    }
  }

  async createReadStream(kind: ObjectKind, key: string, range?: ByteRange): Promise<Readable> {
    let handle: FileHandle;
    try {
      handle = await open(this.path(kind, key), 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new StoreObjectMissingError(`${kind} ${key} is not in the store`);
      throw asStoreError(err, `read of ${kind} ${key}`);
    }
    // The open handle keeps the bytes readable even if the object is deleted meanwhile.
    return handle.createReadStream({ ...(range ? { start: range.start, end: range.end } : {}), highWaterMark: 1 << 20 });
  }

  async delete(kind: ObjectKind, key: string): Promise<void> {
    const path = this.path(kind, key);
    try {
      await rm(path, { force: true });
      const prefix = `${kind}.${key}.`;
      for (const name of await readdir(join(this.root, 'tmp'))) {
        if (name.startsWith(prefix)) await rm(join(this.root, 'tmp', name), { force: true });
      }
    } catch (err) {
      throw asStoreError(err, `delete of ${kind} ${key}`);
    }
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectStat> {
    const dir = join(this.root, kind);
    const names = await readdir(dir).catch((err: unknown) => Promise.reject(asStoreError(err, `listing of ${kind}`)));
    for (const name of names) {
      const st = await stat(join(dir, name)).catch(() => undefined);
      if (st?.isFile()) yield { key: name, size: st.size, modifiedAt: st.mtimeMs };
    }
  }

  async sweepUncommitted(olderThan: number): Promise<number> {
    const dir = join(this.root, 'tmp');
    let removed = 0;
    const names = await readdir(dir).catch((err: unknown) => Promise.reject(asStoreError(err, 'listing of uncommitted writes')));
    for (const name of names) {
      const st = await stat(join(dir, name)).catch(() => undefined);
      if (st && st.mtimeMs < olderThan) {
        await rm(join(dir, name), { force: true });
        removed++;
      }
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
      await access(join(this.root, 'output'), constants.R_OK | constants.W_OK);
      await access(join(this.root, 'tmp'), constants.R_OK | constants.W_OK);
    } catch (err) {
      throw asStoreError(err, 'store check');
    }
  }
}

/** The writer closed its handle; fsync through a new one flushes the same inode. */
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

function asStoreError(err: unknown, what: string): Error {
  if (isDiskconvError(err)) return err;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOSPC' || code === 'EDQUOT') return new InsufficientSpaceError(`${what}: no space left in the store`, { cause: err });
  return new StoreError(`${what} failed${code ? ` (${code})` : ''}`, { cause: err });
}
