/** The output store in a local directory: sparse raw files, committed by rename. */
import { rm } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { RawFileSink, type Extent } from '../../engine/index.js';
import { StoreError, type ByteRange } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { OutputStore, OutputWriter } from '../output.js';
import { asStoreError, FileObjects } from './objects.js';

export class FileOutputStore extends ObjectStoreBase<FileObjects> implements OutputStore {
  readonly kind = 'file';

  /** `root` is the store directory (outputs under root/output, writes in progress under root/tmp). */
  static async open(root: string): Promise<FileOutputStore> {
    return new FileOutputStore(await FileObjects.open(root, 'output'));
  }

  async create(key: string, size: number): Promise<OutputWriter> {
    const temp = this.objects.tempPath(key);
    let sink: RawFileSink;
    try {
      sink = await RawFileSink.create(temp, { removeOnAbort: true });
    } catch (err) {
      throw asStoreError(err, `create output ${key}`);
    }
    let finished = false;
    return {
      write: (extent: Extent) => sink.write(extent).catch((err: unknown) => Promise.reject(asStoreError(err, `write of output ${key}`))),
      finish: async (virtualSize: number) => {
        if (virtualSize !== size) throw new StoreError(`output ${key} was created for ${size} bytes, finished at ${virtualSize}`);
        try {
          await sink.finish(virtualSize);
        } catch (err) {
          throw asStoreError(err, `write of output ${key}`);
        }
        finished = true;
      },
      abort: async () => {
        await sink.abort();
        await rm(temp, { force: true });
      },
      commit: async () => {
        if (!finished) throw new StoreError(`commit of output ${key} before finish`);
        return this.objects.publish(temp, key);
      },
    };
  }

  read(key: string, range?: ByteRange): Promise<Readable> {
    return this.objects.read(key, range);
  }
}
