/** md5, sha256 and sha512 of the raw output in the conversion's one pass, equal to those of qemu-img's raw. */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { convertToRaw, FileSource, openImage } from '../../src/engine/index.js';
import { CountingSink } from '../fuzz/counting-sink.js';
import { makeTempDir, qemuImg, qemuIo } from '../helpers/qemu.js';

describe('hashes computed while converting', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-hashes-'));
    // Data, a hole and a zero cluster: holes must be hashed as zeros.
    await qemuImg('create', '-f', 'qcow2', join(dir, 'disk.qcow2'), '12M');
    await qemuIo('-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x17 5M 3M', '-c', 'write -z 9M 1M', join(dir, 'disk.qcow2'));
    await qemuImg('convert', '-O', 'raw', join(dir, 'disk.qcow2'), join(dir, 'ref.raw'));
  });
  afterAll(async () => cleanup?.());

  it('gives each asked-for digest, and only those', async () => {
    const ref = await readFile(join(dir, 'ref.raw'));
    const expected = Object.fromEntries(['sha256', 'sha512', 'md5'].map((a) => [a, createHash(a).update(ref).digest('hex')]));
    const convert = async (options: Parameters<typeof convertToRaw>[3]) => {
      const source = await FileSource.open(join(dir, 'disk.qcow2'));
      const image = await openImage(source);
      try {
        return await convertToRaw(image, source, new CountingSink(), options);
      } finally {
        await image.close();
        await source.close();
      }
    };
    const all = await convert({ sha256: true, hashes: ['md5', 'sha512'] });
    expect({ sha256: all.sha256, sha512: all.sha512, md5: all.md5 }).toEqual(expected);
    const some = await convert({ hashes: ['sha512', 'sha512'] });
    expect(some.sha512).toBe(expected.sha512);
    expect(some.sha256).toBeUndefined();
    expect(some.md5).toBeUndefined();
    const none = await convert({});
    expect([none.sha256, none.sha512, none.md5]).toEqual([undefined, undefined, undefined]);
  });
});
