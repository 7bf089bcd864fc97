/**
 * `diskconv info` against `qemu-img info`, byte for byte, human and JSON, on an
 * image of every format and feature qemu-img makes: sizes as size_to_str
 * prints them, cluster_size, the snapshot table, vmdk extents, the Format
 * specific information block, key order. An image with a backing file shows it
 * (nothing it names is opened) while convert and check still refuse it.
 */
import { execFile } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { humanSize } from '../../src/cli/human.js';
import { CLI, runDiskconv } from '../helpers/cli.js';
import { hasQemuIo, makeTempDir, qemuImg, qemuIo, writeRaw } from '../helpers/qemu.js';

const sh = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
const withIo = await hasQemuIo();

interface Fixture {
  name: string;
  build: (path: string, base: string) => Promise<void>;
}

const convert = (fmt: string, ...opts: string[]) => async (path: string, base: string) => {
  await qemuImg('convert', '-f', 'raw', '-O', fmt, ...opts, base, path);
};

const FIXTURES: Fixture[] = [
  { name: 'v3.qcow2', build: convert('qcow2') },
  { name: 'v2.qcow2', build: convert('qcow2', '-o', 'compat=0.10') },
  { name: 'compressed.qcow2', build: convert('qcow2', '-c') },
  { name: 'zstd.qcow2', build: convert('qcow2', '-c', '-o', 'compression_type=zstd') },
  { name: 'extl2.qcow2', build: convert('qcow2', '-o', 'extended_l2=on,cluster_size=128k') },
  { name: 'lazy-4k.qcow2', build: convert('qcow2', '-o', 'lazy_refcounts=on,cluster_size=4k,refcount_bits=64') },
  {
    name: 'snapshots.qcow2',
    build: async (path, base) => {
      await convert('qcow2')(path, base);
      await qemuImg('snapshot', '-c', 'first', path);
      await qemuImg('snapshot', '-c', 'a-much-longer-snapshot-name', path);
    },
  },
  {
    name: 'bitmaps.qcow2',
    build: async (path, base) => {
      await convert('qcow2')(path, base);
      await qemuImg('bitmap', '--add', path, 'b0');
      await qemuImg('bitmap', '--add', '-g', '128k', '--disable', path, 'b1');
    },
  },
  { name: 'empty-big.qcow2', build: async (path) => void (await qemuImg('create', '-f', 'qcow2', path, '1000G')) },
  { name: 'odd.qcow2', build: async (path) => void (await qemuImg('create', '-f', 'qcow2', path, '1023k')) },
  { name: 'sparse.vmdk', build: convert('vmdk') },
  { name: 'stream.vmdk', build: convert('vmdk', '-o', 'subformat=streamOptimized') },
  { name: 'dynamic.vdi', build: convert('vdi') },
  { name: 'static.vdi', build: convert('vdi', '-o', 'static=on') },
  { name: 'disk.raw', build: convert('raw') },
  { name: 'dynamic.vhd', build: convert('vpc') },
  { name: 'fixed.vhd', build: convert('vpc', '-o', 'subformat=fixed') },
  { name: 'disk.vhdx', build: convert('vhdx') },
];

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-info-'));
  const base = join(dir, 'base.raw');
  await writeRaw(base, 6 * 2 ** 20 + 4096, 8);
  for (const f of FIXTURES) await f.build(join(dir, f.name), base);
  if (withIo) {
    // A dirty image: qemu-io aborts before it clears the dirty bit of a lazy-refcounts image.
    const dirty = join(dir, 'dirty.qcow2');
    await qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '8M');
    await qemuIo('-c', 'write -P 0x5a 0 64k', '-c', 'abort', dirty).catch(() => {});
  }
  // Backing files: relative in the same directory, relative in a subdirectory, and one whose backing file is gone.
  await mkdir(join(dir, 'sub'));
  await qemuImg('create', '-f', 'qcow2', join(dir, 'sub', 'base.qcow2'), '16M');
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'sub', 'over.qcow2'));
  await qemuImg('create', '-f', 'qcow2', '-b', join(dir, 'sub', 'base.qcow2'), '-F', 'qcow2', join(dir, 'abs-over.qcow2'));
  await qemuImg('create', '-f', 'qcow2', '-b', 'gone.raw', '-F', 'raw', '-u', join(dir, 'sub', 'gone-over.qcow2'), '4M');
}, 300_000);
afterAll(async () => cleanup?.());

async function qemuInfoText(args: string[], cwd: string): Promise<string> {
  return (await sh('qemu-img', ['info', ...args], { cwd })).stdout;
}

async function same(file: string, cwd = dir): Promise<void> {
  const name = relative(cwd, file);
  for (const output of ['human', 'json']) {
    const theirs = await qemuInfoText([`--output=${output}`, name], cwd);
    const ours = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
      execFile(process.execPath, [CLI, 'info', `--output=${output}`, name], { cwd }, (err, stdout, stderr) =>
        resolve({ code: err ? 1 : 0, stdout, stderr }),
      ),
    );
    expect(ours.stderr).toBe('');
    expect(ours.stdout).toBe(theirs);
  }
}

describe('info is byte-identical to qemu-img info (human and JSON)', () => {
  for (const f of FIXTURES) it(f.name, () => same(join(dir, f.name)));
  it.skipIf(!withIo)('a dirty qcow2 (cleanly shut down: no)', () => same(join(dir, 'dirty.qcow2')));
  it('an image given by a path with a directory', () => same(join(dir, 'v3.qcow2'), '/'));
});

describe('info of an image with a backing file shows it; convert and check refuse it', () => {
  it('relative backing file, image named with a directory: (actual path: ...)', () => same(join(dir, 'sub', 'over.qcow2')));
  it('relative backing file, image named without one', () => same(join(dir, 'sub', 'over.qcow2'), join(dir, 'sub')));
  it('absolute backing file', () => same(join(dir, 'abs-over.qcow2')));
  it('a backing file that does not exist (never opened, so it does not matter)', () => same(join(dir, 'sub', 'gone-over.qcow2')));

  it('convert and check still refuse it with UNSAFE_IMAGE, and write nothing', async () => {
    const over = join(dir, 'sub', 'over.qcow2');
    const out = join(dir, 'over.raw');
    const conv = await runDiskconv(['convert', '-O', 'raw', over, out]);
    expect(conv.code).toBe(1);
    expect(conv.stderr).toMatch(/^diskconv: UNSAFE_IMAGE: .*backing file/);
    await expect(sh('stat', [out])).rejects.toThrow();
    const check = await runDiskconv(['check', over]);
    expect(check.stderr).toMatch(/UNSAFE_IMAGE: .*backing file/);
    expect(check.code).not.toBe(0);
  });

  it('info opens nothing the image names (the backing file may be removed, or be anything)', async () => {
    await rm(join(dir, 'sub', 'base.qcow2'));
    await same(join(dir, 'sub', 'over.qcow2'));
  });
});

describe('sizes as qemu prints them (size_to_str, %0.3g)', () => {
  // Values printed by qemu's own size_to_str code compiled with glibc.
  it.each([
    [0, '0 B'],
    [999, '999 B'],
    [1000, '0.977 KiB'],
    [1023, '0.999 KiB'],
    [1024, '1 KiB'],
    [1536, '1.5 KiB'],
    [200704, '196 KiB'],
    [3276800, '3.12 MiB'],
    [1023488, '1e+03 KiB'],
    [1024000, '0.977 MiB'],
    [20971520, '20 MiB'],
    [1610612736, '1.5 GiB'],
    [2 ** 40, '1 TiB'],
    [Number.MAX_SAFE_INTEGER, '8 PiB'],
  ])('%d bytes: %s', (bytes, text) => expect(humanSize(bytes)).toBe(text));
});
