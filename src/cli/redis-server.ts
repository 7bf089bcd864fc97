/**
 * A private redis-server for `diskconv up` (and the tests): bound to 127.0.0.1 on
 * a free port, data (append-only file) in a directory of ours, stopped with us.
 * It also ends when we are killed (setpriv's parent-death signal), and one left
 * behind by an earlier `up` on the same directory is stopped before ours starts,
 * so two servers never write one append-only file.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readlink, realpath } from 'node:fs/promises';
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

/** util-linux's setpriv: with it the server gets SIGTERM when the process that started it dies. */
const SETPRIV = '/usr/bin/setpriv';

/** The pid of a redis-server still running in `dir` (by its pid file, its name and its working directory), if any. */
async function leftBehind(dir: string): Promise<number | undefined> {
  const pid = Number((await readFile(join(dir, PID_FILE), 'utf8').catch(() => '')).trim());
  if (!Number.isSafeInteger(pid) || pid <= 1) return undefined;
  const comm = (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim();
  const cwd = await readlink(`/proc/${pid}/cwd`).catch(() => '');
  return comm === 'redis-server' && cwd === (await realpath(dir)) ? pid : undefined;
}

const PID_FILE = 'redis.pid';

export async function startPrivateRedis(dir: string, options: { binary?: string; persist?: boolean } = {}): Promise<PrivateRedis> {
  await mkdir(dir, { recursive: true, mode: 0o750 });
  const binary = options.binary ?? 'redis-server';
  const stale = await leftBehind(dir);
  if (stale !== undefined) {
    // Ours, from an earlier run that was killed: SIGTERM writes its append-only file out and exits.
    process.kill(stale, 'SIGTERM');
    const deadline = Date.now() + 10_000;
    while ((await leftBehind(dir)) !== undefined && Date.now() < deadline) await sleep(50);
    if ((await leftBehind(dir)) !== undefined) throw new RedisStartError(`a redis-server (pid ${stale}) left by an earlier diskconv up still runs in ${dir} and did not stop on SIGTERM; stop it`);
  }
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
      '--pidfile', join(dir, PID_FILE),
    ];
    const child = existsSync(SETPRIV) ? spawn(SETPRIV, ['--pdeathsig', 'TERM', binary, ...args], { stdio: 'ignore' }) : spawn(binary, args, { stdio: 'ignore' });
    let exited = false;
    let spawnError: Error | undefined;
    child.once('exit', (code) => {
      exited = true;
      // setpriv could not run the binary (127: not found)
      if (code === 127) spawnError ??= new Error('not found');
    });
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
