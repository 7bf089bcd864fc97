/**
 * Compressed clusters decode on worker threads, in place in shared memory
 * (src/engine/decode-pool.ts, decompress.ts, reader.ts). Under vitest's
 * TypeScript loader the engine decodes inline, so these tests load the built
 * engine (dist/, made by the global setup) where the pool runs for real, and
 * check it against qemu-img: byte-identical output, damaged clusters refused
 * as qemu refuses them, a dying or failing decoder thread never blamed on the
 * image, bounded memory.
 */
import { execFile } from 'node:child_process';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, runDiskconv } from '../helpers/cli.js';
import { dataBytes, makeTempDir, mixedContent, qemuImg, sha256File } from '../helpers/qemu.js';
import { ImageBytes, qcow2CompressedEntry, qcow2Layout } from '../fixtures/hostile/layout.js';

type Engine = typeof import('../../src/engine/index.js');
type Decompress = typeof import('../../src/engine/decompress.js');
type Pool = typeof import('../../src/engine/decode-pool.js');
type CodecErrors = typeof import('../../src/engine/codec-error.js');

const dist = (rel: string): string => pathToFileURL(join(CLI, '..', rel)).href;
const engine = (await import(dist('engine/index.js'))) as Engine;
const decompress = (await import(dist('engine/decompress.js'))) as Decompress;
const { DecodePool } = (await import(dist('engine/decode-pool.js'))) as Pool;
const { CodecDataError } = (await import(dist('engine/codec-error.js'))) as CodecErrors;
const FAULTY_WORKER = new URL('../helpers/decode-worker-faulty.mjs', import.meta.url);

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;
let rawPath: string;
let rawSha: string;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-decode-pool-'));
  // 24 MiB of mixed data (random, text-like, zeros) with holes between, in a 64 MiB disk.
  rawPath = join(dir, 'source.raw');
  const disk = Buffer.alloc(64 * MiB);
  mixedContent(12 * MiB, 3).copy(disk, 0);
  mixedContent(8 * MiB, 4).copy(disk, 20 * MiB + 4096);
  mixedContent(4 * MiB, 5).copy(disk, 60 * MiB - 12288);
  await writeFile(rawPath, disk);
  rawSha = await sha256File(rawPath);
});
afterAll(async () => cleanup?.());

/** Converts with the built engine in this process; returns the output's sha256 and how the clusters decoded. */
async function convertBuilt(image: string, out: string): Promise<{ sha: string; offThread: number; inline: number }> {
  const before = decompress.decoderStats();
  const source = await engine.FileSource.open(image);
  try {
    const img = await engine.openImage(source);
    const sink = await engine.RawFileSink.create(out);
    await engine.convertToRaw(img, source, sink);
  } finally {
    await source.close();
  }
  const after = decompress.decoderStats();
  return { sha: await sha256File(out), offThread: after.offThread - before.offThread, inline: after.inline - before.inline };
}

const CASES: Array<[name: string, args: string[]]> = [
  ['qcow2 zlib', ['-O', 'qcow2', '-c', '-o', 'compression_type=zlib']],
  ['qcow2 zstd', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd']],
  ['qcow2 zlib, 4 KiB clusters', ['-O', 'qcow2', '-c', '-o', 'compression_type=zlib,cluster_size=4096']],
  ['qcow2 zstd, 2 MiB clusters', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd,cluster_size=2M']],
  ['vmdk streamOptimized', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
];

// Each case runs with the native decoder (native/codec on the libuv threadpool, where it built) and
// without it (the worker threads of decode-pool.ts, its fallback), in this process; the CLI as it comes.
for (const native of [true, false]) describe(`compressed clusters decode off the main thread (built engine, ${native ? 'native decoder where built' : 'worker threads'})`, () => {
  beforeAll(() => decompress.setNativeDecoding(native));
  afterAll(() => decompress.setNativeDecoding(true));

  it('the built engine has decoder threads on this machine', () => {
    expect(decompress.decodesOffThread()).toBe(true);
  });

  for (const [name, args] of CASES) {
    it(`${name}: identical to qemu-img, every cluster decoded off the main thread; the CLI too`, async () => {
      const image = join(dir, `${native ? 'n' : 'w'}-${name.replace(/\W+/g, '-')}.img`);
      await qemuImg('convert', '-f', 'raw', ...args, rawPath, image);
      const ref = join(dir, `${native ? 'n' : 'w'}-${name.replace(/\W+/g, '-')}.ref.raw`);
      await qemuImg('convert', '-O', 'raw', image, ref);
      expect(await sha256File(ref)).toBe(rawSha);
      const got = await convertBuilt(image, join(dir, `${native ? 'n' : 'w'}-${name.replace(/\W+/g, '-')}.out.raw`));
      expect(got.sha).toBe(rawSha);
      expect(got.offThread).toBeGreaterThan(0);
      expect(got.inline).toBe(0);
      const cliOut = join(dir, `${native ? 'n' : 'w'}-${name.replace(/\W+/g, '-')}.cli.raw`);
      const res = await runDiskconv(['convert', '-O', 'raw', image, cliOut]);
      expect(res.stderr).toBe('');
      expect(res.code).toBe(0);
      expect(await sha256File(cliOut)).toBe(rawSha);
      expect(await dataBytes(cliOut)).toBeLessThanOrEqual(await dataBytes(ref));
    });
  }

  it('damaged compressed clusters are refused as qemu-img refuses them (IMAGE_CORRUPT), from a worker thread', async () => {
    for (const codec of ['zlib', 'zstd']) {
      const image = join(dir, `${native ? 'n' : 'w'}-damaged-${codec}.qcow2`);
      await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-c', '-o', `compression_type=${codec}`, rawPath, image);
      const img = new ImageBytes(await readFile(image));
      const layout = qcow2Layout(img);
      expect(layout.compressedEntries.length).toBeGreaterThan(10);
      // A cluster in the middle: its bytes overwritten with 0xff (deflate: reserved block type; zstd: no frame magic).
      const entry = layout.compressedEntries[Math.floor(layout.compressedEntries.length / 2)] as number;
      const { offset } = qcow2CompressedEntry(img.getUint(entry, 8, 'be'), layout.clusterBits);
      img.buf.fill(0xff, offset, offset + 512);
      await writeFile(image, img.buf);
      await expect(qemuImg('convert', '-O', 'raw', image, join(dir, `${native ? 'n' : 'w'}-damaged-${codec}.ref.raw`))).rejects.toThrow();
      const before = decompress.decoderStats();
      const err = await convertBuilt(image, join(dir, `${native ? 'n' : 'w'}-damaged-${codec}.out.raw`)).then(() => undefined, (e: unknown) => e);
      expect(err, codec).toMatchObject({ code: 'IMAGE_CORRUPT', message: expect.stringContaining(`file offset ${offset}`) });
      expect(decompress.decoderStats().offThread, codec).toBeGreaterThan(before.offThread);
      const res = await runDiskconv(['convert', '-O', 'raw', image, join(dir, `${native ? 'n' : 'w'}-damaged-${codec}.cli.raw`)]);
      expect(res.code, codec).not.toBe(0);
      expect(res.stderr, codec).toMatch(/^diskconv: IMAGE_CORRUPT: /);
    }
  });

  // The CLI takes the native decoder where it built: once is enough.
  if (native) it('peak RSS stays bounded while 96 MiB of compressed clusters decode on the threads', async () => {
    const big = join(dir, 'big.raw');
    const disk = Buffer.alloc(128 * MiB);
    for (let i = 0; i < 12; i++) mixedContent(8 * MiB, 20 + i).copy(disk, i * 10 * MiB);
    await writeFile(big, disk);
    const image = join(dir, 'big.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-c', '-o', 'compression_type=zlib', big, image);
    const out = join(dir, 'big.out.raw');
    const { stderr } = await promisify(execFile)('/usr/bin/time', ['-f', 'maxrss=%M', process.execPath, CLI, 'convert', '-O', 'raw', image, out]);
    const rssKiB = Number(/maxrss=(\d+)/.exec(stderr)?.[1]);
    expect(await sha256File(out)).toBe(await sha256File(big));
    // Arenas are recycled: memory does not follow the amount decoded (issue 8: <= 200 MiB).
    expect(rssKiB / 1024).toBeLessThan(200);
  });
});

describe('DecodePool with a decoder thread that fails', () => {
  const decodeInline = (_codec: string, input: Uint8Array, decodedLength: number, alloc: (n: number) => Uint8Array): Uint8Array => {
    const out = alloc(decodedLength);
    out.fill(0);
    out.set(input.subarray(0, Math.min(input.length, decodedLength)));
    return out;
  };
  const bytes = (first: number, n = 64): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i === 0 ? first : i & 0xff));

  it('a thread that dies mid-batch fails its jobs as our error (not the data), and the next jobs get a new thread', async () => {
    const pool = new DecodePool(FAULTY_WORKER, {}, 2, decodeInline);
    // Warm up: a thread that has answered once is known to start.
    expect(Buffer.from(await pool.decode('deflate', bytes(1), 64)).equals(Buffer.from(bytes(1)))).toBe(true);
    const batch = [pool.decode('deflate', bytes(2), 64), pool.decode('deflate', bytes(0xee), 64), pool.decode('deflate', bytes(3), 64)];
    const settled = await Promise.allSettled(batch);
    const rejected = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected');
    expect(rejected.length).toBeGreaterThan(0);
    for (const r of rejected) {
      expect(r.reason).toBeInstanceOf(Error);
      expect(r.reason).not.toBeInstanceOf(CodecDataError);
      expect(String(r.reason.message)).toMatch(/decoder worker exited with code 7/);
    }
    // Later work still decodes, on a fresh thread.
    for (let i = 0; i < 8; i++) expect(Buffer.from(await pool.decode('deflate', bytes(10 + i), 64)).equals(Buffer.from(bytes(10 + i)))).toBe(true);
  });

  it("a decoder's bug is an internal error with the thread's stack; damaged data is CodecDataError", async () => {
    const pool = new DecodePool(FAULTY_WORKER, {}, 1, decodeInline);
    const bug = await pool.decode('deflate', bytes(0xef), 64).then(() => undefined, (e: unknown) => e);
    expect(bug).toBeInstanceOf(Error);
    expect(bug).not.toBeInstanceOf(CodecDataError);
    expect((bug as Error).message).toMatch(/decoder worker failed: decoder bug/);
    expect((bug as Error).stack).toMatch(/in the worker: TypeError: decoder bug/);
    await expect(pool.decode('deflate', bytes(0xed), 64)).rejects.toBeInstanceOf(CodecDataError);
  });

  it('where no thread can start at all, the jobs decode on the calling thread', async () => {
    const pool = new DecodePool(FAULTY_WORKER, { failAtStart: true }, 2, decodeInline);
    const results = await Promise.allSettled([pool.decode('deflate', bytes(4), 64), pool.decode('deflate', bytes(5), 64)]);
    // The jobs in flight when the first thread died fail; from then on the pool decodes inline.
    for (const r of results) if (r.status === 'rejected') expect(r.reason).not.toBeInstanceOf(CodecDataError);
    for (let i = 0; i < 4; i++) expect(Buffer.from(await pool.decode('deflate', bytes(20 + i), 64)).equals(Buffer.from(bytes(20 + i)))).toBe(true);
  });

  it('in place: input and output in shared memory, the result is a view of the target', async () => {
    const pool = new DecodePool(FAULTY_WORKER, {}, 1, decodeInline);
    const input = Buffer.from(new SharedArrayBuffer(64));
    input.set(bytes(6));
    const shared = new SharedArrayBuffer(4096);
    const target = new Uint8Array(shared, 1024, 128);
    const out = await pool.decode('deflate', input, 64, target);
    expect(out.buffer).toBe(shared);
    expect(out.byteOffset).toBe(1024);
    expect(Buffer.from(out).equals(Buffer.from(bytes(6)))).toBe(true);
  });
});
