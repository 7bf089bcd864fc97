/**
 * Differencing VHDs (disk type 4) in a tar or zip bundle with their parent.
 *
 * qemu-img cannot make one (`qemu-img create -f vpc -b` is not supported), and
 * qemu 7.2 reads one as a plain dynamic disk without ever opening its parent (its
 * output lacks the parent's data: shown below). So the child is built here from
 * the specification ("Virtual Hard Disk Image Format Specification": footer disk
 * type 4, the dynamic header's parent unique id, time stamp, Unicode name and
 * parent locator entries, the per-block sector bitmaps, most significant bit
 * first) over a dynamic VHD qemu-img made and qemu-io wrote, and the reference
 * is qemu-img flattening the same disk as a chain it does read: a qcow2 overlay
 * over the same parent (`-b parent.vhd -F vpc`) holding exactly the sectors the
 * child holds, written by qemu-io.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile, execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, qemuImg, qemuIo, run, sha256File } from '../../helpers/qemu.js';
import { CLI, runDiskconv } from '../../helpers/cli.js';
import { FileSource, imageInfo, openImage } from '../../../src/engine/index.js';
import { fileSha256, makeTar, outcomeOf } from './helpers.js';

const MiB = 2 ** 20;
const SECTOR = 512;
const BLOCK = 2 * MiB; // qemu-img's VHD block size
const SPB = BLOCK / SECTOR;
let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);
const strace = ((): boolean => {
  try {
    execFileSync('strace', ['-V'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

/** A write made with qemu-io: pattern byte, offset, length (bytes, sector multiples). */
type Write = [pattern: number, offset: number, length: number];
interface Locator {
  code: 'W2ru' | 'W2ku' | 'MacX' | 'Wi2r';
  text: string;
}

/** One's complement of the byte sum over [at, at + length), the checksum field taken as zero. */
function fixChecksum(b: Buffer, at: number, length: number, field: number): void {
  b.writeUInt32BE(0, at + field);
  let sum = 0;
  for (let i = at; i < at + length; i++) sum += b[i] as number;
  b.writeUInt32BE(~sum >>> 0, at + field);
}

/**
 * A differencing VHD from a dynamic one qemu-img made: footer type 4, the dynamic
 * header naming `parent` (its unique id and time stamp from the parent's footer),
 * locator data placed where the footer was (the footer moved after it), and the
 * sector bitmap bits of `clear` (sector runs) cleared so those sectors are the parent's.
 */
async function makeDifferencing(dynamicFile: string, parentFile: string, out: string, opts: { locators: Locator[]; unicodeName?: string; clear?: Array<[number, number]>; parentId?: Buffer }): Promise<string> {
  const b = await readFile(dynamicFile);
  const p = await readFile(parentFile);
  const parentFooter = p.subarray(p.length - 512);
  const footer = Buffer.from(b.subarray(b.length - 512));
  const dynAt = Number(b.readBigUInt64BE(16));
  const blobs: Buffer[] = [];
  let at = b.length - 512;
  opts.locators.forEach((l, i) => {
    const data = Buffer.from(l.text, l.code === 'MacX' ? 'utf8' : l.code === 'Wi2r' ? 'latin1' : 'utf16le');
    const space = Math.ceil(data.length / SECTOR) * SECTOR;
    const e = dynAt + 576 + 24 * i;
    b.write(l.code, e, 'latin1');
    b.writeUInt32BE(space, e + 4);
    b.writeUInt32BE(data.length, e + 8);
    b.writeBigUInt64BE(BigInt(at), e + 16);
    blobs.push(Buffer.concat([data, Buffer.alloc(space - data.length)]));
    at += space;
  });
  (opts.parentId ?? parentFooter.subarray(68, 84)).copy(b, dynAt + 40);
  b.writeUInt32BE(parentFooter.readUInt32BE(24), dynAt + 56);
  const name = Buffer.from(opts.unicodeName ?? '', 'utf16le');
  name.swap16();
  b.fill(0, dynAt + 64, dynAt + 576);
  name.copy(b, dynAt + 64);
  fixChecksum(b, dynAt, 1024, 36);
  const batAt = Number(b.readBigUInt64BE(dynAt + 16));
  for (const [first, count] of opts.clear ?? []) {
    for (let s = first; s < first + count; s++) {
      const entry = b.readUInt32BE(batAt + 4 * Math.floor(s / SPB));
      if (entry === 0xffffffff) throw new Error(`sector ${s} is in an unallocated block`);
      const byte = entry * SECTOR + Math.floor((s % SPB) / 8);
      b[byte] = (b[byte] as number) & ~(0x80 >> (s % 8));
    }
  }
  const out2 = Buffer.concat([b.subarray(0, b.length - 512), ...blobs, footer]);
  for (const f of [0, out2.length - 512]) {
    out2.writeUInt32BE(4, f + 60);
    fixChecksum(out2, f, 512, 64);
  }
  await writeFile(out, out2);
  return out;
}

/** A dynamic VHD of `size` written by qemu-io. */
async function dynamicVhd(name: string, size: string, writes: Write[], subformat = 'dynamic'): Promise<string> {
  await qemuImg('create', '-q', '-f', 'vpc', '-o', `subformat=${subformat}`, path(name), size);
  if (writes.length > 0) await qemuIo('-f', 'vpc', ...writes.flatMap(([p, o, l]) => ['-c', `write -P 0x${p.toString(16)} ${o} ${l}`]), path(name));
  return path(name);
}

/** Sector runs [start, end) the child holds: the blocks its writes allocated, minus the cleared sectors. */
function presentRuns(writes: Write[], clear: Array<[number, number]>, virtualSize: number): Array<[number, number]> {
  const sectors = virtualSize / SECTOR;
  const present = new Uint8Array(sectors);
  for (const [, o, l] of writes) {
    for (let blk = Math.floor(o / BLOCK); blk * BLOCK < o + l; blk++) present.fill(1, blk * SPB, Math.min(sectors, (blk + 1) * SPB));
  }
  for (const [s, c] of clear) present.fill(0, s, s + c);
  const runs: Array<[number, number]> = [];
  for (let s = 0; s < sectors; ) {
    if (!present[s]) {
      s++;
      continue;
    }
    let e = s;
    while (e < sectors && present[e]) e++;
    runs.push([s, e]);
    s = e;
  }
  return runs;
}

/**
 * The reference: a qcow2 overlay over `backing` (format `fmt`) holding exactly the
 * child's sectors (zeros where the child's allocated blocks were never written),
 * made by qemu-img and qemu-io. Returns its path.
 */
async function overlay(name: string, backing: string, fmt: string, size: number, writes: Write[], clear: Array<[number, number]>): Promise<string> {
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', backing, '-F', fmt, path(name), String(size));
  const cmds: string[] = [];
  const runs = presentRuns(writes, clear, size);
  for (const [s, e] of runs) cmds.push('-c', `write -z ${s * SECTOR} ${(e - s) * SECTOR}`);
  for (const [p, o, l] of writes) {
    for (const [s, e] of runs) {
      const a = Math.max(o, s * SECTOR);
      const z = Math.min(o + l, e * SECTOR);
      if (z > a) cmds.push('-c', `write -P 0x${p.toString(16)} ${a} ${z - a}`);
    }
  }
  if (cmds.length > 0) await qemuIo('-f', 'qcow2', ...cmds, path(name));
  return path(name);
}

async function qemuSha(image: string, ...flags: string[]): Promise<string> {
  const out = `${image}.${Math.random().toString(36).slice(2)}.ref.raw`;
  await qemuImg('convert', ...flags, '-O', 'raw', image, out);
  return sha256File(out);
}
const tar = async (name: string, files: string[]): Promise<string> => {
  await run('tar', ['-cf', path(name), '-C', dir, ...files]);
  return path(name);
};
/** zip (stored, or deflated: Info-ZIP's default) NAME FILES... in the fixture folder. */
const zip = async (name: string, files: string[], deflate = false): Promise<string> => {
  await run('sh', ['-c', `cd "${dir}" && zip -q ${deflate ? '' : '-0'} ${name} ${files.join(' ')}`]);
  return path(name);
};

const SIZE = 8390656; // qemu-img's "8M" VHD, rounded to its CHS geometry
const PARENT_WRITES: Write[] = [
  [0x11, 0, 5 * MiB],
  [0x12, 7 * MiB, MiB],
];
const CHILD_WRITES: Write[] = [
  [0x21, 0, 2 * MiB], // block 0 whole
  [0x22, 2 * MiB + 512 * 1024, 64 * 1024], // block 1: the rest of it the child's zeros
  [0x23, 6 * MiB, 1024], // block 3: over parent 0x12 data? (7M..8M is in block 3 too)
];
// Sectors the child leaves to its parent inside its allocated blocks.
const CLEAR: Array<[number, number]> = [
  [0, 8], // the first 4 KiB of block 0: the parent's 0x11
  [100, 1], // one odd sector
  [4095, 1], // the last sector of block 0
  [SPB + 1024, 8], // block 1, inside the parent's data, not under the child's write
  [SPB + 1100, 200], // block 1, across the child's write
  [3 * SPB + 2048, 2048], // block 3, the second half: the parent's 0x12 data
];
let ref = '';

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vhd-diff-'));
  const parent = await dynamicVhd('parent.vhd', '8M', PARENT_WRITES);
  const dyn = await dynamicVhd('child.dyn.vhd', '8M', CHILD_WRITES);
  await makeDifferencing(dyn, parent, path('child.vhd'), {
    locators: [
      { code: 'W2ru', text: '.\\parent.vhd' },
      { code: 'W2ku', text: 'C:\\Hyper-V\\disks\\parent.vhd' },
    ],
    unicodeName: 'parent.vhd',
    clear: CLEAR,
  });
  ref = await qemuSha(await overlay('ref.qcow2', 'parent.vhd', 'vpc', SIZE, CHILD_WRITES, CLEAR));
}, 120_000);
afterAll(async () => cleanup());

describe('differencing VHD with its parent in a bundle', () => {
  it('flattens as qemu-img flattens the same sectors over the same parent (tar, zip stored and deflated, either order)', async () => {
    for (const bundle of [
      await tar('pair.tar', ['child.vhd', 'parent.vhd']),
      await tar('pair2.tar', ['parent.vhd', 'child.vhd']),
      await zip('pair.zip', ['child.vhd', 'parent.vhd']),
      await zip('pair-deflated.zip', ['parent.vhd', 'child.vhd'], true),
    ]) {
      const got = await fileSha256(bundle);
      expect(got.format, bundle).toBe('vpc');
      expect(got.virtualSize).toBe(SIZE);
      expect(got.sha256, bundle).toBe(ref);
    }
    // qemu-img on the child alone reads it without the parent: not the disk.
    expect(await qemuSha(path('child.vhd'))).not.toBe(ref);
  }, 60_000);

  it('the CLI converts the bundle to the same bytes; info lists both members', async () => {
    const out = path('cli.raw');
    const r = await runDiskconv(['convert', '-O', 'raw', path('pair.tar'), out]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await sha256File(out)).toBe(ref);
    const source = await FileSource.open(path('pair.tar'));
    try {
      const image = await openImage(source, { metadataOnly: true });
      const info = await imageInfo(image, source);
      expect(info.archive?.members).toEqual(['child.vhd', 'parent.vhd']);
      expect(info.format).toBe('vpc');
      await image.close();
    } finally {
      await source.close();
    }
  }, 60_000);

  it('a fixed parent, a parent smaller than the child, and a chain of two differencing disks', async () => {
    const fixed = await dynamicVhd('fixed-parent.vhd', '8M', PARENT_WRITES, 'fixed');
    await makeDifferencing(path('child.dyn.vhd'), fixed, path('over-fixed.vhd'), { locators: [{ code: 'W2ru', text: '.\\fixed-parent.vhd' }], clear: CLEAR });
    const fixedRef = await qemuSha(await overlay('ref-fixed.qcow2', 'fixed-parent.vhd', 'vpc', SIZE, CHILD_WRITES, CLEAR));
    expect((await fileSha256(await tar('fixed.tar', ['over-fixed.vhd', 'fixed-parent.vhd']))).sha256).toBe(fixedRef);

    // A 4 MiB parent under an 8 MiB child: past the parent's end the child's unallocated sectors read as zeros.
    const small = await dynamicVhd('small.vhd', '4M', [[0x31, 0, 4 * MiB]]);
    await makeDifferencing(path('child.dyn.vhd'), small, path('over-small.vhd'), { locators: [{ code: 'W2ru', text: 'small.vhd' }], clear: CLEAR });
    const smallSize = (await fileSha256(small, { format: 'vpc' })).virtualSize;
    expect(smallSize).toBeLessThan(SIZE);
    const smallRef = await qemuSha(await overlay('ref-small.qcow2', 'small.vhd', 'vpc', SIZE, CHILD_WRITES, CLEAR));
    expect((await fileSha256(await tar('small.tar', ['over-small.vhd', 'small.vhd']))).sha256).toBe(smallRef);

    // grand <- child.vhd (as above) <- top.vhd: the top's cleared sectors show child.vhd's, whose own show parent.vhd's.
    const topWrites: Write[] = [[0x41, 0, 2 * MiB], [0x42, 4 * MiB, 2 * MiB]];
    const topClear: Array<[number, number]> = [[0, 16], [2 * SPB + 10, 3000]];
    await makeDifferencing(await dynamicVhd('top.dyn.vhd', '8M', topWrites), path('child.vhd'), path('top.vhd'), {
      locators: [{ code: 'W2ru', text: '.\\child.vhd' }],
      unicodeName: 'child.vhd',
      clear: topClear,
    });
    const topRef = await qemuSha(await overlay('ref-top.qcow2', 'ref.qcow2', 'qcow2', SIZE, topWrites, topClear));
    const chain = await fileSha256(await tar('chain.tar', ['parent.vhd', 'top.vhd', 'child.vhd']));
    expect(chain.sha256).toBe(topRef);
    // Two levels of differencing counted by the chain depth limit.
    const deep = await outcomeOf(await readFile(path('chain.tar')), { limits: { maxChainDepth: 2 } });
    expect(deep.code).toBe('LIMIT_EXCEEDED');
  }, 120_000);

  it('locators: an absolute W2ku path, a MacX URL, the Unicode name alone, each found only by its name in the child\'s folder', async () => {
    const cases: Array<[string, Locator[], string | undefined]> = [
      ['w2ku', [{ code: 'W2ku', text: 'D:\\Elsewhere\\VMs\\parent.vhd' }], undefined],
      ['macx', [{ code: 'MacX', text: 'file://localhost/Users/me/VMs/parent.vhd' }], undefined],
      ['unicode', [], 'parent.vhd'],
      ['wi2r', [{ code: 'Wi2r', text: '.\\parent.vhd' }], undefined],
    ];
    await run('mkdir', ['-p', path('vm')]);
    await run('cp', [path('parent.vhd'), path('vm/parent.vhd')]);
    for (const [what, locators, unicodeName] of cases) {
      await makeDifferencing(path('child.dyn.vhd'), path('parent.vhd'), path(`vm/${what}.vhd`), { locators, ...(unicodeName ? { unicodeName } : {}), clear: CLEAR });
      const got = await fileSha256(await tar(`${what}.tar`, [`vm/${what}.vhd`, 'vm/parent.vhd']));
      expect(got.sha256, what).toBe(ref);
    }
    // A relative locator into a subfolder of the child's.
    await run('mkdir', ['-p', path('vm/base')]);
    await run('cp', [path('parent.vhd'), path('vm/base/parent.vhd')]);
    await makeDifferencing(path('child.dyn.vhd'), path('parent.vhd'), path('vm/sub.vhd'), { locators: [{ code: 'W2ru', text: '.\\base\\parent.vhd' }], clear: CLEAR });
    expect((await fileSha256(await tar('sub.tar', ['vm/sub.vhd', 'vm/base/parent.vhd']))).sha256).toBe(ref);
  }, 120_000);

  it('refusals: alone, a missing parent, a parent of another disk, `..`, loops, a locator outside the file', async () => {
    const alone = await outcomeOf(await readFile(path('child.vhd')));
    expect(alone.code).toBe('UNSAFE_IMAGE');
    expect(alone.message).toMatch(/differencing VHD.*naming its parent by W2ru locator "\.\\parent\.vhd".*W2ku locator "C:\\Hyper-V\\disks\\parent\.vhd".*bundle/);

    const missing = await outcomeOf(makeTar([{ name: 'child.vhd', data: await readFile(path('child.vhd')) }]));
    expect(missing.code).toBe('UNSAFE_IMAGE');
    expect(missing.message).toMatch(/parent .*not a member of the archive.*"parent\.vhd"/);

    // The parent's unique id differs from the one the child names.
    await makeDifferencing(path('child.dyn.vhd'), path('parent.vhd'), path('wrong-id.vhd'), { locators: [{ code: 'W2ru', text: 'parent.vhd' }], parentId: Buffer.alloc(16, 0xab), clear: CLEAR });
    const wrong = await outcomeOf(await readFile(await tar('wrong.tar', ['wrong-id.vhd', 'parent.vhd'])), { disk: 'wrong-id.vhd' });
    expect(wrong.code).toBe('UNSAFE_IMAGE');
    expect(wrong.message).toMatch(/not this image's parent.*abababab/);

    // `..` is never followed: the parent one folder up is not found from vm/.
    await makeDifferencing(path('child.dyn.vhd'), path('parent.vhd'), path('vm/up.vhd'), { locators: [{ code: 'W2ru', text: '..\\parent.vhd' }], clear: CLEAR });
    const up = await outcomeOf(await readFile(await tar('up.tar', ['vm/up.vhd', 'parent.vhd'])), { disk: 'vm/up.vhd' });
    expect(up.code).toBe('UNSAFE_IMAGE');
    expect(up.message).toMatch(/not a member.*"vm\/parent\.vhd"/);

    // A child naming itself, and two children naming each other (ids matching), are loops.
    const a = await makeDifferencing(path('child.dyn.vhd'), path('parent.vhd'), path('self.vhd'), { locators: [{ code: 'W2ru', text: 'self.vhd' }], clear: CLEAR });
    const self = await outcomeOf(makeTar([{ name: 'self.vhd', data: await readFile(a) }]), { disk: 'self.vhd' });
    expect(self.code).toBe('UNSAFE_IMAGE');
    const aa = await makeDifferencing(path('child.dyn.vhd'), path('parent.vhd'), path('a.vhd'), { locators: [{ code: 'W2ru', text: 'b.vhd' }], clear: CLEAR });
    const bb = await makeDifferencing(path('top.dyn.vhd'), aa, path('b.vhd'), { locators: [{ code: 'W2ru', text: 'a.vhd' }] });
    const pair = makeTar([{ name: 'a.vhd', data: await readFile(aa) }, { name: 'b.vhd', data: await readFile(bb) }]);
    const loop = await outcomeOf(pair, { disk: 'b.vhd' });
    expect(loop.code).toBe('UNSAFE_IMAGE');
    expect(loop.message).toMatch(/loops/);

    // A locator whose data lies past the end of the file.
    const bytes = await readFile(path('child.vhd'));
    const dynAt = Number(bytes.readBigUInt64BE(16));
    bytes.writeBigUInt64BE(BigInt(bytes.length + 4096), dynAt + 576 + 16);
    const past = await outcomeOf(makeTar([{ name: 'child.vhd', data: bytes }, { name: 'parent.vhd', data: await readFile(path('parent.vhd')) }]), { disk: 'child.vhd' });
    expect(past.code).toBe('IMAGE_CORRUPT');
    expect(past.message).toMatch(/parent locator 0.*outside the file/);
  }, 120_000);

  it.skipIf(!strace && !process.env.CI)('strace: a parent named by an absolute host path that exists is never opened', async () => {
    if (!strace) throw new Error('strace is needed for this test in CI');
    await run('cp', [path('parent.vhd'), path('canary-parent.vhd')]);
    await makeDifferencing(path('child.dyn.vhd'), path('canary-parent.vhd'), path('evil.vhd'), {
      locators: [
        { code: 'W2ku', text: path('canary-parent.vhd') },
        { code: 'MacX', text: `file://localhost${path('canary-parent.vhd')}` },
      ],
      unicodeName: path('canary-parent.vhd'),
      clear: CLEAR,
    });
    await run('tar', ['-cf', path('evil.tar'), '-C', dir, 'evil.vhd']);
    for (const args of [['convert', '-O', 'raw', path('evil.tar'), path('evil.raw')], ['convert', '-O', 'raw', path('evil.vhd'), path('evil2.raw')], ['info', path('evil.tar')]]) {
      const log = path('evil.strace');
      await new Promise<void>((resolve) => {
        execFile('strace', ['-f', '-e', 'trace=%file', '-o', log, process.execPath, CLI, ...args], { timeout: 60_000 }, () => resolve());
      });
      const calls = await readFile(log, 'latin1');
      expect(calls).toContain(args[args[0] === 'info' ? 1 : 3] as string);
      expect(calls, args.join(' ')).not.toContain('canary');
    }
    const r = await runDiskconv(['convert', '-O', 'raw', path('evil.tar'), path('evil.raw')]);
    expect(r.stderr).toMatch(/UNSAFE_IMAGE.*not a member of the archive/);
  }, 120_000);
});
