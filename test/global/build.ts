/**
 * vitest globalSetup: builds dist/ (tsc) once before any test runs, so tests that
 * spawn `node dist/cli.js` never run stale code. `npm test` relies on it rather
 * than building first itself.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const root = fileURLToPath(new URL('../..', import.meta.url));

export default async function setup(): Promise<void> {
  try {
    await promisify(execFile)('npm', ['run', '--silent', 'build'], { cwd: root, maxBuffer: 16 * 2 ** 20 });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    throw new Error(`npm run build failed before the tests:\n${e.stdout ?? ''}${e.stderr ?? ''}${e.message}`);
  }
}
