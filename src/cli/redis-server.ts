/**
 * A private redis-server for `diskconv up` (and the tests): bound to 127.0.0.1 on
 * a free port, data (append-only file) in a directory of ours, stopped with us.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { DiskconvError } from '../engine/errors.js';

export class RedisStartError extends DiskconvError {
  readonly code = 'REDIS_START_FAILED' as const;
  readonly deterministic = true;
}

export async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export interface PrivateRedis {
  url: string;
  port: number;
  process: ChildProcess;
  stop(): Promise<void>;
}

export async function startPrivateRedis(dir: string, options: { binary?: string; persist?: boolean } = {}): Promise<PrivateRedis> {
  await mkdir(dir, { recursive: true, mode: 0o750 });
  const binary = options.binary ?? 'redis-server';
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const args = [
      '--bind', '127.0.0.1',
      '--port', String(port),
      '--dir', dir,
      '--protected-mode', 'yes',
      '--daemonize', 'no',
      '--save', '',
      '--appendonly', options.persist === false ? 'no' : 'yes',
      '--logfile', join(dir, 'redis.log'),
    ];
    const child = spawn(binary, args, { stdio: 'ignore' });
    let exited = false;
    let spawnError: Error | undefined;
    child.once('exit', () => (exited = true));
    child.once('error', (err) => {
      spawnError = err;
      exited = true;
    });
    const url = `redis://127.0.0.1:${port}`;
    const deadline = Date.now() + 10_000;
    while (!exited && Date.now() < deadline) {
      const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
      client.on('error', () => {});
      try {
        await client.connect();
        await client.ping();
        client.disconnect();
        return { url, port, process: child, stop: () => stopChild(child) };
      } catch {
        client.disconnect();
        await sleep(50);
      }
    }
    if (spawnError) throw new RedisStartError(`cannot run ${binary}: ${spawnError.message} (install redis-server, or set REDIS_URL)`);
    await stopChild(child);
    // The port may have been taken between our check and redis's bind: try another.
  }
  throw new RedisStartError(`redis-server did not start; see ${join(dir, 'redis.log')}`);
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}
