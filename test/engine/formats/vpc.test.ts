/**
 * VHD (qemu's vpc): fixtures made by qemu-img and qemu-io at setup, some patched
 * from the specification (creator app, geometry, BAT entries; the footer checksum
 * recomputed here as the spec defines it). qemu-img is the reference for every
 * image it opens: `info --output=json` equal, `convert -O raw` sha256 equal.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, qemuIo, qemuRawSha256, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, isDiskconvError, openImage, readExtents, type MapEntry } from '../../../src/engine/index.js';
import { vpcDriver } from '../../../src/engine/formats/vpc.js';
import { withLimits } from '../../../src/engine/limits.js';

const MiB = 2 ** 20;
/** Footer fields (big-endian), VHD specification "Hard Disk Footer Format". */
const F = { creatorApp: 28, currentSize: 48, cylinders: 56, heads: 58, sectors: 59, diskType: 60, checksum: 64 } as const;
/** Dynamic disk header fields, "Dynamic Disk Header Format" (at footer.dataOffset, 512 in qemu's images). */
const D = { at: 512, tableOffset: 16, maxTableEntries: 28, blockSize: 32 } as const;

let dir: string;
let cleanup: () => Promise<void>;
const path = (name: string): string => join(dir, name);

/** The spec's checksum: one's complement of the sum of the footer bytes, the checksum field as zero. */
function fixChecksum(footer: Buffer): void {
  footer.writeUInt32BE(0, F.checksum);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += footer[i] as number;
  footer.writeUInt32BE(~sum >>> 0, F.checksum);
}

/** Edits both footers of a dynamic VHD (copy at 0, footer at the end) and fixes their checksums. */
function editFooters(b: Buffer, edit: (footer: Buffer) => void, fixedOnly = false): void {
  const offsets = fixedOnly ? [b.length - 512] : [0, b.length - 512];
  for (const off of offsets) {
    const footer = b.subarray(off, off + 512);
    edit(footer);
    fixChecksum(footer);
  }
}

async function patched(from: string, name: string, edit: (b: Buffer) => void): Promise<string> {
  const bytes = await readFile(from);
  edit(bytes);
  await writeFile(path(name), bytes);
  return path(name);
}

async function fromRaw(name: string, size: number, seed: number, options: string): Promise<string> {
  const raw = path(`${name}.raw`);
  const content = mixedContent(size, seed);
  content.fill(0, Math.min(size, 2 * MiB), Math.min(size, 4 * MiB)); // a whole zero block: left unallocated
  await writeFile(raw, content);
  const out = path(`${name}.vhd`);
  await qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', options, raw, out);
  return out;
}

async function engineOutcome(bytes: Uint8Array, format: 'vpc' | 'auto' = 'vpc'): Promise<string> {
  const source = new BufferSource(bytes);
  try {
    const image = await openImage(source, { format });
    let next = 0;
    for await (const e of readExtents(image, source)) {
      expect(e.offset).toBe(next);
      next += e.length;
    }
    expect(next).toBe(image.virtualSize);
    return 'converts';
  } catch (err) {
    if (isDiskconvError(err)) return String(err.code);
    throw err;
  }
}

/** qemu-img's verdict on an image: its convert sha256, or its error. */
async function qemuOutcome(file: string, format = 'vpc'): Promise<{ ok: true; sha: string } | { ok: false; error: string }> {
  try {
    return { ok: true, sha: await qemuRawSha256(file, dir, ['-f', format]) };
  } catch (err) {
    return { ok: false, error: String((err as { stderr?: string }).stderr ?? err) };
  }
}

async function expectSameAsQemu(file: string, format?: 'vpc'): Promise<void> {
  const f = format ? ['-f', format] : [];
  const dst = `${file}.${Math.random().toString(36).slice(2)}.out`;
  const conv = await runDiskconv(['convert', ...f, '-O', 'raw', file, dst]);
  expect(conv.stderr).toBe('');
  expect(conv.code).toBe(0);
  expect(await sha256File(dst)).toBe(await qemuRawSha256(file, dir, f));
  const info = await runDiskconv(['info', ...f, '--output=json', file]);
  expect(info.code, info.stderr).toBe(0);
  const theirs = format ? JSON.parse((await qemuImg('info', '-f', format, '--output=json', file)).stdout) : await qemuInfo(file);
  expect(JSON.parse(info.stdout)).toEqual(pickInfo(theirs));
}

const fixtures: Record<string, string> = {};
let dynamic: string;
let fixed: string;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vpc-'));
  fixtures['dynamic (default), 6 MiB'] = dynamic = await fromRaw('dyn', 6 * MiB, 1, 'subformat=dynamic');
  fixtures['dynamic, force_size=on, 6 MiB'] = await fromRaw('dynforce', 6 * MiB, 2, 'subformat=dynamic,force_size=on');
  fixtures['dynamic, odd size 3 500 000 bytes (CHS-rounded)'] = await fromRaw('dynodd', 3_500_000, 3, 'subformat=dynamic');
  fixtures['dynamic, force_size=on, odd size 5 000 192 bytes'] = await fromRaw('dynoddforce', 5_000_192, 4, 'subformat=dynamic,force_size=on');

  // Data written at block edges (2 MiB blocks) and a zeroed range, in guest order unlike allocation order.
  const edges = path('edges.vhd');
  await qemuImg('create', '-q', '-f', 'vpc', edges, '9M');
  await qemuIo(
    '-f', 'vpc',
    '-c', 'write -P 0x41 4M 512',
    '-c', 'write -P 0x42 2096640 1024',
    '-c', 'write -P 0x43 0 4k',
    '-c', 'write -z 6M 1M',
    '-c', 'write -P 0x44 8M 64k',
    edges,
  );
  fixtures['dynamic, data at block edges, written out of order, a zeroed range'] = edges;
  const empty = path('empty.vhd');
  await qemuImg('create', '-q', '-f', 'vpc', empty, '5M');
  fixtures['dynamic, nothing allocated'] = empty;

  // Creator apps (iotest 146): the same image labelled by other writers, CHS geometry smaller than current_size.
  for (const app of ['win ', 'd2v ', 'vpc ', 'tap\0', 'CTXS', 'qem2']) {
    fixtures[`dynamic, creator app ${JSON.stringify(app)} with CHS below current size`] = await patched(dynamic, `creator-${app.replace(/\W/g, '_')}.vhd`, (b) =>
      editFooters(b, (f) => {
        f.write(app, F.creatorApp, 'latin1');
        f.writeUInt16BE(100, F.cylinders); // 100 x 4 x 17 sectors = 3.3 MiB < 6 MiB current size
        f.writeUInt8(4, F.heads);
        f.writeUInt8(17, F.sectors);
      }),
    );
  }
  fixtures['dynamic, creator qemu with the maximum CHS geometry (size from current_size)'] = await patched(dynamic, 'maxchs.vhd', (b) =>
    editFooters(b, (f) => {
      f.writeUInt16BE(65535, F.cylinders);
      f.writeUInt8(16, F.heads);
      f.writeUInt8(255, F.sectors);
    }),
  );

  fixtures['fixed, 6 MiB'] = fixed = await fromRaw('fixed', 6 * MiB, 5, 'subformat=fixed');
  fixtures['fixed, force_size=on, odd size 5 000 192 bytes'] = await fromRaw('fixedforce', 5_000_192, 6, 'subformat=fixed,force_size=on');
  fixtures['fixed, odd size 3 500 000 bytes (CHS-rounded)'] = await fromRaw('fixedodd', 3_500_000, 7, 'subformat=fixed');
});
afterAll(async () => cleanup());

const DYNAMIC = [
  'dynamic (default), 6 MiB',
  'dynamic, force_size=on, 6 MiB',
  'dynamic, odd size 3 500 000 bytes (CHS-rounded)',
  'dynamic, force_size=on, odd size 5 000 192 bytes',
  'dynamic, data at block edges, written out of order, a zeroed range',
  'dynamic, nothing allocated',
  'dynamic, creator app "win " with CHS below current size',
  'dynamic, creator app "d2v " with CHS below current size',
  'dynamic, creator app "vpc " with CHS below current size',
  'dynamic, creator app "tap\\u0000" with CHS below current size',
  'dynamic, creator app "CTXS" with CHS below current size',
  'dynamic, creator app "qem2" with CHS below current size',
  'dynamic, creator qemu with the maximum CHS geometry (size from current_size)',
];
const FIXED = ['fixed, 6 MiB', 'fixed, force_size=on, odd size 5 000 192 bytes', 'fixed, odd size 3 500 000 bytes (CHS-rounded)'];

describe('vpc: agrees with qemu-img', () => {
  it.each(DYNAMIC)('%s: convert and info (probed)', async (name) => {
    const file = fixtures[name] as string;
    expect(file, name).toBeDefined();
    await expectSameAsQemu(file);
  });

  it('the creator app decides the size as in iotest 146', async () => {
    const sizes: Record<string, number> = {};
    for (const name of DYNAMIC.filter((n) => n.includes('creator'))) {
      sizes[name] = ((await qemuInfo(fixtures[name] as string))['virtual-size']) as number;
    }
    const chs = 100 * 4 * 17 * 512;
    expect(sizes['dynamic, creator app "vpc " with CHS below current size']).toBe(chs);
    // qemu-img wrote the CHS-rounded size as current_size too; the patched geometry is smaller.
    const currentSize = Number((await readFile(dynamic)).readBigUInt64BE(F.currentSize));
    expect(currentSize).toBeGreaterThan(chs);
    for (const app of ['win ', 'd2v ', 'tap\\u0000', 'CTXS', 'qem2']) expect(sizes[`dynamic, creator app "${app}" with CHS below current size`]).toBe(currentSize);
  });

  it.each(FIXED)('%s: probed as raw, as qemu-img probes it (footer only at the end)', async (name) => {
    const file = fixtures[name] as string;
    const info = await runDiskconv(['info', '--output=json', file]);
    expect(JSON.parse(info.stdout).format).toBe('raw');
    await expectSameAsQemu(file);
  });

  it.each(FIXED)('%s: read as a VHD with -f vpc', async (name) => {
    await expectSameAsQemu(fixtures[name] as string, 'vpc');
  });

  it('check: vpc has none, exit 63 like qemu-img', async () => {
    const ours = await runDiskconv(['check', dynamic]);
    expect(ours.code).toBe(63);
    await expect(qemuImg('check', dynamic)).rejects.toMatchObject({ code: 63 });
  });
});

describe('vpc: map', () => {
  it('maps allocated blocks past their sector bitmaps and unallocated blocks as zeros', async () => {
    const bytes = await readFile(fixtures['dynamic, data at block edges, written out of order, a zeroed range'] as string);
    const image = await vpcDriver.open(new BufferSource(bytes), { limits: withLimits() });
    const entries: MapEntry[] = [];
    for await (const e of image.map()) entries.push(e);
    expect(entries.map((e) => [e.kind, e.offset, e.length])).toEqual([
      ['stored', 0, 2 * MiB],
      ['stored', 2 * MiB, 2 * MiB],
      ['stored', 4 * MiB, 2 * MiB],
      ['stored', 6 * MiB, 2 * MiB],
      ['stored', 8 * MiB, image.virtualSize - 8 * MiB],
    ]);
    // Each data area starts one 512-byte bitmap after the block's BAT sector.
    const batOffset = Number(bytes.readBigUInt64BE(D.at + D.tableOffset));
    expect((entries[0] as MapEntry & { fileOffset: number }).fileOffset).toBe(bytes.readUInt32BE(batOffset) * 512 + 512);
    expect(image.info()).toEqual({ clusterSize: 2 * MiB, dirty: false, identity: expect.stringMatching(/^[0-9a-f]{32}$/) });
  });
});

describe('vpc: sector bitmaps', () => {
  it('an allocated block whose bitmap marks no sector is still read whole, as qemu reads it', async () => {
    const file = await patched(dynamic, 'bitmap-cleared.vhd', (b) => {
      const batOffset = Number(b.readBigUInt64BE(D.at + D.tableOffset));
      const bitmap = b.readUInt32BE(batOffset) * 512;
      b.fill(0, bitmap, bitmap + 512);
    });
    await expectSameAsQemu(file);
    const out = `${file}.raw`;
    await runDiskconv(['convert', '-O', 'raw', file, out]);
    // Block 0 holds data (not zeros) although its bitmap says no sector is present.
    expect((await readFile(out)).subarray(0, 2 * MiB).some((x) => x !== 0)).toBe(true);
  });
});

describe('vpc: refusals', () => {
  const variant = async (edit: (b: Buffer) => void, from = dynamic): Promise<Buffer> => {
    const b = await readFile(from);
    edit(b);
    return b;
  };

  it('a differencing VHD alone is UNSAFE_IMAGE, naming its parent and asking for a bundle with it', async () => {
    const file = await patched(dynamic, 'diff.vhd', (b) => editFooters(b, (f) => f.writeUInt32BE(4, F.diskType)));
    const cli = await runDiskconv(['convert', '-O', 'raw', file, `${file}.out`]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toMatch(/^diskconv: UNSAFE_IMAGE: .*differencing VHD \(disk type 4\) that names no parent.*tar or zip bundle holding both.*\n$/);
    // qemu reads it, ignoring the parent: exactly what we must not do.
    expect((await qemuOutcome(file)).ok).toBe(true);
  });

  it('a bad footer checksum is IMAGE_CORRUPT, as qemu-img refuses it', async () => {
    const file = await patched(dynamic, 'badsum.vhd', (b) => {
      b[F.creatorApp] = 0x51;
      b[b.length - 512 + F.creatorApp] = 0x51;
    });
    expect(await engineOutcome(await readFile(file))).toBe('IMAGE_CORRUPT');
    expect(await qemuOutcome(file)).toMatchObject({ ok: false, error: expect.stringMatching(/Incorrect header checksum/) });
  });

  it.each([
    ['a BAT entry whose block lies past the end of the file', (b: Buffer) => b.writeUInt32BE(b.length / 512 + 8, b.readUInt32BE(D.at + D.tableOffset + 4)), 'IMAGE_CORRUPT', /truncated/],
    ['a bad dynamic header cookie', (b: Buffer) => b.write('cxsparsX', D.at, 'latin1'), 'IMAGE_CORRUPT', /Invalid header magic/],
    ['a block size that is not a power of two', (b: Buffer) => b.writeUInt32BE(3 * MiB, D.at + D.blockSize), 'IMAGE_CORRUPT', /Invalid block size/],
    ['a BAT too small for the disk', (b: Buffer) => b.writeUInt32BE(1, D.at + D.maxTableEntries), 'IMAGE_CORRUPT', /Page table too small/],
    ['a huge Max Table Entries (iotest 135)', (b: Buffer) => b.writeUInt32BE(0x40000001, D.at + D.maxTableEntries), 'IMAGE_CORRUPT', /Max Table Entries too large/],
    ['a BAT past the end of the file', (b: Buffer) => b.writeBigUInt64BE(BigInt(b.length), D.at + D.tableOffset), 'IMAGE_CORRUPT', /truncated/],
  ] as const)('%s is refused as qemu-img refuses it', async (what, edit, code, qemuSays) => {
    const bytes = await variant(edit);
    expect(await engineOutcome(bytes), what).toBe(code);
    const file = path(`refused-${what.replace(/\W+/g, '-')}.vhd`);
    await writeFile(file, bytes);
    expect(await qemuOutcome(file)).toMatchObject({ ok: false, error: expect.stringMatching(qemuSays) });
  });

  it('a block table larger than maxTopTableBytes is LIMIT_EXCEEDED', async () => {
    const bytes = await variant((b) => b.writeUInt32BE(0x1000000, D.at + D.maxTableEntries)); // a 64 MiB BAT
    const source = new BufferSource(bytes);
    await expect(vpcDriver.open(source, { limits: withLimits() })).rejects.toMatchObject({ code: 'LIMIT_EXCEEDED' });
  });

  it('BAT entries pointing into the footer copy, the dynamic header or the BAT are IMAGE_CORRUPT (qemu would read metadata as data)', async () => {
    for (const sector of [0, 1, 3]) {
      const bytes = await variant((b) => b.writeUInt32BE(sector, b.readUInt32BE(D.at + D.tableOffset + 4)));
      expect(await engineOutcome(bytes), `sector ${sector}`).toBe('IMAGE_CORRUPT');
    }
  });

  it('a truncated dynamic or fixed VHD is IMAGE_CORRUPT', async () => {
    const bytes = await readFile(dynamic);
    expect(await engineOutcome(bytes.subarray(0, bytes.length - 4096))).toBe('IMAGE_CORRUPT');
    const fixedBytes = await readFile(fixed);
    // The footer kept, data cut: the footer's size no longer fits.
    const cut = Buffer.concat([fixedBytes.subarray(0, MiB), fixedBytes.subarray(fixedBytes.length - 512)]);
    expect(await engineOutcome(cut, 'vpc')).toBe('IMAGE_CORRUPT');
  });

  it('a fixed footer at the end claiming a dynamic disk is IMAGE_CORRUPT (qemu has no BAT to read)', async () => {
    const bytes = await variant((b) => editFooters(b, (f) => f.writeUInt32BE(3, F.diskType), true), fixed);
    expect(await engineOutcome(bytes, 'vpc')).toBe('IMAGE_CORRUPT');
  });

  it('declaring -f vpc on bytes without any footer is FORMAT_MISMATCH', async () => {
    expect(await engineOutcome(mixedContent(MiB, 9), 'vpc')).toBe('FORMAT_MISMATCH');
  });

  it('a current size past 2040 GiB is refused before anything is read', async () => {
    const bytes = await variant((b) =>
      editFooters(b, (f) => {
        f.write('win ', F.creatorApp, 'latin1');
        f.writeBigUInt64BE(2041n * 2n ** 30n, F.currentSize);
      }),
    );
    expect(await engineOutcome(bytes)).toBe('UNSUPPORTED_FEATURE');
  });
});
