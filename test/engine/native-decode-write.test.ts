/**
 * Compressed clusters written by the thread that decoded them (native/codec
 * decodeWrite, decompress.ts decodeToFile, ReadOptions.directWrite): what lands
 * in the file must be exactly what decode() gives, at the right place, zero
 * blocks left as holes; whatever decode() refuses or the native side declines
 * is never written; a failed write is the fs error. And a whole conversion
 * through the direct path gives qemu-img's bytes.
 */
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { deflateRawSync, deflateSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decode, decodeToFile, setNativeDecoding, writesDirect, writeToFile } from '../../src/engine/decompress.js';
import { convertToRaw, FileSource, openImage, RawFileSink } from '../../src/engine/index.js';
import { readExtentBatches } from '../../src/engine/reader.js';
import type { Codec } from '../../src/engine/types.js';
import { makeTempDir, mixedContent, qemuImg, qemuRawSha256, seededBytes, sha256File } from '../helpers/qemu.js';
import { zstdFrame, zstdTool } from '../helpers/zstd.js';

const built = existsSync(join(import.meta.dirname, '..', '..', 'native', 'codec', 'build', 'Release', 'codec.node'));

function grain(stream: Uint8Array, size = stream.length): Uint8Array {
  const head = Buffer.alloc(12);
  head.writeUInt32LE(size, 8);
  return Buffer.concat([head, stream]);
}

function flipped(bytes: Uint8Array, seed: number, count = 8): Uint8Array[] {
  const flips = seededBytes(count * 2, seed);
  return Array.from({ length: count }, (_, i) => {
    const copy = Buffer.from(bytes);
    const at = ((flips[i * 2] as number) * 257 + (flips[i * 2 + 1] as number)) % copy.length;
    copy[at] = (copy[at] as number) ^ (1 << (i % 8));
    return copy;
  });
}

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-decode-write-'));
});
afterAll(async () => {
  setNativeDecoding(true);
  await cleanup();
});

/** What decode() with the JavaScript decoders gives: the bytes, or null where it refuses. */
async function reference(codec: Codec, input: Uint8Array, decodedLength: number): Promise<Buffer | null> {
  setNativeDecoding(false);
  try {
    return Buffer.from(await decode(codec, input, decodedLength, 'x'));
  } catch {
    return null;
  } finally {
    setNativeDecoding(true);
  }
}

describe.skipIf(!built)('decodeToFile: the bytes decode() gives, or nothing', () => {
  const cluster = 65536;
  const data = mixedContent(cluster, 21);
  const cases = (): Array<[string, Codec, Uint8Array]> => {
    const raw = deflateRawSync(data);
    const z = deflateSync(data);
    const list: Array<[string, Codec, Uint8Array]> = [
      ['zlib clean', 'deflate', raw],
      ['zlib short of the cluster', 'deflate', deflateRawSync(data.subarray(0, 1000))],
      ['zlib past the cluster', 'deflate', deflateRawSync(Buffer.concat([data, data.subarray(0, 99)]))],
      ['zlib garbage', 'deflate', Buffer.alloc(600, 0xff)],
      ...flipped(raw, 31).map((d, i): [string, Codec, Uint8Array] => [`zlib damaged ${i}`, 'deflate', d]),
      ['grain clean', 'vmdk-grain', grain(z)],
      ['grain shorter than the grain', 'vmdk-grain', grain(deflateSync(data.subarray(0, 5000)))],
      ['grain size past the bytes', 'vmdk-grain', grain(z, z.length + 1)],
      ...flipped(z, 32).map((d, i): [string, Codec, Uint8Array] => [`grain damaged ${i}`, 'vmdk-grain', grain(d)]),
    ];
    if (zstdTool) {
      const f = zstdFrame(data);
      list.push(
        ['zstd clean', 'zstd', f],
        ['zstd checksummed', 'zstd', zstdFrame(data, ['-3', '--check'])],
        ['zstd short of the cluster', 'zstd', zstdFrame(data.subarray(0, 2000))],
        ['zstd long window', 'zstd', zstdFrame(data, ['-6', '--long=24', '--no-content-size'])],
        ...flipped(f, 33).map((d, i): [string, Codec, Uint8Array] => [`zstd damaged ${i}`, 'zstd', d]),
      );
    }
    return list;
  };

  it('is there where the native decoder built', () => {
    expect(writesDirect()).toBe(true);
  });

  // Whole clusters and parts of them (a clipped range), at an offset that is not block-aligned.
  const ranges: Array<[number, number]> = [
    [0, cluster],
    [1000, 30000],
  ];
  for (const [name, codec, input] of cases()) {
    it(`${name}`, async () => {
      const want = await reference(codec, input, cluster);
      for (const [skip, length] of ranges) {
        const path = join(dir, `case-${name.replace(/\W+/g, '-')}-${skip}`);
        writeFileSync(path, '');
        const handle = await open(path, 'r+');
        const position = 3 * 4096 + 1000;
        let wrote: boolean;
        try {
          wrote = await decodeToFile(codec, input, cluster, { fd: handle.fd, block: 0 }, position, skip, length);
        } finally {
          await handle.close();
        }
        const file = readFileSync(path);
        if (!wrote) {
          expect(file.length, `${name} ${skip}: declined, nothing written`).toBe(0);
          // Clean clusters are never declined (a stream past its cluster, a long window, damage may be).
          if (/clean|checksummed/.test(name)) expect.fail(`${name}: a clean cluster was declined`);
          continue;
        }
        expect(want, `${name}: written although decode() refuses it`).not.toBeNull();
        expect((want as Buffer).length, `${name}: written although it decodes short`).toBeGreaterThanOrEqual(skip + length);
        expect(file.length).toBe(position + length);
        expect(file.subarray(0, position).every((b) => b === 0)).toBe(true);
        expect(file.subarray(position).equals((want as Buffer).subarray(skip, skip + length)), `${name} ${skip}: the bytes`).toBe(true);
      }
    });
  }

  it('leaves zero blocks (aligned to the file offset) as holes', async () => {
    const sparse = Buffer.alloc(cluster);
    sparse.fill(0x5a, 0, 100); // the first block has data, the other 15 are zeros
    const path = join(dir, 'sparse');
    writeFileSync(path, '');
    const handle = await open(path, 'r+');
    try {
      expect(await decodeToFile('deflate', deflateRawSync(sparse), cluster, { fd: handle.fd, block: 4096 }, 1 << 20, 0, cluster)).toBe(true);
      await handle.truncate((1 << 20) + cluster);
      await handle.datasync();
    } finally {
      await handle.close();
    }
    const file = readFileSync(path);
    expect(file.subarray(1 << 20).equals(sparse)).toBe(true);
    expect(statSync(path).blocks * 512).toBeLessThanOrEqual(8192);
  });

  it('a failed write is the fs error (ENOSPC on /dev/full), nothing decoded is lost silently', async () => {
    const handle = await open('/dev/full', 'w');
    try {
      const err = await decodeToFile('deflate', deflateRawSync(data), cluster, { fd: handle.fd, block: 4096 }, 0, 0, cluster).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Error);
      expect((err as { code?: string }).code).toBe('ENOSPC');
      expect((err as { syscall?: string }).syscall).toBe('pwrite');
    } finally {
      await handle.close();
    }
  });
});

describe.skipIf(!built)('writeToFile: stored runs written by the threadpool, in pieces', () => {
  it('writes [skip, skip + length) at the position, across piece cuts, zero blocks left as holes', async () => {
    // 3.5 MiB with runs of zeros (some block-aligned, some not), taken from an offset into the input,
    // written at a position that is not block-aligned: several 1 MiB pieces.
    const length = 3.5 * 2 ** 20;
    const skip = 777;
    const input = Buffer.concat([seededBytes(skip, 51), mixedContent(length, 52), seededBytes(333, 53)]);
    input.fill(0, skip + 2 ** 20 - 5000, skip + 2 ** 20 + 70000); // zeros across the first cut
    input.fill(0, skip + 3 * 2 ** 20, skip + length); // a zero tail
    const position = 5 * 4096 + 1234;
    const path = join(dir, 'stored-run');
    writeFileSync(path, '');
    const handle = await open(path, 'r+');
    try {
      expect(await writeToFile(input, { fd: handle.fd, block: 4096 }, position, skip, length)).toBe(true);
      await handle.truncate(position + length);
      await handle.datasync();
    } finally {
      await handle.close();
    }
    const file = readFileSync(path);
    expect(file.length).toBe(position + length);
    expect(file.subarray(0, position).every((b) => b === 0)).toBe(true);
    expect(file.subarray(position).equals(input.subarray(skip, skip + length)), 'the bytes').toBe(true);
    // The zero tail (half a MiB, block-aligned inside) and the zeros across the cut stay holes.
    expect(statSync(path).blocks * 512).toBeLessThanOrEqual(position + length - 2 ** 19 - 65536 + 4096);
  });

  it('refuses what is outside the input (nothing written) and a failed write is the fs error', async () => {
    const input = mixedContent(8192, 54);
    const path = join(dir, 'stored-outside');
    writeFileSync(path, '');
    const handle = await open(path, 'r+');
    try {
      expect(await writeToFile(input, { fd: handle.fd, block: 0 }, 0, 4096, 4097)).toBe(false);
      expect(await writeToFile(input, { fd: handle.fd, block: 0 }, 0, 0, 0)).toBe(false);
    } finally {
      await handle.close();
    }
    expect(readFileSync(path).length).toBe(0);
    const full = await open('/dev/full', 'w');
    try {
      const err = await writeToFile(Buffer.concat([input, input, input]), { fd: full.fd, block: 4096 }, 0, 0, 3 * 8192).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect((err as { code?: string }).code).toBe('ENOSPC');
      expect((err as { syscall?: string }).syscall).toBe('pwrite');
    } finally {
      await full.close();
    }
  });
});

describe.skipIf(!built)('conversions through the direct path give qemu-img bytes', () => {
  const images: Array<[string, string[]]> = [
    ['qcow2-zlib', ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536']],
    ['qcow2-zstd', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd,cluster_size=4096']],
    ['vmdk-stream', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
  ];
  let source: string;
  beforeAll(async () => {
    // Data, compressible text, zeros written as data and holes, at 4 KiB but not cluster-aligned starts.
    source = join(dir, 'source.raw');
    const size = 6 * 2 ** 20;
    const bytes = Buffer.alloc(size);
    mixedContent(2 ** 20, 41).copy(bytes, 4096);
    Buffer.from('the quick brown fox '.repeat(30000)).copy(bytes, 2 * 2 ** 20 + 12288, 0, 2 ** 20 - 12288);
    seededBytes(70000, 42).copy(bytes, 5 * 2 ** 20 - 4096 * 3);
    writeFileSync(source, bytes);
  });

  for (const [name, args] of images) {
    it(`${name}: direct writes, the same file as qemu-img's and as fs writes`, async () => {
      const image = join(dir, `${name}.img`);
      await qemuImg('convert', '-f', 'raw', ...args, source, image);
      const want = await qemuRawSha256(image, dir);
      const src = await FileSource.open(image);
      try {
        const opened = await openImage(src);
        // The reader with a direct target: compressed clusters come out written.
        const probe = join(dir, `${name}.probe`);
        writeFileSync(probe, '');
        const handle = await open(probe, 'r+');
        let written = 0;
        let notWritten = 0;
        try {
          for await (const batch of readExtentBatches(opened, src, { directWrite: { fd: handle.fd, block: 4096 } })) {
            for (const e of batch) if (e.kind === 'data') e.written ? (written += e.length) : (notWritten += e.length);
          }
        } finally {
          await handle.close();
        }
        expect(written, 'clusters written by the decoding threads').toBeGreaterThan(0);
        // The stored (incompressible) clusters between them too: the whole image is one batch here.
        expect(notWritten, 'stored runs of a compressed image written by the threadpool').toBe(0);
        expect(readFileSync(probe).equals(readFileSync(source).subarray(0, readFileSync(probe).length)), 'the probe holds the source bytes').toBe(true);

        for (const nativeWrites of [true, false]) {
          const out = join(dir, `${name}.${nativeWrites}.raw`);
          const sink = await RawFileSink.create(out, { nativeWrites });
          expect(sink.directTarget() !== undefined, 'direct target offered with native writes only').toBe(nativeWrites);
          await convertToRaw(opened, src, sink);
          expect(await sha256File(out), `${name} nativeWrites=${nativeWrites}`).toBe(want);
        }
        // Hashing needs the bytes: no direct writes then, and the digest is the file's.
        const hashed = join(dir, `${name}.hashed.raw`);
        const result = await convertToRaw(opened, src, await RawFileSink.create(hashed), { sha256: true });
        expect(result.sha256).toBe(want);
        expect(await sha256File(hashed)).toBe(want);
        await opened.close?.();
      } finally {
        await src.close();
      }
    });
  }
});
