import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { open, readFile, stat } from 'node:fs/promises';
import { dataBytes, fileAllocation, makeTempDir, qemuImg, seededBytes, sha256File } from '../helpers/qemu.js';
import { RawFileSink, type Extent } from '../../src/engine/index.js';
import { nativeCopier, nativeReader, nativeWriter } from '../../src/engine/native.js';
import { convertToRaw } from '../../src/engine/convert.js';
import { openImage } from '../../src/engine/index.js';
import { FileSource } from '../../src/engine/source.js';

const KiB = 1024;
const MiB = 2 ** 20;

/**
 * Extents as the reader hands them over: data with zero blocks inside at
 * aligned and unaligned places, data starting and ending off a 4 KiB boundary,
 * zero extents between, all in one shared buffer (views into it, as the
 * reader's arenas are).
 */
function extents(): { list: Extent[]; size: number } {
  const arena = Buffer.alloc(6 * MiB);
  seededBytes(arena.length, 7).copy(arena);
  arena.fill(0, 64 * KiB, 128 * KiB); // whole 4 KiB blocks of zeros inside data
  arena.fill(0, 200 * KiB + 100, 212 * KiB + 50); // zeros that cover whole blocks only in part
  arena.fill(0, 1 * MiB, 3 * MiB); // a long run of zeros
  arena.fill(0, 5 * MiB - 10, 5 * MiB + 4 * KiB); // zeros across a boundary between two extents
  const list: Extent[] = [];
  let at = 0;
  const data = (offset: number, length: number, from: number): void => {
    list.push({ kind: 'data', offset, length, data: arena.subarray(from, from + length) });
    at = offset + length;
  };
  const zero = (length: number): void => {
    list.push({ kind: 'zero', offset: at, length });
    at += length;
  };
  data(0, 3 * MiB, 0);
  zero(1 * MiB + 512);
  data(at, 1 * MiB + 1000, 3 * MiB); // starts 512 bytes into a block
  data(at, 1 * MiB - 1000 + 4 * KiB, 4 * MiB + 1000); // touches the previous one
  zero(8 * KiB);
  data(at, 3000, 5 * MiB + 200 * KiB); // smaller than a block
  zero(2 * MiB);
  return { list, size: at };
}

async function writeWith(path: string, how: 'native-batch' | 'js-batch' | 'per-extent', sparseBlock = 4096): Promise<void> {
  const sink = await RawFileSink.create(path, { sparseBlock, nativeWrites: how === 'native-batch' });
  const { list, size } = extents();
  if (how === 'per-extent') for (const e of list) await sink.write(e);
  else {
    // Two batches, cut in the middle, as the reader's batches come.
    await sink.writeBatch(list.slice(0, 3));
    await sink.writeBatch(list.slice(3));
  }
  await sink.finish(size);
}

/**
 * A raw file of runs of data, zeros written as data (every `zeroEvery`th run) and holes, at
 * 4 KiB starts that are not cluster-aligned: run i is (1 + i % lengths) × 4 KiB long and is
 * followed by a hole of ((i × gaps[0]) % gaps[1]) × 4 KiB.
 */
async function fragmentedRaw(name: string, o: { runs: number; size: number; lengths: number; zeroEvery: number; gaps: [number, number] }): Promise<string> {
  const path = join(dir, name);
  const fh = await open(path, 'w');
  for (let i = 0, at = 0; i < o.runs; i++) {
    const length = (1 + (i % o.lengths)) * 4 * KiB;
    await fh.write(i % o.zeroEvery === o.zeroEvery >> 1 ? Buffer.alloc(length) : seededBytes(length, i + 1), 0, length, at);
    at += length + ((i * o.gaps[0]) % o.gaps[1]) * 4 * KiB;
  }
  await fh.truncate(o.size);
  await fh.close();
  return path;
}

/** `raw` converted by qemu-img to NAME (with `opts`), and that image converted back to raw by qemu-img: the reference. */
async function imageAndReference(raw: string, name: string, opts: readonly string[]): Promise<{ img: string; ref: string }> {
  const img = join(dir, name);
  await qemuImg('convert', ...opts, raw, img);
  const ref = join(dir, `${name}.qemu.raw`);
  await qemuImg('convert', '-O', 'raw', img, ref);
  return { img, ref };
}

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await makeTempDir()));
afterAll(async () => cleanup());

describe('RawFileSink.writeBatch', () => {
  for (const sparseBlock of [4096, 512, 65536, 0]) {
    it(`writes the same bytes and allocates the same blocks natively, in JavaScript and extent by extent (-S ${sparseBlock})`, async () => {
      const [a, b, c] = ['native-batch', 'js-batch', 'per-extent'].map((how) => join(dir, `${how}-${sparseBlock}.raw`)) as [string, string, string];
      await writeWith(a, 'native-batch', sparseBlock);
      await writeWith(b, 'js-batch', sparseBlock);
      await writeWith(c, 'per-extent', sparseBlock);
      const bytes = await readFile(c);
      expect((await readFile(a)).equals(bytes)).toBe(true);
      expect((await readFile(b)).equals(bytes)).toBe(true);
      // The expected content, independently: every data extent's bytes at its offset, zeros elsewhere.
      const { list, size } = extents();
      const expected = Buffer.alloc(size);
      for (const e of list) if (e.kind === 'data') expected.set(e.data, e.offset);
      expect(bytes.equals(expected)).toBe(true);
      // The same data and hole ranges (not st_blocks, which also counts ext4's extent-tree blocks).
      const ranges = await Promise.all([a, b, c].map(fileAllocation));
      expect(ranges[0]).toEqual(ranges[2]);
      expect(ranges[1]).toEqual(ranges[2]);
      const blocks = await Promise.all([a, b, c].map(async (p) => (await stat(p)).blocks));
      if (sparseBlock === 4096) expect(blocks[2] as number).toBeLessThan(size / 512 / 2); // the zero runs stayed holes
      if (sparseBlock === 0) expect(blocks[2] as number).toBeGreaterThanOrEqual(size / 512); // -S 0: every byte written
    });
  }

  it.skipIf(!nativeWriter())('the native writer reports a failing write with its errno code, as fs does', async () => {
    const path = join(dir, 'readonly.raw');
    await (await open(path, 'w')).close();
    const handle = await open(path, 'r'); // not writable: pwrite fails with EBADF
    const sink = RawFileSink.fromHandle(handle, path, { sparseBlock: 4096 });
    const err = (await sink.writeBatch([{ kind: 'data', offset: 0, length: 4096, data: Buffer.alloc(4096, 1) }]).catch((e: unknown) => e)) as NodeJS.ErrnoException;
    expect(err).toBeInstanceOf(Error);
    expect(err.code).toBe('EBADF');
    expect(err.syscall).toBe('pwrite');
    await sink.abort();
  });

  it.skipIf(!nativeWriter())('the native writer refuses arguments that are not views and integer positions', () => {
    const write = nativeWriter() as NonNullable<ReturnType<typeof nativeWriter>>;
    expect(() => write(1, [Buffer.alloc(1)], [], 4096)).toThrow(TypeError);
    expect(() => write(1, ['x' as unknown as Uint8Array], [0], 4096)).toThrow(TypeError);
    expect(() => write(1, [Buffer.alloc(1)], [-1], 4096)).toThrow(TypeError);
    expect(() => write(1, [Buffer.alloc(1)], [0.5], 4096)).toThrow(TypeError);
    expect(() => write(-1, [], [], 4096)).toThrow(TypeError);
  });

  it('convertToRaw through writeBatch converts a fragmented qcow2 and a static VDI byte-identical to qemu-img, allocating no more', async () => {
    const raw = await fragmentedRaw('frag.raw', { runs: 200, size: 16 * MiB, lengths: 15, zeroEvery: 7, gaps: [13, 9] });
    for (const [name, opts] of [['frag.qcow2', ['-O', 'qcow2']], ['frag.vdi', ['-O', 'vdi', '-o', 'static=on']]] as const) {
      const { img, ref } = await imageAndReference(raw, name, opts);
      const out = join(dir, `${name}.ours.raw`);
      const source = await FileSource.open(img);
      try {
        const image = await openImage(source, {});
        await convertToRaw(image, source, await RawFileSink.create(out), { batchBytes: 256 * KiB });
      } finally {
        await source.close();
      }
      expect(await sha256File(out)).toBe(await sha256File(ref));
      expect(await dataBytes(out)).toBeLessThanOrEqual(await dataBytes(ref));
    }
  });
});

describe('FileSource.readIntoMany', () => {
  it.skipIf(!nativeReader())('fills every view from its offset in one call, short only at the end of the file', async () => {
    const path = join(dir, 'many.bin');
    const bytes = seededBytes(3 * MiB + 777, 11);
    await (await open(path, 'w')).writeFile(bytes);
    const source = await FileSource.open(path);
    try {
      const many = source.readIntoMany as NonNullable<FileSource['readIntoMany']>;
      const offsets = [0, 4096, 2 * MiB + 3, 3 * MiB, 3 * MiB + 700, bytes.length];
      const targets = [4096, 1 * MiB, 5000, 777, 200, 10].map((n) => Buffer.alloc(n, 0xee));
      const got = await many(targets, offsets);
      expect(got).toEqual([4096, 1 * MiB, 5000, 777, 77, 0]);
      targets.forEach((t, i) => {
        const at = offsets[i] as number;
        const n = got[i] as number;
        expect(t.subarray(0, n).equals(bytes.subarray(at, at + n))).toBe(true);
        expect(t.subarray(n).every((b) => b === 0xee)).toBe(true); // nothing written past what the file holds
      });
      // The same through readInto, one at a time.
      for (const [i, at] of offsets.entries()) {
        const t = Buffer.alloc(targets[i]?.length ?? 0);
        expect(await source.readInto(t, at)).toBe(got[i]);
      }
    } finally {
      await source.close();
    }
  });

  it('a qcow2 whose data clusters lie past the end of the file is IMAGE_CORRUPT, batched reads or not', async () => {
    const raw = join(dir, 'trunc.raw');
    await (await open(raw, 'w')).writeFile(seededBytes(4 * MiB, 5));
    const img = join(dir, 'trunc.qcow2');
    await qemuImg('convert', '-O', 'qcow2', raw, img);
    const full = (await stat(img)).size;
    const { truncate } = await import('node:fs/promises');
    await truncate(img, full - 3 * 65536);
    const source = await FileSource.open(img);
    try {
      const image = await openImage(source, {});
      const err = (await convertToRaw(image, source, await RawFileSink.create(join(dir, 'trunc.out'), { removeOnAbort: true })).catch((e: unknown) => e)) as { code?: string };
      expect(err.code).toBe('IMAGE_CORRUPT');
    } finally {
      await source.close();
    }
  });
});

describe('FileSource.copyToFile', () => {
  /** A source file of data with zero blocks inside, as extents() has them. */
  async function sourceFile(name: string): Promise<{ path: string; bytes: Buffer }> {
    const { list, size } = extents();
    const bytes = Buffer.alloc(size);
    for (const e of list) if (e.kind === 'data') bytes.set(e.data, e.offset);
    const path = join(dir, name);
    await (await open(path, 'w')).writeFile(bytes);
    return { path, bytes };
  }

  for (const sparseBlock of [4096, 512, 0]) {
    it.skipIf(!nativeCopier())(`copies runs to their positions, the same bytes and holes as writeExtents of the same views (-S ${sparseBlock})`, async () => {
      const { path, bytes } = await sourceFile(`copy-src-${sparseBlock}.bin`);
      // Runs moved on the guest, across the 1 MiB pieces, one ending at the file's end.
      const fileOffsets = [0, 3 * MiB + 512, 64 * KiB - 100, 5 * MiB + 200 * KiB];
      const lengths = [3 * MiB + 4096, 1 * MiB + 1000, 70 * KiB, bytes.length - (5 * MiB + 200 * KiB)];
      const positions = [8 * MiB, 0, 2 * MiB + 4096, 12 * MiB + 10];
      const copied = join(dir, `copied-${sparseBlock}.raw`);
      const written = join(dir, `written-${sparseBlock}.raw`);
      const source = await FileSource.open(path);
      const out = await open(copied, 'w');
      await out.truncate(16 * MiB); // as the sink's finish() sizes it
      try {
        const copy = source.copyToFile as NonNullable<FileSource['copyToFile']>;
        const got = await copy({ fd: out.fd, block: sparseBlock }, fileOffsets, lengths, positions);
        expect(got).toBe(lengths.reduce((a, b) => a + b, 0));
      } finally {
        await out.close();
        await source.close();
      }
      const wh = await open(written, 'w');
      await wh.truncate(16 * MiB);
      await (nativeWriter() as NonNullable<ReturnType<typeof nativeWriter>>)(
        wh.fd,
        fileOffsets.map((at, i) => bytes.subarray(at, at + (lengths[i] as number))),
        positions,
        sparseBlock,
      );
      await wh.close();
      const result = await readFile(copied);
      expect(result.equals(await readFile(written))).toBe(true);
      fileOffsets.forEach((at, i) => {
        const to = positions[i] as number;
        const n = lengths[i] as number;
        expect(result.subarray(to, to + n).equals(bytes.subarray(at, at + n))).toBe(true);
      });
      expect(await fileAllocation(copied)).toEqual(await fileAllocation(written));
    });
  }

  it.skipIf(!nativeCopier())('stops at the end of the file and says how much it read', async () => {
    const { path, bytes } = await sourceFile('copy-short.bin');
    const source = await FileSource.open(path);
    const out = await open(join(dir, 'copy-short.raw'), 'w');
    try {
      const copy = source.copyToFile as NonNullable<FileSource['copyToFile']>;
      expect(await copy({ fd: out.fd, block: 4096 }, [bytes.length - 5000], [3 * MiB], [0])).toBe(5000);
    } finally {
      await out.close();
      await source.close();
    }
  });

  it.skipIf(!nativeCopier())('a failed write is the fs error with syscall pwrite (ENOSPC on /dev/full), a failed read with syscall pread', async () => {
    const { path } = await sourceFile('copy-fail.bin');
    const source = await FileSource.open(path);
    const full = await open('/dev/full', 'w');
    const notReadable = await open(join(dir, 'copy-fail-wo.bin'), 'w');
    try {
      const copy = source.copyToFile as NonNullable<FileSource['copyToFile']>;
      const wrote = (await copy({ fd: full.fd, block: 4096 }, [0], [1 * MiB], [0]).catch((e: unknown) => e)) as NodeJS.ErrnoException;
      expect(wrote).toBeInstanceOf(Error);
      expect([wrote.code, wrote.syscall]).toEqual(['ENOSPC', 'pwrite']);
      const copier = nativeCopier() as NonNullable<ReturnType<typeof nativeCopier>>;
      const read = (await copier(notReadable.fd, full.fd, [0], [4096], [0], 4096, MiB).catch((e: unknown) => e)) as NodeJS.ErrnoException;
      expect([read.code, read.syscall]).toEqual(['EBADF', 'pread']);
    } finally {
      await full.close();
      await notReadable.close();
      await source.close();
    }
  });

  it.skipIf(!nativeCopier())('refuses arguments that are not integers or arrays of one length', () => {
    const copy = nativeCopier() as NonNullable<ReturnType<typeof nativeCopier>>;
    expect(() => copy(0, 1, [0], [1, 2], [0], 4096, MiB)).toThrow(TypeError);
    expect(() => copy(0, 1, [-1], [1], [0], 4096, MiB)).toThrow(TypeError);
    expect(() => copy(0, 1, [0], [0.5], [0], 4096, MiB)).toThrow(TypeError);
    expect(() => copy(-1, 1, [], [], [], 4096, MiB)).toThrow(TypeError);
    expect(() => copy(0, 1, [], [], [], 4096, 1000)).toThrow(TypeError); // the piece must be whole pages
  });

  it.skipIf(!nativeCopier())('an uncompressed image converted to a local file goes source to output in the copy trips, byte-identical to qemu-img', async () => {
    const raw = await fragmentedRaw('copy-frag.raw', { runs: 300, size: 24 * MiB, lengths: 13, zeroEvery: 5, gaps: [7, 11] });
    for (const [name, opts] of [['copy-frag.qcow2', ['-O', 'qcow2']], ['copy-frag.vmdk', ['-O', 'vmdk']], ['copy-frag.sparse.raw', ['-O', 'raw']]] as const) {
      const { img, ref } = await imageAndReference(raw, name, opts);
      const out = join(dir, `${name}.ours.raw`);
      const source = await FileSource.open(img);
      let copies = 0;
      const copy = source.copyToFile as NonNullable<FileSource['copyToFile']>;
      Object.defineProperty(source, 'copyToFile', { value: (...args: Parameters<typeof copy>) => (copies++, copy(...args)) });
      const seen = { written: 0, bytes: 0 };
      const sink = await RawFileSink.create(out);
      const writeBatch = sink.writeBatch.bind(sink);
      sink.writeBatch = async (batch) => {
        for (const e of batch) if (e.kind === 'data') e.written ? (seen.written += e.length) : (seen.bytes += e.length);
        return writeBatch(batch);
      };
      try {
        const image = await openImage(source, {});
        await convertToRaw(image, source, sink, { batchBytes: 512 * KiB });
      } finally {
        await source.close();
      }
      expect(await sha256File(out)).toBe(await sha256File(ref));
      expect(await dataBytes(out)).toBeLessThanOrEqual(await dataBytes(ref));
      expect(copies).toBeGreaterThan(1);
      expect(seen.bytes).toBe(0); // no stored byte went through JavaScript
      expect(seen.written).toBeGreaterThan(0);
    }
  });

  it.skipIf(!nativeCopier())('a qcow2 that shrank under the conversion is IMAGE_CORRUPT, not a short output', async () => {
    const raw = join(dir, 'shrink.raw');
    await (await open(raw, 'w')).writeFile(seededBytes(4 * MiB, 9));
    const img = join(dir, 'shrink.qcow2');
    await qemuImg('convert', '-O', 'qcow2', raw, img);
    const source = await FileSource.open(img);
    try {
      const image = await openImage(source, {});
      const { truncate } = await import('node:fs/promises');
      await truncate(img, 1 * MiB); // after it was opened: its size said the clusters are there
      const err = (await convertToRaw(image, source, await RawFileSink.create(join(dir, 'shrink.out'), { removeOnAbort: true })).catch((e: unknown) => e)) as { code?: string; message?: string };
      expect(err.code).toBe('IMAGE_CORRUPT');
      expect(err.message).toMatch(/short read/);
    } finally {
      await source.close();
    }
  });
});
