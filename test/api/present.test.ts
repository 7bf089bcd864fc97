/**
 * The status poll's answer (GET /v1/jobs/{id}) is built from the stored JSON
 * text of the record's fields (presentJobJson) instead of parsing and
 * serialising them again: it must be the same answer, byte for byte, as
 * presentJob over the decoded record, for every kind of record. Real Redis.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { passStored, presentJob, presentJobJson } from '../../src/api/present.js';
import { JobRecords, type JobRecord } from '../../src/queue/records.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

const base = (id: string, extra: Partial<JobRecord> = {}): JobRecord => ({
  id,
  tenant: 't1',
  state: 'queued',
  source_format: 'auto',
  output_format: 'raw',
  created_at: 1_700_000_000_000,
  updated_at: 1_700_000_000_500,
  attempts: 0,
  source: { kind: 'upload', filename: 'disk "one".qcow2', size: 10, sha256: 'ab'.repeat(32) },
  progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null },
  ...extra,
});

describe('presentJobJson (real Redis)', () => {
  let redis: TestRedis;
  let client: Redis;
  let records: JobRecords;

  beforeAll(async () => {
    redis = await startRedis();
    client = new Redis(redis.url);
    records = new JobRecords(client, uniqueQueueName('present'));
  });
  afterAll(async () => {
    client.disconnect();
    await redis.stop();
  });

  const cases: Array<[string, JobRecord, Partial<Record<keyof JobRecord, unknown>>?]> = [
    ['a queued upload', base('q1')],
    [
      'a running URL import with info and a retry behind it',
      base('r1', {
        state: 'running',
        started_at: 1_700_000_001_000,
        attempts: 2,
        disk: 'disk\u0000"x"',
        expected_sha256: 'cd'.repeat(32),
        source: { kind: 'url', url: 'http://example.org/a.qcow2?sig=1', final_url: 'http://example.org/b.qcow2', size: 4096, mode: 'staged', format: 'qcow2', virtual_size: 2 ** 32, info: { 'virtual-size': 2 ** 32, format: 'qcow2', 'format-specific': { type: 'qcow2', data: { compat: '1.1', 'lazy-refcounts': false } }, filename: 'ü\u2028' } },
        progress: { phase: 'converting', bytes_done: 123456, bytes_total: 2 ** 32, percent: 0.01 },
        last_error: { code: 'SOURCE_UNAVAILABLE', message: 'connection reset' },
      }),
    ],
    [
      'a succeeded job with output, Glance and a callback',
      base('s1', {
        state: 'succeeded',
        finished_at: 1_700_000_009_000,
        duration_seconds: 8.25,
        glance: { name: 'debian', properties: { os_distro: 'debian' } },
        output: { format: 'raw', size: 2 ** 32, sha256: 'ef'.repeat(32), md5: '00'.repeat(16), data_bytes: 1234, glance: { image_id: 'img', status: 'active', method: 'upload' } },
        progress: { phase: 'done', bytes_done: 2 ** 32, bytes_total: 2 ** 32, percent: 100 },
        callback_url: 'https://hooks.example/x',
        callback: { state: 'delivered', attempts: 1, last_status: 200, last_error: null },
      }),
    ],
    [
      'a job written to an RBD destination',
      base('d1', {
        state: 'succeeded',
        destination: { target: 'rbd', pool: 'p', image: 'i' },
        output: { format: 'raw', size: 512, sha256: '12'.repeat(32), data_bytes: 512, target: 'rbd', pool: 'p', image: 'i', snapshot: 'diskconv', location: 'rbd://f/p/i/diskconv' },
      }),
    ],
    ['a failed job', base('f1', { state: 'failed', error: { code: 'IMAGE_CORRUPT', message: 'bad L1 table' }, progress: { phase: 'failed', ended_in: 'probing', bytes_done: 0, bytes_total: null, percent: null } })],
    // Fields written as JSON null (a worker's update may do that): shown as presentJob shows them.
    ['a record with null JSON fields', base('n1'), { last_error: null, error: null, glance: null }],
  ];

  for (const [name, rec, raw] of cases) {
    it(`answers ${name} exactly as presentJob does`, async () => {
      await records.create(rec);
      if (raw) {
        const [key] = await client.keys(`*job:${rec.id}`);
        for (const [k, v] of Object.entries(raw)) await client.hset(key as string, k, JSON.stringify(v));
      }
      const decoded = await records.getForTenant(rec.id, 't1');
      const passed = await records.getForTenantPassing(rec.id, 't1', passStored);
      expect(decoded).toBeDefined();
      expect(passed).toBeDefined();
      const expected = JSON.stringify(presentJob(decoded as JobRecord));
      expect(presentJobJson(passed as JobRecord)).toBe(expected);
      expect(JSON.parse(presentJobJson(passed as JobRecord))).toEqual(JSON.parse(expected));
    });
  }

  it('another tenant, or a missing job, gets nothing', async () => {
    await records.create(base('o1'));
    expect(await records.getForTenantPassing('o1', 't2', passStored)).toBeUndefined();
    expect(await records.getForTenantPassing('missing', 't1', passStored)).toBeUndefined();
  });
});
