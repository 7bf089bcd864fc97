/**
 * UploadMarks (src/queue/upload-stream.ts), on a real redis-server: progress of an upload still arriving
 * (`advance`) replaces a `receiving` mark only, so a late announcement never undoes a `failed` one.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UploadMarks } from '../../src/queue/upload-stream.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

describe('UploadMarks', () => {
  let redis: TestRedis;
  let client: Redis;
  let marks: UploadMarks;
  const queue = uniqueQueueName('marks');
  beforeAll(async () => {
    redis = await startRedis();
    client = new Redis(redis.url);
    marks = new UploadMarks(client, queue);
  });
  afterAll(async () => {
    client.disconnect();
    await redis.stop();
  });

  const receiving = (ready: number) => ({ state: 'receiving' as const, token: 't', size: 100, parts: { bytes: 10, ready } });

  it('advance moves a receiving mark on, and leaves failed, received, committed and missing marks as they are', async () => {
    await marks.set('a', receiving(1));
    expect(await marks.advance('a', receiving(3))).toBe(true);
    expect(await marks.get('a')).toEqual(receiving(3));

    const failed = { state: 'failed' as const, code: 'INCOMPLETE_BODY', message: 'the client went away' };
    await marks.set('a', failed);
    expect(await marks.advance('a', receiving(4))).toBe(false);
    expect(await marks.get('a')).toEqual(failed);

    const received = { state: 'received' as const, token: 't', size: 100, sha256: 'ab', parts: { bytes: 10, ready: 10 } };
    await marks.set('b', received);
    expect(await marks.advance('b', receiving(9))).toBe(false);
    expect(await marks.get('b')).toEqual(received);
    await marks.set('c', { state: 'committed', size: 100, sha256: 'ab' });
    expect(await marks.advance('c', receiving(9))).toBe(false);

    expect(await marks.advance('never-set', receiving(1))).toBe(false);
    expect(await marks.get('never-set')).toBeUndefined();
    // Kept as long as a mark written by set().
    await marks.set('d', receiving(0));
    await marks.advance('d', receiving(2));
    expect(await client.ttl(`diskconv:${queue}:upstream:d`)).toBeGreaterThan(6 * 86400);
  });
});
