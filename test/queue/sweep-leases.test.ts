/**
 * Sweeps never take a write a live job or upload owns (issue 11). Each kind of
 * sweep runs every second with a one-second orphan TTL while a slow conversion
 * (WORKER_READ_BYTES_PER_SECOND), a slow download or a slow upload spans several
 * sweep intervals, with gaps between writes longer than the TTL, so an mtime
 * alone would call the write dead. A planted dead write of the same kind
 * disappears meanwhile: proof the sweeps ran. Every job still succeeds with
 * qemu-img's bytes.
 */
import { mkdir, readFile, readdir, utimes, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/api/app.js';
import { loadConfig, type Config } from '../../src/config.js';
import { ConversionQueue } from '../../src/queue/queue.js';
import { JobRecords, type JobRecord } from '../../src/queue/records.js';
import { startWorker, type RunningWorker } from '../../src/queue/worker.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { fileHandler, startServer, type TestServer } from '../net/servers.js';
import { makeTempDir, qemuImg, qemuIo, qemuRawSha256 } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';
import { waitFor } from '../helpers/service.js';

const SWEEPS = { ORPHAN_TTL_SECONDS: '1', RETENTION_SWEEP_SECONDS: '1', RESULT_TTL_SECONDS: '3600' };

describe('sweeps spare what live jobs own', () => {
  let redis: TestRedis;
  let client: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  let image: string;
  let imageSha: string;
  const closers: Array<() => Promise<void>> = [];

  interface Rig {
    config: Config;
    stores: Stores;
    records: JobRecords;
    queue: ConversionQueue;
  }

  async function rig(env: Record<string, string>): Promise<Rig> {
    const config = loadConfig({
      DATA_DIR: join(dir, `data-${closers.length}`),
      QUEUE_NAME: uniqueQueueName('sweep'),
      LOG_LEVEL: 'silent',
      JOB_ATTEMPTS: '1',
      ...SWEEPS,
      ...env,
    });
    const stores = await openStores(config);
    const records = new JobRecords(client, config.queueName);
    const queue = new ConversionQueue(redis.url, config);
    const worker: RunningWorker = await startWorker(config, { stores, logger: pino({ level: 'silent' }), redisUrl: redis.url });
    closers.push(async () => {
      await worker.close(1000);
      await queue.close();
    });
    return { config, stores, records, queue };
  }

  /** A dead write of the same kind, last touched long ago: the sweep must take it. */
  async function plant(path: string): Promise<string> {
    await mkdir(join(path, '..'), { recursive: true });
    await writeFile(path, 'left by a dead process');
    const old = new Date(Date.now() - 3600_000);
    await utimes(path, old, old);
    return path;
  }
  const gone = async (path: string): Promise<boolean> => readFile(path).then(() => false, () => true);

  const final = (records: JobRecords, id: string, timeoutMs = 90_000): Promise<JobRecord> =>
    waitFor(
      `job ${id}`,
      async () => {
        const rec = await records.get(id);
        return rec && ['succeeded', 'failed', 'cancelled'].includes(rec.state) ? rec : undefined;
      },
      timeoutMs,
    );

  async function outputSha(stores: Stores, id: string): Promise<string> {
    const { createHash } = await import('node:crypto');
    const hash = createHash('sha256');
    for await (const chunk of await stores.output.read(id)) hash.update(chunk as Buffer);
    return hash.digest('hex');
  }

  async function newJob(r: Rig, id: string, source: JobRecord['source'], { enqueue = true } = {}): Promise<void> {
    const now = Date.now();
    await r.records.create({
      id,
      tenant: 't',
      state: 'queued',
      source_format: 'auto',
      output_format: 'raw',
      created_at: now,
      updated_at: now,
      attempts: 0,
      source,
      progress: { phase: 'queued', bytes_done: 0, bytes_total: null, percent: null },
    });
    if (enqueue) await r.queue.enqueue(id);
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-sweep-'));
    redis = await startRedis();
    client = new Redis(redis.url);
    // 3 MiB of data in a 64 MiB disk: holes, whose runs write nothing for a while.
    image = join(dir, 'disk.qcow2');
    await qemuImg('create', '-f', 'qcow2', image, '64M');
    await qemuIo('-c', 'write -P 0x51 0 1M', '-c', 'write -P 0x52 30M 1M', '-c', 'write -P 0x53 63M 1M', image);
    imageSha = await qemuRawSha256(image, dir);
  });

  afterAll(async () => {
    for (const close of closers) await close();
    client.disconnect();
    await redis.stop();
    await cleanup();
  });

  it('keeps a running job\'s staged input and its uncommitted output across several sweeps', async () => {
    // 400 KiB/s: each read of a cluster run takes over a second with no write meanwhile; the sweep runs every second.
    const r = await rig({ WORKER_READ_BYTES_PER_SECOND: '400K' });
    const root = join(r.config.dataDir, 'store');
    const deadInput = await plant(join(root, 'input', 'deadinput'));
    const deadWrite = await plant(join(root, 'tmp', 'output.deadjob.abcdef012345'));
    const id = 'sweep-conversion-0000001';
    const w = await r.stores.staging.create(id);
    await pipeline(Readable.from([await readFile(image)]), w.stream);
    const staged = await w.commit();
    // Its record (queued) owns it at once, as the API's lease would; older than the orphan TTL before the job
    // even starts. (Without the record, an input older than the TTL is an orphan: a sweep inside this sleep took it.)
    await newJob(r, id, { kind: 'upload', filename: 'disk.qcow2', size: staged.size }, { enqueue: false });
    await sleep(1500);
    await r.queue.enqueue(id);

    await waitFor('the conversion to start', async () => {
      const rec = await r.records.get(id);
      if (rec?.state === 'failed') throw new Error(`the job failed: ${JSON.stringify(rec.error)}`);
      return rec?.progress.phase === 'converting';
    }, 30_000);
    await waitFor('a sweep to take the dead writes', async () => (await gone(deadInput)) && (await gone(deadWrite)), 30_000);
    const during = await r.records.get(id);
    expect(during?.state).toBe('running'); // the sweeps ran while the job did
    expect((await readdir(join(root, 'tmp'))).filter((n) => n.startsWith(`output.${id}.`))).toHaveLength(1);

    const rec = await final(r.records, id);
    expect(rec).toMatchObject({ state: 'succeeded', attempts: 1, output: { sha256: imageSha } });
    expect(await outputSha(r.stores, id)).toBe(imageSha);
    // The committed output of a succeeded job survives later sweeps too.
    await sleep(2500);
    expect(await r.stores.output.stat(id)).toBeDefined();
  });

  it('keeps a URL job\'s download in scratch while it trickles in across several sweeps', async () => {
    const data = await readFile(image);
    // No ranges: the download is staged whole in the worker's scratch space; a chunk every 1.6 s.
    const server: TestServer = await startServer(fileHandler(data, { ranges: false, trickle: { chunk: Math.ceil(data.length / 4), everyMs: 1600 } }));
    closers.push(() => server.close());
    const r = await rig({ URL_IMPORT_ALLOW: '127.0.0.1', URL_IMPORT_PORTS: String(server.port) });
    const deadScratch = await plant(join(r.config.dataDir, 'work', 'deadjob.download'));
    const id = 'sweep-download-000000001';
    await newJob(r, id, { kind: 'url', url: `${server.origin}/disk.qcow2` });
    await waitFor('the download to start', async () => (await r.records.get(id))?.progress.phase === 'downloading', 30_000);
    await waitFor('a sweep to take the dead scratch file', () => gone(deadScratch), 30_000);
    expect((await r.records.get(id))?.state).toBe('running');
    const rec = await final(r.records, id);
    expect(rec).toMatchObject({ state: 'succeeded', attempts: 1, output: { sha256: imageSha } });
    expect(await outputSha(r.stores, id)).toBe(imageSha);
  });

  it('keeps an upload the API is still receiving, with pauses longer than the orphan TTL, across several sweeps', async () => {
    const r = await rig({});
    const app: FastifyInstance = await buildApp(r.config, { records: r.records, queue: r.queue, stores: r.stores, redis: client });
    await app.listen({ host: '127.0.0.1', port: 0 });
    closers.push(() => app.close());
    const address = app.server.address();
    const port = typeof address === 'object' && address ? address.port : 0;
    const root = join(r.config.dataDir, 'store');
    const deadUpload = await plant(join(root, 'tmp', 'input.deadupload.abcdef012345'));

    const data = await readFile(image);
    const parts = 4;
    const size = Math.ceil(data.length / parts);
    const response = new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = request(
        { host: '127.0.0.1', port, method: 'POST', path: '/v1/jobs?filename=disk.qcow2', headers: { 'content-type': 'application/octet-stream', 'content-length': data.length } },
        (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        },
      );
      req.on('error', reject);
      void (async () => {
        for (let i = 0; i < parts; i++) {
          req.write(data.subarray(i * size, (i + 1) * size));
          if (i < parts - 1) await sleep(1800);
        }
        req.end();
      })();
    });
    await waitFor('a sweep to take the dead upload', () => gone(deadUpload), 30_000);
    // The live upload's write is still there, however old its mtime.
    expect((await readdir(join(root, 'tmp'))).filter((n) => n.startsWith('input.'))).toHaveLength(1);
    const res = await response;
    expect(res.status).toBe(202);
    const id = (JSON.parse(res.body) as { id: string }).id;
    const rec = await final(r.records, id);
    expect(rec).toMatchObject({ state: 'succeeded', output: { sha256: imageSha } });
    expect(await outputSha(r.stores, id)).toBe(imageSha);
  });
});
