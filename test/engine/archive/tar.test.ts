/**
 * Hostile tar archives: each refusal is a typed error, never a crash, a hang
 * or a name looked up outside the archive. Archives are written by hand here
 * (tarHeader follows POSIX's layout independently of the parser) or by GNU tar.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, symlink, link, writeFile } from 'node:fs/promises';
import { makeTempDir, qemuImg, run } from '../../helpers/qemu.js';
import { BufferSource, openImage } from '../../../src/engine/index.js';
import { indexTar, isTar } from '../../../src/engine/archive/tar.js';
import { withLimits } from '../../../src/engine/limits.js';
import { makeTar, outcomeOf, tarHeader } from './helpers.js';

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;
let qcow: Buffer;
const path = (name: string): string => join(dir, name);

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-tar-'));
  await qemuImg('create', '-q', '-f', 'qcow2', path('d.qcow2'), '4M');
  qcow = await readFile(path('d.qcow2'));
});
afterAll(async () => cleanup());

describe('tar members', () => {
  it('a one-disk tar converts; ./ and // in names normalize; directories are skipped', async () => {
    expect((await outcomeOf(makeTar([{ name: 'vm/', type: '5' }, { name: './vm//d.qcow2', data: qcow }]))).code).toBe('ok');
    const image = await openImage(new BufferSource(makeTar([{ name: './vm//d.qcow2', data: qcow }]), 't.tar'), { metadataOnly: true });
    expect(image.archive?.members).toEqual(['vm/d.qcow2']);
    expect(image.virtualSize).toBe(4 * MiB);
    // ustar's prefix field joins the name.
    const idx = await indexTar(new BufferSource(makeTar([{ name: 'd.qcow2', prefix: 'deep/dir', data: qcow }])), withLimits());
    expect(idx.members.map((m) => m.name)).toEqual(['deep/dir/d.qcow2']);
  });

  it('refuses absolute names, .., links, devices, duplicates, lying sizes, bad checksums and GNU sparse members', async () => {
    const cases: Array<[string, Buffer, string, RegExp]> = [
      ['absolute name', makeTar([{ name: '/etc/d.qcow2', data: qcow }]), 'UNSAFE_IMAGE', /absolute path/],
      ['.. in a name', makeTar([{ name: 'vm/../../d.qcow2', data: qcow }]), 'UNSAFE_IMAGE', /climbs/],
      ['backslash', makeTar([{ name: '..\\d.qcow2', data: qcow }]), 'UNSAFE_IMAGE', /backslash/],
      ['symlink member', makeTar([{ name: 'd.qcow2', type: '2', linkname: '/etc/passwd' }]), 'UNSAFE_IMAGE', /symbolic link.*\/etc\/passwd/],
      ['hard link member', makeTar([{ name: 'a.qcow2', data: qcow }, { name: 'b.qcow2', type: '1', linkname: 'a.qcow2' }]), 'UNSAFE_IMAGE', /hard link/],
      ['character device', makeTar([{ name: 'zero', type: '3' }]), 'UNSAFE_IMAGE', /device or fifo/],
      ['fifo', makeTar([{ name: 'p', type: '6' }]), 'UNSAFE_IMAGE', /device or fifo/],
      ['duplicate names', makeTar([{ name: 'd.qcow2', data: qcow }, { name: './d.qcow2', data: qcow }]), 'UNSAFE_IMAGE', /second member named "d\.qcow2"/],
      ['size past the end', makeTar([{ name: 'd.qcow2', data: qcow, size: qcow.length + 10 * MiB }]), 'IMAGE_CORRUPT', /runs past the end of the archive/],
      ['cut inside a member', makeTar([{ name: 'd.qcow2', data: qcow }], { end: false }).subarray(0, qcow.length - 100), 'IMAGE_CORRUPT', /runs past the end of the archive/],
      ['bad checksum', makeTar([{ name: 'd.qcow2', data: qcow }, { name: 'e.qcow2', data: qcow, badChecksum: true }]), 'IMAGE_CORRUPT', /bad header checksum/],
      ['GNU sparse', makeTar([{ name: 'd.qcow2', type: 'S', data: qcow }]), 'UNSUPPORTED_FEATURE', /sparse/],
      ['truncated header', Buffer.concat([makeTar([{ name: 'd.qcow2', data: qcow }], { end: false }), Buffer.alloc(300, 1)]), 'IMAGE_CORRUPT', /truncated/],
      ['empty archive', Buffer.concat([tarHeader({ name: 'dir/', type: '5' }, 0), Buffer.alloc(1024)]), 'IMAGE_CORRUPT', /holds no file/],
    ];
    for (const [what, bytes, code, message] of cases) {
      const r = await outcomeOf(bytes);
      expect(r.code, what).toBe(code);
      expect(r.message, what).toMatch(message);
    }
  });

  it('pax and GNU long names are bounded; too many members is LIMIT_EXCEEDED', async () => {
    const many = makeTar(Array.from({ length: 40 }, (_, i) => ({ name: `f${i}`, data: Buffer.alloc(1) })));
    const r = await outcomeOf(many, { limits: { maxArchiveMembers: 32 } });
    expect(r.code).toBe('LIMIT_EXCEEDED');
    expect(r.message).toMatch(/maxArchiveMembers/);
    const longName = makeTar([{ name: '././@LongLink', type: 'L', data: Buffer.from('x'.repeat(5000)) }, { name: 'd.qcow2', data: qcow }]);
    expect((await outcomeOf(longName, { limits: { maxArchiveTextBytes: 4096 } })).code).toBe('LIMIT_EXCEEDED');
    const badPax = makeTar([{ name: 'PaxHeader', type: 'x', data: Buffer.from('99 path=x\n') }, { name: 'd.qcow2', data: qcow }]);
    expect((await outcomeOf(badPax)).code).toBe('IMAGE_CORRUPT');
    // A pax path that climbs is refused like a header name that does.
    const paxClimb = makeTar([{ name: 'PaxHeader', type: 'x', data: Buffer.from('19 path=../d.qcow2\n') }, { name: 'd.qcow2', data: qcow }]);
    const pc = await outcomeOf(paxClimb);
    expect(pc.code).toBe('UNSAFE_IMAGE');
  });

  it('archives GNU tar makes with links, absolute names and appended duplicates are refused', async () => {
    await writeFile(path('disk.qcow2'), qcow);
    await symlink('disk.qcow2', path('sym.qcow2'));
    await link(path('disk.qcow2'), path('hard.qcow2'));
    await run('tar', ['-cf', path('sym.tar'), '-C', dir, 'sym.qcow2']);
    await run('tar', ['-cf', path('hard.tar'), '-C', dir, 'disk.qcow2', 'hard.qcow2']);
    await run('tar', ['-cPf', path('abs.tar'), path('disk.qcow2')]);
    await run('tar', ['-cf', path('dup.tar'), '-C', dir, 'disk.qcow2']);
    await run('tar', ['-rf', path('dup.tar'), '-C', dir, 'disk.qcow2']);
    for (const [name, pattern] of [['sym.tar', /symbolic link/], ['hard.tar', /hard link/], ['abs.tar', /absolute path/], ['dup.tar', /second member/]] as const) {
      const r = await outcomeOf(await readFile(path(name)));
      expect(r.code, name).toBe('UNSAFE_IMAGE');
      expect(r.message, name).toMatch(pattern);
    }
    const gnuLong = `${'n'.repeat(150)}.qcow2`;
    await writeFile(path(gnuLong), qcow);
    await run('tar', ['-cf', path('long.tar'), '--format=gnu', '-C', dir, gnuLong]);
    const image = await openImage(new BufferSource(await readFile(path('long.tar'))), { metadataOnly: true });
    expect(image.archive?.members).toEqual([gnuLong]);
  });

  it('isTar needs the ustar magic and a valid checksum; -f raw reads a tar as bytes', async () => {
    const t = makeTar([{ name: 'd.qcow2', data: qcow }]);
    expect(isTar(t)).toBe(true);
    const broken = Buffer.from(t);
    broken[0] = (broken[0] as number) ^ 1;
    expect(isTar(broken)).toBe(false);
    expect((await openImage(new BufferSource(t), { format: 'raw' })).format).toBe('raw');
    // The bytes say tar and qcow2 at once: refused as ambiguous.
    const both = makeTar([{ name: 'QFI\xfbx', data: qcow }]);
    expect((await outcomeOf(both)).code).toBe('UNSAFE_IMAGE');
  });
});
