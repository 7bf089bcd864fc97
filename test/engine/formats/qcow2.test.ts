/**
 * qcow2 images made by qemu-img and qemu-io: info, convert (with and without
 * internal snapshots) and check must agree with qemu-img's own results; images
 * we refuse must be refused with the right error code.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { open, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, qemuIo, qemuRawSha256, settle, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, FileSource, convertToRaw, openImage, readExtents, type MapEntry } from '../../../src/engine/index.js';
import { CountingSink } from '../../fuzz/counting-sink.js';

const KiB = 1024;
const MiB = 2 ** 20;

let dir: string;
let cleanup: () => Promise<void>;

interface Fixture {
  name: string;
  build: (path: string) => Promise<void>;
  /** Snapshot selectors to convert with `-l`, compared with qemu-img convert -l. */
  snapshots?: string[];
  /** Not a clean image: compare check's counters with qemu-img's instead of expecting exit 0. */
  unclean?: boolean;
}

async function fromRaw(path: string, size: number, seed: number, options: string[], extra: string[] = []): Promise<void> {
  const raw = `${path}.raw`;
  await writeFile(raw, mixedContent(size, seed));
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...extra, ...(options.length ? ['-o', options.join(',')] : []), raw, path);
}

async function create(path: string, size: number | string, options: string[] = []): Promise<void> {
  await qemuImg('create', '-q', '-f', 'qcow2', ...(options.length ? ['-o', options.join(',')] : []), path, String(size));
}

async function io(path: string, ...commands: string[]): Promise<void> {
  await qemuIo(...commands.flatMap((c) => ['-c', c]), path);
}

/** Exit code and stdout even when the command fails (qemu-img check exits 2 or 3 on findings). */
function runAllowingFailure(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

const UNALIGNED = 5 * MiB + 12345; // qemu rounds it up to whole sectors

const FIXTURES: Fixture[] = [
  // compat=0.10 (v2) and 1.1 (v3), cluster sizes, sizes that are and are not whole clusters.
  { name: 'v2-64k', build: (p) => fromRaw(p, 5 * MiB, 1, ['compat=0.10']) },
  { name: 'v2-4k-unaligned', build: (p) => fromRaw(p, UNALIGNED, 2, ['compat=0.10', 'cluster_size=4096']) },
  { name: 'v3-64k', build: (p) => fromRaw(p, 5 * MiB, 3, ['compat=1.1']) },
  { name: 'v3-64k-unaligned', build: (p) => fromRaw(p, UNALIGNED, 4, []) },
  { name: 'v3-512', build: (p) => fromRaw(p, 2 * MiB + 12345, 5, ['cluster_size=512']) },
  { name: 'v3-4k', build: (p) => fromRaw(p, 5 * MiB, 6, ['cluster_size=4096']) },
  { name: 'v3-2M-unaligned', build: (p) => fromRaw(p, UNALIGNED, 7, ['cluster_size=2M']) },
  { name: 'v2-512-unaligned', build: (p) => fromRaw(p, 1 * MiB + 999, 8, ['compat=0.10', 'cluster_size=512']) },
  // Extended L2 entries (subclusters): converted, and written piecemeal with zero and discarded subclusters.
  { name: 'extl2-64k-from-raw', build: (p) => fromRaw(p, UNALIGNED, 9, ['extended_l2=on', 'cluster_size=64k']) },
  {
    name: 'extl2-64k-subclusters',
    build: async (p) => {
      await create(p, UNALIGNED, ['extended_l2=on', 'cluster_size=64k']);
      await io(p, 'write -P 1 0 2k', 'write -P 2 6k 3k', 'write -z 64k 64k', 'write -P 3 128k 64k', 'write -z 130k 4k', 'discard 160k 8k', 'write -P 4 4M 10k', 'write -P 5 5M 12345', 'write -z 2M 1M', 'write -P 6 2M 2k');
    },
  },
  {
    name: 'extl2-2M-subclusters',
    build: async (p) => {
      await create(p, 7 * MiB, ['extended_l2=on', 'cluster_size=2M']);
      await io(p, 'write -P 1 0 64k', 'write -P 2 192k 100k', 'write -z 1M 512k', 'write -P 3 2M 2M', 'discard 2176k 128k', 'write -z 4M 64k', 'write -P 4 6M 5k');
    },
  },
  // Compressed clusters: zlib and zstd, several cluster sizes, and compressed clusters overwritten in part.
  { name: 'zlib-64k', build: (p) => fromRaw(p, UNALIGNED, 10, ['compression_type=zlib'], ['-c']) },
  { name: 'zstd-64k', build: (p) => fromRaw(p, 5 * MiB, 11, ['compression_type=zstd'], ['-c']) },
  { name: 'zstd-4k-unaligned', build: (p) => fromRaw(p, UNALIGNED, 12, ['compression_type=zstd', 'cluster_size=4096'], ['-c']) },
  { name: 'zstd-2M', build: (p) => fromRaw(p, 5 * MiB, 13, ['compression_type=zstd', 'cluster_size=2M'], ['-c']) },
  { name: 'zlib-v2-512', build: (p) => fromRaw(p, 2 * MiB, 14, ['compat=0.10', 'cluster_size=512'], ['-c']) },
  { name: 'zlib-extl2', build: (p) => fromRaw(p, 3 * MiB, 15, ['extended_l2=on'], ['-c']) },
  {
    name: 'zstd-partly-rewritten',
    build: async (p) => {
      await fromRaw(p, 5 * MiB, 16, ['compression_type=zstd'], ['-c']);
      await io(p, 'write -P 7 100k 300k', 'write -z 1M 200k', 'discard 2M 128k', 'write -P 8 4M 1k');
    },
  },
  // Features and allocation patterns.
  { name: 'lazy-refcounts', build: async (p) => (await fromRaw(p, 5 * MiB, 17, ['lazy_refcounts=on']), io(p, 'write -P 9 1M 333k')) },
  { name: 'refcount-bits-1', build: async (p) => (await create(p, 3 * MiB, ['refcount_bits=1']), io(p, 'write -P 1 0 1M', 'write -P 2 2M 4k')) },
  {
    name: 'zero-clusters-v3',
    build: async (p) => {
      await fromRaw(p, 5 * MiB, 18, []);
      await io(p, 'write -z 64k 192k', 'write -z -u 1M 128k', 'discard 2M 256k', 'write -z 3M 1000', 'write -P 3 4M 64k', 'write -z 4128k 64k');
    },
  },
  {
    name: 'zero-clusters-v2',
    build: async (p) => {
      await fromRaw(p, 3 * MiB, 19, ['compat=0.10']);
      await io(p, 'write -z 64k 192k', 'discard 1M 128k', 'write -z 2M 1000');
    },
  },
  { name: 'prealloc-metadata', build: async (p) => (await create(p, UNALIGNED, ['preallocation=metadata']), io(p, 'write -P 3 1M 100k', 'write -z 2M 64k')) },
  { name: 'prealloc-falloc', build: async (p) => (await create(p, 3 * MiB, ['preallocation=falloc']), io(p, 'write -P 4 1M 100k')) },
  {
    name: 'fragmented-reverse',
    build: async (p) => {
      await create(p, 2 * MiB, ['cluster_size=4096']);
      const writes: string[] = [];
      for (let c = 500; c >= 0; c -= 7) writes.push(`write -P ${c & 0xff} ${c * 4}k ${c % 3 ? '4k' : '6k'}`);
      await io(p, ...writes);
    },
  },
  {
    // L2 tables past the first one (16 KiB clusters: 32 MiB per table), whole tables unallocated.
    name: 'sparse-multi-l2',
    build: async (p) => (await create(p, 100 * MiB + 512, ['cluster_size=16k']), io(p, 'write -P 1 0 16k', 'write -P 2 31M 2M', 'write -P 3 99M 1M', 'write -P 4 100M 512')),
  },
  { name: 'empty', build: (p) => create(p, 5 * MiB) },
  { name: 'zero-size', build: (p) => create(p, 0) },
  {
    name: 'bitmaps',
    build: async (p) => {
      await fromRaw(p, 5 * MiB, 20, []);
      await qemuImg('bitmap', '--add', p, 'b0');
      await qemuImg('bitmap', '--add', '-g', '131072', p, 'bm1');
      await qemuImg('bitmap', '--add', '--disable', p, 'off');
    },
  },
  // Internal snapshots: data changed after each one; the disk grows after the first.
  {
    name: 'snapshots-v3',
    build: async (p) => {
      await fromRaw(p, 4 * MiB, 21, []);
      await qemuImg('snapshot', '-c', 's1', p);
      await io(p, 'write -P 0x41 100k 300k', 'write -z 1M 128k', 'discard 2M 64k');
      await qemuImg('snapshot', '-c', 's2', p);
      await qemuImg('resize', p, String(6 * MiB));
      await io(p, 'write -P 0x42 3M 2M', 'write -P 0x43 0 4k');
      // A snapshot named like another's id: a bare `-l 1` finds id 1 first.
      await qemuImg('snapshot', '-c', '1', p);
      await io(p, 'write -P 0x44 5M 4k');
    },
    snapshots: ['s1', 'snapshot.name=s2', 'snapshot.id=2', '1', '3', 'snapshot.name=1', 'snapshot.id=3,snapshot.name=1'],
  },
  {
    name: 'snapshots-v2-compressed',
    build: async (p) => {
      await fromRaw(p, 3 * MiB, 22, ['compat=0.10', 'cluster_size=4096'], ['-c']);
      await qemuImg('snapshot', '-c', 'before', p);
      await io(p, 'write -P 0x51 0 100k', 'write -z 1M 64k');
      await qemuImg('snapshot', '-c', 'after', p);
      await io(p, 'write -P 0x52 2M 8k');
    },
    snapshots: ['before', 'snapshot.name=after', 'snapshot.id=1'],
  },
  {
    name: 'snapshots-refcount-64',
    build: async (p) => {
      await create(p, 3 * MiB, ['refcount_bits=64', 'extended_l2=on']);
      await io(p, 'write -P 1 0 1M');
      await qemuImg('snapshot', '-c', 'a', p);
      await io(p, 'write -P 2 512k 1M', 'write -z 2M 16k');
    },
    snapshots: ['a'],
  },
  {
    // Lazy refcounts and a crash: dirty, with refcounts qemu-img check reports as wrong.
    name: 'dirty-lazy-refcounts',
    build: async (p) => {
      await create(p, 4 * MiB, ['lazy_refcounts=on']);
      await runAllowingFailure('qemu-io', ['-c', 'write -P 1 0 1M', '-c', 'write -P 2 2M 64k', '-c', 'abort', p]);
    },
    unclean: true,
  },
];

function imagePath(name: string): string {
  return join(dir, `${name}.qcow2`);
}

async function mapLimited<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) await fn(items[next++] as T);
    }),
  );
}

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-qcow2-'));
  await mapLimited(FIXTURES, 4, (f) => f.build(imagePath(f.name)));
  await settle(FIXTURES.map((f) => imagePath(f.name)));
});
afterAll(async () => cleanup());

/** `check --output=json` fields without ours-only and naming keys. */
function checkCounters(json: string): Record<string, unknown> {
  const parsed = JSON.parse(json) as Record<string, unknown>;
  delete parsed.messages;
  delete parsed.filename;
  return parsed;
}

describe('qcow2 made by qemu-img', () => {
  for (const fixture of FIXTURES) {
    it(`${fixture.name}: info, convert and check agree with qemu-img`, async () => {
      const image = imagePath(fixture.name);

      const info = await runDiskconv(['info', '--output=json', image]);
      expect(info.stderr).toBe('');
      expect(pickInfo(JSON.parse(info.stdout) as Record<string, unknown>)).toEqual(pickInfo(await qemuInfo(image)));

      const out = join(dir, `${fixture.name}.out`);
      const conv = await runDiskconv(['convert', '-O', 'raw', image, out]);
      expect(conv.stderr).toBe('');
      expect(conv.code).toBe(0);
      expect(await sha256File(out)).toBe(await qemuRawSha256(image, dir));

      for (const selector of fixture.snapshots ?? []) {
        const snapOut = join(dir, `${fixture.name}.snap.out`);
        const snap = await runDiskconv(['convert', '-l', selector, '-O', 'raw', image, snapOut]);
        expect(snap.stderr, selector).toBe('');
        expect(await sha256File(snapOut), selector).toBe(await qemuRawSha256(image, dir, ['-l', selector]));
      }

      const ours = await runDiskconv(['check', '--output=json', image]);
      const theirs = await runAllowingFailure('qemu-img', ['check', '--output=json', image]);
      expect(checkCounters(ours.stdout)).toEqual(checkCounters(theirs.stdout));
      expect(ours.code).toBe(theirs.code);
      if (!fixture.unclean) expect(ours.code).toBe(0);
    });
  }

  it('refuses an unknown snapshot with INVALID_ARGUMENT', async () => {
    const res = await runDiskconv(['convert', '-l', 'snapshot.name=nosuch', '-O', 'raw', imagePath('snapshots-v3'), join(dir, 'nosuch.out')]);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain('INVALID_ARGUMENT');
    // id and name that exist, but not on the same snapshot
    const both = await runDiskconv(['convert', '-l', 'snapshot.id=1,snapshot.name=s2', '-O', 'raw', imagePath('snapshots-v3'), join(dir, 'nosuch.out')]);
    expect(both.stderr).toContain('INVALID_ARGUMENT');
  });
});

describe('qcow2 extent stream', () => {
  it('is ordered, contiguous and covers the disk, in map and after the reader', async () => {
    for (const fixture of FIXTURES) {
      for (const snapshot of [undefined, ...(fixture.snapshots ?? []).filter((s) => !s.includes('=')).map((name) => ({ name, id: name }))]) {
        const label = `${fixture.name} ${snapshot?.name ?? ''}`;
        const source = await FileSource.open(imagePath(fixture.name));
        try {
          const image = await openImage(source, snapshot ? { snapshot } : {});
          let next = 0;
          let previous: MapEntry | undefined;
          for await (const entry of image.map()) {
            expect(entry.offset, label).toBe(next);
            expect(entry.length, label).toBeGreaterThan(0);
            // Neighbours that could have merged did.
            // Zero runs of one status merged; those that keep host clusters merge where the clusters are contiguous.
            if (previous?.kind === 'zero' && entry.kind === 'zero') {
              const sameStatus = (previous.status ?? 'unallocated') === (entry.status ?? 'unallocated');
              const hostContinues =
                previous.fileOffset === undefined ? entry.fileOffset === undefined : entry.fileOffset === previous.fileOffset + previous.length;
              expect(sameStatus && hostContinues, label).toBe(false);
            }
            if (previous?.kind === 'stored' && entry.kind === 'stored') expect(previous.fileOffset + previous.length, label).not.toBe(entry.fileOffset);
            next += entry.length;
            previous = entry;
          }
          expect(next, label).toBe(image.virtualSize);

          next = 0;
          for await (const e of readExtents(image, source, { maxReadBytes: 100_000, batchBytes: 300_000 })) {
            expect(e.offset, label).toBe(next);
            if (e.kind === 'data') expect(e.data.length, label).toBe(e.length);
            next += e.length;
          }
          expect(next, label).toBe(image.virtualSize);
          await image.close();
        } finally {
          await source.close();
        }
      }
    }
  });

  it('converts with an L2 cache of a single table, twice, and after a check', async () => {
    const path = imagePath('v3-512');
    const source = await FileSource.open(path);
    try {
      const image = await openImage(source, { limits: { tableCacheBytes: 100 } });
      const result = await convertToRaw(image, source, new CountingSink(), { sha256: true });
      expect(result.sha256).toBe(await qemuRawSha256(path, dir));
      expect((await image.check?.())?.corruptions).toBe(0);
      expect((await convertToRaw(image, source, new CountingSink(), { sha256: true })).sha256).toBe(result.sha256);
    } finally {
      await source.close();
    }
  });

  it('decodes zstd and zlib clusters in-process the same as qemu-img', async () => {
    for (const name of ['zstd-64k', 'zstd-2M', 'zlib-v2-512']) {
      const path = imagePath(name);
      const source = new BufferSource(await readFile(path), path);
      const image = await openImage(source);
      expect((await convertToRaw(image, source, new CountingSink(), { sha256: true })).sha256, name).toBe(await qemuRawSha256(path, dir));
    }
  });

  it('reports the snapshot table like qemu-img, icount included', async () => {
    const source = await FileSource.open(imagePath('snapshots-v3'));
    try {
      const image = await openImage(source);
      const snapshots = image.info().snapshots ?? [];
      expect(snapshots.map((s) => [s.id, s.name])).toEqual([
        ['1', 's1'],
        ['2', 's2'],
        ['3', '1'],
      ]);
      expect((await qemuInfo(imagePath('snapshots-v3'))).snapshots).toEqual(snapshots);
    } finally {
      await source.close();
    }
  });
});


// ---------------------------------------------------------------------------
// Refusals and damaged images

async function patch(path: string, offset: number, bytes: Uint8Array): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, offset);
  } finally {
    await handle.close();
  }
}

function be32(value: number): Uint8Array {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}

function be64(value: bigint): Uint8Array {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

async function u64At(path: string, offset: number): Promise<bigint> {
  return (await readFile(path)).readBigUInt64BE(offset);
}

/** A small clean v3 image to damage. */
async function victim(name: string, options: string[] = []): Promise<string> {
  const path = join(dir, `bad-${name}.qcow2`);
  await fromRaw(path, 2 * MiB, 40, options);
  return path;
}

/** Refused by convert; `atOpen` ones by info too (damage found while mapping leaves info working, as in qemu). */
async function expectRefusal(path: string, code: string, pattern?: RegExp, atOpen = true): Promise<void> {
  const info = await runDiskconv(['info', path]);
  if (atOpen) expect(info.code, `${path}: ${info.stderr}`).not.toBe(0);
  else expect(info.code, `${path}: ${info.stderr}`).toBe(0);
  const conv = await runDiskconv(['convert', '-O', 'raw', path, `${path}.out`]);
  expect(conv.code).not.toBe(0);
  expect(conv.stderr).toContain(`${code}:`);
  if (pattern) expect(conv.stderr).toMatch(pattern);
  await expect(stat(`${path}.out`)).rejects.toThrow();
}

describe('qcow2 refusals', () => {
  it('refuses a backing file without opening it', async () => {
    const base = join(dir, 'base.qcow2');
    await create(base, MiB);
    const top = join(dir, 'with-backing.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    // info shows the backing file (issue 11: metadata opens nothing); convert refuses it.
    await expectRefusal(top, 'UNSAFE_IMAGE', /backing file "[^"]*base\.qcow2"/, false);
    // Even when the named file does not exist: nothing is opened or stat'ed.
    const missing = join(dir, 'with-missing-backing.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', '/nonexistent/\u0001evil\n.qcow2', '-F', 'qcow2', missing, '1M');
    await expectRefusal(missing, 'UNSAFE_IMAGE', /backing file "\/nonexistent\/\?evil\?\.qcow2"/, false);
  });

  it('refuses an external data file', async () => {
    const path = join(dir, 'data-file.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'data-file.raw')}`, path, '1M');
    await expectRefusal(path, 'UNSAFE_IMAGE', /data file/);
  });

  it('refuses to convert an encrypted image without its key (info works without it)', async () => {
    const path = join(dir, 'luks.qcow2');
    // qemu-img times its key derivation and can fail to on a busy machine ("Unable to get accurate CPU usage"): retry.
    let made = false;
    for (let attempt = 0; attempt < 6 && !made; attempt++) {
      if (attempt > 0) await new Promise((done) => setTimeout(done, 250 * attempt)); // let the load pass
      const res = await runAllowingFailure('qemu-img', ['create', '-q', '--object', 'secret,id=sec0,data=abc', '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', path, '1M']);
      made = res.code === 0;
    }
    expect(made).toBe(true);
    expect((await qemuInfo(path)).encrypted).toBe(true);
    await expectRefusal(path, 'UNSUPPORTED_FEATURE', /encrypted image \(qcow2 LUKS\): a passphrase is needed/, false);
  });

  it('refuses the corrupt bit, unknown incompatible bits and unknown versions', async () => {
    const corrupt = await victim('corrupt-bit');
    await patch(corrupt, 72, be64(1n << 1n));
    await expectRefusal(corrupt, 'IMAGE_CORRUPT', /corrupt/);

    const unknown = await victim('unknown-incompat');
    await patch(unknown, 72, be64(1n << 20n));
    await expectRefusal(unknown, 'UNSUPPORTED_FEATURE', /bit 20/);

    const v4 = await victim('version-4');
    await patch(v4, 4, be32(4));
    await expectRefusal(v4, 'UNSUPPORTED_FEATURE', /version 4/);

    const v1 = await victim('version-1');
    await patch(v1, 4, be32(1));
    await expectRefusal(v1, 'UNSUPPORTED_FEATURE', /version 1/);
  });

  it('refuses cluster sizes outside 512 bytes..2 MiB', async () => {
    const small = await victim('cluster-bits-8');
    await patch(small, 20, be32(8));
    await expectRefusal(small, 'IMAGE_CORRUPT', /cluster_bits 8/);
    const large = await victim('cluster-bits-22');
    await patch(large, 20, be32(22));
    await expectRefusal(large, 'UNSUPPORTED_FEATURE', /2\^22/);
  });

  it('refuses tables and data past the end of the file', async () => {
    const l1 = await victim('l1-past-eof');
    const size = (await stat(l1)).size;
    await patch(l1, 40, be64(BigInt(Math.ceil(size / 65536) * 65536 + 65536)));
    await expectRefusal(l1, 'IMAGE_CORRUPT', /L1 table .* beyond the end of the file/);

    const l2 = await victim('l2-past-eof');
    const l1Offset = Number(await u64At(l2, 40));
    await patch(l2, l1Offset, be64((1n << 63n) | BigInt(64 * MiB)));
    await expectRefusal(l2, 'IMAGE_CORRUPT', /L2 table for L1 entry 0 .* beyond the end of the file/, false);

    const data = await victim('data-past-eof');
    await truncate(data, (await stat(data)).size - 65536);
    await expectRefusal(data, 'IMAGE_CORRUPT', /beyond the end of the file/, false);

    const compressed = join(dir, 'bad-compressed-past-eof.qcow2');
    await fromRaw(compressed, 2 * MiB, 41, [], ['-c']);
    await truncate(compressed, (await stat(compressed)).size - 70000);
    await expectRefusal(compressed, 'IMAGE_CORRUPT', undefined, false);
  });

  it('refuses unaligned tables and clusters', async () => {
    const l2 = await victim('l2-unaligned');
    const l1Offset = Number(await u64At(l2, 40));
    const entry = await u64At(l2, l1Offset);
    await patch(l2, l1Offset, be64(entry + 512n));
    await expectRefusal(l2, 'IMAGE_CORRUPT', /not aligned/, false);

    const data = await victim('data-unaligned');
    const l2Offset = Number((await u64At(data, Number(await u64At(data, 40)))) & 0x00fffffffffffe00n);
    const dataEntry = await u64At(data, l2Offset);
    await patch(data, l2Offset, be64(dataEntry + 512n));
    await expectRefusal(data, 'IMAGE_CORRUPT', /not aligned/, false);
  });

  it('bounds the L1 table: too large is LIMIT_EXCEEDED, too small for the disk is IMAGE_CORRUPT', async () => {
    const huge = await victim('huge-l1');
    await patch(huge, 36, be32(0xfffffff0));
    const started = Date.now();
    await expectRefusal(huge, 'LIMIT_EXCEEDED', /maxTopTableBytes/);
    expect(Date.now() - started).toBeLessThan(60_000);

    const small = await victim('small-l1');
    await patch(small, 24, be64(BigInt(2 ** 40))); // 1 TiB needs 2048 L1 entries
    await expectRefusal(small, 'IMAGE_CORRUPT', /L1 table is too small/);

    const bigDisk = await victim('huge-size');
    await patch(bigDisk, 24, be64(1n << 62n));
    await expectRefusal(bigDisk, 'LIMIT_EXCEEDED', /maxVirtualSize/);
  });

  it('bounds the snapshot count', async () => {
    const path = await victim('many-snapshots');
    await patch(path, 60, be32(0xffffffff));
    await expectRefusal(path, 'LIMIT_EXCEEDED', /maxSnapshots/);
  });

  it('reports damaged refcounts from check without throwing', async () => {
    const path = await victim('leak');
    // Point refcount table entry 1 (clusters 32768+) nowhere useful: a leak-free image gains a stray refblock.
    const reftable = Number(await u64At(path, 48));
    const refblock = Number(await u64At(path, reftable));
    const buf = Buffer.alloc(2);
    buf.writeUInt16BE(5);
    await patch(path, refblock, buf); // header cluster refcount 1 -> 5: a leak
    const ours = await runDiskconv(['check', '--output=json', path]);
    const theirs = await runAllowingFailure('qemu-img', ['check', '--output=json', path]);
    expect(checkCounters(ours.stdout)).toEqual(checkCounters(theirs.stdout));
    expect(ours.code).toBe(3);
  });
});

// ---------------------------------------------------------------------------
// Truncations and bit flips: a typed error or a successful convert, in bounded time.

describe('qcow2 damaged at every field', () => {
  async function survive(bytes: Uint8Array, label: string): Promise<string> {
    const source = new BufferSource(bytes, label);
    const attempt = async (): Promise<string> => {
      try {
        const image = await openImage(source, { format: 'qcow2' });
        await convertToRaw(image, source, new CountingSink());
        await image.check?.();
        return 'ok';
      } catch (err) {
        const code = (err as { code?: unknown }).code;
        if (typeof code !== 'string' || !/^[A-Z_]+$/.test(code) || !(err instanceof Error) || err.constructor === Error) {
          throw new Error(`${label}: untyped failure ${(err as Error).stack ?? String(err)}`);
        }
        return code;
      }
    };
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<string>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${label}: no result within 20 s`)), 20_000);
    });
    try {
      return await Promise.race([attempt(), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  for (const [name, options, extra] of [
    ['plain-v3', ['cluster_size=4096'], []],
    ['zstd-extl2', ['compression_type=zstd', 'extended_l2=on', 'cluster_size=16k'], ['-c']],
    ['v2-zlib', ['compat=0.10', 'cluster_size=4096'], ['-c']],
  ] as const) {
    it(`${name}: truncations and bit flips give a typed error or a conversion`, async () => {
      const path = join(dir, `fuzz-${name}.qcow2`);
      await fromRaw(path, 600 * KiB, 50, [...options], [...extra]);
      await qemuImg('snapshot', '-c', 'snap', path);
      await io(path, 'write -P 9 64k 64k');
      const original = new Uint8Array(await readFile(path));
      const view = Buffer.from(original);
      const cs = 2 ** view.readUInt32BE(20);
      const l1 = Number(view.readBigUInt64BE(40));
      const reftable = Number(view.readBigUInt64BE(48));
      const snapshots = Number(view.readBigUInt64BE(64));
      const l2 = Number(view.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
      const outcomes = new Map<string, number>();
      const count = (outcome: string): void => void outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);

      // Truncated at header and table boundaries.
      const cuts = new Set([0, 3, 4, 7, 8, 20, 71, 72, 103, 104, 111, 112, cs - 1, cs, l1, l1 + 4, l1 + 8, reftable, reftable + 8, l2, l2 + 8, l2 + cs - 1, snapshots, snapshots + 20, snapshots + 40, snapshots + 60]);
      for (let c = cs; c < original.length; c += cs) cuts.add(c);
      for (const cut of cuts) if (cut < original.length) count(await survive(original.slice(0, cut), `${name} cut at ${cut}`));

      // Every bit of every header field, and of the first table entries.
      const flipRanges: Array<[number, number]> = [
        [4, 104],
        [l1, l1 + 16],
        [reftable, reftable + 16],
        [l2, l2 + 64],
        [snapshots, snapshots + 64],
      ];
      for (const [from, to] of flipRanges) {
        for (let byte = from; byte < to && byte < original.length; byte++) {
          for (let bit = 0; bit < 8; bit++) {
            const damaged = original.slice();
            damaged[byte] = (damaged[byte] as number) ^ (1 << bit);
            count(await survive(damaged, `${name} bit ${bit} of byte ${byte}`));
          }
        }
      }
      // Both outcomes occur; nothing crashed or hung (survive throws otherwise).
      expect(outcomes.get('ok')).toBeGreaterThan(0);
      expect([...outcomes.keys()].filter((k) => k !== 'ok').length).toBeGreaterThan(1);
    });
  }
});
