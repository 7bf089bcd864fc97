/**
 * Zip bundles: stored members read in place (Info-ZIP's `zip -0`, ZIP64 with
 * `-fz`) and deflated members (Info-ZIP's default, Python's ZIP_DEFLATED)
 * staged into a bounded scratch folder, compared with qemu-img on the same
 * files; encrypted, symlink, duplicate, lying and overlapping members, deflate
 * bombs, bad CRCs and cut streams refused with typed errors, the scratch
 * folder empty afterwards.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { mkdir, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import { makeTempDir, qemuImg, qemuIo, run, sha256File } from '../../helpers/qemu.js';
import { fileSha256, outcomeOf } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);
let ref = '';
let flatRef = '';
let splitRef = '';
const MiB = 2 ** 20;

/** zip FLAGS NAME FILES... run in the fixture folder. */
const zip = async (name: string, files: string[], ...flags: string[]): Promise<string> => {
  await run('sh', ['-c', `cd "${dir}" && zip -q ${flags.join(' ')} ${name} ${files.join(' ')}`]);
  return path(name);
};

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-zip-'));
  await qemuImg('create', '-q', '-f', 'qcow2', path('base.qcow2'), '8M');
  await qemuIo('-c', 'write -P 0x51 0 3M', path('base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path('top.qcow2'));
  await qemuIo('-c', 'write -P 0x52 2M 2M', '-c', 'write -z 512k 64k', path('top.qcow2'));
  await qemuImg('convert', '-O', 'raw', path('top.qcow2'), path('top.ref'));
  ref = await sha256File(path('top.ref'));
  await qemuImg('create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', path('flat.vmdk'), '6M');
  await qemuIo('-f', 'vmdk', '-c', 'write -P 0x53 1M 1M', path('flat.vmdk'));
  await qemuImg('convert', '-O', 'raw', path('flat.vmdk'), path('flat.ref'));
  flatRef = await sha256File(path('flat.ref'));
  // A split VMDK, two sparse extents with data across the 2 GiB boundary.
  await qemuImg('create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path('split.vmdk'), `${2048 + 8}M`);
  await qemuIo('-f', 'vmdk', '-c', 'write -P 0x61 0 1M', '-c', 'write -P 0x62 2047M 2M', '-c', 'write -P 0x63 2054M 1M', path('split.vmdk'));
  await qemuImg('convert', '-O', 'raw', path('split.vmdk'), path('split.ref'));
  splitRef = await sha256File(path('split.ref'));
  await mkdir(path('scratch'));
}, 120_000);
afterAll(async () => cleanup());

describe('zip bundles', () => {
  it('stored members (zip -0, and ZIP64 with -fz) convert equal to qemu-img', async () => {
    expect((await fileSha256(await zip('chain.zip', ['top.qcow2', 'base.qcow2'], '-0'))).sha256).toBe(ref);
    expect((await fileSha256(await zip('chain64.zip', ['base.qcow2', 'top.qcow2'], '-0', '-fz'))).sha256).toBe(ref);
    const flat = await fileSha256(await zip('flat.zip', ['flat.vmdk', 'flat-flat.vmdk'], '-0'));
    expect(flat.format).toBe('vmdk');
    expect(flat.sha256).toBe(flatRef);
  }, 60_000);

  it('deflated members (zip, Python ZIP_DEFLATED, mixed with stored, ZIP64) convert equal to qemu-img; scratch removed', async () => {
    const scratchDir = path('scratch');
    const chain = await zip('deflated.zip', ['top.qcow2', 'base.qcow2']);
    expect((await readFile(chain)).readUInt16LE(8), 'the first member is deflated (method 8)').toBe(8);
    expect((await fileSha256(chain, { scratchDir })).sha256).toBe(ref);
    expect((await fileSha256(await zip('deflated64.zip', ['base.qcow2', 'top.qcow2'], '-9', '-fz'), { scratchDir })).sha256).toBe(ref);
    await run('python3', ['-c', `
import zipfile
with zipfile.ZipFile(${JSON.stringify(path('mixed.zip'))}, 'w') as z:
    z.write(${JSON.stringify(path('top.qcow2'))}, 'top.qcow2', compress_type=zipfile.ZIP_STORED)
    z.write(${JSON.stringify(path('base.qcow2'))}, 'base.qcow2', compress_type=zipfile.ZIP_DEFLATED)
`]);
    expect((await fileSha256(path('mixed.zip'), { scratchDir })).sha256).toBe(ref);
    // A split VMDK: descriptor and both sparse extents deflated; a flat extent deflated (read in place from the staged copy).
    const split = await fileSha256(await zip('split.zip', ['split.vmdk', 'split-s001.vmdk', 'split-s002.vmdk']), { scratchDir });
    expect(split.format).toBe('vmdk');
    expect(split.virtualSize).toBe((2048 + 8) * MiB);
    expect(split.sha256).toBe(splitRef);
    const flat = await fileSha256(await zip('flat-deflated.zip', ['flat.vmdk', 'flat-flat.vmdk']), { scratchDir });
    expect(flat.sha256).toBe(flatRef);
    expect(await readdir(scratchDir)).toEqual([]);
  }, 120_000);

  it('deflated members whose sizes lie, bad CRCs, cut streams and deflate bombs are typed errors; scratch removed', async () => {
    const scratchDir = path('scratch');
    await run('python3', ['-c', `
import zipfile
with zipfile.ZipFile(${JSON.stringify(path('one.zip'))}, 'w', zipfile.ZIP_DEFLATED) as z:
    z.write(${JSON.stringify(path('base.qcow2'))}, 'base.qcow2')
with zipfile.ZipFile(${JSON.stringify(path('bomb.zip'))}, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('disk.raw', bytes(64 * 1024 * 1024))
with zipfile.ZipFile(${JSON.stringify(path('bz2.zip'))}, 'w', zipfile.ZIP_BZIP2) as z:
    z.write(${JSON.stringify(path('base.qcow2'))}, 'base.qcow2')
`]);
    const one = await readFile(path('one.zip'));
    expect((await outcomeOf(one, { scratchDir })).code).toBe('ok');
    const cd = one.indexOf(Buffer.from('PK\x01\x02', 'latin1'));
    /** The one entry with its fields changed in both headers (local at 0, central at cd). */
    const patched = (bytes: Buffer, fields: { crc?: number; csize?: number; usize?: number }): Buffer => {
      const b = Buffer.from(bytes);
      const at = b.indexOf(Buffer.from('PK\x01\x02', 'latin1'));
      if (fields.crc !== undefined) (b.writeUInt32LE(fields.crc >>> 0, 14), b.writeUInt32LE(fields.crc >>> 0, at + 16));
      if (fields.csize !== undefined) (b.writeUInt32LE(fields.csize, 18), b.writeUInt32LE(fields.csize, at + 20));
      if (fields.usize !== undefined) (b.writeUInt32LE(fields.usize, 22), b.writeUInt32LE(fields.usize, at + 24));
      return b;
    };
    const usize = one.readUInt32LE(cd + 24);
    const csize = one.readUInt32LE(cd + 20);
    const crc = one.readUInt32LE(cd + 16);
    const cases: Array<[string, Buffer, string, RegExp, Record<string, unknown>?]> = [
      ['declares one byte fewer', patched(one, { usize: usize - 1 }), 'IMAGE_CORRUPT', /more than the \d+ bytes its zip entry declares/],
      ['declares one byte more', patched(one, { usize: usize + 1 }), 'IMAGE_CORRUPT', new RegExp(`inflates to ${usize} bytes, its zip entry declares ${usize + 1}`)],
      ['a CRC-32 that differs', patched(one, { crc: crc ^ 1 }), 'IMAGE_CORRUPT', /CRC-32/],
      ['a cut deflate stream', patched(one, { csize: csize - 100 }), 'IMAGE_CORRUPT', /deflate stream is truncated or corrupt/],
      ['a size no deflate stream reaches', patched(one, { usize: 0xfffffff0 }), 'IMAGE_CORRUPT', /more than deflate can produce/],
      ['a declared size past maxVirtualSize', one, 'LIMIT_EXCEEDED', /maxVirtualSize/, { limits: { maxVirtualSize: MiB } }],
      ['compression method 12 (bzip2)', await readFile(path('bz2.zip')), 'UNSUPPORTED_FEATURE', /compression method 12/],
    ];
    // A deflate bomb: 64 MiB of zeros declared as 1 MiB stops at the declared size.
    const bomb = await readFile(path('bomb.zip'));
    cases.push(['64 MiB of zeros declared as 1 MiB', patched(bomb, { usize: MiB }), 'IMAGE_CORRUPT', /more than the 1048576 bytes its zip entry declares/]);
    // The same bomb, declared honestly, past maxVirtualSize: refused before inflating.
    cases.push(['64 MiB declared, 16 MiB allowed', bomb, 'LIMIT_EXCEEDED', /maxVirtualSize/, { limits: { maxVirtualSize: 16 * MiB } }]);
    for (const [what, bytes, code, message, options] of cases) {
      const r = await outcomeOf(bytes, { scratchDir, ...options });
      expect(r.code, what).toBe(code);
      expect(r.message, what).toMatch(message);
      expect(await readdir(scratchDir), what).toEqual([]);
    }
    // The honest bomb within the limit is a disk of zeros.
    await writeFile(path('bomb-ok.zip'), bomb);
    const zeros = await fileSha256(path('bomb-ok.zip'), { scratchDir });
    expect(zeros.virtualSize).toBe(64 * MiB);
    expect(await readdir(scratchDir)).toEqual([]);
  }, 120_000);

  it('encrypted, symlink and duplicate members are refused', async () => {
    const encrypted = await outcomeOf(await readFile(await zip('enc.zip', ['top.qcow2'], '-0', '-P', 'secret')));
    expect(encrypted.code).toBe('UNSUPPORTED_FEATURE');
    expect(encrypted.message).toMatch(/encrypted/);
    await symlink('base.qcow2', path('link.qcow2'));
    const link = await outcomeOf(await readFile(await zip('link.zip', ['top.qcow2', 'link.qcow2'], '-0', '-y')));
    expect(link.code).toBe('UNSAFE_IMAGE');
    expect(link.message).toMatch(/symbolic link/);
    await run('python3', ['-c', `
import zipfile, warnings
warnings.simplefilter('ignore')
with zipfile.ZipFile(${JSON.stringify(path('dup.zip'))}, 'w', zipfile.ZIP_STORED) as z:
    z.write(${JSON.stringify(path('top.qcow2'))}, 'top.qcow2')
    z.write(${JSON.stringify(path('base.qcow2'))}, 'top.qcow2')
with zipfile.ZipFile(${JSON.stringify(path('abs.zip'))}, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(zipfile.ZipInfo('../top.qcow2'), open(${JSON.stringify(path('top.qcow2'))}, 'rb').read())
`]);
    const dup = await outcomeOf(await readFile(path('dup.zip')));
    expect(dup.code).toBe('UNSAFE_IMAGE');
    expect(dup.message).toMatch(/second member/);
    const climb = await outcomeOf(await readFile(path('abs.zip')));
    expect(climb.code).toBe('UNSAFE_IMAGE');
    expect(climb.message).toMatch(/climbs/);
  }, 60_000);

  it('sizes that lie, overlapping members and a cut archive are typed errors', async () => {
    const good = await readFile(path('chain.zip'));
    const cdAt = good.lastIndexOf(Buffer.from('PK\x01\x02', 'latin1'));
    // The last central entry's compressed size one byte larger than its uncompressed size.
    const lying = Buffer.from(good);
    lying.writeUInt32LE(lying.readUInt32LE(cdAt + 20) + 1, cdAt + 20);
    const l = await outcomeOf(lying);
    expect(l.code).toBe('IMAGE_CORRUPT');
    expect(l.message).toMatch(/sizes disagree/);
    // Both sizes larger than the member: it runs into the central directory.
    const past = Buffer.from(good);
    past.writeUInt32LE(past.readUInt32LE(cdAt + 20) + 4096, cdAt + 20);
    past.writeUInt32LE(past.readUInt32LE(cdAt + 24) + 4096, cdAt + 24);
    expect((await outcomeOf(past)).code).toBe('IMAGE_CORRUPT');
    // The second central entry pointing at the first member's local header: overlap (and a name mismatch).
    const firstCd = good.indexOf(Buffer.from('PK\x01\x02', 'latin1'));
    const overlap = Buffer.from(good);
    overlap.writeUInt32LE(overlap.readUInt32LE(firstCd + 42), cdAt + 42);
    expect((await outcomeOf(overlap)).code).toBe('IMAGE_CORRUPT');
    const cut = await outcomeOf(good.subarray(0, good.length - 30));
    expect(cut.code).toBe('IMAGE_CORRUPT');
    expect(cut.message).toMatch(/end of central directory/);
  });
});
