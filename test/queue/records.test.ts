import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readJobEvents } from '../../src/queue/events.js';
import { JobRecords, tenantOf, type JobRecord } from '../../src/queue/records.js';
import { sweepOnce } from '../../src/queue/retention.js';
import { openStores } from '../../src/store/index.js';
import { makeTempDir } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

function record(id: string, tenant: string, createdAt: number): JobRecord {
  return {
    id,
    tenant,
    state: 'queued',
    source_format: 'auto',
    output_format: 'raw',
    created_at: createdAt,
    updated_at: createdAt,
    attempts: 0,
    source: { kind: 'upload', filename: `${id}.qcow2`, size: 10 },
    progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null },
  };
}

describe('JobRecords (real Redis)', () => {
  let redis: TestRedis;
  let client: Redis;
  let records: JobRecords;

  beforeAll(async () => {
    redis = await startRedis();
    client = new Redis(redis.url);
    records = new JobRecords(client, uniqueQueueName('records'));
  });
  afterAll(async () => {
    client.disconnect();
    await redis.stop();
  });

  it('round-trips a record', async () => {
    await records.create(record('aaaa', 't1', 1000));
    const rec = await records.get('aaaa');
    expect(rec).toMatchObject({ id: 'aaaa', tenant: 't1', state: 'queued', created_at: 1000, attempts: 0, source: { kind: 'upload', size: 10 } });
    expect(rec?.output).toBeUndefined();
    expect(await records.getForTenant('aaaa', 't2')).toBeUndefined();
  });

  it('moves state only from allowed states, and counts jobs by state', async () => {
    await records.create(record('bbbb', 't1', 2000));
    expect((await records.transition('bbbb', 'running', ['queued'])).moved).toBe(true);
    expect(await records.transition('bbbb', 'running', ['queued'])).toEqual({ moved: false, previous: 'running' });
    expect((await records.transition('bbbb', 'cancelled', ['queued', 'running'])).moved).toBe(true);
    // A worker finishing after the cancel loses.
    expect((await records.transition('bbbb', 'succeeded', ['running'], { output: { format: 'raw', size: 1, sha256: 'x', data_bytes: 1 } })).moved).toBe(false);
    const rec = await records.get('bbbb');
    expect(rec?.state).toBe('cancelled');
    expect(rec?.output).toBeUndefined();
    expect(rec?.finished_at).toBeGreaterThan(0);
    const stats = await records.stats();
    expect(Number(stats['state:queued'])).toBe(1); // aaaa
    expect(Number(stats['state:cancelled'])).toBe(1);
    expect(Number(stats['state:running'] ?? 0)).toBe(0);
    expect(await records.transition('nope', 'running', ['queued'])).toEqual({ moved: false, previous: undefined });
  });

  it('ends a failed or cancelled job in a terminal progress phase, keeping where it stopped (issue 11)', async () => {
    const big = 5 * 2 ** 40 + 12345; // more digits than a float printer would keep
    await records.create(record('term-f', 't1', 4000));
    await records.transition('term-f', 'running', ['queued']);
    await records.update('term-f', ['running'], { progress: { phase: 'converting', bytes_done: big - 1, bytes_total: big, percent: 99.99 } });
    expect((await records.transition('term-f', 'failed', ['running'], { error: { code: 'IMAGE_CORRUPT', message: 'cut' } })).moved).toBe(true);
    expect((await records.get('term-f'))?.progress).toEqual({ phase: 'failed', ended_in: 'converting', bytes_done: big - 1, bytes_total: big, percent: 99.99 });
    // The record's last progress event says so too, just before the final state event.
    const events = (await readJobEvents(client, records.keyPrefix, 'term-f', undefined)).map((e) => e.event);
    expect(events.slice(-2)).toEqual([
      { type: 'progress', progress: { phase: 'failed', ended_in: 'converting', bytes_done: big - 1, bytes_total: big, percent: 99.99 } },
      { type: 'state', state: 'failed', previous: 'running' },
    ]);

    await records.create(record('term-c', 't1', 4001));
    expect((await records.transition('term-c', 'cancelled', ['queued', 'running'])).moved).toBe(true);
    expect((await records.get('term-c'))?.progress).toEqual({ phase: 'cancelled', ended_in: 'queued', bytes_done: 0, bytes_total: null, percent: null });
    // A transition that does not move leaves it alone; a succeeded job keeps its own 'done'.
    expect((await records.transition('term-c', 'failed', ['queued', 'running'])).moved).toBe(false);
    expect((await records.get('term-c'))?.progress.phase).toBe('cancelled');
    await records.create(record('term-s', 't1', 4002));
    await records.transition('term-s', 'running', ['queued']);
    await records.transition('term-s', 'succeeded', ['running'], { progress: { phase: 'done', bytes_done: 1, bytes_total: 1, percent: 100 } });
    expect((await records.get('term-s'))?.progress).toEqual({ phase: 'done', bytes_done: 1, bytes_total: 1, percent: 100 });
  });

  it('a record and its events change in one step: no reader sees a cancelled job before its terminal events', async () => {
    // Another process (an API serving GET /events) reads the record and the stream while jobs end.
    // Before this was one script, the events followed the record by a round trip, and an event stream
    // that found the cancelled record first ended without the terminal progress event.
    const reader = new Redis(redis.url);
    const ids = Array.from({ length: 150 }, (_, i) => `atomic-${i}`);
    for (const [i, id] of ids.entries()) await records.create(record(id, 't1', 5000 + i));
    let stop = false;
    let checks = 0;
    let current = ids[0] as string; // the job being ended, watched closely
    const ahead = new Set<string>();
    const watch = (async () => {
      while (!stop) {
        {
          const id = current;
          const [[, state], [, last]] = (await reader.multi().hget(records.key(id), 'state').xrevrange(`${records.keyPrefix}events:${id}`, '+', '-', 'COUNT', 2).exec()) as [
            [null, string | null],
            [null, Array<[string, string[]]>],
          ];
          checks++;
          if (state !== 'cancelled') continue;
          const events = last.map(([, f]) => JSON.parse(f[1] as string) as { type: string; state?: string; progress?: { phase: string } });
          const [newest, before] = events;
          if (newest?.state !== 'cancelled' || before?.progress?.phase !== 'cancelled') ahead.add(id);
        }
      }
    })();
    try {
      for (const id of ids) {
        current = id;
        await records.transition(id, 'running', ['queued']);
        await records.transition(id, 'cancelled', ['queued', 'running']);
      }
    } finally {
      stop = true;
      await watch;
      reader.disconnect();
    }
    expect(checks).toBeGreaterThan(ids.length);
    expect([...ahead]).toEqual([]);
  });

  it('updates fields only while in the given states, and deletes fields set to undefined', async () => {
    await records.create(record('cccc', 't1', 3000));
    expect(await records.update('cccc', ['running'], { attempts: 5 })).toBe(false);
    await records.transition('cccc', 'running', ['queued'], { last_error: { code: 'X', message: 'y' } });
    expect((await records.get('cccc'))?.last_error).toEqual({ code: 'X', message: 'y' });
    expect(await records.update('cccc', ['running'], { last_error: undefined, attempts: 2 })).toBe(true);
    const rec = await records.get('cccc');
    expect(rec?.last_error).toBeUndefined();
    expect(rec?.attempts).toBe(2);
  });

  it('lists a tenant’s jobs newest first, pages with a cursor, filters by state', async () => {
    const list = new JobRecords(client, uniqueQueueName('list'));
    for (let i = 0; i < 25; i++) await list.create(record(`job${String(i).padStart(3, '0')}`, 'tA', 10_000 + Math.floor(i / 2))); // equal scores in pairs
    await list.create(record('other', 'tB', 20_000));
    for (let i = 0; i < 25; i += 5) await list.transition(`job${String(i).padStart(3, '0')}`, 'failed', ['queued']);

    const seen: string[] = [];
    let cursor: string | undefined;
    for (let page = 0; page < 10; page++) {
      const res = await list.list('tA', { limit: 7, ...(cursor ? { cursor } : {}) });
      seen.push(...res.jobs.map((j) => j.id));
      if (!res.nextCursor) break;
      cursor = res.nextCursor;
    }
    expect(seen).toHaveLength(25);
    expect(new Set(seen).size).toBe(25);
    expect(seen).not.toContain('other');
    const created = await Promise.all(seen.map(async (id) => (await list.get(id))?.created_at ?? 0));
    expect([...created].sort((a, b) => b - a)).toEqual(created);

    const failed = await list.list('tA', { limit: 100, state: 'failed' });
    expect(failed.jobs.map((j) => j.id).sort()).toEqual(['job000', 'job005', 'job010', 'job015', 'job020']);
    expect(failed.nextCursor).toBeNull();
    await expect(list.list('tA', { limit: 5, cursor: 'garbage!' })).rejects.toMatchObject({ code: 'INVALID_CURSOR' });
  });

  it('names tenants by a hash of their token', () => {
    expect(tenantOf(undefined)).toBe('anonymous');
    const t = tenantOf('secret-token-123456');
    expect(t).toMatch(/^[0-9a-f]{32}$/);
    expect(t).not.toContain('secret');
  });

  it('retention removes expired finished jobs with their files, and orphans', async () => {
    const { dir, cleanup } = await makeTempDir('diskconv-retention-');
    try {
      const stores = await openStores({ dataDir: dir, store: { kind: 'file', root: undefined } });
      const r = new JobRecords(client, uniqueQueueName('retention'));
      const put = async (kind: 'input' | 'output', key: string): Promise<void> => {
        if (kind === 'input') {
          const w = await stores.staging.create(key);
          await pipeline(Readable.from([Buffer.from('data')]), w.stream);
          await w.commit();
        } else {
          const w = await stores.output.create(key, 4);
          await w.write({ kind: 'data', offset: 0, length: 4, data: Buffer.from('data') });
          await w.finish(4);
          await w.commit();
        }
      };
      await r.create(record('done', 't', 1));
      await r.transition('done', 'succeeded', ['queued'], { output: { format: 'raw', size: 4, sha256: 'x', data_bytes: 4 } });
      await put('output', 'done');
      await r.create(record('live', 't', 2));
      await put('input', 'live');
      await put('input', 'orphan');
      await put('output', 'orphan2');

      // Nothing is old enough yet.
      let report = await sweepOnce({ config: { retention: { resultTtlSeconds: 3600, orphanTtlSeconds: 3600, sweepSeconds: 60 } }, records: r, stores });
      expect(report).toEqual({ expiredJobs: 0, orphanObjects: 0, uncommitted: 0, scratch: 0, requeued: 0, lost: 0, destinationLeftovers: 0 });

      report = await sweepOnce({
        config: { retention: { resultTtlSeconds: 1, orphanTtlSeconds: 1, sweepSeconds: 60 } },
        records: r,
        stores,
        now: Date.now() + 10_000,
      });
      expect(report.expiredJobs).toBe(1);
      expect(report.orphanObjects).toBe(2);
      expect(await r.get('done')).toBeUndefined();
      expect(await stores.output.stat('done')).toBeUndefined();
      expect(await stores.staging.stat('orphan')).toBeUndefined();
      expect(await stores.output.stat('orphan2')).toBeUndefined();
      // A queued job keeps its input.
      expect(await stores.staging.stat('live')).toBeDefined();
      expect(Number((await r.stats())['state:succeeded'])).toBe(0);
    } finally {
      await cleanup();
    }
  });
});
