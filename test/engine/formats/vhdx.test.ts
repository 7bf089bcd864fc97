/**
 * VHDX: fixtures made by qemu-img and qemu-io at setup, and what qemu-img cannot
 * make (other block states, 4 KiB logical sectors, a log that needs replay, bad
 * headers and regions) patched in from the specification ("VHDX Format
 * Specification" v1.00: field offsets below are the spec's, GUIDs as stored). The
 * CRC-32C written into patched headers is accepted by qemu-img itself, which is the
 * witness that it is right. qemu-img is the reference for every image it opens.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, qemuIo, qemuRawSha256, run, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, FileSource, isDiskconvError, openImage, readExtents, type MapEntry } from '../../../src/engine/index.js';
import { crc32c } from '../../../src/engine/crc32c.js';
import { vhdxDriver } from '../../../src/engine/formats/vhdx/index.js';
import { withLimits } from '../../../src/engine/limits.js';
import { vhdxParentLocator } from '../archive/helpers.js';

const KiB = 1024;
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const HEADERS = [64 * KiB, 128 * KiB];
const REGION_TABLE = 192 * KiB;
/** GUIDs as the file stores them (mixed-endian). */
const G = {
  bat: '6677c22d23f600429d64115e9bfd4a08',
  metadata: '06a27c8b90479a4bb8fe575f050f886e',
  fileParameters: '3767a1ca36fa434db3b633f0aa44e76b',
  logicalSectorSize: '1dbf41816fa90947ba47f233a8faab5f',
  parentLocator: '2d5fd3a80bb34d45abf7d3d84834ab0c',
} as const;
/** BAT entry states (spec 2.5.1). */
const S = { NOT_PRESENT: 0, UNDEFINED: 1, ZERO: 2, UNMAPPED: 3, UNMAPPED_V095: 5, FULLY_PRESENT: 6, PARTIALLY_PRESENT: 7 } as const;

let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

interface Layout {
  bat: { offset: number; length: number; at: number };
  meta: { offset: number; length: number; at: number };
  items: Map<string, { offset: number; entryAt: number }>;
  itemCount: number;
}

function layout(b: Buffer): Layout {
  const count = b.readUInt32LE(REGION_TABLE + 8);
  const regions = new Map<string, { offset: number; length: number; at: number }>();
  for (let i = 0; i < count; i++) {
    const at = REGION_TABLE + 16 + 32 * i;
    regions.set(b.subarray(at, at + 16).toString('hex'), { offset: Number(b.readBigUInt64LE(at + 16)), length: b.readUInt32LE(at + 24), at });
  }
  const bat = regions.get(G.bat);
  const meta = regions.get(G.metadata);
  if (!bat || !meta) throw new Error('no BAT or metadata region');
  const itemCount = b.readUInt16LE(meta.offset + 10);
  const items = new Map<string, { offset: number; entryAt: number }>();
  for (let i = 0; i < itemCount; i++) {
    const at = meta.offset + 32 + 32 * i;
    items.set(b.subarray(at, at + 16).toString('hex'), { offset: meta.offset + b.readUInt32LE(at + 16), entryAt: at });
  }
  return { bat, meta, items, itemCount };
}

const item = (b: Buffer, guid: string): number => {
  const it = layout(b).items.get(guid);
  if (!it) throw new Error(`no metadata item ${guid}`);
  return it.offset;
};
const batEntry = (b: Buffer, index: number): { state: number; offset: number } => {
  const v = b.readBigUInt64LE(layout(b).bat.offset + 8 * index);
  return { state: Number(v & 7n), offset: Number(v >> 20n) * MiB };
};
const setBatEntry = (b: Buffer, index: number, state: number, offset: number): void => {
  b.writeBigUInt64LE((BigInt(offset / MiB) << 20n) | BigInt(state), layout(b).bat.offset + 8 * index);
};
/** CRC-32C over `length` bytes at `at`, the checksum field (at + 4) as zero. */
function fixCrc(b: Buffer, at: number, length: number): void {
  b.writeUInt32LE(0, at + 4);
  b.writeUInt32LE(crc32c(b.subarray(at, at + length)), at + 4);
}
/** Flips the low bit of one byte. */
const flip = (b: Buffer, at: number): void => void b.writeUInt8((b.readUInt8(at) ^ 1) & 0xff, at);
const fixHeader = (b: Buffer, i: number): void => fixCrc(b, HEADERS[i] as number, 4 * KiB);
const fixRegionTable = (b: Buffer): void => fixCrc(b, REGION_TABLE, 64 * KiB);

async function patched(from: string, name: string, edit: (b: Buffer) => void): Promise<string> {
  const bytes = await readFile(from);
  edit(bytes);
  await writeFile(path(name), bytes);
  return path(name);
}

async function engineOutcome(file: string): Promise<{ code: string; message: string }> {
  const source = await FileSource.open(file);
  try {
    const image = await openImage(source, { format: 'vhdx' });
    let next = 0;
    for await (const e of readExtents(image, source)) next += e.length;
    expect(next).toBe(image.virtualSize);
    return { code: 'converts', message: '' };
  } catch (err) {
    if (isDiskconvError(err)) return { code: String(err.code), message: err.message };
    throw err;
  } finally {
    await source.close();
  }
}

async function qemuOutcome(file: string, command: 'convert' | 'info' = 'convert'): Promise<{ ok: boolean; error: string }> {
  try {
    if (command === 'convert') await qemuRawSha256(file, dir, ['-f', 'vhdx']);
    else await qemuImg('info', '-f', 'vhdx', file);
    return { ok: true, error: '' };
  } catch (err) {
    return { ok: false, error: String((err as { stderr?: string }).stderr ?? err) };
  }
}

async function expectSameAsQemu(file: string): Promise<void> {
  const dst = `${file}.${Math.random().toString(36).slice(2)}.out`;
  const conv = await runDiskconv(['convert', '-O', 'raw', file, dst]);
  expect(conv.stderr).toBe('');
  expect(conv.code).toBe(0);
  expect(await sha256File(dst)).toBe(await qemuRawSha256(file, dir));
  const info = await runDiskconv(['info', '--output=json', file]);
  expect(info.code, info.stderr).toBe(0);
  expect(JSON.parse(info.stdout)).toEqual(pickInfo(await qemuInfo(file)));
  const ours = await runDiskconv(['check', '--output=json', file]);
  const theirs = await qemuImg('check', '--output=json', file);
  expect(ours.code).toBe(0);
  expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
}

async function create(name: string, size: string, options: string, writes: string[]): Promise<string> {
  const file = path(name);
  await qemuImg('create', '-q', '-f', 'vhdx', '-o', options, file, size);
  if (writes.length > 0) await qemuIo('-f', 'vhdx', ...writes.flatMap((w) => ['-c', w]), file);
  return file;
}

const fixtures: Record<string, string> = {};
let dyn1: string;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vhdx-'));
  const raw = path('content.raw');
  const content = mixedContent(7 * MiB + 3 * 512, 11);
  content.fill(0, 2 * MiB, 4 * MiB); // two whole zero blocks
  await writeFile(raw, content);
  fixtures['dynamic, 1 MiB blocks, odd size, converted from raw'] = dyn1 = path('dyn1.vhdx');
  await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', '-o', 'block_size=1M', raw, dyn1);
  fixtures['fixed, 1 MiB blocks, odd size, converted from raw'] = path('fixed1.vhdx');
  await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', '-o', 'block_size=1M,subformat=fixed', raw, path('fixed1.vhdx'));
  fixtures['dynamic, 1 MiB blocks, block_state_zero=off (NOT_PRESENT entries)'] = path('nozero.vhdx');
  await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', '-o', 'block_size=1M,block_state_zero=off', raw, path('nozero.vhdx'));

  fixtures['dynamic, 32 MiB blocks, data at block edges, out of order'] = await create('dyn32.vhdx', `${70 * MiB + 512}`, 'block_size=32M', [
    'write -P 0x41 64M 4k',
    'write -P 0x42 33554176 1k',
    'write -P 0x43 0 512',
    'write -P 0x44 70M 512',
  ]);
  fixtures['dynamic, 32 MiB blocks, zeroed and discarded ranges'] = await create('dyn32z.vhdx', '96M', 'block_size=32M', [
    'write -P 0x55 0 96M',
    'write -z 32M 32M',
    'discard 64M 16M',
  ]);
  fixtures['fixed, 32 MiB blocks'] = await create('fixed32.vhdx', '80M', 'block_size=32M,subformat=fixed', ['write -P 0x61 31M 2M', 'write -P 0x62 79M 1M']);
  fixtures['dynamic, 256 MiB blocks, data at block edges'] = await create('dyn256.vhdx', `${300 * MiB + 1024}`, 'block_size=256M', [
    'write -P 0x71 268431360 8k',
    'write -P 0x72 300M 1k',
  ]);
  fixtures['fixed, 256 MiB blocks'] = await create('fixed256.vhdx', '300M', 'block_size=256M,subformat=fixed', ['write -P 0x73 255M 2M']);
  fixtures['dynamic, nothing written'] = await create('empty.vhdx', '10M', 'block_size=1M', []);
  fixtures['dynamic, size 0'] = await create('size0.vhdx', '0', 'block_size=1M', []);

  // Block states qemu-img never writes, read by qemu-img as zeros.
  for (const [stateName, state] of [['UNDEFINED', S.UNDEFINED], ['UNMAPPED', S.UNMAPPED], ['UNMAPPED (0.95 draft value 5)', S.UNMAPPED_V095], ['ZERO with a file offset left', S.ZERO]] as const) {
    fixtures[`block 0 in state ${stateName}`] = await patched(dyn1, `state-${state}.vhdx`, (b) => setBatEntry(b, 0, state, batEntry(b, 0).offset));
  }
  // Two identical headers with the same sequence number, as Disk2VHD writes them (iotest 070).
  fixtures['two identical headers with one sequence number'] = await patched(dyn1, 'same-headers.vhdx', (b) => {
    b.copy(b, HEADERS[1] as number, HEADERS[0] as number, (HEADERS[0] as number) + 4 * KiB);
  });
  // Header 1 broken: header 2 alone is read.
  fixtures['the first header with a bad CRC'] = await patched(dyn1, 'bad-header-1.vhdx', (b) => {
    flip(b, (HEADERS[0] as number) + 100);
  });
});
afterAll(async () => cleanup());

describe('vhdx: agrees with qemu-img', () => {
  it.each([
    'dynamic, 1 MiB blocks, odd size, converted from raw',
    'fixed, 1 MiB blocks, odd size, converted from raw',
    'dynamic, 1 MiB blocks, block_state_zero=off (NOT_PRESENT entries)',
    'dynamic, 32 MiB blocks, data at block edges, out of order',
    'dynamic, 32 MiB blocks, zeroed and discarded ranges',
    'fixed, 32 MiB blocks',
    'dynamic, 256 MiB blocks, data at block edges',
    'fixed, 256 MiB blocks',
    'dynamic, nothing written',
    'dynamic, size 0',
    'block 0 in state UNDEFINED',
    'block 0 in state UNMAPPED',
    'block 0 in state UNMAPPED (0.95 draft value 5)',
    'block 0 in state ZERO with a file offset left',
    'two identical headers with one sequence number',
    'the first header with a bad CRC',
  ])('%s: convert, info and check', { timeout: 120_000 }, async (name) => {
    const file = fixtures[name];
    expect(file, name).toBeDefined();
    await expectSameAsQemu(file as string);
  });

  it('the block sizes and states are what the fixtures claim', async () => {
    expect((await qemuInfo(fixtures['dynamic, 256 MiB blocks, data at block edges'] as string))['cluster-size']).toBe(256 * MiB);
    const nz = await readFile(fixtures['dynamic, 1 MiB blocks, block_state_zero=off (NOT_PRESENT entries)'] as string);
    expect(batEntry(nz, 2).state).toBe(S.NOT_PRESENT);
    const d = await readFile(dyn1);
    expect(batEntry(d, 2).state).toBe(S.ZERO);
    expect(batEntry(d, 0).state).toBe(S.FULLY_PRESENT);
  });
});

describe('vhdx: sector bitmap entries between payload entries (disks over 4 GiB)', () => {
  it('reads the blocks after the first sector bitmap entry as qemu-img does', { timeout: 300_000 }, async () => {
    // 256 MiB blocks and 512-byte sectors: a chunk ratio of 16, so BAT entry 16 is a sector bitmap entry.
    const file = await create('big.vhdx', `${4 * GiB + 768 * MiB}`, 'block_size=256M', ['write -P 0x81 4294963200 8k', 'write -P 0x82 4608M 4k', 'write -P 0x83 0 4k']);
    const b = Buffer.alloc(8 * 20);
    const fd = await FileSource.open(file);
    const bat = layout(Buffer.concat([await fd.read(0, 4 * MiB)])).bat.offset;
    b.set(await fd.read(bat, b.length));
    await fd.close();
    expect(Number(b.readBigUInt64LE(8 * 16) & 7n)).toBe(S.NOT_PRESENT); // the sector bitmap entry
    expect(Number(b.readBigUInt64LE(8 * 17) & 7n)).toBe(S.FULLY_PRESENT); // payload block 16
    const dst = path('big.out');
    const conv = await runDiskconv(['convert', '-O', 'raw', file, dst]);
    expect(conv.stderr).toBe('');
    // Compare the 1 GiB window holding every write past 4 GiB, cut by qemu's raw driver (offset/size).
    const windowStart = 3840 * MiB;
    const windowSize = 1 * GiB;
    const ref = path('big.ref');
    await qemuImg('convert', '-O', 'raw', '--image-opts', `driver=raw,offset=${windowStart},size=${windowSize},file.driver=vhdx,file.file.driver=file,file.file.filename=${file}`, ref);
    const { createHash } = await import('node:crypto');
    const ours = await FileSource.open(dst);
    const hash = createHash('sha256');
    for (let off = windowStart; off < windowStart + windowSize; off += 64 * MiB) hash.update(await ours.read(off, 64 * MiB));
    const head = await ours.read(0, 4096);
    await ours.close();
    expect(hash.digest('hex')).toBe(await sha256File(ref));
    expect(Buffer.from(head).equals(Buffer.alloc(4096, 0x83))).toBe(true);
    const info = await runDiskconv(['info', '--output=json', file]);
    expect(JSON.parse(info.stdout)).toEqual(pickInfo(await qemuInfo(file)));
  });
});

describe('vhdx: 4 KiB logical sectors (read per the specification; qemu-img 7.2 refuses them)', () => {
  it('reads the same payload as its 512-byte twin, which qemu-img reads', async () => {
    // Under 4096 blocks of 1 MiB neither sector size has a sector bitmap entry, so the BAT is the same.
    const twin = await create('twin512.vhdx', '12M', 'block_size=1M', ['write -P 0x91 0 1M', 'write -P 0x92 5M 8k', 'write -P 0x93 12582400 512']);
    const file = await patched(twin, 'logical4k.vhdx', (b) => b.writeUInt32LE(4096, item(b, G.logicalSectorSize)));
    expect(await qemuOutcome(file, 'info')).toMatchObject({ ok: false, error: expect.stringMatching(/Operation not supported/) });
    const dst = path('logical4k.out');
    const conv = await runDiskconv(['convert', '-O', 'raw', file, dst]);
    expect(conv.stderr).toBe('');
    expect(await sha256File(dst)).toBe(await qemuRawSha256(twin, dir));
    const info = JSON.parse((await runDiskconv(['info', '--output=json', file])).stdout);
    expect(info).toMatchObject({ format: 'vhdx', 'virtual-size': 12 * MiB, 'cluster-size': MiB });
  });
});

describe('vhdx: 4 KiB logical sectors past the first sector bitmap entry (disks over 32 GiB)', () => {
  it('places the sector bitmap entry after 128 payload entries of 256 MiB, not 16', { timeout: 300_000 }, async () => {
    // The 512-byte twin, read by qemu-img: 33 GiB of 256 MiB blocks, a bitmap entry after every 16 payload entries.
    const size = 33 * GiB;
    const writes = ['write -P 0xa1 0 4k', 'write -P 0xa2 8G 4k', 'write -P 0xa3 32G 8k', 'write -P 0xa4 33791M 1M'];
    const twin = await create('twin-big.vhdx', String(size), 'block_size=256M', writes);
    const file = await patched(twin, 'logical4k-big.vhdx', (b) => {
      b.writeUInt32LE(4096, item(b, G.logicalSectorSize));
      // Re-lay the BAT for a chunk ratio of 2^23 * 4096 / 256 MiB = 128.
      const blocks = size / (256 * MiB);
      const entries = Array.from({ length: blocks }, (_, i) => b.readBigUInt64LE(layout(b).bat.offset + 8 * (i + Math.floor(i / 16))));
      const bat = layout(b).bat.offset;
      b.fill(0, bat, bat + 8 * (blocks + Math.floor(blocks / 16)));
      entries.forEach((e, i) => b.writeBigUInt64LE(e, bat + 8 * (i + Math.floor(i / 128))));
    });
    expect(await qemuOutcome(file, 'info')).toMatchObject({ ok: false });
    const dst = path('logical4k-big.out');
    const conv = await runDiskconv(['convert', '-O', 'raw', file, dst]);
    expect(conv.stderr).toBe('');
    // Every write lies in [0, 4 KiB), [8 GiB, +4 KiB) or [32 GiB, 33 GiB): compare those windows with qemu-img's reading of the twin.
    const { createHash } = await import('node:crypto');
    const ours = await FileSource.open(dst);
    expect(ours.size).toBe(size);
    for (const [start, length] of [[0, 64 * KiB], [8 * GiB, 64 * KiB], [32 * GiB, GiB]] as const) {
      const ref = path(`twin-window-${start}.raw`);
      await qemuImg('convert', '-O', 'raw', '--image-opts', `driver=raw,offset=${start},size=${length},file.driver=vhdx,file.file.driver=file,file.file.filename=${twin}`, ref);
      const hash = createHash('sha256');
      for (let off = start; off < start + length; off += 64 * MiB) hash.update(await ours.read(off, Math.min(64 * MiB, start + length - off)));
      expect(hash.digest('hex'), `window at ${start}`).toBe(await sha256File(ref));
    }
    await ours.close();
  });
});

describe('vhdx: refused as qemu-img refuses them', () => {
  it.each([
    ['PARTIALLY_PRESENT', S.PARTIALLY_PRESENT],
    ['the undefined state 4', 4],
  ])('block 1 %s: info works, convert is IMAGE_CORRUPT (qemu-img fails its read with EIO)', async (what, state) => {
    const file = await patched(dyn1, `state-${state}.vhdx`, (b) => setBatEntry(b, 1, state, batEntry(b, 1).offset));
    expect((await qemuOutcome(file, 'info')).ok).toBe(true);
    expect((await qemuOutcome(file)).error).toMatch(/Input\/output error/);
    expect((await runDiskconv(['info', file])).code).toBe(0);
    const out = await engineOutcome(file);
    expect(out.code, what).toBe('IMAGE_CORRUPT');
    expect(out.message).toMatch(what === 'PARTIALLY_PRESENT' ? /PARTIALLY_PRESENT/ : /state 4/);
  });

  const refusals: Array<[string, (b: Buffer) => void, string, RegExp]> = [
    [
      'both headers with a bad CRC',
      (b) => {
        flip(b, (HEADERS[0] as number) + 100);
        flip(b, (HEADERS[1] as number) + 100);
      },
      'IMAGE_CORRUPT',
      /No valid VHDX header/,
    ],
    [
      'two valid headers with one sequence number that differ',
      (b) => {
        b.copy(b, HEADERS[1] as number, HEADERS[0] as number, (HEADERS[0] as number) + 4 * KiB);
        flip(b, (HEADERS[1] as number) + 16); // file write GUID
        fixHeader(b, 1);
      },
      'IMAGE_CORRUPT',
      /No valid VHDX header/,
    ],
    ['a bad region table CRC', (b) => flip(b, REGION_TABLE + 100), 'IMAGE_CORRUPT', /Invalid argument/],
    [
      'the BAT region overlapping the metadata region',
      (b) => {
        const l = layout(b);
        b.writeBigUInt64LE(BigInt(l.meta.offset), l.bat.at + 16);
        fixRegionTable(b);
      },
      'IMAGE_CORRUPT',
      /overlaps/,
    ],
    [
      'an unknown region marked required',
      (b) => {
        const count = b.readUInt32LE(REGION_TABLE + 8);
        const at = REGION_TABLE + 16 + 32 * count;
        b.fill(0x5a, at, at + 16);
        b.writeBigUInt64LE(BigInt(b.length), at + 16);
        b.writeUInt32LE(MiB, at + 24);
        b.writeUInt32LE(1, at + 28);
        b.writeUInt32LE(count + 1, REGION_TABLE + 8);
        fixRegionTable(b);
      },
      'UNSUPPORTED_FEATURE',
      /Operation not supported/,
    ],
    ['a 512 MiB block size', (b) => b.writeUInt32LE(512 * MiB, item(b, G.fileParameters)), 'IMAGE_CORRUPT', /Invalid argument/],
    ['a block size that is not a power of two', (b) => b.writeUInt32LE(3 * MiB, item(b, G.fileParameters)), 'IMAGE_CORRUPT', /Invalid argument/],
    ['a logical sector size of 1024', (b) => b.writeUInt32LE(1024, item(b, G.logicalSectorSize)), 'IMAGE_CORRUPT', /Operation not supported|Invalid argument/],
    ['a BAT entry past the end of the file', (b) => setBatEntry(b, 0, S.FULLY_PRESENT, Math.ceil(b.length / MiB) * MiB + 16 * MiB), 'IMAGE_CORRUPT', /Invalid argument/],
    ['a BAT entry whose block overlaps the metadata region', (b) => setBatEntry(b, 0, S.FULLY_PRESENT, layout(b).meta.offset), 'IMAGE_CORRUPT', /Invalid argument/],
    ['a BAT entry whose block overlaps the BAT', (b) => setBatEntry(b, 0, S.FULLY_PRESENT, layout(b).bat.offset), 'IMAGE_CORRUPT', /Invalid argument/],
    ['has_parent without a parent locator', (b) => b.writeUInt32LE(2, item(b, G.fileParameters) + 4), 'IMAGE_CORRUPT', /Invalid argument/],
    [
      'a 1-byte virtual size whose one block lies past the end of the file (found by the fuzzer: qemu counts blocks before rounding to sectors)',
      (b) => {
        b.writeBigUInt64LE(1n, item(b, '2442a52f1bcd7648b2115dbed83bf4b8'));
        setBatEntry(b, 0, S.FULLY_PRESENT, Math.ceil(b.length / MiB) * MiB + 16 * MiB);
      },
      'IMAGE_CORRUPT',
      /points after end of file/,
    ],
    [
      // Found by the fuzzer. qemu-img's own empty VHDX (the fixture 'dynamic, size 0') has the region that count needs, and converts.
      'a virtual size set to 0 over a BAT region too small for the count qemu makes of an empty disk (0 + ((0 - 1) >> log2 chunk ratio), 32-bit)',
      (b) => b.writeBigUInt64LE(0n, item(b, '2442a52f1bcd7648b2115dbed83bf4b8')),
      'IMAGE_CORRUPT',
      /Invalid argument/,
    ],
    ['a virtual size over MAX_VIRTUAL_SIZE', (b) => b.writeBigUInt64LE(2n ** 50n, item(b, '2442a52f1bcd7648b2115dbed83bf4b8')), 'LIMIT_EXCEEDED', /./],
  ];
  it.each(refusals)('%s', async (what, edit, code, qemuSays) => {
    const file = await patched(dyn1, `refused-${what.replace(/\W+/g, '-')}.vhdx`, edit);
    const ours = await engineOutcome(file);
    expect(ours.code, `${what}: ${ours.message}`).toBe(code);
    const theirs = await qemuOutcome(file);
    expect(theirs.ok, what).toBe(false);
    expect(theirs.error).toMatch(qemuSays);
  });

  it('a differencing VHDX (has_parent and a parent locator) alone is UNSAFE_IMAGE, naming its parent and asking for a bundle with it', async () => {
    const file = await patched(dyn1, 'differencing.vhdx', (b) => {
      const l = layout(b);
      b.writeUInt32LE(2, item(b, G.fileParameters) + 4);
      const at = l.meta.offset + 32 + 32 * l.itemCount;
      const locator = vhdxParentLocator({ parent_linkage: '{01234567-89ab-cdef-0123-456789abcdef}', relative_path: '.\\base.vhdx', absolute_win32_path: '\\\\?\\C:\\vm\\base.vhdx' });
      Buffer.from(G.parentLocator, 'hex').copy(b, at);
      b.writeUInt32LE(64 * KiB + 4 * KiB, at + 16); // an unused spot in the metadata region
      b.writeUInt32LE(locator.length, at + 20);
      b.writeUInt32LE(0x6, at + 24);
      locator.copy(b, l.meta.offset + 64 * KiB + 4 * KiB);
      b.writeUInt16LE(l.itemCount + 1, l.meta.offset + 10);
    });
    const cli = await runDiskconv(['convert', '-O', 'raw', file, path('differencing.out')]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toMatch(/^diskconv: UNSAFE_IMAGE: .*differencing VHDX whose parent is named by relative_path "\.\\base\.vhdx", absolute_win32_path .*tar or zip bundle holding both.*\n$/);
    expect((await qemuOutcome(file)).error).toMatch(/Operation not supported/);
  });

  it('a BAT entry pointing into the 1 MiB header section is IMAGE_CORRUPT (beyond qemu, which would read its headers as data)', async () => {
    const file = await patched(dyn1, 'bat-in-header.vhdx', (b) => setBatEntry(b, 0, S.FULLY_PRESENT, 0));
    expect((await engineOutcome(file)).code).toBe('IMAGE_CORRUPT');
  });

  it('a truncated image is IMAGE_CORRUPT', async () => {
    const bytes = await readFile(dyn1);
    for (const length of [100 * KiB, 2 * MiB, bytes.length - MiB]) {
      const file = path(`truncated-${length}.vhdx`);
      await writeFile(file, bytes.subarray(0, length));
      expect((await engineOutcome(file)).code, `truncated to ${length}`).toBe('IMAGE_CORRUPT');
    }
  });

  it('a BAT larger than maxTopTableBytes is LIMIT_EXCEEDED', async () => {
    const bytes = await readFile(dyn1);
    await expect(vhdxDriver.open(new BufferSource(bytes), { limits: withLimits({ maxTopTableBytes: 32 }) })).rejects.toMatchObject({ code: 'LIMIT_EXCEEDED' });
  });
});

describe('vhdx: the log', () => {
  /** Writes one log entry (header sector only, no descriptors) at the log's start and activates the log in both headers. */
  function withLogEntry(b: Buffer, { badCrc = false, sequence = 5n } = {}): void {
    const guid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const logOffset = Number(b.readBigUInt64LE((HEADERS[0] as number) + 72));
    const e = b.subarray(logOffset, logOffset + 4 * KiB);
    e.fill(0);
    e.write('loge', 0, 'latin1');
    e.writeUInt32LE(4 * KiB, 8); // entry length
    e.writeBigUInt64LE(sequence, 16);
    e.writeUInt32LE(0, 24); // descriptor count
    guid.copy(e, 32);
    e.writeBigUInt64LE(BigInt(b.length), 48); // flushed file offset
    e.writeBigUInt64LE(BigInt(b.length), 56); // last file offset
    fixCrc(b, logOffset, 4 * KiB);
    if (badCrc) flip(b, logOffset + 4);
    for (const i of [0, 1]) {
      guid.copy(b, (HEADERS[i] as number) + 48);
      fixHeader(b, i);
    }
  }

  it('a log that needs replay is refused, as qemu-img refuses it read-only, and the message says so', async () => {
    const file = await patched(dyn1, 'dirty-log.vhdx', (b) => withLogEntry(b));
    const theirs = await qemuOutcome(file, 'info');
    expect(theirs.error).toMatch(/opened read-only, but contains a log that needs to be replayed/);
    for (const command of [['info', file], ['convert', '-O', 'raw', file, path('dirty.out')], ['check', file]]) {
      const r = await runDiskconv(command);
      expect(r.code, command[0]).toBe(1);
      expect(r.stderr).toMatch(/^diskconv: UNSUPPORTED_FEATURE: .*log that needs to be replayed.*qemu-img refuses it read-only/);
    }
    const qemuCheck = await run('qemu-img', ['check', file]).then(() => 0, (e: { code: number }) => e.code);
    expect(qemuCheck).toBe(1);
  });

  it('an active log whose only entry has a bad CRC needs no replay: read as qemu-img reads it', async () => {
    const file = await patched(dyn1, 'stale-log.vhdx', (b) => withLogEntry(b, { badCrc: true }));
    expect((await qemuOutcome(file, 'info')).ok).toBe(true);
    await expectSameAsQemu(file);
  });

  it('an entry with sequence number 0 is not an entry', async () => {
    const file = await patched(dyn1, 'seq0-log.vhdx', (b) => withLogEntry(b, { sequence: 0n }));
    expect((await qemuOutcome(file, 'info')).ok).toBe(true);
    expect((await engineOutcome(file)).code).toBe('converts');
  });
});

describe('vhdx: map', () => {
  it('maps FULLY_PRESENT blocks at their file offsets and everything else as zeros, contiguous over the disk', async () => {
    const bytes = await readFile(dyn1);
    const image = await vhdxDriver.open(new BufferSource(bytes), { limits: withLimits() });
    const entries: MapEntry[] = [];
    for await (const e of image.map()) entries.push(e);
    let next = 0;
    for (const e of entries) {
      expect(e.offset).toBe(next);
      next += e.length;
    }
    expect(next).toBe(image.virtualSize);
    expect(image.virtualSize).toBe(7 * MiB + 3 * 512);
    const first = entries[0] as MapEntry & { fileOffset: number };
    expect(first).toMatchObject({ kind: 'stored', offset: 0, fileOffset: batEntry(bytes, 0).offset });
    expect(entries.find((e) => e.offset === 2 * MiB)).toMatchObject({ kind: 'zero', length: 2 * MiB });
    expect(image.info()).toEqual({ clusterSize: MiB, dirty: false, identity: expect.stringMatching(/^[0-9a-f-]{36}$/), logicalSectorSize: 512 });
  });
});
