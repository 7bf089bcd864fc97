import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** DISKCONV_CLI runs the tests against another build (e.g. an older one, to see a test fail there). */
export const CLI = process.env.DISKCONV_CLI ?? fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program to its end; its exit status (1 where it was killed or could not start) and output. */
export function runCommand(file: string, args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CommandResult> {
  return new Promise((resolve) => {
    execFile(file, args, { maxBuffer: 64 * 2 ** 20, timeout: options.timeoutMs ?? 120_000, env: options.env ?? process.env }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs the built CLI (tests run after `npm run build`) and returns its exit code and output. */
export function runDiskconv(args: string[], timeoutMs = 120_000, node = process.execPath): Promise<CommandResult> {
  return runCommand(node, [CLI, ...args], { timeoutMs });
}
