import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, qemuIo, qemuRawSha256, run, settle, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, isDiskconvError, openImage, readExtents, type DiskImage, type MapEntry } from '../../../src/engine/index.js';
import { vdiDriver } from '../../../src/engine/formats/vdi.js';
import { withLimits } from '../../../src/engine/limits.js';

const MiB = 2 ** 20;

/** Header field offsets (VirtualBox VDICore.h, qemu's VdiHeader), written here independently of the driver. */
const H = {
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  offsetBmap: 0x154,
  offsetData: 0x158,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blockExtra: 0x17c,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
} as const;

let dir: string;
let cleanup: () => Promise<void>;

const u32 = (b: Buffer, off: number): number => b.readUInt32LE(off);
const path = (name: string): string => join(dir, name);

/** Disk content with whole zero blocks (left unallocated by qemu-img) between real-looking data. */
function contentWithHoles(size: number, seed: number): Buffer {
  const buf = mixedContent(size, seed);
  buf.fill(0, Math.min(size, MiB), Math.min(size, 2 * MiB));
  return buf;
}

async function vdiFromRaw(name: string, size: number, seed: number, isStatic: boolean): Promise<string> {
  const raw = path(`${name}.raw`);
  await writeFile(raw, contentWithHoles(size, seed));
  const out = path(`${name}.vdi`);
  await qemuImg('convert', '-O', 'vdi', ...(isStatic ? ['-o', 'static=on'] : []), raw, out);
  return out;
}

async function patched(from: string, name: string, edit: (b: Buffer) => Buffer | void): Promise<string> {
  const bytes = await readFile(from);
  const result = edit(bytes) ?? bytes;
  const out = path(name);
  await writeFile(out, result);
  return out;
}

/** Outcome of opening and fully reading an image through the engine. */
async function readAll(bytes: Uint8Array, format: 'vdi' | 'auto' = 'vdi'): Promise<{ ok: true; image: DiskImage } | { ok: false; error: unknown }> {
  const source = new BufferSource(bytes);
  try {
    const image = await openImage(source, { format });
    let next = 0;
    for await (const e of readExtents(image, source, { maxReadBytes: 300_000, batchBytes: 700_000 })) {
      if (e.offset !== next) throw new Error(`extent at ${e.offset}, expected ${next}`);
      next += e.length;
    }
    if (next !== image.virtualSize) throw new Error(`extents end at ${next}, expected ${image.virtualSize}`);
    return { ok: true, image };
  } catch (error) {
    return { ok: false, error };
  }
}

function expectCode(outcome: Awaited<ReturnType<typeof readAll>>, code: string): void {
  if (outcome.ok) throw new Error(`expected ${code}, but the image was read`);
  expect(isDiskconvError(outcome.error), String(outcome.error)).toBe(true);
  expect((outcome.error as { code: string }).code, String(outcome.error)).toBe(code);
}

async function mapOf(file: string): Promise<{ image: DiskImage; entries: MapEntry[] }> {
  const source = new BufferSource(await readFile(file));
  const image = await vdiDriver.open(source, { limits: withLimits() });
  const entries: MapEntry[] = [];
  for await (const e of image.map()) entries.push(e);
  return { image, entries };
}

function expectCovering(entries: MapEntry[], virtualSize: number): void {
  let next = 0;
  for (const e of entries) {
    expect(e.offset).toBe(next);
    expect(e.length).toBeGreaterThan(0);
    next += e.length;
  }
  expect(next).toBe(virtualSize);
}

const fixtures: Record<string, string> = {};
let dynamic4M: string;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vdi-'));
  fixtures['dynamic, 4 MiB'] = dynamic4M = await vdiFromRaw('dyn4m', 4 * MiB, 1, false);
  fixtures['static, 4 MiB'] = await vdiFromRaw('static4m', 4 * MiB, 2, true);
  fixtures['dynamic, 3.34 MiB (not a multiple of 1 MiB)'] = await vdiFromRaw('dynodd', 3_500_000, 3, false);
  fixtures['static, 3.34 MiB (not a multiple of 1 MiB)'] = await vdiFromRaw('staticodd', 3_500_000, 4, true);
  fixtures['static, 512 KiB (less than one block)'] = await vdiFromRaw('statictiny', 512 * 1024, 5, true);

  // Blocks allocated out of guest order, so data offsets are not monotonic.
  const scattered = path('scattered.vdi');
  await qemuImg('create', '-q', '-f', 'vdi', scattered, '6M');
  await qemuIo('-c', 'write -P 0x41 4M 1M', '-c', 'write -P 0x42 0 512k', '-c', 'write -P 0x43 1M 1M', '-c', 'write -P 0x44 5632k 4k', scattered);
  fixtures['dynamic, blocks allocated out of order'] = scattered;

  const empty = path('empty.vdi');
  await qemuImg('create', '-q', '-f', 'vdi', empty, '5M');
  fixtures['dynamic, nothing allocated'] = empty;

  // VBoxManage convertfromraw writes disk sizes that are not sector multiples; qemu rounds them up.
  fixtures['disk size not a multiple of 512'] = await patched(fixtures['dynamic, 3.34 MiB (not a multiple of 1 MiB)'] as string, 'oddsize.vdi', (b) => {
    b.writeBigUInt64LE(3_499_001n, H.diskSize);
  });
  // A discarded block (0xfffffffe) reads as zeros.
  fixtures['a discarded block map entry'] = await patched(scattered, 'discarded.vdi', (b) => {
    b.writeUInt32LE(0xfffffffe, u32(b, H.offsetBmap) + 4 * 4);
  });
  await settle(Object.values(fixtures));
});
afterAll(async () => cleanup());

describe('vdi: agrees with qemu-img', () => {
  it.each(['dynamic, 4 MiB', 'static, 4 MiB', 'dynamic, 3.34 MiB (not a multiple of 1 MiB)', 'static, 3.34 MiB (not a multiple of 1 MiB)', 'static, 512 KiB (less than one block)', 'dynamic, blocks allocated out of order', 'dynamic, nothing allocated', 'disk size not a multiple of 512', 'a discarded block map entry'])(
    '%s: convert, info and check',
    async (name) => {
      const src = fixtures[name] as string;
      const dst = `${src}.out`;
      const conv = await runDiskconv(['convert', '-O', 'raw', src, dst]);
      expect(conv.stderr).toBe('');
      expect(conv.code).toBe(0);
      expect(await sha256File(dst)).toBe(await qemuRawSha256(src, dir));

      const info = await runDiskconv(['info', '--output=json', src]);
      expect(info.code).toBe(0);
      expect(JSON.parse(info.stdout)).toEqual(pickInfo(await qemuInfo(src)));

      if (name === 'a discarded block map entry') return; // blocks_allocated no longer matches: checked below
      const check = await runDiskconv(['check', src]);
      expect(check.code, check.stdout + check.stderr).toBe(0);
      await expect(qemuImg('check', src)).resolves.toBeDefined();
    },
  );

  it('reports the count mismatch of a discarded entry as qemu-img check does', async () => {
    const src = fixtures['a discarded block map entry'] as string;
    const ours = await runDiskconv(['check', '--output=json', src]);
    const theirs = await run('qemu-img', ['check', '--output=json', src]).then(
      (r) => ({ code: 0, stdout: r.stdout }),
      (e: { code: number; stdout: string }) => ({ code: e.code, stdout: e.stdout }),
    );
    expect(ours.code).toBe(theirs.code);
    expect(JSON.parse(ours.stdout).corruptions).toBe(JSON.parse(theirs.stdout).corruptions);
  });
});

describe('vdi: map', () => {
  it('merges contiguous blocks into single entries and covers the disk', async () => {
    const { image, entries } = await mapOf(fixtures['static, 4 MiB'] as string);
    expect(entries).toEqual([{ kind: 'stored', offset: 0, length: 4 * MiB, fileOffset: expect.any(Number), preallocated: true }]);
    expect(image.info()).toEqual({ clusterSize: MiB, dirty: false });

    const dyn = await mapOf(dynamic4M);
    expect(dyn.entries.map((e) => [e.kind, e.offset, e.length])).toEqual([
      ['stored', 0, MiB],
      ['zero', MiB, MiB],
      ['stored', 2 * MiB, 2 * MiB],
    ]);
  });

  it('cuts the last block to the virtual size', async () => {
    const { image, entries } = await mapOf(fixtures['disk size not a multiple of 512'] as string);
    expect(image.virtualSize).toBe(3_499_008);
    expectCovering(entries, image.virtualSize);
    // Blocks 2 and 3 are contiguous in the file: one entry, ending mid-block 3 at the rounded-up size.
    expect(entries[entries.length - 1]).toMatchObject({ kind: 'stored', offset: 2 * MiB, length: 3_499_008 - 2 * MiB });
  });

  it('yields ordered, contiguous map and extent streams covering [0, virtual size) for every fixture', async () => {
    for (const file of Object.values(fixtures)) {
      const { image, entries } = await mapOf(file);
      expectCovering(entries, image.virtualSize);
      const outcome = await readAll(await readFile(file));
      expect(outcome.ok, file).toBe(true);
    }
  });

  it('keeps out-of-order blocks apart', async () => {
    const { entries } = await mapOf(fixtures['dynamic, blocks allocated out of order'] as string);
    expect(entries.map((e) => [e.kind, e.offset, e.length])).toEqual([
      ['stored', 0, 2 * MiB], // guest blocks 0 and 1 were allocated second and third: adjacent in the file
      ['zero', 2 * MiB, 2 * MiB],
      ['stored', 4 * MiB, MiB], // allocated first
      ['stored', 5 * MiB, MiB], // allocated last
    ]);
    const [b01, , b4, b5] = entries as [MapEntry & { fileOffset: number }, MapEntry, MapEntry & { fileOffset: number }, MapEntry & { fileOffset: number }];
    expect(b4.fileOffset).toBe(b01.fileOffset - MiB);
    expect(b5.fileOffset).toBe(b01.fileOffset + 2 * MiB);
  });
});

describe('vdi: refusals', () => {
  it.each([
    ['link', H.uuidLink],
    ['parent', H.uuidParent],
  ])('refuses a differencing image (non-null %s UUID) like qemu, as UNSAFE_IMAGE', async (what, offset) => {
    const file = await patched(dynamic4M, `${what}-uuid.vdi`, (b) => {
      b[offset + 3] = 0x5a;
    });
    expectCode(await readAll(await readFile(file)), 'UNSAFE_IMAGE');
    await expect(qemuImg('info', file)).rejects.toThrow(new RegExp(`non-NULL ${what} UUID`));
    const cli = await runDiskconv(['convert', '-O', 'raw', file, `${file}.out`]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toMatch(/^diskconv: UNSAFE_IMAGE: .*differencing.*\n$/);
  });

  it('refuses a block map entry beyond blocks_allocated, and check counts it', async () => {
    const file = await patched(dynamic4M, 'entry-range.vdi', (b) => {
      b.writeUInt32LE(0x1000, u32(b, H.offsetBmap));
    });
    expectCode(await readAll(await readFile(file)), 'IMAGE_CORRUPT');
    // qemu-img check finds the same corruptions (entry too large, allocated count mismatch).
    const ours = await runDiskconv(['check', '--output=json', file]);
    const theirs = await run('qemu-img', ['check', '--output=json', file]).catch((e: { code: number; stdout: string }) => e);
    expect(ours.code).toBe(2);
    expect('code' in theirs && theirs.code).toBe(2);
    expect(JSON.parse(ours.stdout).corruptions).toBe(JSON.parse(theirs.stdout).corruptions);
  });

  it('refuses two entries sharing one data block in check', async () => {
    const file = await patched(dynamic4M, 'shared-block.vdi', (b) => {
      const bmap = u32(b, H.offsetBmap);
      b.writeUInt32LE(u32(b, bmap), bmap + 4); // block 1 (a hole) now points at block 0's data
      b.writeUInt32LE(u32(b, H.blocksAllocated) + 1, H.blocksAllocated); // keep the count consistent
    });
    const ours = await runDiskconv(['check', '--output=json', file]);
    const theirs = await run('qemu-img', ['check', '--output=json', file]).catch((e: { stdout: string }) => e);
    expect(ours.code).toBe(2);
    expect(JSON.parse(ours.stdout).corruptions).toBe(JSON.parse(theirs.stdout).corruptions);
  });

  it('refuses data blocks past the end of the file (truncation)', async () => {
    const bytes = await readFile(dynamic4M);
    expectCode(await readAll(bytes.subarray(0, bytes.length - 4096)), 'IMAGE_CORRUPT');
    expectCode(await readAll(bytes.subarray(0, u32(bytes, H.offsetData) + MiB / 2)), 'IMAGE_CORRUPT');
  });

  it('refuses a bad signature, version, type, sector size, block size and block extra with typed errors', async () => {
    const base = await readFile(dynamic4M);
    const variant = (edit: (b: Buffer) => void): Buffer => {
      const b = Buffer.from(base);
      edit(b);
      return b;
    };
    const badSig = variant((b) => b.writeUInt32LE(0xbeda1070, H.signature));
    expectCode(await readAll(badSig, 'vdi'), 'FORMAT_MISMATCH');
    await expect(vdiDriver.open(new BufferSource(badSig), { limits: withLimits() })).rejects.toMatchObject({ code: 'FORMAT_MISMATCH' });
    expectCode(await readAll(variant((b) => b.writeUInt32LE(0x00010000, H.version))), 'UNSUPPORTED_FEATURE');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(0x00020001, H.version))), 'UNSUPPORTED_FEATURE');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(4, H.imageType))), 'UNSUPPORTED_FEATURE');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(4096, H.sectorSize))), 'UNSUPPORTED_FEATURE');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(2 * MiB, H.blockSize))), 'UNSUPPORTED_FEATURE');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(512, H.blockExtra))), 'UNSUPPORTED_FEATURE');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(0x100, H.headerSize))), 'IMAGE_CORRUPT');
    // Version checked before anything else: a bad version wins over a bad block size.
    expectCode(
      await readAll(
        variant((b) => {
          b.writeUInt32LE(0x00010002, H.version);
          b.writeUInt32LE(7, H.blockSize);
        }),
      ),
      'UNSUPPORTED_FEATURE',
    );
  });

  it('refuses huge block counts and disk sizes in bounded time', async () => {
    const base = await readFile(dynamic4M);
    const variant = (edit: (b: Buffer) => void): Buffer => {
      const b = Buffer.from(base);
      edit(b);
      return b;
    };
    // qemu's maximum block count: a 4 GiB block map, over maxTopTableBytes.
    expectCode(
      await readAll(
        variant((b) => {
          b.writeUInt32LE(0x3fffffff, H.blocksInImage);
          b.writeBigUInt64LE(0x3fffffffn * BigInt(MiB), H.diskSize);
        }),
      ),
      'LIMIT_EXCEEDED',
    );
    expectCode(await readAll(variant((b) => b.writeUInt32LE(0xffffffff, H.blocksInImage))), 'IMAGE_CORRUPT');
    // Within the limits, but the block map would lie past the end of the file.
    expectCode(await readAll(variant((b) => b.writeUInt32LE(4 * 2 ** 20, H.blocksInImage))), 'IMAGE_CORRUPT');
    expectCode(await readAll(variant((b) => b.writeBigUInt64LE(2n ** 62n, H.diskSize))), 'LIMIT_EXCEEDED');
    // Disk larger than its blocks hold.
    expectCode(await readAll(variant((b) => b.writeBigUInt64LE(5n * BigInt(MiB), H.diskSize))), 'IMAGE_CORRUPT');
  });

  it('refuses unaligned or overlapping metadata offsets', async () => {
    const base = await readFile(dynamic4M);
    const variant = (edit: (b: Buffer) => void): Buffer => {
      const b = Buffer.from(base);
      edit(b);
      return b;
    };
    expectCode(await readAll(variant((b) => b.writeUInt32LE(u32(b, H.offsetBmap) + 4, H.offsetBmap))), 'IMAGE_CORRUPT');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(u32(b, H.offsetData) + 100, H.offsetData))), 'IMAGE_CORRUPT');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(0, H.offsetBmap))), 'IMAGE_CORRUPT');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(u32(b, H.offsetBmap), H.offsetData))), 'IMAGE_CORRUPT');
    expectCode(await readAll(variant((b) => b.writeUInt32LE(0x7ffffe00, H.offsetData))), 'IMAGE_CORRUPT');
  });

  it('gives typed errors for every truncation at a header, block map or data boundary', async () => {
    const bytes = await readFile(dynamic4M);
    const bmap = u32(bytes, H.offsetBmap);
    const data = u32(bytes, H.offsetData);
    const cuts = [0x44, 0x48, 0x100, 0x180, 0x1ff, 0x200, bmap, bmap + 2, bmap + 8, data - 1, data, data + 512, data + MiB, bytes.length - 1];
    for (const cut of cuts) {
      const outcome = await readAll(bytes.subarray(0, cut));
      expect(outcome.ok, `truncated at ${cut}`).toBe(false);
      if (!outcome.ok) expect(isDiskconvError(outcome.error), `truncated at ${cut}: ${String(outcome.error)}`).toBe(true);
    }
  });

  it('survives bit flips of every size and offset field with a typed error or a consistent read', async () => {
    const base = await readFile(dynamic4M);
    const fields: Array<[string, number, number]> = [
      ['header size', H.headerSize, 4],
      ['image type', H.imageType, 4],
      ['offset bmap', H.offsetBmap, 4],
      ['offset data', H.offsetData, 4],
      ['sector size', H.sectorSize, 4],
      ['disk size', H.diskSize, 8],
      ['block size', H.blockSize, 4],
      ['block extra', H.blockExtra, 4],
      ['blocks in image', H.blocksInImage, 4],
      ['blocks allocated', H.blocksAllocated, 4],
    ];
    for (const [field, offset, width] of fields) {
      for (let bit = 0; bit < width * 8; bit++) {
        const b = Buffer.from(base);
        b[offset + (bit >> 3)] = (b[offset + (bit >> 3)] as number) ^ (1 << (bit & 7));
        const outcome = await readAll(b);
        if (!outcome.ok) expect(isDiskconvError(outcome.error), `${field} bit ${bit}: ${String(outcome.error)}`).toBe(true);
      }
    }
  });
});
