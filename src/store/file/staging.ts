/** Input staging in a local directory (one host, or a filesystem every host mounts). */
import { createWriteStream } from 'node:fs';
import { rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { FileSource, type RandomAccessSource } from '../../engine/index.js';
import { StoreError, StoreObjectMissingError } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { InputStaging, StagedWrite } from '../staging.js';
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
        return this.objects.publish(temp, key);
      },
      abort: async () => {
        clearInterval(poll);
        stream.destroy();
        await behind.abort();
        await rm(temp, { force: true });
      },
    };
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
