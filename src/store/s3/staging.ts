/**
 * Input staging in a bucket: the API streams an upload straight into a
 * (multipart) upload, so the API host needs no large disk and any worker on
 * any host reads it back with ranged GETs. With S3_STAGING_OVERLAP a write can
 * also be followed while it arrives (createFollowed, readPart: part-objects.ts).
 */
import { once } from 'node:events';
import { Writable, type Readable } from 'node:stream';
import type { S3Client } from '@aws-sdk/client-s3';
import type { RandomAccessSource } from '../../engine/index.js';
import { StoreError, StoreObjectMissingError, type OwnerCheck } from '../common.js';
import { ObjectStoreBase } from '../objects.js';
import type { FollowedWrite, InputStaging, StagedWrite } from '../staging.js';
import type { S3Settings } from './client.js';
import { S3Objects } from './objects.js';
import { PartObjects } from './part-objects.js';
import { S3RangeSource } from './source.js';

export class S3Staging extends ObjectStoreBase<S3Objects> implements InputStaging {
  readonly kind = 's3';
  private readonly parts: PartObjects;
  /** Only with S3_STAGING_OVERLAP (it doubles the bucket's write load of an upload); readPart always, for any host's writes. */
  readonly createFollowed?: (key: string, size: number, announce: (readyParts: number) => Promise<void>) => Promise<FollowedWrite>;
  constructor(
    private readonly client: S3Client,
    private readonly settings: S3Settings,
    options: { overlap?: boolean } = {},
  ) {
    super(new S3Objects(client, settings, 'input'));
    this.parts = new PartObjects(client, settings);
    if (options.overlap) this.createFollowed = (key, size, announce) => this.parts.create(key, size, announce);
  }

  readPart(key: string, part: number, start: number, target: Uint8Array, signal?: AbortSignal): Promise<void> {
    return this.parts.readInto(key, part, start, target, signal);
  }

  readRange(key: string, start: number, target: Uint8Array, signal?: AbortSignal): Promise<void> {
    return this.objects.readInto(key, start, target, signal);
  }

  /** The object, its uploads in progress, and the part objects of a followed write. */
  override async delete(key: string): Promise<void> {
    await super.delete(key);
    await this.parts.deleteAll(key);
  }

  /** Uploads in progress and part objects a dead API left. */
  override async sweepUncommitted(olderThan: number, owned: OwnerCheck): Promise<number> {
    return (await super.sweepUncommitted(olderThan, owned)) + (await this.parts.sweep(olderThan, owned));
  }

  async create(key: string): Promise<StagedWrite> {
    // Parts of 8 MiB, two in flight: an upload holds at most ~24 MiB of the API's memory.
    const write = this.objects.write(key, { queueSize: 2 });
    // The writer's stream ends before commit; the upload's body only at commit. Ending the body would let
    // lib-storage send an input smaller than a part as one PutObject at once, visible before its commit.
    const body = write.stream;
    const stream = new Writable({
      highWaterMark: 1 << 20,
      write(chunk: Buffer, _encoding, done) {
        if (body.write(chunk)) return done();
        Promise.race([once(body, 'drain'), write.failed]).then(() => done(), done);
      },
      final(done) {
        done();
      },
    });
    return {
      stream,
      commit: async () => {
        if (!stream.writableFinished) throw new StoreError(`commit of input ${key} before the stream finished`);
        body.end();
        const head = await write.done();
        return { key, size: head.size, modifiedAt: head.modifiedAt };
      },
      abort: () => write.abort(),
    };
  }

  /** The bucket and the object key of `key`, for a writer of its own (tus uploads straight into staging, src/api/tus-s3-store.ts). */
  access(): { client: S3Client; settings: S3Settings; objectKey: (key: string) => string } {
    return { client: this.client, settings: this.settings, objectKey: (key) => this.objects.objectKey(key) };
  }

  /** The committed object as one stream. */
  read(key: string): Promise<Readable> {
    return this.objects.read(key);
  }

  async open(key: string, name = `input ${key}`): Promise<RandomAccessSource> {
    const head = await this.objects.head(key);
    if (!head) throw new StoreObjectMissingError(`input ${key} is not in the store`);
    return new S3RangeSource(this.client, this.settings.bucket, this.objects.objectKey(key), head.size, head.etag || undefined, name, this.settings.requestTimeoutMs);
  }
}
