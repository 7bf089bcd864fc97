/** Write-behind flushing of the file store's writes (src/store/file/write-behind.ts). */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { WriteBehind } from '../../src/store/file/write-behind.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { makeTempDir, qemuImg, seededBytes } from '../helpers/qemu.js';

describe('write-behind flushing', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let stores: Stores;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-wb-'));
    stores = await openStores({ dataDir: dir, store: { kind: 'file', root: undefined } });
  });
  afterAll(() => cleanup());

  it('flushes once enough new bytes are written, one flush at a time, and the rest at finish', async () => {
    const path = join(dir, 'f');
    await writeFile(path, seededBytes(1 << 20, 1));
    const behind = await WriteBehind.open(path, 64 * 1024);
    behind.written(1000);
    expect(behind.flushes).toBe(0); // not enough new bytes
    behind.written(70 * 1024);
    behind.written(200 * 1024); // the first flush is still in flight: no second one
    expect(behind.flushes).toBe(1);
    await behind.finish();
    behind.written(10 << 20); // after finish: nothing more
    expect(behind.flushes).toBe(1);
    expect((await readFile(path)).length).toBe(1 << 20);
  });

  it('lets an aborted write go without flushing', async () => {
    const path = join(dir, 'g');
    await writeFile(path, 'x');
    const behind = await WriteBehind.open(path, 1);
    behind.written(10);
    await behind.abort();
    await behind.finish(); // already closed: a no-op
    expect(behind.flushes).toBe(1);
  });

  it('converts through the output store\'s batched writes to the same bytes as qemu-img, flushing as it goes', async () => {
    // About 100 MiB of data in a 160 MiB disk, so several write-behind flushes run during the conversion.
    const raw = join(dir, 'disk.raw');
    const parts: Buffer[] = [];
    for (let i = 0; i < 40; i++) parts.push(seededBytes(5 << 19, 100 + i), Buffer.alloc(3 << 19 /* 1.5 MiB hole */));
    const data = Buffer.concat(parts);
    await writeFile(raw, data);
    const qcow2 = join(dir, 'disk.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
    const expected = join(dir, 'expected.raw');
    await qemuImg('convert', '-O', 'raw', qcow2, expected);

    const source = new BufferSource(await readFile(qcow2), 'disk.qcow2');
    const image = await openImage(source, { format: 'auto' });
    const writer = await stores.output.create('batched', image.virtualSize);
    expect(typeof writer.writeBatch).toBe('function');
    await convertToRaw(image, source, writer, { sha256: true });
    await writer.commit();
    const got = await readFile(join(dir, 'store', 'output', 'batched'));
    expect(got.equals(await readFile(expected))).toBe(true);
  });
});
