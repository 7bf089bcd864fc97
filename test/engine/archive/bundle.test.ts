/**
 * Tar bundles: a split VMDK with its extents, a qcow2 overlay with its backing
 * chain, uploaded as one archive. Made by qemu-img at setup, archived with GNU
 * tar, and compared with qemu-img converting the same files in place.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { makeTempDir, qemuImg, qemuIo, run, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, FileSource, checkImage, openImage, imageInfo } from '../../../src/engine/index.js';
import { fileSha256, makeTar, outcomeOf } from './helpers.js';

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

/** qemu-img convert -O raw of an image in place, by sha256. */
async function reference(image: string, ...flags: string[]): Promise<string> {
  const out = path(`${image.replace(/\//g, '_')}.ref.raw`);
  await qemuImg('convert', ...flags, '-O', 'raw', path(image), out);
  return sha256File(out);
}

/** tar -cf NAME -C dir FILES... */
async function tar(name: string, files: string[], ...flags: string[]): Promise<string> {
  await run('tar', [...flags, '-cf', path(name), '-C', dir, ...files]);
  return path(name);
}

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-bundle-'));
}, 60_000);
afterAll(async () => cleanup());

describe('split VMDK bundles', () => {
  it('twoGbMaxExtentSparse: three extents, data across the 2 GiB boundary, equals qemu-img', async () => {
    // Extents of 2 GiB, 8 MiB and 1 MiB: a descriptor with sizes that differ per extent.
    await qemuImg('create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path('split.vmdk'), `${2048 + 9}M`);
    const text = await readFile(path('split.vmdk'), 'latin1');
    await writeFile(path('split.vmdk'), text.replace('RW 18432 SPARSE "split-s002.vmdk"', 'RW 16384 SPARSE "split-s002.vmdk"\nRW 2048 ZERO'), 'latin1');
    await qemuIo('-f', 'vmdk', '-c', 'write -P 0x44 0 1M', '-c', 'write -P 0x55 2047M 2M', '-c', 'write -P 0x66 2055M 1M', path('split.vmdk'));
    expect(await readFile(path('split.vmdk'), 'latin1')).toContain('RW 2048 ZERO');
    const ref = await reference('split.vmdk');
    const bundle = await tar('split.tar', ['split.vmdk', 'split-s001.vmdk', 'split-s002.vmdk']);
    const got = await fileSha256(bundle);
    expect(got.format).toBe('vmdk');
    expect(got.virtualSize).toBe((2048 + 9) * MiB);
    expect(got.sha256).toBe(ref);
    // Extents first, descriptor last, in a folder: still found, still equal.
    await run('mkdir', ['-p', path('vm')]);
    await run('cp', [path('split.vmdk'), path('split-s001.vmdk'), path('split-s002.vmdk'), path('vm')]);
    const nested = await tar('nested.tar', ['vm/split-s002.vmdk', 'vm/split-s001.vmdk', 'vm/split.vmdk'], '--format=pax');
    expect((await fileSha256(nested)).sha256).toBe(ref);
  }, 180_000);

  it('twoGbMaxExtentFlat and monolithicFlat: descriptor + flat extent, equals qemu-img', async () => {
    for (const sub of ['twoGbMaxExtentFlat', 'monolithicFlat']) {
      const name = `${sub}.vmdk`;
      await qemuImg('create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, path(name), '24M');
      await qemuIo('-f', 'vmdk', '-c', 'write -P 0x21 0 3M', '-c', 'write -P 0x22 20M 1M', path(name));
      const flat = sub === 'monolithicFlat' ? `${sub}-flat.vmdk` : `${sub}-f001.vmdk`;
      const ref = await reference(name);
      const got = await fileSha256(await tar(`${sub}.tar`, [name, flat]));
      expect(got.sha256, sub).toBe(ref);
    }
  }, 120_000);

  it('info lists the extents as members; a missing extent is UNSAFE_IMAGE naming it', async () => {
    const source = await FileSource.open(path('split.tar'));
    const image = await openImage(source, { metadataOnly: true });
    const info = await imageInfo(image, source);
    expect(info.archive?.members).toEqual(['split.vmdk', 'split-s001.vmdk', 'split-s002.vmdk']);
    expect((info['format-specific']?.data as { 'create-type': string })['create-type']).toBe('twoGbMaxExtentSparse');
    await image.close();
    await source.close();

    const missing = await tar('missing.tar', ['split.vmdk', 'split-s001.vmdk']);
    const r = await outcomeOf(await readFile(missing));
    expect(r.code).toBe('UNSAFE_IMAGE');
    expect(r.message).toMatch(/split-s002\.vmdk.*not a member/);
  }, 60_000);

  it('check of a split VMDK checks every extent as qemu-img check does: clean alike, a grain past the end of an extent found', async () => {
    /** qemu-img check, which exits non-zero on findings: its code and output. */
    const qemuCheck = (file: string): Promise<{ code: number; stdout: string; stderr: string }> =>
      new Promise((resolve) => {
        execFile('qemu-img', ['check', file], (err, stdout, stderr) => resolve({ code: err ? Number((err as { code?: unknown }).code) : 0, stdout, stderr }));
      });
    // The three-extent bundle of the first test (a ZERO extent among them): clean, in qemu-img's words.
    const clean = await runDiskconv(['check', path('split.tar')]);
    const ref = await qemuCheck(path('split.vmdk'));
    expect(ref.code).toBe(0);
    expect(clean.code).toBe(0);
    expect(clean.stdout).toBe(ref.stdout);
    expect(clean.stderr).toBe('');

    // The second extent's first grain table entry pointing past the end of its file.
    await run('mkdir', ['-p', path('badsplit')]);
    for (const f of ['split.vmdk', 'split-s001.vmdk', 'split-s002.vmdk']) await run('cp', [path(f), path(`badsplit/${f}`)]);
    const extent = await readFile(path('badsplit/split-s002.vmdk'));
    const gd = Number(extent.readBigUInt64LE(56)) * 512;
    const gt = extent.readUInt32LE(gd) * 512;
    expect(extent.readUInt32LE(gt), 'the first grain of the second extent is allocated (written at 2047M-2049M)').not.toBe(0);
    extent.writeUInt32LE(0x7ffffff0, gt);
    await writeFile(path('badsplit/split-s002.vmdk'), extent);
    const qemuBad = await qemuCheck(path('badsplit/split.vmdk'));
    expect(qemuBad.code).toBe(1);
    expect(qemuBad.stderr).toMatch(/ERROR: cluster offset for sector 4194304 points after EOF/);
    const bad = await runDiskconv(['check', await tar('badsplit.tar', ['badsplit/split.vmdk', 'badsplit/split-s001.vmdk', 'badsplit/split-s002.vmdk'])]);
    expect(bad.code).toBe(qemuBad.code);
    expect(bad.stderr).toMatch(/badsplit\.tar\/badsplit\/split-s002\.vmdk \(extent at guest offset 2147483648\): ERROR: grain for guest offset 0 .*points after the end of the file/);
    const source = await FileSource.open(path('badsplit.tar'));
    try {
      const image = await openImage(source);
      try {
        const report = await checkImage(image);
        expect(report.corruptions).toBe(1);
        expect(report.messages).toHaveLength(1);
      } finally {
        await image.close();
      }
    } finally {
      await source.close();
    }
  }, 120_000);

  it('extent names that are paths out of the archive are refused', async () => {
    const descriptor = (extent: string): Buffer =>
      Buffer.from(`# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 2048 FLAT "${extent}" 0\n`);
    const flat = Buffer.alloc(MiB, 7);
    for (const [name, pattern] of [
      ['/etc/passwd', /absolute path/],
      ['../flat.img', /climbs/],
      ['sub/../../flat.img', /climbs/],
      ['nbd://127.0.0.1/x', /URL/],
      ['flat.img', /not a member/], // only "other/flat.img" exists
    ] as const) {
      const bytes = makeTar([
        { name: 'd/disk.vmdk', data: descriptor(name) },
        { name: 'other/flat.img', data: flat },
      ]);
      const r = await outcomeOf(bytes);
      expect(r.code, name).toBe('UNSAFE_IMAGE');
      expect(r.message, name).toMatch(pattern);
    }
    // The same extent inside the archive reads.
    const ok = makeTar([
      { name: 'disk.vmdk', data: descriptor('flat.img') },
      { name: 'flat.img', data: flat },
    ]);
    expect((await outcomeOf(ok)).code).toBe('ok');
    // A FLAT extent that needs more than its member holds.
    const short = makeTar([
      { name: 'disk.vmdk', data: descriptor('flat.img') },
      { name: 'flat.img', data: flat.subarray(0, MiB - 512) },
    ]);
    expect((await outcomeOf(short)).code).toBe('IMAGE_CORRUPT');
  });
});

describe('qcow2 backing chains', () => {
  beforeAll(async () => {
    // base (32 MiB, smaller than the overlays) <- mid <- top (64 MiB), with zero clusters over backing data.
    await qemuImg('create', '-q', '-f', 'qcow2', path('base.qcow2'), '32M');
    await qemuIo('-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x12 30M 2M', path('base.qcow2'));
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path('mid.qcow2'), '48M');
    await qemuIo('-c', 'write -P 0x21 1M 1M', '-c', 'write -z 4M 1M', '-c', 'write -P 0x22 40M 1M', path('mid.qcow2'));
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', path('top.qcow2'), '64M');
    await qemuIo('-c', 'write -P 0x31 1536k 64k', '-c', 'write -z 30M 512k', '-c', 'write -P 0x32 60M 1M', path('top.qcow2'));
  }, 60_000);

  it('a three-image chain is flattened as qemu-img convert flattens it', async () => {
    const ref = await reference('top.qcow2');
    const bundle = await tar('chain.tar', ['top.qcow2', 'mid.qcow2', 'base.qcow2']);
    const got = await fileSha256(bundle);
    expect(got.virtualSize).toBe(64 * MiB);
    expect(got.sha256).toBe(ref);
    // Member order does not matter: the top is the image nothing else names.
    expect((await fileSha256(await tar('chain2.tar', ['base.qcow2', 'top.qcow2', 'mid.qcow2']))).sha256).toBe(ref);
  }, 60_000);

  it('extended L2 (subclusters) over a raw backing file', async () => {
    await writeFile(path('base.raw'), Buffer.alloc(4 * MiB, 0x5a));
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', '-b', 'base.raw', '-F', 'raw', path('ext.qcow2'), '8M');
    await qemuIo('-c', 'write -P 0x61 4k 4k', '-c', 'write -z 132k 8k', '-c', 'write -P 0x62 3M 1536k', path('ext.qcow2'));
    const ref = await reference('ext.qcow2');
    expect((await fileSha256(await tar('ext.tar', ['ext.qcow2', 'base.raw']))).sha256).toBe(ref);
  }, 60_000);

  it('LUKS-encrypted overlay in a bundle decrypts with its IVs from its own offsets', async () => {
    await writeFile(path('secret'), 'bundle-pass');
    await qemuImg(
      'create', '-q', '--object', `secret,id=s0,file=${path('secret')}`, '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10',
      '-b', 'base.qcow2', '-F', 'qcow2', path('enc.qcow2'), '32M',
    );
    await qemuIo('--object', `secret,id=s0,file=${path('secret')}`, '--image-opts', '-c', 'write -P 0x71 2M 1M', `driver=qcow2,file.filename=${path('enc.qcow2')},encrypt.key-secret=s0`);
    const out = path('enc.ref.raw');
    await qemuImg('convert', '--object', `secret,id=s0,file=${path('secret')}`, '--image-opts', `driver=qcow2,file.filename=${path('enc.qcow2')},encrypt.key-secret=s0`, '-O', 'raw', out);
    const ref = await sha256File(out);
    const got = await fileSha256(await tar('enc.tar', ['enc.qcow2', 'base.qcow2']), { passphrase: Buffer.from('bundle-pass') });
    expect(got.sha256).toBe(ref);
  }, 120_000);

  it('loops, depth past the limit, missing and out-of-archive backing names are typed refusals', async () => {
    // a -> b -> a, made with -u (qemu-img create does not open the backing file then).
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', path('loop-a.qcow2'), '1M');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', path('loop-b.qcow2'), '1M');
    const loop = await outcomeOf(await readFile(await tar('loop.tar', ['loop-a.qcow2', 'loop-b.qcow2'])), { disk: 'loop-a.qcow2' });
    expect(loop.code).toBe('UNSAFE_IMAGE');
    expect(loop.message).toMatch(/loops.*loop-a\.qcow2.*loop-b\.qcow2.*loop-a\.qcow2/);
    // A loop names every image, so without a choice nothing is the top.
    const noTop = await outcomeOf(await readFile(path('loop.tar')));
    expect(noTop.code).toBe('UNSAFE_IMAGE');
    expect(noTop.message).toMatch(/loop/);

    const deep = await outcomeOf(await readFile(path('chain.tar')), { limits: { maxChainDepth: 2 } });
    expect(deep.code).toBe('LIMIT_EXCEEDED');
    expect(deep.message).toMatch(/maxChainDepth/);

    const missing = await outcomeOf(await readFile(await tar('nobase.tar', ['top.qcow2', 'mid.qcow2'])));
    expect(missing.code).toBe('UNSAFE_IMAGE');
    expect(missing.message).toMatch(/"base\.qcow2" is not a member/);

    for (const [backing, pattern] of [
      [path('base.qcow2'), /absolute path/], // exists on the host: never opened
      ['../base.qcow2', /climbs/],
      ['json:{"file.filename":"/etc/passwd"}', /URL or protocol/],
    ] as const) {
      await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F', 'qcow2', path('bad.qcow2'), '1M');
      const r = await outcomeOf(await readFile(await tar('bad.tar', ['bad.qcow2', 'base.qcow2'])), { disk: 'bad.qcow2' });
      expect(r.code, backing).toBe('UNSAFE_IMAGE');
      expect(r.message, backing).toMatch(pattern);
    }
  }, 60_000);

  it('several independent disks need a choice; --disk picks one', async () => {
    const both = await readFile(await tar('two.tar', ['split.vmdk', 'split-s001.vmdk', 'split-s002.vmdk', 'top.qcow2', 'mid.qcow2', 'base.qcow2']));
    const r = await outcomeOf(both);
    expect(r.code).toBe('INVALID_ARGUMENT');
    expect(r.message).toMatch(/several disks.*split\.vmdk.*top\.qcow2/);
    const image = await openImage(new BufferSource(both, 'two.tar'), { disk: 'top.qcow2', metadataOnly: true });
    expect(image.format).toBe('qcow2');
    expect(image.archive?.members).toEqual(['top.qcow2', 'mid.qcow2', 'base.qcow2']);
    await image.close();
    expect((await outcomeOf(both, { disk: 'nothere.qcow2' })).code).toBe('INVALID_ARGUMENT');
    // -f raw reads the tar itself as bytes, as qemu-img does.
    const raw = await openImage(new BufferSource(both, 'two.tar'), { format: 'raw' });
    expect(raw.format).toBe('raw');
  }, 60_000);
});
