/**
 * Differencing VHDX (HasParent) in a tar or zip bundle with its parent.
 *
 * qemu-img can neither make one nor read one (qemu 7.2: "Operation not
 * supported", shown below). So the child is built here from the specification
 * ("VHDX Format Specification" v1.00 / MS-VHDX: the HasParent file parameter,
 * the parent locator metadata item with parent_linkage = the parent's
 * DataWriteGuid, relative_path and absolute_win32_path, PARTIALLY_PRESENT blocks
 * with a sector bitmap block, bit 0 of byte 0 the first sector) over a dynamic
 * VHDX qemu-img made (block_state_zero=off, so unwritten blocks are NOT_PRESENT)
 * and qemu-io wrote. The reference is qemu-img flattening the same disk as a chain
 * it reads: a qcow2 overlay over the same parent (`-b parent.vhdx -F vhdx`) holding
 * exactly the sectors the child holds, written by qemu-io.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, qemuImg, qemuIo, run, sha256File } from '../../helpers/qemu.js';
import { fileSha256, makeTar, outcomeOf, vhdxParentLocator } from './helpers.js';

const MiB = 2 ** 20;
const KiB = 1024;
const SECTOR = 512;
const BLOCK = MiB;
const SPB = BLOCK / SECTOR;
const CHUNK_RATIO = (2 ** 23 * SECTOR) / BLOCK; // 4096 payload blocks per sector bitmap block
const SIZE = 8 * MiB;
let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

type Write = [pattern: number, offset: number, length: number];
const G = {
  bat: '6677c22d23f600429d64115e9bfd4a08',
  metadata: '06a27c8b90479a4bb8fe575f050f886e',
  fileParameters: '3767a1ca36fa434db3b633f0aa44e76b',
  parentLocator: '2d5fd3a80bb34d45abf7d3d84834ab0c',
  logicalSectorSize: '1dbf41816fa90947ba47f233a8faab5f',
};

function regions(b: Buffer): Map<string, { offset: number; length: number }> {
  const rt = 192 * KiB;
  const out = new Map<string, { offset: number; length: number }>();
  for (let i = 0; i < b.readUInt32LE(rt + 8); i++) {
    const at = rt + 16 + 32 * i;
    out.set(b.subarray(at, at + 16).toString('hex'), { offset: Number(b.readBigUInt64LE(at + 16)), length: b.readUInt32LE(at + 24) });
  }
  return out;
}

/** The current header's DataWriteGuid (the higher sequence number wins), as text. */
function dataWriteGuid(b: Buffer): string {
  const [h1, h2] = [64 * KiB, 128 * KiB];
  const at = b.readBigUInt64LE(h1 + 8) >= b.readBigUInt64LE(h2 + 8) ? h1 : h2;
  const g = b.subarray(at + 32, at + 48);
  const hx = (idx: number[]): string => idx.map((i) => (g[i] as number).toString(16).padStart(2, '0')).join('');
  return `${hx([3, 2, 1, 0])}-${hx([5, 4])}-${hx([7, 6])}-${hx([8, 9])}-${hx([10, 11, 12, 13, 14, 15])}`;
}

interface Diff {
  locator: Record<string, string>;
  /** Blocks made PARTIALLY_PRESENT, with the sector runs (block-relative) left to the parent. */
  partial?: Map<number, Array<[number, number]>>;
  /** Blocks set to ZERO (zeros whatever the parent holds). */
  zero?: number[];
  /** Leave the sector bitmap block out (a hostile variant). */
  noBitmap?: boolean;
  /**
   * 4096: the child's logical sectors are 4 KiB (its LogicalSectorSize item set so; the
   * sector bitmap then has a bit per 4 KiB and a chunk is 2^23 * 4096 / block size blocks,
   * so its entry moves to BAT index 32768 for 1 MiB blocks). `partial` runs count 4 KiB sectors.
   */
  logical?: 512 | 4096;
}

/** Sectors per block and payload blocks per sector bitmap block for a logical sector size. */
function geometry(logical: number): { sector: number; spb: number; chunkRatio: number } {
  return { sector: logical, spb: BLOCK / logical, chunkRatio: (2 ** 23 * logical) / BLOCK };
}

/** Where the metadata item `guid` of a VHDX lies in the file, or undefined. */
function metadataItem(b: Buffer, guid: string): number | undefined {
  const meta = regions(b).get(G.metadata);
  if (!meta) return undefined;
  for (let i = 0; i < b.readUInt16LE(meta.offset + 10); i++) {
    const at = meta.offset + 32 + 32 * i;
    if (b.subarray(at, at + 16).toString('hex') === guid) return meta.offset + b.readUInt32LE(at + 16);
  }
  return undefined;
}

/** A copy of a qemu-made VHDX with 4 KiB logical sectors: the same bytes, which qemu reads (as its 512-byte twin) for the reference. */
async function with4kSectors(from: string, to: string): Promise<string> {
  const b = await readFile(from);
  const at = metadataItem(b, G.logicalSectorSize);
  if (at === undefined) throw new Error('no LogicalSectorSize item');
  b.writeUInt32LE(4096, at);
  await writeFile(to, b);
  return to;
}

/** A differencing VHDX from a dynamic one qemu-img made, naming `parentFile` (parent_linkage defaults to its DataWriteGuid). */
async function makeDifferencing(dynamicFile: string, parentFile: string, out: string, d: Diff): Promise<string> {
  let b = await readFile(dynamicFile);
  const { spb: SPB, chunkRatio: CHUNK_RATIO } = geometry(d.logical ?? SECTOR);
  if (d.logical === 4096) {
    const at = metadataItem(b, G.logicalSectorSize);
    if (at === undefined) throw new Error('no LogicalSectorSize item');
    b.writeUInt32LE(4096, at);
  }
  const parentGuid = dataWriteGuid(await readFile(parentFile));
  const r = regions(b);
  const meta = r.get(G.metadata);
  const bat = r.get(G.bat);
  if (!meta || !bat) throw new Error('no metadata or BAT region');
  const count = b.readUInt16LE(meta.offset + 10);
  let end = 64 * KiB;
  for (let i = 0; i < count; i++) {
    const at = meta.offset + 32 + 32 * i;
    if (b.subarray(at, at + 16).toString('hex') === G.fileParameters) b.writeUInt32LE(b.readUInt32LE(meta.offset + b.readUInt32LE(at + 16) + 4) | 2, meta.offset + b.readUInt32LE(at + 16) + 4);
    end = Math.max(end, b.readUInt32LE(at + 16) + b.readUInt32LE(at + 20));
  }
  const locator = vhdxParentLocator({ parent_linkage: `{${parentGuid}}`, ...d.locator });
  const itemAt = Math.ceil(end / (4 * KiB)) * 4 * KiB;
  const entry = meta.offset + 32 + 32 * count;
  Buffer.from(G.parentLocator, 'hex').copy(b, entry);
  b.writeUInt32LE(itemAt, entry + 16);
  b.writeUInt32LE(locator.length, entry + 20);
  b.writeUInt32LE(0x4, entry + 24); // IsRequired
  locator.copy(b, meta.offset + itemAt);
  b.writeUInt16LE(count + 1, meta.offset + 10);
  if (bat.length < (CHUNK_RATIO + 1) * 8) throw new Error('BAT region too small for the sector bitmap entry');
  const setEntry = (index: number, state: number, offset: number): void => void b.writeBigUInt64LE((BigInt(offset / MiB) << 20n) | BigInt(state), bat.offset + 8 * index);
  const getOffset = (index: number): number => Number(b.readBigUInt64LE(bat.offset + 8 * index) >> 20n) * MiB;
  if (d.partial && d.partial.size > 0) {
    const sb = Math.ceil(b.length / MiB) * MiB;
    const bitmap = Buffer.alloc(MiB);
    for (const [block, cleared] of d.partial) {
      const present = new Uint8Array(SPB).fill(1);
      for (const [s, c] of cleared) present.fill(0, s, s + c);
      present.forEach((p, s) => {
        const bit = block * SPB + s;
        if (p) bitmap[bit >> 3] = (bitmap[bit >> 3] as number) | (1 << (bit & 7));
      });
      const index = block + Math.floor(block / CHUNK_RATIO);
      setEntry(index, 7, getOffset(index));
    }
    b = Buffer.concat([b, Buffer.alloc(sb - b.length), d.noBitmap ? Buffer.alloc(0) : bitmap]);
    if (!d.noBitmap) setEntry(CHUNK_RATIO, 6, sb);
  }
  for (const block of d.zero ?? []) setEntry(block + Math.floor(block / CHUNK_RATIO), 2, 0);
  await writeFile(out, b);
  return out;
}

async function dynamicVhdx(name: string, writes: Write[]): Promise<string> {
  await qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M,block_state_zero=off', path(name), String(SIZE));
  if (writes.length > 0) await qemuIo('-f', 'vhdx', ...writes.flatMap(([p, o, l]) => ['-c', `write -P 0x${p.toString(16)} ${o} ${l}`]), path(name));
  return path(name);
}

/** The qcow2 overlay over `backing` holding exactly the child's sectors (see makeDifferencing). */
async function overlay(name: string, backing: string, fmt: string, writes: Write[], d: Diff): Promise<string> {
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', backing, '-F', fmt, path(name), String(SIZE));
  const { sector: SECTOR, spb: SPB } = geometry(d.logical ?? 512);
  const sectors = SIZE / SECTOR;
  const present = new Uint8Array(sectors);
  for (const [, o, l] of writes) for (let blk = Math.floor(o / BLOCK); blk * BLOCK < o + l; blk++) present.fill(1, blk * SPB, (blk + 1) * SPB);
  for (const [block, cleared] of d.partial ?? []) for (const [s, c] of cleared) present.fill(0, block * SPB + s, block * SPB + s + c);
  const runs: Array<[number, number]> = [];
  for (let s = 0; s < sectors; ) {
    if (!present[s]) {
      s++;
      continue;
    }
    let e = s;
    while (e < sectors && present[e]) e++;
    runs.push([s * SECTOR, e * SECTOR]);
    s = e;
  }
  const cmds: string[] = [];
  for (const [a, z] of runs) cmds.push('-c', `write -z ${a} ${z - a}`);
  for (const [p, o, l] of writes) {
    for (const [a, z] of runs) {
      const s = Math.max(o, a);
      const e = Math.min(o + l, z);
      if (e > s) cmds.push('-c', `write -P 0x${p.toString(16)} ${s} ${e - s}`);
    }
  }
  for (const block of d.zero ?? []) cmds.push('-c', `write -z ${block * BLOCK} ${BLOCK}`);
  if (cmds.length > 0) await qemuIo('-f', 'qcow2', ...cmds, path(name));
  return path(name);
}

async function qemuSha(image: string): Promise<string> {
  const out = `${image}.${Math.random().toString(36).slice(2)}.ref.raw`;
  await qemuImg('convert', '-O', 'raw', image, out);
  return sha256File(out);
}
const tar = async (name: string, files: string[]): Promise<string> => {
  await run('tar', ['-cf', path(name), '-C', dir, ...files]);
  return path(name);
};
const zip = async (name: string, files: string[]): Promise<string> => {
  await run('sh', ['-c', `cd "${dir}" && zip -q -0 ${name} ${files.join(' ')}`]);
  return path(name);
};

const PARENT_WRITES: Write[] = [
  [0x11, 0, 7 * MiB],
  [0x12, 7 * MiB, MiB],
];
const CHILD_WRITES: Write[] = [
  [0x21, 0, MiB], // block 0, FULLY_PRESENT
  [0x22, MiB + 256 * KiB, 64 * KiB], // block 1, FULLY_PRESENT: the rest of it the child's zeros
  [0x23, 3 * MiB, MiB], // block 3, made PARTIALLY_PRESENT
  [0x24, 5 * MiB, 4 * KiB], // block 5, made PARTIALLY_PRESENT
];
const DIFF: Diff = {
  locator: { relative_path: '.\\parent.vhdx', absolute_win32_path: '\\\\?\\C:\\Hyper-V\\parent.vhdx' },
  partial: new Map([
    [3, [[0, 8], [100, 1], [SPB - 1, 1], [1000, 24]]],
    [5, [[4, 4], [16, SPB - 16]]], // most of block 5 is the parent's
  ]),
  zero: [6], // zeros over the parent's 0x11
};
let ref = '';

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vhdx-diff-'));
  await qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', path('parent.vhdx'), String(SIZE));
  await qemuIo('-f', 'vhdx', ...PARENT_WRITES.flatMap(([p, o, l]) => ['-c', `write -P 0x${p.toString(16)} ${o} ${l}`]), path('parent.vhdx'));
  await makeDifferencing(await dynamicVhdx('child.dyn.vhdx', CHILD_WRITES), path('parent.vhdx'), path('child.vhdx'), DIFF);
  ref = await qemuSha(await overlay('ref.qcow2', 'parent.vhdx', 'vhdx', CHILD_WRITES, DIFF));
}, 120_000);
afterAll(async () => cleanup());

describe('differencing VHDX with its parent in a bundle', () => {
  it('flattens as qemu-img flattens the same sectors over the same parent (tar and zip)', async () => {
    for (const bundle of [await tar('pair.tar', ['child.vhdx', 'parent.vhdx']), await zip('pair.zip', ['parent.vhdx', 'child.vhdx'])]) {
      const got = await fileSha256(bundle);
      expect(got.format, bundle).toBe('vhdx');
      expect(got.virtualSize).toBe(SIZE);
      expect(got.sha256, bundle).toBe(ref);
    }
    // qemu-img refuses the child alone: it has no reader for differencing VHDX.
    await expect(qemuImg('convert', '-O', 'raw', path('child.vhdx'), path('alone.raw'))).rejects.toMatchObject({ stderr: expect.stringMatching(/not supported/i) });
  }, 60_000);

  it('a chain of two differencing disks; the absolute path alone is found by its name in the child\'s folder', async () => {
    const topWrites: Write[] = [[0x41, 2 * MiB, MiB], [0x42, 3 * MiB + 512, 512]];
    const topDiff: Diff = { locator: { relative_path: 'child.vhdx' }, partial: new Map([[3, [[0, 1], [2, SPB - 2]]]]) };
    await makeDifferencing(await dynamicVhdx('top.dyn.vhdx', topWrites), path('child.vhdx'), path('top.vhdx'), topDiff);
    const topRef = await qemuSha(await overlay('ref-top.qcow2', 'ref.qcow2', 'qcow2', topWrites, topDiff));
    expect((await fileSha256(await tar('chain.tar', ['parent.vhdx', 'child.vhdx', 'top.vhdx']))).sha256).toBe(topRef);

    await run('mkdir', ['-p', path('vm')]);
    await run('cp', [path('parent.vhdx'), path('vm/parent.vhdx')]);
    await makeDifferencing(path('child.dyn.vhdx'), path('parent.vhdx'), path('vm/abs.vhdx'), { ...DIFF, locator: { absolute_win32_path: '\\\\?\\D:\\elsewhere\\parent.vhdx', volume_path: '\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\elsewhere\\parent.vhdx' } });
    expect((await fileSha256(await tar('abs.tar', ['vm/abs.vhdx', 'vm/parent.vhdx']))).sha256).toBe(ref);
  }, 120_000);

  it('refusals: alone, a missing parent, a parent_linkage of another disk, `..`, a partial block without its sector bitmap, a locator out of bounds', async () => {
    const alone = await outcomeOf(await readFile(path('child.vhdx')));
    expect(alone.code).toBe('UNSAFE_IMAGE');
    expect(alone.message).toMatch(/differencing VHDX whose parent is named by relative_path "\.\\parent\.vhdx".*bundle/);

    const missing = await outcomeOf(makeTar([{ name: 'child.vhdx', data: await readFile(path('child.vhdx')) }]));
    expect(missing.code).toBe('UNSAFE_IMAGE');
    expect(missing.message).toMatch(/not a member of the archive.*"parent\.vhdx"/);

    // The linkage names another disk's DataWriteGuid (the child's own parent here is child.dyn's sibling).
    await makeDifferencing(path('child.dyn.vhdx'), path('child.dyn.vhdx'), path('wrong.vhdx'), { ...DIFF, locator: { relative_path: 'parent.vhdx' } });
    const wrong = await outcomeOf(await readFile(await tar('wrong.tar', ['wrong.vhdx', 'parent.vhdx'])), { disk: 'wrong.vhdx' });
    expect(wrong.code).toBe('UNSAFE_IMAGE');
    expect(wrong.message).toMatch(/not this image's parent.*parent_linkage.*DataWriteGuid/);

    await makeDifferencing(path('child.dyn.vhdx'), path('parent.vhdx'), path('vm/up.vhdx'), { ...DIFF, locator: { relative_path: '..\\parent.vhdx' } });
    const up = await outcomeOf(await readFile(await tar('up.tar', ['vm/up.vhdx', 'parent.vhdx'])), { disk: 'vm/up.vhdx' });
    expect(up.code).toBe('UNSAFE_IMAGE');
    expect(up.message).toMatch(/not a member.*"vm\/parent\.vhdx"/);

    await makeDifferencing(path('child.dyn.vhdx'), path('parent.vhdx'), path('nobitmap.vhdx'), { ...DIFF, noBitmap: true });
    const nob = await outcomeOf(await readFile(await tar('nob.tar', ['nobitmap.vhdx', 'parent.vhdx'])), { disk: 'nobitmap.vhdx' });
    expect(nob.code).toBe('IMAGE_CORRUPT');
    expect(nob.message).toMatch(/PARTIALLY_PRESENT.*sector bitmap block.*not present/);

    // A key offset pointing past the locator item.
    const bytes = await readFile(path('child.vhdx'));
    const meta = regions(bytes).get(G.metadata) as { offset: number };
    const count = bytes.readUInt16LE(meta.offset + 10);
    const item = meta.offset + bytes.readUInt32LE(meta.offset + 32 + 32 * (count - 1) + 16);
    bytes.writeUInt32LE(0xfffff, item + 20);
    const bad = await outcomeOf(makeTar([{ name: 'child.vhdx', data: bytes }, { name: 'parent.vhdx', data: await readFile(path('parent.vhdx')) }]), { disk: 'child.vhdx' });
    expect(bad.code).toBe('IMAGE_CORRUPT');
    expect(bad.message).toMatch(/parent locator: key 0.*outside the item/);
  }, 120_000);

  it('4 KiB logical sectors: the sector bitmap counts 4 KiB sectors and its entry follows 32768 blocks; equals qemu-img on the same sectors', async () => {
    const { spb } = geometry(4096); // 256 sectors of 4 KiB per 1 MiB block
    // The parent: the qemu-made parent with 4 KiB logical sectors (the same bytes; qemu reads its 512-byte twin).
    const parent4k = await with4kSectors(path('parent.vhdx'), path('parent4k.vhdx'));
    const writes: Write[] = [
      [0x31, 0, MiB], // block 0, FULLY_PRESENT
      [0x32, 2 * MiB, MiB], // block 2, made PARTIALLY_PRESENT
      [0x33, 4 * MiB + 8 * KiB, 8 * KiB], // block 4, made PARTIALLY_PRESENT: two 4 KiB sectors of the child's
    ];
    const diff: Diff = {
      locator: { relative_path: '.\\parent4k.vhdx' },
      partial: new Map([
        [2, [[0, 1], [17, 3], [spb - 1, 1]]], // single 4 KiB sectors and a run left to the parent
        [4, [[0, 2], [4, spb - 4]]], // all but sectors 2-3 (the child's 0x33) the parent's
      ]),
      zero: [6],
      logical: 4096,
    };
    const child = await makeDifferencing(await dynamicVhdx('child4k.dyn.vhdx', writes), parent4k, path('child4k.vhdx'), diff);
    const ref4k = await qemuSha(await overlay('ref4k.qcow2', 'parent.vhdx', 'vhdx', writes, diff));
    // The sector bitmap entry sits at BAT index 32768 (2^23 * 4096 / 1 MiB), not 4096.
    const b = await readFile(child);
    const bat = regions(b).get(G.bat) as { offset: number };
    expect(Number(b.readBigUInt64LE(bat.offset + 8 * geometry(4096).chunkRatio) & 7n)).toBe(6);
    expect(Number(b.readBigUInt64LE(bat.offset + 8 * geometry(512).chunkRatio) & 7n)).toBe(0);
    for (const bundle of [await tar('pair4k.tar', ['child4k.vhdx', 'parent4k.vhdx']), await zip('pair4k.zip', ['parent4k.vhdx', 'child4k.vhdx'])]) {
      const got = await fileSha256(bundle);
      expect(got.format, bundle).toBe('vhdx');
      expect(got.virtualSize).toBe(SIZE);
      expect(got.sha256, bundle).toBe(ref4k);
    }
    // The same file claiming 512-byte sectors: its chunk would end at block 4096, where no sector bitmap entry is.
    // Over the 512-byte twin of its parent (under the name it gives), so that the sector sizes agree and the bitmap is what fails.
    const as512 = Buffer.from(b);
    as512.writeUInt32LE(512, metadataItem(as512, G.logicalSectorSize) as number);
    const r = await outcomeOf(makeTar([{ name: 'child4k.vhdx', data: as512 }, { name: 'parent4k.vhdx', data: await readFile(path('parent.vhdx')) }]), { disk: 'child4k.vhdx' });
    expect(r.code).toBe('IMAGE_CORRUPT');
    expect(r.message).toMatch(/PARTIALLY_PRESENT.*sector bitmap block.*not present/);
  }, 120_000);

  it('a child whose logical sector size is not its parent\'s is refused (4 KiB over 512, 512 over 4 KiB); qemu-img reads neither child', async () => {
    // qemu 7.2 has no reader for a differencing VHDX (vhdx_co_preadv: ENOTSUP), whatever the sector
    // sizes, so there is no qemu output to match. The sector bitmap counts the child's logical sectors
    // and the clear ones are the parent's sectors: a child has its parent's logical sector size (Hyper-V
    // inherits it: New-VHD -Differencing takes no -LogicalSectorSizeBytes). Refused, naming both sizes.
    const parent4k = await with4kSectors(path('parent.vhdx'), path('parent4k-x.vhdx'));
    const writes: Write[] = [[0x51, 0, MiB]];
    const d4k: Diff = { locator: { relative_path: 'parent.vhdx' }, logical: 4096 };
    const child4k = await makeDifferencing(await dynamicVhdx('c4k-over-512.dyn.vhdx', writes), path('parent.vhdx'), path('c4k-over-512.vhdx'), d4k);
    await expect(qemuImg('convert', '-O', 'raw', child4k, path('c4k-over-512.raw'))).rejects.toMatchObject({ stderr: expect.stringMatching(/not supported/i) });
    const over512 = await outcomeOf(await readFile(await tar('c4k-over-512.tar', ['c4k-over-512.vhdx', 'parent.vhdx'])), { disk: 'c4k-over-512.vhdx' });
    expect(over512.code).toBe('UNSAFE_IMAGE');
    expect(over512.message).toMatch(/logical sector size is 4096 bytes, the parent's 512/);

    const d512: Diff = { locator: { relative_path: 'parent4k-x.vhdx' } };
    await makeDifferencing(await dynamicVhdx('c512-over-4k.dyn.vhdx', writes), parent4k, path('c512-over-4k.vhdx'), d512);
    const over4k = await outcomeOf(await readFile(await tar('c512-over-4k.tar', ['c512-over-4k.vhdx', 'parent4k-x.vhdx'])), { disk: 'c512-over-4k.vhdx' });
    expect(over4k.code).toBe('UNSAFE_IMAGE');
    expect(over4k.message).toMatch(/logical sector size is 512 bytes, the parent's 4096/);

    // The same child over the 512-byte twin of that parent (same bytes but the sector size, same name)
    // converts to what qemu-img makes of the same sectors: the refusal is the sector size alone.
    await writeFile(path('c512-over-512.tar'), makeTar([{ name: 'c512-over-4k.vhdx', data: await readFile(path('c512-over-4k.vhdx')) }, { name: 'parent4k-x.vhdx', data: await readFile(path('parent.vhdx')) }]));
    const control = await fileSha256(path('c512-over-512.tar'), { disk: 'c512-over-4k.vhdx' });
    expect(control.sha256).toBe(await qemuSha(await overlay('ref-c512.qcow2', 'parent.vhdx', 'vhdx', writes, d512)));
  }, 120_000);
});
