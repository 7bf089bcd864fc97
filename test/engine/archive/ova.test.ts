/**
 * OVA appliances: a tar with an OVF descriptor, an optional manifest and the
 * disks. The reference is qemu-img converting the disk extracted with tar.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { gzipSync } from 'node:zlib';
import { makeTempDir, mixedContent, qemuImg, run, sha256File } from '../../helpers/qemu.js';
import { BufferSource, FileSource, imageInfo, openImage } from '../../../src/engine/index.js';
import { fileSha256, imageSha256, makeTar, outcomeOf } from './helpers.js';

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

function ovf(disks: Array<{ id: string; href: string; size?: number; extra?: string }>, head = '<?xml version="1.0" encoding="UTF-8"?>'): string {
  return `${head}
<!-- made by the test -->
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
${disks.map((d, i) => `    <File ovf:id="file${i + 1}" ovf:href="${d.href}"${d.size !== undefined ? ` ovf:size="${d.size}"` : ''}${d.extra ?? ''}/>`).join('\n')}
  </References>
  <DiskSection>
    <Info>Virtual disk information &amp; more</Info>
${disks.map((d, i) => `    <Disk ovf:capacity="${16 * (i + 1)}" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="${d.id}" ovf:fileRef="file${i + 1}" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>`).join('\n')}
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A virtual machine</Info><Name>test</Name></VirtualSystem>
</Envelope>
`;
}

let disk1: Buffer;
let disk2: Buffer;
let ref1: string;
let ref2: string;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-ova-'));
  await writeFile(path('a.raw'), mixedContent(16 * MiB, 5));
  await writeFile(path('b.raw'), mixedContent(32 * MiB, 6));
  await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', path('a.raw'), path('app-disk1.vmdk'));
  await qemuImg('convert', '-O', 'qcow2', path('b.raw'), path('app-disk2.qcow2'));
  disk1 = await readFile(path('app-disk1.vmdk'));
  disk2 = await readFile(path('app-disk2.qcow2'));
  await writeFile(path('app.ovf'), ovf([{ id: 'vmdisk1', href: 'app-disk1.vmdk', size: disk1.length }, { id: 'vmdisk2', href: 'app-disk2.qcow2', size: disk2.length }]));
  const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
  const sha1 = (b: Buffer): string => createHash('sha1').update(b).digest('hex');
  const ovfBytes = await readFile(path('app.ovf'));
  await writeFile(path('app.mf'), `SHA256(app.ovf)= ${sha(ovfBytes)}\nSHA1(app-disk1.vmdk)= ${sha1(disk1)}\nSHA256(app-disk2.qcow2)= ${sha(disk2)}\n`);
  // An OVA as ovftool writes it: descriptor first, then manifest, then disks.
  await run('tar', ['-cf', path('app.ova'), '--format=ustar', '-C', dir, 'app.ovf', 'app.mf', 'app-disk1.vmdk', 'app-disk2.qcow2']);
  // The reference: each disk extracted with tar and converted by qemu-img.
  await run('mkdir', [path('x')]);
  await run('tar', ['-xf', path('app.ova'), '-C', path('x')]);
  await qemuImg('convert', '-O', 'raw', path('x/app-disk1.vmdk'), path('ref1.raw'));
  await qemuImg('convert', '-O', 'raw', path('x/app-disk2.qcow2'), path('ref2.raw'));
  ref1 = await sha256File(path('ref1.raw'));
  ref2 = await sha256File(path('ref2.raw'));
}, 120_000);
afterAll(async () => cleanup());

describe('OVA', () => {
  it('converts the first disk by default, equal to qemu-img on the extracted disk; the manifest is verified', async () => {
    const got = await fileSha256(path('app.ova'));
    expect(got.format).toBe('vmdk');
    expect(got.sha256).toBe(ref1);
    const source = await FileSource.open(path('app.ova'));
    const image = await openImage(source, { metadataOnly: true });
    const info = await imageInfo(image, source);
    expect(info.archive).toMatchObject({ kind: 'ova', disk: 1, manifest: 'verified', members: ['app-disk1.vmdk'] });
    expect(info.archive?.disks?.map((d) => [d.index, d['disk-id'], d.file, d.size])).toEqual([
      [1, 'vmdisk1', 'app-disk1.vmdk', disk1.length],
      [2, 'vmdisk2', 'app-disk2.qcow2', disk2.length],
    ]);
    expect((info['format-specific']?.data as { 'create-type': string })['create-type']).toBe('streamOptimized');
    await image.close();
    await source.close();
  }, 60_000);

  it('a reader over an archive that fetches ahead announces the member reads to it, inside the member; gzip staging beside it too', async () => {
    /** The OVA in memory, recording what the reader announces (as a URL's range source would fetch ahead). */
    class Announced extends BufferSource {
      readonly announced: Array<[number, number]> = [];
      willRead(start: number, end: number): void {
        this.announced.push([start, end]);
      }
    }
    const bytes = await readFile(path('app.ova'));
    const start = bytes.indexOf(disk2.subarray(0, 512));
    expect(start).toBeGreaterThan(0);
    const ova = new Announced(bytes, 'app.ova');
    expect((await imageSha256(ova, { disk: '2' })).sha256).toBe(ref2);
    expect(ova.announced.length).toBeGreaterThan(0);
    for (const [from, to] of ova.announced) {
      expect(from).toBeGreaterThanOrEqual(start);
      expect(to).toBeLessThanOrEqual(start + disk2.length);
    }
    // A gzip'd member is staged into scratch beside the archive (the joined space); the reader reads it from there.
    const scratchDir = path('announce-scratch');
    await mkdir(scratchDir);
    await run('sh', ['-c', `gzip -c "${path('app-disk2.qcow2')}" > "${path('announce.gz')}"`]);
    const gz = await readFile(path('announce.gz'));
    const gzipped = new Announced(
      makeTar([
        { name: 'app.ovf', data: Buffer.from(ovf([{ id: 'vmdisk2', href: 'app-disk2.qcow2', size: gz.length, extra: ' ovf:compression="gzip"' }])) },
        { name: 'app-disk2.qcow2', data: gz },
      ]),
      'gz.ova',
    );
    expect((await imageSha256(gzipped, { scratchDir })).sha256).toBe(ref2);
    expect(gzipped.announced.every(([from, to]) => from >= 0 && to <= gzipped.size)).toBe(true);
    expect(await readdir(scratchDir)).toEqual([]);
  }, 60_000);

  it('disk chooses by index, diskId or file name; an unknown choice is INVALID_ARGUMENT listing the disks', async () => {
    for (const disk of ['2', 'vmdisk2', 'app-disk2.qcow2']) {
      const got = await fileSha256(path('app.ova'), { disk });
      expect(got.format, disk).toBe('qcow2');
      expect(got.sha256, disk).toBe(ref2);
    }
    expect((await fileSha256(path('app.ova'), { disk: '1' })).sha256).toBe(ref1);
    const bytes = await readFile(path('app.ova'));
    const r = await outcomeOf(bytes, { disk: '3' });
    expect(r.code).toBe('INVALID_ARGUMENT');
    expect(r.message).toMatch(/1 \(vmdisk1, app-disk1\.vmdk\), 2 \(vmdisk2, app-disk2\.qcow2\)/);
    // A disk choice on a plain image is an error, not ignored.
    expect((await outcomeOf(disk2, { disk: '1' })).code).toBe('INVALID_ARGUMENT');
  }, 60_000);

  it('GNU and pax archives with the OVF in a folder read the same', async () => {
    await run('mkdir', ['-p', path('pkg')]);
    await run('cp', [path('app.ovf'), path('app-disk1.vmdk'), path('app-disk2.qcow2'), path('pkg')]);
    for (const format of ['gnu', 'pax']) {
      await run('tar', ['-cf', path(`pkg-${format}.ova`), `--format=${format}`, '-C', dir, 'pkg/app.ovf', 'pkg/app-disk1.vmdk', 'pkg/app-disk2.qcow2']);
      expect((await fileSha256(path(`pkg-${format}.ova`), { disk: '2' })).sha256, format).toBe(ref2);
    }
  }, 60_000);

  it('a manifest digest that differs, or a manifest naming a missing file, is IMAGE_CORRUPT', async () => {
    const ovfBytes = await readFile(path('app.ovf'));
    const mf = await readFile(path('app.mf'), 'utf8');
    const tampered = Buffer.from(disk1);
    tampered[tampered.length - 2000] = (tampered[tampered.length - 2000] as number) ^ 1;
    const bad = await outcomeOf(makeTar([{ name: 'app.ovf', data: ovfBytes }, { name: 'app.mf', data: Buffer.from(mf) }, { name: 'app-disk1.vmdk', data: tampered }, { name: 'app-disk2.qcow2', data: disk2 }]));
    expect(bad.code).toBe('IMAGE_CORRUPT');
    expect(bad.message).toMatch(/SHA1 digest .* differs from the manifest/);
    const extra = await outcomeOf(makeTar([{ name: 'app.ovf', data: ovfBytes }, { name: 'app.mf', data: Buffer.from(`${mf}SHA256(gone.vmdk)= ${'0'.repeat(64)}\n`) }, { name: 'app-disk1.vmdk', data: disk1 }, { name: 'app-disk2.qcow2', data: disk2 }]));
    expect(extra.code).toBe('UNSAFE_IMAGE');
    expect(extra.message).toMatch(/gone\.vmdk.*not a member/);
    // Without a manifest the OVA still converts, and says the manifest is absent.
    const plain = new BufferSource(makeTar([{ name: 'app.ovf', data: ovfBytes }, { name: 'app-disk1.vmdk', data: disk1 }, { name: 'app-disk2.qcow2', data: disk2 }]), 'plain.ova');
    expect((await imageSha256(plain)).sha256).toBe(ref1);
    const image = await openImage(plain, { metadataOnly: true });
    expect(image.archive?.manifest).toBe('absent');
  }, 60_000);

  it('hostile OVF descriptors are refused with typed errors', async () => {
    const withOvf = (text: string): Buffer => makeTar([{ name: 'app.ovf', data: Buffer.from(text) }, { name: 'app-disk1.vmdk', data: disk1 }, { name: 'app-disk2.qcow2', data: disk2 }]);
    const one = [{ id: 'd1', href: 'app-disk1.vmdk' }];
    const cases: Array<[string, string, string, RegExp]> = [
      ['DTD with an external entity', ovf(one, '<?xml version="1.0"?><!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>').replace('more', '&x;'), 'UNSAFE_IMAGE', /DOCTYPE or ENTITY/],
      ['an undeclared entity', ovf(one).replace('&amp; more', '&x;'), 'UNSAFE_IMAGE', /predefined entities/],
      ['a file named twice', ovf([{ id: 'd1', href: 'app-disk1.vmdk' }, { id: 'd2', href: './app-disk1.vmdk' }]), 'UNSAFE_IMAGE', /names the file "app-disk1\.vmdk" twice/],
      ['an absolute href', ovf([{ id: 'd1', href: '/etc/passwd' }]), 'UNSAFE_IMAGE', /absolute path/],
      ['an href with ..', ovf([{ id: 'd1', href: '../app-disk1.vmdk' }]), 'UNSAFE_IMAGE', /climbs/],
      ['a URL href', ovf([{ id: 'd1', href: 'http://127.0.0.1/disk.vmdk' }]), 'UNSAFE_IMAGE', /URL/],
      ['a missing member', ovf([{ id: 'd1', href: 'nothere.vmdk' }]), 'UNSAFE_IMAGE', /nothere\.vmdk.*not a member/],
      ['a size that lies', ovf([{ id: 'd1', href: 'app-disk1.vmdk', size: 12345 }]), 'IMAGE_CORRUPT', /12345 bytes/],
      ['ovf:compression="gzip" on a file that is not gzip', ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ' ovf:compression="gzip"' }]), 'IMAGE_CORRUPT', /gzip stream is truncated or corrupt/],
      ['a compression OVF does not define', ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ' ovf:compression="bzip2"' }]), 'UNSUPPORTED_FEATURE', /compression="bzip2"/],
      ['ovf:chunkSize without chunk members', ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ' ovf:chunkSize="1000"' }]), 'UNSAFE_IMAGE', /app-disk1\.vmdk\.000000000.*not a member/],
      ['no disk', ovf([]), 'IMAGE_CORRUPT', /names no disk/],
      ['unbalanced XML', ovf(one).replace('</References>', ''), 'IMAGE_CORRUPT', /closes/],
      ['not XML', 'hello', 'IMAGE_CORRUPT', /no root element/],
    ];
    for (const [what, text, code, message] of cases) {
      const r = await outcomeOf(withOvf(text));
      expect(r.code, what).toBe(code);
      expect(r.message, what).toMatch(message);
    }
    // Two descriptors: which appliance is meant is ambiguous.
    const two = await outcomeOf(makeTar([{ name: 'a.ovf', data: Buffer.from(ovf(one)) }, { name: 'b.ovf', data: Buffer.from(ovf(one)) }, { name: 'app-disk1.vmdk', data: disk1 }]));
    expect(two.code).toBe('UNSAFE_IMAGE');
    // An OVF larger than maxArchiveTextBytes is not read.
    const big = await outcomeOf(withOvf(ovf(one) + ' '.repeat(4096)), { limits: { maxArchiveTextBytes: 2048 } });
    expect(big.code).toBe('LIMIT_EXCEEDED');
  });
});

describe('OVA files stored with ovf:compression="gzip" and ovf:chunkSize', () => {
  const ovaOf = (text: string, members: Array<[string, Uint8Array]>): Buffer => makeTar([{ name: 'app.ovf', data: Buffer.from(text) }, ...members.map(([name, data]) => ({ name, data }))]);
  /** `data` cut in chunks of `size` bytes named NAME.000000000, NAME.000000001, ... (VMware ovftool's naming). */
  const chunks = (name: string, data: Uint8Array, size: number): Array<[string, Uint8Array]> => {
    const out: Array<[string, Uint8Array]> = [];
    for (let k = 0; k * size < data.length; k++) out.push([`${name}.${String(k).padStart(9, '0')}`, data.subarray(k * size, (k + 1) * size)]);
    return out;
  };

  it('gzip, chunks, and gzip then chunks convert equal to qemu-img on the disk in place; the scratch folder is emptied', async () => {
    const scratchDir = path('ova-scratch');
    await mkdir(scratchDir);
    // gzip(1), as ovftool compresses: the reference is qemu-img on the uncompressed disk.
    await run('sh', ['-c', `gzip -c "${path('app-disk2.qcow2')}" > "${path('disk2.gz')}" && gzip -c "${path('app-disk1.vmdk')}" > "${path('disk1.gz')}"`]);
    const gz2 = await readFile(path('disk2.gz'));
    const gz1 = await readFile(path('disk1.gz'));
    const gzipped = ovaOf(
      ovf([
        { id: 'vmdisk1', href: 'app-disk1.vmdk', size: gz1.length, extra: ' ovf:compression="gzip"' },
        { id: 'vmdisk2', href: 'app-disk2.qcow2', size: gz2.length, extra: ' ovf:compression="gzip"' },
      ]),
      [
        ['app-disk1.vmdk', gz1],
        ['app-disk2.qcow2', gz2],
      ],
    );
    await writeFile(path('gzip.ova'), gzipped);
    expect((await fileSha256(path('gzip.ova'), { scratchDir })).sha256).toBe(ref1);
    expect((await fileSha256(path('gzip.ova'), { scratchDir, disk: '2' })).sha256).toBe(ref2);
    expect(await readdir(scratchDir)).toEqual([]);

    // Chunks of 10 MiB made by split(1), read in place (no scratch copy), with a manifest of the chunks.
    await run('sh', ['-c', `cd "${dir}" && cp app-disk2.qcow2 c2.qcow2 && split -b 10M -d -a 9 c2.qcow2 app-disk2.qcow2.`]);
    const parts = (await readdir(dir)).filter((n) => /^app-disk2\.qcow2\.[0-9]{9}$/.test(n)).sort();
    expect(parts.length).toBeGreaterThan(2);
    const chunkBytes = await Promise.all(parts.map((n) => readFile(path(n))));
    const chunkOvf = ovf([{ id: 'vmdisk1', href: 'app-disk2.qcow2', size: disk2.length, extra: ` ovf:chunkSize="${10 * MiB}"` }]);
    const sha1 = (b: Uint8Array): string => createHash('sha1').update(b).digest('hex');
    const mf = [`SHA1(app.ovf)= ${sha1(Buffer.from(chunkOvf))}`, ...parts.map((n, i) => `SHA1(${n})= ${sha1(chunkBytes[i] as Buffer)}`)].join('\n');
    const chunked = makeTar([{ name: 'app.ovf', data: Buffer.from(chunkOvf) }, { name: 'app.mf', data: Buffer.from(mf) }, ...parts.map((n, i) => ({ name: n, data: chunkBytes[i] as Buffer }))]);
    await writeFile(path('chunked.ova'), chunked);
    expect((await fileSha256(path('chunked.ova'), { scratchDir })).sha256).toBe(ref2);
    const source = await FileSource.open(path('chunked.ova'));
    const image = await openImage(source, { metadataOnly: true });
    const info = await imageInfo(image, source);
    expect(info.archive).toMatchObject({ kind: 'ova', manifest: 'verified', members: ['app-disk2.qcow2'] });
    expect(info.archive?.disks?.[0]).toMatchObject({ file: 'app-disk2.qcow2', size: disk2.length });
    expect(info['virtual-size']).toBe(32 * MiB);
    await image.close();
    await source.close();

    // gzip first, then chunks of 1 MiB, as ovftool does with both.
    const both = ovaOf(ovf([{ id: 'vmdisk1', href: 'app-disk1.vmdk', size: gz1.length, extra: ` ovf:compression="gzip" ovf:chunkSize="${MiB}"` }]), chunks('app-disk1.vmdk', gz1, MiB));
    expect(chunks('app-disk1.vmdk', gz1, MiB).length).toBeGreaterThan(1);
    expect((await imageSha256(new BufferSource(both, 'both.ova'), { scratchDir })).sha256).toBe(ref1);
    expect(await readdir(scratchDir)).toEqual([]);
  }, 120_000);

  it('missing or mis-sized chunks, sizes that lie, cut gzip streams and gzip bombs are typed errors; scratch emptied', async () => {
    const scratchDir = path('ova-scratch2');
    await mkdir(scratchDir);
    const gz1 = await readFile(path('disk1.gz'));
    const cs = 256 * 1024;
    const all = chunks('app-disk1.vmdk', gz1, cs);
    const chunkOvf = (size?: number): string => ovf([{ id: 'd1', href: 'app-disk1.vmdk', ...(size !== undefined ? { size } : {}), extra: ` ovf:compression="gzip" ovf:chunkSize="${cs}"` }]);
    expect((await outcomeOf(ovaOf(chunkOvf(gz1.length), all), { scratchDir })).code).toBe('ok');
    const bomb = gzipSync(Buffer.alloc(64 * MiB));
    const cases: Array<[string, Buffer, string, RegExp, Record<string, unknown>?]> = [
      ['a chunk also named as a file', ovaOf(ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ` ovf:compression="gzip" ovf:chunkSize="${cs}"` }, { id: 'd2', href: 'app-disk1.vmdk.000000001' }]), all), 'UNSAFE_IMAGE', /names the file "app-disk1\.vmdk\.000000001" twice/],
      ['a missing middle chunk', ovaOf(chunkOvf(), [...all.slice(0, 1), ...all.slice(2)]), 'IMAGE_CORRUPT', /follows a missing chunk 1/],
      ['a chunk shorter than chunkSize', ovaOf(chunkOvf(), [all[0] as [string, Uint8Array], [all[1]?.[0] as string, (all[1]?.[1] as Uint8Array).subarray(1)], ...all.slice(2)]), 'IMAGE_CORRUPT', /chunk "app-disk1\.vmdk\.000000001" has/],
      ['an ovf:size that is not the chunks\' sum', ovaOf(chunkOvf(gz1.length + 1), all), 'IMAGE_CORRUPT', /in \d+ chunks/],
      ['a cut gzip stream', ovaOf(ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ' ovf:compression="gzip"' }]), [['app-disk1.vmdk', gz1.subarray(0, gz1.length - 1000)]]), 'IMAGE_CORRUPT', /gzip stream is truncated or corrupt/],
      ['a gzip bomb past maxVirtualSize', ovaOf(ovf([{ id: 'd1', href: 'disk.raw', extra: ' ovf:compression="gzip"' }]), [['disk.raw', bomb]]), 'LIMIT_EXCEEDED', /maxVirtualSize/, { limits: { maxVirtualSize: 16 * MiB } }],
    ];
    for (const [what, bytes, code, message, options] of cases) {
      const r = await outcomeOf(bytes, { scratchDir, ...options });
      expect(r.code, what).toBe(code);
      expect(r.message, what).toMatch(message);
      expect(await readdir(scratchDir), what).toEqual([]);
    }
  }, 120_000);
});
