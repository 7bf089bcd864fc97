/**
 * The qemu-img flags of issue 11's second round, side by side with qemu-img
 * 7.2 on fixtures made here: convert -o (preallocation, nocow,
 * extent_size_hint, size, help), -c, -B/-F, --bitmaps, -C's conflicts, -r,
 * --salvage, --target-image-opts; --object secret with --image-opts on every
 * verb; compare -p; snapshot -l; create -o. Each case checks the exit status,
 * the output bytes and allocation, and stderr carrying qemu-img's message.
 */
import { execFile } from 'node:child_process';
import { copyFile, open, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDiskconv } from '../helpers/cli.js';
import { makeTempDir, qemuImg, qemuIo, seededBytes, sha256File, writeRaw } from '../helpers/qemu.js';

const sh = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
const at = (name: string): string => join(dir, name);
let n = 0;
const fresh = (tag: string): string => at(`${tag}-${++n}.raw`);
const MiB = 2 ** 20;

async function qemu(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return sh('qemu-img', args, { maxBuffer: 64 * MiB }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

const exists = (p: string): Promise<boolean> => stat(p).then(() => true, () => false);
/** qemu-img's message without its `qemu-img: ` prefixes (each line of a multi-line message has one). */
const qemuMessage = (stderr: string): string => stderr.replace(/^qemu-img: /gm, '').trim();

/** The host offset of the first compressed cluster of a qcow2 (cluster_bits 16), from its L1 and L2 tables. */
async function firstCompressedCluster(path: string): Promise<{ guest: number; host: number }> {
  const buf = await readFile(path);
  const l1 = Number(buf.readBigUInt64BE(40));
  const l2 = Number(buf.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  for (let i = 0; i < 65536 / 8; i++) {
    const e = buf.readBigUInt64BE(l2 + 8 * i);
    if (e & (1n << 62n)) return { guest: i * 65536, host: Number(e & ((1n << 54n) - 1n)) };
  }
  throw new Error(`no compressed cluster in ${path}`);
}

let plain: string;
let luks: string;
let snaps: string;
let corrupt: string;
let corruptCluster: number;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-qemu-flags-'));
  const raw = at('base.raw');
  await writeRaw(raw, 12 * MiB, 31);
  plain = at('plain.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, plain);
  // LUKS-encrypted qcow2 with data, key "hunter2" (in pass.txt, no newline).
  await writeFile(at('pass.txt'), 'hunter2');
  luks = at('luks.qcow2');
  await qemuImg('create', '-f', 'qcow2', '--object', 'secret,id=s,data=hunter2', '-o', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10', luks, '4M');
  await qemuIo('--object', 'secret,id=s,data=hunter2', '--image-opts', `driver=qcow2,file.filename=${luks},encrypt.key-secret=s`, '-c', 'write -P 7 0 1M', '-c', 'write -P 9 3M 64k');
  // Two internal snapshots with different content.
  snaps = at('snaps.qcow2');
  await copyFile(plain, snaps);
  await qemuImg('snapshot', '-c', 'first', snaps);
  await qemuIo('-c', 'write -P 5 0 256k', snaps);
  await qemuImg('snapshot', '-c', 'second-with-a-longer-tag', snaps);
  // A compressed qcow2 with one compressed cluster's stream overwritten by noise: it cannot be decoded.
  corrupt = at('corrupt.qcow2');
  await qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, corrupt);
  const { guest, host } = await firstCompressedCluster(corrupt);
  corruptCluster = guest;
  const f = await open(corrupt, 'r+');
  await f.write(seededBytes(4096, 77), 0, 4096, host + 8);
  await f.close();
});
afterAll(async () => cleanup?.());

describe('convert -o for a raw output', () => {
  it.each([['preallocation=off'], ['preallocation=falloc'], ['preallocation=full'], ['nocow=on,extent_size_hint=1M'], ['size=1M'], ['preallocation=full', '-S', '0']])(
    '-o %s: the bytes, size and allocation of qemu-img',
    async (opts, ...rest) => {
      const ours = fresh('o-ours');
      const theirs = fresh('o-qemu');
      const q = await qemu(['convert', '-o', opts, ...rest, '-O', 'raw', plain, theirs]);
      const r = await runDiskconv(['convert', '-o', opts, ...rest, '-O', 'raw', plain, ours]);
      expect(q.code).toBe(0);
      expect(r.code).toBe(0);
      expect(r.stderr).toBe('');
      expect(await sha256File(ours)).toBe(await sha256File(theirs));
      const [a, b] = await Promise.all([stat(ours), stat(theirs)]);
      expect(a.size).toBe(b.size);
      if (/falloc|full/.test(opts)) {
        expect(b.blocks * 512).toBeGreaterThanOrEqual(b.size);
        expect(a.blocks * 512).toBeGreaterThanOrEqual(a.size);
      } else {
        // Never more than qemu-img's (the filesystem may hold an extent-tree block more for either file).
        expect(a.blocks).toBeLessThanOrEqual(b.blocks + 8);
        expect(a.blocks).toBeLessThan(a.size / 512);
      }
    },
  );

  it.each([
    ['preallocation=metadata'],
    ['preallocation=bogus'],
    ['preallocation'],
    ['foo=bar'],
    ['nocow'],
    ['nocow=1'],
    ['size=abc'],
    ['extent_size_hint=5G'],
    [','],
    ['preallocation=full,'],
    ['Preallocation=full'],
  ])('-o %s is refused with qemu-img\'s words, and no DST is made', async (opts) => {
    const theirs = fresh('bad-qemu');
    const ours = fresh('bad-ours');
    const q = await qemu(['convert', '-o', opts, '-O', 'raw', plain, theirs]);
    const r = await runDiskconv(['convert', '-o', opts, '-O', 'raw', plain, ours]);
    expect(q.code).toBe(1);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(qemuMessage(q.stderr).replace(theirs, ours));
    expect(await exists(ours)).toBe(false);
  });

  it('-o help prints qemu-img\'s list, with and without a target filename', async () => {
    for (const operands of [[plain, fresh('help')], [plain], []]) {
      const q = await qemu(['convert', '-O', 'raw', '-o', 'help', ...operands]);
      const r = await runDiskconv(['convert', '-O', 'raw', '-o', 'help', ...operands]);
      expect(r.code).toBe(q.code);
      expect(r.stdout).toBe(q.stdout);
      expect(q.stdout).toContain(operands.length === 2 ? 'preallocation=<str>' : 'Supported raw options:');
    }
  });

  it('-o with -n is refused as qemu-img refuses it', async () => {
    const target = fresh('n-o');
    await writeFile(target, '');
    await truncate(target, 12 * MiB);
    const q = await qemu(['convert', '-n', '-o', 'preallocation=full', '-O', 'raw', plain, target]);
    const r = await runDiskconv(['convert', '-n', '-o', 'preallocation=full', '-O', 'raw', plain, target]);
    expect([q.code, r.code]).toEqual([1, 1]);
    expect(r.stderr).toContain(qemuMessage(q.stderr));
  });
});

describe('flags raw output cannot honour: refused as qemu-img refuses them', () => {
  it.each([
    [['-c']],
    [['-B', 'base.qcow2']],
    [['-B', 'base.qcow2', '-F', 'qcow2']],
    [['-F', 'qcow2']],
    [['--bitmaps']],
    [['--bitmaps', '--skip-broken-bitmaps']],
    [['--skip-broken-bitmaps']],
    [['-c', '-C']],
    [['-C', '-S', '0']],
    [['-C', '--salvage']],
    [['--target-image-opts']],
    [['-c', '-o', 'foo=1']],
    [['-B', 'x', '-c']],
    [['-r', 'abc']],
    [['-r', '9E']],
  ])('%j', async (flags) => {
    const theirs = fresh('refused-qemu');
    const ours = fresh('refused-ours');
    const q = await qemu(['convert', ...flags, '-O', 'raw', plain, theirs]);
    const r = await runDiskconv(['convert', ...flags, '-O', 'raw', plain, ours]);
    expect(q.code).toBe(1);
    expect(r.code).toBe(1);
    // qemu-img splits its size hint over two lines; the first carries the reason.
    expect(r.stderr).toContain((qemuMessage(q.stderr).split('\n')[0] as string).replace(/ for$/, ''));
    expect(r.stdout).toBe('');
    // qemu-img leaves an empty DST behind for --bitmaps; diskconv refuses before making anything.
    expect(await exists(ours)).toBe(false);
    // diskconv never opens a backing file it is given: `x` and base.qcow2 do not exist here, and nothing asks for them.
  });

  it('-n -B is accepted and changes nothing, as qemu-img (the backing file is never opened)', async () => {
    const ours = fresh('nB-ours');
    const theirs = fresh('nB-qemu');
    for (const p of [ours, theirs]) {
      await writeFile(p, seededBytes(12 * MiB, 3));
    }
    const q = await qemu(['convert', '-n', '-B', at('no-such-base'), '-O', 'raw', plain, theirs]);
    const r = await runDiskconv(['convert', '-n', '-B', at('no-such-base'), '-O', 'raw', plain, ours]);
    expect([q.code, r.code]).toEqual([0, 0]);
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
    // With --target-is-zero both refuse; qemu-img 7.2 then exits 0 having written nothing (its `goto out` keeps
    // ret = 0): diskconv exits 1, as for every refusal, with the same message.
    const z = await runDiskconv(['convert', '-n', '--target-is-zero', '-B', 'x', '-O', 'raw', plain, ours]);
    const qz = await qemu(['convert', '-n', '--target-is-zero', '-B', 'x', '-O', 'raw', plain, theirs]);
    expect([qz.code, z.code]).toEqual([0, 1]);
    expect(z.stderr).toContain(qemuMessage(qz.stderr));
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
  });

  it('--target-image-opts with -n writes the raw file the options name', async () => {
    const ours = fresh('tio-ours');
    const theirs = fresh('tio-qemu');
    for (const p of [ours, theirs]) {
      await writeFile(p, '');
      await truncate(p, 12 * MiB);
    }
    const q = await qemu(['convert', '-n', '--target-image-opts', plain, `driver=raw,file.filename=${theirs}`]);
    const r = await runDiskconv(['convert', '-n', '--target-image-opts', plain, `driver=raw,file.filename=${ours}`]);
    expect([q.code, r.code]).toEqual([0, 0]);
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
  });
});

describe('-r rate limit', () => {
  it.each([['1.5M'], ['64M'], ['0'], ['0x100000']])('-r %s: accepted, the same bytes as qemu-img', async (rate) => {
    // One 64 KiB cluster of data: well under a second at the slowest rate here (no timing is asserted).
    const small = at(`small-${rate}.qcow2`);
    await qemuImg('create', '-f', 'qcow2', small, '1M');
    await qemuIo('-c', 'write -P 3 0 2k', small);
    const ours = fresh('r-ours');
    const theirs = fresh('r-qemu');
    const q = await qemu(['convert', '-r', rate, '-O', 'raw', small, theirs]);
    const r = await runDiskconv(['convert', '-r', rate, '-O', 'raw', small, ours]);
    expect([q.code, r.code]).toEqual([0, 0]);
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
  });
});

describe('--salvage', () => {
  it('the fixture is one qemu-img cannot convert without --salvage (nor can diskconv)', async () => {
    const q = await qemu(['convert', '-O', 'raw', corrupt, fresh('nosalvage-qemu')]);
    expect(q.code).toBe(1);
    expect(q.stderr).toContain(`error while reading at byte ${corruptCluster}`);
    const ours = fresh('nosalvage-ours');
    const r = await runDiskconv(['convert', '-O', 'raw', corrupt, ours]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/IMAGE_CORRUPT/);
    expect(await exists(ours)).toBe(false);
  });

  it('writes zeros where the image cannot be read, warns once per sector as qemu-img, exits 0, and gives its bytes and allocation', async () => {
    const ours = fresh('salvage-ours');
    const theirs = fresh('salvage-qemu');
    const q = await qemu(['convert', '--salvage', '-O', 'raw', corrupt, theirs]);
    const r = await runDiskconv(['convert', '--salvage', '-O', 'raw', corrupt, ours]);
    expect([q.code, r.code]).toEqual([0, 0]);
    expect(await sha256File(ours)).toBe(await sha256File(theirs));
    const [a, b] = await Promise.all([stat(ours), stat(theirs)]);
    expect(a.size).toBe(b.size);
    expect(a.blocks).toBe(b.blocks);
    const offsets = (s: string): number[] => [...s.matchAll(/warning: error while reading offset (\d+):/g)].map((m) => Number(m[1]));
    expect(offsets(r.stderr)).toEqual(offsets(q.stderr));
    expect(offsets(r.stderr).length).toBe(128);
    expect(offsets(r.stderr)[0]).toBe(corruptCluster);
  });

  it('-q keeps the warnings quiet, as qemu-img; -p still ends at 100 %', async () => {
    const r = await runDiskconv(['convert', '--salvage', '-q', '-O', 'raw', corrupt, fresh('salvage-q')]);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    const p = await runDiskconv(['convert', '--salvage', '-p', '-O', 'raw', corrupt, fresh('salvage-p')]);
    expect(p.code).toBe(0);
    expect(p.stdout.endsWith('    (100.00/100%)\r    (100.00/100%)\r\n')).toBe(true);
  });

  it('an image that reads cleanly converts the same with --salvage', async () => {
    const ours = fresh('salvage-clean');
    const r = await runDiskconv(['convert', '--salvage', '-O', 'raw', plain, ours]);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    expect(await sha256File(ours)).toBe(await sha256File(at('base.raw')));
  });
});

describe('--object secret and --image-opts', () => {
  const opts = (secret: string, id = 's0'): string[] => ['--object', secret, '--image-opts', `driver=qcow2,file.filename=${luks},encrypt.key-secret=${id}`];

  it('convert with secret file= and data=: the bytes qemu-img writes', async () => {
    const theirs = fresh('luks-qemu');
    expect((await qemu(['convert', ...opts(`secret,id=s0,file=${at('pass.txt')}`), '-O', 'raw', theirs])).code).toBe(0);
    for (const secret of [`secret,id=s0,file=${at('pass.txt')}`, 'secret,id=s0,data=hunter2', 'secret,id=s0,data=aHVudGVyMg==,format=base64']) {
      const ours = fresh('luks-ours');
      const r = await runDiskconv(['convert', ...opts(secret), '-O', 'raw', ours]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(await sha256File(ours)).toBe(await sha256File(theirs));
    }
  });

  it.each([['info'], ['info', '--output=json'], ['map', '--output=json'], ['measure', '-O', 'raw'], ['snapshot', '-l']])('%s: the same output as qemu-img', async (verb, ...flags) => {
    const args = [verb, ...flags, ...opts(`secret,id=s0,file=${at('pass.txt')}`)];
    const q = await qemu(args);
    const r = await runDiskconv(args);
    expect(q.code).toBe(0);
    expect(r.code).toBe(0);
    // info's "disk size" follows the file's allocation, which is the same file for both.
    expect(r.stdout.trimEnd()).toBe(q.stdout.trimEnd());
  });

  it('compare: an encrypted image against its raw conversion, both by option strings', async () => {
    const ref = fresh('luks-ref');
    await qemu(['convert', ...opts(`secret,id=s0,file=${at('pass.txt')}`), '-O', 'raw', ref]);
    const args = ['compare', ...opts(`secret,id=s0,file=${at('pass.txt')}`), `driver=raw,file.filename=${ref}`];
    const q = await qemu(args);
    const r = await runDiskconv(args);
    expect([q.code, r.code]).toEqual([0, 0]);
    expect(r.stdout).toBe(q.stdout);
  });

  it.each([
    ['a wrong passphrase', () => opts('secret,id=s0,data=wrong'), /WRONG_PASSPHRASE/],
    ['a secret id that is not defined', () => opts('secret,id=s0,data=hunter2', 's1'), "No secret with id 's1'"],
    ['an object type qemu does not know', () => ['--object', 'foo,id=x', plain], "Parameter 'qom-type' does not accept value 'foo'"],
    ['a secret without id', () => ['--object', 'secret,data=x', plain], "Parameter 'id' is missing"],
    ['a secret with both file and data', () => ['--object', `secret,id=s,data=x,file=${at('pass.txt')}`, plain], "'file' and 'data' are mutually exclusive"],
    ['a secret with neither', () => ['--object', 'secret,id=s', plain], "Either 'file' or 'data' must be provided"],
    ['an unknown secret parameter', () => ['--object', 'secret,id=s,data=x,bogus=1', plain], "Parameter 'bogus' is unexpected"],
    ['a missing secret file', () => ['--object', `secret,id=s,file=${at('no-such-pass')}`, plain], 'Unable to read ',],
    ['bad base64', () => ['--object', 'secret,id=s,data=!!,format=base64', plain], 'Base64 data contains invalid characters'],
    ['--image-opts with -f', () => ['--image-opts', '-f', 'qcow2', `driver=qcow2,file.filename=${plain}`], '--image-opts and --format are mutually exclusive'],
    ['an unknown image option', () => ['--image-opts', `driver=qcow2,file.filename=${plain},bogus=1`], "Block format 'qcow2' does not support the option 'bogus'"],
    ['no file.filename', () => ['--image-opts', `driver=qcow2,filename=${plain}`], 'A block device must be specified for "file"'],
    ['an encrypted image without a key', () => [luks], null],
  ])('convert refuses %s, exit 1, as qemu-img', async (_what, argsOf, message) => {
    const args = argsOf();
    const theirs = fresh('obj-qemu');
    const ours = fresh('obj-ours');
    const q = await qemu(['convert', ...args, '-O', 'raw', theirs]);
    const r = await runDiskconv(['convert', ...args, '-O', 'raw', ours]);
    expect(q.code).toBe(1);
    expect(r.code).toBe(1);
    if (typeof message === 'string') {
      expect(q.stderr).toContain(message);
      expect(r.stderr).toContain(message);
    } else if (message) expect(r.stderr).toMatch(message);
    expect(await exists(ours)).toBe(false);
  });
});

describe('compare -p', () => {
  let zero4: string;
  let zero8: string;
  let compressed: string;
  let rawCopy: string;
  beforeAll(async () => {
    zero4 = at('zero4.raw');
    zero8 = at('zero8.raw');
    await qemuImg('create', '-f', 'raw', zero4, '4M');
    await qemuImg('create', '-f', 'raw', zero8, '8M');
    compressed = at('cmp-compressed.qcow2');
    const src = at('cmp-src.raw');
    const half = Buffer.concat([seededBytes(32768, 5), Buffer.alloc(32768, 0x61)]);
    await writeFile(src, Buffer.concat(Array.from({ length: 64 }, () => half)));
    await qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', src, compressed);
    rawCopy = src;
  });

  it.each([
    ['identical (data then zeros)', () => [plain, at('base.raw')]],
    ['compressed against raw, a step per cluster', () => [compressed, rawCopy]],
    ['raw against compressed', () => [rawCopy, compressed]],
    ['different', () => [plain, compressed]],
    ['different sizes, zero tail', () => [zero4, zero8]],
    ['strict size mismatch', () => ['-s', zero4, zero8]],
    ['an image that cannot be opened', () => [plain, at('no-such.qcow2')]],
  ])('%s: stdout byte for byte as qemu-img', async (_what, operands) => {
    const args = ['compare', '-p', ...operands()];
    const q = await qemu(args);
    const r = await runDiskconv(args);
    expect(r.code).toBe(q.code);
    expect(r.stdout).toBe(q.stdout);
  });

  it('-q silences -p', async () => {
    const r = await runDiskconv(['compare', '-p', '-q', zero4, zero8]);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('');
  });
});

describe('snapshot -l', () => {
  it('lists the snapshots as qemu-img, and info shows the same table and JSON', async () => {
    for (const args of [['snapshot', '-l', snaps], ['info', snaps], ['info', '--output=json', snaps]]) {
      const q = await qemu(args);
      const r = await runDiskconv(args);
      expect(r.code).toBe(0);
      expect(r.stdout).toBe(q.stdout);
    }
    expect((await runDiskconv(['snapshot', '-l', snaps])).stdout).toContain('second-with-a-longer-tag');
  });

  it('prints nothing for an image without snapshots or a format without them, as qemu-img', async () => {
    for (const image of [plain, at('base.raw')]) {
      const q = await qemu(['snapshot', '-l', image]);
      const r = await runDiskconv(['snapshot', '-l', image]);
      expect([q.code, r.code]).toEqual([0, 0]);
      expect(r.stdout).toBe(q.stdout);
    }
  });

  it('-c, -a and -d would change the image: refused, and the image is left as it was', async () => {
    const before = await sha256File(snaps);
    for (const flag of ['-c', '-a', '-d']) {
      const r = await runDiskconv(['snapshot', flag, 'first', snaps]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/INVALID_ARGUMENT: snapshot .* would change the image/);
    }
    expect(await sha256File(snaps)).toBe(before);
    const mixed = await runDiskconv(['snapshot', '-l', '-c', 'x', snaps]);
    expect(mixed.code).toBe(1);
    expect(mixed.stderr).toContain("Cannot mix '-l', '-a', '-c', '-d'");
  });

  it('convert -l of each snapshot gives qemu-img\'s bytes', async () => {
    for (const sel of ['first', 'snapshot.name=second-with-a-longer-tag', 'snapshot.id=1']) {
      const ours = fresh('snap-ours');
      const theirs = fresh('snap-qemu');
      await qemuImg('convert', '-l', sel, '-O', 'raw', snaps, theirs);
      const r = await runDiskconv(['convert', '-l', sel, '-O', 'raw', snaps, ours]);
      expect(r.code).toBe(0);
      expect(await sha256File(ours)).toBe(await sha256File(theirs));
    }
  });
});

describe('create -o', () => {
  it.each([
    ['preallocation=falloc'],
    ['preallocation=full,nocow=on,extent_size_hint=1M'],
    ['nocow=yes,extent_size_hint=1.5k'],
    ['preallocation=off,preallocation=full'],
  ])('-o %s: the Formatting line, size and allocation of qemu-img', async (opts) => {
    const ours = fresh('create-ours');
    const theirs = fresh('create-qemu');
    const q = await qemu(['create', '-f', 'raw', '-o', opts, theirs, '1M']);
    const r = await runDiskconv(['create', '-f', 'raw', '-o', opts, ours, '1M']);
    expect([q.code, r.code]).toEqual([0, 0]);
    expect(r.stdout).toBe(q.stdout.replace(theirs, ours));
    const [a, b] = await Promise.all([stat(ours), stat(theirs)]);
    expect(a.size).toBe(b.size);
    expect(a.blocks).toBe(b.blocks);
  });

  it.each([['preallocation=metadata'], ['preallocation=x'], ['foo=1'], ['nocow=x'], ['extent_size_hint=5G'], ['size=abc']])('-o %s is refused with qemu-img\'s words', async (opts) => {
    const ours = fresh('create-bad-ours');
    const theirs = fresh('create-bad-qemu');
    const q = await qemu(['create', '-f', 'raw', '-o', opts, theirs, '1M']);
    const r = await runDiskconv(['create', '-f', 'raw', '-o', opts, ours, '1M']);
    expect([q.code, r.code]).toEqual([1, 1]);
    expect(r.stderr).toContain(qemuMessage(q.stderr).replace(theirs, ours));
    expect(r.stdout).toBe(q.stdout.replace(theirs, ours));
    expect(await exists(ours)).toBe(false);
  });

  it('-o help prints qemu-img\'s list', async () => {
    const q = await qemu(['create', '-f', 'raw', '-o', 'help', fresh('ch'), '1M']);
    const r = await runDiskconv(['create', '-f', 'raw', '-o', 'help', fresh('ch'), '1M']);
    expect(r.stdout).toBe(q.stdout);
  });
});

describe('help', () => {
  it('convert --help names every flag it takes', async () => {
    const r = await runDiskconv(['convert', '--help']);
    for (const flag of ['-o', '-r', '-c', '-B', '-F', '--bitmaps', '--salvage', '--object', '--image-opts', '--target-image-opts']) expect(r.stdout).toContain(flag);
  });
  it('compare --help names -p and --object; the command list names snapshot', async () => {
    expect((await runDiskconv(['compare', '--help'])).stdout).toMatch(/-p.*\n[\s\S]*--object/);
    expect((await runDiskconv(['--help'])).stdout).toMatch(/^ {2}snapshot FILE/m);
  });
});

describe('check: qemu-img check\'s human report', () => {
  /** Sets the refcount of host cluster `cluster` (16-bit refcounts, first refcount block). */
  async function setRefcount(path: string, cluster: number, value: number): Promise<void> {
    const buf = await readFile(path);
    const refblock = Number(buf.readBigUInt64BE(Number(buf.readBigUInt64BE(48))));
    const f = await open(path, 'r+');
    const v = Buffer.alloc(2);
    v.writeUInt16BE(value);
    await f.write(v, 0, 2, refblock + 2 * cluster);
    await f.close();
  }
  let leak: string;
  let damaged: string;
  beforeAll(async () => {
    leak = at('check-leak.qcow2');
    damaged = at('check-damaged.qcow2');
    await copyFile(plain, leak);
    await copyFile(plain, damaged);
    await setRefcount(leak, 0, 5); // the header cluster's refcount 1 -> 5: a leak
    await setRefcount(damaged, 5, 0); // a data cluster's refcount 1 -> 0: corruptions
  });

  it.each([['a clean image', () => plain], ['a compressed image', () => corrupt], ['a leak', () => leak], ['corruptions', () => damaged], ['an encrypted image (key given)', () => `driver=qcow2,file.filename=${luks},encrypt.key-secret=s0`]])(
    '%s: stdout, stderr and exit status as qemu-img, with and without -q',
    async (_what, image) => {
      const keyed = image().startsWith('driver=') ? ['--object', 'secret,id=s0,data=hunter2', '--image-opts'] : [];
      for (const quiet of [[], ['-q']]) {
        const args = ['check', ...quiet, ...keyed, image()];
        const q = await qemu(args);
        const r = await runDiskconv(args);
        expect(r.code).toBe(q.code);
        expect(r.stdout).toBe(q.stdout);
        expect(r.stderr).toBe(q.stderr);
      }
    },
  );

  it('a format without checks: exit 63 and qemu-img\'s message on stderr, nothing on stdout', async () => {
    const q = await qemu(['check', at('base.raw')]);
    const r = await runDiskconv(['check', at('base.raw')]);
    expect([q.code, r.code]).toEqual([63, 63]);
    expect(r.stdout).toBe(q.stdout);
    expect(r.stderr).toContain(qemuMessage(q.stderr));
  });

  it('-r would repair (write) the image: refused, the image left as it was', async () => {
    const before = await sha256File(leak);
    const r = await runDiskconv(['check', '-r', 'leaks', leak]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/never changes an image/);
    expect(await sha256File(leak)).toBe(before);
  });
});
