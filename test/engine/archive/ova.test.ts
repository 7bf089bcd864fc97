/**
 * OVA appliances: a tar with an OVF descriptor, an optional manifest and the
 * disks. The reference is qemu-img converting the disk extracted with tar.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
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
      ['a gzip-compressed file', ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ' ovf:compression="gzip"' }]), 'UNSUPPORTED_FEATURE', /compression/],
      ['a chunked file', ovf([{ id: 'd1', href: 'app-disk1.vmdk', extra: ' ovf:chunkSize="1000"' }]), 'UNSUPPORTED_FEATURE', /chunk/],
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
