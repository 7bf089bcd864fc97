/** Input staging and the output store in a local directory: the shared contract, plus what only files have. */
import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferSource, convertToRaw, openImage } from '../../src/engine/index.js';
import { openStores, type Stores } from '../../src/store/index.js';
import { makeTempDir, seededBytes } from '../helpers/qemu.js';
import { storeContract } from './contract.js';

describe('file store', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let stores: Stores;

  beforeAll(async () => {
    ({ dir, cleanup } = await makeTempDir('diskconv-store-'));
    stores = await openStores({ dataDir: dir, store: { kind: 'file', root: undefined } });
  });
  afterAll(() => cleanup());

  storeContract({
    stores: () => stores,
    uncommitted: () => readdir(join(dir, 'store', 'tmp')),
    key: (name) => name,
  });

  it('keeps holes as holes and commits by rename into DATA_DIR/store/output', async () => {
    const data = Buffer.concat([seededBytes(8192, 7), Buffer.alloc(1 << 20), seededBytes(4096, 9)]);
    const source = new BufferSource(data, 'mem');
    const image = await openImage(source, { format: 'raw' });
    const writer = await stores.output.create('sparse', data.length);
    await convertToRaw(image, source, writer);
    const stored = await writer.commit();
    expect(stored.location).toBeUndefined(); // server paths are never shown to clients
    const path = join(dir, 'store', 'output', 'sparse');
    expect(await readFile(path)).toEqual(data);
    expect((await stat(path)).blocks * 512).toBeLessThan(data.length);
    expect(await stores.output.freeBytes()).toBeGreaterThan(0);
    expect(await stores.staging.freeBytes()).toBeGreaterThan(0);
  });

  it('uses STORE_URL=file:///path when given', async () => {
    const other = await openStores({ dataDir: dir, store: { kind: 'file', root: join(dir, 'elsewhere') } });
    const w = await other.staging.create('k');
    w.stream.end('abc');
    await new Promise((r) => w.stream.once('finish', r));
    await w.commit();
    expect(await readFile(join(dir, 'elsewhere', 'input', 'k'), 'utf8')).toBe('abc');
  });
});
