/**
 * Probing rules of issue 4 on synthetic bytes: the format comes from the bytes,
 * a declared format must agree, and bytes that carry a qcow2/vmdk/vdi signature
 * plus any other signature are refused as ambiguous, while raw disks that carry
 * partition tables or optical-media descriptors stay raw. (The image-by-image
 * proof, through the CLI too, is test/fixtures/hostile/hostile.test.ts.)
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferSource, detectFormat, openImage, type FormatId } from '../../src/engine/index.js';
import { makeTempDir, mixedContent, qemuImg } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
let qcow2: Buffer;
let vdi: Buffer;
let raw: Buffer;
beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-probe-'));
  raw = mixedContent(2 ** 20, 5);
  await writeFile(join(dir, 'a.raw'), raw);
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'a.raw'), join(dir, 'a.qcow2'));
  await qemuImg('convert', '-f', 'raw', '-O', 'vdi', join(dir, 'a.raw'), join(dir, 'a.vdi'));
  qcow2 = await readFile(join(dir, 'a.qcow2'));
  vdi = await readFile(join(dir, 'a.vdi'));
});
afterAll(async () => cleanup?.());

const patched = (base: Buffer, at: number, bytes: string | number[]): Buffer => {
  const b = Buffer.from(base);
  if (typeof bytes === 'string') b.write(bytes, at, 'latin1');
  else b.set(bytes, at);
  return b;
};
const probe = (bytes: Uint8Array, declared?: FormatId) => detectFormat(new BufferSource(bytes, 'probe-test'), declared);

describe('probe: ambiguous bytes are UNSAFE_IMAGE', () => {
  it.each([
    ['CD001 at 0x8001', 0x8001, 'CD001'],
    ['CD001 at 0x8801', 0x8801, 'CD001'],
    ['NSR03 at 0x9001 (UDF)', 0x9001, 'NSR03'],
    ['BEA01 at 0x8001 (UDF, which oslo misses)', 0x8001, 'BEA01'],
  ])('vdi with an ISO 9660/UDF descriptor: %s', async (_what, at, id) => {
    await expect(probe(patched(vdi, at, id))).rejects.toMatchObject({ code: 'UNSAFE_IMAGE', message: expect.stringMatching(/ambiguous/) });
  });

  it('vdi whose free-text pre-header carries a cloop signature', async () => {
    await expect(probe(patched(vdi, 0, '#!/bin/sh\n#V2.0 Format\n'))).rejects.toMatchObject({ code: 'UNSAFE_IMAGE' });
  });

  it('vdi whose pre-header starts with a QED or LUKS magic', async () => {
    await expect(probe(patched(vdi, 0, 'QED\0'))).rejects.toMatchObject({ code: 'UNSAFE_IMAGE' });
    await expect(probe(patched(vdi, 0, 'LUKS\xba\xbe'))).rejects.toMatchObject({ code: 'UNSAFE_IMAGE' });
  });

  it('qcow2 that also carries the vdi signature at 0x40 (high bytes of snapshots_offset)', async () => {
    await expect(probe(patched(qcow2, 0x40, [0x7f, 0x10, 0xda, 0xbe]))).rejects.toMatchObject({
      code: 'UNSAFE_IMAGE',
      message: expect.stringMatching(/qcow2 header that also carries a vdi signature/),
    });
  });

  it('the ambiguity check comes before a declared format', async () => {
    await expect(probe(patched(qcow2, 0x8001, 'CD001'), 'qcow2')).rejects.toMatchObject({ code: 'UNSAFE_IMAGE' });
    await expect(probe(patched(qcow2, 0x8001, 'CD001'), 'raw')).rejects.toMatchObject({ code: 'UNSAFE_IMAGE' });
  });
});

describe('probe: look-alikes that are not ambiguous', () => {
  it('a raw disk with a UDF descriptor set is raw', async () => {
    const udf = patched(patched(raw, 0x8001, 'BEA01'), 0x8801, 'NSR02');
    expect((await probe(udf)).format).toBe('raw');
  });

  it('a qcow2 whose last sector is a VHD footer (a converted fixed VHD) is qcow2: footer signatures are not probed', async () => {
    const footer = Buffer.alloc(512);
    footer.write('conectix', 0, 'latin1');
    const bytes = Buffer.concat([qcow2, footer]);
    expect((await probe(bytes)).format).toBe('qcow2');
    const image = await openImage(new BufferSource(bytes));
    expect(image.virtualSize).toBe(2 ** 20);
    await image.close();
  });
});

describe('probe: a declared format must agree with the bytes', () => {
  it.each([
    ['qcow2 declared raw', () => qcow2, 'raw'],
    ['vdi declared raw', () => vdi, 'raw'],
    ['vdi declared qcow2', () => vdi, 'qcow2'],
    ['raw declared vmdk', () => raw, 'vmdk'],
  ] as const)('%s is FORMAT_MISMATCH', async (_what, bytes, declared) => {
    await expect(probe(bytes(), declared)).rejects.toMatchObject({ code: 'FORMAT_MISMATCH' });
  });

  it('a foreign format is UNSUPPORTED_FORMAT, and FORMAT_MISMATCH when declared as something else', async () => {
    const qed = patched(raw, 0, 'QED\0');
    await expect(probe(qed)).rejects.toMatchObject({ code: 'UNSUPPORTED_FORMAT' });
    await expect(probe(qed, 'raw')).rejects.toMatchObject({ code: 'FORMAT_MISMATCH', message: expect.stringMatching(/bytes are qed/) });
  });

  it('vpc and vhdx are probed by their signature at 0, as qemu probes them; a fixed VHD (footer only at the end) is raw unless declared', async () => {
    expect((await probe(patched(raw, 0, 'conectix'))).format).toBe('vpc');
    expect((await probe(patched(raw, 0, 'vhdxfile'))).format).toBe('vhdx');
    await expect(probe(patched(raw, 0, 'vhdxfile'), 'vpc')).rejects.toMatchObject({ code: 'FORMAT_MISMATCH' });
    const fixedVhd = patched(raw, raw.length - 512, 'conectix');
    expect((await probe(fixedVhd)).format).toBe('raw');
    expect((await probe(fixedVhd, 'vpc')).format).toBe('vpc');
    await expect(probe(raw, 'vpc')).rejects.toMatchObject({ code: 'FORMAT_MISMATCH' });
  });

  it('a declared format that agrees is accepted', async () => {
    expect((await probe(qcow2, 'qcow2')).format).toBe('qcow2');
    expect((await probe(vdi, 'vdi')).format).toBe('vdi');
    expect((await probe(raw, 'raw')).format).toBe('raw');
  });
});
