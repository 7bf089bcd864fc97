/**
 * The output store in a bucket: the raw image goes up as a multipart upload in
 * guest order while it is converted (bounded memory: part size × parts in
 * flight), visible only once complete. Zero extents travel as zeros: an S3
 * object has no holes.
 */
import { once } from 'node:events';
import type { Readable } from 'node:stream';
import type { S3Client } from '@aws-sdk/client-s3';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import type { Extent } from '../../engine/index.js';
import { StoreError, type ByteRange } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { OutputStore, OutputWriter, StoredOutput } from '../output.js';
import type { S3Settings } from './client.js';
import { S3Objects } from './objects.js';

const ZEROS = Buffer.alloc(1 << 20);

export class S3OutputStore extends ObjectStoreBase<S3Objects> implements OutputStore {
  readonly kind = 's3';
  constructor(
    private readonly client: S3Client,
    settings: S3Settings,
  ) {
    super(new S3Objects(client, settings, 'output'));
  }

  async create(key: string, size: number): Promise<OutputWriter> {
    const write = this.objects.write(key, { size, queueSize: 4 });
    const { stream } = write;
    let written = 0;
    let finished = false;
    const push = async (chunk: Buffer): Promise<void> => {
      written += chunk.length;
      if (!stream.write(chunk)) await Promise.race([once(stream, 'drain'), write.failed]);
    };
    return {
      write: async (extent: Extent) => {
        if (extent.offset !== written) throw new StoreError(`output ${key}: extent at ${extent.offset}, expected ${written} (guest order)`);
        if (extent.offset + extent.length > size) throw new StoreError(`output ${key}: extent past the declared size ${size}`);
        if (extent.kind === 'data') {
          // The reader recycles the extent's buffer once we return: the stream keeps a copy.
          await push(Buffer.from(extent.data));
          return;
        }
        for (let left = extent.length; left > 0; left -= ZEROS.length) await push(left >= ZEROS.length ? ZEROS : ZEROS.subarray(0, left));
      },
      finish: async (virtualSize: number) => {
        if (virtualSize !== size) throw new StoreError(`output ${key} was created for ${size} bytes, finished at ${virtualSize}`);
        if (written < size) await this.zeroFill(push, size - written);
        // The stream ends at commit: until then the last part stays with us, so the upload cannot complete early.
        finished = true;
      },
      abort: () => write.abort(),
      commit: async (): Promise<StoredOutput> => {
        if (!finished) throw new StoreError(`commit of output ${key} before finish`);
        stream.end();
        const head = await write.done();
        if (head.size !== size) {
          await this.objects.delete(key).catch(() => {});
          throw new StoreError(`output ${key} is ${head.size} bytes in the bucket, expected ${size}`);
        }
        return { key, size: head.size, modifiedAt: head.modifiedAt, location: this.objects.location(key) };
      },
    };
  }

  private async zeroFill(push: (b: Buffer) => Promise<void>, bytes: number): Promise<void> {
    for (let left = bytes; left > 0; left -= ZEROS.length) await push(left >= ZEROS.length ? ZEROS : ZEROS.subarray(0, left));
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
