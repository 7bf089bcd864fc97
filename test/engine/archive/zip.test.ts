/**
 * Zip bundles: stored members read in place (Info-ZIP's `zip -0`, ZIP64 with
 * `-fz`), compared with qemu-img on the same files; deflated, encrypted,
 * symlink, duplicate, lying and overlapping members refused with typed errors.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, symlink } from 'node:fs/promises';
import { makeTempDir, qemuImg, qemuIo, run, sha256File } from '../../helpers/qemu.js';
import { fileSha256, outcomeOf } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);
let ref = '';
let flatRef = '';

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
}, 60_000);
afterAll(async () => cleanup());

describe('zip bundles', () => {
  it('stored members (zip -0, and ZIP64 with -fz) convert equal to qemu-img', async () => {
    expect((await fileSha256(await zip('chain.zip', ['top.qcow2', 'base.qcow2'], '-0'))).sha256).toBe(ref);
    expect((await fileSha256(await zip('chain64.zip', ['base.qcow2', 'top.qcow2'], '-0', '-fz'))).sha256).toBe(ref);
    const flat = await fileSha256(await zip('flat.zip', ['flat.vmdk', 'flat-flat.vmdk'], '-0'));
    expect(flat.format).toBe('vmdk');
    expect(flat.sha256).toBe(flatRef);
  }, 60_000);

  it('deflated, encrypted, symlink and duplicate members are refused', async () => {
    const deflated = await outcomeOf(await readFile(await zip('deflated.zip', ['top.qcow2', 'base.qcow2'])));
    expect(deflated.code).toBe('UNSUPPORTED_FEATURE');
    expect(deflated.message).toMatch(/deflated.*zip -0/);
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
