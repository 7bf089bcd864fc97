/**
 * The service as separate processes, the way it runs for real: `node dist/cli.js
 * serve` and `node dist/cli.js worker` with an environment, against a real Redis
 * (helpers/redis.ts) and a data directory of their own.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort } from '../../src/cli/redis-server.js';
import { CLI } from './cli.js';
import { startRedis, uniqueQueueName, type TestRedis } from './redis.js';

export interface ServiceProcess {
  readonly name: string;
  readonly child: ChildProcess;
  /** Everything the process wrote so far (stdout and stderr). */
  output(): string;
  /** Resolves with the exit code (or signal) once the process has exited. */
  exited: Promise<number | NodeJS.Signals>;
  /** Sends `signal` and waits for the exit. */
  stop(signal?: NodeJS.Signals): Promise<number | NodeJS.Signals>;
}

const MAX_LOG = 4 * 2 ** 20;

/** `node` is the Node binary to run it on (this one by default; test/e2e/node24.test.ts passes Node 24). */
export function spawnDiskconv(name: string, command: 'serve' | 'worker' | 'up', env: Record<string, string>, node = process.execPath): ServiceProcess {
  const child = spawn(node, [CLI, command], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? '/tmp', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  const append = (chunk: Buffer): void => {
    if (log.length < MAX_LOG) log += chunk.toString();
  };
  child.stdout?.on('data', append);
  child.stderr?.on('data', append);
  const exited = new Promise<number | NodeJS.Signals>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? code ?? 0)));
  return {
    name,
    child,
    output: () => log,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

export async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 30_000, intervalMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await fn();
      if (value !== undefined && value !== false) return value;
    } catch (err) {
      lastError = err;
    }
    await sleep(intervalMs);
  }
  throw new Error(`timed out waiting for ${what}${lastError ? `: ${String(lastError)}` : ''}`);
}

export interface JobJson {
  id: string;
  state: string;
  progress: { phase: string; bytes_done: number; bytes_total: number | null; percent: number | null };
  source: Record<string, unknown>;
  output: { format: string; size: number; sha256: string; href: string } | null;
  error: { code: string; message: string } | null;
  attempts: number;
  [key: string]: unknown;
}

/** A running API + workers on one Redis and one data directory. */
export class ServiceHarness {
  readonly processes: ServiceProcess[] = [];
  apiUrl = '';
  /** The Node binary the API and workers run on. */
  node = process.execPath;
  private port = 0;
  private constructor(
    readonly redis: TestRedis,
    readonly dataDir: string,
    readonly queueName: string,
    private readonly baseEnv: Record<string, string>,
  ) {}

  static async create(prefix: string, env: Record<string, string> = {}): Promise<ServiceHarness> {
    const redis = await startRedis();
    const dataDir = await mkdtemp(join(tmpdir(), `diskconv-${prefix}-`));
    const queueName = uniqueQueueName(prefix);
    return new ServiceHarness(redis, dataDir, queueName, {
      REDIS_URL: redis.url,
      DATA_DIR: dataDir,
      QUEUE_NAME: queueName,
      HOST: '127.0.0.1',
      LOG_LEVEL: 'info',
      WORKER_LOCK_DURATION_MS: '2000',
      WORKER_STALLED_INTERVAL_MS: '1000',
      JOB_BACKOFF_MS: '200',
      PROGRESS_INTERVAL_MS: '100',
      SHUTDOWN_GRACE_MS: '10000',
      ...env,
    });
  }

  env(extra: Record<string, string> = {}): Record<string, string> {
    return { ...this.baseEnv, ...extra };
  }

  /** Starts (or restarts, on the same port) the API and waits until /readyz says ready. */
  async startApi(extra: Record<string, string> = {}): Promise<ServiceProcess> {
    if (!this.port) this.port = await freePort();
    const proc = spawnDiskconv('api', 'serve', this.env({ PORT: String(this.port), ...extra }), this.node);
    this.processes.push(proc);
    this.apiUrl = `http://127.0.0.1:${this.port}`;
    await waitFor(
      'the API to be ready',
      async () => {
        if (proc.child.exitCode !== null) throw new Error(`the API exited: ${proc.output()}`);
        const res = await fetch(`${this.apiUrl}/readyz`);
        return res.status === 200;
      },
      20_000,
    );
    return proc;
  }

  async startWorker(extra: Record<string, string> = {}): Promise<ServiceProcess> {
    const proc = spawnDiskconv(`worker${this.processes.length}`, 'worker', this.env(extra), this.node);
    this.processes.push(proc);
    await waitFor('the worker to be ready', async () => {
      if (proc.child.exitCode !== null) throw new Error(`the worker exited: ${proc.output()}`);
      return proc.output().includes('worker ready');
    });
    return proc;
  }

  async request(path: string, init: RequestInit & { token?: string } = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    if (init.token) headers.set('authorization', `Bearer ${init.token}`);
    return fetch(`${this.apiUrl}${path}`, { ...init, headers });
  }

  async getJob(id: string, token?: string): Promise<JobJson> {
    const res = await this.request(`/v1/jobs/${id}`, token ? { token } : {});
    if (res.status !== 200) throw new Error(`GET job ${id}: ${res.status} ${await res.text()}`);
    return (await res.json()) as JobJson;
  }

  async waitForJob(id: string, until: (job: JobJson) => boolean, options: { token?: string; timeoutMs?: number } = {}): Promise<JobJson> {
    return waitFor(`job ${id}`, async () => {
      const job = await this.getJob(id, options.token);
      return until(job) ? job : undefined;
    }, options.timeoutMs ?? 60_000, 100);
  }

  async waitForFinal(id: string, options: { token?: string; timeoutMs?: number } = {}): Promise<JobJson> {
    return this.waitForJob(id, (j) => ['succeeded', 'failed', 'cancelled'].includes(j.state), options);
  }

  /** Stops every process (SIGTERM, then SIGKILL after a while), Redis, and removes the data directory. */
  async close(): Promise<void> {
    await Promise.all(
      this.processes.map(async (p) => {
        const timer = setTimeout(() => p.child.kill('SIGKILL'), 15_000);
        await p.stop('SIGTERM');
        clearTimeout(timer);
      }),
    );
    await this.redis.stop();
    await rm(this.dataDir, { recursive: true, force: true });
  }

  logs(): string {
    return this.processes.map((p) => `--- ${p.name}\n${p.output()}`).join('\n');
  }
}

/** Runs curl and returns its stdout; curl's own failures reject. */
export function curl(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('curl', ['-sS', ...args], { maxBuffer: 64 * 2 ** 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`curl ${args.join(' ')}: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}
