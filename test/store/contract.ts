/**
 * What every implementation of input staging and the output store must do,
 * written once and run against each (file.test.ts, s3.test.ts): invisible until
 * committed, nothing left by an abort, random access and ranges read back, keys
 * refused before storage is touched, sweeps that spare what a live owner holds.
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { expect, it } from 'vitest';
import { BufferSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { StoreObjectMissingError, type Stores } from '../../src/store/index.js';
import { seededBytes } from '../helpers/qemu.js';
import { waitFor } from '../helpers/service.js';

export async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

async function keysOf(list: AsyncIterable<{ key: string }>): Promise<string[]> {
  const keys: string[] = [];
  for await (const o of list) keys.push(o.key);
  return keys;
}

export interface ContractRig {
  stores: () => Stores;
  /** Writes in progress the backend holds (temp files, multipart uploads), for "nothing left behind". */
  uncommitted: () => Promise<string[]>;
  /** A unique key prefix, so runs sharing a bucket never meet. */
  key: (name: string) => string;
}

export function storeContract(rig: ContractRig): void {
  it('makes a staged upload visible only once committed, and reads it back with random access', async () => {
    const { staging } = rig.stores();
    const key = rig.key('in1');
    const writer = await staging.create(key);
    await pipeline(Readable.from([Buffer.from('hello '), Buffer.from('world')]), writer.stream);
    expect(await staging.stat(key)).toBeUndefined();
    const committed = await writer.commit();
    expect(committed.size).toBe(11);
    expect((await staging.stat(key))?.size).toBe(11);
    const source = await staging.open(key, 'shown-name');
    expect(source.size).toBe(11);
    expect(source.name).toBe('shown-name');
    expect(Buffer.from(await source.read(6, 5))).toEqual(Buffer.from('world'));
    expect(Buffer.from(await source.read(8, 100))).toEqual(Buffer.from('rld'));
    await source.close();
    expect(await keysOf(staging.list())).toContain(key);
    await staging.delete(key);
    expect(await staging.stat(key)).toBeUndefined();
    expect(await rig.uncommitted()).toEqual([]);
  });

  it('leaves nothing behind when a staged upload is aborted', async () => {
    const { staging } = rig.stores();
    const key = rig.key('in2');
    const writer = await staging.create(key);
    writer.stream.write(Buffer.alloc(1000, 1));
    await writer.abort();
    await writer.abort(); // twice is fine
    expect(await staging.stat(key)).toBeUndefined();
    expect(await rig.uncommitted()).toEqual([]);
  });

  it('writes an output as extents in guest order, visible once committed, and serves byte ranges', async () => {
    const { output } = rig.stores();
    const key = rig.key('out1');
    const data = Buffer.concat([seededBytes(8192, 7), Buffer.alloc(1 << 20), seededBytes(4096, 9)]);
    const source = new BufferSource(data, 'mem');
    const image = await openImage(source, { format: 'raw' });
    const writer = await output.create(key, data.length);
    const result = await convertToRaw(image, source, writer, { sha256: true });
    expect(await output.stat(key)).toBeUndefined();
    const stored = await writer.commit();
    expect(stored.size).toBe(data.length);
    expect((await output.stat(key))?.size).toBe(data.length);
    expect(result.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(await readAll(await output.read(key))).toEqual(data);
    expect(await readAll(await output.read(key, { start: 100, end: 199 }))).toEqual(data.subarray(100, 200));
    expect(await readAll(await output.read(key, { start: data.length - 5, end: data.length - 1 }))).toEqual(data.subarray(-5));
    expect(await keysOf(output.list())).toContain(key);
    await output.delete(key);
    expect(await output.stat(key)).toBeUndefined();
  });

  it('removes the partial output of an aborted conversion', async () => {
    const { output } = rig.stores();
    const key = rig.key('out2');
    const writer = await output.create(key, 8192);
    await writer.write({ kind: 'data', offset: 0, length: 4096, data: seededBytes(4096, 3) });
    await writer.abort();
    expect(await output.stat(key)).toBeUndefined();
    expect(await rig.uncommitted()).toEqual([]);
  });

  it('refuses an output that ends at another size than it was created for', async () => {
    const { output } = rig.stores();
    const key = rig.key('out3');
    const writer = await output.create(key, 8192);
    await writer.write({ kind: 'data', offset: 0, length: 4096, data: seededBytes(4096, 3) });
    await expect(writer.finish(4096)).rejects.toThrow(/8192/);
    await writer.abort();
    expect(await output.stat(key)).toBeUndefined();
    expect(await rig.uncommitted()).toEqual([]);
  });

  it('deletes a key\'s uncommitted writes with it', async () => {
    const { staging } = rig.stores();
    const key = rig.key('in3');
    const writer = await staging.create(key);
    writer.stream.write('x');
    await staging.delete(key);
    writer.stream.destroy();
    await writer.abort();
    expect(await rig.uncommitted()).toEqual([]);
    await staging.delete(rig.key('never-existed'));
  });

  it('refuses keys that are not plain tokens, before touching storage', async () => {
    const { staging, output } = rig.stores();
    for (const key of ['../etc/passwd', 'a/b', '', '.', '..', 'x'.repeat(200), 'a b', 'a\0b']) {
      await expect(staging.stat(key)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      await expect(staging.create(key)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      await expect(output.create(key, 1)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    }
  });

  it('reports missing objects with a typed error', async () => {
    const { staging, output } = rig.stores();
    await expect(output.read(rig.key('missing'))).rejects.toBeInstanceOf(StoreObjectMissingError);
    await expect(staging.open(rig.key('missing'))).rejects.toBeInstanceOf(StoreObjectMissingError);
  });

  it('sweeps old uncommitted writes, but never one whose owner is alive', async () => {
    const { staging, output } = rig.stores();
    const live = rig.key('live');
    const dead = rig.key('dead');
    const w1 = await staging.create(live);
    const w2 = await staging.create(dead);
    // Past one part (8 MiB), so a bucket has multipart uploads in progress, as a directory has temp files.
    const big = 9 << 20;
    const o1 = await output.create(live, big);
    await o1.write({ kind: 'data', offset: 0, length: big, data: seededBytes(big, 1) });
    w1.stream.write(Buffer.alloc(big, 1));
    w2.stream.write(Buffer.alloc(big, 2));
    await waitFor('the writes to be in progress', async () => (await rig.uncommitted()).length === 3);
    const owned = async (key: string): Promise<boolean> => key === live;
    expect(await staging.sweepUncommitted(Date.now() - 60_000, owned)).toBe(0);
    // Everything is "old" now: only the dead owner's write goes.
    expect(await staging.sweepUncommitted(Date.now() + 60_000, owned)).toBe(1);
    expect(await output.sweepUncommitted(Date.now() + 60_000, owned)).toBe(0);
    // The live writes still commit.
    await new Promise<void>((r) => w1.stream.end(() => r()));
    expect((await w1.commit()).size).toBe(big);
    await o1.finish(big);
    expect((await o1.commit()).size).toBe(big);
    await w2.abort();
    await staging.delete(live);
    await output.delete(live);
    expect(await rig.uncommitted()).toEqual([]);
  });

  it('answers ping', async () => {
    const { staging, output } = rig.stores();
    await expect(staging.ping()).resolves.toBeUndefined();
    await expect(output.ping()).resolves.toBeUndefined();
  });
}
