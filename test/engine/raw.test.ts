import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { makeTempDir, mixedContent, pickInfo, qemuInfo, qemuRawSha256, sha256File } from '../helpers/qemu.js';
import { runDiskconv } from '../helpers/cli.js';
import { BufferSource, openImage, readExtents } from '../../src/engine/index.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await makeTempDir()));
afterAll(async () => cleanup());

describe('raw', () => {
  for (const size of [0, 1000, 3_000_000, 4 * 2 ** 20]) {
    it(`converts and reports a ${size}-byte raw file like qemu-img`, async () => {
      const src = join(dir, `r${size}.img`);
      await writeFile(src, mixedContent(size, size + 3));
      const dst = join(dir, `r${size}.out`);
      const conv = await runDiskconv(['convert', '-O', 'raw', src, dst]);
      expect(conv.stderr).toBe('');
      expect(conv.code).toBe(0);
      expect(await sha256File(dst)).toBe(await qemuRawSha256(src, dir));
      const ours = await runDiskconv(['info', '--output=json', src]);
      expect(JSON.parse(ours.stdout)).toEqual(pickInfo(await qemuInfo(src)));
    });
  }

  it('yields an ordered, contiguous extent stream covering the disk', async () => {
    const bytes = mixedContent(1_234_567, 9);
    const source = new BufferSource(bytes);
    const image = await openImage(source);
    let next = 0;
    for await (const e of readExtents(image, source, { maxReadBytes: 65536, batchBytes: 200_000 })) {
      expect(e.offset).toBe(next);
      next += e.length;
    }
    expect(next).toBe(image.virtualSize);
  });
});
