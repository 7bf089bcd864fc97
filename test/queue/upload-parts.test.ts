/**
 * PartObjectsSource (src/queue/upload-parts.ts), the worker's reader of an upload staged part by part in a
 * bucket, on a real redis-server for the upload's mark. The parts are held by a staging of our own in memory
 * whose reads land in two halves, the second after a random delay (as a GET's body arrives chunk by chunk), so a
 * block's memory handed to another fetch while one was still writing it, or while a read was copying out of it,
 * shows as wrong bytes.
 */
import { randomInt } from 'node:crypto';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PartObjectsSource } from '../../src/queue/upload-parts.js';
import { UploadMarks } from '../../src/queue/upload-stream.js';
import { StoreObjectMissingError } from '../../src/store/index.js';
import { seededBytes } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

const MiB = 2 ** 20;

describe('PartObjectsSource', () => {
  let redis: TestRedis;
  let client: Redis;
  let marks: UploadMarks;
  beforeAll(async () => {
    redis = await startRedis();
    client = new Redis(redis.url);
    marks = new UploadMarks(client, uniqueQueueName('parts'));
  });
  afterAll(async () => {
    client.disconnect();
    await redis.stop();
  });

  it('reads right under many reads at once, before and after the commit, in the same few blocks of memory however many blocks it fetches', async () => {
    const partBytes = 8 * MiB;
    const data = seededBytes(64 * MiB + 12345, 41);
    const parts = Math.ceil(data.length / partBytes);
    await marks.set('up', { state: 'receiving', token: 't', size: data.length, parts: { bytes: partBytes, ready: parts } });
    const memories = new Set<ArrayBufferLike>();
    let fetches = 0;
    let committed = false;
    let ranges = 0;
    const land = async (from: number, target: Uint8Array): Promise<void> => {
      fetches++;
      memories.add(target.buffer);
      const half = target.length >> 1;
      target.set(data.subarray(from, from + half));
      await new Promise((r) => setTimeout(r, randomInt(0, 8)));
      target.set(data.subarray(from + half, from + target.length), half);
    };
    const staging = {
      async readPart(key: string, part: number, start: number, target: Uint8Array): Promise<void> {
        // Once committed, the part objects are gone (as the API removes them).
        if (committed) throw new StoreObjectMissingError(`part ${part} of ${key} is not in the bucket`);
        await land(part * partBytes + start, target);
      },
      readRange: async (_key: string, start: number, target: Uint8Array) => {
        ranges++;
        await land(start, target);
      },
    };
    const source = new PartObjectsSource(staging, data.length, partBytes, parts, 'up', { marks, leases: { held: async () => true }, id: 'up' });
    // Random reads, eight at a time, across the whole upload: blocks are fetched, let go and fetched again.
    const reader = async (): Promise<void> => {
      for (let i = 0; i < 40; i++) {
        const offset = randomInt(0, data.length - 1);
        const length = Math.min(data.length - offset, randomInt(1, 6 * MiB));
        const got = await source.read(offset, length);
        expect(Buffer.from(got.buffer, got.byteOffset, got.length).equals(data.subarray(offset, offset + length))).toBe(true);
      }
    };
    await Promise.all(Array.from({ length: 8 }, reader));
    // Committed halfway through the next readers' reads: the rest come from the staged object.
    const later = Promise.all(Array.from({ length: 8 }, reader));
    await marks.set('up', { state: 'committed', size: data.length, sha256: 'ab' });
    committed = true;
    await later;
    await source.close();
    expect(ranges).toBeGreaterThan(0);
    // At most the four kept, one for each reader (the block it waits for or copies from) and the fetches ahead
    // (begun two at a time while fewer than four are under way): never one per fetch.
    const bound = 4 + 8 + (3 + 2);
    expect(fetches).toBeGreaterThan(2 * bound);
    expect(memories.size).toBeLessThanOrEqual(bound);
  });
});
