/**
 * `diskconv serve` (API), `diskconv worker` (conversions) and `diskconv up`
 * (both, plus a private redis-server when REDIS_URL is unset). Each runs until
 * SIGTERM or SIGINT, then closes with grace: the API finishes its requests, the
 * worker finishes or hands back its jobs.
 */
import { join } from 'node:path';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { createLogger } from '../log.js';
import { checkListenExposure, ConfigError, loadConfig, type Config } from '../config.js';
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
  // Fail fast: with Redis down a request is answered 503 QUEUE_UNAVAILABLE at once,
  // not after ioredis has queued and retried its commands for many seconds.
  // Auto-pipelining: the commands of concurrent requests (a GET's rate-limit script and record read) go out in one write per tick.
  const redis = new Redis(redisUrl, { maxRetriesPerRequest: 1, enableOfflineQueue: false, connectTimeout: 3000, enableAutoPipelining: true });
  redis.on('error', (err) => logger.warn({ err: err.message }, 'redis connection error'));
  const records = new JobRecords(redis, config.queueName);
  const queue = new ConversionQueue(redisUrl, config, { failFast: true });
  queue.queue.on('error', (err) => logger.warn({ err: err.message }, 'queue connection error'));
  // Imported here, not at the top: a `diskconv worker` never loads Fastify and the routes (measured: the
  // worker's idle heap stays at a 16 MiB young generation instead of growing to 32 MiB while they load).
  const { startServer } = await import('../api/server.js');
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

/**
 * Resolves on the first SIGTERM/SIGINT; a second one exits at once. The first one
 * always ends the process too: if the graceful close has not finished after
 * `graceMs` plus a margin (Redis unreachable, a close that never returns), it exits.
 */
function untilSignal(logger: Logger, graceMs: number): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    let received = false;
    const handler = (signal: NodeJS.Signals): void => {
      if (received) {
        logger.warn({ signal }, 'second signal; exiting now');
        process.exit(130);
      }
      received = true;
      logger.info({ signal }, 'shutting down');
      setTimeout(() => {
        logger.error({ grace_ms: graceMs }, 'shutdown did not finish in time; exiting');
        process.exit(1);
      }, graceMs + SHUTDOWN_MARGIN_MS).unref();
      resolve(signal);
    };
    process.on('SIGTERM', handler);
    process.on('SIGINT', handler);
  });
}

/** Time beyond SHUTDOWN_GRACE_MS that a close may take before the process exits anyway. */
const SHUTDOWN_MARGIN_MS = 5000;

/** Resolves when `promise` settles or after `ms`, whichever is first; never rejects. */
async function bounded(promise: Promise<unknown>, ms: number, onTimeout: () => void): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    promise.catch(() => {}),
    new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        onTimeout();
        resolve();
      }, ms);
    }),
  ]);
  clearTimeout(timer);
}

/** A port already in use is a configuration problem: say which variable to change. */
function explainListenError(err: unknown, config: Config): unknown {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'EADDRINUSE') return new ConfigError(`port ${config.port} on ${config.host} is already in use; set PORT to a free port (PORT=0 picks one)`);
  if (code === 'EADDRNOTAVAIL') return new ConfigError(`cannot listen on ${config.host}: no such local address; set HOST`);
  if (code === 'EACCES') return new ConfigError(`not allowed to listen on port ${config.port}; set PORT to a port above 1023`);
  return err;
}

export async function runService(command: string, argv: string[]): Promise<number> {
  if (command !== 'serve' && command !== 'worker' && command !== 'up') throw new InvalidArgumentError(`unknown service command '${command}'`);
  if (argv.length > 0) throw new InvalidArgumentError(`diskconv ${command} takes no arguments; configure it with environment variables (see the README)`);
  const config = loadConfig();
  if (command !== 'worker') checkListenExposure(config);
  const logger = createLogger(config, `diskconv-${command}`);
  const running: Stoppable[] = [];
  let privateRedis: PrivateRedis | undefined;
  const stopAll = async (): Promise<void> => {
    // Stop in reverse order of start: API and worker before the Redis they use. Each
    // close is bounded: with Redis unreachable a client's quit would wait for ever.
    for (const s of running.splice(0).reverse()) {
      const limit = (s.name === 'worker' || s.name === 'api' ? config.shutdownGraceMs : 0) + SHUTDOWN_MARGIN_MS / 2;
      await bounded(
        s.stop().catch((err: unknown) => logger.error({ err, part: s.name }, 'stop failed')),
        limit,
        () => logger.warn({ part: s.name }, 'stop did not finish in time; going on'),
      );
    }
    await privateRedis?.stop();
  };
  const stopped = untilSignal(logger, config.shutdownGraceMs);
  // Start-up can wait on an unreachable Redis: a signal meanwhile still stops us.
  let startupDone = false;
  const startup = (async () => {
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
    startupDone = true;
  })();
  startup.catch(() => {}); // surfaced through the race below, or moot after a signal
  const first = await Promise.race([startup.then(() => 'started' as const), stopped.then(() => 'signal' as const)]).catch(async (err: unknown) => {
    await stopAll();
    exitSoon(2);
    throw explainListenError(err, config);
  });
  if (first === 'started') await stopped;
  else if (!startupDone) logger.warn('signal during start-up; stopping what has started');
  await stopAll();
  logger.info('stopped');
  // Whatever still holds the event loop (a client reconnecting to an unreachable Redis,
  // a start-up step still waiting) must not keep a stopped service alive.
  exitSoon(0);
  return 0;
}

function exitSoon(code: number): void {
  setTimeout(() => process.exit(code), 1000).unref();
}
