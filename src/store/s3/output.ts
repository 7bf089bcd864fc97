/**
 * The output store in a bucket: the raw image goes up as a multipart upload in
 * guest order while it is converted, visible only once complete. Zero extents
 * travel as zeros: an S3 object has no holes. Memory: (PARTS_IN_FLIGHT + 1)
 * part buffers, reused (multipart.ts); the last part goes up at the converter's
 * finish, so the job's commit only completes the upload.
 */
import type { Readable } from 'node:stream';
import type { S3Client } from '@aws-sdk/client-s3';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import type { Extent } from '../../engine/index.js';
import { StoreError, StoreObjectMissingError, type ByteRange } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { OutputStore, OutputWriter, StoredOutput } from '../output.js';
import type { S3Settings } from './client.js';
import { PartWriter, type PartWriterStats } from './multipart.js';
import { partSizeFor, S3Objects } from './objects.js';

/** UploadParts under way at once (two, as the staging writes have); one more part is filled meanwhile. */
export const PARTS_IN_FLIGHT = 2;
/** Part buffers together at most about this much: past it (parts over ~13 MiB, images over ~130 GiB) one part is in flight. */
const PART_MEMORY = 40 * 2 ** 20;

/** How many parts go up at once for parts of `partBytes`. */
export function partsInFlightFor(partBytes: number, wanted = PARTS_IN_FLIGHT): number {
  return Math.max(1, Math.min(wanted, Math.floor(PART_MEMORY / partBytes) - 1));
}

/** An output writer of this store (the part statistics are for the tests and the logs). */
export interface S3OutputWriter extends OutputWriter {
  readonly parts: PartWriterStats & { partBytes: number; partsInFlight: number };
}

export class S3OutputStore extends ObjectStoreBase<S3Objects> implements OutputStore {
  readonly kind = 's3';
  constructor(
    private readonly client: S3Client,
    settings: S3Settings,
    private readonly tuning: { partsInFlight?: number; partBytes?: number } = {},
  ) {
    super(new S3Objects(client, settings, 'output'));
  }

  async create(key: string, size: number): Promise<S3OutputWriter> {
    const partBytes = partSizeFor(size, this.tuning.partBytes);
    const partsInFlight = partsInFlightFor(partBytes, this.tuning.partsInFlight);
    const parts = new PartWriter(this.client, this.objects.settings.bucket, this.objects.objectKey(key), `output ${key}`, {
      partBytes,
      partsInFlight,
      requestTimeoutMs: this.objects.settings.requestTimeoutMs,
    });
    let finished = false;
    return {
      get parts() {
        return { ...parts.stats, partBytes, partsInFlight };
      },
      write: async (extent: Extent) => {
        if (extent.offset !== parts.written) throw new StoreError(`output ${key}: extent at ${extent.offset}, expected ${parts.written} (guest order)`);
        if (extent.offset + extent.length > size) throw new StoreError(`output ${key}: extent past the declared size ${size}`);
        // A data extent's buffer is the reader's, recycled once we return: its bytes are copied into the part.
        if (extent.kind === 'data') await parts.write(extent.data);
        else await parts.zeros(extent.length);
      },
      finish: async (virtualSize: number) => {
        if (virtualSize !== size) throw new StoreError(`output ${key} was created for ${size} bytes, finished at ${virtualSize}`);
        if (parts.written < size) await parts.zeros(size - parts.written);
        // The last part goes up now, beside whatever the job still waits for (an upload's commit); the object
        // becomes visible only at commit.
        parts.sendTail();
        finished = true;
      },
      abort: () => parts.abort(),
      commit: async (): Promise<StoredOutput> => {
        if (!finished) throw new StoreError(`commit of output ${key} before finish`);
        await parts.complete();
        // RGW answers Complete with an empty ETag: the object's size and date read back.
        const head = await this.objects.head(key);
        if (!head) throw new StoreObjectMissingError(`output ${key} is not in the bucket after its upload completed`);
        if (head.size !== size) {
          await this.objects.delete(key).catch(() => {});
          throw new StoreError(`output ${key} is ${head.size} bytes in the bucket, expected ${size}`);
        }
        return { key, size: head.size, modifiedAt: head.modifiedAt, location: this.objects.location(key) };
      },
    };
  }

  override async stat(key: string): Promise<StoredOutput | undefined> {
    const st = await super.stat(key);
    return st && { ...st, location: this.objects.location(key) };
  }
  read(key: string, range?: ByteRange): Promise<Readable> {
    return this.objects.read(key, range);
  }
  presignedUrl(key: string, ttlSeconds: number): Promise<string> {
    const command = new GetObjectCommand({
      Bucket: this.objects.settings.bucket,
      Key: this.objects.objectKey(key),
      ResponseContentDisposition: `attachment; filename="${key}.raw"`,
    });
    return getSignedUrl(this.client, command, { expiresIn: ttlSeconds });
  }
}
