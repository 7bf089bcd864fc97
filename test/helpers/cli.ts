import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** DISKCONV_CLI runs the tests against another build (e.g. an older one, to see a test fail there). */
export const CLI = process.env.DISKCONV_CLI ?? fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

/** Runs the built CLI (tests run after `npm run build`) and returns its exit code and output. */
export function runDiskconv(args: string[], timeoutMs = 120_000, node = process.execPath): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(node, [CLI, ...args], { maxBuffer: 64 * 2 ** 20, timeout: timeoutMs }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}
