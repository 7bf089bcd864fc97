/**
 * `diskconv compare` against `qemu-img compare` (7.2) on images made here: the
 * same stdout and exit status for identical images, a difference at a known
 * offset (on and off a sector boundary, data against data and data against a
 * hole), different sizes with a zero or non-zero tail, -s, -q, and images that
 * cannot be opened; holes are compared without being read.
 */
import { execFile } from 'node:child_process';
import { copyFile, open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, qemuIo, seededBytes } from '../helpers/qemu.js';

const sh = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
const at = (name: string): string => join(dir, name);

async function qemu(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return sh('qemu-img', args, { maxBuffer: 64 * 2 ** 20 }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

/** Writes `bytes` at `offset` of an existing file, in place. */
async function poke(path: string, offset: number, bytes: Uint8Array): Promise<void> {
  const f = await open(path, 'r+');
  try {
    await f.write(bytes, 0, bytes.length, offset);
  } finally {
    await f.close();
  }
}

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-compare-'));
  // a.qcow2: 4 MiB, data at 0 (64 KiB) and at 2 MiB (128 KiB), the rest unallocated.
  await qemuImg('create', '-f', 'qcow2', at('a.qcow2'), '4M');
  await qemuIo('-c', 'write -P 0x11 0 64k', '-c', 'write -P 3 2M 128k', at('a.qcow2'));
  // b.qcow2: one byte differs at 2100000, inside allocated data (not on a sector boundary).
  await copyFile(at('a.qcow2'), at('b.qcow2'));
  await qemuIo('-c', 'write -P 4 2100000 1', at('b.qcow2'));
  // c.qcow2: a byte written where a.qcow2 has nothing (data against an unallocated cluster).
  await copyFile(at('a.qcow2'), at('c.qcow2'));
  await qemuIo('-c', 'write -P 9 3000001 1', at('c.qcow2'));
  await qemuImg('convert', '-O', 'raw', at('a.qcow2'), at('a.raw'));
  await qemuImg('convert', '-O', 'vmdk', at('a.qcow2'), at('a.vmdk'));
  await qemuImg('convert', '-O', 'vdi', at('a.qcow2'), at('a.vdi'));
  await qemuImg('convert', '-O', 'vpc', '-o', 'force_size=on', at('a.qcow2'), at('a.vpc'));
  await qemuImg('convert', '-O', 'vhdx', at('a.qcow2'), at('a.vhdx'));
  await qemuImg('convert', '-c', '-O', 'qcow2', at('a.qcow2'), at('a-compressed.qcow2'));
  await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', at('a.qcow2'), at('a-stream.vmdk'));
  // Larger raw copies: a zero tail (a hole), and a tail with one non-zero byte at 5000000.
  await copyFile(at('a.raw'), at('zero-tail.raw'));
  await sh('truncate', ['-s', '6M', at('zero-tail.raw')]);
  await copyFile(at('zero-tail.raw'), at('data-tail.raw'));
  await poke(at('data-tail.raw'), 5000000, Buffer.from('x'));
  // A written (not sparse) zero tail: allocated zeros still compare equal.
  await copyFile(at('a.raw'), at('written-zero-tail.raw'));
  await poke(at('written-zero-tail.raw'), 4 * 2 ** 20, Buffer.alloc(2 * 2 ** 20));
  // A data difference in the first sector, against raw.
  await copyFile(at('a.raw'), at('first-byte.raw'));
  await poke(at('first-byte.raw'), 7, Buffer.from([0x99]));
  // 1 TiB of holes on both sides: compared without reading a byte of them.
  await qemuImg('create', '-f', 'qcow2', at('huge.qcow2'), '1T');
  await sh('truncate', ['-s', '1T', at('huge.raw')]);
  await qemuImg('create', '-f', 'qcow2', at('huge-x.qcow2'), '1T');
  await qemuIo('-c', `write -P 1 ${2 ** 40 - 4096} 512`, at('huge-x.qcow2'));
  await writeFile(at('not-an-image.qcow2'), seededBytes(100, 5));
});
afterAll(async () => cleanup?.());

const SAME: Array<[string, string[]]> = [
  ['identical', ['a.qcow2', 'a.qcow2']],
  ['identical across formats: qcow2 and raw', ['a.qcow2', 'a.raw']],
  ['qcow2 and vmdk', ['a.qcow2', 'a.vmdk']],
  ['vdi and vpc', ['a.vdi', 'a.vpc']],
  ['vhdx and raw', ['a.vhdx', 'a.raw']],
  ['compressed qcow2 and streamOptimized vmdk', ['a-compressed.qcow2', 'a-stream.vmdk']],
  ['a byte differs inside data (reported at its sector)', ['a.qcow2', 'b.qcow2']],
  ['a byte differs inside data, the other way round', ['b.qcow2', 'a.vmdk']],
  ['data against an unallocated cluster', ['a.qcow2', 'c.qcow2']],
  ['data against a hole in a raw file', ['c.qcow2', 'a.raw']],
  ['the first sector differs', ['first-byte.raw', 'a.qcow2']],
  ['a larger image with a zero tail (a hole)', ['a.qcow2', 'zero-tail.raw']],
  ['a larger image with written zeros past the end', ['written-zero-tail.raw', 'a.vdi']],
  ['a larger image with a non-zero tail', ['a.qcow2', 'data-tail.raw']],
  ['the larger image first', ['data-tail.raw', 'a.qcow2']],
  ['-q prints nothing', ['-q', 'data-tail.raw', 'a.qcow2']],
  ['-q, identical', ['-q', 'a.qcow2', 'a.raw']],
  ['-s: sizes differ', ['-s', 'a.qcow2', 'zero-tail.raw']],
  ['-s: identical copies', ['-s', 'a.qcow2', 'a.qcow2']],
  ['-s: allocation differs (unallocated against a file hole)', ['-s', 'a.qcow2', 'a.raw']],
  ['-s: vdi and vpc', ['-s', 'a.vdi', 'a.vpc']],
  ['-s: content differs before allocation does', ['-s', 'a.qcow2', 'b.qcow2']],
  ['-f and -F given', ['-f', 'qcow2', '-F', 'raw', 'a.qcow2', 'a.raw']],
  ['1 TiB of holes', ['huge.qcow2', 'huge.raw']],
  ['1 TiB of holes, one sector of data at the end', ['huge.raw', 'huge-x.qcow2']],
  ['-U', ['-U', 'a.qcow2', 'a.raw']],
];

describe('compare: the same stdout and exit status as qemu-img compare', () => {
  it.each(SAME)('%s', async (_what, args) => {
    const paths = args.map((a) => (a.startsWith('-') || ['qcow2', 'raw'].includes(a) ? a : at(a)));
    const q = await qemu(['compare', ...paths]);
    const r = await runDiskconv(['compare', ...paths]);
    expect(r.stdout).toBe(q.stdout);
    expect(r.code).toBe(q.code);
    expect(r.stderr).toBe('');
  });

  it('-s between every pair of formats: qemu-img compares its end-of-file flag too, which depends on how each driver cuts its answers', async () => {
    const files = ['a.qcow2', 'a.vmdk', 'a.vdi', 'a.vpc', 'a.vhdx', 'a.raw', 'a-compressed.qcow2', 'a-stream.vmdk', 'b.qcow2'];
    const outcomes = new Set<string>();
    for (const x of files) {
      for (const y of files) {
        const q = await qemu(['compare', '-s', at(x), at(y)]);
        const r = await runDiskconv(['compare', '-s', at(x), at(y)]);
        expect(`${x} ${y}: ${r.stdout} ${r.code}`).toBe(`${x} ${y}: ${q.stdout} ${q.code}`);
        outcomes.add(q.stdout);
      }
    }
    // The pairs cover identical, block status mismatches at several offsets, and content mismatches.
    expect(outcomes.size).toBeGreaterThan(3);
  });

  it.each([
    ['a file that does not exist', ['missing.qcow2', 'a.qcow2'], 2],
    ['B does not exist', ['a.qcow2', 'missing.qcow2'], 2],
    ['the bytes are no image of the declared format', ['-f', 'vdi', 'a.qcow2', 'a.raw'], 2],
    ['an unknown format', ['-f', 'bogus', 'a.qcow2', 'a.raw'], 2],
    ['not an image of its extension', ['-f', 'qcow2', 'not-an-image.qcow2', 'a.raw'], 2],
    ['a bad cache mode', ['-T', 'bogus', 'a.qcow2', 'a.raw'], 2],
    ['one operand', ['a.qcow2'], 1],
    ['a wrong flag', ['-x', 'a.qcow2', 'a.raw'], 1],
  ] as const)('%s: exit status %i, as qemu-img', async (_what, args, status) => {
    const paths = args.map((a) => (a.startsWith('-') || ['vdi', 'qcow2', 'bogus'].includes(a) ? a : at(a)));
    const q = await qemu(['compare', ...paths]);
    const r = await runDiskconv(['compare', ...paths]);
    expect(q.code).toBe(status);
    expect(r.code).toBe(status);
    expect(r.stdout).toBe(q.stdout);
    expect(r.stderr).not.toBe('');
  });

  it('an image with a backing file cannot be opened (its backing file is never opened): exit status 2', async () => {
    await qemuImg('create', '-f', 'qcow2', '-b', at('a.qcow2'), '-F', 'qcow2', at('top.qcow2'));
    const r = await runDiskconv(['compare', at('top.qcow2'), at('a.qcow2')]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('UNSAFE_IMAGE');
  });

  it('an image found corrupt while it is read: exit status 4, as qemu-img gives a read error', async () => {
    // Cut a.qcow2 inside its second data run: its L2 table still points there.
    await copyFile(at('a.qcow2'), at('cut.qcow2'));
    const { stdout } = await qemuImg('map', '--output=json', at('a.qcow2'));
    const last = (JSON.parse(stdout) as Array<{ offset?: number }>).filter((e) => e.offset !== undefined).pop() as { offset: number };
    await sh('truncate', ['-s', String(last.offset + 4096), at('cut.qcow2')]);
    const r = await runDiskconv(['compare', at('cut.qcow2'), at('a.raw')]);
    expect(r.code).toBe(4);
    expect(r.stderr).toContain('IMAGE_CORRUPT');
  });

  it('a declared format that disagrees with the bytes is refused, where qemu-img would read a qcow2 as raw', async () => {
    const r = await runDiskconv(['compare', '-F', 'raw', at('a.qcow2'), at('b.qcow2')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('FORMAT_MISMATCH');
  });

  it('memory stays bounded: two 384 MiB data images compare without holding them', async () => {
    const big = at('big.raw');
    const f = await open(big, 'w');
    const chunk = seededBytes(4 * 2 ** 20, 11);
    for (let i = 0; i < 96; i++) {
      chunk[0] = i; // no two chunks alike
      await f.write(chunk, 0, chunk.length, i * chunk.length);
    }
    await f.close();
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', big, at('big.qcow2'));
    const script = `import { runCli } from ${JSON.stringify(new URL('../../dist/cli/main.js', import.meta.url).href)};
      const code = await runCli(['compare', ${JSON.stringify(big)}, ${JSON.stringify(at('big.qcow2'))}]);
      process.stderr.write('maxrss=' + process.resourceUsage().maxRSS + '\\n');
      process.exitCode = code;`;
    const { stdout, stderr } = await sh(process.execPath, ['--input-type=module', '-e', script], { maxBuffer: 2 ** 20 });
    expect(stdout).toBe('Images are identical.\n');
    const maxRss = Number(/maxrss=(\d+)/.exec(stderr)?.[1]) * 1024;
    // 768 MiB are read; the reader's windows are a fixed few tens of MiB per image.
    expect(maxRss).toBeLessThan(384 * 2 ** 20);
  });
});
