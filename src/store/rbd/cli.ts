/**
 * Running Ceph's own CLIs (`rbd`, `ceph`): no librbd binding exists on npm.
 * They read CEPH_CONF and CEPH_ARGS from the environment, as every Ceph tool
 * does. A failure is reported with the tool's own message (its last stderr
 * lines), never a bare EPIPE; the exit status is errno (17 = EEXIST, 2 = ENOENT).
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export class CliFailure extends Error {
  constructor(
    readonly command: string,
    readonly code: number,
    readonly stderr: string,
  ) {
    super(`${command} failed (exit ${code}): ${lastLines(stderr) || 'no message'}`);
  }
}

/** The tool's message without librbd's timestamped log prefixes. */
export function lastLines(stderr: string, n = 3): string {
  return stderr
    .split('\n')
    .map((l) => l.replace(/^\S+T\S+\s+\S+\s+-?\d+\s+/, '').trim())
    .filter((l) => l.length > 0)
    .slice(-n)
    .join('; ')
    .slice(0, 500);
}

export interface CliOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export function spawnTool(tool: string, args: string[]): ChildProcessWithoutNullStreams {
  return spawn(tool, args, { stdio: ['pipe', 'pipe', 'pipe'], env: process.env });
}

/** Runs the tool to completion; resolves with its output whatever the exit status. */
export function runTool(tool: string, args: string[], options: CliOptions = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawnTool(tool, args);
    child.stdin.end();
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => {
      if (stderr.length < 64 * 1024) stderr += c.toString();
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 120_000);
    const onAbort = (): void => void child.kill('SIGTERM');
    options.signal?.addEventListener('abort', onAbort, { once: true });
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new CliFailure(`${tool} ${args[0] ?? ''}`, -1, `cannot run ${tool}: ${err.message} (install ceph-common)`));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr: signal && !stderr ? `killed by ${signal}` : stderr });
    });
  });
}

/** Runs the tool and throws CliFailure unless it exits 0. */
export async function mustRun(tool: string, args: string[], options: CliOptions = {}): Promise<string> {
  const res = await runTool(tool, args, options);
  if (res.code !== 0) throw new CliFailure(`${tool} ${args.slice(0, 2).join(' ')}`, res.code, res.stderr);
  return res.stdout;
}
