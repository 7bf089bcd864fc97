/**
 * VMDK images made by qemu-img from mixed content: info, convert and check must
 * agree with qemu-img's own results.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, qemuIo, qemuRawSha256, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, FileSource, convertToRaw, openImage, readExtents, type MapEntry } from '../../../src/engine/index.js';
import { CountingSink } from '../../fuzz/counting-sink.js';

const MiB = 2 ** 20;
const KiB = 1024;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await makeTempDir('diskconv-vmdk-')));
afterAll(async () => cleanup());

interface Fixture {
  name: string;
  /** Builds the image in `dir` and returns its path. */
  build: (path: string) => Promise<void>;
}

async function fromRaw(path: string, size: number, seed: number, options: string[]): Promise<void> {
  const raw = `${path}.raw`;
  await writeFile(raw, mixedContent(size, seed));
  await qemuImg('convert', '-O', 'vmdk', ...(options.length ? ['-o', options.join(',')] : []), raw, path);
}

const SIZES = {
  aligned: 4 * MiB, // a whole number of 64 KiB grains
  unaligned: 4 * MiB + 37 * 512, // the last grain is partial
  odd: 1_000_000, // not even whole sectors: qemu rounds up
} as const;

const FIXTURES: Fixture[] = [
  ...Object.entries(SIZES).flatMap(([label, size], i): Fixture[] => [
    { name: `monolithicSparse-${label}`, build: (p) => fromRaw(p, size, 10 + i, []) },
    { name: `streamOptimized-${label}`, build: (p) => fromRaw(p, size, 20 + i, ['subformat=streamOptimized']) },
  ]),
  { name: 'compat6', build: (p) => fromRaw(p, SIZES.aligned, 31, ['compat6=on']) },
  { name: 'hwversion-14', build: (p) => fromRaw(p, SIZES.unaligned, 32, ['hwversion=14']) },
  { name: 'adapter-lsilogic', build: (p) => fromRaw(p, SIZES.aligned, 33, ['adapter_type=lsilogic']) },
  { name: 'adapter-buslogic', build: (p) => fromRaw(p, SIZES.unaligned, 34, ['adapter_type=buslogic']) },
  { name: 'adapter-legacyESX', build: (p) => fromRaw(p, SIZES.aligned, 35, ['adapter_type=legacyESX']) },
  { name: 'streamOptimized-lsilogic-hw7', build: (p) => fromRaw(p, SIZES.unaligned, 36, ['subformat=streamOptimized', 'adapter_type=lsilogic', 'hwversion=7']) },
  { name: 'streamOptimized-zeroed-grain', build: (p) => fromRaw(p, SIZES.aligned, 37, ['subformat=streamOptimized', 'zeroed_grain=on']) },
  {
    // Zeroed grains (GTE 1) next to data, written by qemu-io.
    name: 'zeroed-grain',
    build: async (p) => {
      await qemuImg('create', '-f', 'vmdk', '-o', 'zeroed_grain=on', p, String(3 * MiB + 512));
      await qemuIo('-c', 'write -P 0x5a 0 3M', '-c', 'write -z 64k 192k', '-c', 'write -z 1M 64k', '-c', 'write -P 0x33 3M 512', p);
    },
  },
  {
    // Grains allocated in reverse guest order: file offsets run backwards, nothing merges.
    name: 'out-of-order-grains',
    build: async (p) => {
      await qemuImg('create', '-f', 'vmdk', p, String(2 * MiB));
      const writes = [];
      for (let g = 31; g >= 0; g -= 3) writes.push('-c', `write -P ${(g * 7) & 0xff} ${g * 64}k ${g % 2 ? '64k' : '20k'}`);
      await qemuIo(...writes, p);
    },
  },
  {
    // Several grain tables (32 MiB each) with data in a few of them.
    name: 'multi-table-sparse',
    build: async (p) => {
      await qemuImg('create', '-f', 'vmdk', p, String(200 * MiB + 4096));
      await qemuIo('-c', 'write -P 1 0 100k', '-c', 'write -P 2 40M 64k', '-c', 'write -P 3 100M 1M', '-c', 'write -P 4 199M 1M', '-c', 'write -P 5 200M 4k', p);
    },
  },
];

describe('vmdk made by qemu-img', () => {
  for (const fixture of FIXTURES) {
    it(`${fixture.name}: info, convert and check agree with qemu-img`, async () => {
      const image = join(dir, `${fixture.name}.vmdk`);
      await fixture.build(image);

      const info = await runDiskconv(['info', '--output=json', image]);
      expect(info.stderr).toBe('');
      expect(pickInfo(JSON.parse(info.stdout) as Record<string, unknown>)).toEqual(pickInfo(await qemuInfo(image)));

      const out = join(dir, `${fixture.name}.out`);
      const conv = await runDiskconv(['convert', '-O', 'raw', image, out]);
      expect(conv.stderr).toBe('');
      expect(conv.code).toBe(0);
      expect(await sha256File(out)).toBe(await qemuRawSha256(image, dir));

      const check = await runDiskconv(['check', image]);
      expect(check.code).toBe(0);
      expect(check.stdout).toContain('No errors were found on the image.');
    });
  }
});

describe('vmdk extent stream', () => {
  it('is ordered, contiguous and covers the disk, in map and after the reader', async () => {
    for (const fixture of FIXTURES) {
      const path = join(dir, `${fixture.name}.vmdk`);
      const source = await FileSource.open(path);
      try {
        const image = await openImage(source);
        let next = 0;
        let previous: MapEntry | undefined;
        for await (const entry of image.map()) {
          expect(entry.offset, fixture.name).toBe(next);
          expect(entry.length, fixture.name).toBeGreaterThan(0);
          // Neighbours that could have merged did.
          if (previous?.kind === 'zero') expect(entry.kind, fixture.name).not.toBe('zero');
          if (previous?.kind === 'stored' && entry.kind === 'stored') {
            expect(previous.fileOffset + previous.length === entry.fileOffset, fixture.name).toBe(false);
          }
          next += entry.length;
          previous = entry;
        }
        expect(next, fixture.name).toBe(image.virtualSize);

        next = 0;
        for await (const e of readExtents(image, source, { maxReadBytes: 100_000, batchBytes: 300_000 })) {
          expect(e.offset).toBe(next);
          if (e.kind === 'data') expect(e.data.length).toBe(e.length);
          next += e.length;
        }
        expect(next).toBe(image.virtualSize);
        await image.close();
      } finally {
        await source.close();
      }
    }
  });

  it('converts with a grain table cache of a single table', async () => {
    const path = join(dir, 'multi-table-sparse.vmdk');
    const source = await FileSource.open(path);
    try {
      const image = await openImage(source, { limits: { tableCacheBytes: 2048 } });
      const result = await convertToRaw(image, source, new CountingSink(), { sha256: true });
      expect(result.sha256).toBe(await qemuRawSha256(path, dir));
      // A second pass (check, then convert) reads the tables again and agrees.
      expect((await image.check?.())?.corruptions).toBe(0);
      expect((await convertToRaw(image, source, new CountingSink(), { sha256: true })).sha256).toBe(result.sha256);
    } finally {
      await source.close();
    }
  });

  it('reads the same bytes from memory as from the file', async () => {
    const { readFile } = await import('node:fs/promises');
    const path = join(dir, 'streamOptimized-unaligned.vmdk');
    const source = new BufferSource(await readFile(path), path);
    const image = await openImage(source);
    expect(image.format).toBe('vmdk');
    expect((await convertToRaw(image, source, new CountingSink(), { sha256: true })).sha256).toBe(await qemuRawSha256(path, dir));
  });

  it('reports what qemu-img reports for the grain size', async () => {
    const path = join(dir, 'monolithicSparse-aligned.vmdk');
    const source = await FileSource.open(path);
    try {
      const image = await openImage(source);
      expect(image.info().clusterSize).toBe(64 * KiB);
    } finally {
      await source.close();
    }
  });
});

