/**
 * `diskconv map` against `qemu-img map` (7.2) on images qemu-img and qemu-io make
 * here: the same stdout, byte for byte, and the same exit status, in JSON and
 * human output, for every format and for compressed, zero (plain and with a
 * host cluster), unallocated, extended-L2, encrypted and preallocated data.
 */
import { execFile } from 'node:child_process';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, qemuIo, seededBytes } from '../helpers/qemu.js';

const sh = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
const at = (name: string): string => join(dir, name);

/** qemu-img's exit code, stdout and stderr. */
async function qemu(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return sh('qemu-img', args, { maxBuffer: 64 * 2 ** 20 }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

/** A sparse 8 MiB raw file: data at 0, 3 MiB and 5 MiB + 4 KiB (70000 bytes each), holes between. */
async function sparseRaw(path: string): Promise<void> {
  const f = await open(path, 'w');
  try {
    await f.truncate(8 * 2 ** 20);
    for (const [k, offset] of [0, 3 * 2 ** 20, 5 * 2 ** 20 + 4096].entries()) await f.write(seededBytes(70000, k + 1), 0, 70000, offset);
  } finally {
    await f.close();
  }
}

const FIXTURES: Record<string, string> = {};

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-map-'));
  const src = at('src.raw');
  await sparseRaw(src);
  FIXTURES['raw (sparse)'] = src;
  const convert = async (name: string, ...args: string[]): Promise<void> => {
    await qemuImg('convert', '-f', 'raw', ...args, src, at(name));
    FIXTURES[name] = at(name);
  };
  await convert('plain.qcow2', '-O', 'qcow2');
  await convert('compressed.qcow2', '-c', '-O', 'qcow2');
  await convert('sparse.vmdk', '-O', 'vmdk');
  await convert('stream.vmdk', '-O', 'vmdk', '-o', 'subformat=streamOptimized');
  await convert('dynamic.vdi', '-O', 'vdi');
  await convert('static.vdi', '-O', 'vdi', '-o', 'static=on');
  await convert('dynamic.vpc', '-O', 'vpc');
  await convert('fixed.vpc', '-O', 'vpc', '-o', 'subformat=fixed');
  await convert('dynamic.vhdx', '-O', 'vhdx');
  await convert('zeros.qcow2', '-O', 'qcow2');
  // A zero cluster that keeps its host cluster, a plain zero cluster (-u), a zero cluster where nothing was.
  await qemuIo('-c', 'write -z 0 64k', '-c', 'write -z -u 3M 64k', '-c', 'write -z 7M 64k', at('zeros.qcow2'));
  await qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', at('subclusters.qcow2'), '8M');
  await qemuIo('-c', 'write -P 1 0 4k', '-c', 'write -P 2 20k 8k', '-c', 'write -z 64k 4k', '-c', 'write -P 3 1M 300k', '-c', 'write -z -u 1M 16k', '-c', 'write -z 5M 8k', at('subclusters.qcow2'));
  FIXTURES['subclusters.qcow2'] = at('subclusters.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'compression_type=zstd', at('zstd.qcow2'), '4M');
  await qemuIo('-c', 'write -c -P 7 0 128k', '-c', 'write -P 8 1M 64k', at('zstd.qcow2'));
  FIXTURES['zstd.qcow2'] = at('zstd.qcow2');
  // A raw file that is one hole, not a whole number of sectors; one of 3 bytes.
  await sh('truncate', ['-s', '1000', at('hole-1000.raw')]);
  FIXTURES['hole-1000.raw'] = at('hole-1000.raw');
  await writeFile(at('three.raw'), 'abc');
  FIXTURES['three.raw'] = at('three.raw');
  await qemuImg('create', '-f', 'qcow2', at('empty.qcow2'), '1T');
  FIXTURES['empty 1 TiB qcow2'] = at('empty.qcow2');
});
afterAll(async () => cleanup?.());

describe('map: the same output and exit status as qemu-img map', () => {
  const names = [
    'raw (sparse)',
    'plain.qcow2',
    'compressed.qcow2',
    'zeros.qcow2',
    'subclusters.qcow2',
    'zstd.qcow2',
    'sparse.vmdk',
    'stream.vmdk',
    'dynamic.vdi',
    'static.vdi',
    'dynamic.vpc',
    'fixed.vpc',
    'dynamic.vhdx',
    'hole-1000.raw',
    'three.raw',
    'empty 1 TiB qcow2',
  ];
  it.each(names.flatMap((n) => [[n, 'json'] as const, [n, 'human'] as const]))('%s, --output=%s', async (name, output) => {
    const file = FIXTURES[name] as string;
    const q = await qemu(['map', `--output=${output}`, file]);
    const r = await runDiskconv(['map', `--output=${output}`, file]);
    expect(r.stdout).toBe(q.stdout);
    expect(r.code).toBe(q.code);
    // Compressed data and vhdx have no host offset: human output refuses, as qemu-img does.
    if (q.code !== 0) expect(r.stderr).toContain('File contains external, encrypted or compressed clusters.');
    if (output === 'json') expect(q.stdout.length).toBeGreaterThan(2);
  });

  it('an encrypted qcow2 (LUKS): data without host offsets, the same entries', async () => {
    const key = at('key');
    await writeFile(key, 'secret');
    const img = at('luks.qcow2');
    await qemuImg('create', '-f', 'qcow2', '--object', `secret,id=s0,file=${key}`, '-o', 'encrypt.format=luks,encrypt.key-secret=s0', img, '4M');
    const opts = `driver=qcow2,file.filename=${img},encrypt.key-secret=s0`;
    await qemuIo('--object', `secret,id=s0,file=${key}`, '--image-opts', opts, '-c', 'write -P 5 0 64k', '-c', 'write -z 1M 64k');
    const q = await qemu(['map', '--output=json', '--object', `secret,id=s0,file=${key}`, '--image-opts', opts]);
    const r = await runDiskconv(['map', '--output=json', '--passphrase-file', key, img]);
    expect(q.code).toBe(0);
    expect(r.stdout).toBe(q.stdout);
    expect(r.stdout).not.toContain('"offset"');
  });

  it.each([
    [['--start-offset=1000', '--max-length=5000000'], 'raw (sparse)'],
    [['--start-offset=70000', '--max-length=3M'], 'zeros.qcow2'],
    [['--start-offset', '1M'], 'dynamic.vdi'],
    [['--max-length=0'], 'plain.qcow2'],
    [['--start-offset=100M'], 'sparse.vmdk'],
    [['--start-offset=8M'], 'raw (sparse)'],
  ])('%j on %s', async (flags, name) => {
    const file = FIXTURES[name] as string;
    for (const output of ['json', 'human']) {
      const q = await qemu(['map', `--output=${output}`, ...flags, file]);
      const r = await runDiskconv(['map', `--output=${output}`, ...flags, file]);
      expect(r.stdout).toBe(q.stdout);
      expect(r.code).toBe(q.code);
    }
  });

  it.each([
    [['--start-offset=-1'], 'Invalid start offset specified.'],
    [['--max-length=x'], 'Invalid max length specified.'],
    [['--output=xml'], '--output must be used with human or json as argument.'],
    [['-f', 'vdi'], 'declared format vdi'],
  ])('%j is refused, exit status 1 as qemu-img', async (flags, message) => {
    const file = FIXTURES['plain.qcow2'] as string;
    const q = await qemu(['map', ...flags, file]);
    const r = await runDiskconv(['map', ...flags, file]);
    expect(q.code).toBe(1);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain(message);
  });

  it('an image with a backing file is refused: the file it names is never opened (qemu-img would show depth 1)', async () => {
    const base = at('base.qcow2');
    const top = at('top.qcow2');
    await qemuImg('create', '-f', 'qcow2', base, '4M');
    await qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    const r = await runDiskconv(['map', '--output=json', top]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('UNSAFE_IMAGE');
  });

  it('a tar bundle is refused: qemu-img would map the archive as a raw file', async () => {
    await sh('tar', ['-cf', at('bundle.tar'), '-C', dir, 'plain.qcow2']);
    const r = await runDiskconv(['map', '--output=json', at('bundle.tar')]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('UNSUPPORTED_FEATURE');
  });

  it('--help lists the options', async () => {
    const r = await runDiskconv(['map', '--help']);
    expect(r.code).toBe(0);
    for (const flag of ['--output', '--start-offset', '--max-length', '-f', '-U']) expect(r.stdout).toContain(flag);
  });
});
