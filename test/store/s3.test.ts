/** Input staging and the output store in an RGW bucket (the shared test Ceph): the shared contract, plus S3's own. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ListPartsCommand, ListMultipartUploadsCommand, type S3Client } from '@aws-sdk/client-s3';
import { loadConfig } from '../../src/config.js';
import { BufferSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { openStores, type InputStaging, type Stores } from '../../src/store/index.js';
import type { S3Settings } from '../../src/store/s3/client.js';
import type { S3OutputWriter } from '../../src/store/s3/output.js';
import { PartObjects } from '../../src/store/s3/part-objects.js';
import { S3RangeSource } from '../../src/store/s3/source.js';
import type { S3Staging } from '../../src/store/s3/staging.js';
import { cephAvailable, useCeph, type CephEnv } from '../helpers/ceph.js';
import { seededBytes } from '../helpers/qemu.js';
import { waitFor } from '../helpers/service.js';
import { createBucket, objectKeys, removeBucket, s3Env, testS3Client, uniqueBucket, uploadsInProgress } from '../helpers/s3.js';
import { readAll, storeContract } from './contract.js';

describe.skipIf(!cephAvailable)('S3 store (Ceph RGW)', () => {
  let env: CephEnv;
  let client: S3Client;
  let stores: Stores;
  const bucket = uniqueBucket('store');
  const prefix = 'run1/';

  beforeAll(async () => {
    env = await useCeph();
    client = testS3Client(env);
    await createBucket(client, bucket);
    stores = await openStores(loadConfig({ ...s3Env(env, bucket, prefix), DATA_DIR: '/nonexistent-never-used' }));
    // The SDK reads credentials from the environment, as a deployment would.
    process.env.AWS_ACCESS_KEY_ID = env.AWS_ACCESS_KEY_ID;
    process.env.AWS_SECRET_ACCESS_KEY = env.AWS_SECRET_ACCESS_KEY;
  });
  afterAll(async () => {
    await stores?.close();
    if (client) await removeBucket(client, bucket);
  });

  storeContract({
    stores: () => stores,
    uncommitted: () => uploadsInProgress(client, bucket, prefix),
    key: (name) => name,
  });

  it('stages under PREFIX input/ and publishes under PREFIX output/ with an s3:// location', async () => {
    const w = await stores.staging.create('placed');
    w.stream.end(Buffer.from('abc'));
    await new Promise((r) => w.stream.once('finish', r));
    await w.commit();
    const o = await stores.output.create('placed', 512);
    await o.write({ kind: 'zero', offset: 0, length: 512 });
    await o.finish(512);
    const stored = await o.commit();
    expect(stored.location).toBe(`s3://${bucket}/${prefix}output/placed`);
    expect(await objectKeys(client, bucket, prefix)).toEqual(expect.arrayContaining([`${prefix}input/placed`, `${prefix}output/placed`]));
    await stores.staging.delete('placed');
    await stores.output.delete('placed');
  });

  it('writes a multipart output in guest order (zeros included) and reads its size back despite RGW\'s empty ETag', async () => {
    // 20 MiB: three parts of 8 MiB.
    const data = Buffer.concat([seededBytes(3 << 20, 11), Buffer.alloc(14 << 20), seededBytes(3 << 20, 12)]);
    const source = new BufferSource(data, 'mem');
    const image = await openImage(source, { format: 'raw' });
    const writer = await stores.output.create('multi', data.length);
    await convertToRaw(image, source, writer);
    // The parts go up in the background: wait to see the upload.
    await waitFor('the multipart upload to be in progress', async () => (await uploadsInProgress(client, bucket, prefix)).length > 0, 30_000, 200);
    expect(await uploadsInProgress(client, bucket, prefix)).toHaveLength(1);
    expect(await stores.output.stat('multi')).toBeUndefined();
    const stored = await writer.commit();
    expect(stored.size).toBe(data.length);
    expect(await uploadsInProgress(client, bucket, prefix)).toEqual([]);
    expect((await readAll(await stores.output.read('multi'))).equals(data)).toBe(true);
    expect(await readAll(await stores.output.read('multi', { start: (3 << 20) - 2, end: (3 << 20) + 1 }))).toEqual(data.subarray((3 << 20) - 2, (3 << 20) + 2));

    const url = await stores.output.presignedUrl?.('multi', 60);
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\//);
    const res = await fetch(url as string, { headers: { range: 'bytes=0-9' } });
    expect(res.status).toBe(206);
    expect(Buffer.from(await res.arrayBuffer())).toEqual(data.subarray(0, 10));
    await stores.output.delete('multi');
  });

  it('an output holds at most parts-in-flight + 1 part buffers, copies each extent before its buffer is reused, and sends its last part at finish', async () => {
    const MiB = 2 ** 20;
    // 45 MiB: five parts of 8 MiB and a last one of 5 MiB; data, then zeros, then data.
    const size = 45 * MiB;
    const expected = Buffer.concat([seededBytes(20 * MiB, 41), Buffer.alloc(10 * MiB), seededBytes(15 * MiB, 42)]);
    const writer = (await stores.output.create('bounded', size)) as S3OutputWriter;
    // One buffer for every extent, overwritten as soon as write() resolves: what the reader does with its arenas.
    const recycled = Buffer.alloc(MiB);
    for (let at = 0; at < size; at += MiB) {
      if (at >= 20 * MiB && at < 30 * MiB) {
        await writer.write({ kind: 'zero', offset: at, length: MiB });
        continue;
      }
      expected.copy(recycled, 0, at, at + MiB);
      await writer.write({ kind: 'data', offset: at, length: MiB, data: recycled });
      recycled.fill(0xee);
    }
    await writer.finish(size);
    // Every part is in the bucket before the commit; the object is not visible until it.
    const key = `${prefix}output/bounded`;
    const uploadId = await waitFor('the upload in progress', async () => {
      const res = await client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: key }));
      return res.Uploads?.find((u) => u.Key === key)?.UploadId;
    });
    await waitFor('all six parts uploaded before the commit', async () => {
      const res = await client.send(new ListPartsCommand({ Bucket: bucket, Key: key, UploadId: uploadId }));
      return (res.Parts ?? []).length === 6;
    });
    expect(await stores.output.stat('bounded')).toBeUndefined();
    const parts = writer.parts;
    expect(parts).toMatchObject({ partsSent: 6, partBytes: 8 * MiB, partsInFlight: 2 });
    expect(parts.buffers).toBeLessThanOrEqual(parts.partsInFlight + 1);
    expect(parts.maxInFlight).toBeLessThanOrEqual(parts.partsInFlight + 1);
    const stored = await writer.commit();
    expect(stored.size).toBe(size);
    expect((await readAll(await stores.output.read('bounded'))).equals(expected)).toBe(true);
    await stores.output.delete('bounded');
  });

  it('aborts a multipart output midway with nothing left in progress', async () => {
    const writer = await stores.output.create('halfway', 24 << 20);
    await writer.write({ kind: 'data', offset: 0, length: 10 << 20, data: seededBytes(10 << 20, 3) });
    await writer.abort();
    expect(await uploadsInProgress(client, bucket, prefix)).toEqual([]);
    expect(await stores.output.stat('halfway')).toBeUndefined();
  });

  it('reads a staged image with ranged GETs: coalesced small reads, read-ahead, bounded cache', async () => {
    const data = seededBytes(12 << 20, 21);
    const w = await stores.staging.create('ranged');
    w.stream.end(data);
    await new Promise((r) => w.stream.once('finish', r));
    await w.commit();
    const source = (await stores.staging.open('ranged', 'ranged.img')) as S3RangeSource;
    expect(source).toBeInstanceOf(S3RangeSource);
    // Many small reads inside one 256 KiB block: one request.
    const small = await Promise.all([0, 100, 512, 4096, 65536].map((o) => source.read(o, 64)));
    small.forEach((b, i) => expect(Buffer.from(b)).toEqual(data.subarray([0, 100, 512, 4096, 65536][i], ([0, 100, 512, 4096, 65536][i] ?? 0) + 64)));
    expect(source.stats.requests).toBe(1);
    // Sequential large reads: the second is served by the first's read-ahead. (Compared with equals(): a deep
    // toEqual of 2 MiB buffers keeps the event loop busy for many seconds, long enough to time out the read-ahead.)
    expect(Buffer.from(await source.read(1 << 20, 2 << 20)).equals(data.subarray(1 << 20, 3 << 20))).toBe(true);
    expect(Buffer.from(await source.read(3 << 20, 2 << 20)).equals(data.subarray(3 << 20, 5 << 20))).toBe(true);
    expect(source.stats.readAheadHits).toBe(1);
    expect(Buffer.from(await source.read((12 << 20) - 10, 100))).toEqual(data.subarray(-10));
    await source.close();
    await stores.staging.delete('ranged');
  });

  describe('followed writes (S3_STAGING_OVERLAP): each part also an object of its own', () => {
    let followed: Stores;
    beforeAll(async () => {
      followed = await openStores(loadConfig({ ...s3Env(env, bucket, prefix), S3_STAGING_OVERLAP: 'true', DATA_DIR: '/nonexistent-never-used' }));
    });
    afterAll(async () => {
      await followed?.close();
    });
    const MiB = 2 ** 20;
    const write = async (w: { stream: NodeJS.WritableStream }, data: Buffer, upTo = data.length): Promise<void> => {
      for (let at = 0; at < upTo; at += MiB) {
        if (!w.stream.write(data.subarray(at, Math.min(upTo, at + MiB)))) await new Promise((r) => w.stream.once('drain', r));
      }
    };

    /** Bytes [start, end) of a part, read into a buffer of their size (as the worker's part-object reader does). */
    const partBytes = async (readPart: NonNullable<InputStaging['readPart']>, key: string, part: number, start: number, end: number): Promise<Buffer> => {
      const target = Buffer.alloc(end - start);
      await readPart.call(followed.staging, key, part, start, target);
      return target;
    };

    it('is off unless switched on; readable part by part as announced, committed by copies, the parts gone after', async () => {
      expect(stores.staging.createFollowed).toBeUndefined();
      const create = followed.staging.createFollowed;
      const readPart = followed.staging.readPart;
      if (!create || !readPart) throw new Error('S3_STAGING_OVERLAP=true offers no followed writes');
      const data = seededBytes(20 * MiB + 123, 31);
      const announced: number[] = [];
      const w = await create('followed', data.length, async (n) => {
        announced.push(n);
      });
      expect(w.partBytes).toBe(8 * MiB);
      await write(w, data, 17 * MiB);
      await waitFor('two parts announced', async () => announced.at(-1) === 2);
      // Readable before the commit, by ranges of a part's own object; the staged object is not there yet.
      expect((await partBytes(readPart, 'followed', 1, 100, 4100)).equals(data.subarray(8 * MiB + 100, 8 * MiB + 4100))).toBe(true);
      expect(await followed.staging.stat('followed')).toBeUndefined();
      w.stream.end(data.subarray(17 * MiB));
      await new Promise((r) => w.stream.once('finish', r));
      // In order, each once (two parts PUT at once may finish together: one announcement for both).
      expect(announced.at(-1)).toBe(3);
      expect(announced.every((n, i) => i === 0 || n > (announced[i - 1] as number))).toBe(true);
      expect((await partBytes(readPart, 'followed', 2, 0, data.length - 16 * MiB)).equals(data.subarray(16 * MiB))).toBe(true);
      const stat = await w.commit();
      expect(stat.size).toBe(data.length);
      expect((await readAll(await (followed.staging as S3Staging).read('followed'))).equals(data)).toBe(true);
      expect(await objectKeys(client, bucket, `${prefix}input/followed.parts/`)).toHaveLength(3);
      await w.removeFollowCopies();
      expect(await objectKeys(client, bucket, `${prefix}input/followed.parts/`)).toEqual([]);
      await expect(partBytes(readPart, 'followed', 0, 0, 10)).rejects.toMatchObject({ code: 'STORE_OBJECT_MISSING' });
      await followed.staging.delete('followed');
      expect(await objectKeys(client, bucket, `${prefix}input/followed`)).toEqual([]);
    });

    it('copies each part into the upload as it arrives, before the last byte; the last part goes up from its buffer beside its object', async () => {
      const settings: S3Settings = { bucket, prefix, endpoint: env.S3_ENDPOINT, region: env.S3_REGION, forcePathStyle: true, requestTimeoutMs: 60_000 };
      // The real client and bucket; a middleware notes each request it sends (command, part number).
      const watched = testS3Client(env);
      const sent: string[] = [];
      watched.middlewareStack.add(
        (next, context) => async (args) => {
          const part = (args.input as { PartNumber?: number }).PartNumber;
          sent.push(`${context.commandName}${part === undefined ? '' : ` ${part}`}`);
          return next(args);
        },
        { step: 'initialize' },
      );
      const parts = new PartObjects(watched, settings);
      for (const [name, size] of [
        ['early', 20 * MiB + 123],
        ['boundary', 16 * MiB], // the body ends on a part's end: that full part is the last
      ] as const) {
        sent.length = 0;
        const data = seededBytes(size, 33);
        const w = await parts.create(name, data.length, async () => {});
        const lastPart = Math.ceil(size / (8 * MiB));
        await write(w, data, size - MiB);
        // The parts before the last are copied while the body's last MiB is still with the client.
        await waitFor('the copies of the earlier parts', async () => Array.from({ length: lastPart - 1 }, (_, i) => sent.includes(`UploadPartCopyCommand ${i + 1}`)).every(Boolean));
        const copies = Array.from({ length: lastPart - 1 }, (_, i) => `UploadPartCopyCommand ${i + 1}`);
        expect(sent.filter((c) => c.startsWith('UploadPart')).sort()).toEqual(copies);
        w.stream.end(data.subarray(size - MiB));
        await new Promise((r) => w.stream.once('finish', r));
        expect(sent.filter((c) => c.startsWith('UploadPart')).sort()).toEqual([`UploadPartCommand ${lastPart}`, ...copies]);
        expect(sent.filter((c) => c === 'PutObjectCommand')).toHaveLength(lastPart);
        // The last part is readable by its object too (a worker follows it before the commit).
        expect((await partBytes((key, part, start, target) => parts.readInto(key, part, start, target), name, lastPart - 1, 0, 10)).equals(data.subarray((lastPart - 1) * 8 * MiB, (lastPart - 1) * 8 * MiB + 10))).toBe(true);
        expect((await w.commit()).size).toBe(size);
        expect((await readAll(await (followed.staging as S3Staging).read(name))).equals(data)).toBe(true);
        await w.removeFollowCopies();
        expect(await objectKeys(client, bucket, `${prefix}input/${name}.parts/`)).toEqual([]);
        await followed.staging.delete(name);
      }
    });

    it('an abort midway leaves no part object and no upload in progress', async () => {
      const data = seededBytes(18 * MiB, 32);
      const w = await followed.staging.createFollowed!('dropped', data.length, async () => {});
      await write(w, data, 17 * MiB);
      await waitFor('two part objects', async () => (await objectKeys(client, bucket, `${prefix}input/dropped.parts/`)).length === 2);
      await w.abort();
      expect(await objectKeys(client, bucket, `${prefix}input/dropped`)).toEqual([]);
      expect((await uploadsInProgress(client, bucket, prefix)).filter((k) => k.includes('dropped'))).toEqual([]);
    });

    it('the sweep removes part objects a dead API left, never a live owner\'s, never a name it does not make', async () => {
      const put = async (key: string): Promise<void> => {
        const { PutObjectCommand } = await import('@aws-sdk/client-s3');
        await client.send(new PutObjectCommand({ Bucket: bucket, Key: `${prefix}${key}`, Body: 'x' }));
      };
      await put('input/dead.parts/0');
      await put('input/dead.parts/1');
      await put('input/live.parts/0');
      await put('input/dead.parts/notes.txt');
      await put('input/dead.partsX/0');
      const removed = await followed.staging.sweepUncommitted(Date.now() + 60_000, async (key) => key === 'live');
      expect(removed).toBeGreaterThanOrEqual(2); // and any upload in progress another test left
      expect((await objectKeys(client, bucket, `${prefix}input/`)).filter((k) => /input\/(dead|live)/.test(k)).sort()).toEqual(
        [`${prefix}input/dead.parts/notes.txt`, `${prefix}input/dead.partsX/0`, `${prefix}input/live.parts/0`].sort(),
      );
      for (const k of ['input/dead.parts/notes.txt', 'input/dead.partsX/0', 'input/live.parts/0']) {
        const { DeleteObjectCommand } = await import('@aws-sdk/client-s3');
        await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: `${prefix}${k}` }));
      }
    });
  });

  it('says in readiness when the bucket does not exist', async () => {
    const missing = await openStores(loadConfig({ ...s3Env(env, uniqueBucket('missing')), DATA_DIR: '/nonexistent-never-used' }));
    await expect(missing.output.ping()).rejects.toThrow(/bucket '.*' does not exist/);
    await missing.close();
  });
});
