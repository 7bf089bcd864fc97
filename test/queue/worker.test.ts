/**
 * The worker in-process against a real Redis, BullMQ and a local store: limits
 * checked before any output is written, free space, retries of transient
 * errors, jobs deleted before a worker got to them, and retention.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig, type Config } from '../../src/config.js';
import { ConversionQueue } from '../../src/queue/queue.js';
import { JobRecords, type JobRecord } from '../../src/queue/records.js';
import { sweepOnce } from '../../src/queue/retention.js';
import { startWorker, type RunningWorker } from '../../src/queue/worker.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256 } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';
import { waitFor } from '../helpers/service.js';

describe('worker (in-process, real Redis and BullMQ)', () => {
  let redis: TestRedis;
  let client: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  const running: Array<{ worker: RunningWorker; queue: ConversionQueue }> = [];

  interface Rig {
    config: Config;
    records: JobRecords;
    stores: Stores;
    queue: ConversionQueue;
    submit(path: string, sourceFormat?: JobRecord['source_format'], enqueue?: boolean): Promise<string>;
    final(id: string): Promise<JobRecord>;
  }

  async function rig(env: Record<string, string>, wrapStores: (s: Stores) => Stores = (s) => s): Promise<Rig> {
    const config = loadConfig({
      DATA_DIR: join(dir, `data-${running.length}`),
      QUEUE_NAME: uniqueQueueName('worker'),
      JOB_BACKOFF_MS: '100',
      LOG_LEVEL: 'silent',
      ...env,
    });
    const stores = wrapStores(await openStores(config));
    const records = new JobRecords(client, config.queueName);
    const queue = new ConversionQueue(redis.url, config);
    const worker = await startWorker(config, { stores, logger: pino({ level: 'silent' }), redisUrl: redis.url });
    running.push({ worker, queue });
    let n = 0;
    return {
      config,
      records,
      stores,
      queue,
      async submit(path, sourceFormat = 'auto', enqueue = true) {
        const id = `job${String(++n).padStart(19, '0')}`;
        const w = await stores.staging.create(id);
        await pipeline(Readable.from([await readFile(path)]), w.stream);
        const stored = await w.commit();
        const now = Date.now();
        await records.create({
          id,
          tenant: 't',
          state: 'queued',
          source_format: sourceFormat,
          output_format: 'raw',
          created_at: now,
          updated_at: now,
          attempts: 0,
          source: { kind: 'upload', filename: 'disk', size: stored.size },
          progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null },
        });
        if (enqueue) await queue.enqueue(id);
        return id;
      },
      final: (id) =>
        waitFor(`job ${id}`, async () => {
          const rec = await records.get(id);
          return rec && ['succeeded', 'failed', 'cancelled'].includes(rec.state) ? rec : undefined;
        }),
    };
  }

  let big: string;
  let small: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-worker-'));
    redis = await startRedis();
    client = new Redis(redis.url);
    big = join(dir, 'big.qcow2');
    await qemuImg('create', '-f', 'qcow2', big, '64M');
    await qemuIo('-c', 'write -P 0x31 0 8M', big);
    small = join(dir, 'small.qcow2');
    await qemuImg('create', '-f', 'qcow2', small, '4M');
    await qemuIo('-c', 'write -P 0x32 0 1M', small);
  });

  afterAll(async () => {
    for (const r of running) {
      await r.worker.close(1000);
      await r.queue.close();
    }
    client.disconnect();
    await redis.stop();
    await cleanup();
  });

  it('enforces MAX_VIRTUAL_SIZE before any output is written, without retrying', async () => {
    const r = await rig({ MAX_VIRTUAL_SIZE: '32M', JOB_ATTEMPTS: '3' });
    const id = await r.submit(big);
    const rec = await r.final(id);
    expect(rec).toMatchObject({ state: 'failed', attempts: 1, error: { code: 'LIMIT_EXCEEDED' } });
    expect(await r.stores.output.stat(id)).toBeUndefined();
    // The record says failed first (only the attempt that owns the job may clean up); its input goes right after.
    await waitFor('the failed job\'s staged input removed', async () => (await r.stores.staging.stat(id)) === undefined, 10_000);
    expect(await readdir(join(r.config.dataDir, 'store', 'tmp'))).toEqual([]);
  });

  it('refuses early when the store has less free space than the output needs, retrying with backoff', async () => {
    // The local filesystem with 1 MiB left: everything else about the store is real.
    const r = await rig({ JOB_ATTEMPTS: '2' }, (s) => ({ ...s, output: new Proxy(s.output, { get: (t, p) => (p === 'freeBytes' ? async () => 2 ** 20 : Reflect.get(t, p, t)) }) }));
    const id = await r.submit(big);
    const rec = await r.final(id);
    expect(rec).toMatchObject({ state: 'failed', attempts: 2, error: { code: 'INSUFFICIENT_SPACE' } });
    expect(await readdir(join(r.config.dataDir, 'store', 'tmp'))).toEqual([]);
    expect(await r.stores.output.stat(id)).toBeUndefined();
  });

  it('converts, skips jobs deleted before it got to them, and retention removes finished jobs', async () => {
    const r = await rig({ RESULT_TTL_SECONDS: '1', RETENTION_SWEEP_SECONDS: '1' });
    const gone = await r.submit(small);
    const rec = await r.records.get(gone);
    if (rec && rec.state === 'queued') {
      // Removed as a client's DELETE of a finished job would: the worker must just skip it.
      await r.records.remove(rec);
    }
    const id = await r.submit(small);
    const done = await r.final(id);
    expect(done.state).toBe('succeeded');
    expect(done.output?.sha256).toBe(await qemuRawSha256(small, dir));
    expect(done.duration_seconds).toBeGreaterThanOrEqual(0);
    expect(await r.stores.staging.stat(id)).toBeUndefined();
    // Retention: the record and the output go once RESULT_TTL_SECONDS have passed.
    await waitFor('retention', async () => (await r.records.get(id)) === undefined && (await r.stores.output.stat(id)) === undefined, 15_000);
    const stats = await r.records.stats();
    expect(Number(stats.conversions)).toBeGreaterThanOrEqual(1);
  });

  it('puts back a job whose enqueue was lost (an API that died between record and queue)', async () => {
    const r = await rig({});
    const id = await r.submit(small, 'auto', false);
    // Too young to reconcile: the API may be enqueueing it right now.
    const early = await sweepOnce({ config: r.config, records: r.records, stores: r.stores, queue: r.queue });
    expect(early.requeued).toBe(0);
    const later = await sweepOnce({ config: r.config, records: r.records, stores: r.stores, queue: r.queue, now: Date.now() + 120_000 });
    expect(later.requeued).toBe(1);
    expect((await r.final(id)).state).toBe('succeeded');
    // Finished jobs leave the reconciliation index.
    expect(await r.records.unfinishedBefore(Date.now() + 120_000)).not.toContain(id);
  });

  it("never deletes another attempt's temporary output (a live attempt whose lock lapsed still writes it)", async () => {
    const r = await rig({});
    const id = await r.submit(small, 'auto', false);
    // Another attempt of the same job, still writing: its uncommitted output is in the store's tmp.
    const other = await r.stores.output.create(id, 4 * 2 ** 20);
    await other.write({ kind: 'data', offset: 0, length: 4096, data: Buffer.alloc(4096, 0x5a) });
    const tmp = join(r.config.dataDir, 'store', 'tmp');
    const before = (await readdir(tmp)).filter((n) => n.startsWith(`output.${id}.`));
    expect(before).toHaveLength(1);
    await r.queue.enqueue(id);
    expect((await r.final(id)).state).toBe('succeeded');
    // This attempt removed only what it created: the other attempt's file is untouched (stale ones are the sweeper's).
    expect((await readdir(tmp)).filter((n) => n.startsWith(`output.${id}.`))).toEqual(before);
    await other.abort();
  });

  it('a record moved back to queued by another attempt is not a cancel: the staged input stays', async () => {
    const r = await rig({ WORKER_READ_BYTES_PER_SECOND: '2M', PROGRESS_INTERVAL_MS: '100' });
    const id = await r.submit(big);
    await waitFor('the conversion to run', async () => (await r.records.get(id))?.progress.phase === 'converting', 30_000);
    // What a second attempt does when it takes the job and then fails with retries left.
    expect((await r.records.transition(id, 'running', ['running'], { attempt_id: 'other-attempt' })).moved).toBe(true);
    expect((await r.records.transition(id, 'queued', ['running'], { attempt_id: undefined }, { owner: 'other-attempt' })).moved).toBe(true);
    // The first attempt notices at its next progress write and lets go of the job.
    await waitFor('the first attempt to let go', async () => (await r.queue.stateOf(id)) === 'completed', 30_000);
    const rec = await r.records.get(id);
    expect(rec?.state).toBe('queued');
    expect(await r.stores.staging.stat(id)).toBeDefined();
    expect((await readdir(join(r.config.dataDir, 'store', 'tmp'))).filter((n) => n.startsWith(`output.${id}.`))).toEqual([]);
  });

  it.skipIf(process.getuid?.() !== 0)('reserves the space it checked for: two jobs that each fit alone, but not together, never run out of space mid-write and both succeed', async () => {
    // An 80 MiB image (data, not holes) twice, on a 312 MiB filesystem: with both inputs staged,
    // one output fits with the 64 MiB margin (152 MiB free), two do not.
    const raw = join(dir, 'data80.raw');
    const { writeFile } = await import('node:fs/promises');
    const { seededBytes } = await import('../helpers/qemu.js');
    await writeFile(raw, seededBytes(80 * 2 ** 20, 7));
    const image = join(dir, 'data80.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, image);
    const { mkdtemp } = await import('node:fs/promises');
    const { tmpdir } = await import('node:os');
    const { execFileSync } = await import('node:child_process');
    const mnt = await mkdtemp(join(tmpdir(), 'diskconv-space-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=312m', 'tmpfs', mnt]);
    try {
      // Reads throttled so the two conversions overlap; retries spread over ~30 s.
      const r = await rig({ DATA_DIR: mnt, WORKER_CONCURRENCY: '2', WORKER_READ_BYTES_PER_SECOND: '16M', JOB_ATTEMPTS: '6', JOB_BACKOFF_MS: '1000' });
      const a = await r.submit(image, 'auto', false);
      const b = await r.submit(image, 'auto', false);
      await Promise.all([r.queue.enqueue(a), r.queue.enqueue(b)]);
      const final = (id: string): Promise<JobRecord> =>
        waitFor(`job ${id}`, async () => {
          const rec = await r.records.get(id);
          return rec && ['succeeded', 'failed', 'cancelled'].includes(rec.state) ? rec : undefined;
        }, 150_000, 200);
      // Every retry is a refusal before writing (the other job holds the space), never a disk filling up mid-write.
      const seen = new Set<string>();
      let watching = true;
      const watch = (async () => {
        while (watching) {
          for (const id of [a, b]) {
            const e = (await r.records.get(id))?.last_error;
            if (e) seen.add(`${e.code}: ${e.message}`);
          }
          await new Promise((res) => setTimeout(res, 50));
        }
      })();
      const [ra, rb] = await Promise.all([final(a), final(b)]);
      watching = false;
      await watch;
      // Up-front refusals name what the output needs ("the output needs up to ..."); a write that hit a full disk does not.
      expect([...seen].filter((m) => !/^INSUFFICIENT_SPACE: the output needs up to/.test(m))).toEqual([]);
      expect([ra?.state, rb?.state], JSON.stringify([ra?.error, rb?.error])).toEqual(['succeeded', 'succeeded']);
      const ref = await qemuRawSha256(image, dir);
      expect([ra?.output?.sha256, rb?.output?.sha256]).toEqual([ref, ref]);
      const mine = running.pop();
      await mine?.worker.close(1000);
      await mine?.queue.close();
    } finally {
      execFileSync('umount', ['-l', mnt]);
      await import('node:fs/promises').then((fs) => fs.rm(mnt, { recursive: true, force: true }));
    }
  }, 180_000);
});
