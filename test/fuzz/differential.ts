/**
 * The differential oracle: a mutated image that we convert must convert to the
 * bytes qemu-img produces (issue 2: whatever qemu-img accepts, we convert to the
 * same bytes; we may refuse more, never read differently). Images whose
 * virtual size is too large to hash quickly are left out.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { FormatId } from '../../src/engine/index.js';
import { sha256File } from '../helpers/qemu.js';

/** Largest virtual size compared (qemu-img writes it, we hash it). */
export const DIFFERENTIAL_MAX_VIRTUAL_SIZE = 64 * 2 ** 20;

export type Comparison =
  | { verdict: 'same' }
  | { verdict: 'skipped'; why: string }
  /** qemu-img converts to other bytes: a silent misread on one side. */
  | { verdict: 'different'; qemuSha256: string }
  /** qemu-img refuses what we convert. */
  | { verdict: 'qemu-refuses'; qemuError: string };

export async function compareWithQemu(bytes: Uint8Array, format: FormatId, virtualSize: number, ourSha256: string, dir: string): Promise<Comparison> {
  if (virtualSize > DIFFERENTIAL_MAX_VIRTUAL_SIZE) return { verdict: 'skipped', why: `virtual size ${virtualSize}` };
  const id = randomBytes(6).toString('hex');
  const input = join(dir, `diff-${id}.img`);
  const output = join(dir, `diff-${id}.raw`);
  await writeFile(input, bytes);
  try {
    const error = await new Promise<string | undefined>((resolve) => {
      execFile('qemu-img', ['convert', '-f', format, '-O', 'raw', input, output], { timeout: 20_000 }, (err, _stdout, stderr) =>
        resolve(err ? (err.killed ? 'qemu-img timed out' : stderr.trim() || err.message) : undefined),
      );
    });
    if (error !== undefined) return error === 'qemu-img timed out' ? { verdict: 'skipped', why: error } : { verdict: 'qemu-refuses', qemuError: error.split('\n')[0] ?? error };
    const qemuSha256 = await sha256File(output);
    return qemuSha256 === ourSha256 ? { verdict: 'same' } : { verdict: 'different', qemuSha256 };
  } finally {
    await rm(input, { force: true });
    await rm(output, { force: true });
  }
}
