/**
 * A real redis-server for tests: a free loopback port, a temp directory, stopped
 * (and its directory removed) by stop().
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startPrivateRedis } from '../../src/cli/redis-server.js';

export interface TestRedis {
  url: string;
  port: number;
  stop(): Promise<void>;
  /** Kills the server without a goodbye (SIGKILL by default), for outage tests. */
  kill(signal?: NodeJS.Signals): void;
}

export async function startRedis(): Promise<TestRedis> {
  const dir = await mkdtemp(join(tmpdir(), 'diskconv-redis-'));
  const redis = await startPrivateRedis(dir, { persist: false });
  return {
    url: redis.url,
    port: redis.port,
    kill: (signal: NodeJS.Signals = 'SIGKILL') => {
      redis.process.kill(signal);
    },
    stop: async () => {
      await redis.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** A queue name no other test file uses. */
export function uniqueQueueName(prefix: string): string {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}
