/**
 * Compressed wrappers (gzip, xz, bzip2, zstd) around qcow2, vmdk, vdi and raw
 * images, made by the reference tools: the CLI converts each to the bytes
 * qemu-img makes of the inner image; truncated and corrupt wrappers are
 * IMAGE_CORRUPT (never a short disk); a bomb is LIMIT_EXCEEDED.
 */
import { execFile } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decompressTo, detectWrapper, ImageCorruptError, LimitExceededError, type WrapperFormat } from '../../../src/engine/index.js';
import { runDiskconv } from '../../helpers/cli.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File } from '../../helpers/qemu.js';

const exec = promisify(execFile);
const TOOLS: Record<WrapperFormat, string> = { gzip: 'gzip', xz: 'xz', bzip2: 'bzip2', zstd: 'zstd' };
const INNER = ['qcow2', 'vmdk', 'vdi', 'raw'] as const;

let dir: string;
let cleanup: () => Promise<void>;
const refs: Record<string, string> = {};

async function wrap(format: WrapperFormat, path: string, out: string): Promise<void> {
  const { stdout } = await exec(TOOLS[format], ['-c', path], { encoding: 'buffer', maxBuffer: 256 * 2 ** 20 });
  await writeFile(out, stdout);
}

const sink = (): Writable => new Writable({ write: (_c, _e, done) => done() });

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-wrap-'));
  const raw = join(dir, 'base.raw');
  await writeFile(raw, mixedContent(5 * 2 ** 20 + 512, 31));
  for (const inner of INNER) {
    const path = join(dir, `disk.${inner}`);
    await qemuImg('convert', '-f', 'raw', '-O', inner, raw, path);
    refs[inner] = await qemuRawSha256(path, dir);
  }
});
afterAll(async () => {
  await cleanup?.();
});

describe('wrappers by the CLI', () => {
  const cases = (['gzip', 'xz', 'bzip2', 'zstd'] as const).flatMap((w) => INNER.map((inner) => ({ w, inner })));
  it.each(cases)('$w around $inner converts to qemu-img of the inner image', async ({ w, inner }) => {
    const wrapped = join(dir, `disk.${inner}.${w}.bin`); // the name says nothing: detection is by magic
    await wrap(w, join(dir, `disk.${inner}`), wrapped);
    expect(detectWrapper(await readFile(wrapped).then((b) => b.subarray(0, 10)))).toBe(w);
    const out = `${wrapped}.out`;
    const conv = await runDiskconv(['convert', '-O', 'raw', wrapped, out]);
    expect(conv.stderr).toBe('');
    expect(await sha256File(out)).toBe(refs[inner]);
    const info = await runDiskconv(['info', '--output=json', wrapped]);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: inner, filename: wrapped });
  });

  it.each(['gzip', 'xz', 'bzip2', 'zstd'] as const)('%s: truncated and corrupt wrappers are IMAGE_CORRUPT, no output', async (w) => {
    const wrapped = join(dir, `whole.${w}`);
    await wrap(w, join(dir, 'disk.qcow2'), wrapped);
    const bytes = await readFile(wrapped);
    const truncated = join(dir, `truncated.${w}`);
    await writeFile(truncated, bytes.subarray(0, Math.floor(bytes.length / 2)));
    const corrupt = join(dir, `corrupt.${w}`);
    const flipped = Buffer.from(bytes);
    for (let i = 0; i < 64; i++) {
      const at = Math.floor(flipped.length / 3) + i * 97;
      flipped[at] = (flipped[at] as number) ^ 0x5a;
    }
    await writeFile(corrupt, flipped);
    for (const bad of [truncated, corrupt]) {
      const out = `${bad}.out`;
      const conv = await runDiskconv(['convert', '-O', 'raw', bad, out]);
      expect(conv.code, bad).not.toBe(0);
      expect(conv.stderr, bad).toContain('IMAGE_CORRUPT:');
      await expect(stat(out)).rejects.toThrow();
    }
  });
});

describe('decompressTo', () => {
  it.each(['gzip', 'xz', 'bzip2', 'zstd'] as const)('%s: a bomb stops at the bound with LIMIT_EXCEEDED', async (w) => {
    const zeros = join(dir, `zeros-${w}.raw`);
    await writeFile(zeros, Buffer.alloc(64 * 2 ** 20));
    const bomb = join(dir, `bomb.${w}`);
    await wrap(w, zeros, bomb);
    expect((await stat(bomb)).size).toBeLessThan(2 ** 20);
    const err = await decompressTo(w, createReadStream(bomb), sink(), { maxBytes: 8 * 2 ** 20 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LimitExceededError);
    // Within the bound it decompresses whole.
    expect(await decompressTo(w, createReadStream(bomb), sink(), { maxBytes: 64 * 2 ** 20 })).toBe(64 * 2 ** 20);
  });

  it('an empty wrapper is IMAGE_CORRUPT', async () => {
    const empty = join(dir, 'empty.raw');
    await writeFile(empty, Buffer.alloc(0));
    const gz = join(dir, 'empty.gz');
    await wrap('gzip', empty, gz);
    await expect(decompressTo('gzip', createReadStream(gz), sink(), { maxBytes: 2 ** 20 })).rejects.toBeInstanceOf(ImageCorruptError);
  });
});
