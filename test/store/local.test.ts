import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { LocalStore } from '../../src/store/local.js';
import { StoreObjectMissingError } from '../../src/store/store.js';
import { makeTempDir, seededBytes } from '../helpers/qemu.js';

async function text(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

describe('LocalStore', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let store: LocalStore;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-store-'));
    store = await LocalStore.open(join(dir, 'store'));
  });
  afterAll(() => cleanup());

  it('makes a streamed object visible only once committed', async () => {
    const writer = await store.createStreamWriter('input', 'job1');
    await pipeline(Readable.from([Buffer.from('hello '), Buffer.from('world')]), writer.stream);
    expect(await store.stat('input', 'job1')).toBeUndefined();
    const committed = await writer.commit();
    expect(committed.size).toBe(11);
    expect((await store.stat('input', 'job1'))?.size).toBe(11);
    expect((await text(await store.createReadStream('input', 'job1'))).toString()).toBe('hello world');
    expect(await readdir(join(dir, 'store', 'tmp'))).toEqual([]);
  });

  it('leaves nothing behind when a write is aborted', async () => {
    const writer = await store.createStreamWriter('input', 'job2');
    writer.stream.write(Buffer.alloc(1000, 1));
    await writer.abort();
    await writer.abort(); // twice is fine
    expect(await store.stat('input', 'job2')).toBeUndefined();
    expect(await readdir(join(dir, 'store', 'tmp'))).toEqual([]);
  });

  it('writes outputs as extents, sparse, atomically, and serves byte ranges', async () => {
    const data = Buffer.concat([seededBytes(8192, 7), Buffer.alloc(1 << 20), seededBytes(4096, 9)]);
    const source = new BufferSource(data, 'mem');
    const image = await openImage(source, { format: 'raw' });
    const writer = await store.createExtentWriter('output', 'job3');
    const result = await convertToRaw(image, source, writer, { sha256: true });
    expect(await store.stat('output', 'job3')).toBeUndefined();
    await writer.commit();
    const path = join(dir, 'store', 'output', 'job3');
    expect(await readFile(path)).toEqual(data);
    expect((await stat(path)).blocks * 512).toBeLessThan(data.length); // the hole stayed a hole
    expect(result.sha256).toMatch(/^[0-9a-f]{64}$/);
    const part = await text(await store.createReadStream('output', 'job3', { start: 100, end: 199 }));
    expect(part).toEqual(data.subarray(100, 200));
    const source2 = await store.openSource('output', 'job3', 'shown-name');
    expect(source2.size).toBe(data.length);
    expect(source2.name).toBe('shown-name');
    await source2.close();
  });

  it('removes the partial output of an aborted conversion', async () => {
    const writer = await store.createExtentWriter('output', 'job4');
    await writer.write({ kind: 'data', offset: 0, length: 4096, data: seededBytes(4096, 3) });
    await writer.abort();
    expect(await store.stat('output', 'job4')).toBeUndefined();
    expect(await readdir(join(dir, 'store', 'tmp'))).toEqual([]);
  });

  it('deletes committed objects and uncommitted writes of a key', async () => {
    const writer = await store.createStreamWriter('output', 'job5');
    writer.stream.write('x');
    await store.delete('output', 'job5');
    expect(await readdir(join(dir, 'store', 'tmp'))).toEqual([]);
    await store.delete('output', 'never-existed');
    writer.stream.destroy();
  });

  it('refuses keys that are not plain tokens, before touching the filesystem', async () => {
    for (const key of ['../etc/passwd', 'a/b', '', '.', '..', 'x'.repeat(200), 'a b', 'a\0b']) {
      await expect(store.stat('input', key)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      await expect(store.createStreamWriter('input', key)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    }
  });

  it('reports missing objects with a typed error', async () => {
    await expect(store.createReadStream('output', 'missing')).rejects.toBeInstanceOf(StoreObjectMissingError);
    await expect(store.openSource('input', 'missing')).rejects.toBeInstanceOf(StoreObjectMissingError);
  });

  it('lists objects, sweeps old uncommitted writes, knows its free space and answers ping', async () => {
    const keys: string[] = [];
    for await (const o of store.list('input')) keys.push(o.key);
    expect(keys).toContain('job1');
    const writer = await store.createStreamWriter('input', 'job6');
    writer.stream.write('partial');
    await new Promise((r) => writer.stream.end(r));
    expect(await store.sweepUncommitted(Date.now() - 60_000)).toBe(0);
    expect(await store.sweepUncommitted(Date.now() + 1000)).toBe(1);
    expect(await readdir(join(dir, 'store', 'tmp'))).toEqual([]);
    expect(await store.freeBytes()).toBeGreaterThan(0);
    await expect(store.ping()).resolves.toBeUndefined();
  });
});
