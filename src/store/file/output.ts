/** The output store in a local directory: sparse raw files, committed by rename. */
import { rm } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { RawFileSink, type Extent } from '../../engine/index.js';
import { StoreError, type ByteRange } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { OutputStore, OutputWriter } from '../output.js';
import { asStoreError, FileObjects } from './objects.js';
import { WriteBehind } from './write-behind.js';

export class FileOutputStore extends ObjectStoreBase<FileObjects> implements OutputStore {
  readonly kind = 'file';

  /** `root` is the store directory (outputs under root/output, writes in progress under root/tmp). */
  static async open(root: string): Promise<FileOutputStore> {
    return new FileOutputStore(await FileObjects.open(root, 'output'));
  }

  async create(key: string, size: number): Promise<OutputWriter> {
    const temp = this.objects.tempPath(key);
    let sink: RawFileSink;
    let behind: WriteBehind;
    try {
      sink = await RawFileSink.create(temp, { removeOnAbort: true });
      behind = await WriteBehind.open(temp);
    } catch (err) {
      await rm(temp, { force: true }).catch(() => {});
      throw asStoreError(err, `create output ${key}`);
    }
    let finished = false;
    // Data bytes handed to the sink: the write-behind flush follows them.
    let written = 0;
    const count = (extent: Extent): void => {
      if (extent.kind === 'data') written += extent.length;
    };
    return {
      write: async (extent: Extent) => {
        try {
          await sink.write(extent);
        } catch (err) {
          throw asStoreError(err, `write of output ${key}`);
        }
        count(extent);
        behind.written(written);
      },
      // The engine's batched path (the native helper writes a batch in one call) where it loaded.
      writeBatch: async (extents: readonly Extent[]) => {
        try {
          await sink.writeBatch(extents);
        } catch (err) {
          throw asStoreError(err, `write of output ${key}`);
        }
        for (const extent of extents) count(extent);
        behind.written(written);
      },
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
        await behind.abort();
        await sink.abort();
        await rm(temp, { force: true });
      },
      commit: async () => {
        if (!finished) throw new StoreError(`commit of output ${key} before finish`);
        try {
          await behind.finish();
        } catch (err) {
          await rm(temp, { force: true });
          throw asStoreError(err, `commit of output ${key}`);
        }
        return this.objects.publish(temp, key, { synced: true });
      },
    };
  }

  read(key: string, range?: ByteRange): Promise<Readable> {
    return this.objects.read(key, range);
  }
}
