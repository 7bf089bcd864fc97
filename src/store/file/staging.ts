/** Input staging in a local directory (one host, or a filesystem every host mounts). */
import { createWriteStream } from 'node:fs';
import { link, open, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { FileSource, type RandomAccessSource } from '../../engine/index.js';
import { StoreError, StoreObjectMissingError } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { InputStaging, StagedWrite } from '../staging.js';
import type { ObjectStat } from '../common.js';
import { asStoreError, FileObjects } from './objects.js';
import { WriteBehind } from './write-behind.js';

/** How often the write-behind flush looks at how far the upload has come. */
const WRITE_BEHIND_POLL_MS = 50;

export class FileStaging extends ObjectStoreBase<FileObjects> implements InputStaging {
  readonly kind = 'file';

  /** `root` is the store directory (inputs under root/input, writes in progress under root/tmp). */
  static async open(root: string): Promise<FileStaging> {
    return new FileStaging(await FileObjects.open(root, 'input'));
  }

  async create(key: string): Promise<StagedWrite> {
    const temp = this.objects.tempPath(key);
    const stream = createWriteStream(temp, { flags: 'wx', mode: 0o640, highWaterMark: 1 << 20 });
    await new Promise<void>((resolve, reject) => {
      stream.once('open', () => resolve());
      stream.once('error', (err) => reject(asStoreError(err, `create input ${key}`)));
    });
    let behind: WriteBehind;
    try {
      behind = await WriteBehind.open(temp);
    } catch (err) {
      stream.destroy();
      await rm(temp, { force: true }).catch(() => {});
      throw asStoreError(err, `create input ${key}`);
    }
    // The upload's bytes reach the disk as they arrive, so its commit does not wait for all of them.
    const poll = setInterval(() => behind.written(stream.bytesWritten), WRITE_BEHIND_POLL_MS);
    poll.unref();
    stream.once('close', () => clearInterval(poll));
    return {
      stream,
      followToken: basename(temp),
      commit: async () => {
        if (!stream.writableFinished) throw new StoreError(`commit of input ${key} before the stream finished`);
        clearInterval(poll);
        try {
          await behind.finish();
        } catch (err) {
          await rm(temp, { force: true });
          throw asStoreError(err, `commit of input ${key}`);
        }
        return this.objects.publish(temp, key, { synced: true });
      },
      abort: async () => {
        clearInterval(poll);
        stream.destroy();
        await behind.abort();
        await rm(temp, { force: true });
      },
    };
  }

  /**
   * Makes a finished file written elsewhere on the same filesystem (a tus upload) the committed object `key` by a
   * hard link: fsync, link into place, fsync the directory. The file keeps its own name (its owner removes it, and
   * can still offer it again if what follows fails). Undefined when it lies on another filesystem (EXDEV) or `key`
   * is taken by another file: the caller copies it instead. Nothing is ever removed here.
   */
  async adopt(key: string, path: string): Promise<ObjectStat | undefined> {
    const final = this.objects.path(key);
    try {
      const handle = await open(path, 'r');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
      try {
        await link(path, final);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EXDEV' || code === 'EPERM') return undefined;
        if (code !== 'EEXIST') throw err;
        // Linked by an earlier try of the same completion: the same file, fine; anything else is copied over.
        const [a, b] = await Promise.all([stat(path), stat(final)]);
        if (a.ino !== b.ino || a.dev !== b.dev) return undefined;
      }
      const dir = await open(dirname(final), 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
      const st = await stat(final);
      return { key, size: st.size, modifiedAt: st.mtimeMs };
    } catch (err) {
      throw asStoreError(err, `commit of input ${key}`);
    }
  }

  /**
   * Makes a file still being written elsewhere on the same filesystem (a tus upload as its PATCHes arrive) an
   * uncommitted write of `key` by a hard link, for a worker to follow (followPath) while it grows; returns its
   * token. Undefined across filesystems. The file keeps its own name; dropping the link (dropUncommitted, delete,
   * the sweep of uncommitted writes) never touches it.
   */
  async linkUncommitted(key: string, path: string): Promise<string | undefined> {
    const temp = this.objects.tempPath(key);
    try {
      await link(path, temp);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EXDEV' || code === 'EPERM') return undefined;
      throw asStoreError(err, `link of input ${key}`);
    }
    return basename(temp);
  }

  /** Removes the uncommitted write `token` of `key` (only a name of ours: followPath checks it). */
  async dropUncommitted(key: string, token: string): Promise<void> {
    const path = this.followPath(key, token);
    if (path !== undefined) await rm(path, { force: true });
  }

  /** The uncommitted write's path, when `token` is one of this key's (never a path a client chose). */
  followPath(key: string, token: string): string | undefined {
    const prefix = `input.${key}.`;
    if (!token.startsWith(prefix) || !/^[0-9a-f]{12}$/.test(token.slice(prefix.length))) return undefined;
    return join(dirname(this.objects.tempPath(key)), token);
  }

  async open(key: string, name = `input ${key}`): Promise<RandomAccessSource> {
    if (!(await this.objects.stat(key))) throw new StoreObjectMissingError(`input ${key} is not in the store`);
    return FileSource.open(this.objects.path(key), name);
  }
}
