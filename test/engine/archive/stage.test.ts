/**
 * The scratch space bound of a staged archive member (src/engine/archive/stage.ts)
 * is the data it writes, not its size: zero blocks are left as holes, so a big
 * member of little data stages where its size would not fit, and a member of
 * dense data stops at the free space before filling the disk. The free space is
 * the real filesystem's (statfs of the scratch folder); the reserve left free is
 * set so that only a few hundred MiB of it are usable, wide margins against
 * other writers to the same filesystem.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { readFile, readdir, stat, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import zlib from 'node:zlib';
import { BufferSource } from '../../../src/engine/index.js';
import { Scratch, crc32 } from '../../../src/engine/archive/stage.js';
import { makeTempDir } from '../../helpers/qemu.js';

const MiB = 2 ** 20;
let dir: string;
let cleanup: () => Promise<void>;

type Run = [byte: number, length: number];
function* chunks(runs: Run[]): Generator<Buffer> {
  for (const [byte, length] of runs) for (let done = 0; done < length; done += MiB) yield Buffer.alloc(Math.min(MiB, length - done), byte);
}
/** A raw deflate stream of the runs, with the size and CRC-32 a zip entry would declare, and the sha256 of the bytes. */
async function deflated(runs: Run[]): Promise<{ data: Buffer; size: number; crc: number; sha256: string }> {
  let crc = 0;
  let size = 0;
  const hash = createHash('sha256');
  for (const c of chunks(runs)) {
    crc = crc32(c, crc);
    size += c.length;
    hash.update(c);
  }
  const out: Buffer[] = [];
  for await (const c of Readable.from(chunks(runs)).pipe(zlib.createDeflateRaw({ level: 1 }))) out.push(c as Buffer);
  return { data: Buffer.concat(out), size, crc, sha256: hash.digest('hex') };
}
/** A reserve that leaves `usable` bytes of the scratch filesystem's free space for staging. */
async function reserveLeaving(usable: number): Promise<number> {
  const fs = await statfs(dir);
  return fs.bavail * fs.bsize - usable;
}

beforeAll(async () => {
  ({ dir, cleanup } = await makeTempDir('diskconv-stage-'));
});
afterAll(async () => cleanup());

describe('staging bound: the data written, not the size', () => {
  it('a 513 MiB member of 2 MiB data stages with 256 MiB free, sparse, and reads back exactly', async () => {
    const member = await deflated([[0x5a, MiB], [0, 511 * MiB], [0x5b, MiB]]);
    const scratch = new Scratch(dir, 'sparse.archive-', await reserveLeaving(256 * MiB));
    try {
      const staged = await scratch.stage({
        source: new BufferSource(member.data, 'm.zip'),
        offset: 0,
        length: member.data.length,
        codec: 'deflate-raw',
        expect: { size: member.size, crc32: member.crc },
        what: 'm.zip/disk.raw',
        maxVirtualSize: 1024 * MiB,
      });
      try {
        expect(staged.size).toBe(513 * MiB);
        const [folder] = (await readdir(dir)).filter((n) => n.startsWith('sparse.archive-'));
        const file = join(dir, folder as string, 'member-0');
        // Holes stay holes: what the file takes is its data (and a little metadata), not its size.
        expect((await stat(file)).blocks * 512).toBeLessThanOrEqual(4 * MiB);
        expect(createHash('sha256').update(await readFile(file)).digest('hex')).toBe(member.sha256);
      } finally {
        await staged.close();
      }
    } finally {
      await scratch.remove();
    }
  }, 120_000);

  it('a member of 384 MiB of data with 128 MiB free stops at the free space: INSUFFICIENT_SPACE, no more written', async () => {
    const member = await deflated([[0x11, 384 * MiB]]);
    const scratch = new Scratch(dir, 'dense.archive-', await reserveLeaving(128 * MiB));
    try {
      const err = await scratch
        .stage({ source: new BufferSource(member.data, 'd.zip'), offset: 0, length: member.data.length, codec: 'deflate-raw', expect: { size: member.size, crc32: member.crc }, what: 'd.zip/disk.raw', maxVirtualSize: 1024 * MiB })
        .then(() => undefined, (e: unknown) => e as { code?: string; message?: string });
      expect(err?.code, err?.message).toBe('INSUFFICIENT_SPACE');
      expect(err?.message).toMatch(/d\.zip\/disk\.raw: its data needs more than the \d+ bytes free for scratch space/);
      // The budget it names is the free space it saw less the reserve (128 MiB, give or take what other
      // writers did in between); the file holds no more than that, and its extent blocks (1 MiB allowed).
      const budget = Number(/more than the (\d+) bytes/.exec(String(err?.message))?.[1]);
      expect(Math.abs(budget - 128 * MiB)).toBeLessThan(64 * MiB);
      const [folder] = (await readdir(dir)).filter((n) => n.startsWith('dense.archive-'));
      expect((await stat(join(dir, folder as string, 'member-0'))).blocks * 512).toBeLessThanOrEqual(budget + MiB);
    } finally {
      await scratch.remove();
    }
  }, 120_000);

  it('a member of zeros (a bomb that writes nothing) still stops at maxVirtualSize', async () => {
    const member = await deflated([[0, 300 * MiB]]);
    const scratch = new Scratch(dir, 'zeros.archive-');
    try {
      const err = await scratch
        .stage({ source: new BufferSource(member.data, 'z.gz'), offset: 0, length: member.data.length, codec: 'deflate-raw', what: 'z.zip/disk.raw', maxVirtualSize: 256 * MiB })
        .then(() => undefined, (e: unknown) => e as { code?: string; message?: string });
      expect(err?.code, err?.message).toBe('LIMIT_EXCEEDED');
    } finally {
      await scratch.remove();
    }
  }, 120_000);
});
