/**
 * create, measure, --version, --help and usage errors, against qemu-img's own
 * output where qemu-img has one.
 */
import { execFile } from 'node:child_process';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, seededBytes, writeRaw } from '../helpers/qemu.js';

const sh = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
let qcow2: string;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-verbs-'));
  const raw = join(dir, 'base.raw');
  await writeRaw(raw, 5 * 2 ** 20 + 512, 4);
  qcow2 = join(dir, 'disk.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
});
afterAll(async () => cleanup?.());

/** qemu-img's exit code, stdout and stderr. */
async function qemu(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return sh('qemu-img', args).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

describe('create -f raw', () => {
  it.each(['10M', '1.5G', '1000', '10k', '1.25k', '0x10', '0', '1T', '4096b'])('%s: the same line, size and sparseness as qemu-img', async (size) => {
    const ours = join(dir, `c-ours-${size}.raw`);
    const theirs = join(dir, `c-qemu-${size}.raw`);
    const q = await qemu(['create', '-f', 'raw', theirs, size]);
    const r = await runDiskconv(['create', '-f', 'raw', ours, size]);
    expect(r.code).toBe(q.code);
    expect(r.stdout).toBe(q.stdout.replace(theirs, ours));
    const [a, b] = await Promise.all([stat(ours), stat(theirs)]);
    expect(a.size).toBe(b.size);
    expect(a.blocks).toBe(b.blocks);
  });

  it('-o size= and preallocation=full as qemu-img; -q prints nothing', async () => {
    for (const args of [['-o', 'size=2M'], ['-o', 'preallocation=full'], ['-q']]) {
      const sized = args[1] === 'size=2M' ? [] : ['1M'];
      const ours = join(dir, `o-ours-${args.join('')}.raw`);
      const theirs = join(dir, `o-qemu-${args.join('')}.raw`);
      const q = await qemu(['create', '-f', 'raw', ...args, theirs, ...sized]);
      const r = await runDiskconv(['create', '-f', 'raw', ...args, ours, ...sized]);
      expect(r.stdout).toBe(q.stdout.replace(theirs, ours));
      const [a, b] = await Promise.all([stat(ours), stat(theirs)]);
      expect(a.size).toBe(b.size);
      expect(a.blocks).toBe(b.blocks);
      expect((await readFile(ours)).equals(await readFile(theirs))).toBe(true);
    }
  });

  it.each([['10x'], ['-1'], ['1.5'], ['8E']])('a bad size %s is refused as qemu-img refuses it', async (size) => {
    const q = await qemu(['create', '-f', 'raw', join(dir, 'bad-q.raw'), '--', size]);
    const r = await runDiskconv(['create', '-f', 'raw', join(dir, 'bad.raw'), '--', size]);
    expect(r.code).toBe(1);
    expect(q.code).toBe(1);
    expect(r.stderr).toContain('Invalid image size specified.');
    await expect(stat(join(dir, 'bad.raw'))).rejects.toThrow(/ENOENT/);
  });

  it('no size is refused; an existing file is replaced only by a complete new one', async () => {
    const file = join(dir, 'exists.raw');
    await writeFile(file, seededBytes(4096, 3));
    const r = await runDiskconv(['create', '-f', 'raw', file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('Image creation needs a size parameter');
    expect((await readFile(file)).equals(seededBytes(4096, 3))).toBe(true);
    expect((await runDiskconv(['create', '-f', 'raw', file, '1M'])).code).toBe(0);
    expect((await stat(file)).size).toBe(2 ** 20);
  });

  it('-f qcow2 is refused (only raw is created)', async () => {
    const r = await runDiskconv(['create', '-f', 'qcow2', join(dir, 'x.qcow2'), '1M']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/UNSUPPORTED_FORMAT/);
  });
});

describe('measure -O raw', () => {
  it.each([
    [['-O', 'raw']],
    [['--output=json', '-O', 'raw']],
    [[]],
  ])('%j of an image: qemu-img\'s output', async (flags) => {
    const q = await qemu(['measure', ...flags, qcow2]);
    const r = await runDiskconv(['measure', ...flags, qcow2]);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(q.stdout.endsWith('\n') ? q.stdout : `${q.stdout}\n`);
  });

  it.each(['1000', '10G', '1.5M'])('--size %s: qemu-img\'s output', async (size) => {
    for (const json of [[], ['--output=json']]) {
      const q = await qemu(['measure', '-O', 'raw', ...json, '--size', size]);
      const r = await runDiskconv(['measure', '-O', 'raw', ...json, '--size', size]);
      expect(r.stdout.trimEnd()).toBe(q.stdout.trimEnd());
    }
  });

  it('neither or both of --size and FILE are refused as qemu-img refuses them', async () => {
    const none = await runDiskconv(['measure', '-O', 'raw']);
    expect(none.code).toBe(1);
    expect(none.stderr).toContain('Either --size N or one filename must be specified.');
    const two = await runDiskconv(['measure', '-O', 'raw', '--size', '1G', qcow2]);
    expect(two.code).toBe(1);
    expect(two.stderr).toContain('--size N cannot be used together with a filename.');
  });
});

describe('--version, --help, usage', () => {
  it('--version prints the package version', async () => {
    const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    const r = await runDiskconv(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`diskconv version ${pkg.version}\n`);
  });

  it.each(['info', 'convert', 'check', 'create', 'measure'])('%s --help lists its options and exits 0', async (cmd) => {
    const r = await runDiskconv([cmd, '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^usage: diskconv ${cmd} `));
    expect(r.stdout).toContain('-h, --help');
  });

  it('--help lists every command', async () => {
    const r = await runDiskconv(['--help']);
    expect(r.code).toBe(0);
    for (const cmd of ['info', 'convert', 'check', 'create', 'measure', 'serve', 'worker', 'up']) expect(r.stdout).toMatch(new RegExp(`^  ${cmd} `, 'm'));
  });

  it.each([
    [['convert', '--foo', 'a', 'b'], "unrecognized option '--foo'"],
    [['convert', '-Z', 'a', 'b'], "invalid option -- 'Z'"],
    [['info'], 'Expecting one image file name'],
    [['info', '-f'], "option requires an argument -- 'f'"],
    [['info', 'a', 'b'], 'Unexpected argument: b'],
    [['frobnicate'], 'Command not found: frobnicate'],
  ])('%j: usage on stderr, exit 1, a hint to --help', async (args, message) => {
    const r = await runDiskconv(args);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain(message);
    expect(r.stderr).toMatch(/Try 'diskconv (\w+ )?--help' for more information\n$/);
  });

  it('options parse as getopt does: attached values, bundled flags, long prefixes', async () => {
    const a = await runDiskconv(['info', '-fqcow2', '--out=json', qcow2]);
    expect(a.code).toBe(0);
    expect(JSON.parse(a.stdout).format).toBe('qcow2');
    const b = await runDiskconv(['convert', '-pqO', 'raw', qcow2, join(dir, 'bundled.raw')]);
    expect(b.code).toBe(0);
    expect(b.stdout).toBe('');
  });
});
