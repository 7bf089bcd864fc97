/**
 * Hostile and broken VMDKs: descriptors that point elsewhere, headers with bad
 * fields, tables and grains past the end, truncations and bit flips. Each must
 * end in a typed error (or a correct read), never a crash, a hang or a file
 * opened by a name found inside the image.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { access, readFile, writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, qemuImg, run } from '../../helpers/qemu.js';
import { CLI, runDiskconv } from '../../helpers/cli.js';
import { BufferSource, isDiskconvError, openImage, readExtents, type Limits } from '../../../src/engine/index.js';

const S = 512;
const MiB = 2 ** 20;

/** Sparse header field offsets (VMware Virtual Disk Format 5.0, SparseExtentHeader), written here independently of the driver. */
const H = {
  version: 4,
  flags: 8,
  capacity: 12,
  grainSize: 20,
  descriptorOffset: 28,
  descriptorSize: 36,
  numGTEsPerGT: 44,
  rgdOffset: 48,
  gdOffset: 56,
  overHead: 64,
  compressAlgorithm: 77,
} as const;
const U64_FIELDS = ['capacity', 'grainSize', 'descriptorOffset', 'descriptorSize', 'rgdOffset', 'gdOffset', 'overHead'] as const;

let dir: string;
let cleanup: () => Promise<void>;
/** A 4 MiB monolithicSparse and a streamOptimized image made by qemu-img from mixed content. */
let sparse: Buffer;
let stream: Buffer;

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-vmdk-hostile-'));
  const raw = path('base.raw');
  await writeFile(raw, mixedContent(4 * MiB, 77));
  await qemuImg('convert', '-O', 'vmdk', raw, path('sparse.vmdk'));
  await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, path('stream.vmdk'));
  sparse = await readFile(path('sparse.vmdk'));
  stream = await readFile(path('stream.vmdk'));
});
afterAll(async () => cleanup());

const path = (name: string): string => join(dir, name);
const copy = (b: Buffer): Buffer => Buffer.from(b);

async function outcome(bytes: Uint8Array, limits?: Partial<Limits>): Promise<unknown> {
  const source = new BufferSource(bytes, 'hostile.vmdk');
  try {
    const image = await openImage(source, limits ? { limits } : {});
    let next = 0;
    for await (const e of readExtents(image, source, { maxReadBytes: 200_000, batchBytes: 500_000 })) {
      if (e.offset !== next) throw new Error(`extent at ${e.offset}, expected ${next}`);
      next += e.length;
    }
    if (next !== image.virtualSize) throw new Error(`extents end at ${next}, expected ${image.virtualSize}`);
    return undefined;
  } catch (err) {
    return err;
  }
}

function expectCode(err: unknown, code: string, message?: RegExp): void {
  expect(err, `expected ${code}, but the image was read`).toBeDefined();
  expect(isDiskconvError(err), String(err)).toBe(true);
  expect((err as { code: string }).code, String(err)).toBe(code);
  if (message) expect((err as Error).message).toMatch(message);
}

/** Rewrites the embedded descriptor (sector 1, 20 sectors in qemu's images) in place. */
function withDescriptor(base: Buffer, edit: (text: string) => string): Buffer {
  const b = copy(base);
  const area = b.subarray(S, 21 * S);
  const text = area.toString('latin1').replace(/\0+$/, '');
  const next = Buffer.from(edit(text), 'latin1');
  if (next.length > area.length) throw new Error('descriptor does not fit');
  area.fill(0);
  next.copy(area);
  return b;
}

function gdOffset(b: Buffer): number {
  return Number(b.readBigUInt64LE(H.gdOffset)) * S;
}

describe('descriptor files are refused, never followed', () => {
  for (const subformat of ['monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
    it(`${subformat} (qemu-img create) -> UNSAFE_IMAGE on info and convert, no output`, async () => {
      const image = path(`${subformat}.vmdk`);
      await qemuImg('create', '-f', 'vmdk', '-o', `subformat=${subformat}`, image, '3M');
      const info = await runDiskconv(['info', '--output=json', image]);
      expect(info.code).toBe(1);
      expect(info.stderr).toMatch(/UNSAFE_IMAGE/);
      const out = path(`${subformat}.out`);
      const conv = await runDiskconv(['convert', '-O', 'raw', image, out]);
      expect(conv.code).toBe(1);
      expect(conv.stderr.trim().split('\n')).toHaveLength(1);
      expect(conv.stderr).toMatch(/^diskconv: UNSAFE_IMAGE: .*createType "\w+"/);
      await expect(access(out)).rejects.toThrow();
      // Declared as raw, the bytes still say vmdk: refused, not read as raw.
      expect((await runDiskconv(['convert', '-f', 'raw', '-O', 'raw', image, out])).code).toBe(1);
    });
  }

  it('a descriptor naming an absolute path: refused without opening it', async () => {
    // A FIFO blocks whoever opens it for reading: the CLI would hang, then time out.
    const canary = path('canary.fifo');
    await run('mkfifo', [canary]);
    const descriptors = {
      'flat-abs.vmdk': `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 4096 FLAT "${canary}" 0\n`,
      'sparse-abs.vmdk': `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicSparse"\n\nRW 4096 SPARSE "${canary}"\n`,
      'child-abs.vmdk': `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\ncreateType="monolithicSparse"\nparentFileNameHint="${canary}"\n\nRW 8192 SPARSE "child-s.vmdk"\n`,
    };
    const files = Object.entries(descriptors).map(([name, text]) => ({ name, text }));
    // The same absolute path inside the embedded descriptor of a real sparse image.
    const embedded = withDescriptor(sparse, (t) => t.replace(/SPARSE "[^"]*"/, `SPARSE "${canary}"`));
    await writeFile(path('embedded-abs.vmdk'), embedded);
    for (const { name, text } of files) await writeFile(path(name), text);
    const strace = await run('strace', ['-V']).then(
      () => true,
      () => false,
    );
    for (const name of [...Object.keys(descriptors), 'embedded-abs.vmdk']) {
      const image = path(name);
      const conv = await runDiskconv(['convert', '-O', 'raw', image, path(`${name}.out`)], 20_000);
      expect(conv.stderr, name).toMatch(/UNSAFE_IMAGE/);
      if (strace) {
        const log = path(`${name}.strace`);
        await traced(log, ['info', image]);
        const calls = await readFile(log, 'latin1');
        expect(calls).toContain(image);
        expect(calls, `${name}: the canary was looked up`).not.toContain('canary');
      }
    }
  });

  it('text descriptors are detected as vmdk, not raw', async () => {
    const texts = [
      '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x-flat.vmdk" 0\n',
      '# comment\n   \nversion=1\r\ncreateType="vmfs"\nRW 8 VMFS "x.vmdk"\n',
      'version=2\nRW 8 FLAT "x-flat.vmdk" 0\n',
    ];
    for (const text of texts) expectCode(await outcome(Buffer.from(text)), 'UNSAFE_IMAGE');
    // Text that only resembles one stays raw.
    const source = new BufferSource(Buffer.from('# notes\nversion=9\n'));
    expect((await openImage(source)).format).toBe('raw');
  });
});

describe('embedded descriptor rules', () => {
  const cases: Array<{ name: string; edit: (t: string) => string; code: string; message?: RegExp }> = [
    { name: 'child disk (parentCID)', edit: (t) => t.replace('parentCID=ffffffff', 'parentCID=1a2b3c4d'), code: 'UNSAFE_IMAGE', message: /parentCID/ },
    { name: 'parentFileNameHint', edit: (t) => t.replace('createType', 'parentFileNameHint="base.vmdk"\ncreateType'), code: 'UNSAFE_IMAGE' },
    { name: 'createType monolithicFlat', edit: (t) => t.replace('"monolithicSparse"', '"monolithicFlat"'), code: 'UNSAFE_IMAGE' },
    { name: 'createType twoGbMaxExtentSparse', edit: (t) => t.replace('"monolithicSparse"', '"twoGbMaxExtentSparse"'), code: 'UNSAFE_IMAGE' },
    { name: 'createType vmfsSparse', edit: (t) => t.replace('"monolithicSparse"', '"vmfsSparse"'), code: 'UNSAFE_IMAGE' },
    { name: 'createType unknown', edit: (t) => t.replace('"monolithicSparse"', '"somethingNew"'), code: 'UNSAFE_IMAGE' },
    { name: 'second extent', edit: (t) => t.replace(/(RW \d+ SPARSE "[^"]*"\n)/, '$1RW 8192 SPARSE "other.vmdk"\n'), code: 'UNSAFE_IMAGE' },
    { name: 'FLAT extent', edit: (t) => t.replace(/RW (\d+) SPARSE ("[^"]*")/, 'RW $1 FLAT $2 0'), code: 'UNSAFE_IMAGE' },
    { name: 'VMFS extent', edit: (t) => t.replace(/RW (\d+) SPARSE ("[^"]*")/, 'RW $1 VMFS $2'), code: 'UNSAFE_IMAGE' },
    { name: 'ZERO extent', edit: (t) => t.replace(/RW (\d+) SPARSE ("[^"]*")/, 'RW $1 ZERO'), code: 'UNSAFE_IMAGE' },
    { name: 'relative path', edit: (t) => t.replace(/SPARSE "[^"]*"/, 'SPARSE "../disk.vmdk"'), code: 'UNSAFE_IMAGE' },
    { name: 'windows path', edit: (t) => t.replace(/SPARSE "[^"]*"/, 'SPARSE "C:\\\\vm\\\\disk.vmdk"'), code: 'UNSAFE_IMAGE' },
    { name: 'extent size differs from capacity', edit: (t) => t.replace(/RW \d+ SPARSE/, 'RW 4096 SPARSE'), code: 'IMAGE_CORRUPT', message: /capacity/ },
    { name: 'no extent line', edit: (t) => t.replace(/RW \d+ SPARSE "[^"]*"\n/, ''), code: 'IMAGE_CORRUPT' },
    { name: 'unknown line', edit: (t) => t.replace('createType', 'this is not a descriptor line\ncreateType'), code: 'IMAGE_CORRUPT', message: /line 5/ },
    { name: 'no CID', edit: (t) => t.replace(/^CID=.*\n/m, ''), code: 'IMAGE_CORRUPT' },
    { name: 'CID not hex', edit: (t) => t.replace(/^CID=.*$/m, 'CID=zebra'), code: 'IMAGE_CORRUPT' },
    { name: 'no parentCID', edit: (t) => t.replace(/^parentCID=.*\n/m, ''), code: 'IMAGE_CORRUPT' },
    { name: 'no createType', edit: (t) => t.replace(/^createType=.*\n/m, ''), code: 'IMAGE_CORRUPT' },
    { name: 'empty', edit: () => '', code: 'IMAGE_CORRUPT' },
  ];
  for (const c of cases) {
    it(`${c.name} -> ${c.code}`, async () => {
      expectCode(await outcome(withDescriptor(sparse, c.edit)), c.code, c.message);
    });
  }

  it('comments, blank lines, CRLF and spacing are accepted', async () => {
    const bytes = withDescriptor(sparse, (t) => t.replace(/\n/g, '\r\n').replace('version=1', '  version = 1  ').replace('#DDB', '#DDB\r\n   \r\n# more'));
    expect(await outcome(bytes)).toBeUndefined();
  });

  it('a descriptor larger than maxDescriptorBytes -> LIMIT_EXCEEDED', async () => {
    const b = copy(sparse);
    b.writeBigUInt64LE(4097n, H.descriptorSize);
    expectCode(await outcome(b), 'LIMIT_EXCEEDED', /maxDescriptorBytes/);
  });
});

describe('sparse header fields', () => {
  const set = (field: keyof typeof H, value: number | bigint, base = sparse): Buffer => {
    const b = copy(base);
    const at = H[field];
    if ((U64_FIELDS as readonly string[]).includes(field)) b.writeBigUInt64LE(BigInt(value), at);
    else if (field === 'compressAlgorithm') b.writeUInt16LE(Number(value), at);
    else b.writeUInt32LE(Number(value), at);
    return b;
  };
  const cases: Array<{ name: string; bytes: () => Buffer; code: string; message?: RegExp }> = [
    { name: 'COWD (ESX 2 vmfsSparse) magic', bytes: () => Buffer.concat([Buffer.from('COWD'), sparse.subarray(4)]), code: 'UNSUPPORTED_FEATURE' },
    { name: 'version 0', bytes: () => set('version', 0), code: 'UNSUPPORTED_FEATURE' },
    { name: 'version 4', bytes: () => set('version', 4), code: 'UNSUPPORTED_FEATURE' },
    { name: 'compression algorithm 2', bytes: () => set('compressAlgorithm', 2), code: 'UNSUPPORTED_FEATURE' },
    { name: 'compressed grains without markers', bytes: () => set('compressAlgorithm', 1), code: 'UNSUPPORTED_FEATURE' },
    { name: '0 grain table entries', bytes: () => set('numGTEsPerGT', 0), code: 'IMAGE_CORRUPT' },
    { name: '513 grain table entries', bytes: () => set('numGTEsPerGT', 513), code: 'IMAGE_CORRUPT' },
    { name: 'grain size 0', bytes: () => set('grainSize', 0), code: 'IMAGE_CORRUPT' },
    { name: 'grain size not a power of two', bytes: () => set('grainSize', 96), code: 'IMAGE_CORRUPT' },
    { name: 'grain size 2 GiB', bytes: () => set('grainSize', 1 << 22), code: 'IMAGE_CORRUPT' },
    { name: 'capacity past maxVirtualSize (afl9)', bytes: () => set('capacity', 0x1efffffc1b000001n), code: 'LIMIT_EXCEEDED', message: /maxVirtualSize/ },
    { name: 'capacity 2^64-1', bytes: () => set('capacity', 0xffffffffffffffffn), code: 'LIMIT_EXCEEDED' },
    { name: 'grains start past the end (overHead)', bytes: () => set('overHead', 1n << 20n), code: 'IMAGE_CORRUPT', message: /truncated/ },
    { name: 'grain directory past the end', bytes: () => set('gdOffset', 1n << 30n), code: 'IMAGE_CORRUPT', message: /grain directory/ },
    { name: 'grain directory at 0', bytes: () => set('gdOffset', 0), code: 'IMAGE_CORRUPT' },
    { name: 'grain directory offset 2^64-2', bytes: () => set('gdOffset', 0xfffffffffffffffen), code: 'IMAGE_CORRUPT' },
    { name: 'descriptor past the end', bytes: () => set('descriptorOffset', 1n << 40n), code: 'IMAGE_CORRUPT' },
    { name: 'no descriptor', bytes: () => set('descriptorOffset', 0), code: 'IMAGE_CORRUPT' },
    { name: 'header truncated', bytes: () => sparse.subarray(0, 300), code: 'IMAGE_CORRUPT' },
  ];
  for (const c of cases) {
    it(`${c.name} -> ${c.code}`, async () => {
      expectCode(await outcome(c.bytes()), c.code, c.message);
    });
  }

  it('a grain directory past maxTopTableBytes -> LIMIT_EXCEEDED, where qemu says "L1 size too big"', async () => {
    // 16 TiB of one-sector grains: 2^26 directory entries.
    const b = set('grainSize', 1, set('capacity', 1n << 35n));
    expectCode(await outcome(b), 'LIMIT_EXCEEDED', /maxTopTableBytes/);
    await writeFile(path('l1.vmdk'), b);
    await expect(qemuImg('info', path('l1.vmdk'))).rejects.toThrow(/L1 size too big/);
    // And the configured budget is the one applied.
    expectCode(await outcome(sparse, { maxTopTableBytes: 2 }), 'LIMIT_EXCEEDED', /maxTopTableBytes/);
  });

  it('a zero-capacity image (qemu-img create ... 0) is refused, as qemu refuses it', async () => {
    await qemuImg('create', '-f', 'vmdk', path('empty.vmdk'), '0');
    await expect(qemuImg('info', path('empty.vmdk'))).rejects.toThrow();
    expectCode(await outcome(await readFile(path('empty.vmdk'))), 'UNSUPPORTED_FEATURE');
  });
});

describe('tables and grains past the end of the file', () => {
  it('a grain table past the end: convert refuses, check reports it', async () => {
    const b = copy(sparse);
    b.writeUInt32LE(0x00ffffff, gdOffset(b));
    expectCode(await outcome(b), 'IMAGE_CORRUPT', /grain table for grain directory entry 0 at offset 0x1fffffe00 lies beyond the end/);
    await writeFile(path('gt-eof.vmdk'), b);
    const check = await runDiskconv(['check', '--output=json', path('gt-eof.vmdk')]);
    expect(check.code).toBe(1);
    expect((JSON.parse(check.stdout) as { corruptions: number }).corruptions).toBe(1);
  });

  it('a grain past the end: convert refuses, check fails like qemu-img check', async () => {
    const b = copy(sparse);
    const gt = b.readUInt32LE(gdOffset(b)) * S;
    b.writeUInt32LE(0x00ffffff, gt + 4 * 3);
    expectCode(await outcome(b), 'IMAGE_CORRUPT', /grain for guest offset 196608 .* points after the end of the file/);
    await writeFile(path('grain-eof.vmdk'), b);
    const ours = await runDiskconv(['check', path('grain-eof.vmdk')]);
    const qemu = await qemuImg('check', path('grain-eof.vmdk')).then(
      () => 0,
      (e: { code: number }) => e.code,
    );
    expect(ours.code).toBe(qemu);
    // As qemu-img check prints its drivers' findings: on stderr.
    expect(ours.stderr).toMatch(/^ERROR: .*points after the end of the file$/m);
  });

  it('a grain that starts inside the file and ends past it', async () => {
    const b = copy(sparse);
    const gt = b.readUInt32LE(gdOffset(b)) * S;
    b.writeUInt32LE(b.length / S - 1, gt);
    expectCode(await outcome(b), 'IMAGE_CORRUPT', /runs past the end of the file/);
  });

  it('a compressed grain whose marker lies past the end', async () => {
    const b = copy(stream);
    const gt = b.readUInt32LE(gdOffset(b)) * S;
    b.writeUInt32LE(0x00ffffff, gt);
    expectCode(await outcome(b), 'IMAGE_CORRUPT', /points after the end of the file/);
  });
});

describe('truncations and bit flips end in typed errors, in bounded time', () => {
  it('every truncation of a monolithicSparse image', async () => {
    const gd = gdOffset(sparse);
    const gt = sparse.readUInt32LE(gd) * S;
    const boundaries = [4, 77, 511, 512, 513, 700, 21 * S, gd - 1, gd, gd + 2, gt, gt + 1000, gt + 2047, 128 * S, 128 * S + 1];
    const cuts = [...boundaries];
    for (let cut = 129 * S; cut < sparse.length; cut += 16_381) cuts.push(cut);
    cuts.push(sparse.length - 1);
    for (const cut of cuts) expectCode(await outcome(sparse.subarray(0, cut)), 'IMAGE_CORRUPT');
  });

  it('every truncation of a qemu-img streamOptimized image', async () => {
    // qemu-img may leave zeros after the last grain; cutting those loses nothing.
    const gt = stream.readUInt32LE(gdOffset(stream)) * S;
    let dataEnd = 0;
    for (let i = 0; i < 64; i++) {
      const grain = stream.readUInt32LE(gt + 4 * i) * S;
      if (grain) dataEnd = Math.max(dataEnd, grain + 12 + stream.readUInt32LE(grain + 8));
    }
    for (let cut = 4; cut < dataEnd; cut += cut < 70_000 ? 1021 : 8191) expectCode(await outcome(stream.subarray(0, cut)), 'IMAGE_CORRUPT');
    expectCode(await outcome(stream.subarray(0, dataEnd - 1)), 'IMAGE_CORRUPT');
    expect(await outcome(stream.subarray(0, dataEnd))).toBeUndefined();
  });

  it('each bit of each header field', async () => {
    for (const base of [sparse, stream]) {
      for (const [field, at] of Object.entries(H)) {
        const bits = (U64_FIELDS as readonly string[]).includes(field) ? 64 : field === 'compressAlgorithm' ? 16 : 32;
        for (let bit = 0; bit < bits; bit++) {
          const b = copy(base);
          const byte = at + (bit >> 3);
          b[byte] = (b[byte] as number) ^ (1 << (bit & 7));
          const err = await outcome(b);
          if (err !== undefined) expect(isDiskconvError(err), `${field} bit ${bit}: ${String(err)}`).toBe(true);
        }
      }
    }
  });

  it('random flips in grain directories, grain tables and grain markers', async () => {
    let seed = 12345;
    const random = (n: number): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % n;
    };
    for (const base of [sparse, stream]) {
      const gd = gdOffset(base);
      const gt = base.readUInt32LE(gd) * S;
      for (let i = 0; i < 300; i++) {
        const b = copy(base);
        const region = i % 3 === 0 ? gd + random(8) : i % 3 === 1 ? gt + random(2048) : 128 * S + random(base.length - 128 * S);
        b[region] = (b[region] as number) ^ (1 << random(8));
        const err = await outcome(b);
        if (err !== undefined) expect(isDiskconvError(err), `flip at ${region}: ${String(err)}`).toBe(true);
      }
    }
  });

  it('an aborted map stops with ABORTED', async () => {
    const source = new BufferSource(sparse);
    const image = await openImage(source);
    const controller = new AbortController();
    controller.abort();
    let error: unknown;
    try {
      for await (const _ of image.map(controller.signal)) void _;
    } catch (err) {
      error = err;
    }
    expectCode(error, 'ABORTED');
  });
});

function traced(log: string, args: string[]): Promise<void> {
  return new Promise((resolve) => {
    execFile('strace', ['-f', '-e', 'trace=%file', '-o', log, process.execPath, CLI, ...args], { timeout: 20_000 }, () => resolve());
  });
}
