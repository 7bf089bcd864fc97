/**
 * One server per vitest run, shared by every test file in every fork: the first
 * file that asks starts it in the run's directory (a mkdir is the lock) and writes
 * what it printed to `ready` (or why it failed to `failed`); the others wait for
 * one of the two. Used by the test Ceph (ceph.ts) and the test Glance (glance.ts);
 * their global setups (ceph-global.ts, glance-setup.ts) provide the directory and
 * stop the server after the run.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/** Resolves with the text `start` produced (in whichever file ran it); rejects with its failure. */
export async function oncePerRun(runDir: string, what: string, start: () => Promise<string>, timeoutMs = 300_000): Promise<string> {
  const ready = join(runDir, 'ready');
  const failed = join(runDir, 'failed');
  let mine = false;
  try {
    await mkdir(join(runDir, 'lock'));
    mine = true;
  } catch {
    // Another test file is starting it (or did).
  }
  if (mine) {
    try {
      await writeFile(ready, await start());
    } catch (err) {
      const e = err as { stderr?: string; message?: string };
      await writeFile(failed, `${e.message ?? String(err)}\n${e.stderr ?? ''}`);
    }
  }
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const text = await readFile(ready, 'utf8').catch(() => undefined);
    if (text) return text;
    const why = await readFile(failed, 'utf8').catch(() => undefined);
    if (why) throw new Error(`${what} did not start: ${why}`);
    await sleep(200);
  }
  throw new Error(`timed out waiting for ${what} to start`);
}
