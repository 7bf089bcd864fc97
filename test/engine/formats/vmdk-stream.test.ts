/**
 * Stream-optimized images laid out the way VMware writes them (grain markers,
 * grain tables after their grains, the grain directory and a footer at the end,
 * the header saying GD_AT_END), built here from the format specification since
 * qemu-img only writes the other layout. qemu-img reads them; we must agree.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { deflateSync } from 'node:zlib';
import { buildStream, DEFAULT_DESCRIPTOR } from '../../helpers/vmware-stream.js';
import { makeTempDir, mixedContent, pickInfo, qemuImg, qemuInfo, qemuRawSha256, sha256File } from '../../helpers/qemu.js';
import { runDiskconv } from '../../helpers/cli.js';
import { BufferSource, isDiskconvError, openImage, readExtents } from '../../../src/engine/index.js';

const S = 512;
const MiB = 2 ** 20;
const GD_AT_END = 0xffffffffffffffffn;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await makeTempDir('diskconv-vmdk-stream-')));
afterAll(async () => cleanup());

/** Content with whole zero regions (grains and tables left out of the stream). */
function content(size: number, seed: number): Buffer {
  const buf = mixedContent(size, seed);
  buf.fill(0, Math.min(size, 2 * MiB), Math.min(size, 4 * MiB + 8192));
  return buf;
}

async function save(name: string, bytes: Buffer): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, bytes);
  return path;
}

async function expectSameAsQemu(path: string): Promise<void> {
  const info = await runDiskconv(['info', '--output=json', path]);
  expect(info.stderr).toBe('');
  expect(pickInfo(JSON.parse(info.stdout) as Record<string, unknown>)).toEqual(pickInfo(await qemuInfo(path)));
  const out = `${path}.out`;
  const conv = await runDiskconv(['convert', '-O', 'raw', path, out]);
  expect(conv.stderr).toBe('');
  expect(await sha256File(out)).toBe(await qemuRawSha256(path, dir));
  expect((await runDiskconv(['check', path])).code).toBe(0);
}

async function outcome(bytes: Uint8Array): Promise<unknown> {
  const source = new BufferSource(bytes);
  try {
    const image = await openImage(source);
    for await (const _ of readExtents(image, source)) void _;
    return undefined;
  } catch (err) {
    return err;
  }
}

function expectCode(err: unknown, code: string): void {
  expect(isDiskconvError(err), String(err)).toBe(true);
  expect((err as { code: string }).code, String(err)).toBe(code);
}

async function qemuRefuses(path: string): Promise<boolean> {
  return qemuImg('convert', '-O', 'raw', path, `${path}.qemu.raw`).then(
    () => false,
    () => true,
  );
}

describe('VMware-style streamOptimized (footer, GD at end)', () => {
  it('64 KiB grains, last grain holding only the bytes inside the disk', async () => {
    await expectSameAsQemu(await save('s64-partial.vmdk', buildStream(content(6 * MiB + 5 * S, 1), 's64-partial.vmdk')));
  });

  it('64 KiB grains, last grain written whole', async () => {
    await expectSameAsQemu(await save('s64-whole.vmdk', buildStream(content(6 * MiB + 5 * S, 2), 's64-whole.vmdk', { lastGrainWhole: true })));
  });

  it('4 KiB grains: several grain tables, one of them absent from the directory', async () => {
    const path = await save('s4k.vmdk', buildStream(content(9 * MiB, 3), 's4k.vmdk', { grainSectors: 8 }));
    await expectSameAsQemu(path);
  });

  it('an RDONLY extent line and trailing blanks, as ESXi writes them', async () => {
    const descriptor = DEFAULT_DESCRIPTOR.replace('RW ', 'RDONLY ').replace('CID=1c2b3a49', 'CID=1c2b3a49 ').replace('version=1', 'version=1 ');
    await expectSameAsQemu(await save('s-rdonly.vmdk', buildStream(content(MiB, 4), 'generated-stream.vmdk', { descriptor })));
  });

  it('grain marker lba that disagrees with the grain table: qemu follows the table, so do we', async () => {
    const bytes = buildStream(content(2 * MiB, 5), 's-lba.vmdk', {
      editGrain: (g, m) => {
        if (g === 3) m.writeBigUInt64LE(999_999n, 0);
        return m;
      },
    });
    await expectSameAsQemu(await save('s-lba.vmdk', bytes));
  });

  it('every truncation is a typed error', async () => {
    const bytes = buildStream(content(MiB, 6), 't.vmdk');
    for (let cut = 4; cut < bytes.length; cut += cut < 70_000 ? 509 : 4093) {
      const err = await outcome(bytes.subarray(0, cut));
      expectCode(err, 'IMAGE_CORRUPT');
    }
  });
});

describe('stream footer and grain corruption', () => {
  const base = (): Buffer => buildStream(content(2 * MiB, 7), 'f.vmdk');
  const FOOTER = -3 * S;
  const cases: Array<{ name: string; edit: (b: Buffer) => void }> = [
    { name: 'footer marker type', edit: (b) => b.writeUInt32LE(2, b.length + FOOTER + 12) },
    { name: 'footer marker size', edit: (b) => b.writeUInt32LE(7, b.length + FOOTER + 8) },
    { name: 'footer header magic', edit: (b) => b.write('XDMV', b.length + FOOTER + S, 'latin1') },
    { name: 'end-of-stream marker type', edit: (b) => b.writeUInt32LE(1, b.length - S + 12) },
    { name: 'end-of-stream marker value', edit: (b) => b.writeBigUInt64LE(5n, b.length - S) },
    { name: 'footer header version', edit: (b) => b.writeUInt32LE(1, b.length + FOOTER + S + 4) },
    { name: 'footer descriptor offset', edit: (b) => b.writeBigUInt64LE(2n, b.length + FOOTER + S + 28) },
    { name: 'footer descriptor size', edit: (b) => b.writeBigUInt64LE(3n, b.length + FOOTER + S + 36) },
    { name: 'footer grain directory also at end', edit: (b) => b.writeBigUInt64LE(GD_AT_END, b.length + FOOTER + S + 56) },
    { name: 'footer grain directory beyond the file', edit: (b) => b.writeBigUInt64LE(1n << 30n, b.length + FOOTER + S + 56) },
  ];
  for (const c of cases) {
    it(`${c.name} -> IMAGE_CORRUPT`, async () => {
      const bytes = base();
      c.edit(bytes);
      expectCode(await outcome(bytes), 'IMAGE_CORRUPT');
    });
  }

  it('a footer header with version 4 -> UNSUPPORTED_FEATURE', async () => {
    const bytes = base();
    bytes.writeUInt32LE(4, bytes.length + FOOTER + S + 4);
    bytes.writeUInt32LE(4, 4);
    expectCode(await outcome(bytes), 'UNSUPPORTED_FEATURE');
  });

  const grainCases: Array<{ name: string; edit: (m: Buffer) => Buffer }> = [
    { name: 'compressed size 0', edit: (m) => (m.writeUInt32LE(0, 8), m) },
    { name: 'compressed size larger than two grains', edit: (m) => (m.writeUInt32LE(3 * 65536, 8), m) },
    { name: 'garbage instead of zlib', edit: (m) => (m.fill(0x5a, 12), m) },
    { name: 'zlib stream cut short', edit: (m) => (m.writeUInt32LE(m.readUInt32LE(8) - 40, 8), m) },
    {
      name: 'a grain that inflates past the grain size',
      edit: (m) => {
        const big = deflateSync(Buffer.alloc(65536 + 4096, 1));
        const out = Buffer.alloc(12 + big.length);
        m.copy(out, 0, 0, 8);
        out.writeUInt32LE(big.length, 8);
        big.copy(out, 12);
        return out;
      },
    },
    {
      name: 'a middle grain that inflates short',
      edit: (m) => {
        const small = deflateSync(Buffer.alloc(4096, 1));
        const out = Buffer.alloc(12 + small.length);
        m.copy(out, 0, 0, 8);
        out.writeUInt32LE(small.length, 8);
        small.copy(out, 12);
        return out;
      },
    },
  ];
  for (const c of grainCases) {
    it(`grain: ${c.name} -> IMAGE_CORRUPT, and qemu-img refuses it too`, async () => {
      const bytes = buildStream(content(2 * MiB, 8), 'g.vmdk', { editGrain: (g, m) => (g === 5 ? c.edit(m) : m) });
      expectCode(await outcome(bytes), 'IMAGE_CORRUPT');
      expect(await qemuRefuses(await save(`grain-${c.name.replace(/\W+/g, '-')}.vmdk`, bytes))).toBe(true);
    });
  }
});
