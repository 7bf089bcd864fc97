import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileAllocation, makeTempDir, mixedContent, qemuImg, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { runDiskconv } from '../helpers/cli.js';
import { BRIDGE_HOLE_BYTES, bridgeFileHoles } from '../../src/engine/reader.js';
import { seekHelper } from '../../src/engine/native.js';
import type { MapEntry } from '../../src/engine/types.js';

const KiB = 1024;
const MiB = 2 ** 20;

async function collect(entries: MapEntry[], fileSize: number, maxHole?: number): Promise<MapEntry[]> {
  async function* from(): AsyncGenerator<MapEntry> {
    yield* entries;
  }
  const out: MapEntry[] = [];
  for await (const e of bridgeFileHoles(from(), fileSize, maxHole)) out.push(e);
  return out;
}
const stored = (offset: number, length: number, fileOffset = offset): MapEntry => ({ kind: 'stored', offset, length, fileOffset });
const hole = (offset: number, length: number, fileOffset = offset): MapEntry => ({ kind: 'zero', offset, length, status: 'hole', fileOffset });

describe('bridgeFileHoles', () => {
  it('joins stored runs across short file holes into one run', async () => {
    const map = [stored(0, 8 * KiB), hole(8 * KiB, 4 * KiB), stored(12 * KiB, 4 * KiB), hole(16 * KiB, 60 * KiB), stored(76 * KiB, 4 * KiB)];
    expect(await collect(map, 80 * KiB)).toEqual([stored(0, 80 * KiB)]);
  });

  it('keeps long holes, trailing holes and holes of other kinds as they are', async () => {
    const long = [stored(0, 4 * KiB), hole(4 * KiB, BRIDGE_HOLE_BYTES + 4 * KiB), stored(BRIDGE_HOLE_BYTES + 8 * KiB, 4 * KiB)];
    expect(await collect(long, BRIDGE_HOLE_BYTES + 12 * KiB)).toEqual(long);
    const trailing = [stored(0, 4 * KiB), hole(4 * KiB, 4 * KiB)];
    expect(await collect(trailing, 8 * KiB)).toEqual(trailing);
    // A qcow2 zero cluster that kept its host cluster: not a file hole, its bytes need not be zeros.
    const zeroed: MapEntry[] = [stored(0, 4 * KiB), { kind: 'zero', offset: 4 * KiB, length: 4 * KiB, status: 'zeroed', fileOffset: 4 * KiB }, stored(8 * KiB, 4 * KiB)];
    expect(await collect(zeroed, 12 * KiB)).toEqual(zeroed);
    const unallocated: MapEntry[] = [stored(0, 4 * KiB), { kind: 'zero', offset: 4 * KiB, length: 4 * KiB }, stored(8 * KiB, 4 * KiB)];
    expect(await collect(unallocated, 12 * KiB)).toEqual(unallocated);
  });

  it('never joins runs whose file offsets do not follow the hole, encrypted runs, or past the end of the file', async () => {
    const moved = [stored(0, 4 * KiB, 100 * KiB), hole(4 * KiB, 4 * KiB, 104 * KiB), stored(8 * KiB, 4 * KiB, 200 * KiB)];
    expect(await collect(moved, 300 * KiB)).toEqual(moved);
    const cipher = { sectorSize: 512 } as unknown as NonNullable<Extract<MapEntry, { kind: 'stored' }>['cipher']>;
    const encrypted: MapEntry[] = [stored(0, 4 * KiB), hole(4 * KiB, 4 * KiB), { kind: 'stored', offset: 8 * KiB, length: 4 * KiB, fileOffset: 8 * KiB, cipher }];
    expect(await collect(encrypted, 12 * KiB)).toEqual(encrypted);
    // The raw driver's tail past the end of an unaligned file is a "hole" beyond fileSize.
    const tail = [stored(0, 1000), hole(1000, 24, 1000), stored(1024, 512)];
    expect(await collect(tail, 1000)).toEqual(tail);
  });

  it('passes a map without holes through unchanged', async () => {
    const map = [stored(0, 4 * KiB), stored(4 * KiB, 4 * KiB, 50 * KiB), { kind: 'zero', offset: 8 * KiB, length: 4 * KiB } as MapEntry];
    expect(await collect(map, 100 * KiB)).toEqual(map);
  });
});

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await makeTempDir()));
afterAll(async () => cleanup());

/** Many small data runs with short holes between them (the bench's fragmented regions), some of them written zeros. */
async function fragmentedFile(path: string, size: number): Promise<void> {
  const fh = await open(path, 'w');
  try {
    let at = 4 * KiB;
    for (let i = 0; at < size - MiB; i++) {
      const length = (1 + (i % 15)) * 4 * KiB;
      await fh.write(i % 7 === 3 ? Buffer.alloc(length) : mixedContent(length, i + 11), 0, length, at);
      at += length + (1 + ((i * 5) % 8)) * 4 * KiB + (i % 40 === 39 ? 2 * MiB : 0);
    }
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

describe('fragmented sparse sources (short holes read as zeros)', () => {
  it.skipIf(!seekHelper())('a fragmented raw file and a static VDI of it convert like qemu-img, and allocate no more than its output', async () => {
    const src = join(dir, 'frag.img');
    await fragmentedFile(src, 24 * MiB + 512);
    const vdi = join(dir, 'frag.vdi');
    await qemuImg('convert', '-f', 'raw', '-O', 'vdi', '-o', 'static=on', src, vdi);
    for (const [fmt, path] of [['raw', src], ['vdi', vdi]] as const) {
      const dst = join(dir, `frag-${fmt}.out`);
      const ref = join(dir, `frag-${fmt}.qemu`);
      const conv = await runDiskconv(['convert', '-f', fmt, '-O', 'raw', path, dst]);
      expect(conv.stderr).toBe('');
      expect(conv.code).toBe(0);
      expect(await sha256File(dst)).toBe(await qemuRawSha256(path, dir));
      await qemuImg('convert', '-f', fmt, '-O', 'raw', path, ref);
      // Range for range as qemu-img's output (SEEK_DATA/SEEK_HOLE): bridged holes are read as zeros, and zeros are not written.
      expect(await fileAllocation(dst)).toEqual(await fileAllocation(ref));
    }
  });
});
