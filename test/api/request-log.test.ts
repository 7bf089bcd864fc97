/**
 * Request lines at LOG_LEVEL=info (real Redis, real store): a read that succeeds
 * (a status poll) writes none, a read that fails writes one with its status, a
 * job creation writes both of fastify's lines; at debug the poll's lines are back.
 */
import { join } from 'node:path';
import { Writable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/api/app.js';
import { loadConfig } from '../../src/config.js';
import { REDACT_PATHS } from '../../src/log.js';
import { ConversionQueue } from '../../src/queue/queue.js';
import { JobRecords } from '../../src/queue/records.js';
import { openStores } from '../../src/store/index.js';
import { makeTempDir, qemuImg } from '../helpers/qemu.js';
import { startRedis, uniqueQueueName, type TestRedis } from '../helpers/redis.js';

const TOKEN = 'token-request-log-0123456789';

describe('request log lines', () => {
  let redis: TestRedis;
  let client: Redis;
  let dir: string;
  let cleanup: () => Promise<void>;
  let image: Buffer;
  const made: Array<{ app: FastifyInstance; queue: ConversionQueue }> = [];

  async function start(level: 'info' | 'debug'): Promise<{ app: FastifyInstance; lines: () => Array<Record<string, unknown>> }> {
    const config = loadConfig({ DATA_DIR: join(dir, `data-${made.length}`), QUEUE_NAME: uniqueQueueName('reqlog'), API_TOKENS: TOKEN, LOG_LEVEL: level });
    const stores = await openStores(config);
    const queue = new ConversionQueue(redis.url, config);
    const out: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        out.push(...chunk.toString().split('\n').filter(Boolean));
        done();
      },
    });
    const logger = pino({ level, redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, sink);
    const app = await buildApp(config, { records: new JobRecords(client, config.queueName), queue, stores, redis: client }, { logger });
    await app.ready();
    made.push({ app, queue });
    return { app, lines: () => out.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.msg === 'incoming request' || l.msg === 'request completed') };
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-reqlog-'));
    redis = await startRedis();
    client = new Redis(redis.url);
    await qemuImg('create', '-f', 'qcow2', join(dir, 'small.qcow2'), '1M');
    image = await import('node:fs/promises').then((fs) => fs.readFile(join(dir, 'small.qcow2')));
  });
  afterAll(async () => {
    for (const m of made) {
      await m.app.close();
      await m.queue.close();
    }
    client.disconnect();
    await redis.stop();
    await cleanup();
  });

  const auth = { authorization: `Bearer ${TOKEN}` };

  it('at info: a job creation gets both lines, a successful poll none, a failed poll one with its status', async () => {
    const { app, lines } = await start('info');
    const created = await app.inject({ method: 'POST', url: '/v1/jobs', headers: { ...auth, 'content-type': 'application/octet-stream' }, payload: image });
    expect(created.statusCode).toBe(202);
    expect(lines().map((l) => l.msg)).toEqual(['incoming request', 'request completed']);
    const id = (created.json() as { id: string }).id;

    for (let i = 0; i < 3; i++) expect((await app.inject({ method: 'GET', url: `/v1/jobs/${id}`, headers: auth })).statusCode).toBe(200);
    expect(lines()).toHaveLength(2);

    expect((await app.inject({ method: 'GET', url: '/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA', headers: auth })).statusCode).toBe(404);
    const after = lines();
    expect(after).toHaveLength(3);
    expect(after[2]).toMatchObject({ msg: 'request completed', res: { statusCode: 404 } });
  });

  it("at debug: a successful poll's two lines are written", async () => {
    const { app, lines } = await start('debug');
    expect((await app.inject({ method: 'GET', url: '/v1/jobs', headers: auth })).statusCode).toBe(200);
    expect(lines().map((l) => l.msg)).toEqual(['incoming request', 'request completed']);
    expect(lines()[1]).toMatchObject({ res: { statusCode: 200 } });
  });
});
