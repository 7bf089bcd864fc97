/**
 * `diskconv serve` (API), `diskconv worker` (conversions) and `diskconv up`
 * (both, plus a private redis-server when REDIS_URL is unset). Each runs until
 * SIGTERM or SIGINT, then closes with grace: the API finishes its requests, the
 * worker finishes or hands back its jobs.
 */
import { join } from 'node:path';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { startServer } from '../api/server.js';
import { createLogger } from '../log.js';
import { loadConfig, type Config } from '../config.js';
import { InvalidArgumentError } from '../engine/errors.js';
import { ConversionQueue } from '../queue/queue.js';
import { JobRecords } from '../queue/records.js';
import { startWorker } from '../queue/worker.js';
import { openStores, type Stores } from '../store/index.js';
import { startPrivateRedis, type PrivateRedis } from './redis-server.js';

export type ServiceCommand = 'serve' | 'worker' | 'up';

interface Stoppable {
  name: string;
  stop(): Promise<void>;
}

async function startApi(config: Config, redisUrl: string, stores: Stores, logger: Logger): Promise<{ url: string; stoppable: Stoppable }> {
  const redis = new Redis(redisUrl, { maxRetriesPerRequest: 2 });
  redis.on('error', (err) => logger.warn({ err: err.message }, 'redis connection error'));
  const records = new JobRecords(redis, config.queueName);
  const queue = new ConversionQueue(redisUrl, config);
  queue.queue.on('error', (err) => logger.warn({ err: err.message }, 'queue connection error'));
  const server = await startServer(config, { records, queue, stores, redis }, logger);
  return {
    url: server.url,
    stoppable: {
      name: 'api',
      stop: async () => {
        await server.close();
        await queue.close();
        await redis.quit().catch(() => redis.disconnect());
      },
    },
  };
}

/** Resolves on the first SIGTERM/SIGINT; a second one exits at once. */
function untilSignal(logger: Logger): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    let received = false;
    const handler = (signal: NodeJS.Signals): void => {
      if (received) {
        logger.warn({ signal }, 'second signal; exiting now');
        process.exit(130);
      }
      received = true;
      logger.info({ signal }, 'shutting down');
      resolve(signal);
    };
    process.on('SIGTERM', handler);
    process.on('SIGINT', handler);
  });
}

export async function runService(command: string, argv: string[]): Promise<number> {
  if (command !== 'serve' && command !== 'worker' && command !== 'up') throw new InvalidArgumentError(`unknown service command '${command}'`);
  if (argv.length > 0) throw new InvalidArgumentError(`diskconv ${command} takes no arguments; configure it with environment variables (see the README)`);
  const config = loadConfig();
  const logger = createLogger(config, `diskconv-${command}`);
  const running: Stoppable[] = [];
  let privateRedis: PrivateRedis | undefined;
  const stopAll = async (): Promise<void> => {
    // Stop in reverse order of start: API and worker before the Redis they use.
    for (const s of running.reverse()) {
      await s.stop().catch((err: unknown) => logger.error({ err, part: s.name }, 'stop failed'));
    }
    await privateRedis?.stop();
  };
  const stopped = untilSignal(logger);

  try {
    let redisUrl = config.redisUrl;
    if (!redisUrl) {
      if (command !== 'up') {
        throw new InvalidArgumentError(`REDIS_URL is required for diskconv ${command} (diskconv up starts a private redis-server when it is unset)`);
      }
      privateRedis = await startPrivateRedis(join(config.dataDir, 'redis'));
      redisUrl = privateRedis.url;
      logger.info({ redis: redisUrl }, 'started a private redis-server');
    }
    const stores = await openStores(config);
    running.push({ name: 'stores', stop: () => stores.close() });
    if (command === 'worker' || command === 'up') {
      const worker = await startWorker(config, { stores, logger, redisUrl });
      running.push({ name: 'worker', stop: () => worker.close() });
    }
    if (command === 'serve' || command === 'up') {
      const api = await startApi(config, redisUrl, stores, logger);
      running.push(api.stoppable);
      logger.info({ url: api.url }, 'listening');
      if (command === 'up') {
        process.stdout.write(`diskconv is up: ${api.url}  (data in ${config.dataDir}${privateRedis ? `, redis at ${privateRedis.url}` : ''}; Ctrl-C stops it)\n`);
      }
    }
  } catch (err) {
    await stopAll();
    throw err;
  }
  await stopped;
  await stopAll();
  logger.info('stopped');
  return 0;
}
